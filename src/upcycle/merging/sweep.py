"""The merge-and-evaluate sweep over checkpoint steps, methods and scaling coefficients.

For every checkpoint step, the experts of all tasks at that step are merged with
each configured method. Methods with a scaling coefficient try every value of
the grid, keep the one with the best mean validation accuracy over tasks, and
report that merge on validation and test. LoRA experts are merged twice: on their
B·A updates with the task-vector methods, and in low-rank form through PEFT's
`add_weighted_adapter` (`merging.lora_methods`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from upcycle.config import MergingConfig
from upcycle.errors import CheckpointError, MergeError
from upcycle.evaluation import evaluate_tasks
from upcycle.io import atomic_write_csv, load_safetensors, read_safetensors_metadata
from upcycle.merging.lora import (
    DENSITY_COMBINATION_TYPES,
    PEFT_LORA_METHODS,
    SVD_COMBINATION_TYPES,
    AdapterInfo,
    adapter_info_from_metadata,
    check_adapters_compatible,
)
from upcycle.merging.methods import MERGE_METHODS, merge_task_vectors
from upcycle.workspace import Workspace

logger = logging.getLogger(__name__)

HEAD_PREFIX = "head."


@dataclass
class Expert:
    """One expert checkpoint as a task vector over encoder parameters, with its head."""

    task: str
    step: int
    task_vector: dict[str, torch.Tensor]
    head_state: dict[str, torch.Tensor] | None
    adapter_state: dict[str, torch.Tensor] | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def load_expert(ws: Workspace, kind: str, task: str, seed: int, step: int) -> Expert:
    """Load a stored checkpoint, checking that it was fine-tuned from this run's base model.

    Raises:
        CheckpointError: for a missing, corrupt or foreign checkpoint file.
    """
    path = ws.run.checkpoint_path(kind, task, seed, step)
    return load_expert_file(ws, path, kind=kind, task=task, step=step)


def load_expert_file(ws: Workspace, path, *, kind: str, task: str, step: int) -> Expert:
    metadata = read_safetensors_metadata(path) if path.is_file() else {}
    tensors = load_safetensors(path)
    fingerprint = metadata.get("base_fingerprint")
    if fingerprint is not None and fingerprint != ws.fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was fine-tuned from base model {metadata.get('base_model')!r} "
            f"(fingerprint {fingerprint}), not from this run's {ws.config.model.base!r} "
            f"(fingerprint {ws.fingerprint}). Merge only experts of one base model"
        )
    head = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
    body = {k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)}
    adapter = None
    if kind == "lora":
        from upcycle.merging.lora import lora_task_vector

        adapter = body
        rank = int(metadata.get("rank", ws.config.training.lora.rank))
        alpha = float(metadata.get("alpha", ws.config.training.lora.alpha))
        body = lora_task_vector(body, rank=rank, alpha=alpha, base_keys=ws.base_state.keys())
    else:
        unknown = sorted(set(body) - set(ws.base_state))
        if unknown:
            raise CheckpointError(
                f"checkpoint {path} has tensors the base model lacks, e.g. {unknown[:3]}: it "
                "was fine-tuned from another base model"
            )
        for name, tensor in body.items():
            if tensor.shape != ws.base_state[name].shape:
                raise CheckpointError(
                    f"checkpoint {path}: tensor {name} has shape {tuple(tensor.shape)}, the base "
                    f"model's has {tuple(ws.base_state[name].shape)}; it was fine-tuned from "
                    "another base model"
                )
    return Expert(task, step, body, head or None, adapter, metadata)


def heads_for(ws: Workspace, experts: Sequence[Expert]) -> dict[str, torch.nn.Module]:
    """Return each task's head: the frozen label-embedding head, or the expert's own linear head."""
    heads = {}
    for expert in experts:
        if ws.config.model.head == "label-embedding":
            heads[expert.task] = ws.label_heads[expert.task]
        else:
            head = ws.new_head(expert.task, 0)
            head.load_state_dict(expert.head_state)
            heads[expert.task] = head.eval()
    return heads


def evaluate_vector(
    ws: Workspace,
    task_vector: Mapping[str, torch.Tensor] | None,
    heads: Mapping[str, torch.nn.Module],
    split: str,
    tasks: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Evaluate base + task vector on `split` of each task; returns correctness arrays by task."""
    tasks = list(tasks or heads)
    ws.weight_loader.load(task_vector)
    classifiers = {task: ws.classifier(ws.eval_encoder, heads[task]) for task in tasks}
    results = evaluate_tasks(
        classifiers,
        {(task, split): ws.tokenized[(task, split)] for task in tasks},
        pad_id=ws.pad_id,
        batch_size=ws.config.evaluation.batch_size,
        device=ws.device,
    )
    return {task: results[(task, split)] for task, _ in results}


def method_density(ws: Workspace, method: str) -> float:
    if method == "ties":
        return ws.config.merging.ties_density
    if method.startswith("dare"):
        return ws.config.merging.dare_density
    return 1.0


@dataclass
class MergeOutcome:
    method: str
    coefficient: float
    task_vector: dict[str, torch.Tensor]
    validation: dict[str, np.ndarray]
    grid: list[tuple[float, float]]


def merge_and_choose(
    ws: Workspace,
    experts: Sequence[Expert],
    heads: Mapping[str, torch.nn.Module],
    method: str,
    *,
    seed: int,
    coefficients: Sequence[float] | None = None,
) -> MergeOutcome:
    """Merge the experts with `method`, choosing the scaling coefficient on validation accuracy."""
    spec = MERGE_METHODS[method]
    grid = list(coefficients or ws.config.merging.coefficients) if spec.uses_coefficient else [1.0]
    vectors = [expert.task_vector for expert in experts]
    names = [expert.task for expert in experts]

    def merge(coefficient: float) -> dict[str, torch.Tensor]:
        return merge_task_vectors(
            vectors, method, coefficient=coefficient, density=method_density(ws, method),
            seed=seed, names=names,
        )

    return choose_coefficient(ws, method, grid, merge, heads, names)


def choose_coefficient(
    ws: Workspace,
    method: str,
    grid: Sequence[float],
    merge: Callable[[float], dict[str, torch.Tensor]],
    heads: Mapping[str, torch.nn.Module],
    names: Sequence[str],
) -> MergeOutcome:
    """Evaluate `merge(coefficient)` on validation for every coefficient and keep the best.

    The best coefficient has the highest mean validation accuracy over the tasks `names`.
    """
    best: MergeOutcome | None = None
    best_mean = -1.0
    scores = []
    for coefficient in grid:
        merged = merge(coefficient)
        validation = evaluate_vector(ws, merged, heads, "validation", names)
        mean = float(np.mean([correct.mean() for correct in validation.values()]))
        scores.append((coefficient, mean))
        # A tie keeps the coefficient tried first, the smallest in the sorted default grid.
        if mean > best_mean:
            best, best_mean = MergeOutcome(method, coefficient, merged, validation, []), mean
    best.grid = scores
    return best


def lora_adapter_info(experts: Sequence[Expert]) -> AdapterInfo:
    """Check that the LoRA experts share their LoRA settings, and return those settings.

    The settings come from each checkpoint's metadata, and each adapter is named by its
    expert's task in messages.

    Raises:
        CheckpointError: for a checkpoint without LoRA metadata.
        MergeError: for adapters that differ in rank, alpha, target modules or base model.
    """
    infos = [adapter_info_from_metadata(expert.task, expert.metadata) for expert in experts]
    check_adapters_compatible(infos)
    reference = infos[0]
    for info in infos[1:]:
        if info.alpha != reference.alpha:
            raise MergeError(
                f"adapter {info.name!r} has alpha {info.alpha} but adapter {reference.name!r} "
                f"has {reference.alpha}; PEFT merging and MoE upcycling apply one LoRA scaling "
                "to all adapters, so fine-tune them with the same training.lora.alpha"
            )
    return reference


def peft_merge_options(
    merging: MergingConfig, combination_type: str, *, rank: int
) -> tuple[float | None, int | None]:
    """Return the density and svd_rank that PEFT's `add_weighted_adapter` gets for a type.

    The DARE types keep `dare_density` of the entries, the TIES and magnitude-pruning types
    `ties_density`, and the types that do not prune get no density. The SVD types factor
    the merged update back to `rank`, the adapters' own rank; the others get no svd_rank.
    """
    density = None
    if combination_type in DENSITY_COMBINATION_TYPES:
        dare = combination_type.startswith("dare")
        density = merging.dare_density if dare else merging.ties_density
    svd_rank = rank if combination_type in SVD_COMBINATION_TYPES else None
    return density, svd_rank


def merge_and_choose_peft(
    ws: Workspace,
    experts: Sequence[Expert],
    heads: Mapping[str, torch.nn.Module],
    method: str,
    *,
    seed: int,
    base_model: torch.nn.Module,
    info: AdapterInfo,
    coefficients: Sequence[float] | None = None,
) -> MergeOutcome:
    """Merge LoRA experts through PEFT's `add_weighted_adapter`, choosing the weight on validation.

    Every adapter gets the same weight, one value of the coefficient grid at a time, and
    the merged adapter's update is evaluated as a task vector. The DARE types draw their
    drops from `seed`.

    Args:
        method: a key of `PEFT_LORA_METHODS`, such as "peft_ties".
        base_model: the base encoder the adapters were trained on; it is not changed.
        info: the adapters' shared LoRA settings (see `lora_adapter_info`).

    Raises:
        MergeError: for an unknown method, or adapters that do not fit `base_model`.
    """
    from peft import LoraConfig

    from upcycle.merging.lora import merge_adapters_with_peft, peft_merged_task_vector

    if method not in PEFT_LORA_METHODS:
        raise MergeError(
            f"unknown PEFT LoRA merging method {method!r}; supported: "
            f"{', '.join(PEFT_LORA_METHODS)}"
        )
    combination_type = PEFT_LORA_METHODS[method]
    density, svd_rank = peft_merge_options(ws.config.merging, combination_type, rank=info.rank)
    lora_config = LoraConfig(
        r=info.rank,
        lora_alpha=info.alpha,
        target_modules=list(info.target_modules),
        lora_dropout=0.0,
        bias="none",
    )
    adapters = {expert.task: expert.adapter_state for expert in experts}
    names = list(adapters)

    def merge(coefficient: float) -> dict[str, torch.Tensor]:
        model = merge_adapters_with_peft(
            base_model,
            adapters,
            lora_config,
            combination_type=combination_type,
            weights=[coefficient] * len(names),
            density=density,
            svd_rank=svd_rank,
            seed=seed,
        )
        return peft_merged_task_vector(model, base_keys=ws.base_state.keys())

    grid = list(coefficients or ws.config.merging.coefficients)
    return choose_coefficient(ws, method, grid, merge, heads, names)


def merge_outcomes(
    ws: Workspace,
    kind: str,
    experts: Sequence[Expert],
    heads: Mapping[str, torch.nn.Module],
    *,
    seed: int,
) -> Iterator[MergeOutcome]:
    """Yield the chosen merge of every configured method, one at a time to bound memory.

    Every kind goes through `merging.methods` on task vectors (for LoRA, the B·A updates).
    LoRA experts are then merged in their low-rank form through PEFT with each of
    `merging.lora_methods`, whose non-SVD types combine the A and B factors separately.
    """
    peft_methods = ws.config.merging.lora_methods if kind == "lora" else []
    # Check the adapters before the first merge, so a mismatch fails fast.
    info = lora_adapter_info(experts) if peft_methods else None
    for method in ws.config.merging.methods:
        yield merge_and_choose(ws, experts, heads, method, seed=seed)
    if not peft_methods:
        return
    base_model = ws.fresh_encoder().eval()
    for method in peft_methods:
        yield merge_and_choose_peft(
            ws, experts, heads, method, seed=seed, base_model=base_model, info=info
        )


def merge_step(ws: Workspace, kind: str, seed: int, step: int, expert_accuracy: pd.DataFrame) -> None:
    """Merge and evaluate every configured method at one checkpoint step; writes its own tables.

    A task without a checkpoint at `step` (stopped early, or imported with other steps)
    contributes the checkpoint that `checkpoint_for` picks, and its expert accuracy is that
    checkpoint's.
    """
    from upcycle.selection.trajectory import checkpoint_accuracy, checkpoint_for

    key = f"merge/{kind}/seed{seed}/step{step}"
    if ws.run.is_complete(key):
        return
    started = time.perf_counter()
    steps = {task: checkpoint_for(ws, kind, task, seed, step) for task in ws.task_names}
    experts = [load_expert(ws, kind, task, seed, steps[task]) for task in ws.task_names]
    heads = heads_for(ws, experts)
    reference = expert_accuracy.set_index(["task", "split"])["accuracy"]
    if set(steps.values()) != {step}:
        reference = checkpoint_accuracy(ws.run, kind, seed, steps)
    rows, grid_rows = [], []
    for outcome in merge_outcomes(ws, kind, experts, heads, seed=seed):
        method = outcome.method
        test = evaluate_vector(ws, outcome.task_vector, heads, "test", ws.task_names)
        for split_name, results in (("validation", outcome.validation), ("test", test)):
            for task, correct in results.items():
                accuracy = float(correct.mean())
                expert = float(reference.loc[(task, split_name)])
                rows.append({
                    "seed": seed, "method": method, "step": step,
                    "coefficient": outcome.coefficient, "task": task, "split": split_name,
                    "accuracy": accuracy, "expert_accuracy": expert,
                    "normalized_accuracy": accuracy / expert if expert > 0 else float("nan"),
                })
        grid_rows += [
            {"seed": seed, "method": method, "step": step, "coefficient": c,
             "validation_accuracy": score}
            for c, score in outcome.grid
        ]
        logger.info(
            "%s seed %d step %d %s: coefficient %.2f, mean test accuracy %.4f",
            kind, seed, step, method, outcome.coefficient,
            np.mean([correct.mean() for correct in test.values()]),
        )
    folder = ws.run.root / "merges" / kind / f"seed{seed}"
    tables = [folder / f"step{step}.csv", folder / f"step{step}_grid.csv"]
    atomic_write_csv(tables[0], pd.DataFrame(rows))
    atomic_write_csv(tables[1], pd.DataFrame(grid_rows))
    ws.run.mark_complete(key, {"seconds": round(time.perf_counter() - started, 1)}, files=tables)


def collect_merge_tables(ws: Workspace, kind: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate the per-step merge tables of `kind` in seed and step order."""
    rows, grids = [], []
    for seed in ws.config.seeds:
        folder = ws.run.root / "merges" / kind / f"seed{seed}"
        for step in ws.config.training.resolved_checkpoint_steps():
            path = folder / f"step{step}.csv"
            if path.is_file():
                rows.append(pd.read_csv(path))
                grids.append(pd.read_csv(folder / f"step{step}_grid.csv"))
    concat = lambda frames: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()  # noqa: E731
    return concat(rows), concat(grids)
