"""End-to-end runs on a tiny BERT built from a config and a generated task suite."""

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_model, tiny_config_dict
from upcycle.config import parse_config
from upcycle.errors import CheckpointError, ConfigError, ModelError
from upcycle.io import atomic_save_safetensors, read_safetensors_metadata
from upcycle.pipeline import run_all, run_evaluate
from upcycle.workspace import Workspace

METHODS = ["average", "task_arithmetic", "ties", "dare_task_arithmetic", "dare_ties"]


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tiny_suite, tmp_path_factory):
    config = parse_config(tiny_config_dict(tiny_model_dir, tiny_suite))
    run_dir = tmp_path_factory.mktemp("run")
    run_all(config, run_dir, progress=False)
    return config, run_dir


def test_run_writes_expert_rows(tiny_run):
    _, run_dir = tiny_run
    experts = pd.read_csv(run_dir / "results/experts.csv")
    # 3 tasks x (zero-shot + 3 checkpoint steps) x 2 splits.
    assert len(experts) == 3 * 4 * 2
    assert sorted(experts["step"].unique()) == [0, 3, 6, 12]
    assert experts["accuracy"].between(0, 1).all()


def test_run_writes_merge_rows(tiny_run):
    _, run_dir = tiny_run
    merges = pd.read_csv(run_dir / "results/merges.csv")
    merged = merges[merges["method"] != "zeroshot"]
    assert sorted(merged["method"].unique()) == sorted(METHODS)
    # 5 methods x 3 steps x 3 tasks x 2 splits.
    assert len(merged) == 5 * 3 * 3 * 2
    assert set(merges.loc[merges["method"] == "average", "coefficient"]) == {1.0}
    assert set(merges.loc[merges["method"] == "ties", "coefficient"]) <= {0.5, 1.0}


def test_normalized_accuracy_is_ratio(tiny_run):
    _, run_dir = tiny_run
    merges = pd.read_csv(run_dir / "results/merges.csv")
    experts = pd.read_csv(run_dir / "results/experts.csv")
    row = merges[(merges["method"] == "task_arithmetic") & (merges["step"] == 6)].iloc[0]
    expert = experts[(experts["task"] == row["task"]) & (experts["step"] == 6)
                     & (experts["split"] == row["split"])]["accuracy"].item()
    assert row["expert_accuracy"] == pytest.approx(expert)
    assert row["normalized_accuracy"] == pytest.approx(row["accuracy"] / expert)


def test_grid_has_every_coefficient(tiny_run):
    _, run_dir = tiny_run
    grid = pd.read_csv(run_dir / "results/merge_grid.csv")
    ta = grid[(grid["method"] == "task_arithmetic") & (grid["step"] == 3)]
    assert sorted(ta["coefficient"]) == [0.5, 1.0]


def test_summary_marks_best_step(tiny_run):
    _, run_dir = tiny_run
    summary = (run_dir / "summary.md").read_text()
    for method in METHODS:
        assert method in summary
    assert "| 0 (zero-shot) |" in summary
    assert "**" in summary


def test_checkpoint_is_task_vector(tiny_run, tiny_model_dir):
    config, run_dir = tiny_run
    from transformers import AutoModel

    tensors = load_file(run_dir / "checkpoints/full/topic/seed0/step12.safetensors")
    base = AutoModel.from_pretrained(tiny_model_dir).state_dict()
    name = "encoder.layer.0.attention.self.query.weight"
    assert tensors[name].shape == base[name].shape
    assert tensors[name].abs().sum() > 0
    metadata = read_safetensors_metadata(run_dir / "checkpoints/full/topic/seed0/step12.safetensors")
    assert metadata["step"] == "12"
    assert metadata["task"] == "topic"


def test_evaluate_reproduces_training_accuracy(tiny_run, tmp_path):
    config, run_dir = tiny_run
    before = pd.read_csv(run_dir / "results/experts.csv")
    run_evaluate(Workspace(config, run_dir))
    after = pd.read_csv(run_dir / "results/experts.csv")
    pd.testing.assert_frame_equal(before, after)


def test_rerun_skips_completed_work(tiny_run):
    config, run_dir = tiny_run
    path = run_dir / "checkpoints/full/topic/seed0/step3.safetensors"
    modified = path.stat().st_mtime_ns
    run_all(config, run_dir, progress=False)
    assert path.stat().st_mtime_ns == modified


def test_changed_config_rejected(tiny_run):
    config, run_dir = tiny_run
    changed = config.model_copy(deep=True)
    changed.training.learning_rate = 0.5
    with pytest.raises(ConfigError, match=r"config keys changed: training\.learning_rate"):
        run_all(changed, run_dir, progress=False)


def test_same_seed_same_checkpoints(tiny_model_dir, tiny_suite, tmp_path):
    raw = tiny_config_dict(tiny_model_dir, tiny_suite, seeds=[3])
    raw["data"]["tasks"] = ["topic"]
    raw["training"]["methods"] = ["full"]
    config = parse_config(raw)
    for name in ("a", "b"):
        run_all(config, tmp_path / name, progress=False)
    first = load_file(tmp_path / "a/checkpoints/full/topic/seed3/step12.safetensors")
    second = load_file(tmp_path / "b/checkpoints/full/topic/seed3/step12.safetensors")
    for name in first:
        assert torch.equal(first[name], second[name]), name
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "a/results/merges.csv"), pd.read_csv(tmp_path / "b/results/merges.csv")
    )


def test_linear_head_stored_per_task(tiny_model_dir, tiny_suite, tmp_path):
    raw = tiny_config_dict(tiny_model_dir, tiny_suite)
    raw["model"]["head"] = "linear"
    run_all(parse_config(raw), tmp_path, progress=False)
    tensors = load_file(tmp_path / "checkpoints/full/mood/seed0/step6.safetensors")
    assert tensors["head.linear.weight"].shape == (2, 32)
    merges = pd.read_csv(tmp_path / "results/merges.csv")
    assert "zeroshot" not in set(merges["method"])


def test_foreign_checkpoint_rejected(tiny_run, tmp_path):
    config, run_dir = tiny_run
    from upcycle.merging.sweep import load_expert

    ws = Workspace(config, run_dir)
    path = run_dir / "checkpoints/full/mood/seed0/step3.safetensors"
    original = path.read_bytes()
    tensors = load_file(path)
    metadata = read_safetensors_metadata(path)
    metadata["base_fingerprint"] = "0000"
    metadata["base_model"] = "another-model"
    atomic_save_safetensors(tensors, path, metadata)
    try:
        with pytest.raises(CheckpointError, match=r"step3.safetensors was fine-tuned from base model 'another-model'"):
            load_expert(ws, "full", "mood", 0, 3)
    finally:
        path.write_bytes(original)


def test_truncated_checkpoint_rejected(tiny_run):
    config, run_dir = tiny_run
    from upcycle.merging.sweep import load_expert

    ws = Workspace(config, run_dir)
    path = run_dir / "checkpoints/full/topic2/seed0/step3.safetensors"
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    try:
        with pytest.raises(CheckpointError, match=r"step3.safetensors is corrupt or truncated"):
            load_expert(ws, "full", "topic2", 0, 3)
    finally:
        path.write_bytes(original)


def test_missing_base_model_named(tiny_suite, tmp_path):
    raw = tiny_config_dict(tmp_path / "no-such-model", tiny_suite)
    ws = Workspace(parse_config(raw), tmp_path / "run")
    with pytest.raises(ModelError, match="base model folder not found: .*no-such-model"):
        ws.base_state


def test_other_base_shapes_rejected(tiny_run, tmp_path):
    config, run_dir = tiny_run
    from upcycle.merging.sweep import load_expert_file

    other = make_tiny_model(tmp_path / "wide", hidden_size=48)
    from transformers import AutoModel

    state = AutoModel.from_pretrained(other).state_dict()
    path = tmp_path / "foreign.safetensors"
    atomic_save_safetensors({k: torch.zeros_like(v) for k, v in state.items()}, path)
    with pytest.raises(CheckpointError, match=r"foreign.safetensors: tensor .* has shape"):
        load_expert_file(Workspace(config, run_dir), path, kind="full", task="topic", step=1)


def test_selection_change_resumes(tiny_run):
    config, run_dir = tiny_run
    changed = config.model_copy(deep=True)
    changed.selection.merge_aware_max_rounds = 1
    path = run_dir / "checkpoints/full/topic/seed0/step3.safetensors"
    modified = path.stat().st_mtime_ns
    run_all(changed, run_dir, progress=False)
    assert path.stat().st_mtime_ns == modified
    assert "merge_aware_max_rounds: 1" in (run_dir / "config.yaml").read_text()
