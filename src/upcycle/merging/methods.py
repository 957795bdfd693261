"""Merging methods for task vectors, registered by name in `MERGE_METHODS`.

Each method merges the experts one parameter at a time with a function from
`peft.utils.merge_utils` (PEFT 0.21), so the tensor math is PEFT's. Like PEFT,
TIES trims each parameter tensor to its own top-`density` fraction, not the
whole task vector at once. Inputs of any floating dtype are merged in float32
and returned in the promoted dtype of the experts' tensors.

DARE's random drop is seeded per parameter from the merge seed and the
parameter name, inside a forked CPU RNG. A merge therefore gives the same result
for the same seed whatever the global RNG state and whatever order the
parameters are visited in, which lets `merge_safetensors_files` reproduce
`merge_task_vectors` exactly.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import warnings
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from peft.utils import merge_utils

from upcycle.errors import MergeError

logger = logging.getLogger(__name__)

MAX_LISTED_KEYS = 5
"""How many missing or extra tensor names a key-mismatch error lists."""


@dataclass(frozen=True)
class MergeMethod:
    """A registered merging method and where it comes from.

    `function(task_tensors, *, coefficient, density)` merges the float32 tensors of one
    parameter, one per expert, all of one shape, into one tensor of that shape.
    """

    name: str
    paper: str
    uses_coefficient: bool
    uses_density: bool
    stochastic: bool
    peft_function: str
    function: Callable[..., torch.Tensor]


def _equal_weights(task_tensors: Sequence[torch.Tensor], value: float) -> torch.Tensor:
    # PEFT's merge functions take one weight per expert, shape (n_experts,).
    return torch.full(
        (len(task_tensors),), value, dtype=torch.float32, device=task_tensors[0].device
    )


def _average(
    task_tensors: list[torch.Tensor], *, coefficient: float, density: float
) -> torch.Tensor:
    # Weight averaging is task arithmetic with every weight 1 / n_experts.
    weights = _equal_weights(task_tensors, 1.0 / len(task_tensors))
    return merge_utils.task_arithmetic(task_tensors, weights)


def _task_arithmetic(
    task_tensors: list[torch.Tensor], *, coefficient: float, density: float
) -> torch.Tensor:
    # Sum of the task vectors, each scaled by the scaling coefficient.
    return merge_utils.task_arithmetic(task_tensors, _equal_weights(task_tensors, coefficient))


def _ties(task_tensors: list[torch.Tensor], *, coefficient: float, density: float) -> torch.Tensor:
    # Trim to the top-density magnitudes, elect the sign with the larger total mass,
    # then take the disjoint mean of the entries that agree with the elected sign.
    # PEFT scales by the coefficient before the disjoint mean, which equals scaling after it.
    weights = _equal_weights(task_tensors, coefficient)
    return merge_utils.ties(task_tensors, weights, density, majority_sign_method="total")


def _dare_task_arithmetic(
    task_tensors: list[torch.Tensor], *, coefficient: float, density: float
) -> torch.Tensor:
    # Drop each entry with probability 1 - density, rescale the kept ones by 1 / density,
    # then sum with the scaling coefficient.
    weights = _equal_weights(task_tensors, coefficient)
    return merge_utils.dare_linear(task_tensors, weights, density)


def _dare_ties(
    task_tensors: list[torch.Tensor], *, coefficient: float, density: float
) -> torch.Tensor:
    # Drop and rescale as in DARE, then elect the sign and take the disjoint mean as in TIES.
    weights = _equal_weights(task_tensors, coefficient)
    return merge_utils.dare_ties(task_tensors, weights, density, majority_sign_method="total")


_MODEL_SOUPS = (
    "Model soups: averaging weights of multiple fine-tuned models improves accuracy without "
    "increasing inference time (Wortsman et al., 2022), arXiv:2203.05482"
)
_TASK_ARITHMETIC = "Editing Models with Task Arithmetic (Ilharco et al., 2023), arXiv:2212.04089"
_TIES = "TIES-Merging: Resolving Interference When Merging Models (Yadav et al., 2023), arXiv:2306.01708"
_DARE = (
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
    "Lunch (Yu et al., 2024), arXiv:2311.03099"
)

MERGE_METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod(
            name="average",
            paper=_MODEL_SOUPS,
            uses_coefficient=False,
            uses_density=False,
            stochastic=False,
            peft_function="task_arithmetic",
            function=_average,
        ),
        MergeMethod(
            name="task_arithmetic",
            paper=_TASK_ARITHMETIC,
            uses_coefficient=True,
            uses_density=False,
            stochastic=False,
            peft_function="task_arithmetic",
            function=_task_arithmetic,
        ),
        MergeMethod(
            name="ties",
            paper=_TIES,
            uses_coefficient=True,
            uses_density=True,
            stochastic=False,
            peft_function="ties",
            function=_ties,
        ),
        MergeMethod(
            name="dare_task_arithmetic",
            paper=_DARE,
            uses_coefficient=True,
            uses_density=True,
            stochastic=True,
            peft_function="dare_linear",
            function=_dare_task_arithmetic,
        ),
        MergeMethod(
            name="dare_ties",
            paper=f"{_DARE}; {_TIES}",
            uses_coefficient=True,
            uses_density=True,
            stochastic=True,
            peft_function="dare_ties",
            function=_dare_ties,
        ),
    )
}
"""Every merging method by name, each naming its function in `peft.utils.merge_utils`."""


def resolve_method(method: str) -> MergeMethod:
    """Return the registered method `method`, or raise `MergeError` listing the supported ones."""
    if method not in MERGE_METHODS:
        supported = ", ".join(repr(name) for name in MERGE_METHODS)
        raise MergeError(f"unknown merging method {method!r}. Supported methods: {supported}")
    return MERGE_METHODS[method]


def resolve_expert_names(count: int, names: Sequence[str] | None) -> list[str]:
    """Return the experts' names for error messages, their indices "0", "1", ... by default.

    Raises:
        MergeError: for no experts, or `names` of another length than the experts.
    """
    if count < 1:
        raise MergeError("no experts to merge: pass at least one task vector")
    if names is None:
        return [str(index) for index in range(count)]
    names = [str(name) for name in names]
    if len(names) != count:
        raise MergeError(
            f"got {count} experts but {len(names)} names {names}: pass one name per expert"
        )
    return names


def check_merge_options(method: MergeMethod, *, coefficient: float, density: float) -> None:
    """Raise `MergeError` for a density outside (0, 1] or a non-finite scaling coefficient.

    A method without a scaling coefficient (or without a density) also rejects a value
    other than 1.0, so a caller never believes an ignored option took effect.
    """
    if not 0.0 < density <= 1.0:
        raise MergeError(
            f"density must be in (0, 1], got {density!r}. It is the fraction of each task "
            "vector's entries that TIES or DARE keeps, so pass a value such as 0.2"
        )
    if not math.isfinite(coefficient):
        raise MergeError(
            f"scaling coefficient must be finite, got {coefficient!r}. Pass a value such as 0.3"
        )
    if not method.uses_coefficient and coefficient != 1.0:
        raise MergeError(
            f"method {method.name!r} has no scaling coefficient, got coefficient={coefficient!r}. "
            "Leave it at 1.0"
        )
    if not method.uses_density and density != 1.0:
        raise MergeError(
            f"method {method.name!r} keeps every entry, got density={density!r}. Leave it at 1.0"
        )


def _preview(keys: Sequence[str]) -> str:
    listed = ", ".join(repr(key) for key in keys[:MAX_LISTED_KEYS])
    if len(keys) > MAX_LISTED_KEYS:
        listed += f" and {len(keys) - MAX_LISTED_KEYS} more"
    return listed


def check_same_keys(key_sets: Sequence[Collection[str]], names: Sequence[str]) -> list[str]:
    """Return the first expert's parameter names after checking every expert has the same ones.

    Raises:
        MergeError: naming the first expert whose names differ from expert 0's, with up to
            five of its missing and extra names.
    """
    reference = list(key_sets[0])
    reference_set = set(reference)
    for name, keys in zip(names[1:], key_sets[1:]):
        keys = set(keys)
        if keys == reference_set:
            continue
        missing = sorted(reference_set - keys)
        extra = sorted(keys - reference_set)
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({_preview(missing)})")
        if extra:
            parts.append(f"extra {len(extra)} ({_preview(extra)})")
        raise MergeError(
            f"expert {name!r} has other parameters than expert {names[0]!r}: "
            f"{'; '.join(parts)}. Merge only task vectors of one base model with the same "
            "trainable parameters"
        )
    return reference


def check_same_shapes(
    key: str, shapes: Sequence[Sequence[int]], names: Sequence[str]
) -> tuple[int, ...]:
    """Return the shape of tensor `key` after checking every expert has the same one.

    Raises:
        MergeError: naming the tensor, both experts and both shapes.
    """
    reference = tuple(shapes[0])
    for name, shape in zip(names[1:], shapes[1:]):
        if tuple(shape) != reference:
            raise MergeError(
                f"tensor {key!r} has shape {reference} in expert {names[0]!r} but "
                f"{tuple(shape)} in expert {name!r}. Merge only task vectors of one base model"
            )
    return reference


def tensor_seed(seed: int, key: str) -> int:
    """Derive the RNG seed for parameter `key` from the merge seed, stable across processes."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _check_finite_merge(
    key: str, merged: torch.Tensor, tensors: Sequence[torch.Tensor], names: Sequence[str]
) -> None:
    if bool(torch.isfinite(merged).all()):
        return
    broken = [
        name for name, tensor in zip(names, tensors) if not bool(torch.isfinite(tensor).all())
    ]
    if broken:
        listed = ", ".join(repr(name) for name in broken)
        raise MergeError(
            f"merged tensor {key!r} contains NaN or inf because expert(s) {listed} contain "
            "non-finite values in it. Fine-tune those experts again or leave them out"
        )
    raise MergeError(
        f"merged tensor {key!r} contains NaN or inf although every expert's tensor is finite, "
        f"so the merge overflowed {merged.dtype}. Lower the scaling coefficient or merge "
        "float32 task vectors"
    )


def merge_tensor(
    key: str,
    tensors: Sequence[torch.Tensor],
    method: MergeMethod,
    *,
    coefficient: float,
    density: float,
    seed: int,
    names: Sequence[str],
) -> torch.Tensor:
    """Merge parameter `key` of every expert, tensors of one shape, into one tensor.

    The merge runs in float32, on the CPU for stochastic methods so their random drop
    does not depend on the device, and the result has the promoted dtype of `tensors`
    and the device of `tensors[0]`.

    Raises:
        MergeError: for a non-floating tensor, or a merged tensor that is not finite.
    """
    for name, tensor in zip(names, tensors):
        if not tensor.is_floating_point():
            raise MergeError(
                f"tensor {key!r} of expert {name!r} has dtype {tensor.dtype}. Task vectors "
                "must be floating point, so leave integer buffers out of them"
            )
    out_dtype = functools.reduce(torch.promote_types, [tensor.dtype for tensor in tensors])
    out_device = tensors[0].device
    compute_device = torch.device("cpu") if method.stochastic else out_device
    task_tensors = [
        tensor.detach().to(device=compute_device, dtype=torch.float32) for tensor in tensors
    ]
    with warnings.catch_warnings():
        # PEFT's prune() warns that density 1 prunes nothing, which is what density 1 means here.
        warnings.filterwarnings(
            "ignore", message=r"The density .* is greater than or equal to 1", category=UserWarning
        )
        if method.stochastic:
            # Seed only the CPU generator, which fork_rng restores afterwards, because
            # torch.manual_seed would also reseed every CUDA generator.
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(tensor_seed(seed, key))
                merged = method.function(task_tensors, coefficient=coefficient, density=density)
        else:
            merged = method.function(task_tensors, coefficient=coefficient, density=density)
    merged = merged.to(device=out_device, dtype=out_dtype)
    _check_finite_merge(key, merged, tensors, names)
    return merged


def merge_task_vectors(
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    method: str,
    *,
    coefficient: float = 1.0,
    density: float = 1.0,
    seed: int = 0,
    names: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge the experts' task vectors into one task vector with a registered method.

    Args:
        task_vectors: one mapping per expert from parameter name to fine-tuned minus base
            weights. Every expert has the same names and shapes.
        method: a key of `MERGE_METHODS`.
        coefficient: scaling coefficient λ, which must stay 1.0 for `average`.
        density: fraction of entries kept by TIES trimming or DARE dropping, in (0, 1].
            It must stay 1.0 for `average` and `task_arithmetic`.
        seed: seed of DARE's random drop, which other methods ignore.
        names: the experts' names (task names) for error messages.

    Returns:
        The merged task vector, with the first expert's parameter names in its order and
        each tensor in the shape of the inputs.

    Raises:
        MergeError: for no experts, an unknown method, an invalid option, experts with
            different parameter names or shapes, or a merged tensor that is not finite.
    """
    spec = resolve_method(method)
    expert_names = resolve_expert_names(len(task_vectors), names)
    check_merge_options(spec, coefficient=coefficient, density=density)
    keys = check_same_keys([task_vector.keys() for task_vector in task_vectors], expert_names)
    for key in keys:
        shapes = [task_vector[key].shape for task_vector in task_vectors]
        check_same_shapes(key, shapes, expert_names)

    merged = {}
    for key in keys:
        merged[key] = merge_tensor(
            key,
            [task_vector[key] for task_vector in task_vectors],
            spec,
            coefficient=coefficient,
            density=density,
            seed=seed,
            names=expert_names,
        )
    logger.debug(
        "merged %d experts with %s (coefficient %g, density %g, seed %d)",
        len(task_vectors),
        method,
        coefficient,
        density,
        seed,
    )
    return merged
