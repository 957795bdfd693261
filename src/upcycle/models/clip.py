"""CLIP experts: the image tower of a CLIP model, with zero-shot heads from its text tower.

The module that is fine-tuned and merged is a `CLIPVisionModelWithProjection`: the vision
transformer plus the visual projection, with the same state_dict names as in `CLIPModel`
(``vision_model.*``, ``visual_projection.weight``). The text tower is used once, to build
each task's frozen zero-shot head: the class names are put into prompt templates ("a photo
of a {}."), embedded and projected, L2-normalised, averaged over templates and normalised
again. The logits are the model's logit scale times the cosine similarity of image and
class embeddings, as in CLIP's zero-shot classification.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.data.images import ImageSplit, encode_images
from upcycle.data.tasks import Task
from upcycle.errors import ModelError
from upcycle.models.encoder import LabelEmbeddingHead, resolve_base_model
from upcycle.models.family import ModelFamily

logger = logging.getLogger(__name__)


def load_clip(name: str) -> tuple[nn.Module, Any, Any]:
    """Load a `CLIPModel`, its tokenizer and its image processor by hub id or folder, in float32.

    Raises:
        ModelError: the model cannot be found or loaded, or is not a CLIP model.
    """
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    location = resolve_base_model(name)
    try:
        clip = CLIPModel.from_pretrained(location, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(location)
        processor = AutoImageProcessor.from_pretrained(location)
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(
            f"failed to load CLIP model {name!r} from {location}: {error}. Give a folder with "
            "a CLIPModel's config.json, weights, tokenizer and preprocessor_config.json, or a "
            "hub id on a machine with hub access"
        ) from error
    return clip.eval(), tokenizer, processor


def vision_tower(clip: nn.Module) -> nn.Module:
    """Return a `CLIPVisionModelWithProjection` that shares the image tower of `clip`.

    The new module's projection width is the CLIP model's ``projection_dim``, because the
    vision config's own ``projection_dim`` may differ from it in saved CLIP configs.
    """
    from transformers import CLIPVisionModelWithProjection

    vision_config = clip.config.vision_config.__class__.from_dict(
        {**clip.config.vision_config.to_dict(), "projection_dim": clip.config.projection_dim}
    )
    tower = CLIPVisionModelWithProjection(vision_config)
    tower.vision_model = clip.vision_model
    tower.visual_projection = clip.visual_projection
    return tower.eval()


@torch.inference_mode()
def clip_text_embeddings(
    clip: nn.Module, tokenizer, texts: Sequence[str], *, device: torch.device, batch_size: int = 256
) -> torch.Tensor:
    """Embed texts with the text tower and text projection into [N, P] float32 on the CPU."""
    text_model = clip.text_model.to(device)
    projection = clip.text_projection.to(device)
    max_length = clip.config.text_config.max_position_embeddings
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        pooled = text_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).pooler_output
        out.append(projection(pooled).float().cpu())
    return torch.cat(out)


def zero_shot_class_embeddings(
    clip: nn.Module,
    tokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    *,
    device: torch.device,
) -> torch.Tensor:
    """Return the zero-shot class embeddings [C, P], L2-normalised.

    Each class name is put into every template. The prompt embeddings are normalised,
    averaged over templates, and normalised again.
    """
    prompts = [template.format(name) for name in class_names for template in templates]
    embeddings = clip_text_embeddings(clip, tokenizer, prompts, device=device)
    # Normalise each prompt, average over the templates of a class, normalise the mean.
    embeddings = F.normalize(embeddings, dim=-1).view(len(class_names), len(templates), -1)
    return F.normalize(embeddings.mean(dim=1), dim=-1)


def clip_logit_scale(clip: nn.Module, setting: float | str) -> float:
    """Return the head's logit scale: exp(clip.logit_scale) for 'model', else `setting`."""
    if setting == "model":
        return float(clip.logit_scale.detach().exp())
    return float(setting)


class ImageClassifier(nn.Module):
    """Image tower and head. `forward` returns logits [B, C] and the head's input [B, P]."""

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Classify images: pixel_values [B, 3, H, W] normalised as the image processor does."""
        image_embeds = self.encoder(pixel_values=pixel_values).image_embeds
        features = self.head.features(image_embeds)
        return self.head(features), features


class ClipFamily(ModelFamily):
    """CLIP image towers with zero-shot heads from the text tower."""

    name = "clip"

    @property
    def clip_model(self) -> nn.Module:
        """The whole `CLIPModel`, whose image tower `base_model` shares."""
        return self._parts[0]

    @property
    def image_processor(self) -> Any:
        return self._parts[2]

    @cached_property
    def _parts(self) -> tuple[nn.Module, Any, Any]:
        return load_clip(self.config.base)

    def load(self) -> tuple[nn.Module, Any]:
        clip, tokenizer, _ = self._parts
        return vision_tower(clip), tokenizer

    @property
    def feature_size(self) -> int:
        return self.clip_model.config.projection_dim

    def encode_split(self, task: Task, split: str) -> ImageSplit:
        return encode_images(
            self.image_processor, task.splits[split], task=task.name, split_name=split
        )

    def zero_shot_heads(
        self, tasks: Mapping[str, Task], device: torch.device
    ) -> dict[str, nn.Module]:
        scale = clip_logit_scale(self.clip_model, self.config.logit_scale)
        heads = {}
        for name, task in tasks.items():
            embeddings = zero_shot_class_embeddings(
                self.clip_model,
                self.tokenizer,
                task.class_names,
                self.templates(name),
                device=device,
            )
            heads[name] = LabelEmbeddingHead(embeddings, scale).to(device)
        # The text tower is only needed for the heads; keep it off the accelerator.
        self.clip_model.text_model.to("cpu")
        self.clip_model.text_projection.to("cpu")
        return heads

    def classifier(self, encoder: nn.Module, head: nn.Module) -> ImageClassifier:
        return ImageClassifier(encoder, head)

    def routing_mask(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Return ones [B, patches + 1]: every patch token and the class token is routed."""
        vision = self.clip_model.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2 + 1
        pixel_values = inputs["pixel_values"]
        return torch.ones(
            pixel_values.shape[0], tokens, dtype=torch.long, device=pixel_values.device
        )

    def mixture_logits(
        self,
        encoder: nn.Module,
        heads: Sequence[nn.Module],
        inputs: Mapping[str, torch.Tensor],
        segments: Sequence[tuple[int, int]],
    ) -> list[torch.Tensor]:
        image_embeds = encoder(pixel_values=inputs["pixel_values"]).image_embeds
        return [
            head(head.features(image_embeds[start:stop]))
            for head, (start, stop) in zip(heads, segments, strict=True)
        ]
