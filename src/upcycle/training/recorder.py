"""Per-example difficulty recording during fine-tuning.

The training loop hands the recorder the logits of the forward pass it already did, so
recording costs no extra forward or backward pass. Each batch adds a few element-wise
kernels on the device and one small [B, 4] tensor. The tensors stay on the device and are
copied to the host together every `flush_every` batches or when statistics are requested,
so recording adds no per-batch device synchronisation and no Python loop over examples.

Every visit (one example in one batch) records the step, the example index, the
cross-entropy loss, whether the argmax prediction was correct, and the margin (true-class
logit minus the largest other logit). It also records the norm of that example's gradient
with respect to the classification head's weight matrix and bias, in closed form.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from upcycle.analysis.difficulty import (
    CONCENTRATION_FRACTIONS,
    AnalysisError,
    first_correct_steps,
    forgetting_events,
    gradient_concentration,
    last_visits,
    learned_steps,
)
from upcycle.errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_VERSION = 1

# Columns of the per-visit value matrix [V, 4].
LOSS, CORRECT, MARGIN, GRAD_NORM = range(4)

EXAMPLE_COLUMNS = (
    "index",
    "learned_step",
    "first_correct_step",
    "forgetting_events",
    "times_seen",
    "final_loss",
    "final_margin",
    "final_correct",
    "mean_grad_norm",
    "last_grad_norm",
)


def last_layer_grad_norms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    last_layer_input: torch.Tensor,
    *,
    logit_scale: float = 1.0,
    has_bias: bool = False,
) -> torch.Tensor:
    """Compute each example's gradient norm with respect to the classification head.

    The head computes logits = logit_scale * x @ W.T (+ b). For the cross-entropy loss of
    one example, dL/dW = logit_scale * (p - y) x^T and dL/db = p - y, with p the softmax
    output and y the one-hot label, so the Frobenius norm of (dL/dW, dL/db) is
    ||p - y|| * sqrt(logit_scale^2 * ||x||^2 + has_bias). The loss is the example's own,
    not divided by the batch size.

    The norm is taken with respect to W even when the head is frozen (the label-embedding
    head). It then measures how hard the example pulls on the head, in the head's
    coordinates, not a gradient that training applies.

    Args:
        logits: [B, C] head outputs.
        labels: [B] class indices.
        last_layer_input: [B, D] the head's input x (after any normalisation it applies).
        logit_scale: the scale the head multiplies its logits by.
        has_bias: whether the head adds a bias b.

    Returns:
        float32 tensor [B] on the device of `logits`.
    """
    probabilities = torch.softmax(logits.float(), dim=1)
    # Error vector p - y: subtract 1 at each row's label.
    error = probabilities.scatter_add(1, labels[:, None], -torch.ones_like(probabilities[:, :1]))
    error_norm = torch.linalg.vector_norm(error, dim=1)
    input_norm = torch.linalg.vector_norm(last_layer_input.float(), dim=1)
    return error_norm * torch.sqrt(logit_scale**2 * input_norm**2 + float(has_bias))


def visit_values(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    last_layer_input: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    last_layer_has_bias: bool = False,
) -> torch.Tensor:
    """Compute loss, correctness, margin and head gradient norm of each example in a batch.

    Returns:
        float32 tensor [B, 4] with columns LOSS, CORRECT (1.0 or 0.0), MARGIN and
        GRAD_NORM (NaN when `last_layer_input` is None), on the device of `logits`.
    """
    logits = logits.float()
    label_column = labels[:, None]
    loss = F.cross_entropy(logits, labels, reduction="none")
    correct = logits.argmax(dim=1) == labels
    # Margin: true-class logit minus the largest logit of any other class.
    true_logit = logits.gather(1, label_column).squeeze(1)
    others = logits.scatter(1, label_column, float("-inf"))
    margin = true_logit - others.max(dim=1).values
    if last_layer_input is None:
        grad_norm = torch.full_like(loss, math.nan)
    else:
        grad_norm = last_layer_grad_norms(
            logits, labels, last_layer_input, logit_scale=logit_scale, has_bias=last_layer_has_bias
        )
    return torch.stack([loss, correct.float(), margin, grad_norm], dim=1)


class Recorder:
    """Per-example difficulty history of one fine-tune.

    Call `observe` once per training batch, `checkpoint_stats` at each checkpoint step,
    and `example_frame` at the end. `state_dict` and `load_state_dict` carry the history
    across an interrupted fine-tune.

    Args:
        num_examples: number of training examples N, so example indices lie in [0, N).
        flush_every: batches kept on the device before they are copied to the host. This
            bounds device memory to about flush_every * batch_size * 24 bytes.

    Raises:
        AnalysisError: for num_examples < 1 or flush_every < 1.
    """

    def __init__(self, num_examples: int, *, flush_every: int = 256) -> None:
        if num_examples < 1:
            raise AnalysisError(f"num_examples must be >= 1, got {num_examples}")
        if flush_every < 1:
            raise AnalysisError(f"flush_every must be >= 1, got {flush_every}")
        self.num_examples = int(num_examples)
        self.flush_every = int(flush_every)
        # Batches not yet copied to the host: (step, batch size), indices [B], values [B, 4].
        self._pending_sizes: list[tuple[int, int]] = []
        self._pending_indices: list[torch.Tensor] = []
        self._pending_values: list[torch.Tensor] = []
        # Host chunks of the visit history, concatenated when statistics are requested.
        self._steps: list[np.ndarray] = []
        self._indices: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._previous_checkpoint_step = 0

    @property
    def num_visits(self) -> int:
        """Number of visits recorded so far."""
        pending = sum(size for _, size in self._pending_sizes)
        return pending + sum(len(chunk) for chunk in self._steps)

    def observe(
        self,
        step: int,
        indices: torch.Tensor,
        logits: torch.Tensor,
        labels: torch.Tensor,
        *,
        last_layer_input: torch.Tensor | None = None,
        logit_scale: float = 1.0,
        last_layer_has_bias: bool = False,
    ) -> None:
        """Record one training batch from the forward pass the training step already did.

        Args:
            step: the optimizer step of this batch.
            indices: [B] training example indices, on any device.
            logits: [B, C] classifier outputs, detached.
            labels: [B] class indices, on the device of `logits`.
            last_layer_input: [B, D] the head's input. Without it the gradient norm is NaN.
            logit_scale: the scale the head multiplies its logits by.
            last_layer_has_bias: whether the head adds a bias.

        Raises:
            AnalysisError: for a negative step or tensors whose shapes do not match.
        """
        indices = torch.as_tensor(indices)
        self._check_batch(step, indices, logits, labels, last_layer_input)
        with torch.no_grad():
            values = visit_values(
                logits.detach(),
                labels.detach(),
                last_layer_input=None if last_layer_input is None else last_layer_input.detach(),
                logit_scale=logit_scale,
                last_layer_has_bias=last_layer_has_bias,
            )
        self._pending_sizes.append((int(step), int(indices.shape[0])))
        self._pending_indices.append(indices.detach())
        self._pending_values.append(values)
        if len(self._pending_values) >= self.flush_every:
            self._flush()

    def checkpoint_stats(self, step: int) -> dict[str, float]:
        """Summarise the visits up to `step` for the difficulty table.

        Returns:
            train_loss: mean loss of the visits after the previous call's step, up to `step`
                (NaN when there were none).
            learned_fraction: fraction of all N examples whose most recent visit was
                correct. Unvisited examples count as not learned.
            forgetting_events: total forgetting events of all examples so far.
            grad_concentration_top1, _top5, _top10: share of the summed head gradient
                norms, each example's most recent one, from the top 1%, 5% and 10% of
                examples that have a norm (see `gradient_concentration`).

        Raises:
            AnalysisError: if `step` is not larger than the previous call's step.
        """
        if step <= self._previous_checkpoint_step:
            raise AnalysisError(
                f"checkpoint steps must increase: got step {step} after step "
                f"{self._previous_checkpoint_step}"
            )
        steps, indices, values = self._history()
        since_previous = (steps > self._previous_checkpoint_step) & (steps <= step)
        losses = values[since_previous, LOSS]
        train_loss = float(losses.mean(dtype=np.float64)) if losses.size else math.nan

        steps, indices, values = self._visits_until(step)
        correct = values[:, CORRECT] > 0.5
        last = last_visits(steps, indices, self.num_examples)
        last_seen = last[last >= 0]
        learned = int(correct[last_seen].sum())
        events = int(forgetting_events(steps, indices, correct, self.num_examples).sum())
        norms = values[last_seen, GRAD_NORM].astype(np.float64)
        shares = gradient_concentration(norms[np.isfinite(norms)], CONCENTRATION_FRACTIONS)

        self._previous_checkpoint_step = int(step)
        stats = {
            "train_loss": train_loss,
            "learned_fraction": learned / self.num_examples,
            "forgetting_events": events,
        }
        for fraction, share in shares.items():
            stats[f"grad_concentration_top{round(fraction * 100)}"] = share
        return stats

    def example_frame(self, *, final_step: int) -> pd.DataFrame:
        """Build one row per training example from the visits up to `final_step`.

        Returns:
            DataFrame with EXAMPLE_COLUMNS, sorted by index. learned_step and
            first_correct_step are NaN when the example was never learned or never
            correct. For an example never seen, times_seen is 0, final_correct is False
            and the loss, margin and norm columns are NaN. mean_grad_norm averages the
            visits that have a norm.
        """
        steps, indices, values = self._visits_until(final_step)
        correct = values[:, CORRECT] > 0.5
        n = self.num_examples
        last = last_visits(steps, indices, n)
        seen = last >= 0

        def final_value(column: int) -> np.ndarray:
            result = np.full(n, np.nan)
            result[seen] = values[last[seen], column]
            return result

        final_correct = np.zeros(n, dtype=bool)
        final_correct[seen] = correct[last[seen]]
        norms = values[:, GRAD_NORM].astype(np.float64)
        has_norm = np.isfinite(norms)
        norm_sums = np.bincount(indices[has_norm], weights=norms[has_norm], minlength=n)
        norm_counts = np.bincount(indices[has_norm], minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_grad_norm = np.where(norm_counts > 0, norm_sums / norm_counts, np.nan)

        return pd.DataFrame(
            {
                "index": np.arange(n, dtype=np.int64),
                "learned_step": learned_steps(steps, indices, correct, n),
                "first_correct_step": first_correct_steps(steps, indices, correct, n),
                "forgetting_events": forgetting_events(steps, indices, correct, n),
                "times_seen": np.bincount(indices, minlength=n).astype(np.int64),
                "final_loss": final_value(LOSS),
                "final_margin": final_value(MARGIN),
                "final_correct": final_correct,
                "mean_grad_norm": mean_grad_norm,
                "last_grad_norm": final_value(GRAD_NORM),
            },
            columns=list(EXAMPLE_COLUMNS),
        )

    def state_dict(self) -> dict:
        """Return the full history as CPU tensors and numbers, loadable by `torch.load`."""
        steps, indices, values = self._history()
        return {
            "version": STATE_VERSION,
            "num_examples": self.num_examples,
            "previous_checkpoint_step": self._previous_checkpoint_step,
            "steps": torch.tensor(steps, dtype=torch.int64),
            "indices": torch.tensor(indices, dtype=torch.int64),
            "values": torch.tensor(values, dtype=torch.float32),
        }

    def load_state_dict(self, state: dict) -> None:
        """Replace the history with one saved by `state_dict`.

        Raises:
            CheckpointError: for a state of another version or another number of examples,
                or with missing or inconsistent entries.
        """
        expected = {
            "version",
            "num_examples",
            "previous_checkpoint_step",
            "steps",
            "indices",
            "values",
        }
        missing = expected - set(state)
        if missing:
            raise CheckpointError(
                f"recorder state is missing {sorted(missing)}. Delete the training state "
                "file to restart this fine-tune"
            )
        if state["version"] != STATE_VERSION:
            raise CheckpointError(
                f"recorder state has version {state['version']}, expected {STATE_VERSION}. "
                "Delete the training state file to restart this fine-tune"
            )
        if state["num_examples"] != self.num_examples:
            raise CheckpointError(
                f"recorder state is for {state['num_examples']} training examples, but this "
                f"task has {self.num_examples}. Delete the training state file to restart"
            )
        steps = torch.as_tensor(state["steps"]).cpu().numpy().astype(np.int64)
        indices = torch.as_tensor(state["indices"]).cpu().numpy().astype(np.int64)
        values = torch.as_tensor(state["values"]).cpu().numpy().astype(np.float32)
        if steps.ndim != 1 or steps.shape != indices.shape or values.shape != (len(steps), 4):
            raise CheckpointError(
                f"recorder state has inconsistent shapes: steps {steps.shape}, indices "
                f"{indices.shape}, values {values.shape}. Delete the training state file"
            )
        self._pending_sizes.clear()
        self._pending_indices.clear()
        self._pending_values.clear()
        self._steps, self._indices, self._values = [steps], [indices], [values]
        self._previous_checkpoint_step = int(state["previous_checkpoint_step"])
        logger.debug(
            "recorder restored %d visits up to checkpoint step %d",
            len(steps),
            self._previous_checkpoint_step,
        )

    def _check_batch(self, step, indices, logits, labels, last_layer_input) -> None:
        """Check shapes only, since reading values would synchronise with the device."""
        if step < 0:
            raise AnalysisError(f"step must be >= 0, got {step}")
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise AnalysisError(f"logits must have shape [B, C] with C >= 2, got {logits.shape}")
        batch_size = logits.shape[0]
        if indices.shape != (batch_size,):
            raise AnalysisError(
                f"indices must have shape [{batch_size}] to match logits, got {indices.shape}"
            )
        if labels.shape != (batch_size,):
            raise AnalysisError(
                f"labels must have shape [{batch_size}] to match logits, got {labels.shape}"
            )
        if last_layer_input is not None and (
            last_layer_input.ndim != 2 or last_layer_input.shape[0] != batch_size
        ):
            raise AnalysisError(
                f"last_layer_input must have shape [{batch_size}, D], got {last_layer_input.shape}"
            )

    def _flush(self) -> None:
        """Copy the pending batches to the host in one transfer per tensor kind."""
        if not self._pending_values:
            return
        values = torch.cat(self._pending_values).cpu().numpy()
        device = self._pending_indices[0].device
        indices = torch.cat([chunk.to(device) for chunk in self._pending_indices])
        indices = indices.cpu().numpy().astype(np.int64)
        steps = np.repeat(
            np.array([step for step, _ in self._pending_sizes], dtype=np.int64),
            [size for _, size in self._pending_sizes],
        )
        outside = (indices < 0) | (indices >= self.num_examples)
        if outside.any():
            raise AnalysisError(
                f"example indices must lie in [0, {self.num_examples}), got "
                f"{indices[outside][:5].tolist()} at steps {np.unique(steps[outside]).tolist()}"
            )
        self._steps.append(steps)
        self._indices.append(indices)
        self._values.append(values)
        self._pending_sizes.clear()
        self._pending_indices.clear()
        self._pending_values.clear()

    def _history(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (steps [V], indices [V], values [V, 4]) of every visit so far."""
        self._flush()
        if not self._steps:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
        if len(self._steps) > 1:
            self._steps = [np.concatenate(self._steps)]
            self._indices = [np.concatenate(self._indices)]
            self._values = [np.concatenate(self._values)]
        return self._steps[0], self._indices[0], self._values[0]

    def _visits_until(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        steps, indices, values = self._history()
        if steps.size and steps.max() <= step:
            return steps, indices, values
        keep = steps <= step
        return steps[keep], indices[keep], values[keep]
