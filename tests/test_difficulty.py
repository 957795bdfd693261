"""Difficulty scores on hand-made visit histories."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from upcycle.analysis.difficulty import (
    AnalysisError,
    difficulty_deciles,
    el2n_scores,
    first_correct_steps,
    forgetting_events,
    gradient_concentration,
    last_visits,
    learned_steps,
)

NAN = math.nan

# (step, example index, correct), deliberately not sorted by step or example.
# Example 0: wrong, then right for good from step 3.
# Example 1: right, forgotten at step 3, relearned at step 5.
# Example 2: never right.
# Example 3: never seen.
# Example 4: right twice, wrong at its last visit.
# Example 5: forgotten twice, learned for good at step 9.
# Example 6: two visits at step 4 (a batch across two epochs): right, then wrong.
VISITS = [
    (5, 1, True),
    (2, 4, True),
    (3, 0, True),
    (9, 5, True),
    (1, 0, False),
    (4, 6, True),
    (2, 2, False),
    (7, 1, True),
    (4, 4, True),
    (1, 1, True),
    (6, 5, True),
    (4, 2, False),
    (2, 5, True),
    (5, 0, True),
    (8, 5, False),
    (3, 1, False),
    (6, 4, False),
    (4, 6, False),
    (4, 5, False),
]
NUM_EXAMPLES = 7


def history():
    steps = np.array([visit[0] for visit in VISITS])
    indices = np.array([visit[1] for visit in VISITS])
    correct = np.array([visit[2] for visit in VISITS])
    return steps, indices, correct


def test_learned_steps_hand_history():
    result = learned_steps(*history(), NUM_EXAMPLES)
    np.testing.assert_array_equal(result, [3, 5, NAN, NAN, NAN, 9, NAN])


def test_learned_steps_same_step_order():
    # Swapping the two step-4 visits of example 6 makes its last visit correct.
    steps, indices, correct = history()
    rows = np.flatnonzero(indices == 6)
    correct[rows] = correct[rows[::-1]]
    result = learned_steps(steps, indices, correct, NUM_EXAMPLES)
    assert result[6] == 4


def test_first_correct_steps_hand_history():
    result = first_correct_steps(*history(), NUM_EXAMPLES)
    np.testing.assert_array_equal(result, [3, 1, NAN, NAN, 2, 2, 4])


def test_forgetting_events_hand_history():
    result = forgetting_events(*history(), NUM_EXAMPLES)
    np.testing.assert_array_equal(result, [0, 1, 0, 0, 1, 2, 1])


def test_forgetting_events_dtype():
    assert forgetting_events(*history(), NUM_EXAMPLES).dtype == np.int64


def test_last_visits_hand_history():
    steps, indices, _ = history()
    result = last_visits(steps, indices, NUM_EXAMPLES)
    # Positions in VISITS of each example's latest visit. Example 3 was never seen.
    np.testing.assert_array_equal(result, [13, 7, 11, -1, 16, 3, 17])


def test_learned_steps_empty_history():
    empty = np.zeros(0, dtype=np.int64)
    result = learned_steps(empty, empty, np.zeros(0, bool), 3)
    np.testing.assert_array_equal(result, [NAN, NAN, NAN])


def test_history_index_out_of_range():
    steps, indices, correct = history()
    with pytest.raises(AnalysisError, match=r"\[0, 6\)"):
        learned_steps(steps, indices, correct, 6)


def test_history_length_mismatch():
    steps, indices, correct = history()
    with pytest.raises(AnalysisError, match="one entry per visit"):
        forgetting_events(steps[:-1], indices, correct, NUM_EXAMPLES)


def test_history_float_indices():
    steps, indices, correct = history()
    with pytest.raises(AnalysisError, match="integers"):
        learned_steps(steps, indices.astype(float), correct, NUM_EXAMPLES)


def reference_scores(steps, indices, correct, num_examples):
    """Per-example loop over the visits in step order, ties in array order."""
    learned = [NAN] * num_examples
    events = [0] * num_examples
    previous: dict[int, bool] = {}
    order = sorted(range(len(steps)), key=lambda position: (steps[position], position))
    for position in order:
        example, right = indices[position], correct[position]
        if previous.get(example) and not right:
            events[example] += 1
        if right and not previous.get(example, False):
            learned[example] = steps[position]
        if not right:
            learned[example] = NAN
        previous[example] = right
    return np.array(learned, dtype=float), np.array(events)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 6), st.integers(0, 4), st.booleans()), min_size=0, max_size=30
    )
)
def test_scores_match_loop_reference(visits):
    steps = np.array([visit[0] for visit in visits], dtype=np.int64)
    indices = np.array([visit[1] for visit in visits], dtype=np.int64)
    correct = np.array([visit[2] for visit in visits], dtype=bool)
    expected_learned, expected_events = reference_scores(steps, indices, correct, 5)
    np.testing.assert_array_equal(learned_steps(steps, indices, correct, 5), expected_learned)
    np.testing.assert_array_equal(forgetting_events(steps, indices, correct, 5), expected_events)


def test_el2n_hand_values():
    probabilities = torch.tensor([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    # ||p - onehot||: (-0.3, 0.2, 0.1), (0.25, -0.75, 0.5), (0, 0, 0).
    expected = torch.tensor([math.sqrt(0.14), math.sqrt(0.875), 0.0])
    assert torch.allclose(el2n_scores(probabilities, labels), expected)


def test_el2n_numpy_labels():
    probabilities = torch.tensor([[0.5, 0.5]])
    assert torch.allclose(el2n_scores(probabilities, np.array([1])), torch.tensor([0.5**0.5]))


def test_el2n_rejects_negative_logits():
    with pytest.raises(AnalysisError, match="Apply softmax"):
        el2n_scores(torch.tensor([[2.0, -1.0]]), torch.tensor([0]))


def test_el2n_rejects_positive_logits():
    with pytest.raises(AnalysisError, match="Apply softmax"):
        el2n_scores(torch.tensor([[2.0, 0.5]]), torch.tensor([0]))


def test_el2n_label_out_of_range():
    with pytest.raises(AnalysisError, match=r"\[0, 2\)"):
        el2n_scores(torch.tensor([[0.5, 0.5]]), torch.tensor([2]))


def test_el2n_label_shape():
    with pytest.raises(AnalysisError, match="shape"):
        el2n_scores(torch.tensor([[0.5, 0.5]]), torch.tensor([0, 1]))


def test_deciles_distinct_scores():
    scores = np.array([13, 2, 19, 7, 0, 11, 5, 17, 3, 9, 15, 1, 8, 18, 4, 12, 6, 16, 10, 14])
    result = difficulty_deciles(scores)
    np.testing.assert_array_equal(result, scores // 2)


def test_deciles_lower_is_harder():
    scores = np.arange(20)
    result = difficulty_deciles(scores, higher_is_harder=False)
    np.testing.assert_array_equal(result, 9 - scores // 2)


def test_deciles_ties_fill_evenly():
    result = difficulty_deciles(np.zeros(25))
    counts = np.bincount(result, minlength=10)
    np.testing.assert_array_equal(counts, [3, 2, 3, 2, 3, 2, 3, 2, 3, 2])


def test_deciles_ties_in_position_order():
    result = difficulty_deciles(np.zeros(10))
    np.testing.assert_array_equal(result, np.arange(10))


def test_deciles_nan_hardest():
    # Never-learned examples (NaN) are hardest whatever the direction.
    scores = np.array([NAN, 1, 2, 3, 4, 5, 6, 7, 8, NAN])
    np.testing.assert_array_equal(difficulty_deciles(scores), [8, 0, 1, 2, 3, 4, 5, 6, 7, 9])
    np.testing.assert_array_equal(
        difficulty_deciles(scores, higher_is_harder=False), [8, 7, 6, 5, 4, 3, 2, 1, 0, 9]
    )


def test_deciles_few_examples():
    np.testing.assert_array_equal(difficulty_deciles(np.array([3.0, 1.0, 2.0])), [6, 0, 3])


def test_deciles_empty():
    assert difficulty_deciles(np.zeros(0)).shape == (0,)


def test_deciles_rejects_2d():
    with pytest.raises(AnalysisError, match="1-D"):
        difficulty_deciles(np.zeros((2, 5)))


def test_concentration_hand_norms():
    norms = np.arange(1, 101, dtype=float)
    result = gradient_concentration(norms)
    assert result[0.01] == pytest.approx(100 / 5050)
    assert result[0.05] == pytest.approx((100 + 99 + 98 + 97 + 96) / 5050)
    assert result[0.10] == pytest.approx(sum(range(91, 101)) / 5050)


def test_concentration_at_least_one_example():
    norms = np.array([1.0, 3.0, 0.0, 4.0])
    result = gradient_concentration(norms, fractions=(0.01, 0.5, 1.0))
    assert result[0.01] == pytest.approx(0.5)
    assert result[0.5] == pytest.approx(7 / 8)
    assert result[1.0] == pytest.approx(1.0)


def test_concentration_rounds_to_nearest():
    # 15% of 10 examples rounds to 2 (halves up), 14% to 1.
    norms = np.array([5.0, 4, 1, 0, 0, 0, 0, 0, 0, 0])
    result = gradient_concentration(norms, fractions=(0.14, 0.15))
    assert result[0.14] == pytest.approx(0.5)
    assert result[0.15] == pytest.approx(0.9)


def test_concentration_empty_is_nan():
    result = gradient_concentration(np.zeros(0))
    assert all(math.isnan(share) for share in result.values())


def test_concentration_all_zero_is_nan():
    result = gradient_concentration(np.zeros(5))
    assert all(math.isnan(share) for share in result.values())


def test_concentration_rejects_nan():
    with pytest.raises(AnalysisError, match="finite"):
        gradient_concentration(np.array([1.0, NAN]))


def test_concentration_rejects_fraction():
    with pytest.raises(AnalysisError, match=r"\(0, 1\]"):
        gradient_concentration(np.ones(3), fractions=(0.0,))
