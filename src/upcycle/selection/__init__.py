"""Checkpoint selection: stopping rules, a Trainer callback, and merge-aware search."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from upcycle.selection.rules import (
    STOPPING_RULES,
    Evaluation,
    FixedStepRule,
    GradientConcentrationRule,
    LearnedFractionRule,
    PatienceRule,
    PlateauRule,
    RuleResult,
    StoppingRule,
    TrajectoryError,
    apply_rule,
    make_rule,
)
from upcycle.selection.search import (
    CommonStep,
    SearchMove,
    SearchResult,
    best_common_step,
    coordinate_ascent,
)

if TYPE_CHECKING:
    from upcycle.selection.callback import StoppingCallback

__all__ = [
    "STOPPING_RULES",
    "CommonStep",
    "Evaluation",
    "FixedStepRule",
    "GradientConcentrationRule",
    "LearnedFractionRule",
    "PatienceRule",
    "PlateauRule",
    "RuleResult",
    "SearchMove",
    "SearchResult",
    "StoppingCallback",
    "StoppingRule",
    "TrajectoryError",
    "apply_rule",
    "best_common_step",
    "coordinate_ascent",
    "make_rule",
]


def __getattr__(name: str) -> Any:
    # The callback imports transformers, which takes seconds, so offline rule and search
    # users do not pay for it until they ask for the callback.
    if name == "StoppingCallback":
        from upcycle.selection.callback import StoppingCallback

        return StoppingCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
