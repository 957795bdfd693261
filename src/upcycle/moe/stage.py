"""The MoE stage: the LoRA experts of each checkpoint step upcycled into top-k MoE layers.

For every seed and checkpoint step, the task adapters of that step become the experts of
`LoraMoELinear` layers in a fresh copy of the base model, with one router per adapted
module (or per module of `moe.modules`). The base model is a text encoder, a CLIP image
tower or a decoder. The routers are trained on a mixture of the tasks' training splits, then
the upcycled model is evaluated on every task through that task's own head.

Every router-training batch mixes the tasks (see `router_batches`). The load-balancing
loss of a batch then measures the load of the whole mixture, so it does not push the
tokens of one task away from that task's own expert, as single-task batches would.
The task loss is the cross-entropy of each example through its task's head
(`ModelFamily.mixture_logits`), averaged over the batch. The routed tokens, in the
load-balancing loss and in the routing statistics, are those of
`ModelFamily.routing_mask`: the non-padding tokens of a text, and every token of an image
(its patches and the class token).

Each (seed, step) writes RUN/moe/seed<S>/step<N>.csv (moe.csv rows) and
step<N>_router.csv (moe_router.csv rows) and is then marked complete in the manifest,
so a killed stage resumes at the first unfinished step. In moe_router.csv, `fraction`
is the share of the top-k assignments of a task's routed validation tokens that go
to `expert` (the task whose adapter it is) in MoE layer `layer`. Every token makes
top_k assignments to distinct experts, so the fractions of one (task, layer) sum to 1
and none exceeds 1 / top_k.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Self, overload

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from upcycle.errors import CheckpointError, ConfigError, MergeError
from upcycle.evaluation import collate, concat_batches, correct_mask, model_inputs
from upcycle.io import atomic_write_csv
from upcycle.merging.lora import AdapterInfo
from upcycle.merging.sweep import Expert, heads_for, load_expert, lora_adapter_info
from upcycle.models.family import ModelFamily
from upcycle.moe.upcycle import moe_layers, train_router, upcycle_to_moe
from upcycle.selection.trajectory import checkpoint_accuracy, checkpoint_for
from upcycle.store import RunDir
from upcycle.summary import _mean_std, per_seed_task_mean, seeds_sentence
from upcycle.workspace import Workspace

logger = logging.getLogger(__name__)

MOE_COLUMNS = [
    "seed",
    "step",
    "top_k",
    "task",
    "split",
    "accuracy",
    "expert_accuracy",
    "normalized_accuracy",
]
ROUTER_COLUMNS = ["seed", "step", "task", "layer", "expert", "fraction"]


def moe_key(seed: int, step: int) -> str:
    """Return the manifest key of one (seed, step) unit of the MoE stage."""
    return f"moe/seed{seed}/step{step}"


def moe_folder(run: RunDir, seed: int) -> Path:
    return run.root / "moe" / f"seed{seed}"


# ---------------------------------------------------------------------------------------
# Building the upcycled encoder


def load_lora_experts(ws: Workspace, seed: int, step: int) -> tuple[list[Expert], AdapterInfo]:
    """Load every task's LoRA adapter at `step` and check that they can share MoE layers.

    A task without a checkpoint at `step` (stopped early by `training.stopping`, or
    imported with other steps) contributes the checkpoint that `checkpoint_for` picks, as
    in the merge stage. Each expert's `step` is the step of the checkpoint it loaded.

    Returns:
        the experts in task order, and their shared LoRA settings.

    Raises:
        CheckpointError: for a missing or corrupt checkpoint, one fine-tuned from another
            base model, or a `model.head: linear` checkpoint without its `head.*` tensors.
        MergeError: for adapters that differ in rank, alpha, target modules or base model
            (the message names the adapter).
    """
    experts = [
        load_expert(ws, "lora", task, seed, checkpoint_for(ws, "lora", task, seed, step))
        for task in ws.task_names
    ]
    if ws.config.model.head == "linear":
        for expert in experts:
            if expert.head_state is None:
                path = ws.run.checkpoint_path("lora", expert.task, seed, expert.step)
                raise CheckpointError(
                    f"checkpoint {path} has no head.* tensors, but model.head is linear and "
                    "every task needs its trained head. Fine-tune it again with this config"
                )
    return experts, lora_adapter_info(experts)


def build_moe_encoder(
    ws: Workspace,
    experts: Sequence[Expert],
    info: AdapterInfo,
    *,
    top_k: int,
    seed: int,
    modules: Sequence[str] | None = None,
    train_experts: bool = False,
) -> nn.Module:
    """Upcycle a fresh base encoder, with the experts' adapters as the experts of MoE layers.

    Every adapted layer, or only those that `modules` selects, becomes a MoE layer whose
    expert e is the adapter of `experts[e]`, named by its task.

    Raises:
        MergeError: for a `top_k` outside 1 to the number of experts, or a `modules` entry
            that no adapter targets.
    """
    names = [expert.task for expert in experts]
    if not 1 <= top_k <= len(names):
        raise MergeError(
            f"moe.top_k={top_k} is invalid for {len(names)} experts (the adapters of "
            f"{', '.join(names)}); set moe.top_k from 1 to {len(names)}"
        )
    adapters = {expert.task: expert.adapter_state for expert in experts}
    return upcycle_to_moe(
        ws.fresh_encoder(),
        adapters,
        rank=info.rank,
        alpha=info.alpha,
        top_k=top_k,
        train_experts=train_experts,
        modules=modules,
        seed=seed,
    )


# ---------------------------------------------------------------------------------------
# Router training


def _example_stream(num_examples: int, *, seed: int, task_index: int) -> Iterator[int]:
    """Yield example indices forever, one seeded permutation of the split per pass."""
    for epoch in itertools.count():
        order = np.random.default_rng([seed, task_index, epoch]).permutation(num_examples)
        yield from order.tolist()


def router_batches(ws: Workspace, *, seed: int, steps: int, batch_size: int) -> RouterBatches:
    """Plan the router-training batches of one seed; every batch mixes the tasks.

    Each of the T tasks gives batch_size // T examples of its training split to every
    batch, and the batch_size % T remaining places go to the first tasks of a seeded
    order drawn anew for each batch. A task's examples come from a seeded permutation of
    its split, renewed at each pass over it. The batches depend only on the seed, the
    config and the data.

    Returns:
        `steps` batches, each built on the run's device when it is read (see
        `RouterBatches`).
    """
    tasks = ws.task_names
    streams = {
        task: _example_stream(len(ws.tokenized[(task, "train")]), seed=seed, task_index=index)
        for index, task in enumerate(tasks)
    }
    share, remainder = divmod(batch_size, len(tasks))
    plan = []
    for step in range(steps):
        order = np.random.default_rng([seed, step]).permutation(len(tasks))
        extra = set(order[:remainder].tolist())
        parts = []
        for index, task in enumerate(tasks):
            count = share + (1 if index in extra else 0)
            if count:
                parts.append((task, list(itertools.islice(streams[task], count))))
        plan.append(parts)
    return RouterBatches(ws, plan)


class RouterBatches(Sequence[dict]):
    """Router-training batches that are collated only when read.

    Holding every batch of a long router training on the device at once would cost
    `steps` batches of pixels for image models, so each batch is built from its planned
    (task, example indices) parts on access. Reading batch i twice gives equal batches.

    Each batch contains the model inputs of `upcycle.evaluation.model_inputs` under "inputs"
    and also at its top level (input_ids and attention_mask [B, L], or pixel_values
    [B, 3, H, W]), labels [B], and "segments": a (task, start, stop) row range per task,
    in task order. Its top-level "attention_mask" is the routing mask [B, L] of
    `ModelFamily.routing_mask`, which `train_router` takes as the token mask of the
    load-balancing loss; for text models it is the inputs' own attention mask.
    """

    def __init__(self, ws: Workspace, plan: Sequence[Sequence[tuple[str, list[int]]]]) -> None:
        self.ws = ws
        self.plan = list(plan)

    def __len__(self) -> int:
        return len(self.plan)

    @overload
    def __getitem__(self, index: int) -> dict: ...

    @overload
    def __getitem__(self, index: slice) -> list[dict]: ...

    def __getitem__(self, index: int | slice) -> dict | list[dict]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return _mixed_batch(self.ws, self.plan[index])


def _mixed_batch(ws: Workspace, parts: Sequence[tuple[str, list[int]]]) -> dict:
    """Collate the training examples of several tasks into one batch, grouped by task."""
    batches = [
        collate(ws.tokenized[(task, "train")], indices, ws.pad_id) for task, indices in parts
    ]
    merged, bounds = concat_batches(batches, ws.pad_id)
    inputs = model_inputs(merged, ws.device)
    return {
        **inputs,
        "attention_mask": ws.family.routing_mask(inputs),
        "inputs": inputs,
        "labels": merged["labels"].to(ws.device),
        "segments": tuple(
            (task, start, stop) for (task, _), (start, stop) in zip(parts, bounds, strict=True)
        ),
    }


def mixture_loss(
    family: ModelFamily, heads: Mapping[str, nn.Module]
) -> Callable[[nn.Module, dict], Tensor]:
    """Return the task loss of a `RouterBatches` batch for `train_router`.

    The model runs once on the whole batch (`ModelFamily.mixture_logits`), then each
    task's rows go through that task's head. The loss is the cross-entropy summed over
    examples and divided by B.
    """

    def loss_fn(encoder: nn.Module, batch: dict) -> Tensor:
        segments = batch["segments"]
        logits = family.mixture_logits(
            encoder,
            [heads[task] for task, _, _ in segments],
            batch["inputs"],
            [(start, stop) for _, start, stop in segments],
        )
        total = logits[0].new_zeros((), dtype=torch.float32)
        for part, (_, start, stop) in zip(logits, segments, strict=True):
            labels = batch["labels"][start:stop]
            total = total + F.cross_entropy(part.float(), labels, reduction="sum")
        return total / batch["labels"].numel()

    return loss_fn


# ---------------------------------------------------------------------------------------
# Evaluation and routing statistics


class RouterCounts:
    """Count the top-k assignments of routed tokens per MoE layer and expert.

    Use it as a context manager around forward passes of a classifier built on an upcycled
    encoder. A forward hook on the classifier reads the routing of the encoder's MoE layers
    after each pass, and keeps the tokens that `routing_mask` (`ModelFamily.routing_mask`)
    marks in the pass's keyword inputs. `upcycle.evaluation.predict` passes every input as
    a keyword.

    Args:
        encoder: the upcycled encoder; its MoE layers are named relative to it.
        classifier: the module that runs `encoder`, called with keyword inputs.
        routing_mask: maps the classifier's keyword inputs to the routed tokens [B, L].
    """

    def __init__(
        self,
        encoder: nn.Module,
        classifier: nn.Module,
        routing_mask: Callable[[Mapping[str, Tensor]], Tensor],
    ) -> None:
        self.classifier = classifier
        self.routing_mask = routing_mask
        self.layers = moe_layers(encoder)
        self.counts = {
            name: torch.zeros(layer.num_experts, dtype=torch.long)
            for name, layer in self.layers.items()
        }
        self._handle = None

    def __enter__(self) -> Self:
        self._handle = self.classifier.register_forward_hook(self._count, with_kwargs=True)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.remove()

    def _count(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if args:
            raise MergeError(
                f"{type(module).__name__} was called with {len(args)} positional inputs; pass "
                "its inputs as keywords so that the routed tokens can be found for the "
                "routing statistics"
            )
        token_mask = self.routing_mask(kwargs).reshape(-1).bool()
        for name, layer in self.layers.items():
            # [T, top_k] over the tokens of the flattened batch, in the order of the mask.
            selected = layer.last_routing.selected_experts
            if selected.shape[0] != token_mask.numel():
                raise MergeError(
                    f"MoE layer {name!r} routed {selected.shape[0]} tokens but the routing "
                    f"mask has {token_mask.numel()}; upcycle only layers that see every "
                    "token of the input (leave this one out of moe.modules)"
                )
            selected = selected[token_mask.to(selected.device)]
            counts = torch.bincount(selected.reshape(-1), minlength=layer.num_experts)
            self.counts[name] += counts.cpu()

    def fractions(self) -> dict[str, Tensor]:
        """Return each layer's counts [N] divided by their sum (float64, summing to 1)."""
        return {name: counts.double() / counts.sum() for name, counts in self.counts.items()}


def evaluate_moe(
    ws: Workspace, encoder: nn.Module, heads: Mapping[str, nn.Module]
) -> tuple[dict[tuple[str, str], float], dict[str, dict[str, Tensor]]]:
    """Evaluate the upcycled encoder on every task's validation and test split.

    Returns:
        the accuracy by (task, split), and by task the routing fractions of its validation
        tokens in each MoE layer (an [N] tensor that sums to 1, see `RouterCounts`).
    """
    options = {
        "pad_id": ws.pad_id,
        "batch_size": ws.config.evaluation.batch_size,
        "device": ws.device,
    }
    accuracy: dict[tuple[str, str], float] = {}
    routing: dict[str, dict[str, Tensor]] = {}
    for task in ws.task_names:
        classifier = ws.classifier(encoder, heads[task])
        with RouterCounts(encoder, classifier, ws.family.routing_mask) as counts:
            correct = correct_mask(classifier, ws.tokenized[(task, "validation")], **options)
        routing[task] = counts.fractions()
        accuracy[(task, "validation")] = float(correct.mean())
        correct = correct_mask(classifier, ws.tokenized[(task, "test")], **options)
        accuracy[(task, "test")] = float(correct.mean())
    return accuracy, routing


# ---------------------------------------------------------------------------------------
# The stage


def moe_step(ws: Workspace, seed: int, step: int) -> None:
    """Upcycle the LoRA experts of one checkpoint step, train the routers and evaluate.

    Writes RUN/moe/seed<S>/step<N>.csv and step<N>_router.csv, then marks the step
    complete. A step already marked complete is skipped. The expert accuracy of each row
    is that of the task's loaded checkpoint, read from its accuracy.csv.

    Raises:
        CheckpointError, MergeError: see `load_lora_experts` and `build_moe_encoder`;
            CheckpointError also for an expert without an accuracy row at its step.
        TrainingError: if the router-training loss becomes NaN or infinite.
    """
    key = moe_key(seed, step)
    if ws.run.is_complete(key):
        return
    started = time.perf_counter()
    config = ws.config.moe
    experts, info = load_lora_experts(ws, seed, step)
    checkpoint_steps = {expert.task: expert.step for expert in experts}
    reference = checkpoint_accuracy(ws.run, "lora", seed, checkpoint_steps)
    heads = heads_for(ws, experts)
    for head in heads.values():
        head.requires_grad_(False)
    encoder = build_moe_encoder(
        ws,
        experts,
        info,
        top_k=config.top_k,
        seed=seed,
        modules=config.modules,
        train_experts=config.train_experts,
    )
    batches = router_batches(ws, seed=seed, steps=config.router_steps, batch_size=config.batch_size)
    losses = train_router(
        encoder,
        batches,
        loss_fn=mixture_loss(ws.family, heads),
        steps=config.router_steps,
        learning_rate=config.learning_rate,
        load_balancing_weight=config.load_balancing_weight,
        seed=seed,
    )
    encoder.eval()
    accuracy, routing = evaluate_moe(ws, encoder, heads)

    rows = []
    for (task, split), value in accuracy.items():
        expert = float(reference.loc[(task, split)])
        rows.append(
            {
                "seed": seed,
                "step": step,
                "top_k": config.top_k,
                "task": task,
                "split": split,
                "accuracy": value,
                "expert_accuracy": expert,
                "normalized_accuracy": value / expert if expert > 0 else float("nan"),
            }
        )
    expert_names = [expert.task for expert in experts]
    router_rows = [
        {
            "seed": seed,
            "step": step,
            "task": task,
            "layer": layer,
            "expert": name,
            "fraction": float(fraction),
        }
        for task, layers in routing.items()
        for layer, fractions in layers.items()
        for name, fraction in zip(expert_names, fractions.tolist())
    ]
    folder = moe_folder(ws.run, seed)
    atomic_write_csv(folder / f"step{step}.csv", pd.DataFrame(rows, columns=MOE_COLUMNS))
    atomic_write_csv(
        folder / f"step{step}_router.csv", pd.DataFrame(router_rows, columns=ROUTER_COLUMNS)
    )
    seconds = time.perf_counter() - started
    ws.run.mark_complete(
        key,
        {"seconds": round(seconds, 1), "router_loss": [losses[0], losses[-1]] if losses else []},
        files=[folder / f"step{step}.csv", folder / f"step{step}_router.csv"],
    )
    test = [value for (_, split), value in accuracy.items() if split == "test"]
    expert_test = [float(reference.loc[(task, "test")]) for task in ws.task_names]
    logger.info(
        "moe seed %d step %d: top-%d mean test accuracy %.4f (LoRA experts %.4f), %d router "
        "steps, %.0f s",
        seed,
        step,
        config.top_k,
        np.mean(test),
        np.mean(expert_test),
        len(losses),
        seconds,
    )


def run_moe_stage(ws: Workspace, *, progress: bool = True) -> None:
    """Run `moe_step` for every seed and checkpoint step, then write the result tables.

    Completed steps are skipped. results/moe.csv and results/moe_router.csv gather the
    per-step files of every finished step, in seed and step order.

    Raises:
        ConfigError: if the run trains no LoRA experts.
        CheckpointError, MergeError, TrainingError: see `moe_step`.
    """
    if "lora" not in ws.config.training.methods:
        raise ConfigError(
            "the MoE stage upcycles LoRA adapters, but training.methods is "
            f"{ws.config.training.methods}; add 'lora' to training.methods and fine-tune first"
        )
    units = [
        (seed, step)
        for seed in ws.config.seeds
        for step in ws.config.training.resolved_checkpoint_steps()
    ]
    for seed, step in tqdm(units, desc="moe", disable=not progress, leave=False):
        moe_step(ws, seed, step)
    moe, router = collect_moe_tables(ws)
    ws.run.write_result("moe.csv", moe)
    ws.run.write_result("moe_router.csv", router)


def collect_moe_tables(ws: Workspace) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Concatenate the per-step MoE tables in seed and step order."""
    moe, router = [], []
    for seed in ws.config.seeds:
        folder = moe_folder(ws.run, seed)
        for step in ws.config.training.resolved_checkpoint_steps():
            path = folder / f"step{step}.csv"
            if path.is_file():
                moe.append(pd.read_csv(path))
                router.append(pd.read_csv(folder / f"step{step}_router.csv"))
    moe_frame = pd.concat(moe, ignore_index=True) if moe else pd.DataFrame(columns=MOE_COLUMNS)
    router_frame = (
        pd.concat(router, ignore_index=True) if router else pd.DataFrame(columns=ROUTER_COLUMNS)
    )
    return moe_frame, router_frame


# ---------------------------------------------------------------------------------------
# summary.md


def summary_section(run: RunDir) -> list[str]:
    """Return the summary.md lines of the MoE stage, or [] if results/moe.csv is missing.

    One table row per checkpoint step: the LoRA experts, the best LoRA merging method
    (highest mean test accuracy over all its steps and seeds), the upcycled MoE, and the
    share of each task's validation tokens that its own expert gets.
    """
    moe = run.read_result("moe.csv")
    if moe is None or moe.empty:
        return []
    experts = run.read_result("lora_experts.csv")
    merges = run.read_result("lora_merges.csv")
    router = run.read_result("moe_router.csv")
    steps = sorted(moe["step"].unique())
    top_k = ", ".join(str(k) for k in sorted(moe["top_k"].unique()))

    # Each column is a frame of (seed, step, value). Bold marks the best step of accuracies.
    columns: dict[str, pd.DataFrame] = {}
    if experts is not None and not experts.empty:
        columns["LoRA experts"] = _test_means(experts)
    best_method = _best_merge_method(merges)
    if best_method is not None:
        columns[f"best merge ({best_method})"] = _test_means(
            merges[merges["method"] == best_method]
        )
    columns[f"MoE (top-{top_k})"] = _test_means(moe)
    best_step = {name: _best_step(means, steps) for name, means in columns.items()}
    if router is not None and not router.empty:
        columns["router: own expert"] = _own_expert_shares(router)

    lines = ["| step | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for step in steps:
        cells = [str(step)]
        for name, means in columns.items():
            cell = _mean_std(means.loc[means["step"] == step, "value"])
            cells.append(f"**{cell}**" if best_step.get(name) == step else cell)
        lines.append("| " + " | ".join(cells) + " |")

    seeds = [int(seed) for seed in sorted(moe["seed"].unique())]
    return [
        "## LoRA experts upcycled into MoE layers: mean test accuracy over tasks (%)",
        "",
        (
            "Rows are checkpoint steps. At each step the LoRA adapters of all tasks become the "
            f"experts of top-{top_k} MoE layers whose routers are trained on a mixture of the "
            "tasks. The best merge is the LoRA merging method with the highest mean test "
            "accuracy over all steps and seeds. The last column is the share (%) of a task's "
            "validation top-k assignments routed to that task's own adapter, averaged over "
            "tasks and MoE layers, which uniform routing puts at 100 / (number of experts). "
            "Bold marks the best step of each accuracy column. " + seeds_sentence(seeds)
        ),
        "",
        *lines,
        "",
    ]


def _test_means(frame: pd.DataFrame) -> pd.DataFrame:
    """Return the mean test accuracy over tasks per (seed, step), in column `value`."""
    means = per_seed_task_mean(frame[frame["split"] == "test"], ["step"])
    return means.rename(columns={"accuracy": "value"})


def _best_merge_method(merges: pd.DataFrame | None) -> str | None:
    if merges is None or merges.empty:
        return None
    test = merges[(merges["split"] == "test") & (merges["method"] != "zeroshot")]
    if test.empty:
        return None
    return str(test.groupby("method")["accuracy"].mean().idxmax())


def _own_expert_shares(router: pd.DataFrame) -> pd.DataFrame:
    """Return the mean routing fraction of tasks to their own expert per (seed, step)."""
    own = router[router["task"] == router["expert"]]
    means = own.groupby(["seed", "step"], as_index=False)["fraction"].mean()
    return means.rename(columns={"fraction": "value"})


def _best_step(means: pd.DataFrame, steps: Sequence[int]) -> int | None:
    by_step = means[means["step"].isin(steps)].groupby("step")["value"].mean()
    return int(by_step.idxmax()) if not by_step.empty else None
