"""Fine-tuning of one expert (full or LoRA) with checkpoints along its trajectory.

The loop is plain PyTorch: AdamW, a warmup-then-decay schedule from
`transformers.get_scheduler`, per-batch padding, and a difficulty recorder that
reads the logits of the forward pass the step already did. At each checkpoint
step it saves the expert (a task vector for full fine-tuning, the PEFT adapter
weights for LoRA), evaluates it on its task, and saves the training state, so a
killed fine-tune continues from its last checkpoint with identical results.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from upcycle.errors import CheckpointError, TrainingError
from upcycle.evaluation import collate, model_inputs, predict
from upcycle.io import atomic_save_safetensors, atomic_write_bytes, atomic_write_parquet
from upcycle.workspace import Workspace

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.pt"


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_indices(step: int, *, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
    """Return the example indices of optimizer step `step` (1-based).

    Examples are visited in a fresh seeded permutation every epoch, and a batch may
    straddle two epochs. The order depends only on (seed, step), so a resumed
    fine-tune sees the same batches as an uninterrupted one.
    """
    start = (step - 1) * batch_size
    out = []
    while len(out) < min(batch_size, num_examples):
        epoch, offset = divmod(start, num_examples)
        order = np.random.default_rng([seed, epoch]).permutation(num_examples)
        take = min(batch_size - len(out), num_examples - offset)
        out.extend(order[offset : offset + take])
        start += take
    return np.asarray(out, dtype=np.int64)


@dataclass
class ExpertOutputs:
    """Rows produced by one expert's fine-tune."""

    accuracy_rows: list[dict] = field(default_factory=list)
    difficulty_rows: list[dict] = field(default_factory=list)


def expert_key(kind: str, task: str, seed: int) -> str:
    return f"finetune/{kind}/{task}/seed{seed}"


def build_trainable(ws: Workspace, kind: str):
    """Return the encoder to train: a copy of the base, wrapped by PEFT for LoRA."""
    encoder = ws.fresh_encoder()
    if kind == "full":
        return encoder
    from peft import LoraConfig

    from upcycle.merging.lora import wrap_with_peft

    lora = ws.config.training.lora
    peft_config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
    )
    return wrap_with_peft(encoder, peft_config)


def checkpoint_tensors(ws: Workspace, kind: str, encoder, head) -> dict[str, torch.Tensor]:
    """Return the tensors stored for a checkpoint: task vector or adapter, plus a trained head."""
    if kind == "full":
        state = encoder.state_dict()
        tensors = {
            name: (state[name].detach().float().cpu() - base.float())
            for name, base in ws.base_state.items()
        }
    else:
        from peft import get_peft_model_state_dict

        tensors = {k: v.detach().cpu() for k, v in get_peft_model_state_dict(encoder).items()}
    if ws.config.model.head == "linear":
        for name, value in head.state_dict().items():
            tensors[f"head.{name}"] = value.detach().cpu()
    return tensors


def checkpoint_metadata(ws: Workspace, kind: str, task: str, seed: int, step: int) -> dict[str, str]:
    metadata = {
        "format": "upcycle-task-vector" if kind == "full" else "upcycle-lora-adapter",
        "task": task,
        "seed": str(seed),
        "step": str(step),
        "base_model": ws.config.model.base,
        "base_fingerprint": ws.fingerprint,
        "head": ws.config.model.head,
    }
    if kind == "lora":
        lora = ws.config.training.lora
        metadata.update(
            rank=str(lora.rank), alpha=str(lora.alpha), target_modules=",".join(lora.target_modules)
        )
    return metadata


def finetune_expert(ws: Workspace, *, kind: str, task: str, seed: int, progress: bool = True) -> None:
    """Fine-tune the expert of `task` for one seed, resuming from its last checkpoint if any.

    Writes step<N>.safetensors at each checkpoint step, and at the end accuracy.csv,
    difficulty.csv and examples.parquet in the expert's folder. With `training.stopping`,
    the rule reads each checkpoint's validation accuracy and recorder statistics, and when
    it stops, that checkpoint is the expert's last: the tables are written as at the end,
    and the manifest entry records `stopped_step`, `chosen_step` and `checkpoint_steps`.

    Raises:
        TrainingError: if the loss becomes NaN or infinite; the last good checkpoint is kept.
    """
    cfg = ws.config.training
    key = expert_key(kind, task, seed)
    if expert_is_done(ws, kind, task, seed):
        logger.info("%s: already complete, skipped", key)
        return
    ws.check_train_sizes()
    out_dir = ws.run.expert_dir(kind, task, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    train = ws.tokenized[(task, "train")]
    num_examples = len(train)
    checkpoint_steps = set(cfg.resolved_checkpoint_steps())
    record = ws.config.recorder
    el2n_step = record.el2n_step if record.el2n_step is not None else min(checkpoint_steps)

    set_seed(seed)
    encoder = build_trainable(ws, kind)
    head = ws.new_head(task, seed)
    classifier = ws.classifier(encoder, head)
    trainable = [p for p in classifier.parameters() if p.requires_grad]
    learning_rate = cfg.lora.learning_rate if kind == "lora" else cfg.learning_rate
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=cfg.weight_decay)
    from transformers import get_scheduler

    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
        optimizer,
        num_warmup_steps=cfg.resolved_warmup_steps(),
        num_training_steps=cfg.steps,
    )
    recorder = None
    if record.enabled:
        from upcycle.training.recorder import Recorder

        recorder = Recorder(num_examples)
    outputs = ExpertOutputs()
    el2n = np.full(num_examples, np.nan)
    start_step = 1

    state_path = out_dir / STATE_FILE
    if state_path.is_file():
        last_step, outputs, el2n = load_training_state(
            state_path, classifier=classifier, optimizer=optimizer, scheduler=scheduler,
            recorder=recorder,
        )
        start_step = last_step + 1
        logger.info("%s: resuming after step %d", key, last_step)
    from upcycle.selection.trajectory import OnlineStopping

    stopping = OnlineStopping.from_config(ws, task)

    classifier.train()
    head.eval() if not any(p.requires_grad for p in head.parameters()) else head.train()
    started = time.perf_counter()
    bar = tqdm(
        total=cfg.steps, initial=start_step - 1, desc=f"{kind} {task} seed {seed}",
        disable=not progress, leave=False,
    )
    for step in range(start_step, cfg.steps + 1):
        indices = batch_indices(step, num_examples=num_examples, batch_size=cfg.batch_size, seed=seed)
        batch = collate(train, indices, ws.pad_id)
        inputs = model_inputs(batch, ws.device)
        labels = batch["labels"].to(ws.device)

        logits, features = classifier(**inputs)
        loss = F.cross_entropy(logits.float(), labels)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"{key}: loss is {loss.item()} at step {step}; training stopped. "
                f"{kept_checkpoints_note(checkpoint_steps, step)} Lower "
                "training.learning_rate or check the data"
            )
        loss.backward()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        if recorder is not None:
            recorder.observe(
                step, batch["indices"], logits.detach(), labels,
                last_layer_input=features.detach(), logit_scale=head.logit_scale,
                last_layer_has_bias=head.has_bias,
            )
        if record.enabled and step == el2n_step:
            el2n = compute_el2n(ws, classifier, task)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")

        if step in checkpoint_steps:
            broken = first_nonfinite_parameter(classifier)
            if broken is not None:
                raise TrainingError(
                    f"{key}: parameter {broken} is NaN or infinite after step {step}; training "
                    f"stopped. {kept_checkpoints_note(checkpoint_steps, step)} Lower "
                    "training.learning_rate or set training.max_grad_norm"
                )
            save_checkpoint(ws, kind, task, seed, step, classifier, recorder, outputs)
            if stopping is not None:
                decision = stopping.check(outputs.accuracy_rows, outputs.difficulty_rows)
                if decision.stopped_step is not None:
                    logger.info(
                        "%s: %r stopped training at step %d; chosen step %d",
                        key, stopping.rule, step, decision.chosen_step,
                    )
                    break
            save_training_state(
                state_path, step=step, classifier=classifier, optimizer=optimizer,
                scheduler=scheduler, recorder=recorder, outputs=outputs, el2n=el2n,
            )
    bar.close()

    write_expert_tables(ws, kind, task, seed, outputs, recorder, el2n)
    info = {"steps": cfg.steps}
    final_step = cfg.steps
    if stopping is not None:
        # Replayed over every row, so a fine-tune resumed after its last checkpoint records it too.
        decision = stopping.check(outputs.accuracy_rows, outputs.difficulty_rows)
        info.update(stopped_step=decision.stopped_step, chosen_step=decision.chosen_step)
        if decision.stopped_step is not None:
            final_step = decision.stopped_step
    info["checkpoint_steps"] = sorted(step for step in checkpoint_steps if step <= final_step)
    for step in checkpoint_steps - set(info["checkpoint_steps"]):
        # A file past the stop would be a leftover of an earlier run of this directory.
        ws.run.checkpoint_path(kind, task, seed, step).unlink(missing_ok=True)
    checkpoints = [
        ws.run.checkpoint_path(kind, task, seed, step) for step in info["checkpoint_steps"]
    ]
    ws.run.mark_complete(key, info, files=checkpoints)
    state_path.unlink(missing_ok=True)
    logger.info("%s: fine-tuned in %.1f s", key, time.perf_counter() - started)


def expert_files(ws: Workspace, kind: str, task: str, seed: int) -> list[Path]:
    """Return the files a finished fine-tune leaves in the expert's folder."""
    # An expert stopped by training.stopping, or imported, records the checkpoints it has.
    record = ws.run.read_manifest()["completed"].get(expert_key(kind, task, seed), {})
    steps = record.get("checkpoint_steps", ws.config.training.resolved_checkpoint_steps())
    files = [ws.run.checkpoint_path(kind, task, seed, step) for step in steps]
    folder = ws.run.expert_dir(kind, task, seed)
    files.append(folder / "accuracy.csv")
    if ws.config.recorder.enabled:
        files += [folder / "difficulty.csv", folder / "examples.parquet"]
    return files


def expert_is_done(ws: Workspace, kind: str, task: str, seed: int) -> bool:
    """Return whether the manifest marks the expert complete and all its files are intact.

    Once the manifest marks the expert, its training state file is stale: a run killed
    right after the marking leaves it behind. It is deleted, so an expert whose files
    turn out missing or changed (see `RunDir.is_complete`) is fine-tuned again from step 1.
    """
    key = expert_key(kind, task, seed)
    if key not in ws.run.read_manifest()["completed"]:
        return False
    (ws.run.expert_dir(kind, task, seed) / STATE_FILE).unlink(missing_ok=True)
    if not ws.run.is_complete(key):
        return False
    missing = [str(path) for path in expert_files(ws, kind, task, seed) if not path.is_file()]
    if missing:
        logger.warning(
            "%s is marked complete, but %s is missing, so it is fine-tuned again",
            key,
            ", ".join(missing),
        )
        return False
    return True


def kept_checkpoints_note(checkpoint_steps: set[int], failed_step: int) -> str:
    """Say which checkpoints a fine-tune that failed at `failed_step` keeps."""
    saved = [step for step in checkpoint_steps if step < failed_step]
    if not saved:
        return "No checkpoint was saved yet."
    return (
        f"The checkpoints up to step {max(saved)} are kept, and a rerun resumes after step "
        f"{max(saved)}."
    )


def first_nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """Return the name of the first trainable parameter with a NaN or infinite entry, if any."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and not torch.isfinite(parameter).all():
            return name
    return None


def save_training_state(
    path: Path, *, step: int, classifier, optimizer, scheduler, recorder, outputs, el2n
) -> None:
    """Write what a fine-tune resumed after `step` needs to continue as if never stopped.

    That is the trainable weights, the optimizer and scheduler state, the torch random
    number generators (dropout draws from them) and the recorder's history.
    """
    state = {
        "step": step,
        "classifier": {
            k: v for k, v in classifier.state_dict().items() if _is_trainable(classifier, k)
        },
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.random.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "recorder": recorder.state_dict() if recorder is not None else None,
        "outputs": outputs,
        "el2n": el2n,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_training_state(
    path: Path, *, classifier, optimizer, scheduler, recorder
) -> tuple[int, ExpertOutputs, np.ndarray]:
    """Restore a state written by `save_training_state` into the given objects.

    Returns:
        The step the state was saved after, the accuracy and difficulty rows so far, and
        the EL2N scores [N] (NaN before they are computed).

    Raises:
        CheckpointError: for a corrupt state file or one of another model. Deleting the
            file, as the message suggests, restarts the fine-tune from step 1.
    """
    restart = f"Delete {path} to fine-tune this expert again from step 1"
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise CheckpointError(
            f"training state {path} is corrupt or truncated ({error}). {restart}"
        ) from error
    result = classifier.load_state_dict(state["classifier"], strict=False)
    missing = [name for name in result.missing_keys if _is_trainable(classifier, name)]
    if result.unexpected_keys or missing:
        unknown = (result.unexpected_keys or missing)[:3]
        raise CheckpointError(
            f"training state {path} does not fit this expert's model (parameters {unknown} "
            f"are unexpected or missing). {restart}"
        )
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.random.set_rng_state(state["torch_rng"])
    cuda_states = state.get("cuda_rng")
    if cuda_states is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    if recorder is not None and state["recorder"] is not None:
        recorder.load_state_dict(state["recorder"])
    return state["step"], state["outputs"], state["el2n"]


def _is_trainable(classifier, name: str) -> bool:
    parameters = dict(classifier.named_parameters())
    return name in parameters and parameters[name].requires_grad


def compute_el2n(ws: Workspace, classifier, task: str) -> np.ndarray:
    """EL2N of every training example: ||softmax(logits) - onehot(label)||, one forward pass."""
    from upcycle.analysis.difficulty import el2n_scores

    split = ws.tokenized[(task, "train")]
    probabilities = predict(
        classifier, split, pad_id=ws.pad_id, batch_size=ws.config.evaluation.batch_size,
        device=ws.device, return_probabilities=True,
    )
    return el2n_scores(torch.from_numpy(probabilities), split.labels).numpy()


def save_checkpoint(ws, kind, task, seed, step, classifier, recorder, outputs: ExpertOutputs) -> None:
    """Save the checkpoint at `step`, evaluate it on its task, and append its rows."""
    path = ws.run.checkpoint_path(kind, task, seed, step)
    tensors = checkpoint_tensors(ws, kind, classifier.encoder, classifier.head)
    atomic_save_safetensors(tensors, path, checkpoint_metadata(ws, kind, task, seed, step))
    for split_name in ("validation", "test"):
        split = ws.tokenized[(task, split_name)]
        predictions = predict(
            classifier, split, pad_id=ws.pad_id, batch_size=ws.config.evaluation.batch_size,
            device=ws.device,
        )
        accuracy = float((predictions == split.labels.numpy()).mean())
        outputs.accuracy_rows.append(
            {"seed": seed, "task": task, "step": step, "split": split_name,
             "accuracy": accuracy, "n": len(split)}
        )
    if recorder is not None:
        stats = recorder.checkpoint_stats(step)
        row = {"seed": seed, "kind": kind, "task": task, "step": step, **stats}
        sample = ws.config.recorder.full_gradient_examples
        if sample:
            row.update(full_gradient_concentration(ws, classifier, task, seed, sample))
        outputs.difficulty_rows.append(row)
    validation = outputs.accuracy_rows[-2]["accuracy"]
    logger.info("%s %s seed %d step %d: validation accuracy %.4f", kind, task, seed, step, validation)


def full_gradient_concentration(ws, classifier, task: str, seed: int, sample: int) -> dict[str, float]:
    """Concentration of exact full-model per-example gradient norms on a fixed subsample."""
    from upcycle.analysis.difficulty import gradient_concentration
    from upcycle.analysis.gradients import per_example_grad_norms

    split = ws.tokenized[(task, "train")]
    rng = np.random.default_rng([seed, 7])
    indices = np.sort(rng.choice(len(split), size=min(sample, len(split)), replace=False))
    norms = []
    for start in range(0, len(indices), 32):
        batch = collate(split, indices[start : start + 32], ws.pad_id)
        batch = {k: v.to(ws.device) for k, v in batch.items() if k != "indices"}
        norms.append(per_example_grad_norms(classifier, batch).cpu())
    shares = gradient_concentration(torch.cat(norms).numpy())
    return {f"full_grad_concentration_top{round(f * 100)}": v for f, v in shares.items()}


def write_expert_tables(ws, kind, task, seed, outputs: ExpertOutputs, recorder, el2n) -> None:
    out_dir = ws.run.expert_dir(kind, task, seed)
    from upcycle.io import atomic_write_csv

    atomic_write_csv(out_dir / "accuracy.csv", pd.DataFrame(outputs.accuracy_rows))
    if recorder is not None:
        atomic_write_csv(out_dir / "difficulty.csv", pd.DataFrame(outputs.difficulty_rows))
        frame = recorder.example_frame(final_step=ws.config.training.steps)
        frame.insert(0, "task", task)
        frame.insert(0, "kind", kind)
        frame.insert(0, "seed", seed)
        frame["label"] = ws.tokenized[(task, "train")].labels.numpy()[frame["index"].to_numpy()]
        frame["el2n"] = el2n[frame["index"].to_numpy()]
        atomic_write_parquet(out_dir / "examples.parquet", frame)


def expert_accuracy_frame(ws: Workspace, kind: str) -> pd.DataFrame:
    """Collect accuracy.csv of every finished expert of `kind` into one table."""
    frames = []
    for seed in ws.config.seeds:
        for task in ws.task_names:
            path = ws.run.expert_dir(kind, task, seed) / "accuracy.csv"
            if path.is_file():
                frames.append(pd.read_csv(path))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def is_finite_number(value: float) -> bool:
    return isinstance(value, float) and math.isfinite(value)
