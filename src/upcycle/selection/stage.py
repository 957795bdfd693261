"""The select stage: compare ways of choosing each expert's checkpoint step before merging.

For every kind (full, lora), seed and merging method, each strategy picks one checkpoint
step per task. The methods are those of `merging.methods` and, for LoRA experts, the PEFT
merges of `merging.lora_methods` too. The experts at those steps are merged as the merge
stage merges them, with the scaling coefficient chosen on validation from
`merging.coefficients`, and results/selection.csv gets one row per strategy:

- ``final``: the checkpoint each expert's training delivered, the one `checkpoint_for`
  gives at `training.steps`: its last checkpoint, or for an expert stopped by
  `training.stopping`, the checkpoint its rule chose.
- ``best-individual``: each expert's checkpoint with the best validation accuracy, the
  earliest among equal ones.
- ``rule:<name>``: the step each rule of `selection.rules` chooses on the expert's
  trajectory (see `upcycle.selection.trajectory`).
- ``best-common``: the one step shared by all tasks whose merge has the best mean
  validation accuracy.
- ``merge-aware``: coordinate ascent over the tasks' steps from the best common step,
  maximizing the merge's mean validation accuracy (`upcycle.selection.search`). It runs
  only for `selection.merge_aware_methods`, because each assignment it scores costs a merge
  and a pass over every validation split. Under `selection.merge_aware_coefficient:
  best-common` an assignment is scored with the one coefficient chosen for the best common
  step. Under `grid` it is scored with every coefficient, which costs len(coefficients)
  times more. When no step is shared by all tasks, best-common is skipped and the search
  starts from the final checkpoints.

`compute_fraction` is the fine-tuning a choice needs: steps summed over tasks, divided by
tasks × `training.steps`. A rule needs the step at which it stopped, or the trajectory's
last step when it never stops. `final` needs each expert's last trained step. The other
strategies count their chosen step, as if each expert had been stopped there, although
finding that step took the whole trajectory.

`merges_evaluated` counts the distinct (assignment, coefficient) merges whose validation
accuracy the choice read: 0 for strategies that choose without merging. The merges of
common steps come from the merge stage's tables when they exist, so they count without
being run again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import yaml

from upcycle.errors import CheckpointError, ConfigError
from upcycle.io import atomic_write_csv
from upcycle.selection.rules import (
    STOPPING_RULES,
    Evaluation,
    StoppingRule,
    TrajectoryError,
    apply_rule,
    make_rule,
)
from upcycle.selection.search import best_common_step, coordinate_ascent
from upcycle.selection.trajectory import (
    EXPERT_RESULTS,
    checkpoint_for,
    difficulty_rows,
    load_trajectories,
    starts_at_zero_shot,
)
from upcycle.store import RunDir
from upcycle.summary import seeds_sentence

logger = logging.getLogger(__name__)

KINDS = ("full", "lora")
KIND_TITLES = {"full": "Full fine-tuning", "lora": "LoRA"}
MERGE_RESULTS = {
    "full": ("merges.csv", "merge_grid.csv"),
    "lora": ("lora_merges.csv", "lora_merge_grid.csv"),
}
SELECTION_FILE = "selection.csv"
SELECTION_COLUMNS = [
    "seed",
    "kind",
    "method",
    "strategy",
    "steps",
    "compute_fraction",
    "validation_accuracy",
    "test_accuracy",
    "merges_evaluated",
]
SELECTED_STEPS_FILE = "selected_steps.csv"
SELECTED_STEPS_COLUMNS = [
    "seed",
    "kind",
    "rule",
    "params",
    "task",
    "chosen_step",
    "stopped_step",
    "compute_fraction",
]
COMPARISON_KEY = "select/comparison"
RULE_PREFIX = "rule:"

Steps = dict[str, int]


# Command line


def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --rule and --param to the `upcycle select` parser."""
    parser.add_argument(
        "--rule",
        metavar="NAME",
        help="apply one stopping rule and write results/selected_steps.csv instead of the "
        f"full comparison; rules: {', '.join(STOPPING_RULES)}",
    )
    parser.add_argument(
        "--param",
        dest="params",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a parameter of --rule, e.g. --param patience=2 (repeatable)",
    )


def options_from_arguments(args: argparse.Namespace) -> dict:
    """Return the keyword arguments of `run_selection_stage` from parsed arguments.

    Raises:
        ConfigError: For --param without --rule, a parameter that is not KEY=VALUE with a
            numeric value, or a rule that `make_rule` rejects.
    """
    params: dict[str, float | int] = {}
    for item in args.params:
        key, separator, text = item.partition("=")
        value = yaml.safe_load(text) if separator else None
        if not key.strip() or isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(
                f"--param {item!r} is invalid: give KEY=VALUE with a number, e.g. "
                "--param threshold=0.1"
            )
        params[key.strip()] = value
    if args.rule is None:
        if params:
            raise ConfigError("--param needs --rule NAME, the stopping rule it configures")
        return {}
    make_rule(args.rule, **params)
    return {"rule": args.rule, "params": params}


# Stage


def run_selection_stage(
    ws, *, rule: str | None = None, params: Mapping[str, float | int] | None = None
) -> None:
    """Compare the selection strategies of a run, or apply one stopping rule.

    Without `rule`, writes results/selection.csv (see the module docstring), resuming the
    (kind, seed, method) units already done with the same settings, and marks the
    comparison complete in the manifest. With `rule`, writes the rule's chosen steps to
    results/selected_steps.csv, replacing earlier rows of the same rule and parameters, and
    logs the merged accuracy of those steps for each merging method.

    Raises:
        CheckpointError: If the run has no expert accuracy table yet.
        ConfigError: If `rule` or `params` are invalid.
        TrajectoryError: If `rule` needs a statistic that the run did not record.
    """
    kinds = [kind for kind in KINDS if ws.run.read_result(EXPERT_RESULTS[kind]) is not None]
    if not kinds:
        raise CheckpointError(
            f"run {ws.run.root} has no results/experts.csv or results/lora_experts.csv; "
            "run `upcycle finetune RUN` first"
        )
    if rule is not None:
        select_with_rule(ws, kinds, make_rule(rule, **(params or {})))
        return
    settings = selection_settings(ws.config)
    entry = ws.run.read_manifest()["completed"].get(COMPARISON_KEY)
    units = [
        method_unit(kind, seed, method)
        for kind in kinds
        for seed in ws.config.seeds
        for method in comparison_methods(ws, kind)
    ]
    if (
        entry is not None
        and entry.get("settings") == settings
        and ws.run.is_complete(COMPARISON_KEY)
        and all(ws.run.is_complete(unit) for unit in units)
    ):
        logger.info("selection comparison already complete, skipped")
        return
    frames = []
    for kind in kinds:
        for seed in ws.config.seeds:
            frames += compare_strategies(ws, kind, seed, settings)
    table = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=SELECTION_COLUMNS)
    )
    path = ws.run.write_result(SELECTION_FILE, table[SELECTION_COLUMNS])
    ws.run.mark_complete(COMPARISON_KEY, {"settings": settings}, files=[path])


def selection_settings(config) -> str:
    """Hash the settings that change results/selection.csv, to tell stale units apart."""
    payload = {
        "selection": config.selection.model_dump(mode="json"),
        "merging": config.merging.model_dump(mode="json"),
        "steps": config.training.steps,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def comparison_methods(ws, kind: str) -> list[str]:
    """Return the merging methods compared for `kind`, with PEFT's LoRA merges last."""
    methods = list(ws.config.merging.methods)
    if kind == "lora":
        methods += list(ws.config.merging.lora_methods)
    return methods


def method_unit(kind: str, seed: int, method: str) -> str:
    """Return the manifest key of one method's selection rows."""
    return f"select/{kind}/seed{seed}/{method}"


def compare_strategies(ws, kind: str, seed: int, settings: str) -> list[pd.DataFrame]:
    """Write and return the selection rows of every method for one kind and seed."""
    trajectories = expert_trajectories(ws, kind, seed)
    if trajectories is None:
        return []
    choices = base_choices(ws, kind, seed, trajectories)
    evaluator = None
    frames = []
    for method in comparison_methods(ws, kind):
        unit = method_unit(kind, seed, method)
        path = ws.run.root / "selection" / kind / f"seed{seed}" / f"{method}.csv"
        entry = ws.run.read_manifest()["completed"].get(unit)
        if entry is not None and entry.get("settings") == settings and ws.run.is_complete(unit):
            frames.append(pd.read_csv(path))
            continue
        if evaluator is None:
            evaluator = MergeEvaluator(ws, kind, seed)
        rows = method_rows(ws, evaluator, method, choices, trajectories)
        frame = pd.DataFrame(rows, columns=SELECTION_COLUMNS).assign(seed=seed, kind=kind)
        atomic_write_csv(path, frame)
        ws.run.mark_complete(unit, {"settings": settings}, files=[path])
        frames.append(frame)
    return frames


def expert_trajectories(ws, kind: str, seed: int) -> dict[str, list[Evaluation]] | None:
    """Return each task's trajectory for one kind and seed, or None (logged) if one is empty."""
    by_expert = load_trajectories(ws.run, kind)
    trajectories = {task: by_expert.get((seed, task), []) for task in ws.task_names}
    missing = [task for task, evaluations in trajectories.items() if not evaluations]
    if missing:
        logger.warning(
            "selection skipped for %s seed %d: %s has no checkpoint accuracy for %s; run "
            "fine-tuning for those experts first",
            kind,
            seed,
            EXPERT_RESULTS[kind],
            ", ".join(missing),
        )
        return None
    return trajectories


@dataclass
class Choice:
    """One strategy's checkpoint step per task.

    Attributes:
        strategy: Name in results/selection.csv.
        steps: Chosen checkpoint step per task.
        compute_steps: Fine-tuning steps the choice needs per task.
        merges_evaluated: Distinct (assignment, coefficient) merges read to choose.
    """

    strategy: str
    steps: Steps
    compute_steps: Steps
    merges_evaluated: int = 0


def base_choices(ws, kind: str, seed: int, trajectories: Mapping[str, list[Evaluation]]):
    """Return the choices that do not depend on the merging method: final, best, rules."""
    tasks = ws.task_names
    last_steps = {task: trajectories[task][-1].step for task in tasks}
    final = {task: checkpoint_for(ws, kind, task, seed, ws.config.training.steps) for task in tasks}
    best = {task: best_individual_step(trajectories[task]) for task in tasks}
    choices = [Choice("final", final, last_steps), Choice("best-individual", best, best)]
    for name, params in ws.config.selection.rules.items():
        rule = make_rule(name, **params)
        choice = rule_choice(ws.run, kind, seed, rule, tasks)
        if choice is not None:
            choices.append(choice)
    return choices


def best_individual_step(trajectory: Sequence[Evaluation]) -> int:
    """Return the step with the best validation accuracy, the earliest among equal ones."""
    best = max(trajectory, key=lambda evaluation: evaluation.validation_accuracy)
    return best.step


def rule_choice(run: RunDir, kind: str, seed: int, rule: StoppingRule, tasks: Sequence[str]):
    """Apply `rule` to every task's trajectory, or return None (logged) when it cannot run."""
    strategy = f"{RULE_PREFIX}{rule.name}"
    statistic = rule.required_statistic
    if statistic is not None and difficulty_rows(run, kind) is None:
        logger.info(
            "%s skipped for %s seed %d: it reads %s from results/difficulty.csv, which has no "
            "%s rows (the recorder was off, or the experts were imported)",
            strategy,
            kind,
            seed,
            statistic,
            kind,
        )
        return None
    trajectories = load_trajectories(run, kind, zero_shot_start=starts_at_zero_shot(rule))
    steps, compute_steps = {}, {}
    for task in tasks:
        trajectory = trajectories[(seed, task)]
        try:
            result = apply_rule(rule, trajectory)
        except TrajectoryError as error:
            logger.info("%s skipped for %s seed %d: %s", strategy, kind, seed, error)
            return None
        steps[task] = result.chosen_step
        compute_steps[task] = stopping_step(result, trajectory)
    return Choice(strategy, steps, compute_steps)


def stopping_step(result, trajectory: Sequence[Evaluation]) -> int:
    """Return the step where a rule stopped, or the trajectory's last step if it never did."""
    return result.stopped_step if result.stopped_step is not None else trajectory[-1].step


def method_rows(ws, evaluator, method: str, choices: list[Choice], trajectories) -> list[dict]:
    """Merge each strategy's choice with `method` and return one selection row per strategy."""
    choices = list(choices)
    available = {task: [e.step for e in trajectories[task] if e.step > 0] for task in ws.task_names}
    common, common_seen = None, set()
    try:
        common_result = best_common_step(
            lambda steps: evaluator.best_validation(method, steps, seen=common_seen)[1], available
        )
        common_steps = {task: common_result.step for task in ws.task_names}
        common = Choice("best-common", common_steps, common_steps, len(common_seen))
        choices.append(common)
    except CheckpointError as error:
        logger.info("best-common skipped for %s: %s", method, error)
    selection = ws.config.selection
    if selection.merge_aware and method in selection.merge_aware_methods:
        start = common or choices[0]
        choices.append(merge_aware_choice(ws, evaluator, method, available, start, common_seen))
    total = len(ws.task_names) * ws.config.training.steps
    rows = []
    for choice in choices:
        merged = evaluator.merged(method, choice.steps)
        rows.append(
            {
                "method": method,
                "strategy": choice.strategy,
                "steps": json.dumps(choice.steps),
                "compute_fraction": sum(choice.compute_steps.values()) / total,
                "validation_accuracy": merged.validation_accuracy,
                "test_accuracy": merged.test_accuracy,
                "merges_evaluated": choice.merges_evaluated,
            }
        )
        logger.info(
            "%s seed %d %s %s: steps %s, compute %.1f%%, merged validation %.4f, test %.4f",
            evaluator.kind,
            evaluator.seed,
            method,
            choice.strategy,
            choice.steps,
            100 * rows[-1]["compute_fraction"],
            merged.validation_accuracy,
            merged.test_accuracy,
        )
    return rows


def merge_aware_choice(
    ws, evaluator, method: str, available: Mapping[str, list[int]], start: Choice, seen: set
) -> Choice:
    """Search the steps whose merge scores best on validation, from `start`'s steps.

    `seen` contains the merges read to find `start`, and they count in `merges_evaluated`.
    """
    seen = set(seen)
    selection = ws.config.selection
    if selection.merge_aware_coefficient == "grid":

        def score(steps: Mapping[str, int]) -> float:
            return evaluator.best_validation(method, steps, seen=seen)[1]

    else:
        coefficient = evaluator.merged(method, start.steps).coefficient

        def score(steps: Mapping[str, int]) -> float:
            return evaluator.validation(method, steps, coefficient, seen=seen)

    result = coordinate_ascent(
        score, available, start=start.steps, max_rounds=selection.merge_aware_max_rounds
    )
    logger.info(
        "merge-aware %s: %d rounds, %d assignments scored, %d merges read in all",
        method,
        result.rounds,
        result.evaluations,
        len(seen),
    )
    return Choice("merge-aware", result.best_steps, result.best_steps, len(seen))


# Merging


@dataclass(frozen=True)
class MergedAccuracy:
    """A merge with its coefficient chosen on validation. Accuracies are means over tasks."""

    coefficient: float
    validation_accuracy: float
    test_accuracy: float


class MergeEvaluator:
    """Merges one kind and seed's experts at any assignment of steps, with caches.

    Results of the merge stage seed the caches: the merge of common step s is the merge of
    the steps `checkpoint_for` gives at s, with the coefficient and accuracies of
    merges.csv and every coefficient's validation accuracy of merge_grid.csv. Loaded
    experts are kept in a least-recently-used cache with room for one checkpoint per task
    plus every checkpoint of one task, which covers one coordinate of the search.

    Attributes:
        merges_run: Merges this evaluator ran, each with one pass over the validation splits.
    """

    def __init__(self, ws, kind: str, seed: int) -> None:
        self.ws = ws
        self.kind = kind
        self.seed = seed
        self.tasks = list(ws.task_names)
        self.merges_run = 0
        self.max_experts = len(self.tasks) + len(ws.config.training.resolved_checkpoint_steps())
        self._experts: OrderedDict[tuple[str, int], object] = OrderedDict()
        self._merged: dict[tuple[str, tuple[int, ...]], MergedAccuracy] = {}
        self._validation: dict[tuple[str, tuple[int, ...], float], float] = {}
        self._base_model = None
        self._read_merge_tables()

    def key(self, steps: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(int(steps[task]) for task in self.tasks)

    def grid(self, method: str) -> list[float]:
        from upcycle.merging.lora import PEFT_LORA_METHODS
        from upcycle.merging.methods import MERGE_METHODS

        if method in PEFT_LORA_METHODS or MERGE_METHODS[method].uses_coefficient:
            return list(self.ws.config.merging.coefficients)
        return [1.0]

    def validation(
        self, method: str, steps: Mapping[str, int], coefficient: float, *, seen: set
    ) -> float:
        """Return the mean validation accuracy of one merge, merging only on a cache miss."""
        key = (method, self.key(steps), float(coefficient))
        seen.add(key[1:])
        if key not in self._validation:
            self._merge(method, steps, [coefficient])
        return self._validation[key]

    def best_validation(
        self, method: str, steps: Mapping[str, int], *, seen: set
    ) -> tuple[float, float]:
        """Return the grid's best (coefficient, mean validation accuracy), the first of equals."""
        scores = [(c, self.validation(method, steps, c, seen=seen)) for c in self.grid(method)]
        return max(scores, key=lambda item: item[1])

    def merged(self, method: str, steps: Mapping[str, int]) -> MergedAccuracy:
        """Return the merge at `steps`, its coefficient chosen on validation, with test accuracy."""
        key = (method, self.key(steps))
        if key not in self._merged:
            cached = all((method, key[1], c) in self._validation for c in self.grid(method))
            if cached:
                coefficient, _ = self.best_validation(method, steps, seen=set())
                self._merge(method, steps, [coefficient], test=True)
            else:
                self._merge(method, steps, self.grid(method), test=True)
        return self._merged[key]

    def _merge(
        self,
        method: str,
        steps: Mapping[str, int],
        coefficients: list[float],
        *,
        test: bool = False,
    ) -> None:
        from upcycle.merging.lora import PEFT_LORA_METHODS
        from upcycle.merging.sweep import (
            evaluate_vector,
            heads_for,
            lora_adapter_info,
            merge_and_choose,
            merge_and_choose_peft,
        )

        experts = [self._expert(task, steps[task]) for task in self.tasks]
        heads = heads_for(self.ws, experts)
        if method in PEFT_LORA_METHODS:
            if self._base_model is None:
                self._base_model = self.ws.fresh_encoder().eval()
            outcome = merge_and_choose_peft(
                self.ws,
                experts,
                heads,
                method,
                seed=self.seed,
                base_model=self._base_model,
                info=lora_adapter_info(experts),
                coefficients=coefficients,
            )
        else:
            outcome = merge_and_choose(
                self.ws, experts, heads, method, seed=self.seed, coefficients=coefficients
            )
        self.merges_run += len(outcome.grid)
        key = self.key(steps)
        for coefficient, score in outcome.grid:
            self._validation[(method, key, float(coefficient))] = score
        if test:
            results = evaluate_vector(self.ws, outcome.task_vector, heads, "test", self.tasks)
            self._merged[(method, key)] = MergedAccuracy(
                coefficient=float(outcome.coefficient),
                validation_accuracy=_mean_accuracy(outcome.validation.values()),
                test_accuracy=_mean_accuracy(results.values()),
            )

    def _expert(self, task: str, step: int):
        from upcycle.merging.sweep import load_expert

        key = (task, step)
        if key in self._experts:
            self._experts.move_to_end(key)
            return self._experts[key]
        expert = load_expert(self.ws, self.kind, task, self.seed, step)
        self._experts[key] = expert
        while len(self._experts) > self.max_experts:
            self._experts.popitem(last=False)
        return expert

    def _read_merge_tables(self) -> None:
        merges_name, grid_name = MERGE_RESULTS[self.kind]
        merges = self.ws.run.read_result(merges_name)
        if merges is None or merges.empty:
            return
        methods = comparison_methods(self.ws, self.kind)
        merges = merges[(merges["seed"] == self.seed) & merges["method"].isin(methods)]
        keys = {}
        for (method, step), rows in merges.groupby(["method", "step"]):
            by_split = {split: rows[rows["split"] == split] for split in ("validation", "test")}
            if any(set(part["task"]) != set(self.tasks) for part in by_split.values()):
                continue
            steps = {
                task: checkpoint_for(self.ws, self.kind, task, self.seed, int(step))
                for task in self.tasks
            }
            keys[int(step)] = self.key(steps)
            self._merged[(method, keys[int(step)])] = MergedAccuracy(
                coefficient=float(rows["coefficient"].iloc[0]),
                validation_accuracy=float(by_split["validation"]["accuracy"].mean()),
                test_accuracy=float(by_split["test"]["accuracy"].mean()),
            )
        grid = self.ws.run.read_result(grid_name)
        if grid is None or grid.empty:
            return
        grid = grid[(grid["seed"] == self.seed) & grid["method"].isin(methods)]
        for row in grid.itertuples(index=False):
            if int(row.step) in keys:
                key = (row.method, keys[int(row.step)], float(row.coefficient))
                self._validation[key] = float(row.validation_accuracy)


def _mean_accuracy(correct: object) -> float:
    return float(np.mean([mask.mean() for mask in correct]))


# One rule


def select_with_rule(ws, kinds: Sequence[str], rule: StoppingRule) -> None:
    """Write the steps `rule` chooses to results/selected_steps.csv and log their merges."""
    params = json.dumps(rule.params, sort_keys=True)
    budget = ws.config.training.steps
    rows = []
    for kind in kinds:
        trajectories = load_trajectories(ws.run, kind, zero_shot_start=starts_at_zero_shot(rule))
        for seed in ws.config.seeds:
            chosen = {}
            for task in ws.task_names:
                trajectory = trajectories.get((seed, task))
                if not trajectory:
                    raise CheckpointError(
                        f"{EXPERT_RESULTS[kind]} of run {ws.run.root} has no checkpoint accuracy "
                        f"for {kind} expert {task} seed {seed}; run fine-tuning for it first"
                    )
                result = apply_rule(rule, trajectory)
                chosen[task] = result.chosen_step
                rows.append(
                    {
                        "seed": seed,
                        "kind": kind,
                        "rule": rule.name,
                        "params": params,
                        "task": task,
                        "chosen_step": result.chosen_step,
                        "stopped_step": result.stopped_step,
                        "compute_fraction": stopping_step(result, trajectory) / budget,
                    }
                )
            log_rule_merges(ws, kind, seed, rule, chosen)
    new = pd.DataFrame(rows, columns=SELECTED_STEPS_COLUMNS).astype({"stopped_step": "Int64"})
    old = ws.run.read_result(SELECTED_STEPS_FILE)
    if old is not None and not old.empty:
        same = (old["rule"] == rule.name) & (old["params"] == params)
        new = pd.concat([old[~same].astype({"stopped_step": "Int64"}), new], ignore_index=True)
    path = ws.run.write_result(SELECTED_STEPS_FILE, new[SELECTED_STEPS_COLUMNS])
    logger.info("%r: chosen steps written to %s", rule, path)


def log_rule_merges(ws, kind: str, seed: int, rule: StoppingRule, steps: Steps) -> None:
    """Log the chosen steps and the merge of those checkpoints with every merging method."""
    logger.info("%r on %s seed %d: chosen steps %s", rule, kind, seed, steps)
    evaluator = MergeEvaluator(ws, kind, seed)
    for method in comparison_methods(ws, kind):
        merged = evaluator.merged(method, steps)
        logger.info(
            "%r on %s seed %d, %s merge (coefficient %g): validation accuracy %.4f, test "
            "accuracy %.4f",
            rule,
            kind,
            seed,
            method,
            merged.coefficient,
            merged.validation_accuracy,
            merged.test_accuracy,
        )


# summary.md


def summary_section(run: RunDir) -> list[str]:
    """Return the markdown lines of the selection comparison for summary.md, or none."""
    table = run.read_result(SELECTION_FILE)
    if table is None or table.empty:
        return []
    lines = []
    for kind in KINDS:
        rows = table[table["kind"] == kind]
        if rows.empty:
            continue
        methods = list(dict.fromkeys(rows["method"]))
        strategies = list(dict.fromkeys(rows["strategy"]))
        means = rows.groupby(["strategy", "method"])[
            ["test_accuracy", "compute_fraction", "merges_evaluated"]
        ].mean()
        seeds = sorted(int(seed) for seed in rows["seed"].unique())
        lines += [
            f"## {KIND_TITLES[kind]}: checkpoint selection, merged test accuracy (%)",
            "",
            (
                "Each strategy picks one checkpoint step per task, and the experts at those "
                "steps are merged with each method, its scaling coefficient chosen on "
                "validation. A cell is the mean test accuracy over tasks, then in brackets the "
                "fine-tuning the choice needs as a percentage of every expert's full budget, "
                "and for searches the merges evaluated on validation. "
                + seeds_sentence(seeds, spread=False)
            ),
            "",
            "| strategy | " + " | ".join(methods) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for strategy in strategies:
            cells = [strategy]
            for method in methods:
                if (strategy, method) not in means.index:
                    cells.append("–")
                    continue
                mean = means.loc[(strategy, method)]
                cell = f"{100 * mean['test_accuracy']:.1f} ({100 * mean['compute_fraction']:.0f}%"
                if mean["merges_evaluated"] > 0:
                    cell += f", {mean['merges_evaluated']:g} merges"
                cells.append(cell + ")")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines
