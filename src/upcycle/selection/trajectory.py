"""Expert trajectories for stopping rules, and the checkpoint each expert gives at a step.

A trajectory is one expert's evaluations in step order, as `Evaluation`s: the validation
accuracy of each checkpoint (results/experts.csv or lora_experts.csv) joined on
(seed, kind, task, step) with the recorder statistics of that step (learned_fraction and
grad_concentration_top5 of results/difficulty.csv). The same trajectory is built during
fine-tuning from the rows the training loop has written so far, so a rule stops a run at
the step where it would stop offline over that run's saved trajectory.

Step 0, the zero-shot base model, starts the trajectory only for the rules in
`ZERO_SHOT_START_RULES` and only when the run has zero-shot rows (label-embedding heads).
The plateau rule measures the gain since the first evaluation, and the gain since the
base model is the one that matters. It never stops at its first evaluation, so step 0
never becomes a chosen step. The other rules start at the first checkpoint. For patience,
step 0 could otherwise be chosen when fine-tuning never beats zero-shot, and step 0 has no
checkpoint to merge. The recorder has no statistics at step 0 either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import pandas as pd

from upcycle.errors import CheckpointError
from upcycle.selection.rules import Evaluation, RuleResult, StoppingRule, apply_rule, make_rule
from upcycle.store import RunDir

logger = logging.getLogger(__name__)

EXPERT_RESULTS = {"full": "experts.csv", "lora": "lora_experts.csv"}
"""Result file of each kind's expert accuracies."""

ZERO_SHOT_START_RULES = frozenset({"plateau"})
"""Rules whose trajectory starts with the zero-shot evaluation at step 0."""

STATISTICS = ("learned_fraction", "grad_concentration_top5")


def starts_at_zero_shot(rule: StoppingRule) -> bool:
    """Return whether `rule` reads the zero-shot evaluation at step 0 first."""
    return rule.name in ZERO_SHOT_START_RULES


def build_trajectory(
    accuracy: pd.DataFrame,
    difficulty: pd.DataFrame | None = None,
    *,
    zero_shot_accuracy: float | None = None,
) -> list[Evaluation]:
    """Build one expert's trajectory from its accuracy and difficulty rows.

    Args:
        accuracy: Rows of one expert with columns step, split and accuracy. Validation rows
            at steps > 0 become evaluations, and other rows are ignored.
        difficulty: Rows of the same expert with columns step and the `STATISTICS`, or
            None. A step without a row, or a NaN value, leaves that statistic None.
        zero_shot_accuracy: Validation accuracy of the base model, evaluated first at step
            0 when given.

    Raises:
        TrajectoryError: If an accuracy or statistic is not finite or out of range.
    """
    validation = accuracy[(accuracy["split"] == "validation") & (accuracy["step"] > 0)]
    validation = validation.sort_values("step", kind="stable").drop_duplicates("step", keep="last")
    statistics: dict[int, dict[str, float | None]] = {}
    if difficulty is not None:
        for row in difficulty.to_dict("records"):
            statistics[int(row["step"])] = {
                name: _finite_or_none(row.get(name)) for name in STATISTICS
            }
    evaluations = []
    if zero_shot_accuracy is not None:
        evaluations.append(Evaluation(step=0, validation_accuracy=zero_shot_accuracy))
    for step, value in zip(validation["step"], validation["accuracy"], strict=True):
        evaluations.append(
            Evaluation(
                step=int(step),
                validation_accuracy=float(value),
                **statistics.get(int(step), {}),
            )
        )
    return evaluations


def _finite_or_none(value: object) -> float | None:
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def difficulty_rows(run: RunDir, kind: str) -> pd.DataFrame | None:
    """Return the rows of results/difficulty.csv for `kind`, or None when it has none."""
    difficulty = run.read_result("difficulty.csv")
    if difficulty is None or difficulty.empty:
        return None
    rows = difficulty[difficulty["kind"] == kind]
    return None if rows.empty else rows


def load_trajectories(
    run: RunDir, kind: str, *, zero_shot_start: bool = False
) -> dict[tuple[int, str], list[Evaluation]]:
    """Build the trajectory of every expert of `kind` from the run's result files.

    Args:
        run: The run directory.
        kind: "full" or "lora".
        zero_shot_start: Start each trajectory with its step-0 validation row, if any.

    Returns:
        Trajectories by (seed, task), in the order of the experts table. Empty when the
        run has no experts table for `kind`.
    """
    experts = run.read_result(EXPERT_RESULTS[kind])
    if experts is None or experts.empty:
        return {}
    difficulty = difficulty_rows(run, kind)
    trajectories = {}
    for (seed, task), rows in experts.groupby(["seed", "task"], sort=False):
        zero_shot = None
        if zero_shot_start:
            base = rows[(rows["step"] == 0) & (rows["split"] == "validation")]
            zero_shot = float(base["accuracy"].iloc[0]) if not base.empty else None
        statistics = None
        if difficulty is not None:
            statistics = difficulty[(difficulty["seed"] == seed) & (difficulty["task"] == task)]
        trajectories[(int(seed), str(task))] = build_trajectory(
            rows, statistics, zero_shot_accuracy=zero_shot
        )
    return trajectories


def zero_shot_evaluation(run: RunDir, task: str) -> Evaluation | None:
    """Return the step-0 evaluation of `task` from RUN/zeroshot.csv, or None without it."""
    path = run.root / "zeroshot.csv"
    if not path.is_file():
        return None
    rows = pd.read_csv(path)
    rows = rows[(rows["task"] == task) & (rows["split"] == "validation")]
    if rows.empty:
        return None
    return Evaluation(step=0, validation_accuracy=float(rows["accuracy"].iloc[0]))


class OnlineStopping:
    """The stopping rule of `training.stopping`, run on one expert inside the training loop.

    `check` rebuilds the trajectory from every row the loop has written and replays the
    rule over it, so a fine-tune that resumes from a checkpoint reaches the same decision
    as one that ran without a break.

    Args:
        rule: The stopping rule.
        zero_shot: The step-0 evaluation that starts the trajectory, or None.
    """

    def __init__(self, rule: StoppingRule, *, zero_shot: Evaluation | None = None) -> None:
        self.rule = rule
        self.zero_shot = zero_shot

    @classmethod
    def from_config(cls, ws, task: str) -> OnlineStopping | None:
        """Build the configured rule for `task`, or return None when stopping is off.

        The zero-shot start comes from RUN/zeroshot.csv, which the fine-tuning stage writes
        before the first expert, so a fine-tune run without that stage starts at its first
        checkpoint.
        """
        stopping = ws.config.training.stopping
        if stopping.rule is None:
            return None
        rule = make_rule(stopping.rule, **stopping.params)
        zero_shot = zero_shot_evaluation(ws.run, task) if starts_at_zero_shot(rule) else None
        return cls(rule, zero_shot=zero_shot)

    def check(
        self, accuracy_rows: Sequence[Mapping], difficulty_rows: Sequence[Mapping]
    ) -> RuleResult:
        """Replay the rule over the rows so far. `stopped_step` is set once it stops.

        Raises:
            TrajectoryError: If the rule needs a statistic that a row lacks.
        """
        accuracy = pd.DataFrame(list(accuracy_rows), columns=["step", "split", "accuracy"])
        difficulty = pd.DataFrame(list(difficulty_rows), columns=["step", *STATISTICS])
        zero_shot = self.zero_shot.validation_accuracy if self.zero_shot is not None else None
        trajectory = build_trajectory(accuracy, difficulty, zero_shot_accuracy=zero_shot)
        return apply_rule(self.rule, trajectory)


def saved_steps(run: RunDir, kind: str, task: str, seed: int) -> list[int]:
    """Return the steps of the checkpoint files an expert has on disk, in increasing order."""
    folder = run.expert_dir(kind, task, seed)
    steps = []
    for path in folder.glob("step*.safetensors"):
        suffix = path.stem.removeprefix("step")
        if suffix.isdigit():
            steps.append(int(suffix))
    return sorted(steps)


def expert_record(run: RunDir, kind: str, task: str, seed: int) -> dict | None:
    """Return the manifest entry of a finished expert, or None while it is unfinished."""
    from upcycle.training.finetune import expert_key

    return run.read_manifest()["completed"].get(expert_key(kind, task, seed))


def checkpoint_for(ws, kind: str, task: str, seed: int, step: int) -> int:
    """Return the step of the checkpoint that represents an expert at `step`.

    Experts stopped by `training.stopping`, and imported experts with their own steps,
    lack some of the run's checkpoint steps. For such a step:

    - an expert stopped online gives its chosen step at every step after its stop, which is
      the expert its stopping rule delivers (the best checkpoint for patience, the stopping
      step for the other rules);
    - any other finished expert gives its latest checkpoint before `step`, or its first
      checkpoint when `step` precedes them all.

    An unfinished expert, or one that has the file, gives `step` itself, so loading a
    checkpoint that fine-tuning has not written yet still fails with its path.

    Raises:
        CheckpointError: If a finished expert has no checkpoint file at all.
    """
    if ws.run.checkpoint_path(kind, task, seed, step).is_file():
        return step
    record = expert_record(ws.run, kind, task, seed)
    if record is None:
        return step
    stopped_step = record.get("stopped_step")
    if stopped_step is not None and step > stopped_step and record.get("chosen_step") is not None:
        chosen = int(record["chosen_step"])
        logger.debug(
            "%s %s seed %d stopped at step %d: step %d uses step %d",
            kind,
            task,
            seed,
            stopped_step,
            step,
            chosen,
        )
        return chosen
    steps = saved_steps(ws.run, kind, task, seed)
    if not steps:
        raise CheckpointError(
            f"expert {kind}/{task}/seed{seed} is marked finished but "
            f"{ws.run.expert_dir(kind, task, seed)} has no step<N>.safetensors file; run "
            "fine-tuning again for it"
        )
    earlier = [saved for saved in steps if saved <= step]
    nearest = earlier[-1] if earlier else steps[0]
    logger.debug("%s %s seed %d has no step %d: using step %d", kind, task, seed, step, nearest)
    return nearest


def checkpoint_accuracy(run: RunDir, kind: str, seed: int, steps: Mapping[str, int]) -> pd.Series:
    """Return the accuracy of each task's checkpoint at `steps[task]`, by (task, split).

    Reads each expert's accuracy.csv, which the training loop and the evaluate stage write.

    Raises:
        CheckpointError: If an expert has no accuracy row at its step.
    """
    rows = []
    for task, step in steps.items():
        path = run.expert_dir(kind, task, seed) / "accuracy.csv"
        frame = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=["step"])
        selected = frame[frame["step"] == step]
        if selected.empty:
            raise CheckpointError(
                f"{path} has no accuracy at step {step}; run `upcycle evaluate RUN` to "
                "recompute the experts' accuracy"
            )
        rows.append(selected.assign(task=task))
    return pd.concat(rows, ignore_index=True).set_index(["task", "split"])["accuracy"]
