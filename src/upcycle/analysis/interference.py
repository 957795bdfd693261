"""Interference measures between the task vectors of several experts.

Each expert's task vector is treated as one flat vector: the concatenation of all
its parameters, flattened, in any fixed order. The measures are accumulated one
parameter at a time, in float64 blocks of at most `BLOCK_ENTRIES` entries per
expert, so memory stays small even for large models.

Sign conflict is the fraction of coordinates (entries of that flat vector) whose
nonzero entries across experts do not all have the same sign, that is, at least
one expert is positive there and at least one is negative. A coordinate where
fewer than two experts are nonzero therefore never conflicts, and zero entries
neither conflict nor agree.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from upcycle.errors import ConfigError, MergeError
from upcycle.merging.methods import check_same_keys, check_same_shapes

TaskVectors = Mapping[str, Mapping[str, torch.Tensor]]
"""Task vectors by expert name: expert -> parameter name -> fine-tuned minus base weights."""

Kind = Literal["full", "lora"]

BLOCK_ENTRIES = 1 << 20
"""Entries per expert read at once when accumulating, which bounds the float64 copies."""


@dataclass(frozen=True)
class _Totals:
    names: list[str]
    gram: torch.Tensor  # (n_experts, n_experts) float64 dot products of the flat task vectors
    conflicts: int
    coordinates: int


def _accumulate(task_vectors: TaskVectors) -> _Totals:
    """Accumulate dot products and sign conflicts over all parameters of all experts.

    Raises:
        MergeError: for no experts, experts with different parameter names or shapes, or
            a non-finite entry (naming the expert and the tensor).
    """
    names = list(task_vectors)
    if not names:
        raise MergeError("no task vectors given: pass at least one expert's task vector")
    vectors = [task_vectors[name] for name in names]
    keys = check_same_keys([vector.keys() for vector in vectors], names)
    gram = torch.zeros(len(names), len(names), dtype=torch.float64)
    conflicts = 0
    coordinates = 0
    for key in keys:
        check_same_shapes(key, [vector[key].shape for vector in vectors], names)
        flat = [vector[key].detach().reshape(-1) for vector in vectors]
        for start in range(0, flat[0].numel(), BLOCK_ENTRIES):
            # block: (n_experts, entries) slice of every expert's flat parameter
            block = torch.stack(
                [part[start : start + BLOCK_ENTRIES].to("cpu", torch.float64) for part in flat]
            )
            finite = torch.isfinite(block).all(dim=1)
            if not bool(finite.all()):
                broken = [name for name, ok in zip(names, finite.tolist()) if not ok]
                raise MergeError(
                    f"tensor {key!r} of expert(s) {broken} contains NaN or inf. Fine-tune those "
                    "experts again or leave them out"
                )
            gram += block @ block.T
            # A coordinate conflicts when some expert is positive and another negative there.
            positive = (block > 0).any(dim=0)
            negative = (block < 0).any(dim=0)
            conflicts += int((positive & negative).sum())
            coordinates += block.shape[1]
    return _Totals(names, gram, conflicts, coordinates)


def _norms(totals: _Totals) -> dict[str, float]:
    diagonal = totals.gram.diagonal().tolist()
    return {name: math.sqrt(value) for name, value in zip(totals.names, diagonal)}


def _cosines(totals: _Totals) -> dict[tuple[str, str], float]:
    norms = totals.gram.diagonal().sqrt()
    cosines = {}
    for i, j in itertools.combinations(range(len(totals.names)), 2):
        denominator = float(norms[i] * norms[j])
        # The cosine is undefined for a zero task vector, such as the base model's at step 0.
        value = float(totals.gram[i, j]) / denominator if denominator > 0 else math.nan
        cosines[(totals.names[i], totals.names[j])] = value
    return cosines


def _conflict_fraction(totals: _Totals) -> float:
    if totals.coordinates == 0:
        return math.nan
    return totals.conflicts / totals.coordinates


def task_vector_norms(task_vectors: TaskVectors) -> dict[str, float]:
    """Return each expert's L2 norm over all its parameters, keyed by expert name.

    Raises:
        MergeError: for no experts, mismatched parameter names or shapes, or NaN/inf entries.
    """
    return _norms(_accumulate(task_vectors))


def pairwise_cosine(task_vectors: TaskVectors) -> dict[tuple[str, str], float]:
    """Return the cosine similarity of every pair of experts' flat task vectors.

    Keys are `(a, b)` with `a` before `b` in the mapping's order. A pair with a zero
    task vector gets NaN. One expert gives an empty dict.

    Raises:
        MergeError: for no experts, mismatched parameter names or shapes, or NaN/inf entries.
    """
    return _cosines(_accumulate(task_vectors))


def sign_conflict_fraction(task_vectors: TaskVectors) -> float:
    """Return the fraction of coordinates where some expert is positive and another negative.

    Zero entries take no side, so a coordinate with fewer than two nonzero experts never
    conflicts. Returns NaN when the task vectors have no entries.

    Raises:
        MergeError: for no experts, mismatched parameter names or shapes, or NaN/inf entries.
    """
    return _conflict_fraction(_accumulate(task_vectors))


def interference_rows(
    task_vectors: TaskVectors, *, seed: int, kind: Kind, step: int
) -> list[dict[str, object]]:
    """Compute every interference measure in one pass, as rows of `interference.csv`.

    Each row has the columns seed, kind, step, metric, task_a, task_b, value. Metrics:
    `norm` per expert (task_b ""), `cosine` per pair of experts, `mean_cosine` over the
    pairs (task_a "all", task_b "", left out for a single expert), and `sign_conflict`
    (task_a "all", task_b "").

    Raises:
        ConfigError: for a `kind` other than "full" or "lora".
        MergeError: for no experts, mismatched parameter names or shapes, or NaN/inf entries.
    """
    if kind not in get_args(Kind):
        supported = ", ".join(repr(value) for value in get_args(Kind))
        raise ConfigError(f"unknown task vector kind {kind!r}. Supported kinds: {supported}")
    totals = _accumulate(task_vectors)

    def row(metric: str, task_a: str, task_b: str, value: float) -> dict[str, object]:
        return {
            "seed": seed,
            "kind": kind,
            "step": step,
            "metric": metric,
            "task_a": task_a,
            "task_b": task_b,
            "value": value,
        }

    rows = [row("norm", name, "", norm) for name, norm in _norms(totals).items()]
    cosines = _cosines(totals)
    rows += [row("cosine", a, b, value) for (a, b), value in cosines.items()]
    if cosines:
        mean = sum(cosines.values()) / len(cosines)
        rows.append(row("mean_cosine", "all", "", mean))
    rows.append(row("sign_conflict", "all", "", _conflict_fraction(totals)))
    return rows
