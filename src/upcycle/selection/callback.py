"""A `transformers.TrainerCallback` that runs a stopping rule and keeps the trajectory.

Add `StoppingCallback` to your own `transformers.Trainer` to stop fine-tuning with any rule
of `upcycle.selection.rules` and to save, at every evaluation, the expert as a task vector
that upcycle's merging methods and merge-aware search read:

    rule = make_rule("plateau", window=2, threshold=0.1)
    callback = StoppingCallback(rule, output_dir="experts/sst2", task_name="sst2")
    trainer = Trainer(model=model, args=args, ..., callbacks=[callback])
    trainer.train()
    keep = callback.checkpoint_path(callback.chosen_step)

The callback reads the metrics of every evaluation during `Trainer.train`, so the
`TrainingArguments` need an evaluation strategy (`eval_strategy="steps"` or `"epoch"`),
and `compute_metrics` must return the metric the rule watches (`accuracy` by default,
which the Trainer reports as `eval_accuracy`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from upcycle.errors import CheckpointError, ConfigError, TrainingError
from upcycle.io import atomic_save_safetensors, atomic_write_json
from upcycle.selection.rules import Evaluation, StoppingRule

logger = logging.getLogger(__name__)

TRAJECTORY_FILE = "trajectory.json"

# Optional statistics read from the evaluation metrics when present, by Evaluation field.
_STATISTIC_METRICS = {
    "learned_fraction": "eval_learned_fraction",
    "grad_concentration_top5": "eval_grad_concentration_top5",
}


class StoppingCallback(TrainerCallback):
    """Stop a `transformers.Trainer` when a stopping rule returns True, saving every evaluation.

    At each evaluation during `Trainer.train` the callback builds an `Evaluation` at
    `state.global_step` from the metrics, writes the task vector of the model's trainable
    parameters to `<output_dir>/step<N>.safetensors`, feeds the rule, rewrites
    `<output_dir>/trajectory.json`, and sets `control.should_training_stop` when the rule
    stops. A task vector maps each trainable parameter name of the model, as
    `model.named_parameters()` spells it, to its float32 current value minus its base
    value. For a `*ForSequenceClassification` model the names carry the encoder prefix
    (such as `bert.`) and include the classification head.

    Evaluations outside `Trainer.train`, such as a final `trainer.evaluate()`, and a repeated
    evaluation at an already recorded step are ignored. In distributed training every
    process runs the rule, so all stop together, and only the main process writes files.

    When `Trainer.train(resume_from_checkpoint=...)` resumes at step N > 0, the callback
    replays the evaluations up to step N from trajectory.json into the rule, and it needs
    `base_state_dict` because the model it receives has already been fine-tuned.

    Args:
        rule: The stopping rule. It is reset at the start of each `Trainer.train`.
        base_state_dict: Weights to subtract, by parameter name. It must contain every
            trainable parameter with the same shape, and may hold more. The callback keeps a
            float32 CPU copy. Default: a copy of the trainable parameters taken when
            training begins.
        output_dir: Folder for the task vectors and trajectory.json. Default:
            `<TrainingArguments.output_dir>/task_vectors/<task_name>`.
        metric: Key of the evaluation metrics read as validation accuracy. Higher must be
            better.
        task_name: Task name written into the metadata of each task vector.

    Raises:
        ConfigError: From the constructor, if `rule` is not a `StoppingRule`. From
            `on_evaluate`, if the metrics lack `metric`.
        CheckpointError: From `on_train_begin`, if `base_state_dict` lacks a trainable
            parameter or has another shape for it.
        TrainingError: From `on_train_begin`, if the model has no trainable parameters, or
            training resumes at a step after 0 without `base_state_dict`.
        TrajectoryError: From `on_evaluate`, if the rule needs a statistic that the metrics
            lack.
    """

    # NOTE: parameters sharded by DeepSpeed ZeRO-3 or FSDP are not gathered, so under those
    # the saved task vectors are incomplete. For a PEFT model the trainable parameters are
    # the LoRA A and B matrices, so the file stores their changes, not the B·A update.

    def __init__(
        self,
        rule: StoppingRule,
        *,
        base_state_dict: Mapping[str, Tensor] | None = None,
        output_dir: str | Path | None = None,
        metric: str = "eval_accuracy",
        task_name: str = "task",
    ) -> None:
        if not isinstance(rule, StoppingRule):
            raise ConfigError(
                f"StoppingCallback needs a StoppingRule, got {type(rule).__name__}; build one "
                "with upcycle.selection.make_rule(name, **params)"
            )
        self.rule = rule
        self.metric = metric
        self.task_name = task_name
        self.output_dir = Path(output_dir) if output_dir is not None else None
        # A copy, because model.state_dict() shares storage with the parameters being trained.
        self._given_base = (
            {name: _float32_cpu_copy(tensor) for name, tensor in base_state_dict.items()}
            if base_state_dict is not None
            else None
        )
        self._base: dict[str, Tensor] = {}
        self._checkpoint_dir: Path | None = None
        self._records: list[dict[str, Any]] = []
        self._training = False

    @property
    def chosen_step(self) -> int | None:
        """Step of the checkpoint to keep according to the rule, or None before an evaluation."""
        return self.rule.chosen_step

    @property
    def stopped_step(self) -> int | None:
        """Step at which the rule stopped training, or None if it did not stop."""
        return self.rule.stopped_step

    @property
    def checkpoint_dir(self) -> Path | None:
        """Folder of the task vectors and trajectory.json, known once training begins."""
        return self._checkpoint_dir

    def checkpoint_path(self, step: int) -> Path:
        """Return the task vector file of the evaluation at `step`.

        Raises:
            TrainingError: If training has not begun, so the folder is not known yet.
        """
        if self._checkpoint_dir is None:
            raise TrainingError(
                "the checkpoint folder is set when Trainer.train begins; call train() first or "
                "pass output_dir to StoppingCallback"
            )
        return self._checkpoint_dir / f"step{step}.safetensors"

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        if model is None:
            raise TrainingError(
                "StoppingCallback.on_train_begin got no model; it reads the model argument that "
                "transformers.Trainer passes to every callback"
            )
        self._checkpoint_dir = self.output_dir or (
            Path(args.output_dir) / "task_vectors" / self.task_name
        )
        self._base = self._base_weights(model, state)
        self.rule.reset()
        self._records = []
        if state.global_step > 0:
            self._replay_trajectory(state, control)
        self._training = True
        return control

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: Mapping[str, float] | None = None,
        model: torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> TrainerControl:
        step = state.global_step
        if not self._training:
            logger.debug("task %s: evaluation at step %d is outside training", self.task_name, step)
            return control
        if self._records and step <= self._records[-1]["step"]:
            logger.debug("task %s: step %d is already recorded", self.task_name, step)
            return control
        evaluation = self._evaluation(step, metrics or {})
        should_stop = self.rule.update(evaluation)
        self._records.append(_record(evaluation, stopped=should_stop))
        if state.is_world_process_zero:
            self._save_task_vector(model, evaluation)
            self._write_trajectory()
        if should_stop:
            logger.info(
                "task %s: %r stopped training at step %d; chosen step %s",
                self.task_name,
                self.rule,
                step,
                self.rule.chosen_step,
            )
            control.should_training_stop = True
        return control

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        self._training = False
        logger.info(
            "task %s: training ended at step %d; stopped step %s, chosen step %s",
            self.task_name,
            state.global_step,
            self.rule.stopped_step,
            self.rule.chosen_step,
        )
        return control

    def _base_weights(self, model: torch.nn.Module, state: TrainerState) -> dict[str, Tensor]:
        trainable = {
            name: parameter
            for name, parameter in model.named_parameters()
            if parameter.requires_grad
        }
        if not trainable:
            raise TrainingError(
                f"task {self.task_name}: the model has no trainable parameters, so there is no "
                "task vector to save; unfreeze the parameters to fine-tune"
            )
        if self._given_base is None:
            if state.global_step > 0:
                raise TrainingError(
                    f"task {self.task_name}: training resumes at step {state.global_step}, so "
                    "the model no longer holds the base weights; pass base_state_dict (the "
                    "pretrained weights) to StoppingCallback"
                )
            return {name: _float32_cpu_copy(parameter) for name, parameter in trainable.items()}
        base = {}
        for name, parameter in trainable.items():
            if name not in self._given_base:
                raise CheckpointError(
                    f"task {self.task_name}: base_state_dict has no tensor for the trainable "
                    f"parameter {name!r}; pass the state dict of the same model class before "
                    "fine-tuning, or freeze that parameter"
                )
            tensor = self._given_base[name]
            if tensor.shape != parameter.shape:
                raise CheckpointError(
                    f"task {self.task_name}: base_state_dict[{name!r}] has shape "
                    f"{tuple(tensor.shape)} but the model parameter has shape "
                    f"{tuple(parameter.shape)}; pass the base weights of this architecture"
                )
            base[name] = tensor
        return base

    def _replay_trajectory(self, state: TrainerState, control: TrainerControl) -> None:
        """Feed the rule the stored evaluations up to the resumed step."""
        path = self._checkpoint_dir / TRAJECTORY_FILE
        if not path.is_file():
            logger.warning(
                "task %s: resuming at step %d without %s, so the rule starts with no history",
                self.task_name,
                state.global_step,
                path,
            )
            return
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))["evaluations"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(
                f"trajectory file {path} is unreadable ({error}); delete it to resume without "
                "the rule's history, or restore it"
            ) from error
        for record in stored:
            if record["step"] > state.global_step:
                break
            evaluation = Evaluation(
                step=record["step"],
                validation_accuracy=record["accuracy"],
                learned_fraction=record.get("learned_fraction"),
                grad_concentration_top5=record.get("grad_concentration_top5"),
            )
            should_stop = self.rule.update(evaluation)
            self._records.append(_record(evaluation, stopped=should_stop))
            if should_stop:
                logger.warning(
                    "task %s: the rule had already stopped at step %d before the resume",
                    self.task_name,
                    evaluation.step,
                )
                control.should_training_stop = True
                break

    def _evaluation(self, step: int, metrics: Mapping[str, float]) -> Evaluation:
        if self.metric not in metrics:
            raise ConfigError(
                f"task {self.task_name}: evaluation metrics at step {step} have no "
                f"{self.metric!r} (available: {', '.join(sorted(metrics)) or 'none'}); return "
                "it from compute_metrics or pass metric=<one of these> to StoppingCallback"
            )
        statistics = {
            field: metrics[key] for field, key in _STATISTIC_METRICS.items() if key in metrics
        }
        return Evaluation(step=step, validation_accuracy=metrics[self.metric], **statistics)

    def _save_task_vector(self, model: torch.nn.Module | None, evaluation: Evaluation) -> None:
        if model is None:
            raise TrainingError(
                "StoppingCallback.on_evaluate got no model; it reads the model argument that "
                "transformers.Trainer passes to every callback"
            )
        parameters = dict(model.named_parameters())
        task_vector = {}
        for name, base in self._base.items():
            if name not in parameters:
                raise CheckpointError(
                    f"task {self.task_name}: parameter {name!r} was trainable when training "
                    "began but is missing from the model now; keep the model's structure fixed "
                    "during training"
                )
            # task vector = fine-tuned weights - base weights
            task_vector[name] = parameters[name].detach().float().cpu() - base
        metadata = {
            "format": "upcycle-task-vector",
            "task": self.task_name,
            "step": str(evaluation.step),
            "validation_accuracy": repr(evaluation.validation_accuracy),
            "metric": self.metric,
        }
        atomic_save_safetensors(task_vector, self.checkpoint_path(evaluation.step), metadata)

    def _write_trajectory(self) -> None:
        atomic_write_json(
            self._checkpoint_dir / TRAJECTORY_FILE,
            {
                "task": self.task_name,
                "metric": self.metric,
                "rule": repr(self.rule),
                "stopped_step": self.rule.stopped_step,
                "chosen_step": self.rule.chosen_step,
                "evaluations": self._records,
            },
        )


def _float32_cpu_copy(tensor: Tensor) -> Tensor:
    return tensor.detach().to(device="cpu", dtype=torch.float32, copy=True)


def _record(evaluation: Evaluation, *, stopped: bool) -> dict[str, Any]:
    return {
        "step": evaluation.step,
        "accuracy": evaluation.validation_accuracy,
        "learned_fraction": evaluation.learned_fraction,
        "grad_concentration_top5": evaluation.grad_concentration_top5,
        "stopped": stopped,
    }
