"""Decoder language models as classifiers, on a tiny Llama built from a config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import MOODS, TOPICS, make_task, tiny_vocabulary
from test_clip import word_tokenizer

from upcycle.analysis.gradients import per_example_grad_norms
from upcycle.config import load_config, parse_config
from upcycle.data.tasks import Split, Task
from upcycle.errors import ConfigError
from upcycle.evaluation import collate, concat_batches, model_inputs
from upcycle.models.decoder import (
    ClassNameScorer,
    DecoderFamily,
    class_block,
    encode_prompts,
    last_token_states,
)
from upcycle.models.encoder import LinearHead
from upcycle.moe.upcycle import total_load_balancing_loss, upcycle_to_moe
from upcycle.workspace import Workspace

DECODER_WORDS = [*tiny_vocabulary(), "text", "label", ":"]
TEMPLATE = "text : {} label :"
CLASS_NAMES = ["very good", "bad", "fine today"]
TEXTS = ["the match was great", "soup", "my robot is broken and it was very sad today"]


def make_tiny_decoder(folder: Path, *, seed: int = 0) -> Path:
    """Save a random two-layer Llama with tied embeddings and a word-level tokenizer.

    Llama has no tokenizer class of its own in transformers, so AutoTokenizer loads the
    saved fast tokenizer unchanged.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    word_tokenizer(DECODER_WORDS, bos="[CLS]").save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(DECODER_WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def decoder_config(model_dir: Path, suite: Path, **sections) -> dict:
    """A run config for the tiny decoder on the conftest text tasks topic and mood."""
    config = {
        "name": "tiny-decoder",
        "device": "cpu",
        "data": {"root": str(suite), "tasks": ["topic", "mood"]},
        "model": {
            "family": "decoder",
            "base": str(model_dir),
            "input_template": TEMPLATE,
            "max_length": 16,
        },
    }
    config.update(sections)
    return config


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory) -> Path:
    return make_tiny_decoder(tmp_path_factory.mktemp("tiny-decoder"))


@pytest.fixture(scope="module")
def text_suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("decoder-suite")
    make_task(root / "topic", TOPICS, sizes=(12, 4, 4), seed=1)
    make_task(root / "mood", MOODS, sizes=(12, 4, 4), seed=2)
    return root


@pytest.fixture(scope="module")
def family(decoder_dir) -> DecoderFamily:
    config = parse_config(decoder_config(decoder_dir, decoder_dir))
    return DecoderFamily(config.model)


@pytest.fixture(scope="module")
def task() -> Task:
    split = Split(texts=TEXTS, labels=[0, 1, 2])
    return Task("reviews", CLASS_NAMES, {"train": split, "validation": split, "test": split})


def hand_scores(model, tokenizer, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Score each class name with its own forward pass over prompt + name."""
    prompt = tokenizer(TEMPLATE.format(text))["input_ids"]
    scores = []
    with torch.no_grad():
        for name in CLASS_NAMES:
            name_ids = tokenizer(f" {name}", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + name_ids])
            log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
            total = sum(log_probs[len(prompt) - 1 + j, token] for j, token in enumerate(name_ids))
            scores.append(total)
        state = model.model(input_ids=torch.tensor([prompt])).last_hidden_state[0, -1]
    return torch.stack(scores), state


def test_scores_match_hand_loop(family, task):
    split = family.encode_split(task, "train")
    head = family.zero_shot_heads({"reviews": task}, torch.device("cpu"))["reviews"]
    classifier = family.classifier(family.base_model, head)
    batch = collate(split, [0, 1, 2], pad_id=0)
    with torch.no_grad():
        logits, features = classifier(**model_inputs(batch, torch.device("cpu")))
    for row, text in enumerate(TEXTS):
        scores, state = hand_scores(family.base_model, family.tokenizer, text)
        torch.testing.assert_close(logits[row], scores, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(features[row], state, atol=1e-5, rtol=1e-5)


def test_class_block_layout(family):
    block = class_block(family.tokenizer, CLASS_NAMES, " {}")
    tokens = family.tokenizer.convert_ids_to_tokens(block.ids.tolist())
    assert tokens == ["very", "good", "bad", "fine", "today"]
    assert block.classes.tolist() == [0, 0, 1, 2, 2]
    assert block.offsets.tolist() == [0, 1, 0, 0, 1]


def test_scorer_predictor_positions(family):
    scorer = ClassNameScorer(class_block(family.tokenizer, CLASS_NAMES, " {}"), 3)
    # Offset -1 is the last prompt token; "good" and "today" follow block tokens 0 and 3.
    assert scorer.predictor_offsets.tolist() == [-1, 0, 3]
    assert scorer.predictor_column.tolist() == [0, 1, 0, 0, 2]


def test_logit_scale_multiplies_scores(family, task):
    split = family.encode_split(task, "train")
    block = family.class_block(task)
    batch = model_inputs(collate(split, [0, 2], pad_id=0), torch.device("cpu"))
    with torch.no_grad():
        plain, _ = family.classifier(family.base_model, ClassNameScorer(block, 3))(**batch)
        scaled, _ = family.classifier(
            family.base_model, ClassNameScorer(block, 3, logit_scale=2.5)
        )(**batch)
    torch.testing.assert_close(scaled, 2.5 * plain)


def test_truncation_keeps_template_end(family):
    block = class_block(family.tokenizer, CLASS_NAMES, " {}")
    long_text = "the goal was great and the team was happy and the coach was fine"
    encoded = encode_prompts(
        family.tokenizer,
        [long_text, "soup"],
        [0, 1],
        input_template=TEMPLATE,
        max_length=8,
        block=block,
    )
    assert encoded.truncated == 1
    tokens = family.tokenizer.convert_ids_to_tokens(encoded.ids[0].tolist())
    assert tokens == [
        "[CLS]",
        "text",
        ":",
        "the",
        "goal",
        "was",
        "label",
        ":",
        "very",
        "good",
        "bad",
        "fine",
        "today",
    ]
    assert len(encoded.ids[1]) == 6 + len(block)


def test_linear_head_reads_last_token(family, task):
    tokenized = encode_prompts(
        family.tokenizer, TEXTS, [0, 1, 2], input_template=TEMPLATE, max_length=32, block=None
    )
    torch.manual_seed(0)
    head = LinearHead(16, 3)
    batch = model_inputs(collate(tokenized, [0, 1, 2], pad_id=0), torch.device("cpu"))
    with torch.no_grad():
        logits, features = family.classifier(family.base_model, head)(**batch)
        expected = last_token_states(family.base_model, **batch)
    torch.testing.assert_close(features, expected)
    torch.testing.assert_close(logits, head(expected))
    for row, text in enumerate(TEXTS):
        _, state = hand_scores(family.base_model, family.tokenizer, text)
        torch.testing.assert_close(features[row], state, atol=1e-5, rtol=1e-5)


def test_mixture_matches_separate_passes(family, task):
    other = Task("short", ["bad", "good"], dict(task.splits))
    heads = family.zero_shot_heads({"reviews": task, "short": other}, torch.device("cpu"))
    first = collate(family.encode_split(task, "train"), [0, 2], pad_id=0)
    second = collate(family.encode_split(other, "train"), [1, 0, 2], pad_id=0)
    merged, segments = concat_batches([first, second], pad_id=0)
    assert segments == [(0, 2), (2, 5)]
    cpu = torch.device("cpu")
    with torch.no_grad():
        mixed = family.mixture_logits(
            family.base_model,
            [heads["reviews"], heads["short"]],
            model_inputs(merged, cpu),
            segments,
        )
        for logits, head, batch in zip(
            mixed, [heads["reviews"], heads["short"]], [first, second], strict=True
        ):
            alone, _ = family.classifier(family.base_model, head)(**model_inputs(batch, cpu))
            torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)


def lora_classifier(family, head, *, seed: int):
    """Wrap a copy of the base model with rank-2 LoRA whose B factors are random."""
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(family.base_model),
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    torch.manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.5)
    return family.classifier(model, head)


def test_per_example_gradients_match_loop(family, task):
    head = family.zero_shot_heads({"reviews": task}, torch.device("cpu"))["reviews"]
    classifier = lora_classifier(family, head, seed=1)
    split = family.encode_split(task, "train")
    batch = collate(split, [0, 1, 2], pad_id=0)
    batch.pop("indices")
    norms = per_example_grad_norms(classifier, batch)
    trainable = [p for p in classifier.parameters() if p.requires_grad]
    for row in range(3):
        length = int(batch["attention_mask"][row].sum())
        single = {k: batch[k][row : row + 1, :length] for k in ("input_ids", "attention_mask")}
        logits, _ = classifier(**single)
        loss = F.cross_entropy(logits, batch["labels"][row : row + 1])
        grads = torch.autograd.grad(loss, trainable)
        expected = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        torch.testing.assert_close(norms[row], expected, atol=1e-5, rtol=1e-4)


def test_moe_routes_the_batch_tokens(family, task):
    from peft import get_peft_model_state_dict

    head = family.zero_shot_heads({"reviews": task}, torch.device("cpu"))["reviews"]
    adapters = {
        f"expert{seed}": get_peft_model_state_dict(lora_classifier(family, head, seed=seed).encoder)
        for seed in (1, 2)
    }
    model = upcycle_to_moe(family.base_model, adapters, rank=2, alpha=4, top_k=1)
    cpu = torch.device("cpu")
    batch = model_inputs(collate(family.encode_split(task, "train"), [0, 1, 2], pad_id=0), cpu)
    logits, _ = family.classifier(model, head)(**batch)
    mask = family.routing_mask(batch)
    loss = total_load_balancing_loss(model, mask.reshape(-1))
    assert logits.shape == (3, 3)
    assert mask.shape == batch["input_ids"].shape
    assert torch.isfinite(loss)


def test_tied_embedding_keyed_once(decoder_dir, text_suite, tmp_path):
    ws = Workspace(parse_config(decoder_config(decoder_dir, text_suite)), tmp_path)
    assert ws.tied_names == ["lm_head.weight"]
    assert "lm_head.weight" not in ws.base_state
    assert "model.embed_tokens.weight" in ws.base_state
    encoder = ws.fresh_encoder()
    assert encoder.lm_head.weight is encoder.model.embed_tokens.weight


def test_split_rows_end_with_class_block(decoder_dir, text_suite, tmp_path):
    ws = Workspace(parse_config(decoder_config(decoder_dir, text_suite)), tmp_path)
    row = ws.tokenized[("mood", "test")].ids[0].tolist()
    tokens = ws.tokenizer.convert_ids_to_tokens(row)
    assert tokens[:3] == ["[CLS]", "text", ":"]
    assert tokens[-4:] == ["label", ":", "good", "bad"]


def test_decoder_config_defaults(decoder_dir, text_suite):
    raw = decoder_config(decoder_dir, text_suite)
    del raw["model"]["input_template"]
    config = parse_config(raw)
    assert config.model.input_template == "Text: {}\nLabel:"
    assert config.model.prompt_template == " {}"
    assert config.model.logit_scale == 1.0
    assert config.training.lora.target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]


def test_several_class_templates_rejected(decoder_dir, text_suite):
    raw = decoder_config(decoder_dir, text_suite)
    raw["data"]["tasks"] = [{"name": "mood", "class_templates": [" {}", " is {}"]}]
    with pytest.raises(ConfigError, match=r"tasks \['mood'\] give several class_templates"):
        parse_config(raw)


def test_default_base_rejected_for_decoder(text_suite):
    raw = {"data": {"root": str(text_suite), "tasks": ["mood"]}, "model": {"family": "decoder"}}
    with pytest.raises(ConfigError, match="base is the text encoder all-MiniLM-L6-v2"):
        parse_config(raw)


def test_decoder_config_file():
    config = load_config(Path(__file__).parents[1] / "configs/decoder-lora.yaml")
    assert config.model.family == "decoder"
    assert config.training.methods == ["lora"]
    assert "gate_proj" in config.training.lora.target_modules
