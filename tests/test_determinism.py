"""Determinism: one config and seed give identical experts, recorder outputs and merges.

Two runs of the same config in one process must agree bit for bit with dropout on in the
encoder (the tiny BERT's default of 0.1) and in the LoRA adapters, with the difficulty
recorder on, and for the DARE merges, whose drops are random. Full fine-tuning alone is
covered by test_pipeline.py.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from conftest import tiny_config_dict
from upcycle.config import parse_config
from upcycle.merging.methods import merge_task_vectors
from upcycle.merging.sweep import load_expert
from upcycle.pipeline import run_all
from upcycle.workspace import Workspace

TASKS = ["topic", "mood"]
DARE = {"method": "dare_ties", "coefficient": 1.0, "density": 0.5}


def determinism_config(model_dir: Path, suite: Path, *, seed: int = 0) -> dict:
    raw = tiny_config_dict(model_dir, suite, seeds=[seed])
    raw["data"]["tasks"] = list(TASKS)
    raw["training"] = {
        "methods": ["full", "lora"],
        "steps": 12,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "checkpoint_steps": [4, 12],
        "lora": {"rank": 4, "dropout": 0.1, "learning_rate": 1e-2},
    }
    raw["merging"] = {
        "methods": ["dare_task_arithmetic", "dare_ties"],
        "coefficients": [0.5, 1.0],
        "dare_density": 0.5,
        "lora_methods": ["peft_dare_linear"],
    }
    for section in ("analysis", "selection", "report"):
        raw[section] = {"enabled": False}
    return raw


@pytest.fixture(scope="module")
def twin_runs(tiny_model_dir, tiny_suite, tmp_path_factory):
    """Two run directories of one config, run one after the other in this process."""
    config = parse_config(determinism_config(tiny_model_dir, tiny_suite))
    first = tmp_path_factory.mktemp("first")
    second = tmp_path_factory.mktemp("second")
    run_all(config, first, progress=False)
    # Draw from the global generator in between, so nothing may depend on its history.
    torch.rand(17)
    run_all(config, second, progress=False)
    return config, first, second


def test_tiny_bert_has_dropout(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.hidden_dropout_prob == 0.1
    assert config.attention_probs_dropout_prob == 0.1


def test_lora_checkpoints_identical(twin_runs):
    _, first, second = twin_runs
    paths = sorted((first / "checkpoints/lora").rglob("*.safetensors"))
    assert len(paths) == len(TASKS) * 2
    for path in paths:
        expected = load_file(path)
        actual = load_file(second / path.relative_to(first))
        assert sorted(actual) == sorted(expected)
        for name, tensor in expected.items():
            assert torch.equal(actual[name], tensor), f"{path.relative_to(first)}: {name}"


def test_lora_checkpoints_trained(twin_runs):
    _, first, _ = twin_runs
    tensors = load_file(first / "checkpoints/lora/mood/seed0/step12.safetensors")
    lora_b = [tensor for name, tensor in tensors.items() if "lora_B" in name]
    assert lora_b
    # PEFT starts B at zero, so a nonzero B shows the adapter was trained.
    assert all(tensor.abs().sum() > 0 for tensor in lora_b)


def test_examples_identical(twin_runs):
    _, first, second = twin_runs
    expected = pd.read_parquet(first / "results/examples.parquet")
    actual = pd.read_parquet(second / "results/examples.parquet")
    assert set(expected["kind"]) == {"full", "lora"}
    assert expected["el2n"].notna().all()
    pd.testing.assert_frame_equal(actual, expected)


def test_difficulty_identical(twin_runs):
    _, first, second = twin_runs
    expected = (first / "results/difficulty.csv").read_bytes()
    assert (second / "results/difficulty.csv").read_bytes() == expected


@pytest.mark.parametrize(
    "name", ["merges.csv", "merge_grid.csv", "lora_merges.csv", "lora_merge_grid.csv"]
)
def test_merge_tables_identical(twin_runs, name):
    _, first, second = twin_runs
    assert (second / "results" / name).read_bytes() == (first / "results" / name).read_bytes()


def test_lora_merges_include_peft_dare(twin_runs):
    _, first, _ = twin_runs
    merges = pd.read_csv(first / "results/lora_merges.csv")
    assert "peft_dare_linear" in set(merges["method"])


def stored_task_vectors(config, run_dir: Path) -> list[dict[str, torch.Tensor]]:
    ws = Workspace(config, run_dir)
    return [load_expert(ws, "full", task, 0, 12).task_vector for task in TASKS]


def test_dare_merge_identical_across_runs(twin_runs):
    config, first, second = twin_runs
    torch.manual_seed(1)
    expected = merge_task_vectors(stored_task_vectors(config, first), **DARE, seed=0)
    torch.manual_seed(2)
    torch.rand(5)
    actual = merge_task_vectors(stored_task_vectors(config, second), **DARE, seed=0)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_dare_merge_depends_on_seed(twin_runs):
    config, first, _ = twin_runs
    vectors = stored_task_vectors(config, first)
    seed0 = merge_task_vectors(vectors, **DARE, seed=0)
    seed1 = merge_task_vectors(vectors, **DARE, seed=1)
    differing = [name for name in seed0 if not torch.equal(seed0[name], seed1[name])]
    assert differing
