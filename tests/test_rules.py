"""Stopping rules on hand-made trajectories, with the stop computed by hand in each test."""

from __future__ import annotations

import pytest

from upcycle.errors import ConfigError
from upcycle.selection import (
    STOPPING_RULES,
    Evaluation,
    FixedStepRule,
    GradientConcentrationRule,
    LearnedFractionRule,
    PatienceRule,
    PlateauRule,
    TrajectoryError,
    apply_rule,
    make_rule,
)


def accuracy_trajectory(steps: list[int], accuracies: list[float]) -> list[Evaluation]:
    return [
        Evaluation(step=step, validation_accuracy=accuracy)
        for step, accuracy in zip(steps, accuracies, strict=True)
    ]


def test_patience_keeps_best():
    # Best 0.75 at step 300. Steps 400, 500 and 600 do not beat it, so the third stops.
    evaluations = accuracy_trajectory(
        [100, 200, 300, 400, 500, 600, 700], [0.5, 0.625, 0.75, 0.6875, 0.75, 0.71875, 0.875]
    )
    result = apply_rule(PatienceRule(patience=3), evaluations)
    assert result.stopped_step == 600
    assert result.chosen_step == 300
    assert result.evaluations_seen == 6


def test_patience_min_delta_ignores_small_gain():
    # 0.5625 beats 0.5 by 0.0625, which is not more than min_delta=0.125, so the counter
    # runs on from step 100 and step 300 is the second evaluation without improvement.
    evaluations = accuracy_trajectory([100, 200, 300, 400], [0.5, 0.5625, 0.5625, 0.75])
    result = apply_rule(PatienceRule(patience=2, min_delta=0.125), evaluations)
    assert result.stopped_step == 300
    assert result.chosen_step == 100


def test_patience_never_stops():
    evaluations = accuracy_trajectory([10, 20, 30], [0.5, 0.625, 0.75])
    result = apply_rule(PatienceRule(patience=1), evaluations)
    assert result.stopped_step is None
    assert result.chosen_step == 30
    assert result.evaluations_seen == 3


def test_plateau_stops_early():
    # window=1, threshold=0.1. Gains: step 100 +0.25 of 0.25, step 200 +0.125 of 0.375,
    # step 300 +0.03125 of 0.40625, and 0.03125 < 0.040625 is a plateau.
    evaluations = accuracy_trajectory([0, 100, 200, 300, 400], [0.5, 0.75, 0.875, 0.90625, 0.96875])
    result = apply_rule(PlateauRule(window=1, threshold=0.1), evaluations)
    assert result.stopped_step == 300
    assert result.chosen_step == 300


def test_plateau_waits_for_gain():
    # Steps 100 to 300 gain nothing over the start (0, -0.125, 0), so the flat recent gain
    # there is no plateau. Step 600 gains 0 of 0.25 after the rise.
    evaluations = accuracy_trajectory(
        [0, 100, 200, 300, 400, 500, 600], [0.5, 0.5, 0.375, 0.5, 0.625, 0.75, 0.75]
    )
    result = apply_rule(PlateauRule(window=1, threshold=0.1), evaluations)
    assert result.stopped_step == 600
    assert result.chosen_step == 600


def test_plateau_no_gain_never_stops():
    evaluations = accuracy_trajectory([0, 100, 200, 300], [0.5, 0.5, 0.5, 0.4375])
    result = apply_rule(PlateauRule(window=1, threshold=0.1), evaluations)
    assert result.stopped_step is None
    assert result.chosen_step == 300


def test_plateau_window_two():
    # window=2 compares with two evaluations back. Step 300 gains 0.125 of 0.375 (no
    # plateau, where window=1 would stop), and step 400 gains 0.03125 of 0.40625 < 0.040625.
    evaluations = accuracy_trajectory([0, 100, 200, 300, 400], [0.5, 0.75, 0.875, 0.875, 0.90625])
    result = apply_rule(PlateauRule(window=2, threshold=0.1), evaluations)
    assert result.stopped_step == 400
    assert result.chosen_step == 400


def test_learned_fraction_uneven_spacing():
    # Rates per step: 0.1/50 = 2e-3, 0.1/50 = 2e-3, then 0.15/300 = 5e-4 < 1e-3. The last
    # evaluation gains more per evaluation than the others but less per step.
    evaluations = [
        Evaluation(step=0, validation_accuracy=0.5, learned_fraction=0.0),
        Evaluation(step=50, validation_accuracy=0.6, learned_fraction=0.1),
        Evaluation(step=100, validation_accuracy=0.7, learned_fraction=0.2),
        Evaluation(step=400, validation_accuracy=0.8, learned_fraction=0.35),
        Evaluation(step=450, validation_accuracy=0.8, learned_fraction=0.36),
    ]
    result = apply_rule(LearnedFractionRule(threshold=1e-3), evaluations)
    assert result.stopped_step == 400
    assert result.chosen_step == 400


def test_learned_fraction_window_two():
    # window=2: step 200 grows 0.3 over 200 steps (1.5e-3), step 300 grows 0.12 over 200
    # steps (6e-4 < 1e-3).
    evaluations = [
        Evaluation(step=0, validation_accuracy=0.5, learned_fraction=0.0),
        Evaluation(step=100, validation_accuracy=0.6, learned_fraction=0.2),
        Evaluation(step=200, validation_accuracy=0.7, learned_fraction=0.3),
        Evaluation(step=300, validation_accuracy=0.8, learned_fraction=0.32),
    ]
    result = apply_rule(LearnedFractionRule(threshold=1e-3, window=2), evaluations)
    assert result.stopped_step == 300


def test_gradient_concentration_crossing():
    # 0.25 equals the threshold, which does not count, and 0.3125 crosses it.
    concentrations = [0.125, 0.1875, 0.25, 0.3125, 0.375]
    evaluations = [
        Evaluation(step=100 * (index + 1), validation_accuracy=0.5, grad_concentration_top5=value)
        for index, value in enumerate(concentrations)
    ]
    result = apply_rule(GradientConcentrationRule(threshold=0.25), evaluations)
    assert result.stopped_step == 400
    assert result.chosen_step == 400


def test_fixed_budget_between_evaluations():
    evaluations = accuracy_trajectory([100, 200, 300, 400], [0.5, 0.6, 0.7, 0.8])
    result = apply_rule(FixedStepRule(step=250), evaluations)
    assert result.stopped_step == 300
    assert result.chosen_step == 300
    assert result.evaluations_seen == 3


def test_fixed_budget_on_evaluation():
    evaluations = accuracy_trajectory([100, 200, 300], [0.5, 0.6, 0.7])
    result = apply_rule(FixedStepRule(step=200), evaluations)
    assert result.stopped_step == 200


def test_update_after_stop_is_final():
    rule = FixedStepRule(step=100)
    assert rule.update(Evaluation(step=100, validation_accuracy=0.5))
    assert rule.update(Evaluation(step=200, validation_accuracy=0.9))
    assert rule.chosen_step == 100
    assert rule.evaluations_seen == 1


def test_reset_forgets_history():
    rule = PatienceRule(patience=1)
    rule.update(Evaluation(step=100, validation_accuracy=0.9))
    rule.update(Evaluation(step=200, validation_accuracy=0.5))
    rule.reset()
    assert rule.stopped_step is None
    assert rule.chosen_step is None
    assert not rule.update(Evaluation(step=50, validation_accuracy=0.1))


def test_update_rejects_step_order():
    rule = PatienceRule()
    rule.update(Evaluation(step=200, validation_accuracy=0.5))
    with pytest.raises(TrajectoryError, match="step 200 arrived after step 200"):
        rule.update(Evaluation(step=200, validation_accuracy=0.6))


def test_apply_rule_resets_first():
    rule = PatienceRule(patience=1)
    apply_rule(rule, accuracy_trajectory([100, 200], [0.9, 0.5]))
    result = apply_rule(rule, accuracy_trajectory([10, 20], [0.5, 0.75]))
    assert result.stopped_step is None
    assert result.chosen_step == 20


def test_apply_rule_missing_statistic():
    evaluations = [
        Evaluation(step=100, validation_accuracy=0.5, learned_fraction=0.1),
        Evaluation(step=200, validation_accuracy=0.6),
    ]
    with pytest.raises(TrajectoryError) as caught:
        apply_rule(LearnedFractionRule(), evaluations)
    message = str(caught.value)
    assert "learned-fraction rule needs learned_fraction" in message
    assert "step 200" in message
    assert "recorder.enabled: true" in message
    assert "eval_learned_fraction" in message


def test_apply_rule_missing_concentration():
    evaluations = accuracy_trajectory([100], [0.5])
    with pytest.raises(TrajectoryError, match="eval_grad_concentration_top5"):
        apply_rule(GradientConcentrationRule(), evaluations)


def test_apply_rule_empty_trajectory():
    with pytest.raises(TrajectoryError, match="empty trajectory"):
        apply_rule(PlateauRule(), [])


def test_registry_names():
    assert list(STOPPING_RULES) == [
        "patience",
        "plateau",
        "learned-fraction",
        "gradient-concentration",
        "fixed",
    ]


def test_make_rule_builds_with_params():
    rule = make_rule("plateau", window=1, threshold=0.2)
    assert isinstance(rule, PlateauRule)
    assert rule.params == {"window": 1, "threshold": 0.2}


def test_make_rule_accepts_integral_float():
    rule = make_rule("patience", patience=2.0)
    assert rule.patience == 2
    assert isinstance(rule.patience, int)


def test_make_rule_unknown_name():
    with pytest.raises(ConfigError) as caught:
        make_rule("early")
    assert str(caught.value) == (
        "unknown stopping rule 'early'; supported rules: patience, plateau, learned-fraction, "
        "gradient-concentration, fixed"
    )


def test_make_rule_unknown_parameter():
    with pytest.raises(ConfigError) as caught:
        make_rule("plateau", windw=2)
    assert str(caught.value) == (
        "unknown parameter(s) windw for stopping rule 'plateau'; its parameters are: "
        "window, threshold"
    )


def test_make_rule_missing_parameter():
    with pytest.raises(ConfigError, match="stopping rule 'fixed' needs parameter\\(s\\) step"):
        make_rule("fixed")


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        ("patience", {"patience": 0}, "patience rule parameter patience=0 is out of range"),
        ("patience", {"patience": 1.5}, "patience rule parameter patience=1.5 is invalid"),
        ("patience", {"min_delta": -0.1}, "min_delta=-0.1 is out of range: it must be in [0, inf)"),
        ("plateau", {"threshold": 0}, "threshold=0.0 is out of range: it must be in (0, 1]"),
        ("plateau", {"threshold": 1.5}, "threshold=1.5 is out of range: it must be in (0, 1]"),
        ("plateau", {"window": True}, "plateau rule parameter window=True is invalid"),
        ("learned-fraction", {"threshold": 0.0}, "it must be in (0, inf)"),
        ("gradient-concentration", {"threshold": 1.0}, "it must be in (0, 1)"),
        ("fixed", {"step": -1}, "fixed rule parameter step=-1 is out of range"),
    ],
)
def test_make_rule_out_of_range(name, params, expected):
    with pytest.raises(ConfigError) as caught:
        make_rule(name, **params)
    assert expected in str(caught.value)


def test_evaluation_rejects_nan():
    with pytest.raises(TrajectoryError, match="validation_accuracy at step 3 is nan"):
        Evaluation(step=3, validation_accuracy=float("nan"))


def test_evaluation_rejects_fraction_above_one():
    with pytest.raises(TrajectoryError, match="learned_fraction at step 3 is 1.5"):
        Evaluation(step=3, validation_accuracy=0.5, learned_fraction=1.5)
