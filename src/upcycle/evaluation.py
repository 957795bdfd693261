"""Tokenized splits and fast evaluation of many encoder weights on many tasks.

Each split is encoded once (token ids, or preprocessed pixels for image models).
Evaluation sorts examples by length so every batch is padded only to its own
longest text, runs under `torch.inference_mode`, and reuses one encoder object:
a merged model is evaluated by writing base plus task vector into that object's
parameters in place.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from upcycle.data.images import ImageSplit
from upcycle.models.encoder import Classifier

logger = logging.getLogger(__name__)

NON_INPUT_KEYS = ("labels", "indices")
"""Entries of a `collate` batch that are not classifier inputs."""


@dataclass
class TokenizedSplit:
    """Token ids of one split, unpadded, with labels; ids[i] is a 1-D LongTensor."""

    ids: list[torch.Tensor]
    labels: torch.Tensor
    truncated: int

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), dtype=np.int64, count=len(self.ids))

    def subset(self, indices: np.ndarray | list[int]) -> TokenizedSplit:
        """Return the examples at `indices` as a new split, in that order."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        rows = [self.ids[i] for i in index.tolist()]
        return TokenizedSplit(ids=rows, labels=self.labels[index], truncated=0)


def tokenize_split(tokenizer, texts: list[str], labels: list[int], max_length: int) -> TokenizedSplit:
    """Tokenize texts once, truncating to `max_length` tokens and counting truncated texts."""
    encoded = tokenizer(texts, truncation=False, add_special_tokens=True)["input_ids"]
    ids = []
    truncated = 0
    for tokens in encoded:
        if len(tokens) > max_length:
            truncated += 1
            # Keep the leading tokens and the final separator token, as truncation=True does.
            tokens = tokens[: max_length - 1] + tokens[-1:]
        ids.append(torch.tensor(tokens, dtype=torch.long))
    return TokenizedSplit(ids=ids, labels=torch.tensor(labels, dtype=torch.long), truncated=truncated)


def collate(
    split: TokenizedSplit | ImageSplit, indices: np.ndarray | list[int], pad_id: int
) -> dict[str, torch.Tensor]:
    """Batch the examples at `indices`: the model inputs plus labels [B] and indices [B].

    Token ids are right-padded with `pad_id` to the batch's longest example (input_ids and
    attention_mask [B, T]). An `ImageSplit` gives pixel_values [B, 3, H, W].
    """
    if isinstance(split, ImageSplit):
        return split.collate(indices)
    rows = [split.ids[i] for i in indices]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = row
        attention_mask[i, : len(row)] = 1
    index_tensor = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": split.labels[index_tensor],
        "indices": index_tensor,
    }


def concat_batches(
    batches: Sequence[Mapping[str, torch.Tensor]], pad_id: int
) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Stack `collate` batches (of one task each) into one batch, in order.

    Token ids and attention masks are right-padded to the widest batch, and every other
    entry is concatenated along the batch dimension.

    Returns:
        the batch and the row range [start, stop) of each input batch, in the layout that
        `ModelFamily.mixture_logits` takes.

    Raises:
        ValueError: for no batches or batches with different entries.
    """
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    keys = set(batches[0])
    for number, batch in enumerate(batches):
        if set(batch) != keys:
            raise ValueError(
                f"batch {number} has entries {sorted(batch)}, batch 0 has {sorted(keys)}; "
                "stack only batches that collate made from splits of one model family"
            )
    pad_values = {"input_ids": pad_id, "attention_mask": 0}
    merged = {}
    for key in batches[0]:
        parts = [batch[key] for batch in batches]
        if key in pad_values:
            width = max(part.shape[1] for part in parts)
            parts = [
                F.pad(part, (0, width - part.shape[1]), value=pad_values[key]) for part in parts
            ]
        merged[key] = torch.cat(parts)
    bounds = np.cumsum([0] + [len(batch["labels"]) for batch in batches]).tolist()
    return merged, list(itertools.pairwise(bounds))


def model_inputs(
    batch: Mapping[str, torch.Tensor], device: torch.device
) -> dict[str, torch.Tensor]:
    """Return the entries of a `collate` batch that the classifier takes, moved to `device`."""
    return {name: value.to(device) for name, value in batch.items() if name not in NON_INPUT_KEYS}


@torch.inference_mode()
def predict(
    classifier: Classifier,
    split: TokenizedSplit | ImageSplit,
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    return_probabilities: bool = False,
) -> np.ndarray:
    """Return predicted labels [N] (or softmax probabilities [N, C]) in the split's order."""
    was_training = classifier.training
    classifier.eval()
    order = np.argsort(-split.lengths(), kind="stable")
    outputs: list[torch.Tensor] = []
    for start in range(0, len(order), batch_size):
        batch = collate(split, order[start : start + batch_size], pad_id)
        logits, _ = classifier(**model_inputs(batch, device))
        logits = logits.float()
        outputs.append((logits.softmax(-1) if return_probabilities else logits.argmax(-1)).cpu())
    classifier.train(was_training)
    stacked = torch.cat(outputs).numpy()
    result = np.empty_like(stacked)
    result[order] = stacked
    return result


def correct_mask(
    classifier: Classifier,
    split: TokenizedSplit | ImageSplit,
    *,
    pad_id: int,
    batch_size: int,
    device,
) -> np.ndarray:
    predictions = predict(classifier, split, pad_id=pad_id, batch_size=batch_size, device=device)
    return predictions == split.labels.numpy()


class WeightLoader:
    """Writes base + task vector into one encoder's parameters in place.

    The base weights are kept once, on the same device as the encoder. Parameters
    missing from a task vector are reset to the base value.
    """

    def __init__(self, encoder: nn.Module, base_state: Mapping[str, torch.Tensor]) -> None:
        self.encoder = encoder
        self.params = dict(encoder.state_dict(keep_vars=True))
        self.base = {name: tensor.detach().clone() for name, tensor in base_state.items()}
        unknown = sorted(set(self.base) - set(self.params))
        if unknown:
            raise ValueError(f"base state has keys the encoder lacks: {unknown[:5]}")

    @torch.no_grad()
    def load(self, task_vector: Mapping[str, torch.Tensor] | None, coefficient: float = 1.0) -> None:
        from upcycle.errors import CheckpointError

        task_vector = task_vector or {}
        extra = sorted(set(task_vector) - set(self.base))
        if extra:
            raise CheckpointError(
                f"task vector has parameters the base model lacks, e.g. {extra[:3]}: it was "
                "fine-tuned from another base model"
            )
        for name, base in self.base.items():
            target = self.params[name]
            delta = task_vector.get(name)
            if delta is None:
                target.copy_(base)
                continue
            if delta.shape != base.shape:
                raise CheckpointError(
                    f"task vector tensor {name} has shape {tuple(delta.shape)} but the base "
                    f"model's is {tuple(base.shape)}: it was fine-tuned from another base model"
                )
            target.copy_(base + coefficient * delta.to(base.device, base.dtype))


def evaluate_tasks(
    classifier_for: Mapping[str, Classifier],
    splits: Mapping[tuple[str, str], TokenizedSplit | ImageSplit],
    *,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    progress: bool = False,
) -> dict[tuple[str, str], np.ndarray]:
    """Return the boolean correctness array of each (task, split) with the weights currently loaded."""
    results = {}
    items = list(splits.items())
    for (task, split_name), split in tqdm(items, desc="evaluate", disable=not progress, leave=False):
        results[(task, split_name)] = correct_mask(
            classifier_for[task], split, pad_id=pad_id, batch_size=batch_size, device=device
        )
    return results
