"""Resuming runs: SIGKILL at several points, interrupted fine-tunes, changed config or data.

The kill tests start `upcycle run` as a subprocess, wait until a trigger file appears in
the run directory, kill the process with SIGKILL, and start it again. After the last
restart every result, checkpoint and the summary must equal those of a run that was
never interrupted, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config_dict
from upcycle import cli
from upcycle.config import parse_config
from upcycle.pipeline import run_all
from upcycle.training import finetune

SRC = Path(__file__).resolve().parents[1] / "src"
TRIGGER_TIMEOUT_S = 120
"""Upper bound on the wait for a trigger file or a run's end, so a broken run fails instead
of hanging."""
BOOKKEEPING = {"manifest.json", "manifest.json.lock"}
"""Files that record timings or locks, so they differ between identical runs."""


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def file_digests(root: Path) -> dict[str, str]:
    """Map every file under `root` but the bookkeeping files to the SHA-256 of its bytes."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name not in BOOKKEEPING
    }


def kill_config(model_dir: Path, suite: Path) -> dict:
    """A tiny run long enough that each kill point lasts a good fraction of a second."""
    raw = tiny_config_dict(model_dir, suite)
    raw["data"]["tasks"] = ["topic", "mood"]
    raw["training"] = {
        "steps": 40,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "warmup_steps": 5,
        "checkpoint_steps": [5, 20, 40],
    }
    raw["merging"] = {
        "methods": ["task_arithmetic", "ties", "dare_ties"],
        "coefficients": [0.5, 1.0],
    }
    raw["selection"] = {"enabled": False}
    raw["report"] = {"enabled": False}
    return raw


class RunProcess:
    """`upcycle run` in a subprocess, with its log in a file so a full pipe never blocks it."""

    def __init__(self, config: Path, run_dir: Path, log: Path) -> None:
        python_path = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}
        command = [sys.executable, "-m", "upcycle.cli", "run", str(config), "--out", str(run_dir)]
        self.log = log
        with open(log, "w") as handle:
            self.process = subprocess.Popen(
                [*command, "--quiet"], env=env, stdout=handle, stderr=subprocess.STDOUT
            )

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=TRIGGER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise

    def kill_when(self, trigger: Callable[[], bool]) -> bool:
        """SIGKILL the run as soon as `trigger()` is true; return False if it ended first."""
        deadline = time.monotonic() + TRIGGER_TIMEOUT_S
        while not trigger():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                self.process.wait()
                return False
            time.sleep(0.002)
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        return True


@pytest.fixture(scope="module")
def killed_runs(tiny_model_dir, tiny_suite, tmp_path_factory):
    """An uninterrupted run and one killed at each kill point and restarted, with notes."""
    root = tmp_path_factory.mktemp("kill")
    raw = kill_config(tiny_model_dir, tiny_suite)
    config = write_config(root / "config.yaml", raw)
    # The uninterrupted run runs in this process to save a start-up, with the one torch
    # thread that OMP_NUM_THREADS=1 gives the subprocesses, so the kernels are the same.
    reference = root / "reference"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_all(parse_config(raw), reference, progress=False)
    finally:
        torch.set_num_threads(threads)

    killed = root / "killed"
    mood = killed / "checkpoints/full/mood/seed0"
    points = {
        # The second task has saved its first checkpoint and training state.
        "finetune": lambda: (mood / finetune.STATE_FILE).is_file(),
        "merge": lambda: any((killed / "merges").rglob("step*.csv")),
        "analyze": lambda: any((killed / "analysis").rglob("step*.csv")),
    }
    notes = {"reached": {}, "manifest": {}, "logs": []}
    for index, (name, trigger) in enumerate(points.items()):
        log = root / f"killed-{index}.log"
        notes["reached"][name] = RunProcess(config, killed, log).kill_when(trigger)
        notes["logs"].append(log.read_text())
        notes["manifest"][name] = (killed / "manifest.json").read_text()
    log = root / "killed-final.log"
    notes["returncode"] = RunProcess(config, killed, log).wait()
    notes["logs"].append(log.read_text())
    return reference, killed, notes


@pytest.mark.parametrize("point", ["finetune", "merge", "analyze"])
def test_kill_point_reached(killed_runs, point):
    _, _, notes = killed_runs
    assert notes["reached"][point]


def completed_after_kill(notes: dict, point: str) -> dict:
    return json.loads(notes["manifest"][point])["completed"]


def test_manifest_parses_after_kill(killed_runs):
    _, _, notes = killed_runs
    for point in notes["manifest"]:
        assert isinstance(completed_after_kill(notes, point), dict), point


def test_kill_mid_finetune_leaves_expert_open(killed_runs):
    _, _, notes = killed_runs
    completed = completed_after_kill(notes, "finetune")
    assert "finetune/full/topic/seed0" in completed
    assert "finetune/full/mood/seed0" not in completed


def test_kill_mid_merge_leaves_step_open(killed_runs):
    _, _, notes = killed_runs
    assert "merge/full/seed0/step40" not in completed_after_kill(notes, "merge")


def test_kill_mid_analyze_leaves_step_open(killed_runs):
    _, _, notes = killed_runs
    assert "analysis/full/seed0/step40" not in completed_after_kill(notes, "analyze")


def test_restart_resumes_from_checkpoint(killed_runs):
    _, _, notes = killed_runs
    restart_log = notes["logs"][1]
    assert "finetune/full/mood/seed0: resuming after step" in restart_log
    assert "finetune/full/topic/seed0: already complete, skipped" in restart_log


def test_resumed_run_finishes(killed_runs):
    _, _, notes = killed_runs
    assert notes["returncode"] == 0


def test_resumed_files_match(killed_runs):
    reference, killed, _ = killed_runs
    expected = file_digests(reference)
    actual = file_digests(killed)
    assert sorted(actual) == sorted(expected)
    for name, digest in expected.items():
        assert actual[name] == digest, name


def test_resumed_results_match(killed_runs):
    reference, killed, _ = killed_runs
    names = sorted(path.name for path in (reference / "results").glob("*.csv"))
    assert {"experts.csv", "merges.csv", "difficulty.csv", "forgetting.csv"} <= set(names)
    for name in names:
        expected = (reference / "results" / name).read_bytes()
        assert (killed / "results" / name).read_bytes() == expected, name


def test_resumed_summary_matches(killed_runs):
    reference, killed, _ = killed_runs
    assert (killed / "summary.md").read_text() == (reference / "summary.md").read_text()


def test_resumed_checkpoints_match(killed_runs):
    reference, killed, _ = killed_runs
    paths = sorted((reference / "checkpoints").rglob("*.safetensors"))
    assert len(paths) == 2 * 3
    for path in paths:
        expected = load_file(path)
        actual = load_file(killed / path.relative_to(reference))
        for name, tensor in expected.items():
            assert torch.equal(actual[name], tensor), f"{path.relative_to(reference)}: {name}"


def test_no_temp_files_left(killed_runs):
    _, killed, _ = killed_runs
    assert sorted(killed.rglob("*.tmp")) == []


def test_no_training_state_left(killed_runs):
    _, killed, _ = killed_runs
    assert sorted(killed.rglob(finetune.STATE_FILE)) == []


# --- Interrupted in-process fine-tunes -------------------------------------------------------


class CrashAtStep(Exception):
    """Raised by the patched batch order to stop a fine-tune midway."""


def crash_at_step(monkeypatch, crash_step: int) -> None:
    """Make the fine-tuning loop raise `CrashAtStep` when it reaches `crash_step`."""
    original = finetune.batch_indices

    def batch_indices(step: int, **options):
        if step == crash_step:
            raise CrashAtStep
        return original(step, **options)

    monkeypatch.setattr(finetune, "batch_indices", batch_indices)


def one_task_config(model_dir: Path, suite: Path, *, kind: str, head: str) -> dict:
    raw = tiny_config_dict(model_dir, suite)
    raw["data"]["tasks"] = ["mood"]
    raw["model"]["head"] = head
    raw["training"] = {
        "methods": [kind],
        "steps": 20,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "warmup_steps": 2,
        "checkpoint_steps": [5, 12, 20],
        "lora": {"rank": 4, "dropout": 0.1, "learning_rate": 1e-2},
    }
    raw["merging"] = {"methods": ["task_arithmetic"], "coefficients": [1.0], "lora_methods": []}
    for section in ("analysis", "selection", "report"):
        raw[section] = {"enabled": False}
    return raw


@pytest.mark.parametrize(
    ("kind", "head"), [("lora", "label-embedding"), ("full", "linear"), ("full", "label-embedding")]
)
def test_interrupted_finetune_matches(
    tiny_model_dir, tiny_suite, tmp_path, monkeypatch, kind, head
):
    config = parse_config(one_task_config(tiny_model_dir, tiny_suite, kind=kind, head=head))
    run_all(config, tmp_path / "reference", progress=False)

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as patch:
        crash_at_step(patch, 9)
        with pytest.raises(CrashAtStep):
            run_all(config, resumed, progress=False)
    expert = f"checkpoints/{kind}/mood/seed0"
    assert (resumed / expert / finetune.STATE_FILE).is_file()
    run_all(config, resumed, progress=False)

    for name in ("step5", "step12", "step20"):
        expected = load_file(tmp_path / "reference" / expert / f"{name}.safetensors")
        actual = load_file(resumed / expert / f"{name}.safetensors")
        for tensor_name, tensor in expected.items():
            assert torch.equal(actual[tensor_name], tensor), f"{name}: {tensor_name}"
    for name in ("accuracy.csv", "difficulty.csv"):
        expected = (tmp_path / "reference" / expert / name).read_bytes()
        assert (resumed / expert / name).read_bytes() == expected, name
    pd.testing.assert_frame_equal(
        pd.read_parquet(resumed / expert / "examples.parquet"),
        pd.read_parquet(tmp_path / "reference" / expert / "examples.parquet"),
    )


def test_interrupted_el2n_restored(tiny_model_dir, tiny_suite, tmp_path, monkeypatch):
    config = parse_config(
        one_task_config(tiny_model_dir, tiny_suite, kind="full", head="label-embedding")
    )
    with monkeypatch.context() as patch:
        crash_at_step(patch, 9)
        with pytest.raises(CrashAtStep):
            run_all(config, tmp_path, progress=False)
    # EL2N is computed at the first checkpoint (step 5), before the crash, so the resumed
    # fine-tune must take it from the training state instead of leaving it NaN.
    calls = []
    monkeypatch.setattr(finetune, "compute_el2n", lambda *args: calls.append(args))
    run_all(config, tmp_path, progress=False)
    examples = pd.read_parquet(tmp_path / "checkpoints/full/mood/seed0/examples.parquet")
    assert calls == []
    assert examples["el2n"].notna().all()


# --- Changed config, changed data, leftovers -------------------------------------------------


@pytest.fixture
def small_run(tiny_model_dir, tiny_suite, tmp_path, capsys):
    """A finished one-task run on a copy of the suite that the test may change."""
    import shutil

    suite = tmp_path / "suite"
    shutil.copytree(tiny_suite / "mood", suite / "mood")
    raw = one_task_config(tiny_model_dir, suite, kind="full", head="label-embedding")
    config = write_config(tmp_path / "config.yaml", raw)
    run_dir = tmp_path / "run"
    assert cli.main(["run", str(config), "--out", str(run_dir), "--quiet"]) == 0
    capsys.readouterr()
    return config, run_dir, suite


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli.main([*args, "--quiet"])
    return code, capsys.readouterr().err


def test_changed_data_named(small_run, capsys):
    config, run_dir, suite = small_run
    train = suite / "mood/train.jsonl"
    train.write_text(train.read_text().replace("great", "lovely", 1))
    code, err = run_cli(capsys, "run", str(config), "--out", str(run_dir))
    assert code == 2
    assert f"input files changed: {train}" in err
    assert "pass --force" in err


def test_force_after_data_change_recomputes(small_run, capsys, caplog):
    caplog.set_level(logging.INFO)
    config, run_dir, suite = small_run
    checkpoint = run_dir / "checkpoints/full/mood/seed0/step20.safetensors"
    before = checkpoint.read_bytes()
    train = suite / "mood/train.jsonl"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(reversed(lines)) + "\n")
    code, _ = run_cli(capsys, "run", str(config), "--out", str(run_dir), "--force")
    assert code == 0
    assert f"--force: input files changed: {train}" in caplog.text
    assert checkpoint.read_bytes() != before


def test_new_config_key_default_resumes(small_run, capsys, caplog):
    caplog.set_level(logging.INFO)
    config, run_dir, _ = small_run
    # A run directory started before a key existed has no such key in its config.yaml.
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    del stored["recorder"]["full_gradient_examples"]
    write_config(run_dir / "config.yaml", stored)
    code, _ = run_cli(capsys, "run", str(config), "--out", str(run_dir))
    assert code == 0
    assert "finetune/full/mood/seed0: already complete, skipped" in caplog.text


def test_new_config_key_changed_named(small_run, capsys):
    config, run_dir, _ = small_run
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    del stored["training"]["weight_decay"]
    write_config(run_dir / "config.yaml", stored)
    code, err = run_cli(
        capsys, "run", str(config), "--out", str(run_dir), "--set", "training.weight_decay=0.1"
    )
    assert code == 2
    assert "config keys changed: training.weight_decay" in err


def test_stale_training_state_removed(small_run, capsys):
    config, run_dir, _ = small_run
    # A run killed between marking the expert complete and deleting its state leaves this.
    state = run_dir / "checkpoints/full/mood/seed0" / finetune.STATE_FILE
    state.write_bytes(b"left behind")
    before = file_digests(run_dir)
    code, _ = run_cli(capsys, "run", str(config), "--out", str(run_dir))
    assert code == 0
    assert not state.exists()
    del before[state.relative_to(run_dir).as_posix()]
    assert file_digests(run_dir) == before


def test_stale_temp_file_removed(small_run, capsys):
    config, run_dir, _ = small_run
    leftover = run_dir / "results" / ".experts.csv.k2j3x9.tmp"
    leftover.write_bytes(b"half a table")
    code, _ = run_cli(capsys, "run", str(config), "--out", str(run_dir))
    assert code == 0
    assert not leftover.exists()


def test_moved_data_folder_resumes(small_run, capsys, caplog):
    import shutil

    caplog.set_level(logging.INFO)
    config, run_dir, suite = small_run
    moved = suite.parent / "moved-suite"
    shutil.copytree(suite, moved)
    code, _ = run_cli(capsys, "run", str(config), "--out", str(run_dir), "--set", f"data.root={moved}")
    assert code == 0
    assert "finetune/full/mood/seed0: already complete, skipped" in caplog.text


def test_other_data_folder_with_changed_file_named(small_run, capsys):
    import shutil

    config, run_dir, suite = small_run
    other = suite.parent / "other-suite"
    shutil.copytree(suite, other)
    test_split = other / "mood/test.jsonl"
    test_split.write_text(test_split.read_text().replace("great", "lovely", 1))
    code, err = run_cli(capsys, "run", str(config), "--out", str(run_dir), "--set", f"data.root={other}")
    assert code == 2
    assert f"input files changed: {test_split}" in err


def test_other_data_folder_with_extra_file_named(small_run, capsys):
    import shutil

    config, run_dir, suite = small_run
    other = suite.parent / "other-suite"
    shutil.copytree(suite, other)
    extra = other / "mood/notes.txt"
    extra.write_text("added later\n")
    code, err = run_cli(capsys, "run", str(config), "--out", str(run_dir), "--set", f"data.root={other}")
    assert code == 2
    assert f"input files added: {extra}" in err


def test_later_command_reads_recorded_data_folder(
    tiny_model_dir, tiny_suite, tmp_path, capsys, caplog, monkeypatch
):
    caplog.set_level(logging.INFO)
    monkeypatch.delenv("UPCYCLE_DATA", raising=False)
    raw = one_task_config(tiny_model_dir, tiny_suite, kind="full", head="label-embedding")
    del raw["data"]["root"]
    config = write_config(tmp_path / "config.yaml", raw)
    run_dir = tmp_path / "run"
    code, _ = run_cli(capsys, "run", str(config), "--out", str(run_dir), "--data", str(tiny_suite))
    assert code == 0
    code, err = run_cli(capsys, "select", str(run_dir), "--rule", "patience", "--param", "patience=1")
    assert code == 0, err
    assert f"reading the tasks from {tiny_suite.resolve()}" in caplog.text


def test_merge_step_without_export_rejected(small_run, capsys):
    _, run_dir, _ = small_run
    code, err = run_cli(capsys, "merge", str(run_dir), "--step", "20", "--seed", "0")
    assert code == 2
    assert "--step, --seed apply only with --export METHOD" in err
