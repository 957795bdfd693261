import math

import pytest
import torch

from upcycle.analysis import interference
from upcycle.analysis.interference import (
    interference_rows,
    pairwise_cosine,
    sign_conflict_fraction,
    task_vector_norms,
)
from upcycle.errors import ConfigError, MergeError


def task_vector(weight, bias):
    return {"w": torch.tensor(weight), "b": torch.tensor(bias)}


# Flattened: sst2 = [1, 2, 2] (norm 3), trec = [0, 3, 4] (norm 5), mnli = -sst2 (norm 3).
# Dot products: sst2.trec = 0 + 6 + 8 = 14, sst2.mnli = -9, trec.mnli = -14.
GEOMETRY = {
    "sst2": task_vector([1.0, 2.0], [2.0]),
    "trec": task_vector([0.0, 3.0], [4.0]),
    "mnli": task_vector([-1.0, -2.0], [-2.0]),
}

# Per coordinate (w0, w1, w2, b0, b1) across the experts:
#   w0: 1, 3, 0 -> both nonzero positive, no conflict
#   w1: -1, 0, -2 -> both nonzero negative, no conflict
#   w2: 0, 0, 0 -> no nonzero entry, no conflict
#   b0: 2, -1, 0 -> positive and negative, conflict
#   b1: 0, 0, 5 -> one nonzero entry, no conflict
# One conflict out of five coordinates: 0.2.
SIGNS = {
    "x": task_vector([1.0, -1.0, 0.0], [2.0, 0.0]),
    "y": task_vector([3.0, 0.0, 0.0], [-1.0, 0.0]),
    "z": task_vector([0.0, -2.0, 0.0], [0.0, 5.0]),
}


def test_norms_by_hand():
    assert task_vector_norms(GEOMETRY) == pytest.approx({"sst2": 3.0, "trec": 5.0, "mnli": 3.0})


def test_norms_keep_expert_order():
    assert list(task_vector_norms(GEOMETRY)) == ["sst2", "trec", "mnli"]


def test_cosine_by_hand():
    # 14 / (3 * 5), -9 / (3 * 3), -14 / (5 * 3)
    expected = {
        ("sst2", "trec"): 14.0 / 15.0,
        ("sst2", "mnli"): -1.0,
        ("trec", "mnli"): -14.0 / 15.0,
    }
    assert pairwise_cosine(GEOMETRY) == pytest.approx(expected)


def test_cosine_pair_order():
    assert list(pairwise_cosine(GEOMETRY)) == [("sst2", "trec"), ("sst2", "mnli"), ("trec", "mnli")]


def test_cosine_zero_vector_is_nan():
    vectors = {"base": task_vector([0.0, 0.0], [0.0]), "sst2": GEOMETRY["sst2"]}
    assert math.isnan(pairwise_cosine(vectors)[("base", "sst2")])


def test_cosine_single_expert_empty():
    assert pairwise_cosine({"sst2": GEOMETRY["sst2"]}) == {}


def test_sign_conflict_by_hand():
    assert sign_conflict_fraction(SIGNS) == pytest.approx(0.2)


def test_sign_conflict_all_opposed():
    # sst2 and mnli are opposite in every coordinate: 3 of 3 conflict.
    vectors = {"sst2": GEOMETRY["sst2"], "mnli": GEOMETRY["mnli"]}
    assert sign_conflict_fraction(vectors) == 1.0


def test_sign_conflict_disjoint_support():
    # Each coordinate has only one nonzero expert, so nothing conflicts.
    vectors = {"x": task_vector([1.0, 0.0], [0.0]), "y": task_vector([0.0, -1.0], [-3.0])}
    assert sign_conflict_fraction(vectors) == 0.0


def test_sign_conflict_single_expert():
    assert sign_conflict_fraction({"x": SIGNS["x"]}) == 0.0


def test_sign_conflict_no_entries_is_nan():
    vectors = {"x": {"w": torch.zeros(0)}, "y": {"w": torch.zeros(0)}}
    assert math.isnan(sign_conflict_fraction(vectors))


def test_small_blocks_same_result(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    vectors = {
        name: {
            "w": torch.randn(7, 3, generator=generator),
            "b": torch.randn(5, generator=generator),
        }
        for name in ("a", "b", "c")
    }
    whole = interference_rows(vectors, seed=0, kind="full", step=1)
    monkeypatch.setattr(interference, "BLOCK_ENTRIES", 2)
    blocked = interference_rows(vectors, seed=0, kind="full", step=1)
    for whole_row, blocked_row in zip(whole, blocked):
        assert blocked_row == {**whole_row, "value": pytest.approx(whole_row["value"])}


def test_cosine_matches_torch_on_random():
    generator = torch.Generator().manual_seed(1)
    vectors = {
        name: {
            "w": torch.randn(4, 4, generator=generator),
            "b": torch.randn(4, generator=generator),
        }
        for name in ("a", "b")
    }
    flat = [torch.cat([vectors[n]["w"].reshape(-1), vectors[n]["b"]]) for n in ("a", "b")]
    expected = float(torch.nn.functional.cosine_similarity(flat[0], flat[1], dim=0))
    assert pairwise_cosine(vectors)[("a", "b")] == pytest.approx(expected, rel=1e-6)


def test_rows_schema_and_values():
    rows = interference_rows(GEOMETRY, seed=3, kind="lora", step=200)
    base = {"seed": 3, "kind": "lora", "step": 200}
    # mean_cosine = (14/15 - 1 - 14/15) / 3 = -1/3. Every coordinate of sst2 and mnli is
    # opposed, so sign_conflict is 3 / 3.
    expected = [
        {**base, "metric": "norm", "task_a": "sst2", "task_b": "", "value": 3.0},
        {**base, "metric": "norm", "task_a": "trec", "task_b": "", "value": 5.0},
        {**base, "metric": "norm", "task_a": "mnli", "task_b": "", "value": 3.0},
        {**base, "metric": "cosine", "task_a": "sst2", "task_b": "trec", "value": 14.0 / 15.0},
        {**base, "metric": "cosine", "task_a": "sst2", "task_b": "mnli", "value": -1.0},
        {**base, "metric": "cosine", "task_a": "trec", "task_b": "mnli", "value": -14.0 / 15.0},
        {**base, "metric": "mean_cosine", "task_a": "all", "task_b": "", "value": -1.0 / 3.0},
        {**base, "metric": "sign_conflict", "task_a": "all", "task_b": "", "value": 1.0},
    ]
    assert len(rows) == len(expected)
    for row, expected_row in zip(rows, expected):
        assert row == {**expected_row, "value": pytest.approx(expected_row["value"])}


def test_rows_columns():
    rows = interference_rows(SIGNS, seed=0, kind="full", step=0)
    for row in rows:
        assert list(row) == ["seed", "kind", "step", "metric", "task_a", "task_b", "value"]


def test_rows_single_expert_no_mean_cosine():
    rows = interference_rows({"x": SIGNS["x"]}, seed=0, kind="full", step=5)
    assert [row["metric"] for row in rows] == ["norm", "sign_conflict"]


def test_rows_bfloat16_input():
    vectors = {
        name: {key: tensor.to(torch.bfloat16) for key, tensor in vector.items()}
        for name, vector in GEOMETRY.items()
    }
    norms = [row["value"] for row in interference_rows(vectors, seed=0, kind="full", step=1)[:3]]
    assert norms == pytest.approx([3.0, 5.0, 3.0])


def test_error_unknown_kind():
    with pytest.raises(
        ConfigError, match=r"unknown task vector kind 'qlora'. Supported kinds: 'full', 'lora'"
    ):
        interference_rows(GEOMETRY, seed=0, kind="qlora", step=1)


def test_error_no_experts():
    with pytest.raises(MergeError, match=r"no task vectors given"):
        task_vector_norms({})


def test_error_key_mismatch():
    vectors = {"sst2": GEOMETRY["sst2"], "trec": {"w": torch.zeros(2)}}
    with pytest.raises(
        MergeError,
        match=r"expert 'trec' has other parameters than expert 'sst2': missing 1 \('b'\)",
    ):
        pairwise_cosine(vectors)


def test_error_shape_mismatch():
    vectors = {"sst2": GEOMETRY["sst2"], "trec": task_vector([0.0, 1.0, 2.0], [1.0])}
    with pytest.raises(
        MergeError,
        match=r"tensor 'w' has shape \(2,\) in expert 'sst2' but \(3,\) in expert 'trec'",
    ):
        sign_conflict_fraction(vectors)


def test_error_non_finite_named():
    vectors = {"sst2": GEOMETRY["sst2"], "trec": task_vector([float("nan"), 1.0], [1.0])}
    with pytest.raises(
        MergeError, match=r"tensor 'w' of expert\(s\) \['trec'\] contains NaN or inf"
    ):
        task_vector_norms(vectors)
