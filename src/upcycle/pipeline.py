"""The stages of a run, each runnable alone on an existing run directory."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd

from upcycle.config import RunConfig
from upcycle.workspace import Workspace

logger = logging.getLogger(__name__)

RESULT_NAMES = {"full": ("experts.csv", "merges.csv", "merge_grid.csv"),
                "lora": ("lora_experts.csv", "lora_merges.csv", "lora_merge_grid.csv")}


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Log one line when a stage ends, with its duration."""
    started = time.perf_counter()
    yield
    logger.info("stage %s finished in %.1f s", name, time.perf_counter() - started)


def zero_shot(ws: Workspace) -> pd.DataFrame:
    """Accuracy of the base model with the label-embedding heads, as step-0 rows."""
    from upcycle.merging.sweep import evaluate_vector

    if ws.config.model.head != "label-embedding":
        return pd.DataFrame()
    rows = []
    for split in ("validation", "test"):
        results = evaluate_vector(ws, None, ws.label_heads, split, ws.task_names)
        for task, correct in results.items():
            rows.append({"task": task, "step": 0, "split": split,
                         "accuracy": float(correct.mean()), "n": len(correct)})
    return pd.DataFrame(rows)


def expert_table(ws: Workspace, kind: str) -> pd.DataFrame:
    """Accuracy of every expert checkpoint plus the zero-shot rows, for every seed."""
    from upcycle.training.finetune import expert_accuracy_frame

    frame = expert_accuracy_frame(ws, kind)
    path = ws.run.root / "zeroshot.csv"
    if frame.empty or not path.is_file():
        return frame
    base = pd.read_csv(path)
    base_rows = [base.assign(seed=seed) for seed in ws.config.seeds]
    frame = pd.concat([*base_rows, frame], ignore_index=True)
    return frame[["seed", "task", "step", "split", "accuracy", "n"]].sort_values(
        ["seed", "task", "step", "split"], kind="stable"
    ).reset_index(drop=True)


def run_finetune(ws: Workspace, *, progress: bool = True) -> None:
    """Evaluate the zero-shot model, fine-tune every expert with the configured executor, and
    write the expert and difficulty tables."""
    from upcycle.executors import finetune_jobs, run_jobs
    from upcycle.io import atomic_write_csv

    with stage("zero-shot"):
        if not ws.run.is_complete("zeroshot") and ws.config.model.head == "label-embedding":
            atomic_write_csv(ws.run.root / "zeroshot.csv", zero_shot(ws))
            ws.run.mark_complete("zeroshot", files=[ws.run.root / "zeroshot.csv"])
    with stage(f"finetune ({ws.config.executor} executor)"):
        run_jobs(ws, finetune_jobs(ws.config), progress=progress)
    for kind in ws.config.training.methods:
        ws.run.write_result(RESULT_NAMES[kind][0], expert_table(ws, kind))
    write_difficulty_tables(ws)


def write_difficulty_tables(ws: Workspace) -> None:
    """Gather every expert's difficulty.csv and examples.parquet into results/."""
    from upcycle.io import atomic_write_parquet

    difficulty, examples = [], []
    for kind in ws.config.training.methods:
        for seed in ws.config.seeds:
            for task in ws.task_names:
                folder = ws.run.expert_dir(kind, task, seed)
                if (folder / "difficulty.csv").is_file():
                    difficulty.append(pd.read_csv(folder / "difficulty.csv"))
                if (folder / "examples.parquet").is_file():
                    examples.append(pd.read_parquet(folder / "examples.parquet"))
    if difficulty:
        ws.run.write_result("difficulty.csv", pd.concat(difficulty, ignore_index=True))
    if examples:
        atomic_write_parquet(ws.run.result_path("examples.parquet"),
                             pd.concat(examples, ignore_index=True))


def run_merge(ws: Workspace) -> None:
    """Run the merge and evaluation sweep of every checkpoint step with the configured executor,
    then gather the merge tables."""
    from upcycle.executors import merge_jobs, run_jobs
    from upcycle.merging.sweep import collect_merge_tables

    with stage(f"merge ({ws.config.executor} executor)"):
        run_jobs(ws, merge_jobs(ws.config))
    for kind in ws.config.training.methods:
        rows, grid = collect_merge_tables(ws, kind)
        zero = zero_shot_rows(ws)
        ws.run.write_result(RESULT_NAMES[kind][1], pd.concat([zero, rows], ignore_index=True))
        ws.run.write_result(RESULT_NAMES[kind][2], grid)


def zero_shot_rows(ws: Workspace) -> pd.DataFrame:
    """The zero-shot base model as reference rows of the merges table (method `zeroshot`)."""
    path = ws.run.root / "zeroshot.csv"
    if not path.is_file():
        return pd.DataFrame()
    base = pd.read_csv(path)
    rows = []
    for seed in ws.config.seeds:
        rows.append(base.assign(
            seed=seed, method="zeroshot", coefficient=0.0, expert_accuracy=base["accuracy"],
            normalized_accuracy=1.0,
        ))
    columns = ["seed", "method", "step", "coefficient", "task", "split", "accuracy",
               "expert_accuracy", "normalized_accuracy"]
    return pd.concat(rows, ignore_index=True)[columns]


def run_moe(ws: Workspace, *, progress: bool = True) -> None:
    from upcycle.moe.stage import run_moe_stage

    with stage("moe"):
        run_moe_stage(ws, progress=progress)


def run_analyze(ws: Workspace) -> None:
    from upcycle.analysis.stage import run_analysis_stage

    with stage("analyze"):
        run_analysis_stage(ws)


def run_select(ws: Workspace, **options) -> None:
    from upcycle.selection.stage import run_selection_stage

    with stage("select"):
        run_selection_stage(ws, **options)


def run_report(ws: Workspace) -> None:
    from upcycle.report import write_report

    with stage("report"):
        path = write_report(ws.run.root)
        logger.info("report: %s", path)


def summary_sections(ws: Workspace) -> list[str]:
    """Sections that later stages add to summary.md, each from its own result files."""
    sections = []
    for module_name in ("upcycle.moe.stage", "upcycle.analysis.stage", "upcycle.selection.stage"):
        import importlib

        module = importlib.import_module(module_name)
        sections += module.summary_section(ws.run)
    return sections


def run_summary(ws: Workspace) -> None:
    from upcycle.summary import write_summary

    with stage("summary"):
        write_summary(ws.run, summary_sections(ws))


def run_all(config: RunConfig, run_dir, *, data_root=None, force=False, progress=True) -> Workspace:
    """Run every stage the config enables, resuming whatever is already complete."""
    ws = Workspace(config, run_dir, data_root=data_root)
    # Bad data fails here, before `prepare` can clear the manifest of a forced rerun.
    ws.check_train_sizes()
    ws.run.prepare(config, ws.input_files(), force=force, data_root=ws.data_root)
    run_finetune(ws, progress=progress)
    run_merge(ws)
    if config.moe.enabled:
        run_moe(ws, progress=progress)
    if config.analysis.enabled:
        run_analyze(ws)
    if config.selection.enabled:
        run_select(ws)
    run_summary(ws)
    if config.report.enabled:
        run_report(ws)
    return ws


def run_evaluate(ws: Workspace) -> None:
    """Re-evaluate the zero-shot model and every stored expert checkpoint from the store."""
    from upcycle.io import atomic_write_csv
    from upcycle.merging.sweep import evaluate_vector, heads_for, load_expert

    with stage("evaluate"):
        if ws.config.model.head == "label-embedding":
            atomic_write_csv(ws.run.root / "zeroshot.csv", zero_shot(ws))
            ws.run.mark_complete("zeroshot", files=[ws.run.root / "zeroshot.csv"])
        for kind in ws.config.training.methods:
            for seed in ws.config.seeds:
                for task in ws.task_names:
                    rows = []
                    for step in ws.config.training.resolved_checkpoint_steps():
                        if not ws.run.checkpoint_path(kind, task, seed, step).is_file():
                            continue
                        expert = load_expert(ws, kind, task, seed, step)
                        heads = heads_for(ws, [expert])
                        for split in ("validation", "test"):
                            correct = evaluate_vector(ws, expert.task_vector, heads, split)[task]
                            rows.append({"seed": seed, "task": task, "step": step, "split": split,
                                         "accuracy": float(correct.mean()), "n": len(correct)})
                    if rows:
                        folder = ws.run.expert_dir(kind, task, seed)
                        atomic_write_csv(folder / "accuracy.csv", pd.DataFrame(rows))
            ws.run.write_result(RESULT_NAMES[kind][0], expert_table(ws, kind))


def export_merge(
    ws: Workspace,
    *,
    method: str,
    step: int,
    out,
    seed: int | None = None,
    coefficient: float | None = None,
):
    """Merge the full fine-tuning checkpoints of every task at `step` into one safetensors file.

    The merge streams one tensor at a time from the checkpoint files
    (`upcycle.merging.merge_safetensors_files`), so the experts are never all in memory.
    The output is a task vector (merged minus base weights) with the merge's settings in
    its metadata. `seed` defaults to the run's first seed and also seeds DARE's drop, as in
    the merge stage. `coefficient` defaults to the one the merge stage chose on validation
    accuracy for this method, seed and step. The density is the run's
    `merging.ties_density` or `merging.dare_density`.

    Returns:
        the path of the written file.

    Raises:
        ConfigError: for a run without full fine-tuning, a run with linear heads, a seed or
            step the run does not have, or no coefficient given and none chosen yet.
        MergeError: for an unknown method or an invalid option.
        CheckpointError: for a missing or corrupt checkpoint, or experts of different bases.
    """
    from pathlib import Path

    from upcycle.errors import CheckpointError, ConfigError
    from upcycle.io import read_safetensors_metadata
    from upcycle.merging import merge_safetensors_files
    from upcycle.merging.methods import resolve_method
    from upcycle.merging.sweep import method_density

    config = ws.config
    spec = resolve_method(method)
    seed = config.seeds[0] if seed is None else seed
    steps = config.training.resolved_checkpoint_steps()
    if "full" not in config.training.methods:
        raise ConfigError(
            f"run {ws.run.root} has no full fine-tuning checkpoints (training.methods is "
            f"{config.training.methods}); export merges task vectors of full fine-tuning"
        )
    if config.model.head == "linear":
        # NOTE: the checkpoints also hold each task's head.* tensors, which must not be
        # merged, and the streamed merge reads every tensor of its files.
        raise ConfigError(
            f"run {ws.run.root} uses linear heads, whose per-task head tensors are stored in "
            "the checkpoints; export supports runs with label-embedding heads only"
        )
    if seed not in config.seeds:
        raise ConfigError(
            f"seed {seed} is not a seed of run {ws.run.root}; use one of {config.seeds}"
        )
    if step not in steps:
        raise ConfigError(
            f"step {step} is not a checkpoint step of run {ws.run.root}; use one of {steps}"
        )
    if coefficient is None and spec.uses_coefficient:
        coefficient = chosen_coefficient(ws, method, seed=seed, step=step)
    elif coefficient is None:
        coefficient = 1.0

    paths = [ws.run.checkpoint_path("full", task, seed, step) for task in ws.task_names]
    fingerprints = {
        path: read_safetensors_metadata(path).get("base_fingerprint") if path.is_file() else None
        for path in paths
    }
    if len(set(fingerprints.values())) > 1:
        raise CheckpointError(
            f"the checkpoints at step {step} were fine-tuned from different base models "
            f"(fingerprints {fingerprints}); merge only experts of one base model"
        )
    density = method_density(ws, method)
    metadata = {
        "format": "upcycle-task-vector",
        "method": method,
        "coefficient": str(coefficient),
        "density": str(density),
        "seed": str(seed),
        "step": str(step),
        "tasks": ",".join(ws.task_names),
        "base_model": config.model.base,
    }
    fingerprint = next(iter(fingerprints.values()))
    if fingerprint is not None:
        metadata["base_fingerprint"] = fingerprint
    out = Path(out)
    merge_safetensors_files(
        paths, out, method, coefficient=coefficient, density=density, seed=seed,
        names=ws.task_names, metadata=metadata,
    )
    return out


def chosen_coefficient(ws: Workspace, method: str, *, seed: int, step: int) -> float:
    """Return the scaling coefficient the merge stage chose for `method` at one seed and step."""
    from upcycle.errors import ConfigError

    path = ws.run.root / "merges" / "full" / f"seed{seed}" / f"step{step}.csv"
    rows = pd.read_csv(path) if path.is_file() else pd.DataFrame({"method": []})
    chosen = rows.loc[rows["method"] == method, "coefficient"]
    if chosen.empty:
        raise ConfigError(
            f"no coefficient chosen yet for {method} at seed {seed} step {step} ({path} has "
            "no row for it); pass --coefficient, or run `upcycle merge RUN` first"
        )
    return float(chosen.iloc[0])
