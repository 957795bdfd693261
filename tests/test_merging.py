import pytest
import torch
from peft.utils import merge_utils

from upcycle.errors import MergeError
from upcycle.merging import MERGE_METHODS, merge_task_vectors

# Three experts with one 5-entry parameter and no ties in magnitude within an expert.
A = {"w": torch.tensor([4.0, -1.0, 2.0, -3.0, 0.5])}
B = {"w": torch.tensor([-2.0, 3.0, -1.0, 5.0, 1.0])}
C = {"w": torch.tensor([1.0, -4.0, 6.0, -0.5, 1.5])}


def vectors(*entries):
    return [{"w": torch.tensor(values)} for values in entries]


def random_experts(count=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "layer.weight": torch.randn(8, 6, generator=generator),
            "layer.bias": torch.randn(8, generator=generator),
        }
        for _ in range(count)
    ]


def test_registry_lists_five_methods():
    assert list(MERGE_METHODS) == [
        "average",
        "task_arithmetic",
        "ties",
        "dare_task_arithmetic",
        "dare_ties",
    ]


@pytest.mark.parametrize("name", list(MERGE_METHODS))
def test_registry_peft_function_exists(name):
    assert callable(getattr(merge_utils, MERGE_METHODS[name].peft_function))


@pytest.mark.parametrize("name", list(MERGE_METHODS))
def test_registry_paper_has_arxiv_id(name):
    assert "arXiv:" in MERGE_METHODS[name].paper


def test_registry_flags():
    flags = {
        name: (method.uses_coefficient, method.uses_density, method.stochastic)
        for name, method in MERGE_METHODS.items()
    }
    assert flags == {
        "average": (False, False, False),
        "task_arithmetic": (True, False, False),
        "ties": (True, True, False),
        "dare_task_arithmetic": (True, True, True),
        "dare_ties": (True, True, True),
    }


def test_average_by_hand():
    # (A + B + C) / 3 = [3, -2, 7, 1.5, 3] / 3
    merged = merge_task_vectors([A, B, C], "average")
    expected = torch.tensor([1.0, -2.0 / 3.0, 7.0 / 3.0, 0.5, 1.0])
    torch.testing.assert_close(merged["w"], expected)


def test_task_arithmetic_by_hand():
    # 0.5 * (A + B + C) = 0.5 * [3, -2, 7, 1.5, 3]
    merged = merge_task_vectors([A, B, C], "task_arithmetic", coefficient=0.5)
    torch.testing.assert_close(merged["w"], torch.tensor([1.5, -1.0, 3.5, 0.75, 1.5]))


def test_ties_by_hand():
    # Trim to int(0.6 * 5) = 3 largest magnitudes per expert:
    #   A -> [4, 0, 2, -3, 0], B -> [-2, 3, 0, 5, 0], C -> [0, -4, 6, 0, 1.5].
    # Elect sign by total mass: sums [2, -1, 8, 2, 1.5] -> signs [+, -, +, +, +].
    # Disjoint mean of agreeing nonzeros: [4/1, -4/1, (2+6)/2, 5/1, 1.5/1] = [4, -4, 4, 5, 1.5].
    # Times coefficient 0.5.
    merged = merge_task_vectors([A, B, C], "ties", coefficient=0.5, density=0.6)
    torch.testing.assert_close(merged["w"], torch.tensor([2.0, -2.0, 2.0, 2.5, 0.75]))


def test_ties_full_density_by_hand():
    # No trimming. Sums [3, -2, 7, 1.5, 3] -> signs [+, -, +, +, +].
    # Disjoint mean: [(4+1)/2, (-1-4)/2, (2+6)/2, 5/1, (0.5+1+1.5)/3] = [2.5, -2.5, 4, 5, 1].
    merged = merge_task_vectors([A, B, C], "ties", coefficient=1.0, density=1.0)
    torch.testing.assert_close(merged["w"], torch.tensor([2.5, -2.5, 4.0, 5.0, 1.0]))


def test_ties_zero_sum_elects_positive():
    # At the first entry the total mass is 1 + (-1) = 0, and PEFT elects + for a zero sum,
    # so only the positive entry survives: mean 1. The second entry is 2 and 2: mean 2.
    merged = merge_task_vectors(vectors([1.0, 2.0], [-1.0, 2.0]), "ties", density=1.0)
    torch.testing.assert_close(merged["w"], torch.tensor([1.0, 2.0]))


def test_dare_ties_full_density_equals_ties():
    # Density 1 drops nothing, so DARE-TIES reduces to TIES: see test_ties_full_density_by_hand.
    merged = merge_task_vectors([A, B, C], "dare_ties", coefficient=1.0, density=1.0)
    torch.testing.assert_close(merged["w"], torch.tensor([2.5, -2.5, 4.0, 5.0, 1.0]))


def test_dare_full_density_equals_task_arithmetic():
    experts = random_experts()
    dare = merge_task_vectors(experts, "dare_task_arithmetic", coefficient=0.7, density=1.0)
    plain = merge_task_vectors(experts, "task_arithmetic", coefficient=0.7)
    for key in plain:
        assert torch.equal(dare[key], plain[key]), key


def test_dare_single_expert_drop_and_rescale():
    # One expert, density 0.5: every entry is either dropped (0) or rescaled by 1 / 0.5 = 2.
    expert = {"w": torch.arange(1.0, 201.0)}
    merged = merge_task_vectors([expert], "dare_task_arithmetic", density=0.5, seed=3)["w"]
    is_kept = merged != 0
    assert torch.equal(merged[is_kept], 2.0 * expert["w"][is_kept])
    assert 0 < int(is_kept.sum()) < 200


def test_dare_keeps_density_fraction():
    expert = {"w": torch.ones(20_000)}
    merged = merge_task_vectors([expert], "dare_task_arithmetic", density=0.3, seed=0)["w"]
    fraction = float((merged != 0).float().mean())
    # Binomial(20000, 0.3) has standard deviation 0.0032 in the fraction; 0.02 is over 6 of them.
    assert abs(fraction - 0.3) < 0.02


@pytest.mark.parametrize("method", ["dare_task_arithmetic", "dare_ties"])
def test_dare_same_seed_same_result(method):
    experts = random_experts()
    first = merge_task_vectors(experts, method, coefficient=0.5, density=0.4, seed=11)
    torch.manual_seed(999)  # the global RNG state must not matter
    second = merge_task_vectors(experts, method, coefficient=0.5, density=0.4, seed=11)
    for key in first:
        assert torch.equal(first[key], second[key]), key


@pytest.mark.parametrize("method", ["dare_task_arithmetic", "dare_ties"])
def test_dare_other_seed_differs(method):
    experts = random_experts()
    first = merge_task_vectors(experts, method, density=0.4, seed=11)
    second = merge_task_vectors(experts, method, density=0.4, seed=12)
    assert not torch.equal(first["layer.weight"], second["layer.weight"])


def test_dare_independent_of_key_order():
    experts = random_experts()
    reversed_experts = [dict(reversed(list(expert.items()))) for expert in experts]
    first = merge_task_vectors(experts, "dare_ties", density=0.4, seed=5)
    second = merge_task_vectors(reversed_experts, "dare_ties", density=0.4, seed=5)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_dare_leaves_global_rng_untouched():
    state = torch.get_rng_state()
    merge_task_vectors(random_experts(), "dare_task_arithmetic", density=0.4, seed=1)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_task_arithmetic", "dare_ties"])
def test_zero_coefficient_gives_zero(method):
    density = 1.0 if method == "task_arithmetic" else 0.5
    merged = merge_task_vectors(random_experts(), method, coefficient=0.0, density=density)
    for key, tensor in merged.items():
        assert torch.count_nonzero(tensor) == 0, key


def test_average_identical_experts():
    expert = random_experts(count=1)[0]
    merged = merge_task_vectors([expert, expert, expert], "average")
    for key in expert:
        torch.testing.assert_close(merged[key], expert[key])


def test_ties_density_fraction_of_nonzeros():
    # One expert agrees with its own elected sign, so the merge is its trimmed tensor:
    # int(0.2 * 1000) = 200 nonzeros.
    expert = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(0))}
    merged = merge_task_vectors([expert], "ties", density=0.2)
    assert torch.count_nonzero(merged["w"]) == 200


def test_ties_keeps_largest_magnitudes():
    expert = {"w": torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3])}
    merged = merge_task_vectors([expert], "ties", density=0.4)
    torch.testing.assert_close(merged["w"], torch.tensor([0.0, -5.0, 0.0, 3.0, 0.0]))


def test_output_keeps_first_expert_key_order():
    experts = random_experts()
    merged = merge_task_vectors(experts, "average")
    assert list(merged) == ["layer.weight", "layer.bias"]


def test_output_shapes_match_input():
    merged = merge_task_vectors(random_experts(), "ties", density=0.5)
    assert merged["layer.weight"].shape == (8, 6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dtype_kept(dtype):
    experts = [{key: t.to(dtype) for key, t in e.items()} for e in vectors([1.0, 2.0], [3.0, -4.0])]
    merged = merge_task_vectors(experts, "task_arithmetic", coefficient=0.5)
    assert merged["w"].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_values(dtype):
    # 0.5 * ([1, 2] + [3, -4]) = [2, -1], exact in both half formats.
    experts = [{key: t.to(dtype) for key, t in e.items()} for e in vectors([1.0, 2.0], [3.0, -4.0])]
    merged = merge_task_vectors(experts, "task_arithmetic", coefficient=0.5)
    assert torch.equal(merged["w"], torch.tensor([2.0, -1.0], dtype=dtype))


def test_mixed_dtypes_promote():
    experts = [{"w": torch.ones(2, dtype=torch.float16)}, {"w": torch.ones(2)}]
    merged = merge_task_vectors(experts, "average")
    assert merged["w"].dtype == torch.float32


def test_inputs_not_modified():
    experts = random_experts()
    copies = [{key: t.clone() for key, t in e.items()} for e in experts]
    merge_task_vectors(experts, "dare_ties", density=0.3, coefficient=0.5)
    for expert, copy in zip(experts, copies):
        for key in expert:
            assert torch.equal(expert[key], copy[key]), key


def test_error_no_experts():
    with pytest.raises(MergeError, match=r"no experts to merge: pass at least one task vector"):
        merge_task_vectors([], "average")


def test_error_unknown_method_lists_supported():
    with pytest.raises(
        MergeError,
        match=r"unknown merging method 'slerp'. Supported methods: 'average', "
        r"'task_arithmetic', 'ties', 'dare_task_arithmetic', 'dare_ties'",
    ):
        merge_task_vectors([A], "slerp")


def test_error_names_length():
    with pytest.raises(MergeError, match=r"got 2 experts but 1 names \['sst2'\]"):
        merge_task_vectors([A, B], "average", names=["sst2"])


def test_error_missing_keys_named():
    other = {"w": torch.zeros(5), "extra.bias": torch.zeros(2)}
    with pytest.raises(
        MergeError,
        match=r"expert 'trec' has other parameters than expert 'sst2': extra 1 \('extra.bias'\)",
    ):
        merge_task_vectors([A, other], "average", names=["sst2", "trec"])


def test_error_missing_and_extra_keys_listed():
    first = {f"p{i}": torch.zeros(1) for i in range(8)}
    second = {"q": torch.zeros(1)}
    with pytest.raises(
        MergeError,
        match=r"expert '1' has other parameters than expert '0': missing 8 \('p0', 'p1', 'p2', "
        r"'p3', 'p4' and 3 more\); extra 1 \('q'\)",
    ):
        merge_task_vectors([first, second], "average")


def test_error_shape_mismatch_named():
    other = {"w": torch.zeros(2, 3)}
    with pytest.raises(
        MergeError,
        match=r"tensor 'w' has shape \(5,\) in expert 'sst2' but \(2, 3\) in expert 'trec'",
    ):
        merge_task_vectors([A, other], "average", names=["sst2", "trec"])


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_error_density_out_of_range(density):
    with pytest.raises(MergeError, match=r"density must be in \(0, 1\], got"):
        merge_task_vectors([A, B], "ties", density=density)


@pytest.mark.parametrize("coefficient", [float("inf"), float("-inf"), float("nan")])
def test_error_coefficient_not_finite(coefficient):
    with pytest.raises(MergeError, match=r"scaling coefficient must be finite, got"):
        merge_task_vectors([A, B], "task_arithmetic", coefficient=coefficient)


def test_error_coefficient_for_average():
    with pytest.raises(
        MergeError, match=r"method 'average' has no scaling coefficient, got coefficient=0.5"
    ):
        merge_task_vectors([A, B], "average", coefficient=0.5)


def test_error_density_for_task_arithmetic():
    with pytest.raises(
        MergeError, match=r"method 'task_arithmetic' keeps every entry, got density=0.5"
    ):
        merge_task_vectors([A, B], "task_arithmetic", density=0.5)


def test_error_integer_tensor():
    other = {"w": torch.zeros(5, dtype=torch.int64)}
    with pytest.raises(
        MergeError, match=r"tensor 'w' of expert 'trec' has dtype torch.int64. Task vectors"
    ):
        merge_task_vectors([A, other], "average", names=["sst2", "trec"])


def test_error_non_finite_expert_named():
    broken = {"w": torch.tensor([1.0, float("nan"), 0.0, 0.0, 0.0])}
    with pytest.raises(
        MergeError,
        match=r"merged tensor 'w' contains NaN or inf because expert\(s\) 'trec' contain",
    ):
        merge_task_vectors([A, broken, C], "average", names=["sst2", "trec", "mnli"])


def test_error_overflow_without_bad_expert():
    # 60000 + 60000 = 120000 exceeds float16's maximum of 65504.
    experts = [{"w": torch.full((2,), 60000.0, dtype=torch.float16)} for _ in range(2)]
    with pytest.raises(
        MergeError,
        match=r"merged tensor 'w' contains NaN or inf although every expert's tensor is "
        r"finite, so the merge overflowed torch.float16",
    ):
        merge_task_vectors(experts, "task_arithmetic", coefficient=1.0)
