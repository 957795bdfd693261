"""LoRA task vectors and LoRA merging through PEFT, on a tiny BERT with real PEFT adapters."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from transformers import BertConfig, BertModel

from upcycle.errors import CheckpointError, MergeError
from upcycle.merging import merge_task_vectors
from upcycle.merging.lora import (
    COMBINATION_TYPES,
    DENSITY_COMBINATION_TYPES,
    PEFT_LORA_METHODS,
    AdapterInfo,
    adapter_info_from_metadata,
    check_adapters_compatible,
    lora_task_vector,
    merge_adapters_with_peft,
    peft_merged_task_vector,
    wrap_with_peft,
)

TARGETS = ("query", "value", "output.dense")
RANK = 4
ALPHA = 8.0


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return BertModel(config).eval()


def lora_config(rank: int = RANK, alpha: float = ALPHA, targets=TARGETS) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0)


def make_adapter(base: BertModel, config: LoraConfig, seed: int) -> dict[str, torch.Tensor]:
    """Return a PEFT adapter state dict whose A and B are random, so its update is nonzero."""
    peft_model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return {key: value.clone() for key, value in get_peft_model_state_dict(peft_model).items()}


@pytest.fixture(scope="module")
def base() -> BertModel:
    return tiny_bert()


@pytest.fixture(scope="module")
def adapters(base) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "topic": make_adapter(base, lora_config(), seed=1),
        "mood": make_adapter(base, lora_config(), seed=2),
    }


def peft_merged_weights(base: BertModel, config: LoraConfig, state) -> dict[str, torch.Tensor]:
    """Return the base weights with the adapter merged in by PEFT's own merge_and_unload."""
    peft_model = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    set_peft_model_state_dict(peft_model, state)
    return peft_model.merge_and_unload().state_dict()


def expected_weight_names() -> set[str]:
    names = set()
    for layer in range(2):
        prefix = f"encoder.layer.{layer}"
        names |= {
            f"{prefix}.attention.self.query.weight",
            f"{prefix}.attention.self.value.weight",
            f"{prefix}.attention.output.dense.weight",
            f"{prefix}.output.dense.weight",
        }
    return names


# --- lora_task_vector ------------------------------------------------------------------


def test_task_vector_keys_are_base_weight_names(base, adapters):
    vector = lora_task_vector(
        adapters["topic"], rank=RANK, alpha=ALPHA, base_keys=base.state_dict().keys()
    )
    assert set(vector) == expected_weight_names()


def test_task_vector_equals_peft_merge_and_unload(base, adapters):
    vector = lora_task_vector(adapters["topic"], rank=RANK, alpha=ALPHA)
    merged = peft_merged_weights(base, lora_config(), adapters["topic"])
    base_state = base.state_dict()
    for name, update in vector.items():
        torch.testing.assert_close(update, merged[name] - base_state[name], atol=1e-6, rtol=0)


def test_task_vector_hand_computed_value():
    state = {
        "base_model.model.layer.lora_A.weight": torch.tensor([[1.0, 2.0, 0.0]]),
        "base_model.model.layer.lora_B.weight": torch.tensor([[3.0], [-1.0]]),
    }
    vector = lora_task_vector(state, rank=1, alpha=2.0)
    # B @ A * (alpha / rank) = [[3, 6, 0], [-1, -2, 0]] * 2.
    expected = torch.tensor([[6.0, 12.0, 0.0], [-2.0, -4.0, 0.0]])
    assert torch.equal(vector["layer.weight"], expected)


def test_task_vector_scaling_override():
    state = {
        "layer.lora_A.weight": torch.tensor([[1.0, 1.0]]),
        "layer.lora_B.weight": torch.tensor([[1.0]]),
    }
    vector = lora_task_vector(state, rank=1, alpha=2.0, scaling=0.5)
    assert torch.equal(vector["layer.weight"], torch.tensor([[0.5, 0.5]]))


def test_task_vector_accepts_adapter_name_in_keys(adapters):
    renamed = {
        key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        ): value
        for key, value in adapters["topic"].items()
    }
    plain = lora_task_vector(adapters["topic"], rank=RANK, alpha=ALPHA)
    named = lora_task_vector(renamed, rank=RANK, alpha=ALPHA)
    assert named.keys() == plain.keys()
    for name in plain:
        assert torch.equal(named[name], plain[name])


def test_task_vector_embedding_equals_peft_merge(base):
    config = lora_config(targets=("word_embeddings",))
    state = make_adapter(base, config, seed=3)
    vector = lora_task_vector(state, rank=RANK, alpha=ALPHA)
    merged = peft_merged_weights(base, config, state)
    name = "embeddings.word_embeddings.weight"
    assert set(vector) == {name}
    torch.testing.assert_close(
        vector[name], merged[name] - base.state_dict()[name], atol=1e-6, rtol=0
    )


def test_task_vector_unknown_base_weight_raises(base, adapters):
    base_keys = set(base.state_dict()) - {"encoder.layer.1.output.dense.weight"}
    with pytest.raises(MergeError, match=r"encoder\.layer\.1\.output\.dense\.weight"):
        lora_task_vector(adapters["topic"], rank=RANK, alpha=ALPHA, base_keys=base_keys)


def test_task_vector_missing_factor_raises(adapters):
    state = {key: value for key, value in adapters["topic"].items() if "layer.0.output" not in key}
    state["base_model.model.encoder.layer.0.output.dense.lora_A.weight"] = torch.zeros(RANK, 32)
    with pytest.raises(
        CheckpointError, match=r"no lora_B for module 'encoder\.layer\.0\.output\.dense'"
    ):
        lora_task_vector(state, rank=RANK, alpha=ALPHA)


def test_task_vector_wrong_rank_raises(adapters):
    with pytest.raises(CheckpointError, match="LoRA rank 4 but rank=8"):
        lora_task_vector(adapters["topic"], rank=8, alpha=ALPHA)


def test_task_vector_non_lora_key_raises(adapters):
    state = dict(adapters["topic"])
    state["base_model.model.encoder.layer.0.output.dense.lora_magnitude_vector"] = torch.ones(16)
    with pytest.raises(CheckpointError, match="lora_magnitude_vector"):
        lora_task_vector(state, rank=RANK, alpha=ALPHA)


def test_task_vector_empty_state_raises():
    with pytest.raises(CheckpointError, match="empty"):
        lora_task_vector({}, rank=RANK, alpha=ALPHA)


# --- adapter metadata ------------------------------------------------------------------

METADATA = {
    "rank": "4",
    "alpha": "8.0",
    "target_modules": "value,query, output.dense",
    "base_model": "tiny-bert",
}


def test_adapter_info_from_metadata_parses_fields():
    info = adapter_info_from_metadata("topic", METADATA)
    assert info == AdapterInfo(
        name="topic",
        rank=4,
        alpha=8.0,
        target_modules=("output.dense", "query", "value"),
        base_model="tiny-bert",
    )


def test_adapter_info_missing_field_raises():
    metadata = {key: value for key, value in METADATA.items() if key != "alpha"}
    with pytest.raises(CheckpointError, match="adapter 'topic' has no alpha"):
        adapter_info_from_metadata("topic", metadata)


def test_adapter_info_invalid_rank_raises():
    with pytest.raises(CheckpointError, match="rank='four'"):
        adapter_info_from_metadata("topic", {**METADATA, "rank": "four"})


def test_compatible_adapters_pass():
    infos = [adapter_info_from_metadata(name, METADATA) for name in ("topic", "mood")]
    assert check_adapters_compatible(infos) is None


def test_different_alpha_is_compatible():
    infos = [
        adapter_info_from_metadata("topic", METADATA),
        adapter_info_from_metadata("mood", {**METADATA, "alpha": "16"}),
    ]
    assert check_adapters_compatible(infos) is None


@pytest.mark.parametrize(
    ("field", "value", "shown"),
    [
        ("rank", "8", "rank 8"),
        ("target_modules", "query,value", "target_modules query,value"),
        ("base_model", "other-bert", "base_model 'other-bert'"),
    ],
)
def test_incompatible_adapters_raise(field, value, shown):
    infos = [
        adapter_info_from_metadata("topic", METADATA),
        adapter_info_from_metadata("mood", {**METADATA, field: value}),
    ]
    with pytest.raises(MergeError, match=f"adapter 'mood' has {shown}"):
        check_adapters_compatible(infos)


def test_incompatible_adapters_report_every_difference():
    infos = [
        adapter_info_from_metadata("topic", METADATA),
        adapter_info_from_metadata("mood", {**METADATA, "rank": "8"}),
        adapter_info_from_metadata("news", {**METADATA, "base_model": "other-bert"}),
    ]
    with pytest.raises(MergeError) as raised:
        check_adapters_compatible(infos)
    assert "adapter 'mood' has rank 8" in str(raised.value)
    assert "adapter 'news' has base_model 'other-bert'" in str(raised.value)


def test_no_adapters_raise():
    with pytest.raises(MergeError, match="no adapters"):
        check_adapters_compatible([])


# --- merging through PEFT --------------------------------------------------------------


def test_registry_maps_to_combination_types():
    assert PEFT_LORA_METHODS["peft_linear"] == "linear"
    assert PEFT_LORA_METHODS["peft_ties"] == "ties"
    assert PEFT_LORA_METHODS["peft_dare_linear"] == "dare_linear"
    assert PEFT_LORA_METHODS["peft_dare_ties"] == "dare_ties"
    assert PEFT_LORA_METHODS["peft_svd"] == "svd"
    assert PEFT_LORA_METHODS["peft_ties_svd"] == "ties_svd"
    assert PEFT_LORA_METHODS["peft_dare_linear_svd"] == "dare_linear_svd"
    assert PEFT_LORA_METHODS["peft_dare_ties_svd"] == "dare_ties_svd"
    assert set(PEFT_LORA_METHODS.values()) <= set(COMBINATION_TYPES)


def test_linear_single_adapter_reproduces_update(base, adapters):
    merged = merge_adapters_with_peft(
        base, {"topic": adapters["topic"]}, lora_config(), combination_type="linear", weights=[1.0]
    )
    vector = peft_merged_task_vector(merged, base_keys=base.state_dict().keys())
    expected = lora_task_vector(adapters["topic"], rank=RANK, alpha=ALPHA)
    assert vector.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(vector[name], expected[name], atol=1e-6, rtol=1e-5)


def test_linear_single_adapter_scales_by_weight(base, adapters):
    merged = merge_adapters_with_peft(
        base, {"topic": adapters["topic"]}, lora_config(), combination_type="linear", weights=[0.5]
    )
    vector = peft_merged_task_vector(merged)
    expected = lora_task_vector(adapters["topic"], rank=RANK, alpha=ALPHA)
    for name in expected:
        torch.testing.assert_close(vector[name], 0.5 * expected[name], atol=1e-6, rtol=1e-5)


def test_merged_model_output_matches_task_vector(base, adapters):
    merged = merge_adapters_with_peft(
        base, {"topic": adapters["topic"]}, lora_config(), combination_type="linear", weights=[1.0]
    )
    edited = copy.deepcopy(base)
    with torch.no_grad():
        for name, update in lora_task_vector(adapters["topic"], rank=RANK, alpha=ALPHA).items():
            edited.get_parameter(name).add_(update)
    input_ids = torch.tensor([[2, 7, 9, 11, 3]])
    with torch.no_grad():
        expected = edited(input_ids=input_ids).last_hidden_state
        actual = merged(input_ids=input_ids).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_task_arithmetic_of_one_adapter_equals_peft_merge(base, adapters):
    vector = lora_task_vector(adapters["topic"], rank=RANK, alpha=ALPHA)
    merged = merge_task_vectors([vector], "task_arithmetic", coefficient=1.0, names=["topic"])
    weights = peft_merged_weights(base, lora_config(), adapters["topic"])
    base_state = base.state_dict()
    for name, update in merged.items():
        torch.testing.assert_close(update, weights[name] - base_state[name], atol=1e-6, rtol=0)


def test_task_arithmetic_equals_peft_cat(base, adapters):
    vectors = [lora_task_vector(adapters[name], rank=RANK, alpha=ALPHA) for name in adapters]
    expected = merge_task_vectors(vectors, "task_arithmetic", coefficient=0.5)
    merged = merge_adapters_with_peft(
        base, adapters, lora_config(), combination_type="cat", weights=[0.5, 0.5]
    )
    vector = peft_merged_task_vector(merged)
    assert vector.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(vector[name], expected[name], atol=1e-6, rtol=1e-5)


def test_cat_is_weighted_sum_of_updates(base, adapters):
    merged = merge_adapters_with_peft(
        base, adapters, lora_config(), combination_type="cat", weights=[0.3, 0.7]
    )
    vector = peft_merged_task_vector(merged)
    topic = lora_task_vector(adapters["topic"], rank=RANK, alpha=ALPHA)
    mood = lora_task_vector(adapters["mood"], rank=RANK, alpha=ALPHA)
    for name in topic:
        expected = 0.3 * topic[name] + 0.7 * mood[name]
        torch.testing.assert_close(vector[name], expected, atol=1e-6, rtol=1e-5)


def test_svd_two_adapters_finite_with_base_shapes(base, adapters):
    merged = merge_adapters_with_peft(
        base, adapters, lora_config(), combination_type="svd", weights=[1.0, 1.0]
    )
    vector = peft_merged_task_vector(merged)
    base_state = base.state_dict()
    assert set(vector) == expected_weight_names()
    for name, update in vector.items():
        assert update.shape == base_state[name].shape
        assert torch.isfinite(update).all()


def test_svd_full_rank_is_exact_sum(base, adapters):
    # The sum of two rank-4 updates has rank at most 8, so a rank-8 SVD loses nothing.
    merged = merge_adapters_with_peft(
        base, adapters, lora_config(), combination_type="svd", weights=[1.0, 1.0], svd_rank=8
    )
    vector = peft_merged_task_vector(merged)
    topic = lora_task_vector(adapters["topic"], rank=RANK, alpha=ALPHA)
    mood = lora_task_vector(adapters["mood"], rank=RANK, alpha=ALPHA)
    for name in topic:
        torch.testing.assert_close(vector[name], topic[name] + mood[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method", sorted(PEFT_LORA_METHODS))
def test_every_method_merges_two_adapters(base, adapters, method):
    combination_type = PEFT_LORA_METHODS[method]
    density = 0.5 if combination_type in DENSITY_COMBINATION_TYPES else None
    merged = merge_adapters_with_peft(
        base,
        adapters,
        lora_config(),
        combination_type=combination_type,
        weights=[0.5, 0.5],
        density=density,
    )
    vector = peft_merged_task_vector(merged)
    assert set(vector) == expected_weight_names()
    for name, update in vector.items():
        assert torch.isfinite(update).all(), name
    assert any(update.abs().sum() > 0 for update in vector.values())


def test_dare_is_reproducible_with_seed(base, adapters):
    options = {"combination_type": "dare_linear", "weights": [1.0, 1.0], "density": 0.5}
    first = peft_merged_task_vector(
        merge_adapters_with_peft(base, adapters, lora_config(), seed=3, **options)
    )
    second = peft_merged_task_vector(
        merge_adapters_with_peft(base, adapters, lora_config(), seed=3, **options)
    )
    other = peft_merged_task_vector(
        merge_adapters_with_peft(base, adapters, lora_config(), seed=4, **options)
    )
    name = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(first[name], second[name])
    assert not torch.equal(first[name], other[name])


def test_merge_keeps_caller_random_state(base, adapters):
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    merge_adapters_with_peft(
        base, adapters, lora_config(), combination_type="dare_ties", weights=[1, 1], density=0.5
    )
    assert torch.equal(torch.rand(3), expected)


def test_merge_leaves_base_model_unchanged(base, adapters):
    before = {name: value.clone() for name, value in base.state_dict().items()}
    merge_adapters_with_peft(
        base, adapters, lora_config(), combination_type="linear", weights=[1.0, 1.0]
    )
    assert base.state_dict().keys() == before.keys()
    for name, value in base.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_unknown_combination_type_raises(base, adapters):
    with pytest.raises(MergeError, match="unknown PEFT combination type 'mean'; supported: linear"):
        merge_adapters_with_peft(
            base, adapters, lora_config(), combination_type="mean", weights=[1.0, 1.0]
        )


def test_pruning_type_without_density_raises(base, adapters):
    with pytest.raises(MergeError, match="'ties' prunes and needs a density"):
        merge_adapters_with_peft(
            base, adapters, lora_config(), combination_type="ties", weights=[1.0, 1.0]
        )


def test_density_for_linear_raises(base, adapters):
    with pytest.raises(MergeError, match="density=0.5 would be ignored"):
        merge_adapters_with_peft(
            base, adapters, lora_config(), combination_type="linear", weights=[1, 1], density=0.5
        )


def test_weight_count_mismatch_raises(base, adapters):
    with pytest.raises(MergeError, match="got 1 weights for 2 adapters"):
        merge_adapters_with_peft(
            base, adapters, lora_config(), combination_type="linear", weights=[1.0]
        )


def test_adapter_with_other_rank_raises_naming_it(base, adapters):
    wide = make_adapter(base, lora_config(rank=8, alpha=16.0), seed=5)
    with pytest.raises(MergeError, match="adapter 'wide' does not fit"):
        merge_adapters_with_peft(
            base,
            {"topic": adapters["topic"], "wide": wide},
            lora_config(),
            combination_type="svd",
            weights=[1.0, 1.0],
        )


def test_adapter_with_fewer_targets_raises_naming_it(base, adapters):
    narrow = make_adapter(base, lora_config(targets=("query",)), seed=6)
    with pytest.raises(MergeError, match="adapter 'narrow' lacks weights"):
        merge_adapters_with_peft(
            base,
            {"topic": adapters["topic"], "narrow": narrow},
            lora_config(),
            combination_type="linear",
            weights=[1.0, 1.0],
        )


def test_adapter_with_extra_targets_raises_naming_it(base, adapters):
    broad = make_adapter(base, lora_config(targets=(*TARGETS, "key")), seed=7)
    with pytest.raises(MergeError, match="adapter 'broad' has weights for modules"):
        merge_adapters_with_peft(
            base,
            {"topic": adapters["topic"], "broad": broad},
            lora_config(),
            combination_type="linear",
            weights=[1.0, 1.0],
        )


def test_merged_vector_of_missing_adapter_raises(base, adapters):
    merged = merge_adapters_with_peft(
        base, {"topic": adapters["topic"]}, lora_config(), combination_type="linear", weights=[1]
    )
    with pytest.raises(MergeError, match="no LoRA layer of the model has adapter 'other'"):
        peft_merged_task_vector(merged, "other")


def test_wrap_with_peft_filters_one_warning(base):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = wrap_with_peft(copy.deepcopy(base), lora_config(), adapter_name="expert")
        warnings.warn("is_gradient_checkpointing elsewhere", FutureWarning, stacklevel=1)
    assert model.active_adapter == "expert"
    messages = [str(w.message) for w in caught]
    assert messages == ["is_gradient_checkpointing elsewhere"]
