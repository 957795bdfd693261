"""LoRA-to-MoE upcycling: routing, the load-balancing loss and router training on a tiny BERT."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from transformers import BertConfig, BertModel

from upcycle.errors import MergeError, TrainingError
from upcycle.moe import (
    LoraMoELinear,
    collect_router_statistics,
    load_balancing_loss,
    moe_layers,
    router_parameters,
    router_statistics,
    total_load_balancing_loss,
    train_router,
    upcycle_to_moe,
)

TARGETS = ("query", "value", "output.dense")
RANK = 4
ALPHA = 8.0
EXPERTS = ("topic", "mood", "news")


def tiny_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertModel(config).eval()


def lora_config(rank: int = RANK, targets=TARGETS) -> LoraConfig:
    return LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0.0)


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
    return {name: make_adapter(base, lora_config(), seed) for seed, name in enumerate(EXPERTS)}


def batch() -> dict[str, torch.Tensor]:
    input_ids = torch.tensor([[2, 7, 9, 11, 3, 0], [2, 5, 6, 3, 0, 0]])
    return {"input_ids": input_ids, "attention_mask": (input_ids != 0).long()}


def force_expert(model: nn.Module, expert: int) -> None:
    """Make every router pick `expert` for every token: zero weights, a large bias."""
    with torch.no_grad():
        for layer in moe_layers(model).values():
            layer.router.weight.zero_()
            layer.router.bias.fill_(-30.0)
            layer.router.bias[expert] = 30.0


def small_layer(*, top_k: int, num_experts: int = 3) -> LoraMoELinear:
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lora_A = torch.randn(num_experts, 2, 6)
    lora_B = torch.randn(num_experts, 5, 2)
    return LoraMoELinear(
        base, lora_A, lora_B, [0.5] * num_experts, top_k=top_k, router_init="normal"
    )


# --- LoraMoELinear ---------------------------------------------------------------------


def test_top_k_gates_have_k_nonzeros_per_token():
    layer = small_layer(top_k=2)
    routing = layer.route(torch.randn(10, 6))
    nonzero = (routing.gates != 0).sum(dim=-1)
    assert torch.equal(nonzero, torch.full((10,), 2))


def test_top_k_gates_sum_to_one():
    layer = small_layer(top_k=2)
    routing = layer.route(torch.randn(10, 6))
    torch.testing.assert_close(routing.gates.sum(dim=-1), torch.ones(10))


def test_gates_are_nonzero_at_selected_experts():
    layer = small_layer(top_k=2)
    routing = layer.route(torch.randn(10, 6))
    assert (routing.gates.gather(1, routing.selected_experts) > 0).all()


def test_gates_without_renormalization_are_probabilities():
    layer = small_layer(top_k=1)
    layer.renormalize = False
    tokens = torch.randn(10, 6)
    routing = layer.route(tokens)
    expected = F.softmax(layer.router(tokens), dim=-1).max(dim=-1).values
    torch.testing.assert_close(routing.gates.sum(dim=-1), expected)


def test_forward_equals_per_expert_sum():
    layer = small_layer(top_k=2)
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        output = layer(x)
        gates = layer.last_routing.gates.reshape(2, 4, 3)
        expected = layer.base(x)
        for expert in range(3):
            update = x @ layer.lora_A[expert].T @ layer.lora_B[expert].T * 0.5
            expected = expected + gates[..., expert : expert + 1] * update
    torch.testing.assert_close(output, expected)


def test_forward_records_routing_shapes():
    layer = small_layer(top_k=2)
    layer(torch.randn(2, 4, 6))
    assert layer.last_routing.router_logits.shape == (8, 3)
    assert layer.last_routing.selected_experts.shape == (8, 2)


def test_zero_router_init_gives_uniform_probabilities():
    layer = LoraMoELinear(
        nn.Linear(6, 5), torch.randn(3, 2, 6), torch.randn(3, 5, 2), [1.0] * 3, top_k=3
    )
    routing = layer.route(torch.randn(4, 6))
    torch.testing.assert_close(routing.gates, torch.full((4, 3), 1 / 3))


def test_base_and_experts_frozen_router_trainable():
    layer = small_layer(top_k=2)
    assert not layer.base.weight.requires_grad
    assert not layer.lora_A.requires_grad
    assert not layer.lora_B.requires_grad
    assert layer.router.weight.requires_grad


@pytest.mark.parametrize("top_k", [0, 4])
def test_invalid_top_k_raises_naming_value(top_k):
    with pytest.raises(MergeError, match=f"encoder.query: top_k={top_k} is invalid for 3 experts"):
        LoraMoELinear(
            nn.Linear(6, 5),
            torch.randn(3, 2, 6),
            torch.randn(3, 5, 2),
            [1.0] * 3,
            top_k=top_k,
            name="encoder.query",
        )


def test_mismatched_factor_shapes_raise():
    with pytest.raises(MergeError, match=r"do not fit a linear layer 6 -> 5"):
        LoraMoELinear(
            nn.Linear(6, 5), torch.randn(3, 2, 7), torch.randn(3, 5, 2), [1.0] * 3, top_k=1
        )


def test_unknown_router_init_raises():
    with pytest.raises(MergeError, match="unknown router_init 'ones'; supported: zeros, normal"):
        LoraMoELinear(
            nn.Linear(6, 5),
            torch.randn(3, 2, 6),
            torch.randn(3, 5, 2),
            [1.0] * 3,
            top_k=1,
            router_init="ones",
        )


# --- load-balancing loss and statistics ------------------------------------------------


def test_balancing_loss_is_one_for_uniform_routing():
    logits = torch.zeros(6, 3)
    selected = torch.tensor([[0], [1], [2], [0], [1], [2]])
    loss = load_balancing_loss(logits, selected, 3)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_balancing_loss_is_one_for_uniform_top_2():
    logits = torch.zeros(3, 3)
    selected = torch.tensor([[0, 1], [1, 2], [2, 0]])
    assert load_balancing_loss(logits, selected, 3).item() == pytest.approx(1.0, abs=1e-6)


def test_balancing_loss_hand_computed_for_skewed_routing():
    logits = torch.tensor([[1.0, 0.0]] * 4)
    selected = torch.zeros(4, 1, dtype=torch.long)
    probability = torch.softmax(torch.tensor([1.0, 0.0]), dim=0)[0].item()
    # Every token goes to expert 0: f = (1, 0), P_0 = sigmoid(1), loss = 2 * P_0.
    assert load_balancing_loss(logits, selected, 2).item() == pytest.approx(2 * probability)


def test_balancing_loss_larger_for_skewed_routing():
    uniform = load_balancing_loss(torch.zeros(4, 2), torch.tensor([[0], [1], [0], [1]]), 2)
    skewed = load_balancing_loss(torch.tensor([[2.0, 0.0]] * 4), torch.zeros(4, 1).long(), 2)
    assert skewed.item() > uniform.item()


def test_balancing_loss_ignores_masked_tokens():
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    selected = torch.tensor([[0], [0], [1], [1]])
    mask = torch.tensor([1, 1, 0, 0])
    probability = torch.softmax(torch.tensor([1.0, 0.0]), dim=0)[0].item()
    # Only the first two tokens count: f = (1, 0), P_0 = sigmoid(1), loss = 2 * P_0.
    loss = load_balancing_loss(logits, selected, 2, mask)
    assert loss.item() == pytest.approx(2 * probability)


def test_balancing_loss_all_masked_raises():
    with pytest.raises(MergeError, match="keeps no token"):
        load_balancing_loss(torch.zeros(2, 2), torch.zeros(2, 1).long(), 2, torch.zeros(2))


def test_balancing_loss_mask_size_mismatch_raises():
    with pytest.raises(MergeError, match="token_mask has 3 entries but routing covers 2 tokens"):
        load_balancing_loss(torch.zeros(2, 2), torch.zeros(2, 1).long(), 2, torch.ones(3))


def test_router_statistics_fractions():
    selected = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 1]])
    mask = torch.tensor([True, True, True, False])
    fractions = router_statistics(selected, 3, mask)
    torch.testing.assert_close(fractions, torch.tensor([1.0, 2 / 3, 1 / 3]))


# --- upcycling a tiny BERT -------------------------------------------------------------


@pytest.mark.parametrize("expert", [0, 2])
def test_forced_expert_equals_peft_adapter(base, adapters, expert):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA, top_k=1).eval()
    force_expert(model, expert)
    peft_model = get_peft_model(copy.deepcopy(base), lora_config()).eval()
    set_peft_model_state_dict(peft_model, adapters[EXPERTS[expert]])
    inputs = batch()
    with torch.no_grad():
        actual = model(**inputs).last_hidden_state
        expected = peft_model(**inputs).last_hidden_state
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_forced_expert_differs_from_other_expert(base, adapters):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA, top_k=1).eval()
    peft_model = get_peft_model(copy.deepcopy(base), lora_config()).eval()
    set_peft_model_state_dict(peft_model, adapters[EXPERTS[1]])
    force_expert(model, 0)
    inputs = batch()
    with torch.no_grad():
        actual = model(**inputs).last_hidden_state
        other = peft_model(**inputs).last_hidden_state
    assert (actual - other).abs().max() > 1e-3


def test_upcycle_replaces_every_targeted_linear(base, adapters):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA)
    layers = moe_layers(model)
    assert len(layers) == 8
    assert "encoder.layer.1.attention.self.query" in layers
    assert "encoder.layer.0.attention.self.key" not in layers
    assert layers["encoder.layer.0.output.dense"].expert_names == EXPERTS


def test_upcycle_leaves_model_unchanged(base, adapters):
    upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA)
    assert moe_layers(base) == {}
    assert isinstance(base.encoder.layer[0].attention.self.query, nn.Linear)


def test_upcycle_freezes_all_but_routers(base, adapters):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA)
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    routers = {name for name in trainable if ".router." in name}
    assert trainable == routers
    assert len(routers) == 16


def test_upcycle_train_experts_makes_factors_trainable(base, adapters):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA, train_experts=True)
    layer = moe_layers(model)["encoder.layer.0.attention.self.value"]
    assert layer.lora_A.requires_grad
    assert layer.lora_B.requires_grad


def test_modules_restricts_routed_layers(base, adapters):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA, modules=["query"])
    assert sorted(moe_layers(model)) == [
        "encoder.layer.0.attention.self.query",
        "encoder.layer.1.attention.self.query",
    ]


def test_modules_full_name_selects_one_layer(base, adapters):
    name = "encoder.layer.1.output.dense"
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA, modules=[name])
    assert list(moe_layers(model)) == [name]


def test_untargeted_module_raises_naming_it(base, adapters):
    with pytest.raises(MergeError, match="no adapter targets module 'key'"):
        upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA, modules=["query", "key"])


def test_top_k_above_experts_raises_naming_value(base, adapters):
    with pytest.raises(MergeError, match="top_k=4 is invalid for 3 experts"):
        upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA, top_k=4)


def test_adapter_with_other_targets_raises_naming_it(base, adapters):
    narrow = make_adapter(base, lora_config(targets=("query",)), seed=9)
    mixed = {"topic": adapters["topic"], "narrow": narrow}
    with pytest.raises(MergeError, match="adapter 'narrow' targets other layers"):
        upcycle_to_moe(base, mixed, rank=RANK, alpha=ALPHA)


def test_adapter_with_other_rank_raises_naming_it(base, adapters):
    wide = make_adapter(base, lora_config(rank=8), seed=9)
    mixed = {"topic": adapters["topic"], "wide": wide}
    with pytest.raises(MergeError, match="adapter 'wide' has rank 8"):
        upcycle_to_moe(base, mixed, rank=RANK, alpha=ALPHA)


def test_adapter_for_other_model_raises(base, adapters):
    with pytest.raises(MergeError, match="which Linear lacks"):
        upcycle_to_moe(nn.Linear(16, 16), adapters, rank=RANK, alpha=ALPHA)


def test_total_loss_before_forward_raises(base, adapters):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA)
    with pytest.raises(MergeError, match="has not run a forward pass"):
        total_load_balancing_loss(model)


def test_total_loss_uniform_at_zero_init(base, adapters):
    # Zero routers give uniform probabilities, so every layer's loss is 1.
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA, top_k=3)
    inputs = batch()
    model(**inputs)
    loss = total_load_balancing_loss(model, inputs["attention_mask"].reshape(-1))
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_collected_statistics_follow_forced_expert(base, adapters):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA, top_k=1)
    force_expert(model, 1)
    inputs = batch()
    model(**inputs)
    statistics = collect_router_statistics(model, inputs["attention_mask"].reshape(-1))
    assert len(statistics) == 8
    for fractions in statistics.values():
        assert torch.equal(fractions, torch.tensor([0.0, 1.0, 0.0]))


# --- router training -------------------------------------------------------------------


def classification_loss(head: nn.Linear):
    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return F.cross_entropy(head(outputs.last_hidden_state[:, 0]), batch["labels"])

    return loss_fn


def router_batches() -> list[dict]:
    first = {**batch(), "labels": torch.tensor([0, 1])}
    second = {**batch(), "labels": torch.tensor([1, 0])}
    return [first, second]


@pytest.fixture(scope="module")
def head() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(16, 2)


def test_train_router_changes_only_routers(base, adapters, head):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA, top_k=2)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    losses = train_router(
        model, router_batches(), loss_fn=classification_loss(head), steps=3, learning_rate=0.05
    )
    assert len(losses) == 3
    changed = {
        name for name, value in model.state_dict().items() if not torch.equal(value, before[name])
    }
    assert changed
    assert all(".router." in name for name in changed)


def test_train_router_changes_router_weights(base, adapters, head):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA, top_k=2)
    train_router(model, router_batches(), loss_fn=classification_loss(head), steps=3)
    weights = [parameter for parameter in router_parameters(model) if parameter.dim() == 2]
    assert all(weight.abs().sum() > 0 for weight in weights)


def test_train_router_is_deterministic(base, adapters, head):
    runs = []
    for _ in range(2):
        model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA, router_init="normal")
        runs.append(
            train_router(model, router_batches(), loss_fn=classification_loss(head), steps=2)
        )
    assert runs[0] == runs[1]


def test_train_router_restores_eval_mode(base, adapters, head):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA).eval()
    train_router(model, router_batches(), loss_fn=classification_loss(head), steps=1)
    assert not model.training


def test_train_router_without_attention_mask_raises(base, adapters, head):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA)
    batches = [{"input_ids": batch()["input_ids"], "labels": torch.tensor([0, 1])}]
    with pytest.raises(TrainingError, match="has no 'attention_mask'"):
        train_router(model, batches, loss_fn=classification_loss(head), steps=1)


def test_train_router_exhausted_generator_raises(base, adapters, head):
    model = upcycle_to_moe(base, adapters, rank=RANK, alpha=ALPHA)
    batches = (item for item in router_batches())
    with pytest.raises(TrainingError, match="yielded nothing when restarted"):
        train_router(model, batches, loss_fn=classification_loss(head), steps=3)
