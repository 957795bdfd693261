"""Executors that run the independent jobs of a stage: in this process, or as Ray tasks.

A job is one expert's fine-tune (kind, task, seed) or one checkpoint step's merge and
evaluation sweep (kind, seed, step). Every job writes its own files atomically into
the run directory and marks the manifest when it is done, so jobs may run in any
order and in parallel, and a run killed midway resumes with the jobs left over.

With `executor: local` the jobs run one after another in this process. With
`executor: ray` each job is one Ray task that reserves `ray.cpus_per_job` CPUs and
`ray.gpus_per_job` GPUs, rebuilds a `Workspace` from the config and the run
directory, and calls the same function as the local path. The run directory must
be readable and writable at the same path from every Ray node, so for a cluster of
several machines it has to be on a shared file system.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from upcycle.config import RunConfig, parse_config
from upcycle.errors import CheckpointError, ConfigError, UpcycleError
from upcycle.workspace import Workspace

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class FinetuneJob:
    """Fine-tune the expert of one task and seed with one method (`full` or `lora`)."""

    kind: str
    task: str
    seed: int

    def run(self, ws: Workspace, *, progress: bool = False) -> None:
        from upcycle.training.finetune import finetune_expert

        finetune_expert(ws, kind=self.kind, task=self.task, seed=self.seed, progress=progress)

    def __str__(self) -> str:
        return f"finetune {self.kind} {self.task} seed {self.seed}"


@dataclass(frozen=True)
class MergeJob:
    """Merge the experts of one method, seed and checkpoint step, and evaluate every merge."""

    kind: str
    seed: int
    step: int

    def run(self, ws: Workspace, *, progress: bool = False) -> None:
        from upcycle.merging.sweep import merge_step
        from upcycle.training.finetune import expert_accuracy_frame, expert_key

        unfinished = [
            task
            for task in ws.task_names
            if not ws.run.is_complete(expert_key(self.kind, task, self.seed))
        ]
        if unfinished:
            raise CheckpointError(
                f"{self} needs every expert fine-tuned, but {', '.join(unfinished)} "
                f"({self.kind}, seed {self.seed}) are not complete in {ws.run.root}. Run "
                "`upcycle finetune RUN` first"
            )
        accuracy = expert_accuracy_frame(ws, self.kind)
        reference = accuracy[(accuracy["seed"] == self.seed) & (accuracy["step"] == self.step)]
        merge_step(ws, self.kind, self.seed, self.step, reference)

    def __str__(self) -> str:
        return f"merge {self.kind} seed {self.seed} step {self.step}"


Job = FinetuneJob | MergeJob


def finetune_jobs(config: RunConfig) -> list[FinetuneJob]:
    """Return one job per (method, seed, task), in the order the local executor runs them."""
    return [
        FinetuneJob(kind, task.name, seed)
        for kind in config.training.methods
        for seed in config.seeds
        for task in config.data.tasks
    ]


def merge_jobs(config: RunConfig) -> list[MergeJob]:
    """Return one job per (method, seed, checkpoint step)."""
    return [
        MergeJob(kind, seed, step)
        for kind in config.training.methods
        for seed in config.seeds
        for step in config.training.resolved_checkpoint_steps()
    ]


def run_jobs(ws: Workspace, jobs: Sequence[Job], *, progress: bool = True) -> None:
    """Run `jobs` with the executor the run config sets.

    Raises:
        ConfigError: for an unknown executor, or `ray` without Ray installed.
        UpcycleError: the first error a job raised, after every other job has finished,
            so the finished jobs stay marked complete and a rerun resumes after them.
    """
    executor = ws.config.executor
    if executor == "local":
        for job in jobs:
            job.run(ws, progress=progress)
    elif executor == "ray":
        run_jobs_on_ray(ws, jobs)
    else:
        raise ConfigError(
            f"executor {executor!r} is not supported; use one of {', '.join(EXECUTORS)}"
        )


def import_ray() -> Any:
    """Import Ray, or raise a `ConfigError` that gives the install command."""
    try:
        import ray
    except ImportError as error:
        raise ConfigError(
            "executor 'ray' needs Ray, which is not installed. Install it with "
            "`pip install 'upcycle[ray]'`, or set executor: local"
        ) from error
    return ray


def gpus_per_job(ws: Workspace) -> float:
    """Return the GPUs each Ray job reserves: the config's value, else 1 on CUDA and 0 on CPU."""
    # NOTE: the default follows the driver's device. A driver without a GPU that sends jobs
    # to GPU nodes needs device: auto (device: cuda fails on the driver) and an explicit
    # ray.gpus_per_job. No test covers GPU jobs, because the test machines have no GPU.
    if ws.config.ray.gpus_per_job is not None:
        return ws.config.ray.gpus_per_job
    return 1.0 if ws.device.type == "cuda" else 0.0


def connect_ray(ws: Workspace) -> Any:
    """Connect to the cluster at `ray.address`, or start a local Ray instance."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    settings = ws.config.ray
    if settings.address is not None:
        logger.info("connecting to the Ray cluster at %s", settings.address)
        ray.init(address=settings.address, log_to_driver=False)
    else:
        cpus = settings.local_cpus or os.cpu_count() or 1
        logger.info("starting a local Ray instance with %d CPUs", cpus)
        # A local instance sends Ray's usage statistics nowhere unless
        # RAY_USAGE_STATS_ENABLED=1 turns them on. It also keeps to the loopback address:
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray's processes (which read it on
        # import, in Ray 2.60) take 127.0.0.1 as the node address on every platform, where
        # they would otherwise take and listen on the address of a network interface.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address="127.0.0.1",
        )
    return ray


def run_jobs_on_ray(ws: Workspace, jobs: Sequence[Job]) -> None:
    """Run every job as one Ray task and wait for all of them; see `run_jobs`."""
    if not jobs:
        return
    ray = connect_ray(ws)
    cpus = ws.config.ray.cpus_per_job
    gpus = gpus_per_job(ws)
    remote = ray.remote(run_job_in_worker).options(num_cpus=cpus, num_gpus=gpus, name="upcycle-job")

    config = ws.config.model_dump(mode="json")
    data_root = str(ws.data_root) if ws.data_root is not None else None
    pending = {
        remote.remote(
            job, config, str(ws.run.root), data_root, threads=max(1, round(cpus)), on_gpu=gpus > 0
        ): job
        for job in jobs
    }
    logger.info("submitted %d jobs to Ray (%g CPUs and %g GPUs each)", len(jobs), cpus, gpus)

    # Wait for every job, even after a failure, so the jobs that succeed are marked complete.
    failures: list[tuple[Job, BaseException]] = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(done[0])
        try:
            ray.get(done[0])
        except Exception as error:  # noqa: BLE001 - every failure is logged and one re-raised
            cause = getattr(error, "cause", None) or error
            logger.error("%s failed: %s", job, cause)
            failures.append((job, cause))
            continue
        logger.info("%s finished (%d left)", job, len(pending))

    if failures:
        logger.error("%d of %d Ray jobs failed", len(failures), len(jobs))
        job, cause = failures[0]
        if isinstance(cause, UpcycleError):
            raise cause
        raise UpcycleError(
            f"{len(failures)} of {len(jobs)} Ray jobs failed, the first ({job}) with "
            f"{type(cause).__name__}: {cause}. Finished jobs are kept; run the same command "
            "again to retry the others"
        ) from cause


_WORKER_WORKSPACE: dict[str, Any] = {}
"""The Workspace a Ray worker process built last, reused by its next job of the same run."""


def run_job_in_worker(
    job: Job,
    config: dict[str, Any],
    run_dir: str,
    data_root: str | None,
    *,
    threads: int,
    on_gpu: bool,
) -> None:
    """Run one job inside a Ray worker process, with `threads` torch threads."""
    torch.set_num_threads(threads)
    if on_gpu and str(config.get("device", "")).startswith("cuda"):
        # Ray makes only the reserved GPUs visible, numbered from 0, so cuda:N would point
        # at another job's GPU or at none.
        config = {**config, "device": "cuda"}
    key = repr((config, run_dir, data_root))
    if _WORKER_WORKSPACE.get("key") != key:
        # Worker processes are reused across tasks, and building the tokenized splits and
        # heads again for every job of the same run would cost more than some jobs.
        _WORKER_WORKSPACE.clear()
        _WORKER_WORKSPACE["key"] = key
        _WORKER_WORKSPACE["workspace"] = Workspace(
            parse_config(config, f"{run_dir}/config.yaml"), run_dir, data_root=data_root
        )
    job.run(_WORKER_WORKSPACE["workspace"], progress=False)
