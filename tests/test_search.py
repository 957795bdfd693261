"""Merge-aware checkpoint search on hand-made score tables."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest

from upcycle.errors import CheckpointError, ConfigError, MergeError
from upcycle.selection import SearchMove, best_common_step, coordinate_ascent

STEPS = {"a": [100, 200, 300, 400], "b": [100, 200, 300, 400], "c": [100, 200, 300, 400]}

# Points each task contributes to the merge score at each of its steps. Integers keep sums
# exact. Common steps score 190, 203, 210 and 210, so the best common step is 300 (the
# earlier of a tie), while the optimum a=300, b=100, c=400 scores 74 + 80 + 66 = 220.
POINTS = {
    "a": {100: 60, 200: 70, 300: 74, 400: 70},
    "b": {100: 80, 200: 78, 300: 76, 400: 74},
    "c": {100: 50, 200: 55, 300: 60, 400: 66},
}


class CountingScore:
    """Score of an assignment from a table, counting every call."""

    def __init__(self, table: Mapping[str, Mapping[int, int]]) -> None:
        self.table = table
        self.calls: list[dict[str, int]] = []

    def __call__(self, steps: Mapping[str, int]) -> float:
        self.calls.append(dict(steps))
        return float(sum(self.table[task][step] for task, step in steps.items()))


def test_best_common_step_tie_earlier():
    score = CountingScore(POINTS)
    common = best_common_step(score, STEPS)
    assert common.step == 300
    assert common.score == 210.0
    assert common.evaluations == 4


def test_best_common_step_shared_only():
    steps = {"a": [100, 200, 300], "b": [200, 300, 400]}
    score = CountingScore({"a": {200: 1, 300: 5}, "b": {200: 1, 300: 1}})
    common = best_common_step(score, steps)
    assert common.step == 300
    assert common.evaluations == 2
    assert score.calls == [{"a": 200, "b": 200}, {"a": 300, "b": 300}]


def test_best_common_step_none_shared():
    with pytest.raises(CheckpointError, match="no checkpoint step is available for every task"):
        best_common_step(CountingScore(POINTS), {"a": [100], "b": [200]})


def test_ascent_finds_optimum():
    # From the common step 300 (4 merges), round 1 scores 3 new merges per task and moves
    # b to 100 and c to 400. Round 2 scores 3 new merges for a and for b, but every merge for
    # c was scored in round 1. Total 4 + 9 + 6 = 19.
    score = CountingScore(POINTS)
    result = coordinate_ascent(score, STEPS)
    assert result.best_steps == {"a": 300, "b": 100, "c": 400}
    assert result.best_score == 220.0
    assert result.evaluations == 19
    assert len(score.calls) == 19
    assert result.rounds == 2
    assert result.converged


def test_ascent_history():
    result = coordinate_ascent(CountingScore(POINTS), STEPS)
    assert result.history == [
        SearchMove(round=1, task="a", step=300, score=210.0, improved=False),
        SearchMove(round=1, task="b", step=100, score=214.0, improved=True),
        SearchMove(round=1, task="c", step=400, score=220.0, improved=True),
        SearchMove(round=2, task="a", step=300, score=220.0, improved=False),
        SearchMove(round=2, task="b", step=100, score=220.0, improved=False),
        SearchMove(round=2, task="c", step=400, score=220.0, improved=False),
    ]


def test_ascent_given_start():
    # Same path as from the common step, without the three other common-step merges.
    score = CountingScore(POINTS)
    result = coordinate_ascent(score, STEPS, start={"a": 300, "b": 300, "c": 300})
    assert result.best_steps == {"a": 300, "b": 100, "c": 400}
    assert result.evaluations == 16
    assert len(score.calls) == 16


def test_ascent_calls_distinct():
    score = CountingScore(POINTS)
    coordinate_ascent(score, STEPS)
    distinct = {tuple(sorted(call.items())) for call in score.calls}
    assert len(distinct) == len(score.calls)


def test_ascent_max_rounds():
    result = coordinate_ascent(CountingScore(POINTS), STEPS, max_rounds=1)
    assert not result.converged
    assert result.rounds == 1
    assert result.evaluations == 13
    assert result.best_score == 220.0


def test_ascent_local_optimum():
    # No single-task change from (1, 1) helps, although (2, 2) scores higher.
    table = {(1, 1): 5.0, (1, 2): 4.0, (2, 1): 4.0, (2, 2): 9.0}

    def score(steps: Mapping[str, int]) -> float:
        return table[(steps["x"], steps["y"])]

    result = coordinate_ascent(score, {"x": [1, 2], "y": [1, 2]}, start={"x": 1, "y": 1})
    assert result.best_steps == {"x": 1, "y": 1}
    assert result.best_score == 5.0
    assert result.evaluations == 3
    assert result.rounds == 1


def test_ascent_ties_go_earlier():
    result = coordinate_ascent(
        lambda steps: 1.0, {"a": [100, 200], "b": [200, 100]}, start={"a": 200, "b": 200}
    )
    assert result.best_steps == {"a": 100, "b": 100}
    assert result.evaluations == 3
    assert result.rounds == 1


def test_ascent_task_order_kept():
    result = coordinate_ascent(CountingScore(POINTS), {"c": STEPS["c"], "a": STEPS["a"]})
    assert list(result.best_steps) == ["c", "a"]


def test_ascent_rejects_unknown_start():
    with pytest.raises(ConfigError, match="start step 250 of task 'a' is not one of"):
        coordinate_ascent(CountingScore(POINTS), STEPS, start={"a": 250, "b": 100, "c": 100})


def test_ascent_rejects_start_tasks():
    with pytest.raises(ConfigError, match="give one start step for every task"):
        coordinate_ascent(CountingScore(POINTS), STEPS, start={"a": 100})


def test_ascent_rejects_zero_rounds():
    with pytest.raises(ConfigError, match="max_rounds=0 is invalid"):
        coordinate_ascent(CountingScore(POINTS), STEPS, max_rounds=0)


def test_ascent_rejects_empty_steps():
    with pytest.raises(ConfigError, match="task 'a' has no checkpoint steps"):
        coordinate_ascent(CountingScore(POINTS), {"a": []})


def test_ascent_rejects_nan_score():
    with pytest.raises(MergeError, match="score function returned nan for"):
        coordinate_ascent(lambda steps: math.nan, {"a": [100]})
