"""LoRA adapters as task vectors, and LoRA merging through PEFT's `add_weighted_adapter`.

An adapter is the state dict that `peft.get_peft_model_state_dict` returns, with PEFT's
key names (`base_model.model.<module>.lora_A.weight`). Its task vector maps the base
model's weight name `<module>.weight` to the update B @ A * (alpha / rank), so LoRA
experts go through the same merging methods and measures as fully fine-tuned ones.

`merge_adapters_with_peft` merges in the adapters' own low-rank form instead. PEFT's
non-SVD combination types (`linear`, `ties`, `dare_*`, `magnitude_prune`) combine the A
factors and the B factors separately, so with several adapters the merged update B'A'
contains cross terms B_i A_j and is not the weighted sum of the updates. The SVD types
merge the full updates and factor the result back to a low rank, and `cat` stacks the
factors, which gives the exact weighted sum of the updates.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn

from upcycle.errors import CheckpointError, MergeError

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."
MERGED_ADAPTER = "merged"

# `<module>.lora_A.weight` or `<module>.lora_A.<adapter name>.weight` for linear layers.
_LINEAR_KEY = re.compile(
    r"^(?P<module>.+?)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$"
)
# `<module>.lora_embedding_A` or `<module>.lora_embedding_A.<adapter name>` for embeddings.
_EMBEDDING_KEY = re.compile(
    r"^(?P<module>.+?)\.lora_embedding_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?$"
)

CombinationType = Literal[
    "linear",
    "ties",
    "dare_linear",
    "dare_ties",
    "magnitude_prune",
    "svd",
    "ties_svd",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune_svd",
    "cat",
]
COMBINATION_TYPES: tuple[str, ...] = get_args(CombinationType)
# Combination types that prune with `density` (TIES trimming, DARE dropping, magnitude pruning).
DENSITY_COMBINATION_TYPES = frozenset(
    {
        "ties",
        "dare_linear",
        "dare_ties",
        "magnitude_prune",
        "ties_svd",
        "dare_linear_svd",
        "dare_ties_svd",
        "magnitude_prune_svd",
    }
)
SVD_COMBINATION_TYPES = frozenset(name for name in COMBINATION_TYPES if name.endswith("svd"))

# upcycle method name -> PEFT `combination_type`.
PEFT_LORA_METHODS: dict[str, str] = {
    "peft_linear": "linear",
    "peft_ties": "ties",
    "peft_dare_linear": "dare_linear",
    "peft_dare_ties": "dare_ties",
    "peft_magnitude_prune": "magnitude_prune",
    "peft_svd": "svd",
    "peft_ties_svd": "ties_svd",
    "peft_dare_linear_svd": "dare_linear_svd",
    "peft_dare_ties_svd": "dare_ties_svd",
    "peft_magnitude_prune_svd": "magnitude_prune_svd",
    "peft_cat": "cat",
}


# ---------------------------------------------------------------------------------------
# Adapter metadata


@dataclass(frozen=True)
class AdapterInfo:
    """LoRA settings of one stored adapter, read from its safetensors metadata."""

    name: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str


def adapter_info_from_metadata(name: str, metadata: Mapping[str, str]) -> AdapterInfo:
    """Parse the `rank`, `alpha`, `target_modules` and `base_model` metadata of adapter `name`.

    `target_modules` is comma separated and is stored sorted, so the order it was written
    in does not matter when adapters are compared.

    Raises:
        CheckpointError: if a field is missing or `rank`/`alpha` is not a positive number.
    """
    missing = [
        key for key in ("rank", "alpha", "target_modules", "base_model") if key not in metadata
    ]
    if missing:
        raise CheckpointError(
            f"adapter {name!r} has no {', '.join(missing)} in its metadata; it was not saved "
            "by upcycle's LoRA fine-tuning. Fine-tune it again"
        )
    try:
        rank = int(metadata["rank"])
        alpha = float(metadata["alpha"])
    except ValueError as error:
        raise CheckpointError(
            f"adapter {name!r} has invalid metadata rank={metadata['rank']!r} "
            f"alpha={metadata['alpha']!r}: expected an integer rank and a number alpha"
        ) from error
    if rank < 1 or not alpha > 0 or not math.isfinite(alpha):
        raise CheckpointError(
            f"adapter {name!r} has invalid metadata rank={rank} alpha={alpha}: both must be "
            "positive and finite"
        )
    modules = sorted(
        {part.strip() for part in metadata["target_modules"].split(",") if part.strip()}
    )
    return AdapterInfo(
        name=name,
        rank=rank,
        alpha=alpha,
        target_modules=tuple(modules),
        base_model=metadata["base_model"],
    )


def check_adapters_compatible(infos: Sequence[AdapterInfo]) -> None:
    """Raise `MergeError` unless all adapters share rank, target modules and base model.

    Every adapter is compared with the first one, and all differences are reported in
    one message. Alpha may differ, because each adapter's update carries its own scaling.

    Raises:
        MergeError: for an empty list, repeated names, or any difference.
    """
    if not infos:
        raise MergeError("no adapters to merge: pass at least one AdapterInfo")
    names = [info.name for info in infos]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise MergeError(f"adapter names must be distinct, got {repeated} more than once")
    reference = infos[0]
    problems = []
    for info in infos[1:]:
        for field in ("rank", "target_modules", "base_model"):
            value, expected = getattr(info, field), getattr(reference, field)
            if value != expected:
                problems.append(
                    f"adapter {info.name!r} has {field} {_show(value)} but adapter "
                    f"{reference.name!r} has {_show(expected)}"
                )
    if problems:
        raise MergeError(
            "adapters are incompatible: "
            + "; ".join(problems)
            + ". Merge only adapters fine-tuned with the same LoRA settings from one base model"
        )


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ",".join(value)
    return repr(value)


# ---------------------------------------------------------------------------------------
# Adapter state dicts and task vectors


class LoraFactors(NamedTuple):
    """The two LoRA factors of one adapted module, in PEFT's layout.

    For a linear layer, `lora_A` is [rank, in_features] and `lora_B` is [out_features, rank].
    For an embedding, `lora_A` is [rank, num_embeddings] and `lora_B` is [embedding_dim, rank].
    """

    lora_A: Tensor
    lora_B: Tensor
    embedding: bool


def lora_factors(adapter_state: Mapping[str, Tensor]) -> dict[str, LoraFactors]:
    """Group an adapter state dict by module, keyed by the module's name in the base model.

    Accepts PEFT's key names with or without the `base_model.model.` prefix and with or
    without an adapter name (`.lora_A.weight` and `.lora_A.default.weight`).

    Raises:
        CheckpointError: for an empty state dict or a key that is not a LoRA factor (DoRA
            magnitudes, biases, `modules_to_save`). Also for a module with only one factor,
            factors that are not matrices or differ in rank, and several adapter names.
    """
    if not adapter_state:
        raise CheckpointError("the adapter state dict is empty; it contains no LoRA factors")
    parts: dict[str, dict[str, Tensor]] = {}
    kinds: dict[str, bool] = {}
    adapter_names = set()
    unknown = []
    for key, tensor in adapter_state.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = _LINEAR_KEY.match(name) or _EMBEDDING_KEY.match(name)
        if match is None:
            unknown.append(key)
            continue
        module = match["module"]
        adapter_names.add(match["adapter"])
        kinds[module] = match.re is _EMBEDDING_KEY
        factor = f"lora_{match['factor']}"
        if factor in parts.setdefault(module, {}):
            raise CheckpointError(
                f"adapter state dict has two {factor} tensors for module {module!r} (key {key!r}); "
                "save one adapter per state dict with peft.get_peft_model_state_dict"
            )
        parts[module][factor] = tensor
    if unknown:
        raise CheckpointError(
            f"adapter state dict has {len(unknown)} keys that are not LoRA factors, e.g. "
            f"{sorted(unknown)[:3]}. Only plain LoRA adapters are supported, without DoRA, "
            "trained biases or modules_to_save"
        )
    if len(adapter_names) > 1:
        named = sorted(str(name) for name in adapter_names)
        raise CheckpointError(
            f"adapter state dict mixes adapter names {named}; save each adapter separately"
        )
    return {
        module: _checked_factors(module, found, kinds[module]) for module, found in parts.items()
    }


def _checked_factors(module: str, found: Mapping[str, Tensor], embedding: bool) -> LoraFactors:
    missing = [factor for factor in ("lora_A", "lora_B") if factor not in found]
    if missing:
        raise CheckpointError(
            f"adapter state dict has no {missing[0]} for module {module!r}; the checkpoint is "
            "incomplete. Save it again with peft.get_peft_model_state_dict"
        )
    lora_A, lora_B = found["lora_A"], found["lora_B"]
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_A.shape[0] != lora_B.shape[1]:
        raise CheckpointError(
            f"module {module!r} has LoRA factors of shapes A {tuple(lora_A.shape)} and "
            f"B {tuple(lora_B.shape)}; expected A [rank, in] and B [out, rank] with one rank"
        )
    return LoraFactors(lora_A, lora_B, embedding)


def lora_delta(factors: LoraFactors, scaling: float) -> Tensor:
    """Compute one module's weight update B @ A * scaling in float32.

    Returns [out_features, in_features] for a linear layer and [num_embeddings,
    embedding_dim] for an embedding, the shape of the base weight in both cases.
    """
    update = factors.lora_B.float() @ factors.lora_A.float() * scaling
    # PEFT keeps embedding factors transposed relative to the embedding weight.
    return update.T.contiguous() if factors.embedding else update


def lora_task_vector(
    adapter_state: Mapping[str, Tensor],
    *,
    rank: int,
    alpha: float,
    base_keys: Collection[str] | None = None,
    scaling: float | None = None,
) -> dict[str, Tensor]:
    """Convert a LoRA adapter into a task vector over the base model's weight names.

    Each adapted module `<module>` contributes `<module>.weight` -> B @ A * scaling, where
    scaling is alpha / rank (PEFT's default, without rsLoRA) unless `scaling` is given.

    NOTE: layers stored transposed (PEFT's `fan_in_fan_out`, as in GPT-2's Conv1D) would
    need their update transposed. Only `nn.Linear` and `nn.Embedding` targets are handled.

    Args:
        adapter_state: the adapter's state dict with PEFT key names.
        rank: the LoRA rank r the adapter was trained with.
        alpha: the LoRA alpha it was trained with.
        base_keys: the base model's `state_dict()` keys; every updated weight must be one.
        scaling: overrides alpha / rank, for example alpha / sqrt(rank) for rsLoRA.

    Returns:
        float32 updates of the base weights' shapes, keyed by base parameter name.

    Raises:
        CheckpointError: for a malformed adapter or factors whose rank is not `rank`.
        MergeError: for an invalid rank/alpha, or a module whose weight is not in `base_keys`.
    """
    if rank < 1 or not alpha > 0 or not math.isfinite(alpha):
        raise MergeError(
            f"LoRA rank and alpha must be positive and finite, got rank={rank} alpha={alpha}"
        )
    factors = lora_factors(adapter_state)
    for module, pair in factors.items():
        if pair.lora_A.shape[0] != rank:
            raise CheckpointError(
                f"module {module!r} has LoRA rank {pair.lora_A.shape[0]} but rank={rank} was "
                "passed; pass the rank stored in the adapter's metadata"
            )
    weight_names = {module: f"{module}.weight" for module in factors}
    if base_keys is not None:
        known = set(base_keys)
        unknown = sorted(name for name in weight_names.values() if name not in known)
        if unknown:
            raise MergeError(
                f"the adapter updates {len(unknown)} weights that the base model lacks, e.g. "
                f"{unknown[:3]}; it was trained on another base model. Load it with the base "
                "model named in its metadata"
            )
    factor = alpha / rank if scaling is None else scaling
    return {weight_names[module]: lora_delta(pair, factor) for module, pair in factors.items()}


def normalized_adapter_state(adapter_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rewrite an adapter's keys to the form `set_peft_model_state_dict` loads.

    The result has the `base_model.model.` prefix and no adapter name.
    """
    state = {}
    for module, pair in lora_factors(adapter_state).items():
        if pair.embedding:
            state[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = pair.lora_A
            state[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = pair.lora_B
        else:
            state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = pair.lora_A
            state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = pair.lora_B
    return state


# ---------------------------------------------------------------------------------------
# Merging through PEFT


def check_combination_options(
    combination_type: str,
    *,
    num_adapters: int,
    weights: Sequence[float],
    density: float | None,
    majority_sign_method: str,
    svd_rank: int | None,
) -> None:
    """Raise `MergeError` for options that PEFT would reject, ignore or misread.

    Raises:
        MergeError: for an unknown combination type or sign method, one weight too many or
            too few, or a non-finite weight. Also for a pruning type without a density in
            (0, 1], a density for a type that does not prune, and an `svd_rank` below 1 or
            for a non-SVD type.
    """
    if combination_type not in COMBINATION_TYPES:
        raise MergeError(
            f"unknown PEFT combination type {combination_type!r}; supported: "
            f"{', '.join(COMBINATION_TYPES)}"
        )
    if majority_sign_method not in ("total", "frequency"):
        raise MergeError(
            f"unknown majority_sign_method {majority_sign_method!r}; supported: total, frequency"
        )
    if len(weights) != num_adapters:
        raise MergeError(
            f"got {len(weights)} weights for {num_adapters} adapters; pass one weight per adapter"
        )
    bad = [weight for weight in weights if not math.isfinite(weight)]
    if bad:
        raise MergeError(f"adapter weights must be finite, got {list(weights)}")
    if combination_type in DENSITY_COMBINATION_TYPES:
        if density is None or not 0 < density <= 1:
            raise MergeError(
                f"combination type {combination_type!r} prunes and needs a density in (0, 1], "
                f"got {density}"
            )
    elif density is not None:
        raise MergeError(
            f"combination type {combination_type!r} does not prune, so density={density} would "
            "be ignored; pass density=None"
        )
    if svd_rank is not None:
        if combination_type not in SVD_COMBINATION_TYPES:
            raise MergeError(
                f"svd_rank={svd_rank} applies only to the SVD combination types "
                f"({', '.join(sorted(SVD_COMBINATION_TYPES))}), not {combination_type!r}"
            )
        if svd_rank < 1:
            raise MergeError(f"svd_rank must be at least 1, got {svd_rank}")


def wrap_with_peft(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Return `peft.get_peft_model(model, config)` without PEFT's deprecation warning.

    PEFT reads `is_gradient_checkpointing`, which transformers 5 marks as deprecated. The
    FutureWarning it raises is about PEFT, not the caller's code, so it is filtered here.
    """
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
        )
        return get_peft_model(model, config, adapter_name=adapter_name)


@contextmanager
def seeded_rng(seed: int, model: nn.Module) -> Iterator[None]:
    """Seed torch for the block and restore the caller's random state afterwards.

    The CUDA generators of the devices holding `model`'s parameters are forked too.
    """
    cuda_devices = sorted(
        {parameter.device.index or 0 for parameter in model.parameters() if parameter.is_cuda}
    )
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        yield


def merge_adapters_with_peft(
    base_model: nn.Module,
    adapters: Mapping[str, Mapping[str, Tensor]],
    lora_config: LoraConfig,
    *,
    combination_type: str,
    weights: Sequence[float],
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    svd_rank: int | None = None,
    seed: int = 0,
) -> PeftModel:
    """Merge LoRA adapters with `PeftModel.add_weighted_adapter` into an adapter "merged".

    The base model is deep-copied and left unchanged. Each adapter is loaded into the copy
    under an internal name (`expert_0`, `expert_1`, ... in the order of `adapters`), so
    task names need not be valid PEFT adapter names. The merged adapter is then added and
    made the active one. Read its update with `peft_merged_task_vector`.

    PEFT's rules apply: with a single adapter it always merges with `linear`, whatever
    `combination_type` is. The SVD types factor the merged update to `svd_rank` (default:
    the adapters' rank). The random drops of the DARE types come from torch seeded with
    `seed`, so the merge is reproducible, and the caller's random state is restored.

    Args:
        base_model: the base encoder the adapters were trained on.
        adapters: adapter name -> PEFT adapter state dict.
        lora_config: the LoRA settings the adapters were trained with (one for all).
        combination_type: a PEFT combination type, see `COMBINATION_TYPES`.
        weights: one weight per adapter, in the order of `adapters`.
        density: fraction of entries kept by the pruning types; None for the others.
        majority_sign_method: how TIES elects the sign, "total" or "frequency".
        svd_rank: rank of the merged adapter for the SVD types.
        seed: seed for DARE's random drops.

    Returns:
        the PEFT-wrapped copy with adapter "merged" active.

    Raises:
        MergeError: for invalid options (see `check_combination_options`), no adapters, or
            an adapter that does not fit the model and `lora_config` (named in the message).
        CheckpointError: for a malformed adapter state dict.
    """
    if not adapters:
        raise MergeError("no adapters to merge: pass at least one adapter state dict")
    check_combination_options(
        combination_type,
        num_adapters=len(adapters),
        weights=weights,
        density=density,
        majority_sign_method=majority_sign_method,
        svd_rank=svd_rank,
    )
    internal_names = {name: f"expert_{index}" for index, name in enumerate(adapters)}
    with seeded_rng(seed, base_model):
        model = None
        for name, state in adapters.items():
            internal = internal_names[name]
            config = copy.deepcopy(lora_config)
            if model is None:
                model = wrap_with_peft(copy.deepcopy(base_model), config, adapter_name=internal)
            else:
                model.add_adapter(internal, config)
            _load_adapter(model, name, internal, state)
        model.add_weighted_adapter(
            adapters=list(internal_names.values()),
            weights=[float(weight) for weight in weights],
            adapter_name=MERGED_ADAPTER,
            combination_type=combination_type,
            svd_rank=svd_rank,
            svd_full_matrices=False,
            density=density,
            majority_sign_method=majority_sign_method,
        )
    model.set_adapter(MERGED_ADAPTER, inference_mode=True)
    logger.debug(
        "merged %d adapters with PEFT %s (weights %s, density %s)",
        len(adapters),
        combination_type,
        list(weights),
        density,
    )
    return model


def _load_adapter(model: PeftModel, name: str, internal: str, state: Mapping[str, Tensor]) -> None:
    """Load adapter `name`'s weights into the PEFT adapter `internal`, checking every key."""
    from peft import set_peft_model_state_dict

    try:
        normalized = normalized_adapter_state(state)
    except CheckpointError as error:
        raise CheckpointError(f"adapter {name!r}: {error}") from error
    try:
        result = set_peft_model_state_dict(model, normalized, adapter_name=internal)
    except RuntimeError as error:
        raise MergeError(
            f"adapter {name!r} does not fit the model and LoRA config ({error}); pass the rank "
            "and base model it was trained with"
        ) from error
    if result.unexpected_keys:
        raise MergeError(
            f"adapter {name!r} has weights for modules the LoRA config does not target, e.g. "
            f"{sorted(result.unexpected_keys)[:3]}; pass the target_modules it was trained with"
        )
    marker = re.compile(rf"\.lora_(?:embedding_)?[AB]\.{re.escape(internal)}(?:\.weight)?$")
    missing = sorted(key for key in result.missing_keys if marker.search(key))
    if missing:
        raise MergeError(
            f"adapter {name!r} lacks weights for {len(missing)} targeted LoRA factors, e.g. "
            f"{missing[:3]}; it was trained with other target_modules"
        )


def peft_merged_task_vector(
    peft_model: PeftModel,
    adapter_name: str = MERGED_ADAPTER,
    *,
    base_keys: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """Read adapter `adapter_name`'s per-module update as a task vector.

    The update of each LoRA layer is PEFT's `get_delta_weight` (B @ A times the adapter's
    own scaling), keyed by the base model's weight name of that layer.

    Returns:
        float32 updates on the CPU, keyed like the base model's `state_dict()`.

    Raises:
        MergeError: if no layer has the adapter, or an update's name is not in `base_keys`.
    """
    from peft.tuners.lora import LoraLayer

    task_vector = {}
    for module_name, module in peft_model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if adapter_name not in module.lora_A and adapter_name not in module.lora_embedding_A:
            continue
        update = module.get_delta_weight(adapter_name)
        task_vector[f"{module_name}.weight"] = update.detach().float().cpu()
    if not task_vector:
        raise MergeError(
            f"no LoRA layer of the model has adapter {adapter_name!r}; adapters found: "
            f"{sorted(peft_model.peft_config)}"
        )
    if base_keys is not None:
        known = set(base_keys)
        unknown = sorted(name for name in task_vector if name not in known)
        if unknown:
            raise MergeError(
                f"merged adapter {adapter_name!r} updates weights the base model lacks, e.g. "
                f"{unknown[:3]}; merge adapters trained on this base model"
            )
    return task_vector
