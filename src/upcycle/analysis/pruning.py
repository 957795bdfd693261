"""Data pruning: drop each task's hardest training examples, ranked by an earlier run.

`data.prune` names an earlier run directory, a difficulty score of its
results/examples.parquet and a fraction. Before fine-tuning, `prune_tasks` removes the
floor(fraction * N) hardest of each task's N training examples. For every score a larger
value is harder: a later learned step, a larger EL2N, more forgetting events, a larger
final loss. A missing value (never learned, never visited) is hardest of all, and ties go
to the lower index first.

The example indices of examples.parquet are positions in the earlier run's training split
after subsampling. That order depends only on the data settings, so the earlier run must
have used the same ones. Indices in the pruned run's own examples.parquet refer to its
pruned training split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from upcycle.config import DataConfig, PruneConfig, RunConfig, load_config
from upcycle.data.tasks import Split, Task
from upcycle.errors import ConfigError
from upcycle.store import RunDir, diff_keys, file_sha256

logger = logging.getLogger(__name__)

EXAMPLES_FILE = "results/examples.parquet"
COMPARED_DATA_KEYS = ("max_train_examples", "subsample_seed")
"""DataConfig keys besides the task sources that decide the training split's order."""
ROUNDING_SLACK = 1e-9
"""Added before flooring fraction * N, so that 0.29 * 100 removes 29 examples, not 28."""


def hardest_indices(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Return the indices of the floor(fraction * N) hardest examples, sorted ascending.

    A larger score is harder and NaN is hardest. Among equal scores the lower index is
    removed first.

    Args:
        scores: one score per example [N].
        fraction: share of examples to remove, in [0, 1).

    Raises:
        ConfigError: for a fraction outside [0, 1) or scores that are not 1-D.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"data.prune.fraction must lie in [0, 1), got {fraction}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ConfigError(f"pruning scores must be a 1-D array, got shape {scores.shape}")
    count = math.floor(fraction * scores.size + ROUNDING_SLACK)
    missing = np.isnan(scores)
    hardness = np.where(missing, 0.0, scores)
    # np.lexsort sorts by the last key first: missing first, then larger scores, then index.
    order = np.lexsort((np.arange(scores.size), -hardness, ~missing))
    return np.sort(order[:count])


def load_earlier_config(run: str | Path) -> RunConfig:
    """Load the config of the run named by data.prune.run.

    Raises:
        ConfigError: if the folder has no config.yaml or it is invalid.
    """
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise ConfigError(
            f"data.prune.run: {run} is not a run directory ({path} not found). Set it to the "
            "folder of an earlier `upcycle run`"
        )
    return load_config(path)


def check_same_data(current: DataConfig, earlier: DataConfig, *, run: str | Path) -> None:
    """Check that the earlier run's training splits have the same examples in the same order.

    Raises:
        ConfigError: listing every data key that differs, or a task the earlier run lacks.
    """
    problems = []
    for key in COMPARED_DATA_KEYS:
        current_value, earlier_value = getattr(current, key), getattr(earlier, key)
        if current_value != earlier_value:
            problems.append(
                f"data.{key} is {current_value!r} in this config but {earlier_value!r} in {run}"
            )
    if earlier.prune is not None and earlier.prune.run is not None and earlier.prune.fraction > 0:
        # Its indices then refer to its own pruned training splits.
        problems.append(
            f"{run} was itself pruned (data.prune.fraction {earlier.prune.fraction} with scores "
            f"from {earlier.prune.run})"
        )
    earlier_sources = {source.name: source for source in earlier.tasks}
    for source in current.tasks:
        previous = earlier_sources.get(source.name)
        if previous is None:
            problems.append(
                f"data.tasks: task {source.name!r} is not one of its tasks "
                f"{sorted(earlier_sources)}"
            )
            continue
        old, new = previous.model_dump(mode="json"), source.model_dump(mode="json")
        for key in diff_keys(old, new):
            problems.append(
                f"data.tasks[{source.name}].{key} is {_dotted(new, key)!r} in this config but "
                f"{_dotted(old, key)!r} in {run}"
            )
    if problems:
        raise ConfigError(
            f"data.prune.run: run {run} used other data settings, so its example indices "
            f"do not match this run's training splits: {'; '.join(problems)}. Prune with "
            "scores from a run with the same data settings"
        )


def _dotted(mapping: Mapping, key: str) -> object:
    value: object = mapping
    for part in key.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def check_same_files(input_files: Sequence[Path], run: str | Path) -> None:
    """Check that every task file read here was read, unchanged, by the earlier run.

    The earlier run's manifest stores the SHA-256 of each local file it read. Runs whose
    manifest lists no files (tasks from the Hugging Face Hub) are not checked.

    Raises:
        ConfigError: naming the first files whose contents the earlier run never read.
    """
    inputs = RunDir(run).read_manifest().get("inputs", {})
    if not inputs or not input_files:
        return
    known = set(inputs.values())
    changed = [str(path) for path in input_files if file_sha256(path) not in known]
    if changed:
        raise ConfigError(
            f"data.prune.run: the task files {changed[:3]} differ from every file run {run} "
            "read, so its example indices may point at other examples. Prune with scores "
            "from a run on the same data files"
        )


def read_scores(run: str | Path, *, seed: int, kind: str, score: str) -> pd.DataFrame:
    """Read one (seed, kind)'s scores from a run's examples.parquet as task, index, score rows.

    Raises:
        ConfigError: for a missing file, a missing score column, or no rows of that
            seed and kind.
    """
    path = Path(run) / EXAMPLES_FILE
    if not path.is_file():
        raise ConfigError(
            f"data.prune.run: {path} not found. Fine-tuning writes it when recorder.enabled "
            f"is true: finish that run with `upcycle finetune {run}`, or prune with a run "
            "fine-tuned with the recorder on"
        )
    frame = pd.read_parquet(path)
    missing = [column for column in ("seed", "kind", "task", "index", score) if column not in frame]
    if missing:
        raise ConfigError(
            f"data.prune.score: {path} has no column {missing[0]!r}; its columns are "
            f"{list(frame.columns)}. Choose another score or fine-tune that run again"
        )
    rows = frame[(frame["seed"] == seed) & (frame["kind"] == kind)]
    if rows.empty:
        available = sorted({(int(s), str(k)) for s, k in zip(frame["seed"], frame["kind"])})
        raise ConfigError(
            f"data.prune: {path} has no rows of seed {seed} and kind {kind!r}; it has "
            f"(seed, kind) {available}. Set data.prune.seed and data.prune.kind to one of them"
        )
    return rows[["task", "index", score]]


def task_scores(rows: pd.DataFrame, *, task: str, size: int, score: str, path: Path) -> np.ndarray:
    """Return task `task`'s scores ordered by example index, checking there is one per example.

    Raises:
        ConfigError: for a task without rows, indices other than 0..size-1, or a score that
            is missing for every example.
    """
    selected = rows[rows["task"] == task].sort_values("index")
    if not np.array_equal(selected["index"].to_numpy(), np.arange(size)):
        raise ConfigError(
            f"data.prune.run: {path} has {len(selected)} {score} scores for task {task!r}, "
            f"but its training split has {size} examples here. Prune with scores from a run "
            "with the same data settings"
        )
    values = selected[score].to_numpy(dtype=np.float64)
    if size and np.isnan(values).all():
        raise ConfigError(
            f"data.prune.score: {score} is missing for every example of task {task!r} in "
            f"{path} (for EL2N: recorder.el2n_step was after the last step). Choose another score"
        )
    return values


def prune_tasks(
    tasks: Mapping[str, Task], data: DataConfig, *, input_files: Sequence[Path] = ()
) -> dict[str, Task]:
    """Return the tasks with the hardest training examples of `data.prune` removed.

    Validation and test splits are kept whole. Returns the tasks unchanged when
    `data.prune` is unset or names no run.

    Args:
        tasks: loaded tasks by name, with the training splits of `data`'s settings.
        data: this run's data settings, including `prune`.
        input_files: local task files read here, checked against the earlier run's
            manifest (see `check_same_files`).

    Raises:
        ConfigError: if the earlier run is missing, used other data settings or files,
            or has no usable scores (see `read_scores`, `task_scores`).
    """
    prune: PruneConfig | None = data.prune
    if prune is None or prune.run is None:
        return dict(tasks)
    earlier = load_earlier_config(prune.run)
    check_same_data(data, earlier.data, run=prune.run)
    check_same_files(input_files, prune.run)
    seed = prune.seed if prune.seed is not None else earlier.seeds[0]
    rows = read_scores(prune.run, seed=seed, kind=prune.kind, score=prune.score)
    path = Path(prune.run) / EXAMPLES_FILE

    pruned = {}
    for name, task in tasks.items():
        train = task.splits["train"]
        scores = task_scores(rows, task=name, size=len(train), score=prune.score, path=path)
        removed = set(hardest_indices(scores, prune.fraction).tolist())
        kept_indices = [i for i in range(len(train)) if i not in removed]
        splits = dict(task.splits)
        splits["train"] = Split(
            texts=[train.texts[i] for i in kept_indices],
            labels=[train.labels[i] for i in kept_indices],
            images=train.images.select(kept_indices) if train.images is not None else None,
        )
        pruned[name] = Task(name=task.name, class_names=list(task.class_names), splits=splits)
        logger.info(
            "task %s: removed %d of %d training examples, the hardest by %s in %s (seed %d, %s)",
            name,
            len(removed),
            len(train),
            prune.score,
            path,
            seed,
            prune.kind,
        )
    return pruned


# Comparing runs


def mean_test_accuracy(run: RunDir) -> pd.DataFrame:
    """Return mean test accuracy (over tasks, then seeds) per kind, method and step.

    Merged rows come from merges.csv and lora_merges.csv, leaving out the zero-shot
    reference rows. The experts' own accuracy is included as method "experts".
    """
    frames = []
    for kind, experts_name, merges_name in (
        ("full", "experts.csv", "merges.csv"),
        ("lora", "lora_experts.csv", "lora_merges.csv"),
    ):
        merges = run.read_result(merges_name)
        if merges is not None and not merges.empty:
            merged = merges[(merges["split"] == "test") & (merges["method"] != "zeroshot")]
            frames.append(merged[["seed", "method", "step", "accuracy"]].assign(kind=kind))
        experts = run.read_result(experts_name)
        if experts is not None and not experts.empty:
            trained = experts[(experts["split"] == "test") & (experts["step"] > 0)]
            frames.append(trained[["seed", "step", "accuracy"]].assign(kind=kind, method="experts"))
    if not frames:
        return pd.DataFrame(columns=["kind", "method", "step", "accuracy"])
    rows = pd.concat(frames, ignore_index=True)
    keys = ["kind", "method", "step"]
    per_seed = rows.groupby([*keys, "seed"], as_index=False, sort=False)["accuracy"].mean()
    return per_seed.groupby(keys, as_index=False, sort=False)["accuracy"].mean()


def compare_runs(run_a: str | Path, run_b: str | Path) -> pd.DataFrame:
    """Compare the mean test accuracy of two runs per kind, method and step.

    Returns:
        DataFrame with columns kind, method, step, accuracy_a, accuracy_b and difference
        (accuracy_b - accuracy_a). A (kind, method, step) that only one run has gets NaN
        for the other run and the difference. Method "experts" is the experts' own mean.
    """
    a = mean_test_accuracy(RunDir(run_a)).rename(columns={"accuracy": "accuracy_a"})
    b = mean_test_accuracy(RunDir(run_b)).rename(columns={"accuracy": "accuracy_b"})
    table = a.merge(b, on=["kind", "method", "step"], how="outer")
    table["difference"] = table["accuracy_b"] - table["accuracy_a"]
    return table.sort_values(["kind", "method", "step"], kind="stable").reset_index(drop=True)


def pruning_summary(comparison: pd.DataFrame) -> list[str]:
    """Return summary.md lines for pruning_comparison.csv: one table per kind."""
    lines = []
    for kind, rows in comparison.groupby("kind", sort=False):
        methods = list(dict.fromkeys(rows["method"]))
        header = ["step", *methods]
        lines += [
            f"## Pruned run against the full data ({kind}): mean test accuracy (%)",
            "",
            (
                "Each cell is this pruned run's accuracy, then the change from the run its "
                "scores came from, in points. Experts is the experts' own accuracy."
            ),
            "",
            "| " + " | ".join(header) + " |",
            "|" + "---|" * len(header),
        ]
        for step in sorted(rows["step"].unique()):
            cells = [str(step)]
            for method in methods:
                match = rows[(rows["method"] == method) & (rows["step"] == step)]
                if match.empty or pd.isna(match["accuracy_b"].iloc[0]):
                    cells.append("–")
                    continue
                accuracy, difference = match["accuracy_b"].iloc[0], match["difference"].iloc[0]
                change = "" if pd.isna(difference) else f" ({100 * difference:+.1f})"
                cells.append(f"{100 * accuracy:.1f}{change}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines
