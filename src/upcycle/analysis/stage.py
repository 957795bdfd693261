"""The analyze stage: task-vector interference and forgetting by merging at each checkpoint step.

For each kind of expert (full, lora), seed and checkpoint step, the stage loads the task
vectors of all tasks at that step and writes two tables into RUN/analysis/<kind>/seed<S>/:

- step<N>_interference.csv: norms, pairwise cosines, their mean and the sign-conflict
  fraction (`interference_rows`).
- step<N>_forgetting.csv: each merging method's merge is rebuilt at the scaling
  coefficient recorded in merges.csv (or lora_merges.csv, including its PEFT methods),
  with the same seed and therefore the same DARE masks. The merge and the expert of each task are evaluated per
  example on the task's test split and training split, and `forgetting_rows` counts the
  examples the expert gets right and the merge gets wrong. Training examples are also
  grouped by difficulty decile of the expert's learned step and EL2N from its
  examples.parquet. Those scores describe the whole fine-tune, so every checkpoint step
  uses the same deciles.

A unit (kind, seed, step) is marked complete in the manifest once both tables are written,
so a rerun skips it. Then every unit's tables are concatenated into results/interference.csv
and results/forgetting.csv. When `data.prune.run` is set, the stage also compares this run
with that earlier one in results/pruning_comparison.csv.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from upcycle.analysis.forgetting import FORGETTING_COLUMNS, forgetting_rows
from upcycle.analysis.interference import interference_rows
from upcycle.data.loaders import stable_rng
from upcycle.errors import CheckpointError, MergeError
from upcycle.evaluation import TokenizedSplit, evaluate_tasks
from upcycle.io import atomic_write_csv
from upcycle.merging.lora import PEFT_LORA_METHODS
from upcycle.merging.methods import MERGE_METHODS, merge_task_vectors
from upcycle.merging.sweep import (
    Expert,
    heads_for,
    load_expert,
    lora_adapter_info,
    merge_and_choose_peft,
    method_density,
)
from upcycle.store import RunDir
from upcycle.workspace import Workspace

logger = logging.getLogger(__name__)

MERGES_FILES = {"full": "merges.csv", "lora": "lora_merges.csv"}
INTERFERENCE_COLUMNS = ("seed", "kind", "step", "metric", "task_a", "task_b", "value")
DIFFICULTY_SCORES = ("learned_step", "el2n")
"""Columns of examples.parquet that group training examples into difficulty deciles."""
SPLITS = ("test", "train")
ACCURACY_TOLERANCE = 1e-9


def run_analysis_stage(ws: Workspace) -> None:
    """Analyze every (kind, seed, checkpoint step) not yet complete, then write the tables.

    Units whose checkpoints are missing are skipped with a log message. Without merge rows
    for a step, only its interference table is written and the unit stays incomplete, so
    the next run after `upcycle merge` adds its forgetting table.

    Raises:
        CheckpointError: for a corrupt or foreign checkpoint, or an examples.parquet that
            does not match the training split.
        MergeError: if a recorded merge cannot be rebuilt.
    """
    for kind in ws.config.training.methods:
        merges = ws.run.read_result(MERGES_FILES[kind])
        if merges is None:
            logger.info(
                "analyze %s: results/%s not found, so only interference is computed; run "
                "`upcycle merge` for forgetting",
                kind,
                MERGES_FILES[kind],
            )
        for seed in ws.config.seeds:
            for step in ws.config.training.resolved_checkpoint_steps():
                analyze_step(ws, kind=kind, seed=seed, step=step, merges=merges)
    collect_analysis_tables(ws)
    prune = ws.config.data.prune
    if prune is not None and prune.run is not None:
        write_pruning_comparison(ws, Path(prune.run))


def unit_key(kind: str, seed: int, step: int) -> str:
    return f"analysis/{kind}/seed{seed}/step{step}"


def unit_folder(run: RunDir, kind: str, seed: int) -> Path:
    return run.root / "analysis" / kind / f"seed{seed}"


def analyze_step(
    ws: Workspace, *, kind: str, seed: int, step: int, merges: pd.DataFrame | None
) -> None:
    """Write the interference and forgetting tables of one (kind, seed, step) unit."""
    key = unit_key(kind, seed, step)
    if ws.run.is_complete(key):
        return
    missing = [
        task
        for task in ws.task_names
        if not ws.run.checkpoint_path(kind, task, seed, step).is_file()
    ]
    if missing:
        logger.info("%s: no %s checkpoint for tasks %s, skipped", key, kind, missing)
        return
    started = time.perf_counter()
    experts = [load_expert(ws, kind, task, seed, step) for task in ws.task_names]
    folder = unit_folder(ws.run, kind, seed)

    vectors = {expert.task: expert.task_vector for expert in experts}
    interference = interference_rows(vectors, seed=seed, kind=kind, step=step)
    atomic_write_csv(
        folder / f"step{step}_interference.csv",
        pd.DataFrame(interference, columns=list(INTERFERENCE_COLUMNS)),
    )

    coefficients = recorded_coefficients(merges, seed=seed, step=step)
    if not coefficients:
        logger.info("%s: no merge rows for this step yet, forgetting not computed", key)
        return
    forgetting = forgetting_step_rows(
        ws, experts, kind=kind, seed=seed, step=step, coefficients=coefficients, merges=merges
    )
    atomic_write_csv(
        folder / f"step{step}_forgetting.csv",
        pd.DataFrame(forgetting, columns=list(FORGETTING_COLUMNS)),
    )
    ws.run.mark_complete(
        key,
        {"seconds": round(time.perf_counter() - started, 1)},
        files=[folder / f"step{step}_{suffix}.csv" for suffix in ("interference", "forgetting")],
    )
    logger.info("%s: analyzed in %.1f s", key, time.perf_counter() - started)


def recorded_coefficients(merges: pd.DataFrame | None, *, seed: int, step: int) -> dict[str, float]:
    """Return method -> scaling coefficient chosen by the merge stage at (seed, step).

    A method name that is neither in `MERGE_METHODS` nor in `PEFT_LORA_METHODS` is left
    out with a warning, because its merge cannot be rebuilt.
    """
    if merges is None or merges.empty:
        return {}
    rows = merges[(merges["seed"] == seed) & (merges["step"] == step)]
    rows = rows[rows["method"] != "zeroshot"]
    coefficients = {}
    for method, group in rows.groupby("method", sort=False):
        method = str(method)
        if method not in MERGE_METHODS and method not in PEFT_LORA_METHODS:
            logger.warning(
                "forgetting of %s at step %d not computed: it is neither a task-vector method "
                "(%s) nor a PEFT LoRA method (%s)",
                method,
                step,
                ", ".join(MERGE_METHODS),
                ", ".join(PEFT_LORA_METHODS),
            )
            continue
        values = group["coefficient"].unique()
        if len(values) != 1:
            raise CheckpointError(
                f"merge rows of {method} at seed {seed}, step {step} have several scaling "
                f"coefficients {sorted(values.tolist())}. Delete the run's merges folder and "
                "results, then run `upcycle merge` again"
            )
        coefficients[method] = float(values[0])
    return coefficients


def analysis_train_indices(ws: Workspace, task: str) -> np.ndarray:
    """Return the training examples of `task` scored for forgetting, sorted.

    With `analysis.train_examples` set below the split size, a subset drawn from a
    generator seeded by `data.subsample_seed` and the task name, the same for every seed,
    step, expert and merge. Otherwise every index.
    """
    size = len(ws.tokenized[(task, "train")])
    limit = ws.config.analysis.train_examples
    if limit is None or limit >= size:
        return np.arange(size)
    chosen = stable_rng(ws.config.data.subsample_seed, f"{task}/analysis").permutation(size)
    return np.sort(chosen[:limit])


def subset_split(split: TokenizedSplit, indices: np.ndarray) -> TokenizedSplit:
    # Text and image splits both implement `subset`.
    return split.subset(indices)


def difficulty_scores(
    ws: Workspace, *, kind: str, seed: int, task: str, indices: np.ndarray
) -> dict[str, np.ndarray]:
    """Return the expert's difficulty scores of the training examples at `indices`.

    Scores that are NaN for every example (EL2N when its step was never reached) are
    left out. Without an examples.parquet (recorder off), the result is empty.

    Raises:
        CheckpointError: for an examples.parquet whose rows do not match the training split.
    """
    path = ws.run.expert_dir(kind, task, seed) / "examples.parquet"
    if not path.is_file():
        logger.info(
            "%s not found (recorder off), so task %s gets no difficulty deciles", path, task
        )
        return {}
    frame = pd.read_parquet(path).sort_values("index")
    size = len(ws.tokenized[(task, "train")])
    if not np.array_equal(frame["index"].to_numpy(), np.arange(size)):
        raise CheckpointError(
            f"{path} has {len(frame)} rows with indices {frame['index'].min()}.."
            f"{frame['index'].max()}, but the training split of {task} has {size} examples. "
            "It was written with other data settings; fine-tune this expert again"
        )
    scores = {}
    for name in DIFFICULTY_SCORES:
        values = frame[name].to_numpy(dtype=np.float64)[indices]
        if values.size and np.isnan(values).all():
            logger.debug("%s: score %s is missing for every example, left out", path, name)
            continue
        scores[name] = values
    return scores


def evaluate_loaded(
    ws: Workspace,
    task_vector: Mapping[str, torch.Tensor],
    heads: Mapping[str, torch.nn.Module],
    splits: Mapping[tuple[str, str], TokenizedSplit],
) -> dict[tuple[str, str], np.ndarray]:
    """Evaluate base + task vector on each (task, split); returns boolean correctness arrays."""
    ws.weight_loader.load(task_vector)
    tasks = {task for task, _ in splits}
    classifiers = {task: ws.classifier(ws.eval_encoder, heads[task]) for task in tasks}
    return evaluate_tasks(
        classifiers,
        splits,
        pad_id=ws.pad_id,
        batch_size=ws.config.evaluation.batch_size,
        device=ws.device,
    )


def forgetting_step_rows(
    ws: Workspace,
    experts: Sequence[Expert],
    *,
    kind: str,
    seed: int,
    step: int,
    coefficients: Mapping[str, float],
    merges: pd.DataFrame,
) -> list[dict]:
    """Build the forgetting rows of every method's merge at one step, for every task and split."""
    names = [expert.task for expert in experts]
    heads = heads_for(ws, experts)
    splits: dict[tuple[str, str], TokenizedSplit] = {}
    scores: dict[str, dict[str, np.ndarray]] = {}
    for task in names:
        indices = analysis_train_indices(ws, task)
        splits[(task, "test")] = ws.tokenized[(task, "test")]
        splits[(task, "train")] = subset_split(ws.tokenized[(task, "train")], indices)
        scores[task] = difficulty_scores(ws, kind=kind, seed=seed, task=task, indices=indices)

    # Each expert on its own task's examples.
    expert_correct: dict[tuple[str, str], np.ndarray] = {}
    for expert in experts:
        own = {(expert.task, split): splits[(expert.task, split)] for split in SPLITS}
        expert_correct.update(evaluate_loaded(ws, expert.task_vector, heads, own))

    rows = []
    rebuild = MergeRebuilder(ws, experts, heads, seed=seed)
    for method, coefficient in coefficients.items():
        merged = rebuild(method, coefficient)
        merged_correct = evaluate_loaded(ws, merged, heads, splits)
        check_rebuilt_accuracy(merges, merged_correct, seed=seed, method=method, step=step)
        for task in names:
            for split in SPLITS:
                rows += forgetting_rows(
                    expert_correct=expert_correct[(task, split)],
                    merged_correct=merged_correct[(task, split)],
                    # Test examples have no training history, so they get the "all" row only.
                    scores=scores[task] if split == "train" else None,
                    seed=seed,
                    kind=kind,
                    method=method,
                    step=step,
                    task=task,
                    split=split,
                )
    return rows


class MergeRebuilder:
    """Rebuilds the merge stage's merges of one step's experts at a given coefficient.

    Task-vector methods call `merge_task_vectors` as `merge_and_choose` does. PEFT LoRA
    methods go through `merge_and_choose_peft` with a one-value coefficient grid, which
    also evaluates the merge on validation once but repeats the merge stage's options
    exactly. The seed is the merge stage's, so DARE drops the same entries.
    """

    def __init__(
        self,
        ws: Workspace,
        experts: Sequence[Expert],
        heads: Mapping[str, torch.nn.Module],
        *,
        seed: int,
    ) -> None:
        self.ws = ws
        self.experts = experts
        self.heads = heads
        self.seed = seed
        self._peft_context = None

    def __call__(self, method: str, coefficient: float) -> dict[str, torch.Tensor]:
        if method in MERGE_METHODS:
            return merge_task_vectors(
                [expert.task_vector for expert in self.experts],
                method,
                coefficient=coefficient,
                density=method_density(self.ws, method),
                seed=self.seed,
                names=[expert.task for expert in self.experts],
            )
        if method in PEFT_LORA_METHODS:
            if self._peft_context is None:
                # Built once per step: the adapters' shared settings and a base encoder copy.
                self._peft_context = (
                    lora_adapter_info(self.experts),
                    self.ws.fresh_encoder().eval(),
                )
            info, base_model = self._peft_context
            outcome = merge_and_choose_peft(
                self.ws,
                self.experts,
                self.heads,
                method,
                seed=self.seed,
                base_model=base_model,
                info=info,
                coefficients=[coefficient],
            )
            return outcome.task_vector
        raise MergeError(
            f"cannot rebuild merging method {method!r}; supported: "
            f"{', '.join([*MERGE_METHODS, *PEFT_LORA_METHODS])}"
        )


def check_rebuilt_accuracy(
    merges: pd.DataFrame,
    merged_correct: Mapping[tuple[str, str], np.ndarray],
    *,
    seed: int,
    method: str,
    step: int,
) -> None:
    """Warn when a rebuilt merge's test accuracy differs from the one the merge stage recorded."""
    recorded = merges[
        (merges["seed"] == seed)
        & (merges["method"] == method)
        & (merges["step"] == step)
        & (merges["split"] == "test")
    ].set_index("task")["accuracy"]
    for (task, split), correct in merged_correct.items():
        if split != "test" or task not in recorded.index:
            continue
        accuracy = float(correct.mean())
        if abs(accuracy - float(recorded.loc[task])) > ACCURACY_TOLERANCE:
            logger.warning(
                "rebuilt %s merge (seed %d, step %d) has test accuracy %.4f on %s, but the "
                "merges table records %.4f; the forgetting rows describe the rebuilt merge",
                method,
                seed,
                step,
                accuracy,
                task,
                float(recorded.loc[task]),
            )


def collect_analysis_tables(ws: Workspace) -> None:
    """Concatenate every unit's tables into results/interference.csv and forgetting.csv."""
    for suffix, name, columns in (
        ("interference", "interference.csv", INTERFERENCE_COLUMNS),
        ("forgetting", "forgetting.csv", FORGETTING_COLUMNS),
    ):
        frames = []
        for kind in ws.config.training.methods:
            for seed in ws.config.seeds:
                folder = unit_folder(ws.run, kind, seed)
                for step in ws.config.training.resolved_checkpoint_steps():
                    path = folder / f"step{step}_{suffix}.csv"
                    if path.is_file():
                        frames.append(pd.read_csv(path))
        if not frames:
            logger.info("analyze: no %s tables yet, results/%s not written", suffix, name)
            continue
        ws.run.write_result(name, pd.concat(frames, ignore_index=True)[list(columns)])


def write_pruning_comparison(ws: Workspace, earlier: Path) -> None:
    """Compare this pruned run with the earlier run it was pruned from."""
    from upcycle.analysis.pruning import compare_runs

    comparison = compare_runs(earlier, ws.run.root)
    if comparison.empty:
        logger.info("pruning comparison: no merged test accuracy shared with %s yet", earlier)
        return
    ws.run.write_result("pruning_comparison.csv", comparison)


# summary.md


def summary_section(run: RunDir) -> list[str]:
    """Return the summary.md lines of the analysis tables, or [] when none exists."""
    from upcycle.analysis.pruning import pruning_summary

    lines: list[str] = []
    forgetting = run.read_result("forgetting.csv")
    if forgetting is not None and not forgetting.empty:
        lines += forgetting_summary(run, forgetting)
    interference = run.read_result("interference.csv")
    if interference is not None and not interference.empty:
        lines += interference_summary(interference)
    difficulty = run.read_result("difficulty.csv")
    if difficulty is not None and not difficulty.empty:
        lines += difficulty_summary(difficulty)
    comparison = run.read_result("pruning_comparison.csv")
    if comparison is not None and not comparison.empty:
        lines += pruning_summary(comparison)
    return lines


def _percent(value: float) -> str:
    return "–" if pd.isna(value) else f"{100 * value:.1f}"


def best_merged_steps(merges: pd.DataFrame) -> dict[str, int]:
    """Return each method's step with the best mean test accuracy (tasks, then seeds).

    A tie keeps the earliest step.
    """
    test = merges[(merges["split"] == "test") & (merges["method"] != "zeroshot")]
    per_seed = test.groupby(["method", "step", "seed"], as_index=False)["accuracy"].mean()
    curves = per_seed.groupby(["method", "step"], as_index=False)["accuracy"].mean()
    best = {}
    for method, rows in curves.groupby("method", sort=False):
        rows = rows.dropna(subset=["accuracy"]).sort_values("step")
        if not rows.empty:
            best[str(method)] = int(rows.loc[rows["accuracy"].idxmax(), "step"])
    return best


def decile_rate_table(rows: pd.DataFrame, step_of: Mapping[str, int]) -> list[str]:
    """Markdown table: one row per method at its step, pooled forgetting rate (%) per decile."""
    deciles = [str(decile) for decile in range(10)]
    header = ["method", "step", "all", *deciles]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, step in step_of.items():
        selected = rows[(rows["method"] == method) & (rows["step"] == step)]
        if selected.empty:
            continue
        totals = selected.groupby("decile")[["forgotten", "n"]].sum()
        cells = [method, str(step)]
        for decile in ["all", *deciles]:
            if decile in totals.index and totals.loc[decile, "n"] > 0:
                cells.append(_percent(totals.loc[decile, "forgotten"] / totals.loc[decile, "n"]))
            else:
                cells.append("–")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def forgetting_summary(run: RunDir, forgetting: pd.DataFrame) -> list[str]:
    forgetting = forgetting.assign(decile=forgetting["decile"].astype(str))
    train = forgetting[forgetting["split"] == "train"]
    rows = train[train["score"].isin(["learned_step", "none"])]
    lines = []
    for kind, title in (("full", "Full fine-tuning"), ("lora", "LoRA")):
        kind_rows = rows[rows["kind"] == kind]
        if kind_rows.empty:
            continue
        methods = list(dict.fromkeys(kind_rows["method"]))
        final = {method: int(kind_rows["step"].max()) for method in methods}
        lines += [
            f"## {title}: forgetting by merging (training split, %)",
            "",
            (
                "Of the training examples each expert classifies correctly, the share the "
                "merged model gets wrong, pooled over tasks and seeds: over all scored "
                "examples, then per decile of the expert's learned step (0 = learned earliest, "
                "9 = learned last or never)."
            ),
            "",
            "At the final checkpoint step:",
            "",
            *decile_rate_table(kind_rows, final),
            "",
        ]
        merges = run.read_result(MERGES_FILES[kind])
        if merges is not None and not merges.empty:
            best = {m: s for m, s in best_merged_steps(merges).items() if m in methods}
            lines += [
                "At each method's best merged step (highest mean test accuracy):",
                "",
                *decile_rate_table(kind_rows, best),
                "",
            ]
    return lines


def interference_summary(interference: pd.DataFrame) -> list[str]:
    metrics = interference[interference["metric"].isin(["sign_conflict", "mean_cosine"])]
    if metrics.empty:
        return []
    means = metrics.groupby(["kind", "step", "metric"])["value"].mean()
    kinds = [kind for kind in ("full", "lora") if kind in set(metrics["kind"])]
    header = ["step"]
    for kind in kinds:
        header += [f"{kind} sign conflict (%)", f"{kind} mean cosine"]
    lines = [
        "## Task-vector interference",
        "",
        (
            "Sign conflict is the share of coordinates where one expert's task vector is "
            "positive and another's negative. The mean cosine averages the cosine similarity "
            "of every pair of task vectors. Both are means over seeds."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for step in sorted(metrics["step"].unique()):
        cells = [str(step)]
        for kind in kinds:
            conflict = means.get((kind, step, "sign_conflict"), float("nan"))
            cosine = means.get((kind, step, "mean_cosine"), float("nan"))
            cells += [_percent(conflict), "–" if pd.isna(cosine) else f"{cosine:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def difficulty_summary(difficulty: pd.DataFrame) -> list[str]:
    columns = [
        ("learned_fraction", "learned (%)"),
        ("grad_concentration_top5", "top-5% head gradient share (%)"),
        ("full_grad_concentration_top5", "top-5% full gradient share (%)"),
    ]
    present = [
        (column, label)
        for column, label in columns
        if column in difficulty and difficulty[column].notna().any()
    ]
    if not present:
        return []
    kinds = [kind for kind in ("full", "lora") if kind in set(difficulty["kind"])]
    means = difficulty.groupby(["kind", "step"])[[column for column, _ in present]].mean()
    header = ["step", *[f"{kind} {label}" for kind in kinds for _, label in present]]
    lines = [
        "## Training dynamics",
        "",
        (
            "Means over tasks and seeds at each checkpoint step: the fraction of training "
            "examples whose most recent visit was correct, and the share of the summed "
            "per-example gradient norm that comes from the 5% of examples with the largest "
            "norms (head gradient: every example's most recent visit; full gradient: a fixed "
            "subsample)."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for step in sorted(difficulty["step"].unique()):
        cells = [str(step)]
        for kind in kinds:
            for column, _ in present:
                value = means[column].get((kind, step), float("nan"))
                cells.append(_percent(value))
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]
