"""Stopping rules that decide, one evaluation at a time, when an expert has trained enough.

Experts that train longer fit their hard training examples, and a merge then forgets
exactly those examples, so an expert stopped early often merges better than one trained
to convergence (Horoi, Wolf, Belilovsky and Dziugaite, "Less is More: Undertraining
Experts Improves Model Upcycling", arXiv:2506.14126). Each rule here sees one task's
statistics in step order and returns True from `update` when training should stop. The
same object runs inside upcycle's training loop, inside `StoppingCallback` for a
`transformers.Trainer`, and offline through `apply_rule` over a stored trajectory.

Rules, by registry name:

- ``patience``: no improvement in validation accuracy for a number of evaluations. Keeps the
  best checkpoint.
- ``plateau``: the recent gain in validation accuracy is a small fraction of the gain since
  the first evaluation, so it stops as soon as the accuracy curve flattens.
- ``learned-fraction``: the fraction of learned training examples grows slower than a rate
  per optimizer step.
- ``gradient-concentration``: the top 5% of training examples carry more than a share of
  the gradient norm, a sign that training now serves a few hard examples.
- ``fixed``: the same step budget for every task.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

from upcycle.errors import ConfigError, UpcycleError

logger = logging.getLogger(__name__)

Statistic = Literal["learned_fraction", "grad_concentration_top5"]

# Instructions to record each optional statistic, quoted in the error for a missing value.
_HOW_TO_RECORD: dict[str, str] = {
    "learned_fraction": (
        "Enable the difficulty recorder (recorder.enabled: true in the run config), which "
        "writes the learned_fraction column of results/difficulty.csv, or, with "
        "StoppingCallback, add 'learned_fraction' to the metrics that compute_metrics "
        "returns so the Trainer reports eval_learned_fraction."
    ),
    "grad_concentration_top5": (
        "Enable the difficulty recorder (recorder.enabled: true in the run config), which "
        "writes the grad_concentration_top5 column of results/difficulty.csv, or, with "
        "StoppingCallback, add 'grad_concentration_top5' to the metrics that "
        "compute_metrics returns so the Trainer reports eval_grad_concentration_top5."
    ),
}


class TrajectoryError(UpcycleError, ValueError):
    """A sequence of evaluations that a stopping rule cannot read."""


@dataclass(frozen=True)
class Evaluation:
    """The statistics of one expert at one evaluation.

    Attributes:
        step: Optimizer step of the checkpoint. Step 0 is the base model.
        validation_accuracy: Accuracy on the task's validation split, or any other metric
            where higher is better.
        learned_fraction: Fraction of training examples that the expert has learned, in
            [0, 1], or None when it was not recorded.
        grad_concentration_top5: Share of the summed per-example gradient norm carried by
            the 5% of training examples with the largest norms, in [0, 1], or None when it
            was not recorded.

    Raises:
        TrajectoryError: If the step is negative or not an integer, the accuracy is not
            finite, or a statistic lies outside [0, 1].
    """

    step: int
    validation_accuracy: float
    learned_fraction: float | None = None
    grad_concentration_top5: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.step, bool) or not isinstance(self.step, numbers.Integral):
            raise TrajectoryError(f"evaluation step must be an integer, got {self.step!r}")
        if self.step < 0:
            raise TrajectoryError(f"evaluation step must be >= 0, got {self.step}")
        # numpy and pandas scalars become plain Python numbers, so evaluations write to JSON.
        object.__setattr__(self, "step", int(self.step))
        object.__setattr__(
            self,
            "validation_accuracy",
            _finite_number("validation_accuracy", self.validation_accuracy, self.step),
        )
        for statistic in ("learned_fraction", "grad_concentration_top5"):
            value = getattr(self, statistic)
            if value is None:
                continue
            value = _finite_number(statistic, value, self.step)
            if not 0.0 <= value <= 1.0:
                raise TrajectoryError(
                    f"{statistic} at step {self.step} is {value}, outside [0, 1]; it is a "
                    "fraction of training examples or of the gradient norm"
                )
            object.__setattr__(self, statistic, value)


def _finite_number(name: str, value: object, step: int) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TrajectoryError(f"{name} at step {step} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise TrajectoryError(
            f"{name} at step {step} is {value}; a stopping rule needs finite values, so "
            "check the evaluation that produced it"
        )
    return value


@dataclass(frozen=True)
class RuleResult:
    """The outcome of a stopping rule over a stored trajectory.

    Attributes:
        chosen_step: Step of the checkpoint to keep.
        stopped_step: Step at which training would have stopped, or None if the rule never
            stopped.
        evaluations_seen: Number of evaluations the rule read, up to and including the stop.
    """

    chosen_step: int
    stopped_step: int | None
    evaluations_seen: int


class StoppingRule(ABC):
    """A stopping rule over one task's evaluations, fed in increasing step order.

    Subclasses implement `_should_stop`, which reads the history with the newest evaluation
    last. Once a rule has stopped, its decision is final until `reset`: later calls to
    `update` return True and leave the history and the chosen step unchanged, as if
    training had ended at the stop.
    """

    name: ClassVar[str]
    required_statistic: ClassVar[Statistic | None] = None

    def __init__(self) -> None:
        self._history: list[Evaluation] = []
        self._stopped_step: int | None = None

    def update(self, evaluation: Evaluation) -> bool:
        """Record one evaluation and return True when training should stop now.

        Raises:
            TrajectoryError: If the step is not larger than the previous evaluation's step,
                or the rule needs a statistic that the evaluation lacks.
        """
        if self._stopped_step is not None:
            logger.debug(
                "%s already stopped at step %d; evaluation at step %d does not change it",
                self.name,
                self._stopped_step,
                evaluation.step,
            )
            return True
        if self._history and evaluation.step <= self._history[-1].step:
            raise TrajectoryError(
                f"evaluation at step {evaluation.step} arrived after step "
                f"{self._history[-1].step}; feed evaluations in increasing step order, or call "
                "reset() before a new trajectory"
            )
        statistic = self.required_statistic
        if statistic is not None and getattr(evaluation, statistic) is None:
            raise TrajectoryError(
                f"the {self.name} rule needs {statistic}, but the evaluation at step "
                f"{evaluation.step} has none. {_HOW_TO_RECORD[statistic]}"
            )
        self._history.append(evaluation)
        if self._should_stop():
            self._stopped_step = evaluation.step
            return True
        return False

    @abstractmethod
    def _should_stop(self) -> bool:
        """Return whether to stop at the newest evaluation, `self._history[-1]`."""

    @property
    def chosen_step(self) -> int | None:
        """Step of the checkpoint to keep: the stopping step, else the last step seen.

        None before the first evaluation.
        """
        if self._stopped_step is not None:
            return self._stopped_step
        return self._history[-1].step if self._history else None

    @property
    def stopped_step(self) -> int | None:
        """Step at which the rule stopped training, or None if it has not stopped."""
        return self._stopped_step

    @property
    def evaluations_seen(self) -> int:
        """Number of evaluations recorded since the last reset."""
        return len(self._history)

    @property
    def params(self) -> dict[str, float | int]:
        """Constructor parameters of this rule, by name."""
        names = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in names if name != "self"}

    def reset(self) -> None:
        """Forget every evaluation, so the rule can read a new trajectory."""
        self._history = []
        self._stopped_step = None

    def __repr__(self) -> str:
        params = ", ".join(f"{name}={value!r}" for name, value in self.params.items())
        return f"{type(self).__name__}({params})"


class PatienceRule(StoppingRule):
    """Stop when validation accuracy has not improved for `patience` evaluations.

    An evaluation improves when its accuracy exceeds the best accuracy so far by more
    than `min_delta`. The chosen checkpoint is the last evaluation that improved, so with
    `min_delta` > 0 a later checkpoint that is higher by at most `min_delta` is not chosen,
    and of two equal accuracies the earlier checkpoint is kept.

    Args:
        patience: Evaluations without improvement before stopping, >= 1.
        min_delta: Smallest accuracy increase that counts as an improvement, >= 0.

    Raises:
        ConfigError: If a parameter is outside its range.
    """

    name = "patience"

    def __init__(self, *, patience: int = 3, min_delta: float = 0.0) -> None:
        super().__init__()
        self.patience = _check_int(self, "patience", patience, minimum=1)
        self.min_delta = _check_float(self, "min_delta", min_delta, low=0.0)
        self._best: Evaluation | None = None
        self._evaluations_since_best = 0

    def _should_stop(self) -> bool:
        latest = self._history[-1]
        if self._best is None or (
            latest.validation_accuracy > self._best.validation_accuracy + self.min_delta
        ):
            self._best = latest
            self._evaluations_since_best = 0
            return False
        self._evaluations_since_best += 1
        return self._evaluations_since_best >= self.patience

    @property
    def chosen_step(self) -> int | None:
        """Step of the best checkpoint seen, or None before the first evaluation."""
        return self._best.step if self._best is not None else None

    def reset(self) -> None:
        super().reset()
        self._best = None
        self._evaluations_since_best = 0


class PlateauRule(StoppingRule):
    """Stop as soon as the accuracy curve flattens relative to the gain since the start.

    At evaluation i (0-based, i >= `window`), with accuracies a_0 .. a_i:

        recent_gain = a_i - a_{i - window}
        total_gain  = a_i - a_0

    the rule stops when total_gain > 0 and recent_gain < threshold * total_gain. While
    total_gain <= 0 the expert has not improved on its first evaluation, so there is no
    gain to compare against and the rule keeps training: stopping then would keep an
    expert that learned nothing. A trajectory that never rises above its first accuracy
    therefore never stops. The chosen checkpoint is the stopping step.

    Args:
        window: Evaluations over which the recent gain is measured, >= 1.
        threshold: Fraction of the gain since the start below which the recent gain counts
            as a plateau, in (0, 1].

    Raises:
        ConfigError: If a parameter is outside its range.
    """

    name = "plateau"

    def __init__(self, *, window: int = 2, threshold: float = 0.1) -> None:
        super().__init__()
        self.window = _check_int(self, "window", window, minimum=1)
        self.threshold = _check_float(
            self, "threshold", threshold, low=0.0, low_inclusive=False, high=1.0
        )

    def _should_stop(self) -> bool:
        if len(self._history) <= self.window:
            return False
        accuracies = [evaluation.validation_accuracy for evaluation in self._history]
        recent_gain = accuracies[-1] - accuracies[-1 - self.window]
        total_gain = accuracies[-1] - accuracies[0]
        return total_gain > 0 and recent_gain < self.threshold * total_gain


class LearnedFractionRule(StoppingRule):
    """Stop when the learned fraction of training examples grows slower than a rate.

    At evaluation i (0-based, i >= `window`) the growth rate is

        (learned_fraction_i - learned_fraction_{i - window}) / (step_i - step_{i - window})

    per optimizer step, so evaluations need not be evenly spaced. The rule stops when the
    rate is below `threshold`. The chosen checkpoint is the stopping step.

    Args:
        threshold: Growth per optimizer step below which training stops, > 0. The default
            1e-4 is a growth of 1% of the training set per 100 steps.
        window: Evaluations over which the growth is measured, >= 1.

    Raises:
        ConfigError: If a parameter is outside its range.
        TrajectoryError: From `update`, if an evaluation has no learned_fraction.
    """

    name = "learned-fraction"
    required_statistic = "learned_fraction"

    def __init__(self, *, threshold: float = 1e-4, window: int = 1) -> None:
        super().__init__()
        self.threshold = _check_float(self, "threshold", threshold, low=0.0, low_inclusive=False)
        self.window = _check_int(self, "window", window, minimum=1)

    def _should_stop(self) -> bool:
        if len(self._history) <= self.window:
            return False
        latest = self._history[-1]
        earlier = self._history[-1 - self.window]
        growth = latest.learned_fraction - earlier.learned_fraction
        rate = growth / (latest.step - earlier.step)
        return rate < self.threshold


class GradientConcentrationRule(StoppingRule):
    """Stop when the top 5% of training examples carry more than `threshold` of the gradient.

    The statistic is `Evaluation.grad_concentration_top5`. Its floor is 0.05, reached when
    every example has the same gradient norm, and it rises as the loss concentrates on a few
    unlearned examples. The rule stops at the first evaluation where it is strictly above
    the threshold. The chosen checkpoint is the stopping step.

    Args:
        threshold: Share of the gradient norm, in (0, 1).

    Raises:
        ConfigError: If the threshold is outside its range.
        TrajectoryError: From `update`, if an evaluation has no grad_concentration_top5.
    """

    name = "gradient-concentration"
    required_statistic = "grad_concentration_top5"

    def __init__(self, *, threshold: float = 0.25) -> None:
        super().__init__()
        self.threshold = _check_float(
            self,
            "threshold",
            threshold,
            low=0.0,
            low_inclusive=False,
            high=1.0,
            high_inclusive=False,
        )

    def _should_stop(self) -> bool:
        return self._history[-1].grad_concentration_top5 > self.threshold


class FixedStepRule(StoppingRule):
    """Stop at the first evaluation at or past a step budget, the same for every task.

    When the budget falls between two evaluations, the rule stops at the later one, which
    is also the chosen checkpoint.

    Args:
        step: Optimizer step budget, >= 0. A budget of 0 keeps the first evaluation.

    Raises:
        ConfigError: If the budget is negative or not an integer.
    """

    name = "fixed"

    def __init__(self, *, step: int) -> None:
        super().__init__()
        self.step = _check_int(self, "step", step, minimum=0)

    def _should_stop(self) -> bool:
        return self._history[-1].step >= self.step


STOPPING_RULES: dict[str, type[StoppingRule]] = {
    rule.name: rule
    for rule in (
        PatienceRule,
        PlateauRule,
        LearnedFractionRule,
        GradientConcentrationRule,
        FixedStepRule,
    )
}
"""Stopping rules by registry name."""


def make_rule(name: str, **params: float) -> StoppingRule:
    """Build the stopping rule registered as `name` with keyword parameters `params`.

    Raises:
        ConfigError: If the name is not registered, a parameter is unknown or missing, or
            a value is outside its range.
    """
    if name not in STOPPING_RULES:
        raise ConfigError(
            f"unknown stopping rule {name!r}; supported rules: {', '.join(STOPPING_RULES)}"
        )
    rule_class = STOPPING_RULES[name]
    signature = inspect.signature(rule_class.__init__)
    accepted = [parameter for parameter in signature.parameters if parameter != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(unknown)} for stopping rule {name!r}; "
            f"its parameters are: {', '.join(accepted)}"
        )
    missing = [
        parameter.name
        for parameter in signature.parameters.values()
        if parameter.name != "self"
        and parameter.default is inspect.Parameter.empty
        and parameter.name not in params
    ]
    if missing:
        raise ConfigError(
            f"stopping rule {name!r} needs parameter(s) {', '.join(missing)}; its parameters "
            f"are: {', '.join(accepted)}"
        )
    return rule_class(**params)


def apply_rule(rule: StoppingRule, evaluations: Sequence[Evaluation]) -> RuleResult:
    """Run `rule` over a stored trajectory, as if the evaluations arrived during training.

    The rule is reset first, then fed the evaluations in order until it stops.

    Args:
        rule: The stopping rule. Its state afterwards reflects this trajectory.
        evaluations: One task's evaluations in increasing step order.

    Raises:
        TrajectoryError: If `evaluations` is empty, steps do not increase, or the rule needs
            a statistic that an evaluation before the stop lacks.
    """
    if not evaluations:
        raise TrajectoryError(
            f"cannot apply the {rule.name} rule to an empty trajectory; it needs at least "
            "one evaluation"
        )
    rule.reset()
    for evaluation in evaluations:
        if rule.update(evaluation):
            break
    chosen_step = rule.chosen_step
    assert chosen_step is not None  # at least one evaluation was recorded
    return RuleResult(
        chosen_step=chosen_step,
        stopped_step=rule.stopped_step,
        evaluations_seen=rule.evaluations_seen,
    )


def _check_int(rule: StoppingRule, name: str, value: object, *, minimum: int) -> int:
    # Config files may write an integer as 2.0, so integral floats are accepted.
    is_integral_float = isinstance(value, float) and value.is_integer()
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or is_integral_float):
        raise ConfigError(
            f"{rule.name} rule parameter {name}={value!r} is invalid: it must be an integer "
            f">= {minimum}"
        )
    if value < minimum:
        raise ConfigError(
            f"{rule.name} rule parameter {name}={value!r} is out of range: it must be an "
            f"integer >= {minimum}"
        )
    return int(value)


def _check_float(
    rule: StoppingRule,
    name: str,
    value: object,
    *,
    low: float,
    low_inclusive: bool = True,
    high: float = math.inf,
    high_inclusive: bool = True,
) -> float:
    left = "[" if low_inclusive else "("
    right = "]" if high_inclusive and math.isfinite(high) else ")"
    allowed = f"{left}{low:g}, {high:g}{right}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(
            f"{rule.name} rule parameter {name}={value!r} is invalid: it must be a number "
            f"in {allowed}"
        )
    value = float(value)
    above_low = value >= low if low_inclusive else value > low
    below_high = value <= high if high_inclusive else value < high
    if not (above_low and below_high and math.isfinite(value)):
        raise ConfigError(
            f"{rule.name} rule parameter {name}={value!r} is out of range: it must be in {allowed}"
        )
    return value
