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
    from upcycle.io import atomic_write_csv
    from upcycle.training.finetune import finetune_expert

    with stage("zero-shot"):
        if not ws.run.is_complete("zeroshot") and ws.config.model.head == "label-embedding":
            atomic_write_csv(ws.run.root / "zeroshot.csv", zero_shot(ws))
            ws.run.mark_complete("zeroshot")
    for kind in ws.config.training.methods:
        with stage(f"finetune {kind}"):
            for seed in ws.config.seeds:
                for task in ws.task_names:
                    finetune_expert(ws, kind=kind, task=task, seed=seed, progress=progress)
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
    from upcycle.merging.sweep import collect_merge_tables, merge_step
    from upcycle.training.finetune import expert_accuracy_frame

    for kind in ws.config.training.methods:
        with stage(f"merge {kind}"):
            accuracy = expert_accuracy_frame(ws, kind)
            for seed in ws.config.seeds:
                for step in ws.config.training.resolved_checkpoint_steps():
                    reference = accuracy[(accuracy["seed"] == seed) & (accuracy["step"] == step)]
                    merge_step(ws, kind, seed, step, reference)
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
    ws.run.prepare(config, ws.input_files(), force=force)
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
            ws.run.mark_complete("zeroshot")
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
