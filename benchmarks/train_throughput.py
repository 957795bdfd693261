"""Training throughput of upcycle's fine-tuning loop against a plain PyTorch loop.

Both loops fine-tune all-MiniLM-L6-v2 with a linear head on the same SST-2 batches from
the text suite: batch size 16, max_length 48, padding per batch to the longest text,
AdamW, a cosine schedule with warmup, and gradient clipping at 1.0. upcycle's loop is
`finetune_expert` on a real Workspace and a temporary run directory, with one checkpoint
at the last step, once with the difficulty recorder on and once with it off.

Throughput is steps per second in the steady state: one over the median time of a step,
over the steps after the first `--warmup` of a block, read from a timestamp at each batch
collation. It is measured twice: in CPU time of this process (`time.process_time`), which
with one torch thread is the work of the loop whatever other processes run, and in wall
time, which also counts the time the process waited for a core. Setup, the checkpoint at the end and its evaluation are outside that window
and reported apart, as whole-call seconds. The three variants run in blocks of `--steps`
steps, `--rounds` times, in a rotated order each round, so a slow phase of the machine
hits every variant. The ratio compares the median step time of each variant over all
its blocks.

Run: OMP_NUM_THREADS=1 python benchmarks/train_throughput.py
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_root, median, print_header

from upcycle.config import parse_config
from upcycle.models.encoder import pool
from upcycle.training import finetune
from upcycle.workspace import Workspace

VARIANTS = ("plain", "upcycle", "upcycle+recorder")
TASK = "sst2"
BATCH_SIZE = 16
MAX_LENGTH = 48
LEARNING_RATE = 2e-5


def build_workspace(run_dir: Path, *, steps: int, train_examples: int) -> Workspace:
    raw = {
        "name": "train-throughput",
        "device": "cpu",
        "data": {
            "root": str(data_root()),
            "tasks": [TASK],
            "max_train_examples": train_examples,
            "max_validation_examples": 32,
            "max_test_examples": 32,
        },
        "model": {"head": "linear", "max_length": MAX_LENGTH},
        "training": {
            "steps": steps,
            "batch_size": BATCH_SIZE,
            "learning_rate": LEARNING_RATE,
            "checkpoint_steps": [steps],
        },
        "evaluation": {"batch_size": 64},
    }
    return Workspace(parse_config(raw), run_dir)


class StepClock:
    """Records wall and CPU timestamps each time the wrapped collate function builds a batch."""

    def __init__(self, collate=None):
        self.collate = collate
        self.times: list[tuple[float, float]] = []

    def tick(self) -> None:
        self.times.append((time.perf_counter(), time.process_time()))

    def __call__(self, *args, **kwargs):
        self.tick()
        return self.collate(*args, **kwargs)

    def step_seconds(self, warmup: int) -> dict[str, list[float]]:
        """Return the wall and CPU duration of each step after the first `warmup`, but the last."""
        window = np.asarray(self.times[warmup:])
        return {"wall": np.diff(window[:, 0]).tolist(), "cpu": np.diff(window[:, 1]).tolist()}


def run_upcycle_block(
    ws: Workspace, *, recorder: bool, warmup: int
) -> tuple[dict[str, list[float]], float]:
    ws.config.recorder.enabled = recorder
    shutil.rmtree(ws.run.checkpoints, ignore_errors=True)
    ws.run.clear_complete("finetune/")
    clock = StepClock(finetune.collate)
    finetune.collate = clock
    started = time.perf_counter()
    try:
        finetune.finetune_expert(ws, kind="full", task=TASK, seed=0, progress=False)
    finally:
        finetune.collate = clock.collate
    return clock.step_seconds(warmup), time.perf_counter() - started


def run_plain_block(
    ws: Workspace, *, steps: int, warmup: int
) -> tuple[dict[str, list[float]], float]:
    """Fine-tune with a loop written directly against PyTorch and transformers."""
    from transformers import AutoModel

    from upcycle.models.encoder import resolve_base_model

    started = time.perf_counter()
    train = ws.tokenized[(TASK, "train")]
    torch.manual_seed(0)
    encoder = AutoModel.from_pretrained(resolve_base_model(ws.config.model.base))
    head = nn.Linear(encoder.config.hidden_size, 2)
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=LEARNING_RATE, weight_decay=0.0)
    scheduler = get_scheduler(
        "cosine", optimizer, num_warmup_steps=round(0.06 * steps), num_training_steps=steps
    )
    encoder.train()
    clock = StepClock()
    for step in range(1, steps + 1):
        clock.tick()
        # The same batches as upcycle's loop, so both pad to the same lengths.
        indices = finetune.batch_indices(
            step, num_examples=len(train), batch_size=BATCH_SIZE, seed=0
        )
        rows = [train.ids[i] for i in indices]
        input_ids = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=ws.pad_id)
        attention_mask = (input_ids != ws.pad_id).long()
        labels = train.labels[torch.as_tensor(indices)]

        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = head(pool(hidden, attention_mask, "mean"))
        loss = F.cross_entropy(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return clock.step_seconds(warmup), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per block")
    parser.add_argument("--rounds", type=int, default=6, help="blocks per variant")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the rate")
    parser.add_argument("--train-examples", type=int, default=400)
    parser.add_argument("--note", help="a line printed under the header, e.g. other load")
    args = parser.parse_args()
    print_header(
        "train_throughput",
        f"python benchmarks/train_throughput.py --steps {args.steps} --rounds {args.rounds} "
        f"--warmup {args.warmup} --train-examples {args.train_examples}",
        args.note,
    )
    print(
        f"task {TASK} ({args.train_examples} training examples), all-MiniLM-L6-v2 + linear "
        f"head, batch {BATCH_SIZE}, max_length {MAX_LENGTH}, AdamW lr {LEARNING_RATE}, "
        f"{args.steps} steps per block, {args.rounds} rounds, first {args.warmup} steps of a "
        "block left out of the rate"
    )
    with tempfile.TemporaryDirectory(prefix="upcycle-bench-") as folder:
        ws = build_workspace(Path(folder), steps=args.steps, train_examples=args.train_examples)
        ws.run.prepare(ws.config, ws.input_files())
        setup_started = time.perf_counter()
        # Tokenize and load the base model once, outside the timed blocks.
        _ = ws.tokenized
        _ = ws.base_state
        print(
            f"tokenization and base model load (once): {time.perf_counter() - setup_started:.1f} s"
        )
        print()

        clocks = ("cpu", "wall")
        steps = {(variant, kind): [] for variant in VARIANTS for kind in clocks}
        rates = {(variant, kind): [] for variant in VARIANTS for kind in clocks}
        walls: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        print("round  variant            steps/s (CPU time)  steps/s (wall)  whole call (s)")
        for round_index in range(args.rounds):
            order = VARIANTS[round_index % 3 :] + VARIANTS[: round_index % 3]
            for variant in order:
                if variant == "plain":
                    seconds, wall = run_plain_block(ws, steps=args.steps, warmup=args.warmup)
                else:
                    recorder = variant == "upcycle+recorder"
                    seconds, wall = run_upcycle_block(ws, recorder=recorder, warmup=args.warmup)
                for kind in clocks:
                    steps[(variant, kind)] += seconds[kind]
                    rates[(variant, kind)].append(1.0 / median(seconds[kind]))
                walls[variant].append(wall)
                print(
                    f"{round_index + 1:5d}  {variant:17s}  {rates[(variant, 'cpu')][-1]:18.3f}  "
                    f"{rates[(variant, 'wall')][-1]:14.3f}  {wall:14.1f}",
                    flush=True,
                )

    pooled = {key: 1.0 / median(values) for key, values in steps.items()}
    print()
    print("median step time over all blocks, as steps/s:")
    print("variant            CPU time     wall  median whole call (s)")
    for variant in VARIANTS:
        print(
            f"{variant:17s}  {pooled[(variant, 'cpu')]:8.3f}  {pooled[(variant, 'wall')]:7.3f}  "
            f"{median(walls[variant]):21.1f}"
        )
    print()
    print("steady-state throughput relative to the plain loop (target >= 0.95):")
    for variant in VARIANTS[1:]:
        for kind in clocks:
            ratio = pooled[(variant, kind)] / pooled[("plain", kind)]
            per_round = [a / b for a, b in zip(rates[(variant, kind)], rates[("plain", kind)])]
            listed = ", ".join(f"{value:.2f}" for value in per_round)
            print(
                f"  {variant:17s} {kind:4s} time: {ratio:.3f}; "
                f"{'met' if ratio >= 0.95 else 'missed'} (per round: {listed})"
            )
    for kind in clocks:
        values = rates[("plain", kind)]
        spread = (max(values) - min(values)) / median(values)
        print(
            f"  range of the plain loop's {kind} rate over rounds, relative to its median: {spread:.0%}"
        )


if __name__ == "__main__":
    main()
