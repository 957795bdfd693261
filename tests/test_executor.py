"""Executors: a tiny run on a local two-CPU Ray instance against the local executor, the
manifest lock under concurrent processes, and the streamed export of a merge."""

import argparse
import json
import multiprocessing
import sys

import pandas as pd
import pytest
import torch
from conftest import tiny_config_dict
from safetensors.torch import load_file

from upcycle.cli import apply_executor_options
from upcycle.config import parse_config
from upcycle.errors import CheckpointError, ConfigError
from upcycle.executors import MergeJob, finetune_jobs, import_ray, merge_jobs, run_jobs_on_ray
from upcycle.io import load_safetensors, read_safetensors_metadata
from upcycle.merging import merge_task_vectors
from upcycle.pipeline import export_merge, run_finetune, run_merge
from upcycle.store import RunDir
from upcycle.workspace import Workspace

RESULTS = ["experts.csv", "merges.csv", "merge_grid.csv", "difficulty.csv"]
STEPS = [3, 6, 12]


def mark_many(root: str, worker: int, count: int) -> None:
    run = RunDir(root)
    for index in range(count):
        run.mark_complete(f"job/{worker}/{index}", {"worker": worker})


def test_manifest_lock_keeps_concurrent_marks(tmp_path):
    workers, count = 4, 30
    # fork, because spawned children would import this module and torch again.
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=mark_many, args=(str(tmp_path), worker, count))
        for worker in range(workers)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [process.exitcode for process in processes] == [0] * workers
    completed = json.loads((tmp_path / "manifest.json").read_text())["completed"]
    assert len(completed) == workers * count
    assert completed["job/3/29"] == {"worker": 3}


def test_clear_complete_keeps_other_prefixes(tmp_path):
    run = RunDir(tmp_path)
    for key in ("merge/full/seed0/step3", "merge/full/seed0/step6", "finetune/full/a/seed0"):
        run.mark_complete(key)
    run.clear_complete("merge/")
    assert sorted(run.read_manifest()["completed"]) == ["finetune/full/a/seed0"]


def test_jobs_cover_every_unit(tiny_model_dir, tiny_suite):
    config = parse_config(tiny_config_dict(tiny_model_dir, tiny_suite, seeds=[0, 1]))
    assert len(finetune_jobs(config)) == 2 * 3
    assert [str(job) for job in merge_jobs(config)[:2]] == [
        "merge full seed 0 step 3",
        "merge full seed 0 step 6",
    ]
    assert len(merge_jobs(config)) == 2 * 3


def test_missing_ray_names_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"pip install 'upcycle\[ray\]'"):
        import_ray()


def test_ray_address_implies_ray(tiny_model_dir, tiny_suite):
    config = parse_config(tiny_config_dict(tiny_model_dir, tiny_suite))
    args = argparse.Namespace(executor=None, ray_address="ray://head:10001")
    config = apply_executor_options(config, args)
    assert config.executor == "ray"
    assert config.ray.address == "ray://head:10001"


def test_ray_address_with_local_rejected(tiny_model_dir, tiny_suite):
    config = parse_config(tiny_config_dict(tiny_model_dir, tiny_suite))
    args = argparse.Namespace(executor="local", ray_address="auto")
    with pytest.raises(ConfigError, match="--ray-address needs the ray executor"):
        apply_executor_options(config, args)


def run_stages(raw: dict, run_dir) -> Workspace:
    config = parse_config(raw)
    ws = Workspace(config, run_dir)
    ws.run.prepare(config, ws.input_files())
    run_finetune(ws, progress=False)
    run_merge(ws)
    return ws


@pytest.fixture(scope="module")
def local_and_ray(tiny_model_dir, tiny_suite, tmp_path_factory):
    """The fine-tune and merge stages of one tiny run, with each executor."""
    import ray

    raw = tiny_config_dict(tiny_model_dir, tiny_suite)
    # Ray workers use one torch thread (ray.cpus_per_job), and a different thread count
    # could change the float sums of the local run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run_stages(raw, tmp_path_factory.mktemp("local"))
    finally:
        torch.set_num_threads(threads)
    ray_raw = {**raw, "executor": "ray", "ray": {"local_cpus": 2, "cpus_per_job": 1}}
    try:
        on_ray = run_stages(ray_raw, tmp_path_factory.mktemp("ray"))
        yield local, on_ray
    finally:
        ray.shutdown()


@pytest.mark.parametrize("name", RESULTS)
def test_ray_results_equal_local(local_and_ray, name):
    local, on_ray = local_and_ray
    expected = pd.read_csv(local.run.result_path(name))
    actual = pd.read_csv(on_ray.run.result_path(name))
    pd.testing.assert_frame_equal(actual, expected)


def test_ray_checkpoints_equal_local(local_and_ray):
    local, on_ray = local_and_ray
    files = sorted(
        path.relative_to(local.run.root) for path in local.run.checkpoints.rglob("*.safetensors")
    )
    assert len(files) == 3 * len(STEPS)
    for relative in files:
        expected = load_file(local.run.root / relative)
        actual = load_file(on_ray.run.root / relative)
        assert sorted(actual) == sorted(expected), relative
        for name, tensor in expected.items():
            assert torch.equal(actual[name], tensor), f"{relative}: {name}"


def test_ray_marks_every_job(local_and_ray):
    local, on_ray = local_and_ray
    expected = sorted(local.run.read_manifest()["completed"])
    assert sorted(on_ray.run.read_manifest()["completed"]) == expected
    assert "merge/full/seed0/step12" in expected


def test_ray_job_error_reraised(local_and_ray, tmp_path):
    _, on_ray = local_and_ray
    empty = Workspace(on_ray.config, tmp_path)
    with pytest.raises(CheckpointError, match=r"topic, mood, topic2 \(full, seed 0\) are not"):
        run_jobs_on_ray(empty, [MergeJob("full", 0, 3)])


def test_export_equals_in_memory_merge(local_and_ray, tmp_path):
    local, _ = local_and_ray
    out = export_merge(
        local, method="ties", step=6, coefficient=0.5, out=tmp_path / "m.safetensors"
    )
    experts = [
        load_safetensors(local.run.checkpoint_path("full", task, 0, 6)) for task in local.task_names
    ]
    expected = merge_task_vectors(
        experts, "ties", coefficient=0.5, density=local.config.merging.ties_density, seed=0
    )
    actual = load_file(out)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_export_uses_chosen_coefficient(local_and_ray, tmp_path):
    local, _ = local_and_ray
    out = export_merge(local, method="task_arithmetic", step=12, out=tmp_path / "m.safetensors")
    merges = pd.read_csv(local.run.root / "merges/full/seed0/step12.csv")
    chosen = merges.loc[merges["method"] == "task_arithmetic", "coefficient"].iloc[0]
    metadata = read_safetensors_metadata(out)
    assert float(metadata["coefficient"]) == chosen
    assert metadata["tasks"] == "topic,mood,topic2"
    assert metadata["base_fingerprint"] == local.fingerprint


def test_export_unknown_step_rejected(local_and_ray, tmp_path):
    local, _ = local_and_ray
    with pytest.raises(ConfigError, match=r"step 5 is not a checkpoint step .* \[3, 6, 12\]"):
        export_merge(local, method="average", step=5, out=tmp_path / "m.safetensors")


def test_export_linear_head_rejected(tiny_model_dir, tiny_suite, tmp_path):
    raw = tiny_config_dict(tiny_model_dir, tiny_suite)
    raw["model"]["head"] = "linear"
    ws = Workspace(parse_config(raw), tmp_path)
    with pytest.raises(ConfigError, match="uses linear heads"):
        export_merge(ws, method="average", step=12, out=tmp_path / "m.safetensors")
