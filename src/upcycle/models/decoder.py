"""Decoder language models as classifiers: each class scored by the log-likelihood of its name.

An example's prompt is its text in ``model.input_template`` ("Text: {}\\nLabel:"). The
logit of class c is the summed log-probability of the tokens of its name in
``prompt_template`` (" {}") following the prompt:

    logits[b, c] = logit_scale * sum_j log p(name_c[j] | prompt_b, name_c[:j])

Packed scoring computes all C continuations in one forward pass per example. Each row of a
batch is the prompt followed by the class block, the tokens of every class name one after
another (the same block for every example of a task, appended when the split is encoded).
A 4-D attention mask lets each class name's tokens attend to the prompt and to the earlier
tokens of the same name only, and their position ids continue from the end of the prompt.
So the hidden states of each class name equal those of a separate pass over prompt + name,
and the prompt is run once instead of C times. The rows are ordinary right-padded token ids with a
2-D attention mask, so batching, per-example gradients and the MoE router's token mask
treat them like any text batch.

The features handed to the difficulty recorder are the final hidden state at the last
prompt token [B, D], the state that predicts the first token of every class name.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from upcycle.data.tasks import Task
from upcycle.errors import ModelError
from upcycle.evaluation import TokenizedSplit
from upcycle.models.encoder import resolve_base_model
from upcycle.models.family import ModelFamily

logger = logging.getLogger(__name__)


def load_decoder(name: str) -> tuple[nn.Module, Any]:
    """Load an `AutoModelForCausalLM` and its tokenizer by hub id or folder, in float32.

    Raises:
        ModelError: the model cannot be found or loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = resolve_base_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"failed to load decoder {name!r} from {location}: {error}. Give a local folder "
            "with a causal language model's config.json, weights and tokenizer, or a hub id on "
            "a machine with hub access"
        ) from error
    if model.config._attn_implementation not in ("eager", "sdpa"):
        raise ModelError(
            f"decoder {name!r} uses attention {model.config._attn_implementation!r}, which "
            "ignores the 4-D attention mask of packed class scoring; load it with 'sdpa' or "
            "'eager' attention"
        )
    return model.eval(), tokenizer


@dataclass(frozen=True)
class ClassBlock:
    """The tokens of every class name of a task, one name after another.

    ids [K] are the token ids, classes [K] the class of each token and offsets [K] each
    token's position within its class name (0 for the first token).
    """

    ids: torch.Tensor
    classes: torch.Tensor
    offsets: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def class_block(tokenizer, class_names: Sequence[str], template: str) -> ClassBlock:
    """Tokenize each class name in `template` (without special tokens) into one block.

    Raises:
        ModelError: a class name that tokenizes to no tokens.
    """
    ids, classes, offsets = [], [], []
    for index, name in enumerate(class_names):
        tokens = tokenizer(template.format(name), add_special_tokens=False)["input_ids"]
        if not tokens:
            raise ModelError(
                f"class name {name!r} in template {template!r} has no tokens; change the "
                "class name or model.prompt_template"
            )
        ids += tokens
        classes += [index] * len(tokens)
        offsets += range(len(tokens))
    return ClassBlock(
        *(torch.tensor(values, dtype=torch.long) for values in (ids, classes, offsets))
    )


def encode_prompts(
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    *,
    input_template: str,
    max_length: int,
    block: ClassBlock | None,
) -> TokenizedSplit:
    """Tokenize each text in `input_template` and append the class block, if given.

    A prompt longer than `max_length` tokens keeps its first tokens and the tokens of the
    template's end (after the {}), so the cut falls inside the text.

    Raises:
        ModelError: `max_length` leaves no room for the text after the template's end.
    """
    suffix = input_template.split("{}", 1)[1]
    suffix_length = len(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else 0
    if suffix_length >= max_length:
        raise ModelError(
            f"model.max_length ({max_length}) must exceed the {suffix_length} tokens of the "
            f"input template's end {suffix!r}; raise max_length"
        )
    prompts = [input_template.format(text) for text in texts]
    encoded = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    tail = block.ids.tolist() if block is not None else []
    ids = []
    truncated = 0
    for tokens in encoded:
        if len(tokens) > max_length:
            truncated += 1
            # NOTE: the end is the template end tokenized alone, so a BPE merge across the
            # cut can make the kept end differ slightly from the template end in context.
            end = tokens[len(tokens) - suffix_length :] if suffix_length else []
            tokens = tokens[: max_length - suffix_length] + end
        ids.append(torch.tensor(tokens + tail, dtype=torch.long))
    labels_tensor = torch.tensor(list(labels), dtype=torch.long)
    return TokenizedSplit(ids=ids, labels=labels_tensor, truncated=truncated)


class ClassNameScorer(nn.Module):
    """A frozen head that scores each class by the log-likelihood of its name's tokens.

    It holds one task's class block. Its `logit_scale` multiplies the log-likelihoods, and
    it has no bias. Use it only with splits encoded with the same block (`DecoderFamily`
    pairs them by task).
    """

    has_bias = False

    def __init__(self, block: ClassBlock, num_classes: int, *, logit_scale: float = 1.0) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.logit_scale = float(logit_scale)
        self.register_buffer("block_ids", block.ids.clone())
        self.register_buffer("block_classes", block.classes.clone())
        self.register_buffer("block_offsets", block.offsets.clone())
        # The hidden state that predicts block token r sits `predictor[r]` positions after
        # the prompt's end: the last prompt token (-1) for a name's first token, else the
        # previous block token (r - 1). Offsets are deduplicated into `predictor_offsets`,
        # and `predictor_column[r]` indexes them.
        positions = torch.arange(len(block))
        predictor = torch.where(block.offsets == 0, -1, positions - 1)
        unique, column = torch.unique(predictor, sorted=True, return_inverse=True)
        self.register_buffer("predictor_offsets", unique)
        self.register_buffer("predictor_column", column)

    @property
    def block_length(self) -> int:
        return int(self.block_ids.numel())

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden


def causal_lm(module: nn.Module) -> nn.Module:
    """Return the causal language model inside a PEFT wrapper, or `module` itself."""
    from peft import PeftModel

    return module.get_base_model() if isinstance(module, PeftModel) else module


def packed_attention(
    attention_mask: torch.Tensor, scorer: ClassNameScorer, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build the 4-D additive attention mask and position ids of packed class scoring.

    Args:
        attention_mask: [B, T] right-padded mask of rows that end with the class block.
        scorer: the head holding the block.
        dtype: dtype of the model's hidden states, which the mask takes too.

    Returns:
        mask [B, 1, T, T] (0 where a query may attend, the dtype's minimum elsewhere),
        position_ids [B, T], and the prompt lengths [B].
    """
    width = attention_mask.shape[1]
    device = attention_mask.device
    block_length = scorer.block_length
    prompt_lengths = attention_mask.sum(dim=1) - block_length
    steps = torch.arange(width, device=device)
    # Position relative to the block start: negative in the prompt, >= K in the padding.
    relative = steps[None, :] - prompt_lengths[:, None]
    in_block = (relative >= 0) & (relative < block_length)
    block_index = relative.clamp(0, block_length - 1)
    # Segment 0 is the prompt, c + 1 the name of class c, -1 the padding.
    segment = torch.where(
        relative < 0, 0, torch.where(in_block, scorer.block_classes[block_index] + 1, -1)
    )
    position_ids = torch.where(
        in_block, prompt_lengths[:, None] + scorer.block_offsets[block_index], steps[None, :]
    )
    causal = steps[None, :] <= steps[:, None]
    key_segment = segment[:, None, :]
    visible = (key_segment == 0) | (key_segment == segment[:, :, None])
    allowed = causal[None] & visible & (key_segment != -1)
    # Padding queries see only themselves, so no row of the mask is empty.
    allowed = allowed | torch.eye(width, dtype=torch.bool, device=device)[None]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return mask[:, None], position_ids, prompt_lengths


def class_log_likelihoods(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    scorer: ClassNameScorer,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every class name after every prompt in one forward pass.

    Args:
        model: a causal language model (or a PEFT wrapper of one).
        input_ids: [B, T] rows of prompt + class block, right-padded.
        attention_mask: [B, T] 2-D mask of those rows.
        scorer: the head holding the class block.

    Returns:
        log-likelihoods [B, C] (float32, summed over each name's tokens) and the final
        hidden state at each row's last prompt token [B, D].
    """
    segments = [(scorer, 0, input_ids.shape[0])]
    return segment_log_likelihoods(model, input_ids, attention_mask, segments)[0]


def segment_log_likelihoods(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    segments: Sequence[tuple[ClassNameScorer, int, int]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Score a batch whose rows [start, stop) end with the class block of their scorer.

    One forward pass serves every segment, so rows of several tasks can share a batch.
    The segments must cover the rows in order.

    Returns:
        per segment, log-likelihoods [stop - start, C] and last-prompt states [stop - start, D].
    """
    lm = causal_lm(model)
    dtype = lm.get_input_embeddings().weight.dtype
    masks, positions, prompt_lengths = [], [], []
    for scorer, start, stop in segments:
        mask, position_ids, lengths = packed_attention(attention_mask[start:stop], scorer, dtype)
        masks.append(mask)
        positions.append(position_ids)
        prompt_lengths.append(lengths)
    hidden = lm.base_model(
        input_ids=input_ids,
        attention_mask=torch.cat(masks),
        position_ids=torch.cat(positions),
        use_cache=False,
    ).last_hidden_state
    output_embeddings = lm.get_output_embeddings()
    softcap = getattr(lm.config, "final_logit_softcapping", None)
    results = []
    for (scorer, start, stop), lengths in zip(segments, prompt_lengths, strict=True):
        # Hidden states that predict block tokens [b, K', D]; column 0 is the last prompt token.
        offsets = lengths[:, None] + scorer.predictor_offsets[None, :]
        segment_hidden = hidden[start:stop]
        predictors = segment_hidden.gather(
            1, offsets[..., None].expand(-1, -1, segment_hidden.shape[-1])
        )
        logits = output_embeddings(predictors).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        # log p(token) = the token's logit - logsumexp over the vocabulary.
        token_logits = logits[:, scorer.predictor_column, scorer.block_ids]
        normalizers = torch.logsumexp(logits, dim=-1)[:, scorer.predictor_column]
        token_log_probs = token_logits - normalizers
        totals = token_log_probs.new_zeros(stop - start, scorer.num_classes)
        totals = totals.index_add(1, scorer.block_classes, token_log_probs)
        results.append((totals, predictors[:, 0]))
    return results


def last_token_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Return the final hidden state at each row's last token [B, D] (rows right-padded)."""
    backbone = causal_lm(model).base_model
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    last = (attention_mask.sum(dim=1) - 1)[:, None, None].expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, last).squeeze(1)


class DecoderClassifier(nn.Module):
    """A causal language model with a class-name scorer or a linear head.

    `forward(input_ids, attention_mask)` returns logits [B, C] and features [B, D], the
    final hidden state at the last prompt token. With a `ClassNameScorer` the rows must end
    with that scorer's class block.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.head, ClassNameScorer):
            log_likelihoods, features = class_log_likelihoods(
                self.encoder, input_ids, attention_mask, self.head
            )
            return self.head.logit_scale * log_likelihoods, features
        features = self.head.features(last_token_states(self.encoder, input_ids, attention_mask))
        return self.head(features), features


class DecoderFamily(ModelFamily):
    """Causal language models (`AutoModelForCausalLM`) scoring class names."""

    name = "decoder"

    def load(self) -> tuple[nn.Module, Any]:
        return load_decoder(self.config.base)

    @property
    def feature_size(self) -> int:
        return self.base_model.config.hidden_size

    def class_block(self, task: Task) -> ClassBlock:
        return class_block(self.tokenizer, task.class_names, self.templates(task.name)[0])

    def encode_split(self, task: Task, split: str) -> TokenizedSplit:
        data = task.splits[split]
        scored = self.config.head == "label-embedding"
        encoded = encode_prompts(
            self.tokenizer,
            data.texts,
            data.labels,
            input_template=self.config.input_template,
            max_length=self.config.max_length,
            block=self.class_block(task) if scored else None,
        )
        if encoded.truncated:
            logger.info(
                "task %s %s: %d of %d prompts truncated to %d tokens",
                task.name,
                split,
                encoded.truncated,
                len(data),
                self.config.max_length,
            )
        return encoded

    def zero_shot_heads(
        self, tasks: Mapping[str, Task], device: torch.device
    ) -> dict[str, nn.Module]:
        return {
            name: ClassNameScorer(
                self.class_block(task), task.num_classes, logit_scale=self.config.logit_scale
            ).to(device)
            for name, task in tasks.items()
        }

    def classifier(self, encoder: nn.Module, head: nn.Module) -> DecoderClassifier:
        return DecoderClassifier(encoder, head)

    def mixture_logits(
        self,
        encoder: nn.Module,
        heads: Sequence[nn.Module],
        inputs: Mapping[str, torch.Tensor],
        segments: Sequence[tuple[int, int]],
    ) -> list[torch.Tensor]:
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        if all(isinstance(head, ClassNameScorer) for head in heads):
            scored = segment_log_likelihoods(
                encoder,
                input_ids,
                attention_mask,
                [(head, start, stop) for head, (start, stop) in zip(heads, segments, strict=True)],
            )
            return [head.logit_scale * totals for head, (totals, _) in zip(heads, scored)]
        features = last_token_states(encoder, input_ids, attention_mask)
        return [
            head(head.features(features[start:stop]))
            for head, (start, stop) in zip(heads, segments, strict=True)
        ]
