"""Cost of the difficulty recorder: training throughput with `Recorder.observe` on and off.

One fine-tune of all-MiniLM-L6-v2 with its label-embedding head (the default model and
head) on SST-2 from the text suite: batch size 16, max_length 48, AdamW, a constant
schedule, gradient clipping at 1.0. The step body is the one of `finetune_expert`
(collate, forward, cross-entropy, backward, clipping, optimizer and scheduler steps,
then `Recorder.observe` on the step's logits and head inputs), with exact full-model
gradient norms off as in the default config.

The fine-tune runs in pairs of blocks of `--steps` steps. Recording is on in one block
of each pair and off in the other, in the order on-off, off-on, on-off, ..., so a slow
phase of a shared machine hits both settings alike. Both blocks of a pair train on the
same batches, so padding lengths do not differ between them. Every step is timed.
The throughput ratio (recording on over off) is given twice: from the summed step times
of each setting, and as the median of the pairs' ratios, which bursts of load from other
processes move less. The time spent inside `observe` is also timed call by call, which
gives the recorder's direct cost without the noise of either ratio.

Run: OMP_NUM_THREADS=1 UPCYCLE_DATA=/path/to/textsuite python benchmarks/recorder_overhead.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_root, median, print_header

from upcycle.config import parse_config
from upcycle.evaluation import collate
from upcycle.training.finetune import batch_indices
from upcycle.training.recorder import Recorder
from upcycle.workspace import Workspace

TASK = "sst2"
BATCH_SIZE = 16
MAX_LENGTH = 48
LEARNING_RATE = 2e-5
TARGET_RATIO = 0.95


def build_workspace(run_dir: Path, *, train_examples: int) -> Workspace:
    raw = {
        "name": "recorder-overhead",
        "device": "cpu",
        "data": {
            "root": str(data_root()),
            "tasks": [TASK],
            "max_train_examples": train_examples,
            "max_validation_examples": 32,
            "max_test_examples": 32,
        },
        "model": {"max_length": MAX_LENGTH},
        "training": {"batch_size": BATCH_SIZE, "learning_rate": LEARNING_RATE},
    }
    return Workspace(parse_config(raw), run_dir)


class Trainer:
    """The fine-tuning step of `finetune_expert`, with the recorder call switchable."""

    def __init__(self, ws: Workspace, *, total_steps: int) -> None:
        self.ws = ws
        self.train = ws.tokenized[(TASK, "train")]
        torch.manual_seed(0)
        self.head = ws.new_head(TASK, 0)
        self.classifier = ws.classifier(ws.fresh_encoder(), self.head)
        self.trainable = [p for p in self.classifier.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=LEARNING_RATE, weight_decay=0.0)
        self.scheduler = get_scheduler(
            "constant_with_warmup",
            self.optimizer,
            num_warmup_steps=0,
            num_training_steps=total_steps,
        )
        self.recorder = Recorder(len(self.train))
        self.observe_seconds = 0.0
        self.observe_calls = 0
        self.classifier.train()
        self.head.eval()  # the label-embedding head is frozen, as in finetune_expert

    def step(self, step: int, *, record: bool) -> None:
        ws = self.ws
        indices = batch_indices(step, num_examples=len(self.train), batch_size=BATCH_SIZE, seed=0)
        batch = collate(self.train, indices, ws.pad_id)
        input_ids = batch["input_ids"].to(ws.device)
        attention_mask = batch["attention_mask"].to(ws.device)
        labels = batch["labels"].to(ws.device)

        logits, features = self.classifier(input_ids, attention_mask)
        loss = F.cross_entropy(logits.float(), labels)
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss is {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

        if record:
            started = time.perf_counter()
            self.recorder.observe(
                step,
                batch["indices"],
                logits.detach(),
                labels,
                last_layer_input=features.detach(),
                logit_scale=self.head.logit_scale,
                last_layer_has_bias=self.head.has_bias,
            )
            self.observe_seconds += time.perf_counter() - started
            self.observe_calls += 1


def run_pairs(trainer: Trainer, *, pairs: int, steps: int, first_step: int) -> dict:
    """Run the on/off block pairs; return per-step seconds and block rates by setting.

    Both blocks of a pair train on the same batches (the batches of steps b+1..b+steps),
    so the two settings are timed on inputs of the same shapes, seconds apart.
    """
    step_seconds: dict[bool, list[float]] = {True: [], False: []}
    block_rates: dict[bool, list[float]] = {True: [], False: []}
    for pair in range(pairs):
        first = first_step + pair * steps + 1
        order = (True, False) if pair % 2 == 0 else (False, True)
        for record in order:
            block_started = time.perf_counter()
            for step in range(first, first + steps):
                started = time.perf_counter()
                trainer.step(step, record=record)
                step_seconds[record].append(time.perf_counter() - started)
            block_rates[record].append(steps / (time.perf_counter() - block_started))
    return {
        "step_seconds": step_seconds,
        "block_rates": block_rates,
        "last_step": first_step + pairs * steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per block")
    parser.add_argument("--pairs", type=int, default=60, help="pairs of blocks (on and off)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before the blocks")
    parser.add_argument("--train-examples", type=int, default=1000)
    parser.add_argument("--note", help="a line printed under the header, e.g. the machine's load")
    args = parser.parse_args()
    print_header(
        "recorder_overhead",
        f"python benchmarks/recorder_overhead.py --steps {args.steps} --pairs {args.pairs} "
        f"--warmup {args.warmup} --train-examples {args.train_examples}",
    )
    if args.note:
        print(f"note: {args.note}")
        print()
    print(
        f"task {TASK} ({args.train_examples} training examples), all-MiniLM-L6-v2 + "
        f"label-embedding head, batch {BATCH_SIZE}, max_length {MAX_LENGTH}, AdamW lr "
        f"{LEARNING_RATE}, {args.pairs} pairs of {args.steps}-step blocks after "
        f"{args.warmup} untimed steps; full-model gradient norms off"
    )
    total_steps = args.warmup + 2 * args.pairs * args.steps
    with tempfile.TemporaryDirectory(prefix="upcycle-bench-") as folder:
        ws = build_workspace(Path(folder), train_examples=args.train_examples)
        trainer = Trainer(ws, total_steps=total_steps)
        for step in range(1, args.warmup + 1):
            trainer.step(step, record=True)
        trainer.observe_seconds, trainer.observe_calls = 0.0, 0
        result = run_pairs(trainer, pairs=args.pairs, steps=args.steps, first_step=args.warmup)
        # The recorder copies its pending batches to the host when statistics are read.
        started = time.perf_counter()
        trainer.recorder.checkpoint_stats(result["last_step"])
        stats_seconds = time.perf_counter() - started

    step_seconds, block_rates = result["step_seconds"], result["block_rates"]
    print()
    print("pair  steps/s on  steps/s off  ratio")
    for pair, (rate_on, rate_off) in enumerate(zip(block_rates[True], block_rates[False])):
        print(f"{pair + 1:4d}  {rate_on:10.3f}  {rate_off:11.3f}  {rate_on / rate_off:5.3f}")

    # Two estimates of the throughput ratio: summed wall time, and the median over pairs of
    # each pair's ratio, which bursts of load from other processes on a shared machine move
    # less.
    total_ratio = sum(step_seconds[False]) / sum(step_seconds[True])
    pair_ratios = [on / off for on, off in zip(block_rates[True], block_rates[False])]
    median_ratio = median(pair_ratios)
    median_off = median(step_seconds[False])
    observe_ms = 1000 * trainer.observe_seconds / max(trainer.observe_calls, 1)
    print()
    for record in (False, True):
        seconds = step_seconds[record]
        print(
            f"recording {'on: ' if record else 'off:'} {len(seconds) / sum(seconds):.3f} steps/s "
            f"over the summed time, median step {1000 * median(seconds):.1f} ms"
        )
    for label, ratio in (("summed time", total_ratio), ("median over pairs", median_ratio)):
        verdict = "met" if ratio >= TARGET_RATIO else "missed"
        print(
            f"throughput ratio on/off by {label}: {ratio:.3f} (target >= {TARGET_RATIO}: {verdict})"
        )
    print(
        f"time inside Recorder.observe: {observe_ms:.3f} ms per call over "
        f"{trainer.observe_calls} calls, {observe_ms / (1000 * median_off):.2%} of the median "
        "step without recording"
    )
    print(
        f"checkpoint_stats after {result['last_step']} steps (once per checkpoint): "
        f"{1000 * stats_seconds:.1f} ms"
    )


if __name__ == "__main__":
    main()
