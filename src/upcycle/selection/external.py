"""Bring your own checkpoints: import fine-tuned Hugging Face checkpoints as a run directory.

An experts file names the base model, the tasks to evaluate on, and each task's
checkpoints along its fine-tuning trajectory, each a Hugging Face model folder or hub id
with its optimizer step:

    base_model: models/all-MiniLM-L6-v2    # id or folder the experts were fine-tuned from
    data:                                  # the data section of a run config
      root: /data/textsuite
      tasks: [sst2, trec]
    experts:
      - task: sst2
        checkpoints:
          - {step: 100, path: finetuned/sst2/checkpoint-100}
          - {step: 200, path: finetuned/sst2/checkpoint-200}
      - task: trec
        checkpoints:
          - {step: 200, path: finetuned/trec/checkpoint-200}

The sections `model` (without `base`), `merging`, `selection` and `evaluation`, and the
keys `name` and `device`, are optional and mean what they mean in a run config. A path
that exists relative to the experts file's folder is read from there. Any other value goes
to `from_pretrained` as given, as a path relative to the working directory or a hub id.
`data.root` is resolved as in a run config.

`import_experts` writes a run directory in upcycle's own layout: every checkpoint becomes a
task vector (checkpoint minus base weights) at
`checkpoints/full/<task>/seed0/step<N>.safetensors`, is evaluated on its task to fill
results/experts.csv, and the resolved config.yaml has `training.checkpoint_steps` set to
the union of the given steps. The merge and select stages then run on it as on any run.

Heads: a checkpoint is loaded with `transformers.AutoModel`, which keeps the encoder of a
`*ForSequenceClassification` checkpoint and drops its classifier. Every task is evaluated
and merged with the label-embedding head built from the base model and the task's class
names, as in a run with `model.head: label-embedding`, so the checkpoint's own label order
does not matter.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from upcycle.config import (
    DataConfig,
    EvaluationConfig,
    MergingConfig,
    RunConfig,
    Section,
    SelectionConfig,
    format_validation_error,
    parse_config,
)
from upcycle.errors import CheckpointError, ConfigError

logger = logging.getLogger(__name__)

KIND = "full"
SEED = 0
IMPORT_KEY = "import/experts"
LARGE_CHANGE = 0.5
"""Relative change of the weight norm above which a checkpoint gets a warning. An estimate:
a fine-tune changes the weights by a small fraction of their norm, while the weights of an
independently pretrained model differ by about their norm or more."""


class CheckpointEntry(Section):
    """One checkpoint of an expert's trajectory."""

    step: int = Field(ge=1, description="Optimizer step at which the checkpoint was saved.")
    path: str = Field(min_length=1, description="Hugging Face model folder or hub id.")


class ExpertEntry(Section):
    """One task's expert, as checkpoints along its fine-tuning trajectory."""

    task: str
    checkpoints: list[CheckpointEntry] = Field(min_length=1)

    @field_validator("checkpoints")
    @classmethod
    def _distinct_steps(cls, value: list[CheckpointEntry]) -> list[CheckpointEntry]:
        steps = [entry.step for entry in value]
        repeated = sorted({step for step in steps if steps.count(step) > 1})
        if repeated:
            raise ValueError(f"steps {repeated} appear more than once; give each step once")
        return sorted(value, key=lambda entry: entry.step)


class ExpertsFile(Section):
    """An experts file: a base model, the tasks, and each task's checkpoints."""

    name: str = "external"
    device: str = "auto"
    base_model: str = Field(min_length=1)
    data: DataConfig
    model: dict[str, Any] = Field(
        default_factory=dict, description="The model section of a run config, without base."
    )
    merging: MergingConfig = Field(default_factory=MergingConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    experts: list[ExpertEntry] = Field(min_length=1)

    @model_validator(mode="after")
    def _experts_match_tasks(self) -> ExpertsFile:
        if "base" in self.model:
            raise ValueError("model.base is set by base_model; remove it from the model section")
        if self.model.get("head", "label-embedding") != "label-embedding":
            raise ValueError(
                f"model.head {self.model['head']!r} is not supported for imported checkpoints: "
                "their classifiers are dropped and every task uses a label-embedding head "
                "built from the base model, so remove model.head or set it to label-embedding"
            )
        tasks = [source.name for source in self.data.tasks]
        experts = [expert.task for expert in self.experts]
        repeated = sorted({task for task in experts if experts.count(task) > 1})
        if repeated:
            raise ValueError(f"experts lists tasks {repeated} more than once; merge their entries")
        without_expert = [task for task in tasks if task not in experts]
        without_task = [task for task in experts if task not in tasks]
        if without_expert or without_task:
            raise ValueError(
                f"every task of data.tasks needs exactly one expert: tasks without an expert "
                f"{without_expert}, experts of tasks not in data.tasks {without_task}"
            )
        return self


def load_experts_file(path: str | Path) -> ExpertsFile:
    """Read and validate an experts file, reporting every problem at once.

    Raises:
        ConfigError: If the file is missing, not YAML, or invalid.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experts file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"experts file {path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid experts file {path}: expected a mapping at the top level")
    try:
        return ExpertsFile.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, str(path))) from None


def resolve_location(value: str, folder: Path) -> str:
    """Return `value` as a path under `folder` when one exists there, else unchanged.

    Raises:
        CheckpointError: If `value` looks like a path (starts with ".", "/" or "~") and
            exists neither under `folder` nor as given.
    """
    candidate = folder / Path(value).expanduser()
    if candidate.exists():
        return str(candidate)
    if Path(value).expanduser().exists():
        return str(Path(value).expanduser())
    if value.startswith((".", "/", "~")):
        raise CheckpointError(
            f"checkpoint folder not found: {value} (a relative path is read from {folder} or "
            "the working directory); fix the path in the experts file"
        )
    return value


def base_location(value: str, folder: Path) -> str:
    """Return `base_model` as a path under `folder` when one exists there, else unchanged.

    A value left unchanged is checked when the base model loads (see `load_encoder`).
    """
    candidate = folder / Path(value).expanduser()
    return str(candidate) if candidate.exists() else value


def run_config_for(spec: ExpertsFile, folder: Path) -> RunConfig:
    """Return the resolved run config of an imported experts file.

    The run has one seed (0) and full task vectors, `training.steps` is the largest given
    step, and `training.checkpoint_steps` the union of the given steps. The recorder and
    the analysis stage are off, because there is no training loop to record.
    """
    steps = sorted({entry.step for expert in spec.experts for entry in expert.checkpoints})
    raw = {
        "name": spec.name,
        "device": spec.device,
        "seeds": [SEED],
        "data": spec.data.model_dump(mode="json", exclude_none=True),
        "model": {**spec.model, "base": base_location(spec.base_model, folder)},
        "training": {
            "methods": [KIND],
            "steps": steps[-1],
            "checkpoint_steps": steps,
            "warmup_steps": 0,
        },
        "recorder": {"enabled": False},
        "analysis": {"enabled": False},
        "merging": spec.merging.model_dump(mode="json"),
        "selection": spec.selection.model_dump(mode="json"),
        "evaluation": spec.evaluation.model_dump(mode="json"),
    }
    return parse_config(raw, "the run config built from the experts file")


def checkpoint_task_vector(
    location: str, base_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Load a Hugging Face checkpoint and return its encoder weights minus the base weights.

    Args:
        location: Model folder or hub id, loaded with `transformers.AutoModel`, which keeps
            the encoder of a `*ForSequenceClassification` checkpoint.
        base_state: Base encoder state dict by parameter name.

    Returns:
        A float32 task vector with the names and shapes of `base_state`. A parameter that
        the checkpoint lacks, which transformers would initialize at random, gets a zero
        task vector (it keeps the base weights), and a warning names it.

    Raises:
        CheckpointError: If the checkpoint cannot be loaded, or its parameter names or
            shapes differ from the base model's. The message names the folder and tensor.
    """
    from transformers import AutoModel

    try:
        model, loading = AutoModel.from_pretrained(
            location, dtype=torch.float32, output_loading_info=True
        )
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"failed to load checkpoint {location}: {error}. Give a Hugging Face model folder "
            "with config.json and weights, or a hub id on a machine with hub access"
        ) from error
    state = model.state_dict()
    extra = sorted(set(state) - set(base_state))
    if extra:
        raise CheckpointError(
            f"checkpoint {location} has tensor {extra[0]!r}, which the base model lacks "
            f"({len(extra)} such tensors); it was fine-tuned from another base model, so list "
            "only checkpoints of base_model"
        )
    lacking = sorted(set(base_state) - set(state))
    if lacking:
        raise CheckpointError(
            f"checkpoint {location} lacks tensor {lacking[0]!r} of the base model "
            f"({len(lacking)} such tensors); it was fine-tuned from another base model"
        )
    for name, tensor in state.items():
        if tensor.shape != base_state[name].shape:
            raise CheckpointError(
                f"checkpoint {location}: tensor {name!r} has shape {tuple(tensor.shape)}, the "
                f"base model's has {tuple(base_state[name].shape)}; it was fine-tuned from "
                "another base model"
            )
    not_loaded = set(loading.get("missing_keys", ()))
    if not_loaded:
        logger.warning(
            "checkpoint %s has no weights for %s; those parameters keep the base weights",
            location,
            ", ".join(sorted(not_loaded)),
        )
    task_vector = {
        name: torch.zeros_like(base_state[name], dtype=torch.float32)
        if name in not_loaded
        else tensor.detach().float() - base_state[name].float()
        for name, tensor in state.items()
    }
    check_relative_change(location, task_vector, base_state)
    return task_vector


def check_relative_change(
    location: str, task_vector: Mapping[str, torch.Tensor], base_state: Mapping[str, torch.Tensor]
) -> None:
    """Warn when a task vector's norm exceeds `LARGE_CHANGE` of the base weights' norm.

    Fine-tuning moves the weights by a small fraction of their norm, so a larger change
    suggests a checkpoint of another pretrained model with the same architecture.
    """
    change = torch.sqrt(sum(vector.float().pow(2).sum() for vector in task_vector.values()))
    norm = torch.sqrt(sum(tensor.float().pow(2).sum() for tensor in base_state.values()))
    ratio = float(change / norm) if norm > 0 else 0.0
    if ratio > LARGE_CHANGE:
        logger.warning(
            "checkpoint %s differs from the base model by %.0f%% of its weight norm; check that "
            "it was fine-tuned from base_model",
            location,
            100 * ratio,
        )


def import_experts(
    experts_file: str | Path, run_dir: str | Path, *, data_root: str | None = None
) -> Path:
    """Import the checkpoints of an experts file into a run directory, resuming a partial one.

    Returns:
        The run directory.

    Raises:
        ConfigError: If the experts file is invalid, or `run_dir` was built from other
            settings or other checkpoints.
        CheckpointError: If a checkpoint cannot be loaded or does not fit the base model.
    """
    from upcycle.workspace import Workspace

    experts_file = Path(experts_file)
    spec = load_experts_file(experts_file)
    folder = experts_file.resolve().parent
    config = run_config_for(spec, folder)
    ws = Workspace(config, run_dir, data_root=data_root)
    ws.run.prepare(config, ws.input_files(), data_root=ws.data_root)
    locations = {
        expert.task: {
            entry.step: resolve_location(entry.path, folder) for entry in expert.checkpoints
        }
        for expert in spec.experts
    }
    for task, task_locations in locations.items():
        check_sources(ws, task, task_locations)
    if ws.run.is_complete(IMPORT_KEY):
        logger.info("experts of %s already imported into %s", experts_file, ws.run.root)
        return ws.run.root
    write_zero_shot(ws)
    for task, task_locations in locations.items():
        import_expert(ws, task, task_locations)
    from upcycle.pipeline import RESULT_NAMES, expert_table

    path = ws.run.write_result(RESULT_NAMES[KIND][0], expert_table(ws, KIND))
    ws.run.mark_complete(IMPORT_KEY, {"source": str(experts_file)})
    logger.info(
        "imported %d checkpoints into %s; expert accuracy in %s",
        sum(len(task_locations) for task_locations in locations.values()),
        ws.run.root,
        path,
    )
    return ws.run.root


def write_zero_shot(ws) -> None:
    """Write RUN/zeroshot.csv, the base model's accuracy with the label-embedding heads."""
    from upcycle.io import atomic_write_csv
    from upcycle.pipeline import zero_shot

    if not ws.run.is_complete("zeroshot"):
        atomic_write_csv(ws.run.root / "zeroshot.csv", zero_shot(ws))
        ws.run.mark_complete("zeroshot")


def check_sources(ws, task: str, locations: Mapping[int, str]) -> None:
    """Raise ConfigError if the run imported `task`'s expert from other checkpoints."""
    from upcycle.training.finetune import expert_key

    entry = ws.run.read_manifest()["completed"].get(expert_key(KIND, task, SEED))
    if entry is None:
        return
    # JSON turns the step keys of the recorded sources into strings.
    expected = {str(step): location for step, location in locations.items()}
    if entry.get("sources") != expected:
        raise ConfigError(
            f"run directory {ws.run.root} imported the {task} expert from other checkpoints "
            f"({entry.get('sources')}, now {expected}); give a new --out RUN"
        )


def import_expert(ws, task: str, locations: Mapping[int, str]) -> None:
    """Convert one task's checkpoints to task vectors, evaluate them, and mark the expert done."""
    from upcycle.io import atomic_save_safetensors, atomic_write_csv
    from upcycle.merging.sweep import evaluate_vector, heads_for, load_expert
    from upcycle.training.finetune import checkpoint_metadata, expert_key

    key = expert_key(KIND, task, SEED)
    if ws.run.is_complete(key):
        return
    rows = []
    for step, location in sorted(locations.items()):
        path = ws.run.checkpoint_path(KIND, task, SEED, step)
        task_vector = checkpoint_task_vector(location, ws.base_state)
        metadata = {**checkpoint_metadata(ws, KIND, task, SEED, step), "source": location}
        atomic_save_safetensors(task_vector, path, metadata)
        expert = load_expert(ws, KIND, task, SEED, step)
        heads = heads_for(ws, [expert])
        for split in ("validation", "test"):
            correct = evaluate_vector(ws, expert.task_vector, heads, split)[task]
            rows.append(
                {
                    "seed": SEED,
                    "task": task,
                    "step": step,
                    "split": split,
                    "accuracy": float(correct.mean()),
                    "n": len(correct),
                }
            )
        logger.info(
            "imported %s step %d from %s: validation accuracy %.4f",
            task,
            step,
            location,
            rows[-2]["accuracy"],
        )
    accuracy_path = ws.run.expert_dir(KIND, task, SEED) / "accuracy.csv"
    atomic_write_csv(accuracy_path, pd.DataFrame(rows))
    steps = sorted(locations)
    ws.run.mark_complete(
        key,
        {"steps": steps[-1], "checkpoint_steps": steps, "sources": dict(locations)},
        files=[ws.run.checkpoint_path(KIND, task, SEED, step) for step in steps],
    )


# Command line


def add_experts_argument(parser: argparse.ArgumentParser) -> None:
    """Add --experts FILE to the parser of `upcycle merge` or `upcycle select`."""
    parser.add_argument(
        "--experts",
        metavar="FILE",
        help="experts file (YAML) listing fine-tuned Hugging Face checkpoints to import into "
        "the run directory --out RUN first, in place of an existing RUN",
    )


def run_dir_from_arguments(args: argparse.Namespace) -> str:
    """Return the run directory of `upcycle merge` or `upcycle select`, importing first.

    With --experts FILE, the checkpoints are imported into --out RUN (resuming an earlier
    import), which is returned. Otherwise the positional RUN is returned.

    Raises:
        ConfigError: If neither RUN nor --experts is given, --experts comes without --out
            or with RUN, --out comes without --experts (or --export for merge), or
            --experts is combined with --export.
    """
    experts = getattr(args, "experts", None)
    out = getattr(args, "out", None)
    if experts is None:
        if args.run_dir is None:
            raise ConfigError(
                f"upcycle {args.command} needs a run directory: give RUN, or import "
                "fine-tuned checkpoints with --experts FILE --out RUN"
            )
        if out is not None and getattr(args, "export", None) is None:
            raise ConfigError(
                "--out RUN names the run directory for --experts FILE; without --experts, "
                "give the run directory as RUN"
            )
        return args.run_dir
    if getattr(args, "export", None) is not None:
        raise ConfigError(
            "--experts cannot be combined with --export, because both use --out: import "
            "first with `upcycle merge --experts FILE --out RUN`, then export with `upcycle "
            "merge RUN --export METHOD --step N --out FILE`"
        )
    if args.run_dir is not None:
        raise ConfigError(
            f"give the run directory of --experts as --out {args.run_dir}, not as RUN; RUN "
            "is an existing run directory"
        )
    if out is None:
        raise ConfigError(
            "--experts FILE needs --out RUN, the run directory to import the checkpoints into"
        )
    return str(import_experts(experts, out, data_root=args.data))
