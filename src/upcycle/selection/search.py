"""Merge-aware checkpoint selection: pick each expert's step by the score of the merge.

A stopping rule picks each expert's checkpoint from that expert's own statistics. The
search here picks the combination of checkpoints whose merge scores best, by coordinate
ascent over one task's step at a time. The score function is any callable from an
assignment `{task: step}` to a number where higher is better. In real use it merges the
experts at those steps and returns the mean validation accuracy over tasks, so each call
costs one merge and one evaluation. The search caches scores by assignment and never
scores the same assignment twice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from upcycle.errors import CheckpointError, ConfigError, MergeError

logger = logging.getLogger(__name__)

ScoreFunction = Callable[[Mapping[str, int]], float]


class CommonStep(NamedTuple):
    """The best assignment that uses one step for every task."""

    step: int
    score: float
    evaluations: int


@dataclass(frozen=True)
class SearchMove:
    """One coordinate update of the search.

    Attributes:
        round: Round number, from 1.
        task: Task whose step was varied.
        step: That task's step after the update.
        score: Score of the assignment after the update.
        improved: Whether the update raised the score.
    """

    round: int
    task: str
    step: int
    score: float
    improved: bool


@dataclass(frozen=True)
class SearchResult:
    """The outcome of `coordinate_ascent`.

    Attributes:
        best_steps: Chosen step per task, in the task order of the input.
        best_score: Score of `best_steps`.
        evaluations: Number of distinct assignments scored, which is the number of merges
            evaluated, including the start.
        history: Every coordinate update in order.
        rounds: Rounds run.
        converged: Whether the last round improved nothing. False when `max_rounds` ran out.
    """

    best_steps: dict[str, int]
    best_score: float
    evaluations: int
    history: list[SearchMove] = field(default_factory=list)
    rounds: int = 0
    converged: bool = True


class _CachedScore:
    """A score function that scores each distinct assignment once."""

    def __init__(self, score: ScoreFunction, tasks: Sequence[str]) -> None:
        self._score = score
        self._tasks = tuple(tasks)
        self._cache: dict[tuple[int, ...], float] = {}

    @property
    def evaluations(self) -> int:
        return len(self._cache)

    def __call__(self, assignment: Mapping[str, int]) -> float:
        key = tuple(assignment[task] for task in self._tasks)
        if key not in self._cache:
            ordered = dict(zip(self._tasks, key, strict=True))
            self._cache[key] = _finite_score(self._score(ordered), ordered)
        return self._cache[key]


def best_common_step(score: ScoreFunction, steps: Mapping[str, Sequence[int]]) -> CommonStep:
    """Score every step that all tasks share and return the best one.

    Ties go to the earlier step, which costs less fine-tuning.

    Args:
        score: Score of an assignment `{task: step}`, where higher is better.
        steps: Checkpoint steps available per task.

    Returns:
        The best shared step, its score, and the number of assignments scored.

    Raises:
        ConfigError: If `steps` is empty or a task has no steps.
        CheckpointError: If no step is available for every task.
        MergeError: If the score function returns a value that is not a finite number.
    """
    available = _sorted_steps(steps)
    cached = _CachedScore(score, list(available))
    return _best_common_step(cached, available)


def coordinate_ascent(
    score: ScoreFunction,
    steps: Mapping[str, Sequence[int]],
    *,
    start: Mapping[str, int] | None = None,
    max_rounds: int = 10,
) -> SearchResult:
    """Choose one checkpoint step per task to maximize the score of their merge.

    Each round visits the tasks in the order of `steps`. For each task it scores every one
    of that task's steps with the other tasks' steps fixed, then moves to the best one,
    taking the earliest step among equal scores. The search ends after the first round that
    does not raise the score, or after `max_rounds` rounds. Like any coordinate ascent it
    can end at a local optimum that no change of a single task's step improves.

    Args:
        score: Score of an assignment `{task: step}`, where higher is better.
        steps: Checkpoint steps available per task, in any order.
        start: Starting step per task. Default: the best common step, found with the same
            cache, so its evaluations count in the result.
        max_rounds: Maximum number of rounds, >= 1.

    Raises:
        ConfigError: If `steps` is empty, a task has no steps, `start` names other tasks or a
            step that is not available, or `max_rounds` < 1.
        CheckpointError: If `start` is None and no step is available for every task.
        MergeError: If the score function returns a value that is not a finite number.
    """
    if isinstance(max_rounds, bool) or not isinstance(max_rounds, int) or max_rounds < 1:
        raise ConfigError(f"max_rounds={max_rounds!r} is invalid: it must be an integer >= 1")
    available = _sorted_steps(steps)
    tasks = list(available)
    cached = _CachedScore(score, tasks)
    if start is None:
        common = _best_common_step(cached, available)
        current = {task: common.step for task in tasks}
    else:
        current = _validated_start(start, available)
    current_score = cached(current)

    history: list[SearchMove] = []
    converged = False
    rounds = 0
    while rounds < max_rounds and not converged:
        rounds += 1
        round_start_score = current_score
        for task in tasks:
            # Vary this task's step with every other task fixed. Ascending order and a strict
            # comparison keep the earliest step among equal scores.
            best_step, best_score = None, -math.inf
            for step in available[task]:
                candidate_score = cached({**current, task: step})
                if candidate_score > best_score:
                    best_step, best_score = step, candidate_score
            improved = best_score > current_score
            current = {**current, task: best_step}
            current_score = best_score
            history.append(SearchMove(rounds, task, best_step, best_score, improved))
        converged = current_score <= round_start_score

    if not converged:
        logger.warning(
            "coordinate ascent stopped after max_rounds=%d rounds while still improving "
            "(score %.6g); raise max_rounds to search further",
            max_rounds,
            current_score,
        )
    return SearchResult(
        best_steps=current,
        best_score=current_score,
        evaluations=cached.evaluations,
        history=history,
        rounds=rounds,
        converged=converged,
    )


def _best_common_step(cached: _CachedScore, available: Mapping[str, Sequence[int]]) -> CommonStep:
    shared = sorted(set.intersection(*(set(task_steps) for task_steps in available.values())))
    if not shared:
        per_task = "; ".join(
            f"{task}: {list(task_steps)}" for task, task_steps in available.items()
        )
        raise CheckpointError(
            f"no checkpoint step is available for every task ({per_task}); save checkpoints "
            "at the same steps for all tasks, or pass start= to coordinate_ascent"
        )
    best_step, best_score = shared[0], -math.inf
    for step in shared:
        step_score = cached({task: step for task in available})
        if step_score > best_score:
            best_step, best_score = step, step_score
    return CommonStep(step=best_step, score=best_score, evaluations=cached.evaluations)


def _sorted_steps(steps: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    if not steps:
        raise ConfigError("steps is empty; give at least one task with its checkpoint steps")
    available = {}
    for task, task_steps in steps.items():
        unique = sorted(set(task_steps))
        if not unique:
            raise ConfigError(f"task {task!r} has no checkpoint steps; give at least one step")
        available[task] = unique
    return available


def _validated_start(
    start: Mapping[str, int], available: Mapping[str, Sequence[int]]
) -> dict[str, int]:
    if set(start) != set(available):
        raise ConfigError(
            f"start names tasks {sorted(start)} but steps names {sorted(available)}; give one "
            "start step for every task"
        )
    for task, step in start.items():
        if step not in available[task]:
            raise ConfigError(
                f"start step {step} of task {task!r} is not one of its checkpoint steps "
                f"{list(available[task])}"
            )
    return {task: start[task] for task in available}


def _finite_score(value: object, assignment: Mapping[str, int]) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise MergeError(
            f"score function returned {value!r} for {assignment}; it must return a number"
        ) from error
    if not math.isfinite(number):
        raise MergeError(
            f"score function returned {number} for {assignment}; a merge with a non-finite "
            "score is broken, so check the experts at those steps for NaN or inf weights"
        )
    return number
