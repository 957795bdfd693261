"""Result tables of a run directory and the report's matplotlib figures.

`load_results` reads `RUN/results/*.csv` with the columns listed in
docs/architecture.md. Accuracies, rates and fractions in those files are
fractions in [0, 1], and the figures show them in percent. Each figure builder takes
the loaded tables and returns one `ReportFigure`, or raises `MissingData` when
the tables it needs are absent or empty, so a run that stopped early still gets
every figure its files support.

Figures are `matplotlib.figure.Figure` objects drawn on the Agg canvas without
pyplot, so building a report changes no global matplotlib state.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from upcycle.errors import UpcycleError

logger = logging.getLogger(__name__)

Kind = Literal["full", "lora"]
KINDS: tuple[Kind, ...] = ("full", "lora")

FIGSIZE = (8.0, 4.5)
GRID_FIGSIZE = (9.0, 6.5)
STEP_LABEL = "expert training step (optimizer steps)"
ADAPTER_STEP_LABEL = "adapter training step (optimizer steps)"


def columns(header: str) -> tuple[str, ...]:
    """Split a comma-separated header, as written in docs/architecture.md, into column names."""
    return tuple(name.strip() for name in header.split(","))


MERGE_COLUMNS = columns(
    "seed, method, step, coefficient, task, split, accuracy, expert_accuracy, normalized_accuracy"
)
RESULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "experts.csv": columns("seed, task, step, split, accuracy, n"),
    "lora_experts.csv": columns("seed, task, step, split, accuracy, n"),
    "merges.csv": MERGE_COLUMNS,
    "lora_merges.csv": MERGE_COLUMNS,
    "moe.csv": columns(
        "seed, step, top_k, task, split, accuracy, expert_accuracy, normalized_accuracy"
    ),
    "difficulty.csv": columns(
        "seed, kind, task, step, train_loss, learned_fraction, forgetting_events, "
        "grad_concentration_top1, grad_concentration_top5, grad_concentration_top10"
    ),
    "forgetting.csv": columns(
        "seed, kind, method, step, task, split, score, decile, n, forgotten, rate"
    ),
    "interference.csv": columns("seed, kind, step, metric, task_a, task_b, value"),
    "selection.csv": columns(
        "seed, kind, method, strategy, steps, compute_fraction, validation_accuracy, "
        "test_accuracy, merges_evaluated"
    ),
}
"""Required columns of each result file the report reads. Extra columns are ignored."""

TEXT_COLUMNS = columns(
    "task, split, method, kind, strategy, steps, score, decile, metric, task_a, task_b"
)
FRACTION_COLUMNS = columns(
    "accuracy, expert_accuracy, validation_accuracy, test_accuracy, learned_fraction, rate, "
    "compute_fraction"
)
"""Columns whose values must lie in [0, 1]. Normalized accuracy is not one, as it may exceed 1."""

METHOD_LABELS = {
    "average": "weight averaging",
    "task_arithmetic": "task arithmetic",
    "ties": "TIES",
    "dare_task_arithmetic": "DARE task arithmetic",
    "dare_ties": "DARE-TIES",
    "peft_linear": "PEFT linear",
    "peft_ties": "PEFT TIES",
    "peft_dare_linear": "PEFT DARE linear",
    "peft_dare_ties": "PEFT DARE-TIES",
    "peft_magnitude_prune": "PEFT magnitude pruning",
    "peft_svd": "PEFT SVD",
    "peft_ties_svd": "PEFT TIES-SVD",
    "peft_dare_linear_svd": "PEFT DARE linear SVD",
}
KIND_LABELS = {"full": "full fine-tuning", "lora": "LoRA"}
CONCENTRATION_PANELS = (
    ("grad_concentration_top1", "gradient concentration, top 1%"),
    ("grad_concentration_top5", "gradient concentration, top 5%"),
    ("grad_concentration_top10", "gradient concentration, top 10%"),
)
FORGETTING_SCORES = {"learned_step": "learned step", "el2n": "EL2N"}
"""Difficulty scores drawn first, in this order. Other scores in forgetting.csv follow."""
ALL_EXAMPLES_SCORE = "none"
INTERFERENCE_PANELS = (
    ("sign_conflict", "sign-conflict fraction", "coordinates in sign conflict (%)", 100.0),
    ("mean_cosine", "mean cosine similarity", "cosine similarity of task vectors", 1.0),
)
"""(metric, title, y label, scale) of each interference panel."""
INTERFERENCE_DEFINITIONS = {
    "sign_conflict": "The sign-conflict fraction is the share of coordinates where one expert "
    "is positive and another negative.",
    "mean_cosine": "The mean cosine averages the cosine similarity over pairs of experts.",
}
MAX_PAIR_LINES = 10


class ReportError(UpcycleError, ValueError):
    """A run directory or result file that cannot be turned into a report."""


class MissingData(Exception):
    """A table that a figure needs is absent or empty. The message names it."""


def method_label(method: str) -> str:
    """Return the display name of a merging method, or the name itself when unknown."""
    return METHOD_LABELS.get(method, method)


def kind_prefix(kind: Kind) -> str:
    """Return the file-name prefix of results for `kind`: "" for full, "lora_" for LoRA."""
    return "" if kind == "full" else "lora_"


# Loading


@dataclass
class RunResults:
    """The result tables of one run directory by file name, without absent or empty files."""

    run_dir: Path
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def get(self, name: str) -> pd.DataFrame | None:
        return self.tables.get(name)

    def require(self, name: str) -> pd.DataFrame:
        """Return the table `name`, raising `MissingData` when the file is absent or empty."""
        table = self.tables.get(name)
        if table is None:
            raise MissingData(f"results/{name} is missing or empty")
        return table

    def kind_rows(self, name: str, kind: Kind) -> pd.DataFrame:
        """Return the rows of `name` of this `kind`, raising `MissingData` when there are none."""
        table = self.require(name)
        rows = table[table["kind"] == kind]
        if rows.empty:
            raise MissingData(f"results/{name} has no rows of kind {kind!r}")
        return rows


def read_result(path: Path) -> pd.DataFrame | None:
    """Read one result CSV, returning None when it is missing or has no rows.

    Raises:
        ReportError: if the file cannot be parsed, lacks a required column, has a
            non-numeric value in a numeric column, or a fraction outside [0, 1].
    """
    if not path.is_file():
        return None
    required = RESULT_COLUMNS[path.name]
    dtypes = {column: str for column in TEXT_COLUMNS if column in required}
    try:
        frame = pd.read_csv(path, dtype=dtypes, keep_default_na=True)
    except pd.errors.EmptyDataError:
        return None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as error:
        raise ReportError(
            f"result file {path} is not a valid CSV ({error}). Delete it and rerun the stage "
            "that writes it."
        ) from error
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise ReportError(
            f"result file {path} lacks the columns {missing}. Its header must contain "
            f"{', '.join(required)}. Rerun the stage that writes it with this version of upcycle."
        )
    if frame.empty:
        return None
    for column in required:
        if column in TEXT_COLUMNS:
            continue
        try:
            frame[column] = pd.to_numeric(frame[column])
        except (ValueError, TypeError) as error:
            raise ReportError(
                f"result file {path} has a non-numeric value in column {column!r} ({error}). "
                "Delete it and rerun the stage that writes it."
            ) from error
        if column in FRACTION_COLUMNS:
            values = frame[column].dropna()
            outside = values[(values < 0) | (values > 1)]
            if not outside.empty:
                raise ReportError(
                    f"result file {path} has {column} = {outside.iloc[0]!r}, outside [0, 1]: "
                    "accuracies, rates and fractions must be stored as fractions, not percent."
                )
    return frame


def load_results(run_dir: str | Path) -> RunResults:
    """Read every known result file of `run_dir`.

    Raises:
        ReportError: if `run_dir` is not a directory, a result file is invalid, or
            no result file has any rows, because a report without results would be
            an empty page.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"run directory not found: {run_dir}. Pass the folder of a run.")
    results = RunResults(run_dir)
    for name in RESULT_COLUMNS:
        frame = read_result(run_dir / "results" / name)
        if frame is not None:
            results.tables[name] = frame
    if not results.tables:
        raise ReportError(
            f"no results to report in {run_dir}: none of results/{{{','.join(RESULT_COLUMNS)}}} "
            "exists with rows. Run the fine-tuning stage first, which writes "
            "results/experts.csv, then run the report again."
        )
    return results


# Aggregation


def seed_stats(frame: pd.DataFrame, keys: Sequence[str], value: str) -> pd.DataFrame:
    """Average `value` within each seed over every column not in `keys`, then over seeds.

    Returns one row per combination of `keys` with columns `mean`, `std` (NaN for
    one seed) and `seeds` (the number of seeds).
    """
    keys = list(keys)
    per_seed = frame.groupby(["seed", *keys], as_index=False)[value].mean()
    stats = per_seed.groupby(keys)[value].agg(mean="mean", std="std", seeds="count")
    return stats.reset_index().sort_values(keys, kind="stable").reset_index(drop=True)


def select_coefficients(merges: pd.DataFrame) -> pd.DataFrame:
    """Keep one scaling coefficient per (seed, method, step): the best on mean validation accuracy.

    The merging stage writes one coefficient per merge, and such rows pass unchanged.
    A tie on validation accuracy keeps the smallest coefficient.

    Raises:
        ReportError: if a merge has several coefficients but no validation rows.
    """
    keys = ["seed", "method", "step"]
    counts = merges.groupby(keys)["coefficient"].transform("nunique")
    ambiguous = merges[counts > 1]
    if ambiguous.empty:
        return merges
    validation = ambiguous[ambiguous["split"] == "validation"]
    scores = validation.groupby([*keys, "coefficient"], as_index=False)["accuracy"].mean()
    if scores.groupby(keys).ngroups < ambiguous.groupby(keys).ngroups:
        raise ReportError(
            "a merges table has several scaling coefficients for one (seed, method, step) but "
            "no validation rows to choose between them; rerun the merging stage."
        )
    # idxmax returns the first maximum, which is the smallest coefficient after this sort.
    scores = scores.sort_values([*keys, "coefficient"], kind="stable")
    best = scores.loc[scores.groupby(keys)["accuracy"].idxmax(), [*keys, "coefficient"]]
    chosen = ambiguous.merge(best, on=[*keys, "coefficient"], how="inner")
    return pd.concat([merges[counts <= 1], chosen], ignore_index=True)


@dataclass(frozen=True)
class BestStep:
    """The best and the final step of one merging method on mean test accuracy over tasks."""

    method: str
    best_step: int
    best_value: float
    final_step: int
    final_value: float


def merged_curves(merges: pd.DataFrame, value: str = "accuracy") -> pd.DataFrame:
    """Return mean over tasks, then seeds, of `value` on the test split per (method, step)."""
    test = select_coefficients(merges)
    test = test[test["split"] == "test"]
    if test.empty:
        raise MissingData("the merges table has no test rows")
    return seed_stats(test, ["method", "step"], value)


def best_steps(curves: pd.DataFrame) -> dict[str, BestStep]:
    """Find each method's best step in `merged_curves` output. A tie keeps the earliest step."""
    best: dict[str, BestStep] = {}
    for method, rows in curves.groupby("method", sort=False):
        rows = rows.dropna(subset=["mean"]).sort_values("step")
        if rows.empty:
            continue
        top = rows.loc[rows["mean"].idxmax()]
        last = rows.iloc[-1]
        best[str(method)] = BestStep(
            method=str(method),
            best_step=int(top["step"]),
            best_value=float(top["mean"]),
            final_step=int(last["step"]),
            final_value=float(last["mean"]),
        )
    return best


def best_method(curves: pd.DataFrame) -> BestStep:
    """Return the method whose best step has the highest mean test accuracy (first on a tie)."""
    steps = best_steps(curves)
    if not steps:
        raise MissingData("the merges table has no finite test accuracy")
    return max(steps.values(), key=lambda item: item.best_value)


# Drawing helpers


def new_figure(size: tuple[float, float] = FIGSIZE) -> Figure:
    figure = Figure(figsize=size, dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def colors_for(names: Iterable[str]) -> dict[str, tuple[float, float, float, float]]:
    """Assign tab10 or tab20 colors in sorted order, so a name keeps its color in every figure."""
    names = sorted(set(names))
    palette = "tab10" if len(names) <= 10 else "tab20"
    cmap = colormaps[palette]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def is_log_spaced(steps: Iterable[float]) -> bool:
    """Tell whether positive checkpoint steps span a ratio of 8 or more over at least 3 steps."""
    positive = sorted({float(step) for step in steps if step > 0})
    return len(positive) >= 3 and positive[-1] / positive[0] >= 8


def format_step_axis(axes: Axes, steps: Iterable[float], label: str = STEP_LABEL) -> None:
    """Label a step axis, on a symlog scale when the steps are log-spaced.

    Symlog is linear below the smallest positive step, so step 0 (the base model)
    sits at the left edge of an otherwise logarithmic axis.
    """
    steps = sorted({float(step) for step in steps})
    if is_log_spaced(steps):
        smallest = min(step for step in steps if step > 0)
        axes.set_xscale("symlog", linthresh=smallest, linscale=0.5)
    if len(steps) <= 12:
        axes.xaxis.set_major_locator(FixedLocator(steps))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{x:g}"))
        axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel(label)


def plot_mean_band(
    axes: Axes,
    stats: pd.DataFrame,
    *,
    x: str,
    label: str,
    color,
    scale: float = 100.0,
    linestyle: str = "-",
    marker: str | None = "o",
) -> None:
    """Plot `stats["mean"]` against `stats[x]`, with a ±1 std band where several seeds exist."""
    stats = stats.sort_values(x)
    xs = stats[x].to_numpy(dtype=float)
    mean = stats["mean"].to_numpy(dtype=float) * scale
    axes.plot(xs, mean, linestyle=linestyle, marker=marker, markersize=4, color=color, label=label)
    std = stats["std"].to_numpy(dtype=float) * scale
    if np.isfinite(std).any():
        std = np.nan_to_num(std)
        axes.fill_between(xs, mean - std, mean + std, color=color, alpha=0.18, linewidth=0)


def seeds_phrase(seed_count: int) -> str:
    """Describe averaging over seeds for a caption."""
    if seed_count <= 1:
        return "one seed"
    return f"mean over {seed_count} seeds (band: ±1 standard deviation over seeds)"


def step_zero_phrase(steps: Iterable[float]) -> str:
    return " Step 0 is the base model (zero-shot)." if 0 in set(steps) else ""


def scale_phrase(steps: Iterable[float]) -> str:
    return (
        " The step axis is logarithmic above the first checkpoint." if is_log_spaced(steps) else ""
    )


@dataclass
class ReportFigure:
    """One drawn figure with the title and caption the page shows beside it.

    `table`, when set, contains display strings that the page shows under the figure.
    """

    title: str
    caption: str
    figure: Figure
    table: pd.DataFrame | None = None


@dataclass(frozen=True)
class FigureSpec:
    """A figure's file name (without extension) and the function that builds it."""

    name: str
    build: Callable[[RunResults], ReportFigure]


# Figure 1: expert accuracy


def expert_accuracy_figure(results: RunResults, *, kind: Kind) -> ReportFigure:
    """Draw each task's expert accuracy against its step, one panel per evaluated split."""
    experts = results.require(f"{kind_prefix(kind)}experts.csv")
    splits = [split for split in ("validation", "test") if (experts["split"] == split).any()]
    if not splits:
        raise MissingData("the experts table has no validation or test rows")
    tasks = sorted(experts["task"].unique())
    colors = colors_for(tasks)
    figure = new_figure()
    panels = figure.subplots(1, len(splits), sharey=True, squeeze=False)[0]
    for axes, split in zip(panels, splits, strict=True):
        format_step_axis(axes, experts["step"])
        rows = experts[experts["split"] == split]
        stats = seed_stats(rows, ["task", "step"], "accuracy")
        for task in tasks:
            plot_mean_band(
                axes, stats[stats["task"] == task], x="step", label=task, color=colors[task]
            )
        axes.set_title(f"{split} split")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("accuracy (%)")
    panels[-1].legend(title="task", fontsize="small")
    seeds = experts["seed"].nunique()
    caption = (
        f"Accuracy of each task's {KIND_LABELS[kind]} expert against its training step on the "
        f"{' and '.join(splits)} split{'s' if len(splits) > 1 else ''}, {seeds_phrase(seeds)}."
        + step_zero_phrase(experts["step"])
        + scale_phrase(experts["step"])
    )
    return ReportFigure(f"Expert accuracy ({KIND_LABELS[kind]})", caption, figure)


# Figure 2: merged accuracy per method


def merged_accuracy_figure(
    results: RunResults, *, kind: Kind, value: Literal["accuracy", "normalized_accuracy"]
) -> ReportFigure:
    """Draw each method's mean test `value` over tasks against the experts' step.

    Stars mark each method's best step on mean test accuracy, also when `value` is
    the normalized accuracy, so both figures point at the same merges.
    """
    merges = results.require(f"{kind_prefix(kind)}merges.csv")
    curves = merged_curves(merges, value)
    best = best_steps(merged_curves(merges))
    colors = colors_for(curves["method"])
    figure = new_figure()
    axes = figure.subplots()
    format_step_axis(axes, curves["step"])
    for method, rows in curves.groupby("method", sort=True):
        plot_mean_band(axes, rows, x="step", label=method_label(str(method)), color=colors[method])
        at_best = rows[rows["step"] == best[method].best_step] if method in best else rows[:0]
        if not at_best.empty:
            axes.plot(
                [best[method].best_step],
                [100 * at_best["mean"].iloc[0]],
                marker="*",
                markersize=15,
                color=colors[method],
                markeredgecolor="black",
                linestyle="none",
            )

    test = select_coefficients(merges)
    test = test[test["split"] == "test"]
    if value == "accuracy":
        reference = seed_stats(test, ["step"], "expert_accuracy")
        plot_mean_band(
            axes,
            reference,
            x="step",
            label="experts (mean over tasks)",
            color="black",
            linestyle="--",
            marker=None,
        )
        axes.set_ylabel("mean test accuracy over tasks (%)")
        reference_phrase = "The dashed line is the experts' own mean test accuracy."
        title = "Merged accuracy"
    else:
        axes.axhline(100.0, color="black", linestyle="--", label="expert accuracy (100%)")
        axes.set_ylabel("normalized accuracy, merged / expert (%)")
        reference_phrase = "The dashed line at 100% is the experts' own accuracy."
        title = "Merged normalized accuracy"
    axes.plot(
        [],
        [],
        marker="*",
        markersize=12,
        color="white",
        markeredgecolor="black",
        linestyle="none",
        label="best step of each method",
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")

    tasks = test["task"].nunique()
    quantity = (
        "test accuracy" if value == "accuracy" else "normalized test accuracy (merged / expert)"
    )
    caption = (
        f"Mean {quantity} over {tasks} tasks of the model merged from the {KIND_LABELS[kind]} "
        f"experts of all tasks at each step, one line per merging method, "
        f"{seeds_phrase(test['seed'].nunique())}. Stars mark each method's best step, the one "
        "with its highest mean test accuracy. "
        f"{reference_phrase}" + step_zero_phrase(curves["step"]) + scale_phrase(curves["step"])
    )
    return ReportFigure(f"{title} ({KIND_LABELS[kind]})", caption, figure)


# Figure 3: per-task accuracy of the best method


def best_method_per_task_figure(results: RunResults, *, kind: Kind) -> ReportFigure:
    """Draw per-task merged and expert test accuracy for the best merging method."""
    merges = results.require(f"{kind_prefix(kind)}merges.csv")
    top = best_method(merged_curves(merges))
    test = select_coefficients(merges)
    test = test[(test["split"] == "test") & (test["method"] == top.method)]
    tasks = sorted(test["task"].unique())
    colors = colors_for(tasks)

    figure = new_figure()
    axes = figure.subplots()
    format_step_axis(axes, test["step"])
    merged = seed_stats(test, ["task", "step"], "accuracy")
    expert = seed_stats(test, ["task", "step"], "expert_accuracy")
    for task in tasks:
        plot_mean_band(
            axes,
            merged[merged["task"] == task],
            x="step",
            label=f"{task} merged",
            color=colors[task],
        )
        plot_mean_band(
            axes,
            expert[expert["task"] == task],
            x="step",
            label=f"{task} expert",
            color=colors[task],
            linestyle="--",
            marker=None,
        )
    axes.axvline(top.best_step, color="grey", linestyle=":", label=f"best step ({top.best_step})")
    axes.set_ylabel("test accuracy (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncols=2)

    caption = (
        f"Test accuracy on each task of the {method_label(top.method)} merge of the "
        f"{KIND_LABELS[kind]} experts (solid) and of that task's own expert (dashed), "
        f"{seeds_phrase(test['seed'].nunique())}. {method_label(top.method)} is the method "
        "with the highest mean test accuracy at its best step; the dotted line marks that step."
        + step_zero_phrase(test["step"])
        + scale_phrase(test["step"])
    )
    title = (
        f"Per-task accuracy of the best method, {method_label(top.method)} ({KIND_LABELS[kind]})"
    )
    return ReportFigure(title, caption, figure)


# Figure 4: mixture of experts


def best_lora_merge_curve(results: RunResults) -> tuple[str, pd.DataFrame] | None:
    """Return the best LoRA merging method and its test curve, or None without LoRA merges."""
    lora_merges = results.get("lora_merges.csv")
    if lora_merges is None:
        return None
    try:
        curves = merged_curves(lora_merges)
        top = best_method(curves)
    except MissingData as error:
        logger.info("MoE figure drawn without a LoRA merge reference: %s", error)
        return None
    return top.method, curves[curves["method"] == top.method]


def moe_figure(results: RunResults) -> ReportFigure:
    """Draw MoE mean test accuracy per top-k against the adapters' step, with LoRA references."""
    moe = results.require("moe.csv")
    test = moe[moe["split"] == "test"]
    if test.empty:
        raise MissingData("results/moe.csv has no test rows")
    best_merge = best_lora_merge_curve(results)
    steps = list(test["step"]) + (list(best_merge[1]["step"]) if best_merge else [])
    top_ks = sorted(test["top_k"].unique())
    colors = colors_for([f"top-{k}" for k in top_ks])

    figure = new_figure()
    axes = figure.subplots()
    format_step_axis(axes, steps, ADAPTER_STEP_LABEL)
    curves = seed_stats(test, ["top_k", "step"], "accuracy")
    for top_k in top_ks:
        label = f"top-{top_k}"
        plot_mean_band(
            axes,
            curves[curves["top_k"] == top_k],
            x="step",
            label=f"MoE, {label} routing",
            color=colors[label],
        )

    reference = seed_stats(test, ["step"], "expert_accuracy")
    plot_mean_band(
        axes,
        reference,
        x="step",
        label="LoRA experts (mean over tasks)",
        color="black",
        linestyle="--",
        marker=None,
    )

    merge_phrase = ""
    if best_merge is not None:
        method, rows = best_merge
        plot_mean_band(
            axes,
            rows,
            x="step",
            label=f"best LoRA merge ({method_label(method)})",
            color="dimgrey",
            linestyle=":",
            marker="s",
        )
        merge_phrase = f" The dotted line is the best LoRA merging method, {method_label(method)}."
    axes.set_ylabel("mean test accuracy over tasks (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")

    caption = (
        "Mean test accuracy over tasks of the mixture of experts upcycled from the LoRA "
        "adapters of every task at each step, one line per top-k, "
        f"{seeds_phrase(test['seed'].nunique())}. The dashed line is the LoRA experts' own "
        "mean." + merge_phrase + scale_phrase(steps)
    )
    return ReportFigure("Mixture of experts from LoRA adapters", caption, figure)


# Figure 5: difficulty


def difficulty_figure(results: RunResults, *, kind: Kind) -> ReportFigure:
    """Draw gradient concentration (top 1/5/10%) and learned fraction per task against step."""
    rows = results.kind_rows("difficulty.csv", kind)
    panels = [
        (column, title, "share of summed gradient norm (%)")
        for column, title in CONCENTRATION_PANELS
        if rows[column].notna().any()
    ]
    if rows["learned_fraction"].notna().any():
        panels.append(("learned_fraction", "learned fraction", "training examples learned (%)"))
    if not panels:
        raise MissingData(f"results/difficulty.csv has only empty values for kind {kind!r}")

    tasks = sorted(rows["task"].unique())
    colors = colors_for(tasks)
    columns = 2 if len(panels) > 1 else 1
    grid_rows = math.ceil(len(panels) / columns)
    figure = new_figure(GRID_FIGSIZE if grid_rows > 1 else FIGSIZE)
    axes_grid = figure.subplots(grid_rows, columns, squeeze=False)
    flat = list(axes_grid.flat)
    for axes, (column, title, ylabel) in zip(flat, panels, strict=False):
        format_step_axis(axes, rows["step"], "training step (optimizer steps)")
        stats = seed_stats(rows.dropna(subset=[column]), ["task", "step"], column)
        for task in tasks:
            plot_mean_band(
                axes,
                stats[stats["task"] == task],
                x="step",
                label=task,
                color=colors[task],
                marker=None,
            )
        axes.set_title(title, fontsize="medium")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
    for axes in flat[len(panels) :]:
        axes.set_visible(False)
    flat[0].legend(title="task", fontsize="small")

    caption = (
        f"Training dynamics of the {KIND_LABELS[kind]} experts, one line per task, "
        f"{seeds_phrase(rows['seed'].nunique())}: "
        f"{', '.join(title for _column, title, _label in panels)}. Gradient concentration "
        "(top k%) is the share of the summed per-example head-gradient norms (each example's "
        "latest) that comes from the k% of examples with the largest norms. The learned "
        "fraction is the share of training examples whose latest visit was classified "
        "correctly." + scale_phrase(rows["step"])
    )
    return ReportFigure(
        f"Gradient concentration and learned fraction ({KIND_LABELS[kind]})", caption, figure
    )


# Figure 6: forgetting by difficulty decile


def pooled_rate(rows: pd.DataFrame) -> pd.DataFrame:
    """Pool forgotten / n over seeds and tasks per decile into columns decile_number and rate."""
    totals = rows.groupby("decile_number", as_index=False)[["forgotten", "n"]].sum()
    totals = totals[totals["n"] > 0]
    totals["rate"] = totals["forgotten"] / totals["n"]
    return totals.sort_values("decile_number")


def forgetting_figure(results: RunResults, *, kind: Kind) -> ReportFigure:
    """Draw the forgetting rate per difficulty decile, per score, at the final and best steps."""
    rows = results.kind_rows("forgetting.csv", kind)
    rows = rows[(rows["split"] == "train") & (rows["score"] != ALL_EXAMPLES_SCORE)]
    rows = rows.assign(decile_number=pd.to_numeric(rows["decile"], errors="coerce"))
    rows = rows.dropna(subset=["decile_number"])
    if rows.empty:
        raise MissingData(
            f"results/forgetting.csv has no train-split decile rows for kind {kind!r}"
        )

    # One column of panels per moment: the final step, and each method's best merged step.
    present = set(rows["score"])
    scores = [score for score in FORGETTING_SCORES if score in present]
    scores += sorted(present - set(FORGETTING_SCORES))
    methods = sorted(rows["method"].unique())
    final_steps = {
        method: int(rows.loc[rows["method"] == method, "step"].max()) for method in methods
    }
    moments: list[tuple[str, dict[str, int]]] = [("at the final step", final_steps)]
    merges = results.get(f"{kind_prefix(kind)}merges.csv")
    if merges is not None:
        try:
            best = best_steps(merged_curves(merges))
        except MissingData as error:
            logger.info("forgetting figure drawn without best merged steps: %s", error)
        else:
            moments.append(
                (
                    "at the best merged step",
                    {method: item.best_step for method, item in best.items()},
                )
            )

    colors = colors_for(methods)
    figure = new_figure(GRID_FIGSIZE if len(scores) > 1 else FIGSIZE)
    grid = figure.subplots(len(scores), len(moments), sharey=True, squeeze=False)
    for row_index, score in enumerate(scores):
        for column_index, (moment, step_of) in enumerate(moments):
            axes = grid[row_index][column_index]
            for method in methods:
                step = step_of.get(method)
                if step is None:
                    continue
                selected = rows[
                    (rows["score"] == score) & (rows["method"] == method) & (rows["step"] == step)
                ]
                if selected.empty:
                    logger.info(
                        "forgetting figure: no %s rows for %s at step %d", score, method, step
                    )
                    continue
                rate = pooled_rate(selected)
                axes.plot(
                    rate["decile_number"],
                    100 * rate["rate"],
                    marker="o",
                    markersize=4,
                    color=colors[method],
                    label=f"{method_label(method)} (step {step})",
                )
            axes.set_title(f"{FORGETTING_SCORES.get(score, score)}, {moment}", fontsize="medium")
            axes.set_xticks(range(10))
            axes.set_xlabel("difficulty decile (0 = easiest, 9 = hardest)")
            axes.set_ylabel("forgotten after merging (%)")
            axes.grid(alpha=0.3)
            if axes.get_legend_handles_labels()[0]:
                axes.legend(fontsize="x-small")

    caption = (
        f"Forgetting after merging the {KIND_LABELS[kind]} experts: of the training examples "
        "each expert classifies correctly, the share that the merged model gets wrong, by "
        "difficulty decile of each score, one line per merging method, pooled over tasks and "
        "seeds. Columns compare the merge of the final checkpoints with the merge at each "
        "method's best step."
    )
    return ReportFigure(f"Forgetting by difficulty ({KIND_LABELS[kind]})", caption, figure)


# Figure 7: interference


def interference_figure(results: RunResults, *, kind: Kind) -> ReportFigure:
    """Draw the sign-conflict fraction and the mean pairwise cosine against the experts' step.

    The cosine panel also shows each pair of experts as a thin line, up to
    `MAX_PAIR_LINES` pairs.
    """
    rows = results.kind_rows("interference.csv", kind).dropna(subset=["value"])
    pairs = rows[rows["metric"] == "cosine"]
    if not (rows["metric"] == "mean_cosine").any() and not pairs.empty:
        # Files without the mean row still give it as the mean of the pair rows.
        mean = pairs.groupby(["seed", "step"], as_index=False)["value"].mean()
        rows = pd.concat([rows, mean.assign(metric="mean_cosine")], ignore_index=True)
    panels = [panel for panel in INTERFERENCE_PANELS if (rows["metric"] == panel[0]).any()]
    if not panels:
        raise MissingData(
            f"results/interference.csv has no sign_conflict or cosine rows for kind {kind!r}"
        )

    figure = new_figure()
    grid = figure.subplots(1, len(panels), squeeze=False)[0]
    for axes, (metric, title, ylabel, scale) in zip(grid, panels, strict=True):
        format_step_axis(axes, rows["step"])
        if metric == "mean_cosine" and not pairs.empty:
            pair_stats = seed_stats(pairs, ["task_a", "task_b", "step"], "value")
            pair_groups = list(pair_stats.groupby(["task_a", "task_b"]))
            for index, (_pair, pair_rows) in enumerate(pair_groups[:MAX_PAIR_LINES]):
                axes.plot(
                    pair_rows["step"],
                    pair_rows["mean"],
                    color="grey",
                    alpha=0.4,
                    linewidth=0.8,
                    label="single pairs" if index == 0 else None,
                )
        stats = seed_stats(rows[rows["metric"] == metric], ["step"], "value")
        plot_mean_band(axes, stats, x="step", label=title, color="C0", scale=scale)
        axes.set_title(title, fontsize="medium")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        if metric == "mean_cosine" and not pairs.empty:
            axes.legend(fontsize="small")

    caption = (
        f"Interference between the {KIND_LABELS[kind]} task vectors of all tasks at each step, "
        f"{seeds_phrase(rows['seed'].nunique())}: "
        f"{' and '.join(title for _metric, title, _label, _scale in panels)}. "
        + " ".join(INTERFERENCE_DEFINITIONS[metric] for metric, *_rest in panels)
        + step_zero_phrase(rows["step"])
        + scale_phrase(rows["step"])
    )
    return ReportFigure(f"Task-vector interference ({KIND_LABELS[kind]})", caption, figure)


# Figure 8: stopping rules


def selection_table(results: RunResults, kind: Kind) -> pd.DataFrame:
    """Average selection.csv over seeds per (strategy, method), in the file's order.

    Returns columns strategy, method, steps (distinct values joined by " | "),
    compute_fraction, validation_accuracy, test_accuracy, merges_evaluated, seeds.
    """
    rows = results.kind_rows("selection.csv", kind)
    # A strategy that never merges may leave the method empty, and its rows still count.
    rows = rows.assign(method=rows["method"].fillna("none"))
    keys = ["strategy", "method"]
    grouped = rows.groupby(keys, sort=False)
    table = grouped[
        ["compute_fraction", "validation_accuracy", "test_accuracy", "merges_evaluated"]
    ].mean()
    table["steps"] = grouped["steps"].agg(
        lambda values: " | ".join(dict.fromkeys(str(value) for value in values.dropna()))
    )
    table["seeds"] = grouped["seed"].nunique()
    return table.reset_index()[
        [
            "strategy",
            "method",
            "steps",
            "compute_fraction",
            "validation_accuracy",
            "test_accuracy",
            "merges_evaluated",
            "seeds",
        ]
    ]


def selection_figure(results: RunResults, *, kind: Kind) -> ReportFigure:
    """Draw test accuracy and compute spent per stopping strategy, one bar per method."""
    table = selection_table(results, kind)
    strategies = list(dict.fromkeys(table["strategy"]))
    methods = list(dict.fromkeys(table["method"]))
    colors = colors_for(methods)

    # Taller than the other figures, to leave room for the legend below the panels.
    figure = new_figure((FIGSIZE[0], FIGSIZE[1] + 1.5))
    accuracy_axes, compute_axes = figure.subplots(1, 2)
    width = 0.8 / len(methods)
    positions = np.arange(len(strategies))
    for index, method in enumerate(methods):
        rows = table[table["method"] == method].set_index("strategy").reindex(strategies)
        offsets = positions - 0.4 + width * (index + 0.5)
        accuracy_axes.bar(
            offsets,
            100 * rows["test_accuracy"],
            width,
            color=colors[method],
            label=method_label(method),
        )
        compute_axes.bar(offsets, 100 * rows["compute_fraction"], width, color=colors[method])
    for axes in (accuracy_axes, compute_axes):
        axes.set_xticks(positions, strategies, rotation=30, ha="right")
        axes.set_xlabel("stopping strategy")
        axes.grid(alpha=0.3, axis="y")
    accuracy_axes.set_ylabel("mean test accuracy over tasks (%)")
    if table["test_accuracy"].notna().any():
        low = 100 * table["test_accuracy"].min()
        high = 100 * table["test_accuracy"].max()
        margin = max(2.0, 0.5 * (high - low))
        accuracy_axes.set_ylim(max(0.0, low - margin), min(100.0, high + margin))
    compute_axes.set_ylabel("compute spent (% of the full trajectory)")
    compute_axes.set_ylim(0, 105)
    # The legend goes below both panels, because inside one it would cover bars when there
    # are many methods.
    figure.legend(
        *accuracy_axes.get_legend_handles_labels(),
        title="merging method",
        fontsize="small",
        loc="outside lower center",
        ncols=min(4, len(methods)),
    )

    caption = (
        f"Test accuracy (left) and fine-tuning compute spent (right) when each stopping strategy "
        f"picks the {KIND_LABELS[kind]} experts' steps, one bar per merging method, "
        f"mean over seeds. The accuracy axis starts near the lowest bar."
    )
    return ReportFigure(
        f"Stopping strategies ({KIND_LABELS[kind]})",
        caption,
        figure,
        display_selection_table(table),
    )


def display_selection_table(table: pd.DataFrame) -> pd.DataFrame:
    """Format `selection_table` output as strings for the page, fractions in percent."""

    def percent(values: pd.Series) -> pd.Series:
        return values.map(lambda value: "" if pd.isna(value) else f"{100 * value:.1f}")

    return pd.DataFrame(
        {
            "stopping strategy": table["strategy"],
            "merging method": table["method"].map(method_label),
            "steps": table["steps"],
            "compute spent (%)": percent(table["compute_fraction"]),
            "validation accuracy (%)": percent(table["validation_accuracy"]),
            "test accuracy (%)": percent(table["test_accuracy"]),
            "merges evaluated": table["merges_evaluated"].map(
                lambda value: "" if pd.isna(value) else f"{value:g}"
            ),
            "seeds": table["seeds"].astype(str),
        }
    )


# Registry


def figure_specs() -> list[FigureSpec]:
    """Return every figure the report can draw, in page order."""
    specs = [
        FigureSpec(
            f"{kind_prefix(kind)}expert_accuracy", partial(expert_accuracy_figure, kind=kind)
        )
        for kind in KINDS
    ]
    for kind in KINDS:
        prefix = kind_prefix(kind)
        specs.append(
            FigureSpec(
                f"{prefix}merged_accuracy",
                partial(merged_accuracy_figure, kind=kind, value="accuracy"),
            )
        )
        specs.append(
            FigureSpec(
                f"{prefix}merged_normalized_accuracy",
                partial(merged_accuracy_figure, kind=kind, value="normalized_accuracy"),
            )
        )
        specs.append(
            FigureSpec(
                f"{prefix}best_method_per_task", partial(best_method_per_task_figure, kind=kind)
            )
        )
    specs.append(FigureSpec("moe_accuracy", moe_figure))
    for builder, stem in (
        (difficulty_figure, "difficulty"),
        (forgetting_figure, "forgetting"),
        (interference_figure, "interference"),
        (selection_figure, "selection"),
    ):
        specs += [
            FigureSpec(f"{kind_prefix(kind)}{stem}", partial(builder, kind=kind)) for kind in KINDS
        ]
    return specs
