"""StoppingCallback inside a real transformers.Trainer on a tiny BERT classifier.

compute_metrics returns a fixed sequence of accuracies, one per evaluation, so the step
at which each rule stops is known in advance. Evaluations run every 2 optimizer steps.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

from upcycle.errors import CheckpointError, ConfigError, TrainingError
from upcycle.io import load_safetensors, read_safetensors_metadata
from upcycle.selection import (
    FixedStepRule,
    LearnedFractionRule,
    PatienceRule,
    StoppingCallback,
    StoppingRule,
)

QUERY_WEIGHT = "bert.encoder.layer.0.attention.self.query.weight"


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, size: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, 50, (size, 6), generator=generator)
        self.labels = torch.randint(0, 2, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": torch.ones_like(self.input_ids[index]),
            "labels": self.labels[index],
        }


class ScriptedMetrics:
    """A compute_metrics that returns the next entry of each metric sequence."""

    def __init__(self, **sequences: Sequence[float]) -> None:
        self.sequences = sequences
        self.calls = 0

    def __call__(self, prediction) -> dict[str, float]:
        metrics = {name: values[self.calls] for name, values in self.sequences.items()}
        self.calls += 1
        return metrics


def tiny_model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def train_with(
    tmp_path, rule: StoppingRule, metrics: ScriptedMetrics, **callback_options
) -> tuple[Trainer, StoppingCallback, dict[str, torch.Tensor]]:
    model = tiny_model()
    initial = {name: value.detach().clone() for name, value in model.named_parameters()}
    callback = StoppingCallback(rule, task_name="toy", **callback_options)
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        eval_strategy="steps",
        eval_steps=2,
        max_steps=40,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomTokens(32, seed=1),
        eval_dataset=RandomTokens(8, seed=2),
        compute_metrics=metrics,
        callbacks=[callback],
    )
    trainer.train()
    return trainer, callback, initial


@pytest.fixture(scope="module")
def patience_run(tmp_path_factory):
    # Best accuracy at step 4. Steps 6 and 8 do not beat it, so patience=2 stops at 8.
    tmp_path = tmp_path_factory.mktemp("patience")
    metrics = ScriptedMetrics(accuracy=[0.5, 0.75, 0.625, 0.6875] + [0.9] * 16)
    trainer, callback, initial = train_with(
        tmp_path, PatienceRule(patience=2), metrics, output_dir=tmp_path / "vectors"
    )
    return trainer, callback, initial, tmp_path / "vectors"


def test_trainer_stops_at_rule(patience_run):
    trainer, callback, _, _ = patience_run
    assert trainer.state.global_step == 8
    assert callback.stopped_step == 8
    assert callback.chosen_step == 4


def test_task_vector_per_evaluation(patience_run):
    _, _, _, vectors = patience_run
    files = sorted(path.name for path in vectors.glob("step*.safetensors"))
    assert files == [
        "step2.safetensors",
        "step4.safetensors",
        "step6.safetensors",
        "step8.safetensors",
    ]


def test_task_vector_is_difference(patience_run):
    # Training stopped right after the step-8 evaluation, so the model has the step-8 weights.
    trainer, _, initial, vectors = patience_run
    task_vector = load_safetensors(vectors / "step8.safetensors")
    parameters = dict(trainer.model.named_parameters())
    for name in (QUERY_WEIGHT, "classifier.weight"):
        expected = parameters[name].detach().float() - initial[name].float()
        assert torch.equal(task_vector[name], expected), name
        assert expected.abs().max() > 0, name


def test_task_vector_covers_trainable(patience_run):
    trainer, _, _, vectors = patience_run
    task_vector = load_safetensors(vectors / "step2.safetensors")
    trainable = {name for name, value in trainer.model.named_parameters() if value.requires_grad}
    assert set(task_vector) == trainable


def test_task_vector_changes_along_trajectory(patience_run):
    _, _, _, vectors = patience_run
    early = load_safetensors(vectors / "step2.safetensors")[QUERY_WEIGHT]
    late = load_safetensors(vectors / "step8.safetensors")[QUERY_WEIGHT]
    assert not torch.equal(early, late)


def test_task_vector_metadata(patience_run):
    _, _, _, vectors = patience_run
    metadata = read_safetensors_metadata(vectors / "step4.safetensors")
    assert metadata["task"] == "toy"
    assert metadata["step"] == "4"
    assert metadata["validation_accuracy"] == "0.75"
    assert metadata["format"] == "upcycle-task-vector"


def test_trajectory_json(patience_run):
    _, _, _, vectors = patience_run
    trajectory = json.loads((vectors / "trajectory.json").read_text())
    assert [row["step"] for row in trajectory["evaluations"]] == [2, 4, 6, 8]
    assert [row["accuracy"] for row in trajectory["evaluations"]] == [0.5, 0.75, 0.625, 0.6875]
    assert [row["stopped"] for row in trajectory["evaluations"]] == [False, False, False, True]
    assert trajectory["chosen_step"] == 4
    assert trajectory["stopped_step"] == 8
    assert trajectory["task"] == "toy"


def test_final_evaluate_ignored(patience_run):
    trainer, callback, _, vectors = patience_run
    trainer.evaluate()
    trajectory = json.loads((vectors / "trajectory.json").read_text())
    assert len(trajectory["evaluations"]) == 4
    assert callback.chosen_step == 4


def test_learned_fraction_from_metrics(tmp_path):
    # Rates per step: 0.2/2 = 0.1, then 0.01/2 = 0.005 < 0.05, so training stops at step 6.
    metrics = ScriptedMetrics(accuracy=[0.5] * 20, learned_fraction=[0.1, 0.3, 0.31] + [0.9] * 17)
    trainer, callback, _ = train_with(tmp_path, LearnedFractionRule(threshold=0.05), metrics)
    assert trainer.state.global_step == 6
    assert callback.chosen_step == 6


def test_default_output_dir(tmp_path):
    metrics = ScriptedMetrics(accuracy=[0.5] * 20)
    _, callback, _ = train_with(tmp_path, FixedStepRule(step=3), metrics)
    expected = tmp_path / "trainer" / "task_vectors" / "toy"
    assert callback.checkpoint_dir == expected
    assert callback.checkpoint_path(4).is_file()
    assert not callback.checkpoint_path(6).exists()


def test_given_base_state_dict(tmp_path):
    # A zero base makes the task vector equal to the fine-tuned weights.
    model = tiny_model()
    zero_base = {name: torch.zeros_like(value) for name, value in model.state_dict().items()}
    metrics = ScriptedMetrics(accuracy=[0.5] * 20)
    trainer, callback, _ = train_with(
        tmp_path, FixedStepRule(step=2), metrics, base_state_dict=zero_base
    )
    task_vector = load_safetensors(callback.checkpoint_path(2))
    assert torch.equal(
        task_vector[QUERY_WEIGHT], trainer.model.get_parameter(QUERY_WEIGHT).detach()
    )


def test_base_state_dict_missing_parameter(tmp_path):
    base = {QUERY_WEIGHT: torch.zeros(8, 8)}
    with pytest.raises(CheckpointError, match="has no tensor for the trainable parameter"):
        train_with(
            tmp_path, FixedStepRule(step=2), ScriptedMetrics(accuracy=[0.5]), base_state_dict=base
        )


def test_missing_metric(tmp_path):
    metrics = ScriptedMetrics(f1=[0.5] * 20)
    with pytest.raises(ConfigError, match="have no 'eval_accuracy'.*eval_f1"):
        train_with(tmp_path, FixedStepRule(step=2), metrics)


def test_rejects_non_rule():
    with pytest.raises(ConfigError, match="needs a StoppingRule, got str"):
        StoppingCallback("plateau")


def test_resume_replays_trajectory(tmp_path):
    rows = [
        {"step": 2, "accuracy": 0.5, "stopped": False},
        {"step": 4, "accuracy": 0.75, "stopped": False},
        {"step": 6, "accuracy": 0.625, "stopped": False},
    ]
    (tmp_path / "trajectory.json").write_text(json.dumps({"evaluations": rows}))
    model = tiny_model()
    callback = StoppingCallback(
        PatienceRule(patience=2), base_state_dict=model.state_dict(), output_dir=tmp_path
    )
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    control = TrainerControl()
    callback.on_train_begin(args, TrainerState(global_step=4), control, model=model)
    assert callback.rule.evaluations_seen == 2
    assert callback.chosen_step == 4
    assert not control.should_training_stop


def test_resume_needs_base(tmp_path):
    callback = StoppingCallback(PatienceRule(), output_dir=tmp_path)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TrainingError, match="pass base_state_dict"):
        callback.on_train_begin(
            args, TrainerState(global_step=4), TrainerControl(), model=tiny_model()
        )


def test_resume_after_stop(tmp_path):
    rows = [
        {"step": 2, "accuracy": 0.75, "stopped": False},
        {"step": 4, "accuracy": 0.5, "stopped": True},
    ]
    (tmp_path / "trajectory.json").write_text(json.dumps({"evaluations": rows}))
    model = tiny_model()
    callback = StoppingCallback(
        PatienceRule(patience=1), base_state_dict=model.state_dict(), output_dir=tmp_path
    )
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    control = TrainerControl()
    callback.on_train_begin(args, TrainerState(global_step=4), control, model=model)
    assert control.should_training_stop
    assert callback.stopped_step == 4
    assert callback.chosen_step == 2
