"""Everything a stage needs, loaded once: tasks, tokenized splits, base encoder and heads."""

from __future__ import annotations

import copy
import logging
import os
from functools import cached_property
from pathlib import Path

import torch

from upcycle.config import RunConfig
from upcycle.data import SPLITS, Task, load_task, resolve_data_root
from upcycle.errors import ConfigError
from upcycle.evaluation import TokenizedSplit, WeightLoader, tokenize_split
from upcycle.models.encoder import (
    Classifier,
    LinearHead,
    build_label_embedding_head,
    encoder_fingerprint,
    load_encoder,
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


class Workspace:
    """Loaded state shared by the stages of one run."""

    def __init__(self, config: RunConfig, run_dir: str | Path, *, data_root: str | None = None):
        self.config = config
        self.run = RunDir(run_dir)
        self.device = resolve_device(config.device)
        self.data_root = resolve_data_root(config.data.root, data_root, os.environ)
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
        return tasks

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
    def _encoder_and_tokenizer(self):
        return load_encoder(self.config.model.base)

    @property
    def tokenizer(self):
        return self._encoder_and_tokenizer[1]

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @cached_property
    def base_state(self) -> dict[str, torch.Tensor]:
        encoder = self._encoder_and_tokenizer[0]
        return {name: tensor.detach().clone() for name, tensor in encoder.state_dict().items()}

    @cached_property
    def fingerprint(self) -> str:
        return encoder_fingerprint(self.base_state)

    def fresh_encoder(self) -> torch.nn.Module:
        """Return a new copy of the base encoder on the run's device."""
        encoder = copy.deepcopy(self._encoder_and_tokenizer[0])
        encoder.load_state_dict(self.base_state)
        return encoder.to(self.device)

    @cached_property
    def eval_encoder(self) -> torch.nn.Module:
        """One encoder reused for every evaluation; weights are written into it in place."""
        return self.fresh_encoder().eval()

    @cached_property
    def weight_loader(self) -> WeightLoader:
        return WeightLoader(self.eval_encoder, {k: v.to(self.device) for k, v in self.base_state.items()})

    @cached_property
    def tokenized(self) -> dict[tuple[str, str], TokenizedSplit]:
        out = {}
        max_length = self.config.model.max_length
        for name, task in self.tasks.items():
            for split_name in SPLITS:
                split = task.splits[split_name]
                tokenized = tokenize_split(self.tokenizer, split.texts, split.labels, max_length)
                if tokenized.truncated:
                    logger.info(
                        "task %s %s: %d of %d texts truncated to %d tokens",
                        name, split_name, tokenized.truncated, len(split), max_length,
                    )
                out[(name, split_name)] = tokenized
        return out

    @cached_property
    def label_heads(self) -> dict[str, torch.nn.Module]:
        """Frozen label-embedding heads, built once from the base encoder."""
        model = self.config.model
        heads = {}
        encoder = self.fresh_encoder()
        for name, task in self.tasks.items():
            heads[name] = build_label_embedding_head(
                encoder, self.tokenizer, task.class_names,
                prompt_template=model.prompt_template, pooling=model.pooling,
                logit_scale=model.logit_scale, max_length=model.max_length, device=self.device,
            ).to(self.device)
        return heads

    def new_head(self, task: str, seed: int) -> torch.nn.Module:
        """Return the head a fine-tune of `task` starts from."""
        if self.config.model.head == "label-embedding":
            return self.label_heads[task]
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        hidden = self._encoder_and_tokenizer[0].config.hidden_size
        head = LinearHead(hidden, self.tasks[task].num_classes).to(self.device)
        torch.random.set_rng_state(generator_state)
        return head

    def classifier(self, encoder: torch.nn.Module, head: torch.nn.Module) -> Classifier:
        return Classifier(encoder, head, self.config.model.pooling)
