"""Per-example full-model gradient norms against one backward pass per example."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from upcycle.analysis.difficulty import AnalysisError
from upcycle.analysis.gradients import per_example_grad_norms
from upcycle.models.encoder import Classifier, LinearHead

# On CPU, PyTorch has no vmap batching rule for its flash attention kernel and warns.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")

NUM_CLASSES = 3


def tiny_bert(dropout: float = 0.0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return BertModel(config)


class TinyClassifier(nn.Module):
    """BERT, mean pooling and a linear head, whose `forward` returns logits [B, C]."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((hidden * mask).sum(1) / mask.sum(1))


def padded_batch():
    """Five right-padded examples of lengths 7, 5, 7, 3 and 5."""
    generator = torch.Generator().manual_seed(1)
    lengths = [7, 5, 7, 3, 5]
    input_ids = torch.randint(5, 100, (5, 7), generator=generator)
    attention_mask = torch.zeros(5, 7, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        input_ids[row, length:] = 0
    labels = torch.tensor([0, 1, 2, 1, 0])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def logits_of(outputs):
    return outputs[0] if isinstance(outputs, tuple) else outputs


def loop_norms(model: nn.Module, batch) -> torch.Tensor:
    """One padded backward pass per example, in eval mode, over requires_grad parameters."""
    model = copy.deepcopy(model).eval()
    norms = []
    for row in range(len(batch["labels"])):
        model.zero_grad()
        outputs = model(
            input_ids=batch["input_ids"][row : row + 1],
            attention_mask=batch["attention_mask"][row : row + 1],
        )
        F.cross_entropy(logits_of(outputs), batch["labels"][row : row + 1]).backward()
        squares = [p.grad.pow(2).sum() for p in model.parameters() if p.grad is not None]
        norms.append(torch.sqrt(sum(squares)))
    return torch.stack(norms)


def test_full_model_matches_loop():
    model = TinyClassifier(tiny_bert())
    batch = padded_batch()
    result = per_example_grad_norms(model, batch, chunk_size=2)
    assert torch.allclose(result, loop_norms(model, batch), rtol=1e-4, atol=1e-6)


def test_chunk_size_does_not_change_norms():
    model = TinyClassifier(tiny_bert())
    batch = padded_batch()
    single = per_example_grad_norms(model, batch, chunk_size=1)
    many = per_example_grad_norms(model, batch, chunk_size=8)
    assert torch.allclose(single, many, rtol=1e-5, atol=1e-7)


def test_frozen_parameters_excluded():
    model = TinyClassifier(tiny_bert())
    for parameter in model.encoder.embeddings.parameters():
        parameter.requires_grad_(False)
    for parameter in model.encoder.encoder.layer[0].parameters():
        parameter.requires_grad_(False)
    batch = padded_batch()
    result = per_example_grad_norms(model, batch)
    assert torch.allclose(result, loop_norms(model, batch), rtol=1e-4, atol=1e-6)


def test_frozen_norms_smaller_than_full():
    model = TinyClassifier(tiny_bert())
    batch = padded_batch()
    full = per_example_grad_norms(model, batch)
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(False)
    head_only = per_example_grad_norms(model, batch)
    assert (head_only < full).all()


def test_all_parameters_include_frozen():
    model = TinyClassifier(tiny_bert())
    reference = loop_norms(model, padded_batch())
    for parameter in model.encoder.parameters():
        parameter.requires_grad_(False)
    result = per_example_grad_norms(model, padded_batch(), parameters="all")
    assert torch.allclose(result, reference, rtol=1e-4, atol=1e-6)


def test_dropout_off_and_modes_restored():
    model = TinyClassifier(tiny_bert(dropout=0.5))
    model.train()
    model.head.eval()
    batch = padded_batch()
    result = per_example_grad_norms(model, batch)
    assert torch.allclose(result, loop_norms(model, batch), rtol=1e-4, atol=1e-6)
    assert model.training
    assert model.encoder.training
    assert not model.head.training


def test_upcycle_classifier_with_indices():
    # Classifier returns (logits, features), and the `indices` entry from collate is skipped.
    model = Classifier(tiny_bert(), LinearHead(16, NUM_CLASSES), pooling="mean")
    batch = padded_batch()
    batch["indices"] = torch.arange(5)
    result = per_example_grad_norms(model, batch)
    assert torch.allclose(result, loop_norms(model, batch), rtol=1e-4, atol=1e-6)


def test_lora_adapter_parameters_only():
    from peft import LoraConfig, get_peft_model

    encoder = get_peft_model(
        tiny_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"])
    )
    model = Classifier(encoder, LinearHead(16, NUM_CLASSES), pooling="cls")
    # A freshly initialised LoRA B is zero, so random values make the A gradients nonzero.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    batch = padded_batch()
    result = per_example_grad_norms(model, batch)
    assert torch.allclose(result, loop_norms(model, batch), rtol=1e-4, atol=1e-6)


class BagOfEmbeddings(nn.Module):
    """Mean token embedding and a linear layer, without an attention mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embedding = nn.Embedding(100, 8)
        self.linear = nn.Linear(8, NUM_CLASSES)

    def forward(self, input_ids):
        return self.linear(self.embedding(input_ids).mean(dim=1))


def test_batch_without_attention_mask():
    model = BagOfEmbeddings()
    batch = padded_batch()
    del batch["attention_mask"]
    expected = []
    for row in range(5):
        model.zero_grad()
        logits = model(batch["input_ids"][row : row + 1])
        F.cross_entropy(logits, batch["labels"][row : row + 1]).backward()
        expected.append(torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters())))
    result = per_example_grad_norms(model, batch, chunk_size=2)
    assert torch.allclose(result, torch.stack(expected), rtol=1e-5, atol=1e-7)


def test_custom_loss_fn():
    model = TinyClassifier(tiny_bert())
    batch = padded_batch()
    doubled = per_example_grad_norms(
        model, batch, loss_fn=lambda logits, labels: 2 * F.cross_entropy(logits, labels)
    )
    plain = per_example_grad_norms(model, batch)
    assert torch.allclose(doubled, 2 * plain, rtol=1e-5)


def test_left_padding_rejected():
    batch = padded_batch()
    batch["attention_mask"][3] = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    with pytest.raises(AnalysisError, match=r"right-padded.*\[3\]"):
        per_example_grad_norms(TinyClassifier(tiny_bert()), batch)


def test_unknown_parameter_selection():
    with pytest.raises(AnalysisError, match="supported: 'trainable', 'all'"):
        per_example_grad_norms(TinyClassifier(tiny_bert()), padded_batch(), parameters="head")


def test_no_trainable_parameters():
    model = TinyClassifier(tiny_bert())
    model.requires_grad_(False)
    with pytest.raises(AnalysisError, match="no trainable parameter"):
        per_example_grad_norms(model, padded_batch())


def test_missing_labels():
    batch = padded_batch()
    del batch["labels"]
    with pytest.raises(AnalysisError, match="no 'labels' entry"):
        per_example_grad_norms(TinyClassifier(tiny_bert()), batch)


def test_input_rows_mismatch():
    batch = padded_batch()
    batch["token_type_ids"] = torch.zeros(4, 7, dtype=torch.long)
    with pytest.raises(AnalysisError, match="token_type_ids"):
        per_example_grad_norms(TinyClassifier(tiny_bert()), batch)
