"""The seam between model families: loading, input encoding, zero-shot heads and classifiers.

A family (``model.family`` in the run config) supplies everything that depends on the kind of
base model. Every later stage (fine-tuning, merging, LoRA, MoE, difficulty recording,
stopping rules, the report) uses only what the family returns:

- `ModelFamily.base_model`: the module that is fine-tuned and merged. Task vectors and LoRA
  adapters are keyed by its state_dict names. It is a text encoder (`AutoModel`), the image
  tower of a CLIP model (`CLIPVisionModelWithProjection`) or a causal language model
  (`AutoModelForCausalLM`).
- `ModelFamily.encode_split`: a split encoded once, a `TokenizedSplit` or an `ImageSplit`.
  `upcycle.evaluation.collate` turns examples of it into a batch: the model inputs plus
  ``labels`` [B] and ``indices`` [B].
- `ModelFamily.classifier`: a module with ``encoder`` and ``head`` attributes whose
  ``forward(**inputs)`` returns (logits [B, C], features [B, D]), where features is the
  head's input. Heads carry ``logit_scale`` and ``has_bias`` for the difficulty recorder.
"""

from __future__ import annotations

import copy
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.config import ModelConfig
from upcycle.data.images import ImageSplit
from upcycle.data.tasks import Task
from upcycle.errors import ConfigError
from upcycle.evaluation import TokenizedSplit, tokenize_split
from upcycle.models.encoder import (
    Classifier,
    LabelEmbeddingHead,
    build_label_embedding_head,
    embed_texts,
    load_encoder,
    pool,
)

logger = logging.getLogger(__name__)

EncodedSplit = TokenizedSplit | ImageSplit


def class_templates_for(task_templates: list[str] | None, model: ModelConfig) -> list[str]:
    """Return a task's class-name templates: its own, else the model's class_templates, else
    [prompt_template]."""
    if task_templates:
        return list(task_templates)
    if model.class_templates:
        return list(model.class_templates)
    return [model.prompt_template]


def tied_parameter_names(module: nn.Module) -> list[str]:
    """Return the state_dict names that share storage with an earlier name (tied weights).

    A causal language model with tied input and output embeddings lists one tensor under
    both ``model.embed_tokens.weight`` and ``lm_head.weight``. Dropping the later name keys
    each trained tensor once in task vectors and checkpoints.
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    tied = []
    for name, tensor in module.state_dict(keep_vars=True).items():
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            tied.append(name)
        seen.add(key)
    return tied


class ModelFamily(ABC):
    """Model-specific loading, encoding, heads and classifier of one base model.

    The base model is loaded once, on first use, in float32, in eval mode on the CPU, and
    is never changed: callers deep-copy it before training.

    Args:
        config: the run's model section.
        class_templates: class-name templates of each task, by task name. Tasks missing
            here use `class_templates_for(None, config)`.
    """

    name: ClassVar[str]

    def __init__(
        self, config: ModelConfig, class_templates: Mapping[str, list[str]] | None = None
    ) -> None:
        self.config = config
        self.class_templates = dict(class_templates or {})

    def templates(self, task: str) -> list[str]:
        return self.class_templates.get(task) or class_templates_for(None, self.config)

    @cached_property
    def _loaded(self) -> tuple[nn.Module, Any]:
        module, tokenizer = self.load()
        return module.eval(), tokenizer

    @property
    def base_model(self) -> nn.Module:
        """The pristine base module that experts fine-tune and merges are applied to."""
        return self._loaded[0]

    @property
    def tokenizer(self) -> Any:
        return self._loaded[1]

    @abstractmethod
    def load(self) -> tuple[nn.Module, Any]:
        """Load the base module and its tokenizer from ``config.base``.

        Raises:
            ModelError: the model cannot be found or loaded.
        """

    @property
    @abstractmethod
    def feature_size(self) -> int:
        """Width D of the features a linear head reads."""

    @abstractmethod
    def encode_split(self, task: Task, split: str) -> EncodedSplit:
        """Encode one split of a task once: token ids or preprocessed pixels, with labels."""

    @abstractmethod
    def zero_shot_heads(
        self, tasks: Mapping[str, Task], device: torch.device
    ) -> dict[str, nn.Module]:
        """Build each task's frozen zero-shot head from its class names, on `device`."""

    @abstractmethod
    def classifier(self, encoder: nn.Module, head: nn.Module) -> nn.Module:
        """Return the classifier of `encoder` (the base module or a copy) and a head."""

    @abstractmethod
    def mixture_logits(
        self,
        encoder: nn.Module,
        heads: Sequence[nn.Module],
        inputs: Mapping[str, torch.Tensor],
        segments: Sequence[tuple[int, int]],
    ) -> list[torch.Tensor]:
        """Classify a batch that mixes several tasks with one forward pass of `encoder`.

        Rows [start, stop) of segment i belong to the task of `heads[i]`. A batch made by
        `upcycle.evaluation.concat_batches` has this layout. One pass means that MoE layers
        route all the rows together, so their load-balancing loss covers the whole mixture.

        Returns:
            the logits [stop - start, C_i] of each segment.
        """

    def routing_mask(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return the mask [B, L] of the tokens that the encoder's MoE layers route for `inputs`.

        L is the number of tokens per example in the layers' [B, L] order, so
        ``routing_mask(inputs).reshape(-1)`` is the token mask of the load-balancing loss
        and the router statistics. Padding tokens are 0. This default returns the batch's
        attention mask.
        """
        return inputs["attention_mask"]


class EncoderFamily(ModelFamily):
    """Text encoders (`transformers.AutoModel`) with pooled embeddings."""

    name = "encoder"

    def load(self) -> tuple[nn.Module, Any]:
        return load_encoder(self.config.base)

    @property
    def feature_size(self) -> int:
        return self.base_model.config.hidden_size

    def encode_split(self, task: Task, split: str) -> TokenizedSplit:
        data = task.splits[split]
        texts = data.texts
        if self.config.input_template != "{}":
            texts = [self.config.input_template.format(text) for text in texts]
        max_length = self.config.max_length
        tokenized = tokenize_split(self.tokenizer, texts, data.labels, max_length)
        if tokenized.truncated:
            logger.info(
                "task %s %s: %d of %d texts truncated to %d tokens",
                task.name,
                split,
                tokenized.truncated,
                len(data),
                max_length,
            )
        return tokenized

    def zero_shot_heads(
        self, tasks: Mapping[str, Task], device: torch.device
    ) -> dict[str, nn.Module]:
        model = self.config
        encoder = copy.deepcopy(self.base_model).to(device)
        heads = {}
        for name, task in tasks.items():
            templates = self.templates(name)
            if len(templates) == 1:
                heads[name] = build_label_embedding_head(
                    encoder,
                    self.tokenizer,
                    task.class_names,
                    prompt_template=templates[0],
                    pooling=model.pooling,
                    logit_scale=model.logit_scale,
                    max_length=model.max_length,
                    device=device,
                ).to(device)
                continue
            # Several templates: average the normalised embeddings of every template.
            prompts = [template.format(c) for c in task.class_names for template in templates]
            embeddings = embed_texts(
                encoder,
                self.tokenizer,
                prompts,
                pooling=model.pooling,
                max_length=model.max_length,
                device=device,
            )
            embeddings = F.normalize(embeddings, dim=-1).view(task.num_classes, len(templates), -1)
            heads[name] = LabelEmbeddingHead(embeddings.mean(1), model.logit_scale).to(device)
        return heads

    def classifier(self, encoder: nn.Module, head: nn.Module) -> Classifier:
        return Classifier(encoder, head, self.config.pooling)

    def mixture_logits(
        self,
        encoder: nn.Module,
        heads: Sequence[nn.Module],
        inputs: Mapping[str, torch.Tensor],
        segments: Sequence[tuple[int, int]],
    ) -> list[torch.Tensor]:
        mask = inputs["attention_mask"]
        hidden = encoder(input_ids=inputs["input_ids"], attention_mask=mask).last_hidden_state
        pooled = pool(hidden, mask, self.config.pooling)
        return [
            head(head.features(pooled[start:stop]))
            for head, (start, stop) in zip(heads, segments, strict=True)
        ]


def build_family(
    config: ModelConfig, class_templates: Mapping[str, list[str]] | None = None
) -> ModelFamily:
    """Return the `ModelFamily` that ``config.family`` names.

    Raises:
        ConfigError: for an unknown family.
    """
    if config.family == "encoder":
        return EncoderFamily(config, class_templates)
    if config.family == "clip":
        from upcycle.models.clip import ClipFamily

        return ClipFamily(config, class_templates)
    if config.family == "decoder":
        from upcycle.models.decoder import DecoderFamily

        return DecoderFamily(config, class_templates)
    raise ConfigError(
        f"unknown model.family {config.family!r}; supported: 'encoder', 'clip', 'decoder'"
    )
