"""Data pruning from an earlier run's examples.parquet, and the comparison of two runs."""

import json
import logging

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config_dict

from upcycle.analysis.pruning import compare_runs, hardest_indices
from upcycle.config import parse_config
from upcycle.errors import ConfigError
from upcycle.io import atomic_write_parquet
from upcycle.store import file_sha256
from upcycle.workspace import Workspace

TASKS = ["topic", "mood", "topic2"]
TRAIN_SIZE = 48

# One hand-made score column per score; fraction 0.1 of 48 examples removes 4 of them.
SCORES = {
    # NaN (never learned) first, lower index first among ties: 7, 30, then 2 (40), 11 (30).
    "learned_step": ({7: np.nan, 30: np.nan, 2: 40.0, 11: 30.0, 44: 30.0}, 5.0, {2, 7, 11, 30}),
    "el2n": ({0: 0.9, 47: 0.8, 20: 0.7, 21: 0.6, 22: 0.5}, 0.1, {0, 20, 21, 47}),
    "forgetting_events": ({5: 3, 6: 3, 9: 2, 40: 1, 41: 1}, 0, {5, 6, 9, 40}),
    "final_loss": ({12: np.nan, 13: 2.0, 14: 1.5, 15: 1.0, 16: 0.9}, 0.2, {12, 13, 14, 15}),
}


def score_column(name: str) -> np.ndarray:
    special, default, _ = SCORES[name]
    values = np.full(TRAIN_SIZE, default, dtype=np.float64)
    for index, value in special.items():
        values[index] = value
    return values


def examples_frame(seed: int = 0, kind: str = "full") -> pd.DataFrame:
    frames = []
    for task in TASKS:
        frame = pd.DataFrame({name: score_column(name) for name in SCORES})
        frame.insert(0, "index", np.arange(TRAIN_SIZE))
        frame.insert(0, "task", task)
        frame.insert(0, "kind", kind)
        frame.insert(0, "seed", seed)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


@pytest.fixture
def earlier_run(tmp_path, tiny_suite):
    """A run directory with a config and a hand-made results/examples.parquet."""
    root = tmp_path / "earlier"
    root.mkdir()
    config = parse_config(tiny_config_dict(tmp_path / "model", tiny_suite))
    (root / "config.yaml").write_text(config.to_yaml())
    atomic_write_parquet(root / "results/examples.parquet", examples_frame())
    return root


def pruned_workspace(tmp_path, suite, prune: dict, **data) -> Workspace:
    raw = tiny_config_dict(tmp_path / "model", suite)
    raw["data"].update(data, prune=prune)
    return Workspace(parse_config(raw), tmp_path / "pruned")


def unpruned_train(tmp_path, suite, task: str) -> list[str]:
    config = parse_config(tiny_config_dict(tmp_path / "model", suite))
    return Workspace(config, tmp_path / "plain").tasks[task].splits["train"].texts


@pytest.mark.parametrize("score", list(SCORES))
def test_prune_removes_hardest(score, earlier_run, tmp_path, tiny_suite):
    ws = pruned_workspace(
        tmp_path, tiny_suite, {"run": str(earlier_run), "score": score, "fraction": 0.1}
    )
    removed = SCORES[score][2]
    for task in TASKS:
        original = unpruned_train(tmp_path, tiny_suite, task)
        expected = [text for i, text in enumerate(original) if i not in removed]
        assert ws.tasks[task].splits["train"].texts == expected, task


def test_prune_keeps_labels_aligned(earlier_run, tmp_path, tiny_suite):
    ws = pruned_workspace(tmp_path, tiny_suite, {"run": str(earlier_run), "fraction": 0.1})
    plain = Workspace(
        parse_config(tiny_config_dict(tmp_path / "model", tiny_suite)), tmp_path / "p"
    )
    original = plain.tasks["mood"].splits["train"]
    kept = [i for i in range(TRAIN_SIZE) if i not in SCORES["learned_step"][2]]
    assert ws.tasks["mood"].splits["train"].labels == [original.labels[i] for i in kept]


def test_prune_keeps_evaluation_splits(earlier_run, tmp_path, tiny_suite):
    ws = pruned_workspace(tmp_path, tiny_suite, {"run": str(earlier_run), "fraction": 0.1})
    plain = Workspace(
        parse_config(tiny_config_dict(tmp_path / "model", tiny_suite)), tmp_path / "p"
    )
    for split in ("validation", "test"):
        assert ws.tasks["topic"].splits[split].texts == plain.tasks["topic"].splits[split].texts


def test_prune_logs_removed_count(earlier_run, tmp_path, tiny_suite, caplog):
    ws = pruned_workspace(tmp_path, tiny_suite, {"run": str(earlier_run), "fraction": 0.1})
    with caplog.at_level(logging.INFO, logger="upcycle.analysis.pruning"):
        _ = ws.tasks
    assert "task topic2: removed 4 of 48 training examples, the hardest by learned_step" in (
        caplog.text
    )


def test_prune_fraction_zero_keeps_all(earlier_run, tmp_path, tiny_suite):
    ws = pruned_workspace(tmp_path, tiny_suite, {"run": str(earlier_run), "fraction": 0.0})
    assert len(ws.tasks["topic"].splits["train"]) == TRAIN_SIZE


def test_prune_reads_chosen_seed(earlier_run, tmp_path, tiny_suite):
    frame = pd.concat([examples_frame(seed=0), examples_frame(seed=3).assign(el2n=0.5)])
    # Seed 3 ranks by a constant EL2N, so ties remove the four lowest indices.
    atomic_write_parquet(earlier_run / "results/examples.parquet", frame)
    prune = {"run": str(earlier_run), "score": "el2n", "fraction": 0.1, "seed": 3}
    ws = pruned_workspace(tmp_path, tiny_suite, prune)
    original = unpruned_train(tmp_path, tiny_suite, "topic")
    assert ws.tasks["topic"].splits["train"].texts == original[4:]


def test_hardest_indices_rounds_fraction():
    # 0.29 * 100 is 28.999999999999996 in floating point.
    assert len(hardest_indices(np.arange(100.0), 0.29)) == 29


def test_hardest_indices_sorted_output():
    scores = np.array([0.5, np.nan, 0.9, 0.1, 0.7])
    assert hardest_indices(scores, 0.6).tolist() == [1, 2, 4]


def test_hardest_indices_rejects_fraction():
    with pytest.raises(ConfigError, match=r"data.prune.fraction must lie in \[0, 1\), got 1.0"):
        hardest_indices(np.zeros(4), 1.0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"max_train_examples": 40},
            r"data.max_train_examples is 40 in this config but None in .*earlier",
        ),
        ({"subsample_seed": 2}, r"data.subsample_seed is 2 in this config but 0 in .*earlier"),
    ],
)
def test_mismatched_data_setting_named(data, message, earlier_run, tmp_path, tiny_suite):
    ws = pruned_workspace(tmp_path, tiny_suite, {"run": str(earlier_run), "fraction": 0.1}, **data)
    with pytest.raises(ConfigError, match=message):
        _ = ws.tasks


def test_mismatched_task_source_named(earlier_run, tmp_path, tiny_suite):
    raw = tiny_config_dict(tmp_path / "model", tiny_suite)
    raw["data"]["tasks"] = ["topic", {"name": "mood", "labels": ["good", "bad"]}, "topic2"]
    raw["data"]["prune"] = {"run": str(earlier_run), "fraction": 0.1}
    ws = Workspace(parse_config(raw), tmp_path / "pruned")
    expected = r"data.tasks\[mood\].labels is \['good', 'bad'\] in this config but None in"
    with pytest.raises(ConfigError, match=expected):
        _ = ws.tasks


def test_pruned_earlier_run_rejected(earlier_run, tmp_path, tiny_suite):
    raw = tiny_config_dict(tmp_path / "model", tiny_suite)
    raw["data"]["prune"] = {"run": str(tmp_path / "first"), "fraction": 0.2}
    (earlier_run / "config.yaml").write_text(parse_config(raw).to_yaml())
    ws = pruned_workspace(tmp_path, tiny_suite, {"run": str(earlier_run), "fraction": 0.1})
    with pytest.raises(ConfigError, match=r"earlier was itself pruned \(data.prune.fraction 0.2"):
        _ = ws.tasks


def test_task_missing_from_earlier_run(earlier_run, tmp_path, tiny_suite):
    raw = tiny_config_dict(tmp_path / "model", tiny_suite)
    raw["data"]["tasks"] = ["topic", "mood"]
    (earlier_run / "config.yaml").write_text(parse_config(raw).to_yaml())
    ws = pruned_workspace(tmp_path, tiny_suite, {"run": str(earlier_run), "fraction": 0.1})
    with pytest.raises(ConfigError, match=r"task 'topic2' is not one of its tasks"):
        _ = ws.tasks


def test_missing_examples_file_named(earlier_run, tmp_path, tiny_suite):
    (earlier_run / "results/examples.parquet").unlink()
    ws = pruned_workspace(tmp_path, tiny_suite, {"run": str(earlier_run), "fraction": 0.1})
    expected = rf"{earlier_run}/results/examples.parquet not found. Fine-tuning writes it"
    with pytest.raises(ConfigError, match=expected):
        _ = ws.tasks


def test_missing_run_directory_named(tmp_path, tiny_suite):
    ws = pruned_workspace(tmp_path, tiny_suite, {"run": str(tmp_path / "nowhere"), "fraction": 0.1})
    with pytest.raises(ConfigError, match=r"nowhere is not a run directory"):
        _ = ws.tasks


def test_missing_seed_lists_available(earlier_run, tmp_path, tiny_suite):
    prune = {"run": str(earlier_run), "fraction": 0.1, "seed": 5, "kind": "lora"}
    ws = pruned_workspace(tmp_path, tiny_suite, prune)
    with pytest.raises(
        ConfigError, match=r"no rows of seed 5 and kind 'lora'; it has .*\(0, 'full'\)"
    ):
        _ = ws.tasks


def test_wrong_example_count_rejected(earlier_run, tmp_path, tiny_suite):
    frame = examples_frame()
    atomic_write_parquet(earlier_run / "results/examples.parquet", frame[frame["index"] < 40])
    ws = pruned_workspace(tmp_path, tiny_suite, {"run": str(earlier_run), "fraction": 0.1})
    with pytest.raises(ConfigError, match=r"has 40 learned_step scores for task 'topic'"):
        _ = ws.tasks


def test_score_missing_everywhere_rejected(earlier_run, tmp_path, tiny_suite):
    atomic_write_parquet(
        earlier_run / "results/examples.parquet", examples_frame().assign(el2n=np.nan)
    )
    prune = {"run": str(earlier_run), "score": "el2n", "fraction": 0.1}
    ws = pruned_workspace(tmp_path, tiny_suite, prune)
    with pytest.raises(ConfigError, match=r"el2n is missing for every example of task 'topic'"):
        _ = ws.tasks


def test_changed_task_file_rejected(earlier_run, tmp_path, tiny_suite):
    manifest = {
        "version": 1,
        "config_hash": "0",
        "inputs": {"train.jsonl": file_sha256(tiny_suite / "mood/train.jsonl")},
        "completed": {},
    }
    (earlier_run / "manifest.json").write_text(json.dumps(manifest))
    ws = pruned_workspace(tmp_path, tiny_suite, {"run": str(earlier_run), "fraction": 0.1})
    with pytest.raises(ConfigError, match=r"the task files \[.*topic/labels.json"):
        _ = ws.tasks


def test_fraction_needs_run():
    raw = {"data": {"tasks": ["a"], "prune": {"fraction": 0.2}}}
    with pytest.raises(ConfigError, match=r"data.prune: fraction 0.2 needs data.prune.run"):
        parse_config(raw)


def write_tables(root, merged: dict, experts: dict) -> None:
    """Write merges.csv and experts.csv rows: (method, step) -> per-task test accuracies."""
    rows = []
    for (method, step), accuracies in merged.items():
        for task, accuracy in zip(TASKS, accuracies):
            rows.append(
                {
                    "seed": 0,
                    "method": method,
                    "step": step,
                    "coefficient": 1.0,
                    "task": task,
                    "split": "test",
                    "accuracy": accuracy,
                    "expert_accuracy": 1.0,
                    "normalized_accuracy": accuracy,
                }
            )
    (root / "results").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(root / "results/merges.csv", index=False)
    rows = [
        {"seed": 0, "task": task, "step": step, "split": "test", "accuracy": accuracy, "n": 10}
        for step, accuracies in experts.items()
        for task, accuracy in zip(TASKS, accuracies)
    ]
    if rows:
        pd.DataFrame(rows).to_csv(root / "results/experts.csv", index=False)


def test_compare_runs_differences(tmp_path):
    write_tables(
        tmp_path / "a",
        {("ties", 5): [0.6, 0.6, 0.6], ("zeroshot", 0): [0.3, 0.3, 0.3]},
        {0: [0.3, 0.3, 0.3], 5: [0.9, 0.9, 0.6]},
    )
    write_tables(tmp_path / "b", {("ties", 5): [0.9, 0.6, 0.6]}, {5: [0.9, 0.9, 0.9]})
    table = compare_runs(tmp_path / "a", tmp_path / "b")
    assert table[["kind", "method", "step"]].values.tolist() == [
        ["full", "experts", 5],
        ["full", "ties", 5],
    ]
    assert table["accuracy_a"].tolist() == pytest.approx([0.8, 0.6])
    assert table["accuracy_b"].tolist() == pytest.approx([0.9, 0.7])
    assert table["difference"].tolist() == pytest.approx([0.1, 0.1])


def test_compare_runs_keeps_unmatched_steps(tmp_path):
    write_tables(tmp_path / "a", {("ties", 5): [0.6] * 3, ("ties", 9): [0.3] * 3}, {})
    write_tables(tmp_path / "b", {("ties", 5): [0.9] * 3}, {})
    table = compare_runs(tmp_path / "a", tmp_path / "b").set_index("step")
    assert np.isnan(table.loc[9, "accuracy_b"])
    assert np.isnan(table.loc[9, "difference"])
