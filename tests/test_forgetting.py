"""Forgetting rows of forgetting.csv on hand-made predictions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from upcycle.analysis.difficulty import AnalysisError
from upcycle.analysis.forgetting import FORGETTING_COLUMNS, forgetting_by_merge, forgetting_rows

# 20 examples. With learned_step = 0..19, decile d contains examples 2d and 2d + 1.
EXPERT = np.array([1, 1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1], dtype=bool)
MERGED = np.array([1, 1, 0, 0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1, 0, 0, 0, 0], dtype=bool)
# Expert right and merged wrong: examples 2, 5, 10, 12, 13, 17, 18, 19.
CONTEXT = {
    "seed": 3,
    "kind": "full",
    "method": "ties",
    "step": 40,
    "task": "sst2",
    "split": "train",
}


def rows_for(scores):
    return forgetting_rows(expert_correct=EXPERT, merged_correct=MERGED, scores=scores, **CONTEXT)


def test_forgetting_by_merge_hand_arrays():
    result = forgetting_by_merge(EXPERT, MERGED)
    np.testing.assert_array_equal(np.flatnonzero(result), [2, 5, 10, 12, 13, 17, 18, 19])


def test_forgetting_by_merge_accepts_integers():
    result = forgetting_by_merge(np.array([1, 1, 0]), np.array([0, 1, 0]))
    np.testing.assert_array_equal(result, [True, False, False])


def test_forgetting_by_merge_length_mismatch():
    with pytest.raises(AnalysisError, match="lengths 20 and 19"):
        forgetting_by_merge(EXPERT, MERGED[:-1])


def test_all_row_only():
    rows = rows_for(None)
    assert rows == [
        {**CONTEXT, "score": "none", "decile": "all", "n": 16, "forgotten": 8, "rate": 0.5}
    ]


def test_row_keys_in_schema_order():
    for row in rows_for({"learned_step": np.arange(20.0)}):
        assert list(row) == list(FORGETTING_COLUMNS)


def test_decile_rows_hand_counts():
    rows = rows_for({"learned_step": np.arange(20.0)})
    decile_rows = [row for row in rows if row["score"] == "learned_step"]
    assert [row["decile"] for row in decile_rows] == [str(d) for d in range(10)]
    # Expert-right examples per decile and how many of them the merge got wrong.
    assert [row["n"] for row in decile_rows] == [2, 1, 2, 0, 2, 2, 2, 2, 1, 2]
    assert [row["forgotten"] for row in decile_rows] == [0, 1, 1, 0, 0, 1, 2, 0, 1, 2]


def test_decile_rates():
    rows = rows_for({"learned_step": np.arange(20.0)})
    rates = [row["rate"] for row in rows if row["score"] == "learned_step"]
    assert rates[:3] == [0.0, 1.0, 0.5]
    assert math.isnan(rates[3])
    assert rates[4:] == [0.0, 0.5, 1.0, 0.0, 1.0, 1.0]


def test_never_learned_in_hardest_decile():
    # Examples 0 and 1 were never learned (NaN), so they form decile 9 and shift the rest.
    learned = np.r_[np.nan, np.nan, np.arange(18.0)]
    rows = [row for row in rows_for({"learned_step": learned}) if row["score"] == "learned_step"]
    assert rows[9]["n"] == 2
    assert rows[9]["forgotten"] == 0
    assert rows[0]["n"] == 1
    assert rows[0]["forgotten"] == 1


def test_two_scores_each_get_ten_rows():
    el2n = np.linspace(1.0, 0.0, 20)
    rows = rows_for({"learned_step": np.arange(20.0), "el2n": el2n})
    assert len(rows) == 21
    el2n_rows = [row for row in rows if row["score"] == "el2n"]
    # EL2N falls with the index here, so its decile 0 is examples 18 and 19.
    assert el2n_rows[0]["n"] == 2
    assert el2n_rows[0]["forgotten"] == 2


def test_decile_totals_match_all_row():
    rows = rows_for({"learned_step": np.arange(20.0)})
    decile_rows = [row for row in rows if row["score"] == "learned_step"]
    assert sum(row["n"] for row in decile_rows) == rows[0]["n"]
    assert sum(row["forgotten"] for row in decile_rows) == rows[0]["forgotten"]


def test_all_nan_score_rejected():
    with pytest.raises(AnalysisError, match="'el2n' is NaN for every example"):
        rows_for({"el2n": np.full(20, np.nan)})


def test_score_length_mismatch():
    with pytest.raises(AnalysisError, match="one value per example"):
        rows_for({"el2n": np.zeros(19)})


def test_reserved_score_name():
    with pytest.raises(AnalysisError, match="reserved"):
        rows_for({"none": np.zeros(20)})


def test_unknown_kind():
    with pytest.raises(AnalysisError, match="supported: 'full', 'lora'"):
        forgetting_rows(
            expert_correct=EXPERT, merged_correct=MERGED, scores=None, **{**CONTEXT, "kind": "moe"}
        )
