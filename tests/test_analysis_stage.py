"""The analyze stage on a tiny run: interference, forgetting by merging, resume, summary."""

import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import tiny_config_dict

from upcycle import pipeline
from upcycle.analysis.difficulty import difficulty_deciles
from upcycle.analysis.stage import analysis_train_indices, run_analysis_stage, summary_section
from upcycle.config import parse_config
from upcycle.evaluation import TokenizedSplit, predict
from upcycle.merging.methods import merge_task_vectors
from upcycle.merging.sweep import load_expert
from upcycle.models.encoder import Classifier
from upcycle.store import RunDir
from upcycle.workspace import Workspace

TASKS = ["topic", "mood", "topic2"]
STEPS = [3, 6, 12]
CORE_METHODS = ["average", "task_arithmetic", "ties", "dare_task_arithmetic", "dare_ties"]
PEFT_METHODS = ["peft_linear", "peft_svd"]
TRAIN_EXAMPLES = 30


@pytest.fixture(scope="module")
def analyzed(tiny_model_dir, tiny_suite, tmp_path_factory):
    raw = tiny_config_dict(tiny_model_dir, tiny_suite)
    raw["training"]["methods"] = ["full", "lora"]
    raw["merging"]["lora_methods"] = PEFT_METHODS
    raw["analysis"] = {"train_examples": TRAIN_EXAMPLES}
    config = parse_config(raw)
    ws = Workspace(config, tmp_path_factory.mktemp("run"))
    ws.run.prepare(config, ws.input_files())
    pipeline.run_finetune(ws, progress=False)
    pipeline.run_merge(ws)
    run_analysis_stage(ws)
    return ws


def methods_of(kind: str) -> list[str]:
    return CORE_METHODS + (PEFT_METHODS if kind == "lora" else [])


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_interference_rows_every_step(kind, analyzed):
    table = pd.read_csv(analyzed.run.result_path("interference.csv"))
    table = table[table["kind"] == kind]
    assert sorted(table["step"].unique()) == STEPS
    for step in STEPS:
        rows = table[table["step"] == step]
        assert sorted(rows.loc[rows["metric"] == "norm", "task_a"]) == sorted(TASKS)
        assert (rows["metric"] == "cosine").sum() == 3
        assert (rows["metric"] == "mean_cosine").sum() == 1
        assert (rows["metric"] == "sign_conflict").sum() == 1
        assert rows.loc[rows["metric"] == "norm", "value"].gt(0).all()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_forgetting_rows_every_method(kind, analyzed):
    table = pd.read_csv(analyzed.run.result_path("forgetting.csv"), dtype={"decile": str})
    table = table[table["kind"] == kind]
    assert sorted(table["method"].unique()) == sorted(methods_of(kind))
    counts = table.groupby(["method", "step", "task", "split"]).size()
    # Test: the "all" row. Train: "all" plus ten deciles of learned_step and of el2n.
    assert len(counts) == len(methods_of(kind)) * len(STEPS) * len(TASKS) * 2
    assert set(counts.xs("test", level="split")) == {1}
    assert set(counts.xs("train", level="split")) == {21}


def test_forgetting_train_subset_size(analyzed):
    table = pd.read_csv(analyzed.run.result_path("forgetting.csv"), dtype={"decile": str})
    rows = table[(table["split"] == "train") & (table["score"] == "learned_step")]
    # Each decile row counts only examples the expert gets right, so the deciles of the
    # subset add up to the "all" row, which is at most the subset size.
    per_unit = rows.groupby(["kind", "method", "step", "task"])["n"].sum()
    everything = table[(table["split"] == "train") & (table["decile"] == "all")]
    everything = everything.set_index(["kind", "method", "step", "task"])["n"]
    assert per_unit.sort_index().tolist() == everything.sort_index().tolist()
    assert everything.max() <= TRAIN_EXAMPLES
    assert len(analysis_train_indices(analyzed, "topic")) == TRAIN_EXAMPLES


def direct_correct(ws, model_dir, task_vector, task: str, split: TokenizedSplit) -> np.ndarray:
    """Evaluate base + task vector on `split` with a freshly loaded encoder."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(model_dir)
    state = encoder.state_dict()
    encoder.load_state_dict({name: value + task_vector[name] for name, value in state.items()})
    classifier = Classifier(encoder, ws.label_heads[task], "mean")
    predictions = predict(
        classifier, split, pad_id=ws.pad_id, batch_size=7, device=torch.device("cpu")
    )
    return predictions == split.labels.numpy()


@pytest.mark.parametrize(("method", "step"), [("task_arithmetic", 6), ("dare_ties", 12)])
def test_forgetting_counts_recomputed(method, step, analyzed, tiny_model_dir):
    ws = analyzed
    merges = pd.read_csv(ws.run.result_path("merges.csv"))
    chosen = merges[(merges["method"] == method) & (merges["step"] == step)]
    coefficient = float(chosen["coefficient"].iloc[0])
    experts = [load_expert(ws, "full", task, 0, step) for task in TASKS]
    density = ws.config.merging.dare_density if method.startswith("dare") else 1.0
    merged = merge_task_vectors(
        [expert.task_vector for expert in experts],
        method,
        coefficient=coefficient,
        density=density,
        seed=0,
        names=TASKS,
    )
    table = pd.read_csv(ws.run.result_path("forgetting.csv"), dtype={"decile": str})
    table = table[(table["kind"] == "full") & (table["method"] == method) & (table["step"] == step)]
    for expert in experts:
        task = expert.task
        subset = analysis_train_indices(ws, task)
        train = ws.tokenized[(task, "train")]
        splits = {
            "test": ws.tokenized[(task, "test")],
            "train": TokenizedSplit([train.ids[i] for i in subset], train.labels[subset], 0),
        }
        for split_name, split in splits.items():
            expert_correct = direct_correct(ws, tiny_model_dir, expert.task_vector, task, split)
            merged_correct = direct_correct(ws, tiny_model_dir, merged, task, split)
            forgotten = expert_correct & ~merged_correct
            row = table[
                (table["task"] == task)
                & (table["split"] == split_name)
                & (table["decile"] == "all")
            ].iloc[0]
            assert row["n"] == expert_correct.sum(), (task, split_name)
            assert row["forgotten"] == forgotten.sum(), (task, split_name)

        examples = pd.read_parquet(ws.run.expert_dir("full", task, 0) / "examples.parquet")
        learned = examples.sort_values("index")["learned_step"].to_numpy()[subset]
        deciles = difficulty_deciles(learned)
        expert_correct = direct_correct(
            ws, tiny_model_dir, expert.task_vector, task, splits["train"]
        )
        merged_correct = direct_correct(ws, tiny_model_dir, merged, task, splits["train"])
        rows = table[(table["task"] == task) & (table["score"] == "learned_step")]
        for decile in range(10):
            members = deciles == decile
            row = rows[rows["decile"] == str(decile)].iloc[0]
            assert row["n"] == (expert_correct & members).sum(), (task, decile)
            assert row["forgotten"] == (expert_correct & ~merged_correct & members).sum()


def test_merges_forget_something(analyzed):
    table = pd.read_csv(analyzed.run.result_path("forgetting.csv"), dtype={"decile": str})
    assert table.loc[table["decile"] == "all", "forgotten"].sum() > 0


def test_rerun_skips_completed_steps(analyzed):
    ws = analyzed
    folder = ws.run.root / "analysis/full/seed0"
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    table = pd.read_csv(ws.run.result_path("forgetting.csv"))
    (folder / "step6_forgetting.csv").unlink()
    ws.run.clear_complete("analysis/full/seed0/step6")
    run_analysis_stage(ws)
    after = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert after["step3_forgetting.csv"] == before["step3_forgetting.csv"]
    assert after["step12_interference.csv"] == before["step12_interference.csv"]
    assert after["step6_interference.csv"] != before["step6_interference.csv"]
    assert ws.run.is_complete("analysis/full/seed0/step6")
    pd.testing.assert_frame_equal(pd.read_csv(ws.run.result_path("forgetting.csv")), table)


def test_step_without_checkpoints_skipped(analyzed, caplog):
    config = analyzed.config.model_copy(deep=True)
    config.training.checkpoint_steps = [3, 6, 9, 12]
    ws = Workspace(config, analyzed.run.root)
    with caplog.at_level(logging.INFO, logger="upcycle.analysis.stage"):
        run_analysis_stage(ws)
    assert "analysis/full/seed0/step9: no full checkpoint for tasks" in caplog.text
    assert not ws.run.is_complete("analysis/full/seed0/step9")
    interference = pd.read_csv(ws.run.result_path("interference.csv"))
    assert sorted(interference["step"].unique()) == STEPS


def test_no_merges_leaves_unit_open(analyzed, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(analyzed.run.root, root, ignore=shutil.ignore_patterns("analysis", "results"))
    config = analyzed.config.model_copy(deep=True)
    config.training.methods = ["full"]
    ws = Workspace(config, root)
    ws.run.clear_complete("analysis/")
    run_analysis_stage(ws)
    assert (root / "results/interference.csv").is_file()
    assert not (root / "results/forgetting.csv").exists()
    assert not ws.run.is_complete("analysis/full/seed0/step3")


def test_summary_section_tables(analyzed):
    text = "\n".join(summary_section(analyzed.run))
    assert "## Full fine-tuning: forgetting by merging (training split, %)" in text
    assert "## LoRA: forgetting by merging (training split, %)" in text
    assert "| step | full sign conflict (%) | full mean cosine | lora sign conflict (%)" in text
    assert "## Training dynamics" in text
    assert "| peft_svd | 12 |" in text


def test_summary_section_empty_run(tmp_path):
    assert summary_section(RunDir(tmp_path)) == []


def test_pruning_comparison_written(analyzed):
    config = analyzed.config.model_copy(deep=True)
    config.data.prune = {"run": str(analyzed.run.root), "fraction": 0.0}
    ws = Workspace(config, analyzed.run.root)
    run_analysis_stage(ws)
    comparison = pd.read_csv(ws.run.result_path("pruning_comparison.csv"))
    methods = set(comparison["method"])
    assert methods == {"experts", *CORE_METHODS, *PEFT_METHODS}
    assert comparison["difference"].abs().max() == 0
    assert "## Pruned run against the full data (full)" in "\n".join(summary_section(ws.run))
