"""LoRA runs on a tiny BERT: PEFT merges in the merge sweep, and the LoRA-to-MoE stage."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config_dict

from upcycle.config import parse_config
from upcycle.errors import ConfigError, MergeError
from upcycle.io import atomic_save_safetensors, read_safetensors_metadata
from upcycle.merging.sweep import peft_merge_options
from upcycle.moe import moe_layers
from upcycle.moe.stage import (
    build_moe_encoder,
    load_lora_experts,
    router_batches,
    run_moe_stage,
    summary_section,
)
from upcycle.pipeline import run_finetune, run_merge
from upcycle.store import RunDir
from upcycle.workspace import Workspace

PEFT_METHODS = ["peft_linear", "peft_ties", "peft_svd"]
STEPS = [3, 6, 12]
TASKS = ["topic", "mood", "topic2"]
TOP_K = 2
# Two BERT layers, each with a routed query and value projection.
MOE_LAYERS = 4


def lora_config_dict(model_dir, suite) -> dict:
    raw = tiny_config_dict(model_dir, suite)
    raw["training"]["methods"] = ["lora"]
    raw["training"]["lora"] = {
        "rank": 4,
        "alpha": 8.0,
        "target_modules": ["query", "value"],
        "learning_rate": 5e-3,
    }
    raw["recorder"] = {"enabled": False}
    raw["merging"] = {
        "methods": ["task_arithmetic"],
        "lora_methods": PEFT_METHODS,
        "coefficients": [0.5, 1.0],
    }
    raw["moe"] = {"enabled": True, "top_k": TOP_K, "router_steps": 3, "batch_size": 7}
    return raw


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tiny_suite, tmp_path_factory):
    config = parse_config(lora_config_dict(tiny_model_dir, tiny_suite))
    run_dir = tmp_path_factory.mktemp("lora-run")
    ws = Workspace(config, run_dir)
    ws.run.prepare(config, ws.input_files())
    run_finetune(ws, progress=False)
    run_merge(ws)
    run_moe_stage(ws, progress=False)
    return ws


def test_peft_methods_at_every_step(lora_run):
    merges = pd.read_csv(lora_run.run.root / "results/lora_merges.csv")
    for method in PEFT_METHODS:
        rows = merges[merges["method"] == method]
        assert sorted(rows["step"].unique()) == STEPS, method
        # 3 steps x 3 tasks x 2 splits.
        assert len(rows) == 18, method


def test_peft_rows_compare_with_lora_expert(lora_run):
    merges = pd.read_csv(lora_run.run.root / "results/lora_merges.csv")
    experts = pd.read_csv(lora_run.run.root / "results/lora_experts.csv")
    row = merges[(merges["method"] == "peft_ties") & (merges["step"] == 6)].iloc[0]
    expert = experts[
        (experts["task"] == row["task"])
        & (experts["step"] == 6)
        & (experts["split"] == row["split"])
    ]["accuracy"].item()
    assert row["expert_accuracy"] == pytest.approx(expert)
    assert row["normalized_accuracy"] == pytest.approx(row["accuracy"] / expert)


def test_peft_coefficient_chosen_on_grid(lora_run):
    merges = pd.read_csv(lora_run.run.root / "results/lora_merges.csv")
    grid = pd.read_csv(lora_run.run.root / "results/lora_merge_grid.csv")
    for method in PEFT_METHODS:
        for step in STEPS:
            tried = grid[(grid["method"] == method) & (grid["step"] == step)]
            assert list(tried["coefficient"]) == [0.5, 1.0], (method, step)
            # The first coefficient with the highest mean validation accuracy wins.
            best = tried.iloc[int(np.argmax(tried["validation_accuracy"].to_numpy()))]
            chosen = merges[(merges["method"] == method) & (merges["step"] == step)]
            assert set(chosen["coefficient"]) == {best["coefficient"]}, (method, step)
            validation = chosen[chosen["split"] == "validation"]["accuracy"].mean()
            assert validation == pytest.approx(best["validation_accuracy"]), (method, step)


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("peft_linear", (None, None)),
        ("peft_ties", (0.2, None)),
        ("peft_dare_linear", (0.1, None)),
        ("peft_dare_ties", (0.1, None)),
        ("peft_magnitude_prune", (0.2, None)),
        ("peft_svd", (None, 4)),
        ("peft_ties_svd", (0.2, 4)),
        ("peft_dare_linear_svd", (0.1, 4)),
        ("peft_cat", (None, None)),
    ],
)
def test_peft_merge_options_table(method, expected):
    from upcycle.config import MergingConfig
    from upcycle.merging.lora import PEFT_LORA_METHODS

    merging = MergingConfig(ties_density=0.2, dare_density=0.1)
    assert peft_merge_options(merging, PEFT_LORA_METHODS[method], rank=4) == expected


def test_unknown_lora_method_rejected(tiny_model_dir, tiny_suite):
    raw = lora_config_dict(tiny_model_dir, tiny_suite)
    raw["merging"]["lora_methods"] = ["peft_linear", "peft_average"]
    with pytest.raises(ConfigError, match=r"unknown PEFT LoRA merging methods \['peft_average'\]"):
        parse_config(raw)


def test_moe_stage_needs_lora_experts(tiny_model_dir, tiny_suite, tmp_path):
    config = parse_config(tiny_config_dict(tiny_model_dir, tiny_suite))
    with pytest.raises(ConfigError, match=r"add 'lora' to training.methods"):
        run_moe_stage(Workspace(config, tmp_path), progress=False)


def test_moe_rows_cover_every_step(lora_run):
    moe = pd.read_csv(lora_run.run.root / "results/moe.csv")
    # 3 steps x 3 tasks x 2 splits.
    assert len(moe) == 18
    assert sorted(moe["step"].unique()) == STEPS
    assert sorted(moe["task"].unique()) == sorted(TASKS)
    assert sorted(moe["split"].unique()) == ["test", "validation"]
    assert set(moe["top_k"]) == {TOP_K}
    assert moe["accuracy"].between(0, 1).all()


def test_moe_expert_accuracy_from_lora_experts(lora_run):
    moe = pd.read_csv(lora_run.run.root / "results/moe.csv")
    experts = pd.read_csv(lora_run.run.root / "results/lora_experts.csv")
    merged = moe.merge(experts, on=["seed", "task", "step", "split"], suffixes=("", "_lora"))
    assert len(merged) == len(moe)
    assert np.allclose(merged["expert_accuracy"], merged["accuracy_lora"])
    assert np.allclose(merged["normalized_accuracy"], merged["accuracy"] / merged["accuracy_lora"])


def test_router_fractions_sum_to_one(lora_run):
    router = pd.read_csv(lora_run.run.root / "results/moe_router.csv")
    sums = router.groupby(["step", "task", "layer"])["fraction"].sum()
    assert len(sums) == len(STEPS) * len(TASKS) * MOE_LAYERS
    assert np.allclose(sums, 1.0)


def test_router_fractions_respect_top_k(lora_run):
    router = pd.read_csv(lora_run.run.root / "results/moe_router.csv")
    assert sorted(router["expert"].unique()) == sorted(TASKS)
    # Every token picks TOP_K distinct experts: no expert gets more than 1/TOP_K of the
    # assignments, and at least TOP_K experts get some.
    assert router["fraction"].max() <= 1 / TOP_K + 1e-9
    used = (router["fraction"] > 0).groupby([router["step"], router["task"], router["layer"]])
    assert used.sum().min() >= TOP_K


def test_single_expert_moe_equals_expert(tiny_model_dir, tiny_suite, tmp_path):
    # One expert with top-1 routing gets gate 1 on every token, so the MoE is the expert.
    raw = lora_config_dict(tiny_model_dir, tiny_suite)
    raw["data"]["tasks"] = ["topic"]
    raw["merging"] = {"methods": ["task_arithmetic"], "lora_methods": []}
    raw["moe"] = {"enabled": True, "top_k": 1, "router_steps": 2, "batch_size": 4}
    config = parse_config(raw)
    ws = Workspace(config, tmp_path)
    ws.run.prepare(config, ws.input_files())
    run_finetune(ws, progress=False)
    run_moe_stage(ws, progress=False)
    moe = pd.read_csv(tmp_path / "results/moe.csv")
    assert len(moe) == len(STEPS) * 2
    assert list(moe["accuracy"]) == list(moe["expert_accuracy"])
    router = pd.read_csv(tmp_path / "results/moe_router.csv")
    assert set(router["fraction"]) == {1.0}


def test_top_1_moe_of_one_expert_is_expert(lora_run):
    experts, info = load_lora_experts(lora_run, 0, 12)
    moe_encoder = build_moe_encoder(lora_run, experts[:1], info, top_k=1, seed=0).eval()
    expert_encoder = lora_run.fresh_encoder().eval()
    state = expert_encoder.state_dict()
    for name, delta in experts[0].task_vector.items():
        state[name] = state[name] + delta
    expert_encoder.load_state_dict(state)
    batch = router_batches(lora_run, seed=0, steps=1, batch_size=6)[0]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        routed = moe_encoder(**inputs).last_hidden_state
        merged = expert_encoder(**inputs).last_hidden_state
        base = lora_run.fresh_encoder().eval()(**inputs).last_hidden_state
    assert not torch.allclose(merged, base, atol=1e-4)
    assert torch.allclose(routed, merged, atol=1e-5)


def test_moe_resume_skips_completed_steps(lora_run):
    folder = lora_run.run.root / "moe/seed0"
    paths = sorted(folder.glob("step*.csv"))
    assert len(paths) == 2 * len(STEPS)
    before = {path: path.stat().st_mtime_ns for path in paths}
    run_moe_stage(lora_run, progress=False)
    after = {path: path.stat().st_mtime_ns for path in paths}
    assert after == before


def test_moe_manifest_marks_every_step(lora_run):
    for step in STEPS:
        assert lora_run.run.is_complete(f"moe/seed0/step{step}"), step


def write_adapter(ws, task: str, step: int, *, rank: int, alpha: float, targets: list[str]):
    """Overwrite a task's LoRA checkpoint with a random adapter of other LoRA settings."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(ws.fresh_encoder(), config)
    path = ws.run.checkpoint_path("lora", task, 0, step)
    metadata = read_safetensors_metadata(path)
    metadata.update(rank=str(rank), alpha=str(alpha), target_modules=",".join(targets))
    atomic_save_safetensors(get_peft_model_state_dict(model), path, metadata)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"rank": 8, "alpha": 8.0, "targets": ["query", "value"]},
            r"adapter 'mood' has rank 8 but adapter 'topic' has 4",
        ),
        (
            {"rank": 4, "alpha": 8.0, "targets": ["query"]},
            r"adapter 'mood' has target_modules query but adapter 'topic' has query,value",
        ),
        (
            {"rank": 4, "alpha": 2.0, "targets": ["query", "value"]},
            r"adapter 'mood' has alpha 2.0 but adapter 'topic' has 8.0",
        ),
    ],
)
def test_mismatched_adapter_named(lora_run, settings, message):
    path = lora_run.run.checkpoint_path("lora", "mood", 0, 3)
    original = path.read_bytes()
    write_adapter(lora_run, "mood", 3, **settings)
    try:
        with pytest.raises(MergeError, match=message):
            load_lora_experts(lora_run, 0, 3)
    finally:
        path.write_bytes(original)


def test_top_k_above_experts_raises(lora_run):
    experts, info = load_lora_experts(lora_run, 0, 3)
    with pytest.raises(MergeError, match=r"moe.top_k=4 is invalid for 3 experts"):
        build_moe_encoder(lora_run, experts, info, top_k=4, seed=0)


def test_untargeted_module_raises(lora_run):
    experts, info = load_lora_experts(lora_run, 0, 3)
    with pytest.raises(MergeError, match=r"no adapter targets module 'key'"):
        build_moe_encoder(lora_run, experts, info, top_k=2, seed=0, modules=["key"])


def test_modules_limit_routed_layers(lora_run):
    experts, info = load_lora_experts(lora_run, 0, 3)
    encoder = build_moe_encoder(lora_run, experts, info, top_k=2, seed=0, modules=["value"])
    assert sorted(moe_layers(encoder)) == [
        "encoder.layer.0.attention.self.value",
        "encoder.layer.1.attention.self.value",
    ]


def test_router_batches_mix_tasks(lora_run):
    batches = router_batches(lora_run, seed=0, steps=2, batch_size=7)
    segments = batches[0]["segments"]
    assert [task for task, _, _ in segments] == TASKS
    # 7 = 2 per task plus one extra place for one task.
    assert sorted(stop - start for _, start, stop in segments) == [2, 2, 3]
    assert batches[0]["input_ids"].shape[0] == 7
    assert batches[0]["labels"].shape == (7,)


def batch_contents(batches) -> list[tuple]:
    return [(batch["input_ids"].tolist(), batch["labels"].tolist()) for batch in batches]


def test_router_batches_follow_seed(lora_run):
    first = batch_contents(router_batches(lora_run, seed=0, steps=3, batch_size=6))
    again = batch_contents(router_batches(lora_run, seed=0, steps=3, batch_size=6))
    other = batch_contents(router_batches(lora_run, seed=1, steps=3, batch_size=6))
    assert first == again
    assert first != other


def test_summary_section_has_moe_table(lora_run):
    lines = summary_section(lora_run.run)
    text = "\n".join(lines)
    assert lines[0].startswith("## LoRA experts upcycled into MoE layers")
    header = next(line for line in lines if line.startswith("| step |"))
    assert "LoRA experts" in header
    assert "best merge (" in header
    assert f"MoE (top-{TOP_K})" in header
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| step")]
    assert [row.split(" | ")[0] for row in rows] == [f"| {step}" for step in STEPS]
    assert "**" in text


def test_summary_section_empty_without_moe(tmp_path):
    assert summary_section(RunDir(tmp_path)) == []


def test_selection_compares_peft_merges(lora_run):
    from upcycle.pipeline import run_select

    run_select(lora_run)
    table = pd.read_csv(lora_run.run.root / "results/selection.csv")
    merges = pd.read_csv(lora_run.run.root / "results/lora_merges.csv")
    assert list(dict.fromkeys(table["method"])) == ["task_arithmetic", *PEFT_METHODS]
    for method in PEFT_METHODS:
        rows = table[table["method"] == method].set_index("strategy")
        assert {"final", "best-individual", "best-common"} <= set(rows.index), method
        final_merge = merges[
            (merges["method"] == method)
            & (merges["step"] == STEPS[-1])
            & (merges["split"] == "test")
        ]
        assert rows.loc["final", "test_accuracy"] == pytest.approx(final_merge["accuracy"].mean())


def test_selection_peft_merge_matches_stage(lora_run):
    from upcycle.selection.stage import MergeEvaluator

    merges = pd.read_csv(lora_run.run.root / "results/lora_merges.csv")
    evaluator = MergeEvaluator(lora_run, "lora", 0)
    # Clear the results read from the merge stage, so the evaluator merges through PEFT.
    evaluator._merged.clear()
    evaluator._validation.clear()
    merged = evaluator.merged("peft_ties", {task: 6 for task in TASKS})
    stage = merges[(merges["method"] == "peft_ties") & (merges["step"] == 6)]
    assert merged.coefficient == stage["coefficient"].iloc[0]
    assert merged.test_accuracy == pytest.approx(
        stage[stage["split"] == "test"]["accuracy"].mean()
    )
    assert merged.validation_accuracy == pytest.approx(
        stage[stage["split"] == "validation"]["accuracy"].mean()
    )
    assert evaluator.merges_run == 2
