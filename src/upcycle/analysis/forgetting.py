"""Examples an expert gets right and the merged model gets wrong, by difficulty decile.

Each row of forgetting.csv counts, within one group of examples, the examples the expert
classifies correctly (n) and how many of those the merged model gets wrong (forgotten).
The group is every example (decile "all", score "none") or one difficulty decile of one
score, 0 (easiest) to 9 (hardest).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, get_args

import numpy as np

from upcycle.analysis.difficulty import NUM_DECILES, AnalysisError, difficulty_deciles

Kind = Literal["full", "lora"]

FORGETTING_COLUMNS = (
    "seed",
    "kind",
    "method",
    "step",
    "task",
    "split",
    "score",
    "decile",
    "n",
    "forgotten",
    "rate",
)
ALL_EXAMPLES_SCORE = "none"
ALL_EXAMPLES_DECILE = "all"


def _as_bool(name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise AnalysisError(f"{name} must be a 1-D array, got shape {array.shape}")
    if array.dtype != bool:
        if array.size and not np.isin(array, (0, 1)).all():
            raise AnalysisError(f"{name} must be boolean (or 0/1), got values {np.unique(array)}")
        array = array.astype(bool)
    return array


def forgetting_by_merge(expert_correct: np.ndarray, merged_correct: np.ndarray) -> np.ndarray:
    """Return which examples the merge forgot: the expert is right and the merged model wrong.

    Args:
        expert_correct, merged_correct: boolean arrays [N] for the same examples in the
            same order.

    Returns:
        boolean array [N].

    Raises:
        AnalysisError: for arrays that are not 1-D booleans (or 0/1) of equal length.
    """
    expert_correct = _as_bool("expert_correct", expert_correct)
    merged_correct = _as_bool("merged_correct", merged_correct)
    if expert_correct.shape != merged_correct.shape:
        raise AnalysisError(
            f"expert_correct and merged_correct must cover the same examples, got lengths "
            f"{len(expert_correct)} and {len(merged_correct)}"
        )
    return expert_correct & ~merged_correct


def _row(
    context: dict, *, score: str, decile: str, retained: np.ndarray, forgotten: np.ndarray
) -> dict:
    n = int(retained.sum())
    forgotten_count = int(forgotten.sum())
    rate = forgotten_count / n if n else math.nan
    return {
        **context,
        "score": score,
        "decile": decile,
        "n": n,
        "forgotten": forgotten_count,
        "rate": rate,
    }


def forgetting_rows(
    *,
    expert_correct: np.ndarray,
    merged_correct: np.ndarray,
    scores: Mapping[str, np.ndarray] | None,
    seed: int,
    kind: Kind,
    method: str,
    step: int,
    task: str,
    split: str,
) -> list[dict]:
    """Build the forgetting.csv rows of one merged model on one task and split.

    The first row covers all examples (score "none", decile "all"). Then, for each score
    name in `scores`, the examples are split into difficulty deciles by
    `difficulty_deciles` (a larger score is harder, NaN is hardest) and each decile gets
    a row, "0" to "9". In each row, n is the number of examples in the group that the
    expert classifies correctly, forgotten is how many of those the merged model gets
    wrong, and rate is forgotten / n (NaN when n is 0). Deciles are cut over all examples,
    not only those the expert gets right.

    Args:
        expert_correct, merged_correct: boolean arrays [N].
        scores: score name (such as "learned_step" or "el2n") -> scores [N]. Pass None
            or an empty mapping for the "all" row only.
        seed, kind, method, step, task, split: the identifying columns of every row.

    Returns:
        Rows as dicts with the keys FORGETTING_COLUMNS, in that order.

    Raises:
        AnalysisError: for arrays of other lengths, an unknown kind, a score named "none",
            or a score that is NaN for every example. Such a score cannot rank examples
            (EL2N is NaN when it was never computed), so leave it out.
    """
    if kind not in get_args(Kind):
        raise AnalysisError(
            f"unknown kind {kind!r}, supported: {', '.join(map(repr, get_args(Kind)))}"
        )
    expert_correct = _as_bool("expert_correct", expert_correct)
    forgotten = forgetting_by_merge(expert_correct, merged_correct)
    context = {
        "seed": seed,
        "kind": kind,
        "method": method,
        "step": step,
        "task": task,
        "split": split,
    }
    rows = [
        _row(
            context,
            score=ALL_EXAMPLES_SCORE,
            decile=ALL_EXAMPLES_DECILE,
            retained=expert_correct,
            forgotten=forgotten,
        )
    ]
    for name, values in (scores or {}).items():
        if name == ALL_EXAMPLES_SCORE:
            raise AnalysisError(
                f"score name {ALL_EXAMPLES_SCORE!r} is reserved for the all-examples row. "
                "Rename the score"
            )
        values = np.asarray(values, dtype=np.float64)
        if values.shape != expert_correct.shape:
            raise AnalysisError(
                f"score {name!r} must have one value per example ({len(expert_correct)}), "
                f"got shape {values.shape}"
            )
        if values.size and np.isnan(values).all():
            raise AnalysisError(
                f"score {name!r} is NaN for every example of task {task!r}, so it cannot rank "
                "them. Leave it out of scores"
            )
        deciles = difficulty_deciles(values, higher_is_harder=True)
        for decile in range(NUM_DECILES):
            members = deciles == decile
            rows.append(
                _row(
                    context,
                    score=name,
                    decile=str(decile),
                    retained=expert_correct & members,
                    forgotten=forgotten & members,
                )
            )
    return rows
