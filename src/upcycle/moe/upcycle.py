"""Upcycling LoRA experts into mixture-of-experts layers, and training their routers.

`upcycle_to_moe` takes a base encoder and the PEFT adapters of several experts, all
fine-tuned from that encoder with one rank and one set of target modules. It returns a
deep copy of the encoder in which every targeted `nn.Linear` is a `LoraMoELinear`
holding all experts' factors for that layer and a fresh router. Only the routers (and,
on request, the experts) are trainable in the copy, and the given encoder is unchanged.

`train_router` then fits the routers on task batches with the caller's loss plus the
load-balancing loss.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from upcycle.errors import MergeError, TrainingError
from upcycle.merging.lora import LoraFactors, lora_factors, seeded_rng
from upcycle.moe.layer import LoraMoELinear, RouterInit, load_balancing_loss, router_statistics

logger = logging.getLogger(__name__)


def upcycle_to_moe(
    model: nn.Module,
    adapters: Mapping[str, Mapping[str, Tensor]],
    *,
    rank: int,
    alpha: float,
    top_k: int = 2,
    train_experts: bool = False,
    modules: Sequence[str] | None = None,
    router_init: RouterInit = "zeros",
    renormalize: bool = True,
    seed: int = 0,
) -> nn.Module:
    """Replace the adapters' target layers of a copy of `model` with `LoraMoELinear` layers.

    Expert e of every layer is the e-th adapter in the order of `adapters`, with scaling
    alpha / rank. All parameters of the copy are frozen except the routers, and the
    experts' factors if `train_experts` is set.

    Args:
        model: the base encoder the adapters were trained on, for example a `BertModel`.
            Adapter module names are looked up relative to it.
        adapters: expert name -> PEFT adapter state dict (`get_peft_model_state_dict`).
        rank: the LoRA rank of every adapter.
        alpha: the LoRA alpha of every adapter.
        top_k: experts per token in every layer.
        train_experts: whether the experts' A and B stay trainable.
        modules: which targeted layers get a router. An entry selects the layers whose name
            equals it or ends with "." + entry (PEFT's `target_modules` rule), for example
            "query" or "encoder.layer.0.attention.self.query". None selects every targeted
            layer. The other targeted layers keep their plain base weights, without any
            expert update.
        router_init: "zeros" for uniform initial routing, or "normal".
        renormalize: whether each token's top-k gates are rescaled to sum to one.
        seed: seed for the "normal" router initialisation.

    Returns:
        the upcycled copy of `model`.

    Raises:
        MergeError: for no adapters, adapters that differ in rank or target layers (the
            adapter is named), a `modules` entry that selects no targeted layer (named), a
            target the model lacks or that is not an `nn.Linear`, or an invalid `top_k`.
        CheckpointError: for a malformed adapter state dict.
    """
    if not adapters:
        raise MergeError("no adapters to upcycle: pass at least one adapter state dict")
    if rank < 1 or not alpha > 0 or not math.isfinite(alpha):
        raise MergeError(
            f"LoRA rank and alpha must be positive and finite, got rank={rank} alpha={alpha}"
        )
    factors = _expert_factors(adapters, rank=rank)
    targeted = sorted(next(iter(factors.values())))
    selected = targeted if modules is None else _select_modules(targeted, modules)

    upcycled = copy.deepcopy(model)
    for parameter in upcycled.parameters():
        parameter.requires_grad_(False)
    names = list(adapters)
    with seeded_rng(seed, upcycled):
        for module_name in selected:
            base = _linear_module(upcycled, module_name)
            layer = LoraMoELinear(
                base,
                torch.stack([factors[name][module_name].lora_A for name in names]),
                torch.stack([factors[name][module_name].lora_B for name in names]),
                [alpha / rank] * len(names),
                top_k=top_k,
                train_experts=train_experts,
                router_init=router_init,
                renormalize=renormalize,
                expert_names=names,
                name=module_name,
            )
            parent_name, _, child_name = module_name.rpartition(".")
            parent = upcycled.get_submodule(parent_name) if parent_name else upcycled
            setattr(parent, child_name, layer)
    logger.info(
        "upcycled %d of %d targeted layers into %d LoRA experts with top-%d routing",
        len(selected),
        len(targeted),
        len(names),
        top_k,
    )
    return upcycled


def _expert_factors(
    adapters: Mapping[str, Mapping[str, Tensor]], *, rank: int
) -> dict[str, dict[str, LoraFactors]]:
    """Parse every adapter and check that all have rank `rank` and the same target layers."""
    factors = {}
    for name, state in adapters.items():
        parsed = lora_factors(state)
        for module_name, pair in parsed.items():
            if pair.embedding:
                raise MergeError(
                    f"adapter {name!r} adapts embedding {module_name!r}; only linear layers can "
                    "be upcycled. Train the adapters without embedding targets"
                )
            if pair.lora_A.shape[0] != rank:
                raise MergeError(
                    f"adapter {name!r} has rank {pair.lora_A.shape[0]} at {module_name!r}, not "
                    f"rank={rank}; upcycle only adapters trained with one rank"
                )
        factors[name] = parsed
    reference_name = next(iter(factors))
    reference = set(factors[reference_name])
    for name, parsed in factors.items():
        missing = sorted(reference - set(parsed))
        extra = sorted(set(parsed) - reference)
        if missing or extra:
            raise MergeError(
                f"adapter {name!r} targets other layers than adapter {reference_name!r} "
                f"(missing {missing[:3]}, extra {extra[:3]}); upcycle only adapters trained "
                "with the same target_modules"
            )
    return factors


def _select_modules(targeted: Sequence[str], modules: Sequence[str]) -> list[str]:
    """Return the targeted layer names that `modules` selects, in sorted order."""
    selected = set()
    for entry in modules:
        matches = [name for name in targeted if name == entry or name.endswith(f".{entry}")]
        if not matches:
            raise MergeError(
                f"no adapter targets module {entry!r}, so it cannot get a router; targeted "
                f"layers include {list(targeted[:4])}"
            )
        selected.update(matches)
    return sorted(selected)


def _linear_module(model: nn.Module, module_name: str) -> nn.Linear:
    try:
        module = model.get_submodule(module_name)
    except AttributeError as error:
        raise MergeError(
            f"the adapters target {module_name!r}, which {type(model).__name__} lacks; pass the "
            "base encoder the adapters were trained on"
        ) from error
    if isinstance(module, LoraMoELinear) or not isinstance(module, nn.Linear):
        raise MergeError(
            f"the adapters target {module_name!r}, a {type(module).__name__}; only plain "
            "nn.Linear layers can be upcycled"
        )
    return module


# ---------------------------------------------------------------------------------------
# Inspecting an upcycled model


def moe_layers(model: nn.Module) -> dict[str, LoraMoELinear]:
    """Return the model's `LoraMoELinear` layers by module name."""
    return {
        name: module for name, module in model.named_modules() if isinstance(module, LoraMoELinear)
    }


def _routed_layers(model: nn.Module) -> dict[str, LoraMoELinear]:
    """Return the MoE layers, raising `MergeError` if there are none or one has not run."""
    layers = moe_layers(model)
    if not layers:
        raise MergeError(
            f"{type(model).__name__} has no LoraMoELinear layers; upcycle it with upcycle_to_moe"
        )
    idle = [name for name, layer in layers.items() if layer.last_routing is None]
    if idle:
        raise MergeError(
            f"MoE layer {idle[0]!r} has not run a forward pass yet; run the model on a batch first"
        )
    return layers


def total_load_balancing_loss(model: nn.Module, token_mask: Tensor | None = None) -> Tensor:
    """Average the load-balancing loss of every MoE layer over its last forward pass.

    Args:
        model: an upcycled model that has run a forward pass.
        token_mask: [T] mask of the tokens to count (the flattened attention mask of that
            batch); None counts every token.

    Returns:
        a float32 scalar that carries gradient to the routers.

    Raises:
        MergeError: if the model has no MoE layer, a layer has not run, or the mask does not
            fit a layer's tokens (the layer is named).
    """
    losses = []
    for name, layer in _routed_layers(model).items():
        routing = layer.last_routing
        try:
            loss = load_balancing_loss(
                routing.router_logits, routing.selected_experts, layer.num_experts, token_mask
            )
        except MergeError as error:
            raise MergeError(f"MoE layer {name!r}: {error}") from error
        losses.append(loss)
    return torch.stack(losses).mean()


def collect_router_statistics(
    model: nn.Module, token_mask: Tensor | None = None
) -> dict[str, Tensor]:
    """Return, per MoE layer, the fraction of kept tokens routed to each expert.

    Each value is a CPU float32 tensor [N] that sums to the layer's top_k (see
    `router_statistics`), computed from the layer's last forward pass.

    Raises:
        MergeError: as `total_load_balancing_loss`.
    """
    statistics = {}
    for name, layer in _routed_layers(model).items():
        selected = layer.last_routing.selected_experts
        try:
            fractions = router_statistics(selected, layer.num_experts, token_mask)
        except MergeError as error:
            raise MergeError(f"MoE layer {name!r}: {error}") from error
        statistics[name] = fractions.cpu()
    return statistics


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the router weights and biases of every MoE layer."""
    return [
        parameter for layer in moe_layers(model).values() for parameter in layer.router.parameters()
    ]


def trainable_moe_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return the router parameters plus the expert factors that require gradients."""
    parameters = router_parameters(model)
    for layer in moe_layers(model).values():
        parameters += [factor for factor in (layer.lora_A, layer.lora_B) if factor.requires_grad]
    return parameters


# ---------------------------------------------------------------------------------------
# Router training


def _cycle(batches: Iterable[dict]) -> Iterator[dict]:
    """Yield the batches again and again, restarting the iterable when it runs out."""
    restarted = False
    while True:
        count = 0
        for batch in batches:
            count += 1
            yield batch
        if count == 0 and not restarted:
            raise TrainingError("batches is empty; pass at least one batch")
        if count == 0:
            raise TrainingError(
                "batches ran out and yielded nothing when restarted, as a generator does; "
                "pass a list or a re-iterable loader"
            )
        restarted = True


def train_router(
    model: nn.Module,
    batches: Iterable[dict],
    *,
    loss_fn: Callable[[nn.Module, dict], Tensor],
    steps: int,
    learning_rate: float = 1e-3,
    load_balancing_weight: float = 0.01,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """Train the routers (and trainable experts) of an upcycled model with AdamW.

    Each step runs `loss_fn(model, batch)`, which must do the forward pass and return the
    task loss, adds `load_balancing_weight` times the mean load-balancing loss over layers
    with `batch["attention_mask"]` (flattened) as token mask, and takes one optimizer step.
    `batches` restarts from its first batch when it runs out, so pass a list or a
    re-iterable loader, not a generator. The model is in training mode during the loop
    and returns to its previous mode afterwards. Torch is seeded with `seed` (dropout,
    random batches in `loss_fn`), and the caller's random state is restored.

    With `top_k=1` and renormalised gates, only the load-balancing loss trains the router
    (see `upcycle.moe.layer`).

    Returns:
        the total loss of every step.

    Raises:
        MergeError: if the model has no MoE layer.
        TrainingError: for a negative `steps`, a batch without `attention_mask`, no batches,
            or a loss that is NaN or infinite.
    """
    if steps < 0:
        raise TrainingError(f"steps must be >= 0, got {steps}")
    parameters = trainable_moe_parameters(model)
    if not parameters:
        raise MergeError(
            f"{type(model).__name__} has no LoraMoELinear layers; upcycle it with upcycle_to_moe"
        )
    losses: list[float] = []
    was_training = model.training
    with seeded_rng(seed, model):
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
        model.train()
        try:
            for step, batch in zip(range(1, steps + 1), _cycle(batches)):
                if "attention_mask" not in batch:
                    raise TrainingError(
                        f"router training batch {step} has no 'attention_mask' (keys: "
                        f"{sorted(batch)}); it is needed to leave padding out of the "
                        "load-balancing loss"
                    )
                task_loss = loss_fn(model, batch)
                token_mask = batch["attention_mask"].reshape(-1)
                balance = total_load_balancing_loss(model, token_mask)
                loss = task_loss + load_balancing_weight * balance
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"router training loss is {loss.item()} at step {step} (task loss "
                        f"{task_loss.item()}, load-balancing loss {balance.item()}); lower "
                        "learning_rate"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                logger.debug("router step %d: loss %.4f", step, losses[-1])
        finally:
            model.train(was_training)
    if losses:
        # Single-batch losses are noisy, so compare the means of the first and last tenth.
        window = max(1, len(losses) // 10)
        logger.info(
            "trained routers for %d steps: mean loss %.4f over the first %d steps, "
            "%.4f over the last %d",
            steps,
            sum(losses[:window]) / window,
            window,
            sum(losses[-window:]) / window,
            window,
        )
    return losses
