"""The difficulty recorder: closed-form head gradients, statistics and resuming."""

from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from upcycle.analysis.difficulty import AnalysisError
from upcycle.errors import CheckpointError
from upcycle.models.encoder import LabelEmbeddingHead, LinearHead
from upcycle.training.recorder import EXAMPLE_COLUMNS, Recorder, last_layer_grad_norms

NAN = math.nan


def autograd_head_norms(features, labels, weight, bias, logit_scale):
    """Per-example Frobenius norm of d(cross-entropy)/d(weight, bias), one backward each."""
    norms = []
    for row in range(len(labels)):
        weight_leaf = weight.detach().clone().requires_grad_(True)
        leaves = [weight_leaf]
        logits = logit_scale * features[row : row + 1] @ weight_leaf.T
        if bias is not None:
            bias_leaf = bias.detach().clone().requires_grad_(True)
            leaves.append(bias_leaf)
            logits = logits + bias_leaf
        loss = F.cross_entropy(logits, labels[row : row + 1])
        gradients = torch.autograd.grad(loss, leaves)
        norms.append(torch.sqrt(sum(g.pow(2).sum() for g in gradients)))
    return torch.stack(norms)


def random_batch(batch_size=6, hidden_size=5, num_classes=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(batch_size, hidden_size, generator=generator)
    weight = torch.randn(num_classes, hidden_size, generator=generator)
    bias = torch.randn(num_classes, generator=generator)
    labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
    return features, weight, bias, labels


@pytest.mark.parametrize(
    ("has_bias", "logit_scale"), [(True, 1.0), (False, 1.0), (True, 2.5), (False, 0.3)]
)
def test_head_norm_matches_autograd(has_bias, logit_scale):
    features, weight, bias, labels = random_batch()
    bias = bias if has_bias else None
    logits = logit_scale * features @ weight.T + (bias if has_bias else 0)
    expected = autograd_head_norms(features, labels, weight, bias, logit_scale)
    result = last_layer_grad_norms(
        logits, labels, features, logit_scale=logit_scale, has_bias=has_bias
    )
    assert torch.allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_linear_head_norm_matches_autograd():
    torch.manual_seed(0)
    head = LinearHead(hidden_size=5, num_classes=3)
    features = torch.randn(4, 5)
    labels = torch.tensor([0, 2, 1, 2])
    logits = head(features)
    loss_terms = F.cross_entropy(logits, labels, reduction="none")
    expected = []
    for row in range(4):
        gradients = torch.autograd.grad(loss_terms[row], list(head.parameters()), retain_graph=True)
        expected.append(torch.sqrt(sum(g.pow(2).sum() for g in gradients)))
    recorder = Recorder(4)
    recorder.observe(
        1,
        torch.arange(4),
        logits.detach(),
        labels,
        last_layer_input=features,
        logit_scale=head.logit_scale,
        last_layer_has_bias=head.has_bias,
    )
    result = recorder.example_frame(final_step=1)["last_grad_norm"].to_numpy()
    assert np.allclose(result, torch.stack(expected).numpy(), rtol=1e-5)


def test_label_embedding_head_norm_matches_autograd():
    # The frozen head normalises its input: the gradient is taken at the normalised x.
    torch.manual_seed(1)
    head = LabelEmbeddingHead(torch.randn(3, 8), logit_scale=20.0)
    pooled = torch.randn(5, 8) * 3
    labels = torch.tensor([0, 1, 2, 2, 0])
    features = head.features(pooled)
    logits = head(features)
    expected = autograd_head_norms(features, labels, head.class_embeddings, None, 20.0)
    recorder = Recorder(5)
    recorder.observe(
        1,
        torch.arange(5),
        logits,
        labels,
        last_layer_input=features,
        logit_scale=head.logit_scale,
        last_layer_has_bias=head.has_bias,
    )
    result = torch.tensor(recorder.example_frame(final_step=1)["last_grad_norm"].to_numpy())
    assert torch.allclose(result.float(), expected, rtol=1e-5, atol=1e-6)


# A hand-made fine-tune of 4 examples, 2 classes, with features chosen per visit.
# Two-class margins m give loss log(1 + exp(-m)) and ||p - y|| = sqrt(2) * sigmoid(-m).
BATCHES = [
    # step, indices, labels, logits, features
    (1, [0, 1], [0, 1], [[2.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]]),
    (2, [2, 0], [1, 0], [[0.0, 3.0], [0.0, 1.0]], [[3.0, 4.0], [1.0, 1.0]]),
    (3, [1, 0], [1, 0], [[0.0, 2.0], [4.0, 0.0]], [[0.0, 1.0], [2.0, 0.0]]),
]
LOGIT_SCALE = 2.0


def observe_batches(recorder, batches):
    for step, indices, labels, logits, features in batches:
        recorder.observe(
            step,
            torch.tensor(indices),
            torch.tensor(logits),
            torch.tensor(labels),
            last_layer_input=torch.tensor(features),
            logit_scale=LOGIT_SCALE,
            last_layer_has_bias=True,
        )


def hand_loss(margin):
    return math.log1p(math.exp(-margin))


def hand_norm(margin, feature):
    error_norm = math.sqrt(2) / (1 + math.exp(margin))
    return error_norm * math.sqrt(LOGIT_SCALE**2 * float(np.dot(feature, feature)) + 1)


def test_checkpoint_stats_hand_batches():
    recorder = Recorder(4)
    observe_batches(recorder, BATCHES[:2])
    stats = recorder.checkpoint_stats(2)
    # Example 0 was right (margin 2), then wrong (-1). Example 1 was wrong (-1), 2 right (3).
    assert stats["train_loss"] == pytest.approx(
        (hand_loss(2) + hand_loss(-1) + hand_loss(3) + hand_loss(-1)) / 4
    )
    assert stats["learned_fraction"] == 0.25
    assert stats["forgetting_events"] == 1
    latest = [hand_norm(-1, [1, 1]), hand_norm(-1, [0, 2]), hand_norm(3, [3, 4])]
    # With three examples, every top set is the single largest norm.
    for key in ("grad_concentration_top1", "grad_concentration_top5", "grad_concentration_top10"):
        assert stats[key] == pytest.approx(max(latest) / sum(latest), rel=1e-5)


def test_checkpoint_stats_loss_since_previous():
    recorder = Recorder(4)
    observe_batches(recorder, BATCHES[:2])
    recorder.checkpoint_stats(2)
    observe_batches(recorder, BATCHES[2:])
    stats = recorder.checkpoint_stats(3)
    assert stats["train_loss"] == pytest.approx((hand_loss(2) + hand_loss(4)) / 2)
    assert stats["learned_fraction"] == 0.75
    assert stats["forgetting_events"] == 1


def test_checkpoint_stats_without_visits():
    stats = Recorder(3).checkpoint_stats(1)
    assert math.isnan(stats["train_loss"])
    assert stats["learned_fraction"] == 0.0
    assert math.isnan(stats["grad_concentration_top5"])


def test_checkpoint_stats_without_features():
    recorder = Recorder(2)
    recorder.observe(
        1, torch.tensor([0, 1]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])
    )
    stats = recorder.checkpoint_stats(1)
    assert stats["learned_fraction"] == 1.0
    assert math.isnan(stats["grad_concentration_top1"])


def test_checkpoint_steps_must_increase():
    recorder = Recorder(4)
    observe_batches(recorder, BATCHES[:2])
    recorder.checkpoint_stats(2)
    with pytest.raises(AnalysisError, match="must increase"):
        recorder.checkpoint_stats(2)


def expected_frame_final() -> pd.DataFrame:
    norms_0 = [hand_norm(2, [1, 0]), hand_norm(-1, [1, 1]), hand_norm(4, [2, 0])]
    norms_1 = [hand_norm(-1, [0, 2]), hand_norm(2, [0, 1])]
    return pd.DataFrame(
        {
            "index": [0, 1, 2, 3],
            "learned_step": [3.0, 3.0, 2.0, NAN],
            "first_correct_step": [1.0, 3.0, 2.0, NAN],
            "forgetting_events": [1, 0, 0, 0],
            "times_seen": [3, 2, 1, 0],
            "final_loss": [hand_loss(4), hand_loss(2), hand_loss(3), NAN],
            "final_margin": [4.0, 2.0, 3.0, NAN],
            "final_correct": [True, True, True, False],
            "mean_grad_norm": [np.mean(norms_0), np.mean(norms_1), hand_norm(3, [3, 4]), NAN],
            "last_grad_norm": [norms_0[-1], norms_1[-1], hand_norm(3, [3, 4]), NAN],
        }
    )


def test_example_frame_hand_batches():
    recorder = Recorder(4)
    observe_batches(recorder, BATCHES)
    frame = recorder.example_frame(final_step=3)
    assert list(frame.columns) == list(EXAMPLE_COLUMNS)
    pd.testing.assert_frame_equal(frame, expected_frame_final(), check_dtype=False, rtol=1e-5)


def test_example_frame_dtypes():
    recorder = Recorder(4)
    observe_batches(recorder, BATCHES)
    frame = recorder.example_frame(final_step=3)
    assert frame["times_seen"].dtype == np.int64
    assert frame["forgetting_events"].dtype == np.int64
    assert frame["final_correct"].dtype == bool


def test_example_frame_earlier_step():
    recorder = Recorder(4)
    observe_batches(recorder, BATCHES)
    frame = recorder.example_frame(final_step=2)
    # At step 2, example 0 was last wrong and example 1 had one wrong visit.
    np.testing.assert_array_equal(frame["learned_step"], [NAN, NAN, 2.0, NAN])
    np.testing.assert_array_equal(frame["times_seen"], [2, 1, 1, 0])
    np.testing.assert_array_equal(frame["final_margin"], [-1.0, -1.0, 3.0, NAN])


def test_flush_every_batch_same_frame():
    batched = Recorder(4, flush_every=1)
    unflushed = Recorder(4)
    observe_batches(batched, BATCHES)
    observe_batches(unflushed, BATCHES)
    pd.testing.assert_frame_equal(
        batched.example_frame(final_step=3), unflushed.example_frame(final_step=3)
    )


def test_state_dict_round_trip():
    uninterrupted = Recorder(4)
    observe_batches(uninterrupted, BATCHES[:2])
    first_stats = uninterrupted.checkpoint_stats(2)

    buffer = io.BytesIO()
    torch.save(uninterrupted.state_dict(), buffer)
    buffer.seek(0)
    resumed = Recorder(4)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))

    observe_batches(uninterrupted, BATCHES[2:])
    observe_batches(resumed, BATCHES[2:])
    assert resumed.checkpoint_stats(3) == uninterrupted.checkpoint_stats(3)
    pd.testing.assert_frame_equal(
        resumed.example_frame(final_step=3), uninterrupted.example_frame(final_step=3)
    )
    assert first_stats["forgetting_events"] == 1


def test_state_dict_keeps_checkpoint_step():
    recorder = Recorder(4)
    observe_batches(recorder, BATCHES[:2])
    recorder.checkpoint_stats(2)
    resumed = Recorder(4)
    resumed.load_state_dict(recorder.state_dict())
    with pytest.raises(AnalysisError, match="must increase"):
        resumed.checkpoint_stats(2)


def test_load_state_dict_other_task():
    recorder = Recorder(4)
    observe_batches(recorder, BATCHES)
    with pytest.raises(CheckpointError, match="4 training examples"):
        Recorder(5).load_state_dict(recorder.state_dict())


def test_load_state_dict_missing_entry():
    state = Recorder(4).state_dict()
    del state["values"]
    with pytest.raises(CheckpointError, match="values"):
        Recorder(4).load_state_dict(state)


def test_observe_index_out_of_range():
    recorder = Recorder(2)
    recorder.observe(1, torch.tensor([0, 2]), torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(AnalysisError, match=r"\[2\] at steps \[1\]"):
        recorder.checkpoint_stats(1)


def test_observe_shape_mismatch():
    with pytest.raises(AnalysisError, match="labels must have shape"):
        Recorder(3).observe(1, torch.tensor([0, 1]), torch.zeros(2, 3), torch.tensor([0, 1, 2]))


def test_observe_feature_shape_mismatch():
    with pytest.raises(AnalysisError, match="last_layer_input"):
        Recorder(3).observe(
            1,
            torch.tensor([0, 1]),
            torch.zeros(2, 3),
            torch.tensor([0, 1]),
            last_layer_input=torch.zeros(3, 4),
        )


def test_observe_bfloat16_logits():
    recorder = Recorder(2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.bfloat16)
    recorder.observe(1, torch.tensor([0, 1]), logits, torch.tensor([0, 1]))
    frame = recorder.example_frame(final_step=1)
    np.testing.assert_allclose(frame["final_loss"], [hand_loss(2), hand_loss(1)], rtol=1e-5)
