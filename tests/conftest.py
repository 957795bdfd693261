"""Shared fixtures: a tiny BERT built from a config, a tiny task suite, and the real suite."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

REAL_SUITE = Path(os.environ.get("UPCYCLE_DATA", Path(__file__).resolve().parents[2] / "shared/data/textsuite"))

TOPICS = {
    "sport": ["goal", "match", "team", "score", "coach"],
    "food": ["bread", "soup", "spice", "cook", "taste"],
    "tech": ["chip", "code", "robot", "laptop", "server"],
}
MOODS = {"good": ["great", "lovely", "happy", "fine"], "bad": ["awful", "sad", "broken", "poor"]}
FILLER = ["the", "a", "was", "is", "very", "today", "and", "it", "this", "my"]


def tiny_vocabulary() -> list[str]:
    words = {w for group in (*TOPICS.values(), *MOODS.values(), FILLER) for w in group}
    words |= set(TOPICS) | set(MOODS)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]


def make_tiny_model(folder: Path, *, seed: int = 0, hidden_size: int = 32) -> Path:
    """Save a randomly initialised two-layer BERT and a word-level tokenizer to `folder`."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5 ignores `vocab_file` in this constructor, so the vocabulary goes in as a dict.
    vocabulary = {word: index for index, word in enumerate(tiny_vocabulary())}
    BertTokenizerFast(vocab=vocabulary).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tiny_vocabulary()), hidden_size=hidden_size, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=2 * hidden_size, max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)
    return folder


def make_task(folder: Path, classes: dict[str, list[str]], *, sizes=(48, 16, 16), seed=0) -> Path:
    """Write a learnable task: each text contains one keyword of its class among filler words."""
    rng = random.Random(seed)
    names = list(classes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.json").write_text(json.dumps(names))
    for split, size in zip(("train", "validation", "test"), sizes):
        lines = []
        for i in range(size):
            label = i % len(names)
            words = rng.sample(FILLER, 4) + [rng.choice(classes[names[label]])]
            rng.shuffle(words)
            lines.append(json.dumps({"text": " ".join(words), "label": label}))
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-suite")
    make_task(root / "topic", TOPICS, seed=1)
    make_task(root / "mood", MOODS, seed=2)
    make_task(root / "topic2", {"sport": TOPICS["sport"], "tech": TOPICS["tech"]}, seed=3)
    return root


def tiny_config_dict(model_dir: Path, suite: Path, **sections) -> dict:
    """A run config for the tiny model and suite; keyword arguments replace whole sections."""
    config = {
        "name": "tiny",
        "seeds": [0],
        "device": "cpu",
        "data": {"root": str(suite), "tasks": ["topic", "mood", "topic2"]},
        "model": {"base": str(model_dir), "max_length": 16, "logit_scale": 10.0},
        "training": {
            "steps": 12, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 2,
            "checkpoint_steps": [3, 6, 12],
        },
        "merging": {"coefficients": [0.5, 1.0]},
        "evaluation": {"batch_size": 16},
    }
    config.update(sections)
    return config


@pytest.fixture
def real_suite() -> Path:
    if not (REAL_SUITE / "sst2" / "train.jsonl").is_file():
        raise FileNotFoundError(
            f"the text suite was not found at {REAL_SUITE}; set UPCYCLE_DATA to its folder"
        )
    return REAL_SUITE
