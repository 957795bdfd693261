"""Everything a stage needs, loaded once: tasks, encoded splits, base model and heads."""

from __future__ import annotations

import copy
import logging
import os
from functools import cached_property
from pathlib import Path

import torch

from upcycle.config import RunConfig
from upcycle.data import SPLITS, Task, load_task, resolve_data_root
from upcycle.errors import ConfigError, DataError
from upcycle.evaluation import WeightLoader
from upcycle.models.encoder import LinearHead, encoder_fingerprint
from upcycle.models.family import (
    EncodedSplit,
    ModelFamily,
    build_family,
    class_templates_for,
    tied_parameter_names,
)
from upcycle.store import RunDir

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"device {name!r} is invalid; use 'auto', 'cpu' or 'cuda:N'") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use 'cpu'")
    return device


def warn_classes_without_examples(task: Task) -> None:
    """Log a warning for each split of `task` that lacks some of its classes."""
    for split_name in SPLITS:
        present = set(task.splits[split_name].labels)
        missing = [name for i, name in enumerate(task.class_names) if i not in present]
        if missing:
            logger.warning(
                "task %s: the %s split has no examples of classes %s; check its labels "
                "against the class list",
                task.name,
                split_name,
                missing,
            )


class Workspace:
    """Loaded state shared by the stages of one run."""

    def __init__(self, config: RunConfig, run_dir: str | Path, *, data_root: str | None = None):
        self.config = config
        self.run = RunDir(run_dir)
        self.device = resolve_device(config.device)
        # Without data.root, --data or UPCYCLE_DATA, a command on an existing run reads the
        # data folder that the run recorded when it started.
        self.data_root = resolve_data_root(config.data.root, data_root, os.environ)
        if self.data_root is None:
            self.data_root = self.run.recorded_data_root()
        self.task_names = [source.name for source in config.data.tasks]

    @cached_property
    def tasks(self) -> dict[str, Task]:
        limits = {
            "train": self.config.data.max_train_examples,
            "validation": self.config.data.max_validation_examples,
            "test": self.config.data.max_test_examples,
        }
        tasks = {}
        for source in self.config.data.tasks:
            tasks[source.name] = load_task(
                source, data_root=self.data_root, max_examples=limits,
                seed=self.config.data.subsample_seed,
            )
            sizes = ", ".join(f"{s} {len(tasks[source.name].splits[s])}" for s in SPLITS)
            logger.info("task %s: %d classes; %s", source.name, tasks[source.name].num_classes, sizes)
        prune = self.config.data.prune
        if prune is not None and prune.run is not None:
            from upcycle.analysis.pruning import prune_tasks

            tasks = prune_tasks(tasks, self.config.data, input_files=self.input_files())
        for task in tasks.values():
            warn_classes_without_examples(task)
        return tasks

    def check_train_sizes(self) -> None:
        """Check that every task has at least one batch of training examples.

        Raises:
            DataError: naming each task whose train split is smaller than
                training.batch_size, with its size and the fix.
        """
        batch_size = self.config.training.batch_size
        sizes = {name: len(task.splits["train"]) for name, task in self.tasks.items()}
        small = {name: size for name, size in sizes.items() if size < batch_size}
        if small:
            listed = ", ".join(f"task '{name}' has {size}" for name, size in small.items())
            raise DataError(
                f"train split smaller than one batch: {listed} training examples, fewer than "
                f"training.batch_size ({batch_size}). Set training.batch_size to at most "
                f"{min(small.values())}, or give the task more training examples (see also "
                "data.max_train_examples)"
            )

    def input_files(self) -> list[Path]:
        """Local files the tasks were read from, hashed into the manifest."""
        files = []
        for source in self.config.data.tasks:
            if source.format == "hf":
                continue
            folder = Path(source.path) if source.path else None
            if folder is None and self.data_root is not None:
                folder = self.data_root / source.name
            elif folder is not None and not folder.is_absolute() and self.data_root is not None:
                folder = self.data_root / folder
            if folder is not None and folder.is_dir():
                files += sorted(p for p in folder.iterdir() if p.is_file())
        return files

    @cached_property
    def family(self) -> ModelFamily:
        """The model family's loading, encoding, heads and classifier (model.family)."""
        templates = {
            source.name: class_templates_for(source.class_templates, self.config.model)
            for source in self.config.data.tasks
        }
        return build_family(self.config.model, templates)

    @cached_property
    def _encoder_and_tokenizer(self):
        return self.family.base_model, self.family.tokenizer

    @property
    def tokenizer(self):
        return self._encoder_and_tokenizer[1]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @cached_property
    def tied_names(self) -> list[str]:
        """State names of the base model that repeat a tied tensor; task vectors omit them."""
        return tied_parameter_names(self._encoder_and_tokenizer[0])

    @cached_property
    def base_state(self) -> dict[str, torch.Tensor]:
        encoder = self._encoder_and_tokenizer[0]
        tied = set(self.tied_names)
        return {
            name: tensor.detach().clone()
            for name, tensor in encoder.state_dict().items()
            if name not in tied
        }

    @cached_property
    def fingerprint(self) -> str:
        return encoder_fingerprint(self.base_state)

    def fresh_encoder(self) -> torch.nn.Module:
        """Return a new copy of the base encoder on the run's device."""
        encoder = copy.deepcopy(self._encoder_and_tokenizer[0])
        # Tied names are left out of base_state; loading their partner sets them too.
        encoder.load_state_dict(self.base_state, strict=not self.tied_names)
        return encoder.to(self.device)

    @cached_property
    def eval_encoder(self) -> torch.nn.Module:
        """One encoder reused for every evaluation; weights are written into it in place."""
        return self.fresh_encoder().eval()

    @cached_property
    def weight_loader(self) -> WeightLoader:
        return WeightLoader(self.eval_encoder, {k: v.to(self.device) for k, v in self.base_state.items()})

    @cached_property
    def tokenized(self) -> dict[tuple[str, str], EncodedSplit]:
        """Every split encoded once: token ids, or preprocessed pixels for image tasks."""
        return {
            (name, split_name): self.family.encode_split(task, split_name)
            for name, task in self.tasks.items()
            for split_name in SPLITS
        }

    @cached_property
    def label_heads(self) -> dict[str, torch.nn.Module]:
        """Frozen zero-shot heads built once from the class names, on the run's device."""
        return self.family.zero_shot_heads(self.tasks, self.device)

    def new_head(self, task: str, seed: int) -> torch.nn.Module:
        """Return the head a fine-tune of `task` starts from."""
        if self.config.model.head == "label-embedding":
            return self.label_heads[task]
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        head = LinearHead(self.family.feature_size, self.tasks[task].num_classes).to(self.device)
        torch.random.set_rng_state(generator_state)
        return head

    def classifier(self, encoder: torch.nn.Module, head: torch.nn.Module) -> torch.nn.Module:
        """Return the family's classifier: forward(**inputs) -> (logits [B, C], features [B, D])."""
        return self.family.classifier(encoder, head)
