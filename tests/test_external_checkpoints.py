"""Bring your own checkpoints: Hugging Face folders fine-tuned from a tiny BERT, imported with
an experts file, then merged and selected through the command line."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from conftest import make_tiny_model
from safetensors.torch import load_file

from upcycle.cli import build_parser, main
from upcycle.errors import CheckpointError, ConfigError
from upcycle.io import read_safetensors_metadata
from upcycle.selection.external import import_experts, run_dir_from_arguments
from upcycle.selection.trajectory import checkpoint_for
from upcycle.store import RunDir

QUERY = "encoder.layer.0.attention.self.query.weight"
# topic2 has other steps than the two other tasks, so the run's steps are the union.
EXPERT_STEPS = {"topic": [10, 20], "mood": [10, 20], "topic2": [10, 30]}
UNION = [10, 20, 30]
METHODS = ["task_arithmetic", "ties"]


def save_checkpoint(base_dir, folder, *, seed: int, scale: float, classifier: bool) -> None:
    """Save the base BERT with every weight moved by seeded noise of standard deviation `scale`."""
    from transformers import BertForSequenceClassification, BertModel

    if classifier:
        model = BertForSequenceClassification.from_pretrained(base_dir, num_labels=3)
        encoder = model.bert
    else:
        model = encoder = BertModel.from_pretrained(base_dir)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in encoder.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def experts_file(tiny_model_dir, tiny_suite, tmp_path_factory):
    """An experts file with relative checkpoint paths, one task saved without a classifier."""
    root = tmp_path_factory.mktemp("experts")
    experts = []
    for index, (task, steps) in enumerate(EXPERT_STEPS.items()):
        checkpoints = []
        for step in steps:
            folder = root / task / f"checkpoint-{step}"
            save_checkpoint(
                tiny_model_dir,
                folder,
                seed=100 * index + step,
                scale=1e-3 * step / 10,
                classifier=task != "mood",
            )
            checkpoints.append({"step": step, "path": f"{task}/checkpoint-{step}"})
        experts.append({"task": task, "checkpoints": checkpoints})
    spec = {
        "base_model": str(tiny_model_dir),
        "device": "cpu",
        "data": {"root": str(tiny_suite), "tasks": list(EXPERT_STEPS)},
        "model": {"max_length": 16, "logit_scale": 10.0},
        "merging": {"methods": METHODS, "coefficients": [0.5, 1.0]},
        "evaluation": {"batch_size": 16},
        "experts": experts,
    }
    path = root / "experts.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def merged_run(experts_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("merged") / "run"
    assert main(["merge", "--experts", str(experts_file), "--out", str(run_dir), "--quiet"]) == 0
    return run_dir


def test_import_writes_task_vectors(merged_run, experts_file, tiny_model_dir):
    from transformers import AutoModel

    base = AutoModel.from_pretrained(tiny_model_dir).state_dict()
    tuned = AutoModel.from_pretrained(experts_file.parent / "topic/checkpoint-20").state_dict()
    path = merged_run / "checkpoints/full/topic/seed0/step20.safetensors"
    tensors = load_file(path)
    assert set(tensors) == set(base)
    assert torch.allclose(tensors[QUERY], tuned[QUERY] - base[QUERY])
    metadata = read_safetensors_metadata(path)
    assert metadata["step"] == "20"
    assert metadata["task"] == "topic"
    assert metadata["source"] == str(experts_file.parent / "topic/checkpoint-20")


def test_import_writes_resolved_config(merged_run, tiny_model_dir):
    config = yaml.safe_load((merged_run / "config.yaml").read_text())
    assert config["training"]["checkpoint_steps"] == UNION
    assert config["training"]["steps"] == 30
    assert config["model"]["base"] == str(tiny_model_dir)
    assert config["recorder"]["enabled"] is False


def test_import_fills_experts_table(merged_run):
    experts = pd.read_csv(merged_run / "results/experts.csv")
    for task, steps in EXPERT_STEPS.items():
        rows = experts[experts["task"] == task]
        assert sorted(rows["step"].unique()) == [0, *steps]
        assert len(rows) == 2 * (1 + len(steps))
    assert experts["accuracy"].between(0, 1).all()


def test_merge_covers_union_of_steps(merged_run):
    merges = pd.read_csv(merged_run / "results/merges.csv")
    for method in METHODS:
        assert sorted(merges.loc[merges["method"] == method, "step"].unique()) == UNION


def test_merge_reads_nearest_checkpoint(merged_run):
    # topic2 has no step 20, so the merge at step 20 takes its step 10; topic has no
    # step 30, so the merge at step 30 takes its step 20.
    from upcycle.cli import load_run_config
    from upcycle.workspace import Workspace

    ws = Workspace(load_run_config(str(merged_run)), merged_run)
    assert checkpoint_for(ws, "full", "topic2", 0, 20) == 10
    assert checkpoint_for(ws, "full", "topic", 0, 30) == 20
    merges = pd.read_csv(merged_run / "results/merges.csv")
    experts = pd.read_csv(merged_run / "results/experts.csv").set_index(["task", "step", "split"])
    for task, merge_step, expert_step in (("topic2", 20, 10), ("topic", 30, 20)):
        row = merges[
            (merges["method"] == "ties")
            & (merges["step"] == merge_step)
            & (merges["task"] == task)
            & (merges["split"] == "test")
        ].iloc[0]
        expected = experts.loc[(task, expert_step, "test"), "accuracy"]
        assert row["expert_accuracy"] == pytest.approx(expected)


def test_select_from_experts_file(experts_file, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["select", "--experts", str(experts_file), "--out", str(run_dir), "--quiet"]) == 0
    table = pd.read_csv(run_dir / "results/selection.csv")
    ties = list(table.loc[table["method"] == "ties", "strategy"])
    # The statistics rules have no difficulty.csv to read, so they are skipped.
    assert ties == [
        "final",
        "best-individual",
        "rule:patience",
        "rule:plateau",
        "best-common",
        "merge-aware",
    ]
    final = table[(table["method"] == "ties") & (table["strategy"] == "final")].iloc[0]
    assert final["steps"] == '{"topic": 20, "mood": 20, "topic2": 30}'
    assert final["compute_fraction"] == pytest.approx((20 + 20 + 30) / (3 * 30))


def test_import_resumes(merged_run, experts_file):
    path = merged_run / "checkpoints/full/mood/seed0/step10.safetensors"
    modified = path.stat().st_mtime_ns
    import_experts(experts_file, merged_run)
    assert path.stat().st_mtime_ns == modified
    assert RunDir(merged_run).is_complete("import/experts")


def test_changed_checkpoint_source_rejected(merged_run, experts_file):
    spec = yaml.safe_load(experts_file.read_text())
    spec["experts"][0]["checkpoints"][0]["path"] = str(experts_file.parent / "mood/checkpoint-10")
    changed = experts_file.parent / "changed.yaml"
    changed.write_text(yaml.safe_dump(spec, sort_keys=False))
    with pytest.raises(ConfigError, match="imported the topic expert from other checkpoints"):
        import_experts(changed, merged_run)


def test_other_base_model_rejected(tiny_model_dir, tiny_suite, tmp_path):
    make_tiny_model(tmp_path / "wide-bert", hidden_size=48)
    spec = {
        "base_model": str(tiny_model_dir),
        "device": "cpu",
        "data": {"root": str(tiny_suite), "tasks": ["topic"]},
        "experts": [{"task": "topic", "checkpoints": [{"step": 5, "path": "wide-bert"}]}],
    }
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(CheckpointError, match=r"checkpoint .*wide-bert: tensor '.*' has shape"):
        import_experts(path, tmp_path / "run")


def test_missing_checkpoint_folder_named(tiny_model_dir, tiny_suite, tmp_path):
    spec = {
        "base_model": str(tiny_model_dir),
        "data": {"root": str(tiny_suite), "tasks": ["topic"]},
        "experts": [{"task": "topic", "checkpoints": [{"step": 5, "path": "./nowhere"}]}],
    }
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(CheckpointError, match=r"checkpoint folder not found: \./nowhere"):
        import_experts(path, tmp_path / "run")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"experts": []}, r"experts: List should have at least 1 item"),
        ({"data": {"tasks": ["topic", "mood"]}}, r"tasks without an expert \['mood'\]"),
        ({"model": {"head": "linear"}}, r"model.head 'linear' is not supported"),
        ({"model": {"base": "x"}}, r"model.base is set by base_model"),
        ({"training": {"steps": 3}}, r"training: unknown key"),
    ],
)
def test_invalid_experts_file_rejected(tmp_path, change, message):
    spec = {
        "base_model": "base",
        "data": {"tasks": ["topic"]},
        "experts": [{"task": "topic", "checkpoints": [{"step": 5, "path": "a"}]}],
        **change,
    }
    path = tmp_path / "experts.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=message):
        import_experts(path, tmp_path / "run")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["select"], "upcycle select needs a run directory"),
        (["merge"], "upcycle merge needs a run directory"),
        (["select", "--experts", "e.yaml"], "--experts FILE needs --out RUN"),
        (["select", "RUN", "--experts", "e.yaml"], "give the run directory of --experts as --out"),
        (["select", "RUN", "--out", "OTHER"], "--out RUN names the run directory for --experts"),
        (["merge", "--experts", "e.yaml", "--out", "R", "--export", "ties"], "cannot be combined"),
    ],
)
def test_run_dir_arguments_rejected(arguments, message):
    args = build_parser().parse_args(arguments)
    with pytest.raises(ConfigError, match=message):
        run_dir_from_arguments(args)


def test_missing_run_dir_exits_cleanly(capsys):
    assert main(["select"]) == 2
    assert "upcycle select needs a run directory" in capsys.readouterr().err
