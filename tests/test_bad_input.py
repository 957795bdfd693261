"""The bad-input catalogue, each case met the way a user meets it: through `upcycle`.

For every error the command exits with status 2, prints `upcycle: error: ...` naming the
culprit (file and line, task, tensor or key) on stderr, and leaves every file of an
existing run directory as it was. The cases:

- Task files: a malformed JSON line, a malformed CSV line, an example without a label,
  a label id outside the class list, an empty or whitespace-only text, a class list of
  one class. A class without examples is a warning, not an error.
- Config: duplicate task names, a train split smaller than one batch.
- Texts longer than model.max_length are truncated, and the log counts them.
- Fine-tuning: a NaN loss stops the fine-tune and keeps the last good checkpoint, and a
  rerun resumes from it.
- Checkpoints: a corrupt or truncated safetensors file, and one from another base model.
  Both are named, and `upcycle run` recomputes them.
- A full disk while writing keeps the previous file and leaves no temporary file.

Lower-level checks of the loaders and the config live in test_data.py and test_config.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tiny_model, tiny_config_dict
from upcycle import cli
from upcycle.config import parse_config
from upcycle.io import atomic_save_safetensors, load_safetensors, read_safetensors_metadata
from upcycle.training import finetune
from upcycle.workspace import Workspace

TASKS = ["topic", "mood"]


def bad_input_config(model_dir: Path, suite: Path) -> dict:
    raw = tiny_config_dict(model_dir, suite)
    raw["data"]["tasks"] = list(TASKS)
    raw["training"] = {
        "steps": 6,
        "batch_size": 8,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "checkpoint_steps": [3, 6],
    }
    raw["merging"] = {"methods": ["task_arithmetic", "ties"], "coefficients": [1.0]}
    for section in ("analysis", "selection", "report"):
        raw[section] = {"enabled": False}
    return raw


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def file_digests(root: Path) -> dict[str, str]:
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def assert_same_results(run_dir: Path, expected: Path) -> None:
    """Check every file but the manifest, whose entries record durations, and its units."""
    actual_files = file_digests(run_dir)
    expected_files = file_digests(expected)
    for files in (actual_files, expected_files):
        del files["manifest.json"]
    assert actual_files == expected_files
    units = json.loads((run_dir / "manifest.json").read_text())["completed"]
    expected_units = json.loads((expected / "manifest.json").read_text())["completed"]
    assert sorted(units) == sorted(expected_units)


def same_config_file(run_dir: Path) -> Path:
    """Write the run's resolved config beside the run, for `upcycle run` to resume it."""
    raw = yaml.safe_load((run_dir / "config.yaml").read_text())
    return write_config(run_dir.parent / "config.yaml", raw)


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = cli.main([*args, "--quiet"])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tiny_suite, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    config = write_config(root / "config.yaml", bad_input_config(tiny_model_dir, tiny_suite))
    assert cli.main(["run", str(config), "--out", str(root / "run"), "--quiet"]) == 0
    return root / "run"


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A copy of the finished run that the test may rerun or damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


@pytest.fixture
def suite_copy(tiny_suite, tmp_path) -> Path:
    for task in TASKS:
        shutil.copytree(tiny_suite / task, tmp_path / "suite" / task)
    return tmp_path / "suite"


def rerun_forced(capsys, tiny_model_dir, suite: Path, run_dir: Path, **changes) -> str:
    """Run `upcycle run --force` on `run_dir` with `suite`; return stderr after exit code 2."""
    raw = bad_input_config(tiny_model_dir, suite)
    for section, values in changes.items():
        raw[section].update(values)
    config = write_config(run_dir.parent / "bad.yaml", raw)
    code, err = run_cli(capsys, "run", str(config), "--out", str(run_dir), "--force")
    assert code == 2
    assert err.startswith("upcycle: error: ")
    return err


def replace_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


# --- Task files ------------------------------------------------------------------------------


def test_malformed_json_line(capsys, tiny_model_dir, suite_copy, run_copy):
    before = file_digests(run_copy)
    path = suite_copy / "mood/train.jsonl"
    replace_line(path, 5, '{"text": "the sad match", "label": ')
    err = rerun_forced(capsys, tiny_model_dir, suite_copy, run_copy)
    assert f"{path}:5: invalid JSON in task 'mood'" in err
    assert file_digests(run_copy) == before


def test_malformed_csv_line(capsys, tiny_model_dir, suite_copy, run_copy):
    before = file_digests(run_copy)
    folder = suite_copy / "mood"
    for split in ("train", "validation", "test"):
        rows = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
        lines = ["text,label", *(f"{row['text']},{row['label']}" for row in rows)]
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    replace_line(folder / "validation.csv", 4, "sad,match,1")
    raw = bad_input_config(tiny_model_dir, suite_copy)
    raw["data"]["tasks"] = ["topic", {"name": "mood", "format": "csv"}]
    config = write_config(run_copy.parent / "bad.yaml", raw)
    code, err = run_cli(capsys, "run", str(config), "--out", str(run_copy), "--force")
    assert code == 2
    assert f"{folder / 'validation.csv'}:4: expected 2 fields" in err
    assert file_digests(run_copy) == before


def test_example_without_label(capsys, tiny_model_dir, suite_copy, run_copy):
    before = file_digests(run_copy)
    path = suite_copy / "topic/test.jsonl"
    replace_line(path, 2, '{"text": "the coach was happy"}')
    err = rerun_forced(capsys, tiny_model_dir, suite_copy, run_copy)
    assert f"{path}:2: missing column 'label'" in err
    assert file_digests(run_copy) == before


def test_label_id_outside_classes(capsys, tiny_model_dir, suite_copy, run_copy):
    before = file_digests(run_copy)
    path = suite_copy / "mood/train.jsonl"
    replace_line(path, 7, '{"text": "the match was fine", "label": 2}')
    err = rerun_forced(capsys, tiny_model_dir, suite_copy, run_copy)
    assert f"{path}:7: label 2 is outside range(2) in task 'mood'" in err
    assert file_digests(run_copy) == before


@pytest.mark.parametrize("text", ["", "  \t "])
def test_blank_text(capsys, tiny_model_dir, suite_copy, run_copy, text):
    before = file_digests(run_copy)
    path = suite_copy / "topic/validation.jsonl"
    replace_line(path, 3, json.dumps({"text": text, "label": 0}))
    err = rerun_forced(capsys, tiny_model_dir, suite_copy, run_copy)
    assert f"{path}:3: empty or whitespace-only text in task 'topic'" in err
    assert file_digests(run_copy) == before


def test_single_class_list(capsys, tiny_model_dir, suite_copy, run_copy):
    before = file_digests(run_copy)
    path = suite_copy / "mood/labels.json"
    path.write_text('["good"]\n')
    err = rerun_forced(capsys, tiny_model_dir, suite_copy, run_copy)
    assert f"{path}: invalid class list of task 'mood'" in err
    assert "at least two distinct class names" in err
    assert file_digests(run_copy) == before


def test_class_without_examples_warned(capsys, caplog, tiny_model_dir, suite_copy, tmp_path):
    (suite_copy / "mood/labels.json").write_text('["good", "bad", "neutral"]\n')
    config = write_config(tmp_path / "config.yaml", bad_input_config(tiny_model_dir, suite_copy))
    code, _ = run_cli(capsys, "run", str(config), "--out", str(tmp_path / "run"))
    assert code == 0
    for split in ("train", "validation", "test"):
        message = f"task mood: the {split} split has no examples of classes ['neutral']"
        assert message in caplog.text


# --- Config ----------------------------------------------------------------------------------


def test_duplicate_task_names(capsys, tiny_model_dir, tiny_suite, run_copy):
    before = file_digests(run_copy)
    raw = bad_input_config(tiny_model_dir, tiny_suite)
    raw["data"]["tasks"] = ["topic", "mood", "topic"]
    config = write_config(run_copy.parent / "bad.yaml", raw)
    code, err = run_cli(capsys, "run", str(config), "--out", str(run_copy), "--force")
    assert code == 2
    assert "data: duplicate task names ['topic']" in err
    assert file_digests(run_copy) == before


def test_train_split_smaller_than_batch(capsys, tiny_model_dir, tiny_suite, run_copy):
    before = file_digests(run_copy)
    err = rerun_forced(capsys, tiny_model_dir, tiny_suite, run_copy, data={"max_train_examples": 6})
    assert (
        "train split smaller than one batch: task 'topic' has 6, task 'mood' has 6 training "
        "examples, fewer than training.batch_size (8)"
    ) in err
    assert "Set training.batch_size to at most 6" in err
    assert file_digests(run_copy) == before


def test_long_texts_truncated_and_counted(capsys, caplog, tiny_model_dir, suite_copy, tmp_path):
    caplog.set_level(logging.INFO)
    path = suite_copy / "mood/train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # 20 words plus [CLS] and [SEP] are 22 tokens, beyond max_length 16.
    for index in (0, 10, 20):
        rows[index]["text"] = " ".join(["very"] * 19 + ["sad"])
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = write_config(tmp_path / "config.yaml", bad_input_config(tiny_model_dir, suite_copy))
    code, _ = run_cli(capsys, "run", str(config), "--out", str(tmp_path / "run"))
    assert code == 0
    assert "task mood train: 3 of 48 texts truncated to 16 tokens" in caplog.text
    assert "task topic train" not in caplog.text


# --- Fine-tuning -----------------------------------------------------------------------------


class NanLossAtCall:
    """Stands in for torch.nn.functional in the fine-tuning module and makes one loss NaN."""

    def __init__(self, call: int) -> None:
        self.call = call
        self.calls = 0

    def __getattr__(self, name: str):
        return getattr(torch.nn.functional, name)

    def cross_entropy(self, *args, **kwargs) -> torch.Tensor:
        self.calls += 1
        loss = torch.nn.functional.cross_entropy(*args, **kwargs)
        return loss * float("nan") if self.calls == self.call else loss


@pytest.fixture
def nan_run(capsys, monkeypatch, tiny_model_dir, tiny_suite, tmp_path):
    """A run whose first fine-tune gets a NaN loss at step 5, after the step-3 checkpoint."""
    config = write_config(tmp_path / "config.yaml", bad_input_config(tiny_model_dir, tiny_suite))
    with monkeypatch.context() as patch:
        patch.setattr(finetune, "F", NanLossAtCall(5))
        code, err = run_cli(capsys, "run", str(config), "--out", str(tmp_path / "run"))
    return config, tmp_path / "run", code, err


def test_nan_loss_stops_run(nan_run):
    _, _, code, err = nan_run
    assert code == 2
    assert "finetune/full/topic/seed0: loss is nan at step 5; training stopped" in err
    assert "The checkpoints up to step 3 are kept, and a rerun resumes after step 3" in err


def test_nan_loss_keeps_last_checkpoint(nan_run, finished_run):
    _, run_dir, _, _ = nan_run
    expert = "checkpoints/full/topic/seed0"
    expected = (finished_run / expert / "step3.safetensors").read_bytes()
    assert (run_dir / expert / "step3.safetensors").read_bytes() == expected
    assert (run_dir / expert / finetune.STATE_FILE).is_file()
    assert not (run_dir / expert / "step6.safetensors").exists()


def test_nan_rerun_resumes(nan_run, finished_run, capsys, caplog):
    caplog.set_level(logging.INFO)
    config, run_dir, _, _ = nan_run
    code, _ = run_cli(capsys, "run", str(config), "--out", str(run_dir))
    assert code == 0
    assert "finetune/full/topic/seed0: resuming after step 3" in caplog.text
    for name in ("step3", "step6"):
        path = f"checkpoints/full/topic/seed0/{name}.safetensors"
        assert (run_dir / path).read_bytes() == (finished_run / path).read_bytes(), name
    expected = (finished_run / "results/merges.csv").read_bytes()
    assert (run_dir / "results/merges.csv").read_bytes() == expected


# --- Checkpoints -----------------------------------------------------------------------------


def truncate(path: Path) -> bytes:
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])
    return original


def test_corrupt_checkpoint_named(capsys, run_copy):
    path = run_copy / "checkpoints/full/topic/seed0/step3.safetensors"
    truncate(path)
    before = file_digests(run_copy)
    code, err = run_cli(capsys, "evaluate", str(run_copy))
    assert code == 2
    assert f"upcycle: error: checkpoint file {path} is corrupt or truncated" in err
    assert "Delete it, then run `upcycle run`" in err
    assert file_digests(run_copy) == before


def test_deleted_checkpoint_recomputed(capsys, caplog, finished_run, run_copy):
    path = run_copy / "checkpoints/full/topic/seed0/step3.safetensors"
    truncate(path)
    path.unlink()
    config = same_config_file(run_copy)
    code, _ = run_cli(capsys, "run", str(config), "--out", str(run_copy))
    assert code == 0
    assert f"finetune/full/topic/seed0 is marked complete, but {path} is missing" in caplog.text
    assert_same_results(run_copy, finished_run)


def test_corrupt_checkpoint_recomputed(capsys, caplog, finished_run, run_copy):
    path = run_copy / "checkpoints/full/mood/seed0/step6.safetensors"
    truncate(path)
    config = same_config_file(run_copy)
    code, _ = run_cli(capsys, "run", str(config), "--out", str(run_copy))
    assert code == 0
    assert f"{path} changed since it was written" in caplog.text
    assert_same_results(run_copy, finished_run)


def replace_with_foreign(run_dir: Path, tmp_path: Path, tiny_suite: Path) -> tuple[Path, Path]:
    """Give mood's step-3 checkpoint the metadata of another base model; undo merge step 3."""
    other_model = make_tiny_model(tmp_path / "other-bert", seed=1)
    raw = bad_input_config(other_model, tiny_suite)
    other_fingerprint = Workspace(parse_config(raw), tmp_path / "unused").fingerprint
    path = run_dir / "checkpoints/full/mood/seed0/step3.safetensors"
    metadata = read_safetensors_metadata(path)
    metadata.update(base_model=str(other_model), base_fingerprint=other_fingerprint)
    atomic_save_safetensors(load_safetensors(path), path, metadata)
    edit_manifest(run_dir, lambda completed: completed.pop("merge/full/seed0/step3"))
    return path, other_model


def edit_manifest(run_dir: Path, change) -> None:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    change(manifest["completed"])
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def test_foreign_checkpoint_named(capsys, tiny_suite, run_copy, tmp_path):
    path, other_model = replace_with_foreign(run_copy, tmp_path, tiny_suite)
    # Manifests of older versions record no file hashes, so only the metadata check is left.
    edit_manifest(run_copy, lambda completed: completed["finetune/full/mood/seed0"].pop("files"))
    before = file_digests(run_copy)
    code, err = run_cli(capsys, "merge", str(run_copy))
    assert code == 2
    assert f"checkpoint {path} was fine-tuned from base model '{other_model}'" in err
    assert file_digests(run_copy) == before


def test_replaced_checkpoint_blocks_merge(capsys, caplog, tiny_suite, run_copy, tmp_path):
    path, _ = replace_with_foreign(run_copy, tmp_path, tiny_suite)
    before = file_digests(run_copy)
    code, err = run_cli(capsys, "merge", str(run_copy))
    assert code == 2
    assert "mood (full, seed 0) are not complete" in err
    assert f"{path} changed since it was written" in caplog.text
    assert file_digests(run_copy) == before


def test_replaced_checkpoint_recomputed(capsys, finished_run, tiny_suite, run_copy, tmp_path):
    replace_with_foreign(run_copy, tmp_path, tiny_suite)
    code, _ = run_cli(capsys, "run", str(same_config_file(run_copy)), "--out", str(run_copy))
    assert code == 0
    assert_same_results(run_copy, finished_run)


# --- Full disk -------------------------------------------------------------------------------


def test_full_disk_keeps_previous_file(capsys, monkeypatch, run_copy):
    summary = run_copy / "summary.md"
    summary.write_text("summary of an earlier run\n")
    before = file_digests(run_copy)
    config = same_config_file(run_copy)
    temp_names: dict[int, str] = {}
    real_mkstemp = tempfile.mkstemp
    real_fsync = os.fsync

    def recording_mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        temp_names[fd] = name
        return fd, name

    def full_disk_for_summary(fd: int) -> None:
        if Path(temp_names.get(fd, "")).name.startswith(".summary.md."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(tempfile, "mkstemp", recording_mkstemp)
    monkeypatch.setattr(os, "fsync", full_disk_for_summary)
    code, err = run_cli(capsys, "run", str(config), "--out", str(run_copy))
    assert code == 2
    assert f"upcycle: error: failed to write {summary}: the disk is full" in err
    assert "free disk space, then run the same command again" in err
    assert summary.read_text() == "summary of an earlier run\n"
    assert sorted(run_copy.rglob("*.tmp")) == []
    assert file_digests(run_copy) == before
