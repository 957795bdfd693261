"""A linear layer whose LoRA experts are mixed per token by a learned top-k router.

`LoraMoELinear` keeps the base `nn.Linear` frozen and adds, for each token x,

    y = W x + b + sum over the selected experts e of gate_e(x) * B_e A_e x * scaling_e

The router is a linear gate over the layer input. Its softmax probabilities are cut to
the top-k experts per token, and the kept probabilities are renormalised to sum to one,
as Mixtral's router in transformers does. With top_k = N every expert is kept and the
gates are the softmax itself. With top_k = 1 and renormalisation the gate is always 1,
so the task loss sends no gradient to the router and only the load-balancing loss
trains it. Pass `renormalize=False` to keep the raw probability as the gate, as the
Switch Transformer router in transformers does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, NamedTuple, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from upcycle.errors import MergeError

logger = logging.getLogger(__name__)

RouterInit = Literal["zeros", "normal"]
ROUTER_INITS: tuple[str, ...] = get_args(RouterInit)
# Standard deviation of the "normal" router initialisation.
ROUTER_INIT_STD = 0.02


class Routing(NamedTuple):
    """The routing decisions of one forward pass over T tokens and N experts.

    `router_logits` is [T, N], `gates` is [T, N] with zeros outside each token's top-k,
    and `selected_experts` is [T, top_k] (long), in decreasing order of probability.
    """

    router_logits: Tensor
    gates: Tensor
    selected_experts: Tensor


class LoraMoELinear(nn.Module):
    """A frozen `nn.Linear` plus N LoRA experts mixed by a top-k router.

    Every expert's down-projection A_e x is computed for every token, and the gates, zero
    outside the top-k, weight the rank-r activations before one up-projection through all
    B_e. That costs T * N * rank * (in + out) multiply-adds against T * in * out for the
    base layer, a third more for 8 experts of rank 8 on a 384 x 384 layer. In exchange it
    avoids gathering tokens per expert, which pays off only for many experts.

    The last forward pass's routing is kept in `last_routing` (with its autograd graph) so
    that the caller can compute the load-balancing loss and router statistics.

    Args:
        base: the layer to extend. Its parameters are frozen.
        lora_A: [N, rank, in_features] down-projections of the N experts.
        lora_B: [N, out_features, rank] up-projections.
        scaling: N LoRA scalings (alpha / rank for each expert).
        top_k: number of experts per token, 1 to N.
        train_experts: whether `lora_A` and `lora_B` get gradients. The router always does.
        router_init: "zeros" (every token starts with uniform probabilities) or "normal"
            (weights drawn from N(0, 0.02^2) with torch's global generator, bias zero).
        renormalize: whether the kept top-k probabilities are rescaled to sum to one.
        expert_names: names of the N experts, for messages and statistics.
        name: the layer's module name, for messages.

    Raises:
        MergeError: for factors whose shapes do not fit `base` or each other, a `top_k`
            outside 1..N, or an unknown `router_init`.
    """

    def __init__(
        self,
        base: nn.Linear,
        lora_A: Tensor,
        lora_B: Tensor,
        scaling: Sequence[float] | Tensor,
        *,
        top_k: int,
        train_experts: bool = False,
        router_init: RouterInit = "zeros",
        renormalize: bool = True,
        expert_names: Sequence[str] | None = None,
        name: str = "",
    ) -> None:
        super().__init__()
        label = name or type(self).__name__
        _check_expert_shapes(label, base, lora_A, lora_B)
        num_experts = lora_A.shape[0]
        scaling = torch.as_tensor(scaling, dtype=torch.float32).flatten()
        if scaling.numel() != num_experts:
            raise MergeError(
                f"{label}: got {scaling.numel()} scalings for {num_experts} experts; pass one "
                "per expert"
            )
        if not 1 <= top_k <= num_experts:
            raise MergeError(
                f"{label}: top_k={top_k} is invalid for {num_experts} experts; choose top_k "
                f"from 1 to {num_experts}"
            )
        if router_init not in ROUTER_INITS:
            raise MergeError(
                f"{label}: unknown router_init {router_init!r}; supported: "
                f"{', '.join(ROUTER_INITS)}"
            )
        names = (
            tuple(expert_names)
            if expert_names is not None
            else tuple(f"expert_{index}" for index in range(num_experts))
        )
        if len(names) != num_experts:
            raise MergeError(f"{label}: got {len(names)} expert names for {num_experts} experts")

        self.name = name
        self.top_k = top_k
        self.renormalize = renormalize
        self.expert_names = names
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        weight = base.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(
            lora_A.detach().to(**factory).clone(), requires_grad=train_experts
        )
        self.lora_B = nn.Parameter(
            lora_B.detach().to(**factory).clone(), requires_grad=train_experts
        )
        self.register_buffer("scaling", scaling.to(weight.device))
        self.router = nn.Linear(base.in_features, num_experts, bias=True, **factory)
        if router_init == "zeros":
            nn.init.zeros_(self.router.weight)
        else:
            nn.init.normal_(self.router.weight, std=ROUTER_INIT_STD)
        nn.init.zeros_(self.router.bias)
        self.last_routing: Routing | None = None

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.base.in_features}, out_features={self.base.out_features}, "
            f"num_experts={self.num_experts}, rank={self.rank}, top_k={self.top_k}"
        )

    def route(self, tokens: Tensor) -> Routing:
        """Route tokens [T, in_features] to their top-k experts."""
        router_logits = self.router(tokens)
        probabilities = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_probabilities, selected = probabilities.topk(self.top_k, dim=-1)
        if self.renormalize:
            top_probabilities = top_probabilities / top_probabilities.sum(dim=-1, keepdim=True)
        gates = torch.zeros_like(probabilities).scatter(1, selected, top_probabilities)
        return Routing(router_logits, gates, selected)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer to x [..., in_features] and return [..., out_features]."""
        tokens = x.reshape(-1, x.shape[-1])
        routing = self.route(tokens)
        self.last_routing = routing

        # Down-project with every expert: [T, N, rank].
        hidden = torch.einsum("ti,nri->tnr", tokens, self.lora_A)
        # Weight by gate * scaling, which is zero for experts outside the token's top-k.
        weights = (routing.gates * self.scaling).to(hidden.dtype)
        hidden = hidden * weights.unsqueeze(-1)
        # Up-project and sum over experts in one contraction: [T, out_features].
        update = torch.einsum("tnr,nor->to", hidden, self.lora_B)
        return self.base(x) + update.reshape(*x.shape[:-1], -1)


def _check_expert_shapes(label: str, base: nn.Module, lora_A: Tensor, lora_B: Tensor) -> None:
    if not isinstance(base, nn.Linear):
        raise MergeError(
            f"{label}: only nn.Linear layers can get LoRA experts, got {type(base).__name__}"
        )
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise MergeError(
            f"{label}: expected lora_A [N, rank, in] and lora_B [N, out, rank], got shapes "
            f"{tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    expected_A = (lora_A.shape[0], lora_A.shape[1], base.in_features)
    expected_B = (lora_A.shape[0], base.out_features, lora_A.shape[1])
    if (
        lora_A.shape[0] < 1
        or tuple(lora_A.shape) != expected_A
        or tuple(lora_B.shape) != expected_B
    ):
        raise MergeError(
            f"{label}: LoRA factors of shapes A {tuple(lora_A.shape)} and B "
            f"{tuple(lora_B.shape)} do not fit a linear layer {base.in_features} -> "
            f"{base.out_features}; expected A [N, rank, {base.in_features}] and "
            f"B [N, {base.out_features}, rank] with N >= 1"
        )


def _kept_tokens(num_tokens: int, token_mask: Tensor | None, device: torch.device) -> Tensor | None:
    """Return token_mask as a bool tensor [T] on `device`, or None for no mask."""
    if num_tokens == 0:
        raise MergeError("routing covers no token; run a forward pass on a non-empty batch")
    if token_mask is None:
        return None
    mask = token_mask.reshape(-1).to(device=device).bool()
    if mask.numel() != num_tokens:
        raise MergeError(
            f"token_mask has {mask.numel()} entries but routing covers {num_tokens} tokens; "
            "pass the attention mask of the batch that ran the forward pass"
        )
    if not mask.any():
        raise MergeError("token_mask keeps no token; every token of the batch is padding")
    return mask


def load_balancing_loss(
    router_logits: Tensor,
    selected: Tensor,
    num_experts: int,
    token_mask: Tensor | None = None,
) -> Tensor:
    """Compute the Switch Transformer auxiliary loss N * sum_i f_i * P_i.

    f_i is the fraction of top-k assignments that go to expert i (each token has k, so f
    sums to one) and P_i is the mean router probability of expert i, both over the tokens
    that `token_mask` keeps. The loss is 1 when routing is uniform (P_i = 1/N for every
    token) and grows as routing concentrates on few experts. Only P_i carries gradient.
    This is eq. (4)-(6) of Fedus et al., 2021, "Switch Transformers", extended to top-k.
    transformers' Mixtral `load_balancing_loss_func` (v5) divides the counts by T rather
    than by T * k, so its value is k times this one.

    Args:
        router_logits: [T, N] router logits.
        selected: [T, k] indices of each token's selected experts.
        num_experts: N.
        token_mask: [T] bool (or 0/1) mask, False for padding tokens; None keeps all.

    Returns:
        a float32 scalar.

    Raises:
        MergeError: for mismatched shapes or a mask that keeps no token.
    """
    if router_logits.dim() != 2 or router_logits.shape[1] != num_experts:
        raise MergeError(
            f"router_logits must be [T, {num_experts}], got {tuple(router_logits.shape)}"
        )
    if selected.dim() != 2 or selected.shape[0] != router_logits.shape[0]:
        raise MergeError(
            f"selected must be [T, k] with T={router_logits.shape[0]}, got {tuple(selected.shape)}"
        )
    mask = _kept_tokens(router_logits.shape[0], token_mask, router_logits.device)
    probabilities = F.softmax(router_logits, dim=-1, dtype=torch.float32)
    if mask is not None:
        probabilities = probabilities[mask]
        selected = selected[mask]

    # f_i: share of the top-k assignments routed to expert i.
    counts = torch.bincount(selected.reshape(-1), minlength=num_experts).to(torch.float32)
    fraction_routed = counts / selected.numel()
    # P_i: mean router probability of expert i.
    mean_probability = probabilities.mean(dim=0)
    return num_experts * (fraction_routed * mean_probability).sum()


def router_statistics(
    selected: Tensor, num_experts: int, token_mask: Tensor | None = None
) -> Tensor:
    """Compute the fraction of kept tokens that route to each expert.

    A token counts for each of its k selected experts, so the fractions sum to k.

    Args:
        selected: [T, k] indices of each token's selected experts.
        num_experts: N.
        token_mask: [T] bool (or 0/1) mask, False for padding tokens; None keeps all.

    Returns:
        [N] float32 fractions on the device of `selected`.

    Raises:
        MergeError: for a mask of the wrong size or one that keeps no token.
    """
    if selected.dim() != 2:
        raise MergeError(f"selected must be [T, k], got shape {tuple(selected.shape)}")
    mask = _kept_tokens(selected.shape[0], token_mask, selected.device)
    if mask is not None:
        selected = selected[mask]
    counts = torch.bincount(selected.reshape(-1), minlength=num_experts).to(torch.float32)
    return counts / selected.shape[0]
