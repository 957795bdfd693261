"""Exact per-example gradient norms of a whole model, with `torch.func`.

Each example's loss is differentiated on its own with `torch.func.grad`, vectorised over
examples with `torch.func.vmap`, and only the squared norms are kept. So at most
`chunk_size` per-example gradients are in memory at a time.

Padded text batches need one extra step. Hugging Face encoders inspect the attention
mask's values before attention (transformers 5.25 checks `padding_mask.all()` to skip an
all-ones mask for SDPA), and such data-dependent control flow cannot run under vmap. So
each example is cut to its own tokens, and examples of equal length are vectorised
together with one all-ones mask that is not batched. With right padding this gives the
same gradients as the padded batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from upcycle.analysis.difficulty import AnalysisError

ParameterSelection = Literal["trainable", "all"]
LossFunction = Callable[[Any, torch.Tensor], torch.Tensor]

MASK_KEY = "attention_mask"
SKIPPED_KEYS = ("indices",)
"""Batch entries that are not model inputs: the example ids that `collate` adds."""


def output_logits(outputs: Any) -> torch.Tensor:
    """Return the logits [B, C] of a model output.

    Accepts a tensor, a tuple or list whose first element is the logits (upcycle's
    `Classifier` returns (logits, features)), or an object with a `logits` attribute
    (transformers model outputs).

    Raises:
        AnalysisError: for any other output.
    """
    if isinstance(outputs, torch.Tensor):
        return outputs
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise AnalysisError(
        f"cannot find logits in a model output of type {type(outputs).__name__}. Pass a "
        "loss_fn that takes this output and the labels"
    )


def cross_entropy_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits in `outputs`, computed in float32."""
    return F.cross_entropy(output_logits(outputs).float(), labels)


def per_example_grad_norms(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    loss_fn: LossFunction = cross_entropy_loss,
    chunk_size: int = 8,
    parameters: ParameterSelection = "trainable",
    label_key: str = "labels",
) -> torch.Tensor:
    """Compute the exact L2 norm of each example's loss gradient over the model parameters.

    The model is called as `model(**inputs)` with every batch entry except `label_key`
    and `indices`, and `loss_fn(outputs, labels)` must return a scalar. For one example,
    the inputs have batch size 1. With "trainable", only parameters with
    requires_grad=True are differentiated (for LoRA, the adapter weights and any trained
    head), and frozen parameters and buffers enter as constants. The model runs in eval
    mode, so dropout is off, and every module's training flag is restored afterwards.

    If the batch has an `attention_mask` [B, T], it must be right-padded (ones, then
    zeros). Every entry whose second dimension is T is cut to the example's length.

    Args:
        model: the classifier. Its `forward` returns logits [B, C] or an output that
            `loss_fn` reads.
        batch: model inputs [B, ...] and labels [B], all on the model's device.
        loss_fn: loss of one example's outputs and labels [1], cross-entropy by default.
        chunk_size: examples whose gradients are held in memory at once.
        parameters: "trainable" or "all".
        label_key: the batch entry holding the labels.

    Returns:
        float32 tensor [B] of gradient norms on the labels' device.

    Raises:
        AnalysisError: for a missing label entry, inputs that are not [B, ...] tensors, an
            attention mask that is not right-padded, chunk_size < 1, an unknown
            `parameters` value, or no parameter to differentiate.
    """
    if chunk_size < 1:
        raise AnalysisError(f"chunk_size must be >= 1, got {chunk_size}")
    labels, inputs = _split_batch(batch, label_key)
    differentiated, constants = _select_parameters(model, parameters)
    buffers = dict(model.named_buffers())

    def example_loss(weights, example_inputs, shared_inputs, label):
        # vmap removes the batch dimension, so put back a batch of one example.
        model_inputs = {name: value.unsqueeze(0) for name, value in example_inputs.items()}
        model_inputs.update({name: value.unsqueeze(0) for name, value in shared_inputs.items()})
        outputs = functional_call(
            model, (weights, constants, buffers), args=(), kwargs=model_inputs
        )
        return loss_fn(outputs, label.unsqueeze(0))

    example_gradients = vmap(grad(example_loss), in_dims=(None, 0, None, 0))
    norms = torch.empty(labels.shape[0], dtype=torch.float32, device=labels.device)
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        for positions, example_inputs, shared_inputs in _chunks(inputs, labels, chunk_size):
            gradients = example_gradients(
                differentiated, example_inputs, shared_inputs, labels[positions]
            )
            squared = sum(g.float().flatten(1).pow(2).sum(dim=1) for g in gradients.values())
            norms[positions] = squared.sqrt().to(norms.device)
    finally:
        for module, training in modes.items():
            module.train(training)
    return norms


def _split_batch(
    batch: Mapping[str, torch.Tensor], label_key: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Return the labels [B] and the model inputs, checking that each input is [B, ...]."""
    if label_key not in batch:
        raise AnalysisError(
            f"batch has no {label_key!r} entry (entries: {sorted(batch)}). Pass label_key"
        )
    labels = batch[label_key]
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
        raise AnalysisError(f"batch[{label_key!r}] must be a 1-D tensor of class indices")
    inputs = {}
    for name, value in batch.items():
        if name == label_key or name in SKIPPED_KEYS:
            continue
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or len(value) != len(labels):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise AnalysisError(
                f"batch[{name!r}] must be a tensor with {len(labels)} rows like the labels, "
                f"got {shape}"
            )
        inputs[name] = value
    return labels, inputs


def _select_parameters(
    model: nn.Module, parameters: ParameterSelection
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split the named parameters into (differentiated, constant), both detached."""
    named = dict(model.named_parameters())
    if parameters == "trainable":
        chosen = {name for name, parameter in named.items() if parameter.requires_grad}
    elif parameters == "all":
        chosen = set(named)
    else:
        raise AnalysisError(
            f"unknown parameters {parameters!r}, supported: "
            f"{', '.join(repr(value) for value in get_args(ParameterSelection))}"
        )
    if not chosen:
        raise AnalysisError(
            "the model has no trainable parameter to differentiate. Unfreeze some "
            "parameters or pass parameters='all'"
        )
    differentiated = {name: named[name].detach() for name in named if name in chosen}
    constants = {name: named[name].detach() for name in named if name not in chosen}
    return differentiated, constants


def _chunks(inputs: dict[str, torch.Tensor], labels: torch.Tensor, chunk_size: int):
    """Yield (positions, per-example inputs, shared inputs) for chunks of at most chunk_size.

    Without an attention mask, chunks follow batch order and nothing is shared. With one,
    each chunk contains examples of one length, cut to that length, and the mask is a shared
    all-ones row.
    """
    batch_size = labels.shape[0]
    device = labels.device
    if MASK_KEY not in inputs:
        for start in range(0, batch_size, chunk_size):
            positions = torch.arange(start, min(start + chunk_size, batch_size), device=device)
            yield positions, {name: value[positions] for name, value in inputs.items()}, {}
        return

    mask = inputs[MASK_KEY]
    if mask.ndim != 2:
        raise AnalysisError(f"batch[{MASK_KEY!r}] must have shape [B, T], got {tuple(mask.shape)}")
    width = mask.shape[1]
    lengths = mask.sum(dim=1)
    right_padded = mask.bool() == (torch.arange(width, device=mask.device) < lengths[:, None])
    if not right_padded.all():
        rows = (~right_padded.all(dim=1)).nonzero().flatten().tolist()
        raise AnalysisError(
            f"batch[{MASK_KEY!r}] must be right-padded (ones, then zeros), but rows {rows[:5]} "
            "are not. Pad on the right (tokenizer.padding_side = 'right')"
        )
    if (lengths == 0).any():
        rows = (lengths == 0).nonzero().flatten().tolist()
        raise AnalysisError(
            f"batch[{MASK_KEY!r}] rows {rows[:5]} have no tokens. Drop empty examples first"
        )
    sequence_keys = [
        name
        for name, value in inputs.items()
        if name != MASK_KEY and value.ndim >= 2 and value.shape[1] == width
    ]
    for length in torch.unique(lengths).tolist():
        same_length = (lengths == length).nonzero().flatten().to(device)
        for start in range(0, len(same_length), chunk_size):
            positions = same_length[start : start + chunk_size]
            example_inputs = {}
            for name, value in inputs.items():
                if name == MASK_KEY:
                    continue
                rows = value[positions.to(value.device)]
                example_inputs[name] = rows[:, :length] if name in sequence_keys else rows
            shared = {MASK_KEY: torch.ones(length, dtype=mask.dtype, device=mask.device)}
            yield positions, example_inputs, shared
