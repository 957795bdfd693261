"""Per-example difficulty scores from a fine-tune's visit history.

A visit history is three aligned 1-D arrays with one entry per time a training example
was in a batch: the optimizer step, the example index and whether the prediction was
correct. The arrays may be in any order. Visits are ordered by step, and two visits of
one example at the same step (a batch that straddles two epochs) keep their array order.

Steps that do not exist are NaN: `learned_steps` and `first_correct_steps` return NaN for
an example that was never learned or never correct, so their results are float arrays.
`difficulty_deciles` ranks NaN as hardest, which puts never-learned examples in the top
deciles of the learned-step score without any conversion by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from upcycle.errors import UpcycleError

NUM_DECILES = 10
CONCENTRATION_FRACTIONS = (0.01, 0.05, 0.10)


class AnalysisError(UpcycleError, ValueError):
    """Visit histories, scores or predictions that cannot be analysed."""


class _SortedVisits(NamedTuple):
    """Visits sorted by (example index, step, array position)."""

    order: np.ndarray  # positions in the caller's arrays, in sorted order
    indices: np.ndarray
    steps: np.ndarray
    correct: np.ndarray


def _as_1d(name: str, values, dtype) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise AnalysisError(f"{name} must be a 1-D array, got shape {array.shape}")
    if dtype is bool and array.dtype != bool:
        if array.size and not np.isin(array, (0, 1)).all():
            raise AnalysisError(f"{name} must be boolean (or 0/1), got values {np.unique(array)}")
        return array.astype(bool)
    if dtype is int and array.size and not np.issubdtype(array.dtype, np.integer):
        raise AnalysisError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64) if dtype is int else array


def _sort_visits(steps, indices, correct, num_examples: int) -> _SortedVisits:
    """Validate a visit history and sort it by example, then step, then array position.

    Raises:
        AnalysisError: for arrays that are not 1-D or differ in length, non-integer steps
            or indices, non-boolean outcomes, or an index outside [0, num_examples).
    """
    steps = _as_1d("steps", steps, int)
    indices = _as_1d("indices", indices, int)
    correct = _as_1d("correct", correct, bool)
    if not len(steps) == len(indices) == len(correct):
        raise AnalysisError(
            f"steps, indices and correct must have one entry per visit, got lengths "
            f"{len(steps)}, {len(indices)} and {len(correct)}"
        )
    if num_examples < 0:
        raise AnalysisError(f"num_examples must be >= 0, got {num_examples}")
    if indices.size and (indices.min() < 0 or indices.max() >= num_examples):
        bad = indices[(indices < 0) | (indices >= num_examples)]
        raise AnalysisError(
            f"example indices must lie in [0, {num_examples}), got {bad[:5].tolist()}. "
            "Pass the number of training examples as num_examples"
        )
    # np.lexsort sorts by the last key first: example index, then step, then position.
    order = np.lexsort((np.arange(len(steps)), steps, indices))
    return _SortedVisits(order, indices[order], steps[order], correct[order])


def _group_starts(sorted_indices: np.ndarray) -> np.ndarray:
    """Return the position of each example's first visit in index-sorted visits."""
    if sorted_indices.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_indices[1:] != sorted_indices[:-1]])


def learned_steps(steps, indices, correct, num_examples: int) -> np.ndarray:
    """Return the step at which each example was learned for good.

    An example's learned step is the step of the first visit in its final run of correct
    visits, so every later visit was correct too.

    Args:
        steps, indices, correct: the visit history, 1-D arrays of equal length [V].
        num_examples: number of training examples N, so indices lie in [0, N).

    Returns:
        float64 array [N], NaN where the last visit was wrong or the example was never seen.

    Raises:
        AnalysisError: for a malformed history (see `_sort_visits`).
    """
    visits = _sort_visits(steps, indices, correct, num_examples)
    result = np.full(num_examples, np.nan)
    if visits.indices.size == 0:
        return result
    starts = _group_starts(visits.indices)
    ends = np.r_[starts[1:], visits.indices.size]
    # Position of each example's last wrong visit, or -1 when it was never wrong.
    wrong_position = np.where(visits.correct, -1, np.arange(visits.indices.size))
    last_wrong = np.maximum.reduceat(wrong_position, starts)
    learned = visits.correct[ends - 1]
    run_start = np.maximum(last_wrong + 1, starts)
    result[visits.indices[starts[learned]]] = visits.steps[run_start[learned]]
    return result


def first_correct_steps(steps, indices, correct, num_examples: int) -> np.ndarray:
    """Return the step of each example's first correct visit.

    Returns:
        float64 array [N], NaN where the example was never classified correctly.

    Raises:
        AnalysisError: for a malformed history (see `_sort_visits`).
    """
    visits = _sort_visits(steps, indices, correct, num_examples)
    result = np.full(num_examples, np.nan)
    correct_indices = visits.indices[visits.correct]
    correct_steps = visits.steps[visits.correct]
    firsts = _group_starts(correct_indices)
    result[correct_indices[firsts]] = correct_steps[firsts]
    return result


def forgetting_events(steps, indices, correct, num_examples: int) -> np.ndarray:
    """Count each example's forgetting events.

    A forgetting event is a visit that is wrong while the same example's previous visit
    was correct (Toneva et al., 2019, "An Empirical Study of Example Forgetting during
    Deep Neural Network Learning").

    Returns:
        int64 array [N] of event counts.

    Raises:
        AnalysisError: for a malformed history (see `_sort_visits`).
    """
    visits = _sort_visits(steps, indices, correct, num_examples)
    same_example = visits.indices[1:] == visits.indices[:-1]
    forgotten = same_example & visits.correct[:-1] & ~visits.correct[1:]
    return np.bincount(visits.indices[1:][forgotten], minlength=num_examples).astype(np.int64)


def last_visits(steps, indices, num_examples: int) -> np.ndarray:
    """Return the array position of each example's most recent visit.

    Returns:
        int64 array [N] of positions into the history arrays, -1 for examples never seen.

    Raises:
        AnalysisError: for a malformed history (see `_sort_visits`).
    """
    visits = _sort_visits(steps, indices, np.zeros(len(np.asarray(steps)), bool), num_examples)
    result = np.full(num_examples, -1, dtype=np.int64)
    if visits.indices.size == 0:
        return result
    ends = np.r_[_group_starts(visits.indices)[1:], visits.indices.size]
    result[visits.indices[ends - 1]] = visits.order[ends - 1]
    return result


def el2n_scores(probabilities: torch.Tensor, labels) -> torch.Tensor:
    """Compute EL2N scores: the L2 norm of the softmax output minus the one-hot label.

    Paul et al. (2021), "Deep Learning on a Data Diet", average this error over several
    networks early in training. Here it is the score of one network, the one whose
    probabilities are given.

    Args:
        probabilities: softmax outputs [N, C], each row summing to 1.
        labels: class indices [N] (tensor, array or list).

    Returns:
        float32 tensor [N] on the device of `probabilities`.

    Raises:
        AnalysisError: for mismatched shapes, labels outside [0, C), or a negative entry
            or a row that does not sum to 1 (logits passed instead of probabilities).
    """
    if probabilities.ndim != 2:
        raise AnalysisError(
            f"probabilities must have shape [N, C], got {tuple(probabilities.shape)}"
        )
    probabilities = probabilities.float()
    labels = torch.as_tensor(labels, dtype=torch.long, device=probabilities.device)
    num_rows, num_classes = probabilities.shape
    if labels.shape != (num_rows,):
        raise AnalysisError(
            f"labels must have shape [{num_rows}] to match probabilities, got {tuple(labels.shape)}"
        )
    if num_rows == 0:
        return probabilities.new_zeros(0)
    if labels.min() < 0 or labels.max() >= num_classes:
        raise AnalysisError(
            f"labels must lie in [0, {num_classes}), got {labels.unique().tolist()}"
        )
    row_sums = probabilities.sum(dim=1)
    sums_to_one = torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-2)
    if not sums_to_one or probabilities.min() < 0:
        raise AnalysisError(
            "probabilities must be >= 0 with rows that sum to 1 (got values from "
            f"{probabilities.min().item():.4g} and row sums from {row_sums.min().item():.4g} "
            f"to {row_sums.max().item():.4g}). Apply softmax to the logits first"
        )
    # Error vector p - onehot(y): subtract 1 at each row's label.
    error = probabilities.scatter_add(1, labels[:, None], -torch.ones_like(probabilities[:, :1]))
    return torch.linalg.vector_norm(error, dim=1)


def gradient_concentration(
    norms: np.ndarray, fractions: Sequence[float] = CONCENTRATION_FRACTIONS
) -> dict[float, float]:
    """Compute the share of the summed gradient norm that comes from the largest norms.

    For each fraction f, the top set is the k = max(1, floor(f * n + 0.5)) examples with
    the largest norms among the n given (f * n rounded to the nearest integer, halves up,
    and at least one example).

    Args:
        norms: per-example gradient norms [n], finite and >= 0.
        fractions: fractions of examples in (0, 1].

    Returns:
        fraction -> share in [0, 1]. Every share is NaN when `norms` is empty or sums to
        zero.

    Raises:
        AnalysisError: for a norm array that is not 1-D, a negative or non-finite norm, or
            a fraction outside (0, 1].
    """
    norms = np.asarray(norms, dtype=np.float64)
    if norms.ndim != 1:
        raise AnalysisError(f"norms must be a 1-D array, got shape {norms.shape}")
    if norms.size and (not np.isfinite(norms).all() or norms.min() < 0):
        bad = norms[~np.isfinite(norms) | (norms < 0)]
        raise AnalysisError(
            f"gradient norms must be finite and >= 0, got {bad[:5].tolist()}. Drop examples "
            "without a recorded norm first"
        )
    for fraction in fractions:
        if not 0 < fraction <= 1:
            raise AnalysisError(f"fractions must lie in (0, 1], got {fraction}")
    cumulative = np.cumsum(np.sort(norms)[::-1])
    total = cumulative[-1] if norms.size else 0.0
    shares = {}
    for fraction in fractions:
        if total <= 0:
            shares[fraction] = math.nan
            continue
        top = max(1, math.floor(fraction * norms.size + 0.5))
        shares[fraction] = float(cumulative[top - 1] / total)
    return shares


def difficulty_deciles(scores: np.ndarray, *, higher_is_harder: bool = True) -> np.ndarray:
    """Assign each example a difficulty decile, 0 (easiest) to 9 (hardest).

    Examples are ranked by score, ties by position, and rank r of n goes to decile
    floor(10 * r / n), so decile sizes differ by at most one and examples with equal
    scores may fall in neighbouring deciles. NaN ranks as hardest whatever the
    direction: for `learned_steps`, whose NaN means never learned, never-learned
    examples fill the top deciles.

    Args:
        scores: one score per example [n].
        higher_is_harder: True when a larger score means a harder example.

    Returns:
        int64 array [n] of deciles.

    Raises:
        AnalysisError: for scores that are not a 1-D numeric array.
    """
    try:
        scores = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise AnalysisError(f"scores must be numeric, got {scores!r:.80}") from error
    if scores.ndim != 1:
        raise AnalysisError(f"scores must be a 1-D array, got shape {scores.shape}")
    missing = np.isnan(scores)
    hardness = np.where(missing, 0.0, scores if higher_is_harder else -scores)
    # np.lexsort sorts by the last key first: missing last, then hardness, then position.
    order = np.lexsort((np.arange(scores.size), hardness, missing))
    ranks = np.empty(scores.size, dtype=np.int64)
    ranks[order] = np.arange(scores.size)
    return ranks * NUM_DECILES // max(scores.size, 1)
