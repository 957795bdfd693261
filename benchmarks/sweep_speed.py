"""Speed of upcycle's merge and evaluation sweep against a naive version of the same sweep.

Both sweeps merge the same expert task vectors with the same methods and scaling
coefficients, choose each method's coefficient on mean validation accuracy, and evaluate
the chosen merge on test, with the same label-embedding heads and examples. upcycle's
sweep is `merge_step`: each split is tokenized once, examples are sorted by length and
padded per batch, inference runs under `torch.inference_mode`, and one encoder object
gets each merged weight written in place. The naive sweep loads the encoder with
`from_pretrained` and tokenizes every split again, padded to max_length, for every
merge it evaluates. The experts are random task vectors of the base model's shapes
(Gaussian, standard deviation `--scale`), saved as checkpoint files of a run directory.

The two sweeps alternate, `--rounds` times each in a rotated order. Times are CPU time
of this process (one torch thread), which other processes on the machine change less
than wall time; wall time is printed too. The script checks
that both give the same accuracy for every method, task and split, and the same
chosen coefficients.

Run: OMP_NUM_THREADS=1 python benchmarks/sweep_speed.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import data_root, median, print_header

from upcycle.config import parse_config
from upcycle.io import atomic_save_safetensors
from upcycle.merging import MERGE_METHODS, merge_task_vectors
from upcycle.merging.sweep import heads_for, load_expert, merge_step, method_density
from upcycle.models.encoder import Classifier, resolve_base_model
from upcycle.workspace import Workspace

TASKS = ["sst2", "trec", "subj", "agnews"]
METHODS = ["average", "task_arithmetic", "ties"]
COEFFICIENTS = [0.3, 0.5, 1.0]
STEP = 1
SEED = 0


def build_workspace(run_dir: Path, *, examples: int, batch_size: int) -> Workspace:
    raw = {
        "name": "sweep-speed",
        "device": "cpu",
        "data": {
            "root": str(data_root()),
            "tasks": TASKS,
            "max_train_examples": 16,
            "max_validation_examples": examples,
            "max_test_examples": examples,
        },
        "training": {"steps": STEP, "checkpoint_steps": [STEP]},
        "merging": {"methods": METHODS, "coefficients": COEFFICIENTS},
        "evaluation": {"batch_size": batch_size},
    }
    return Workspace(parse_config(raw), run_dir)


def write_experts(ws: Workspace, *, scale: float) -> None:
    """Save one random task vector per task as a step-1 checkpoint of the run."""
    generator = torch.Generator().manual_seed(0)
    for task in TASKS:
        task_vector = {
            name: torch.randn(base.shape, generator=generator) * scale
            for name, base in ws.base_state.items()
            if base.is_floating_point()
        }
        metadata = {"task": task, "step": str(STEP), "base_fingerprint": ws.fingerprint}
        atomic_save_safetensors(
            task_vector, ws.run.checkpoint_path("full", task, SEED, STEP), metadata
        )


def placeholder_reference() -> pd.DataFrame:
    # Expert accuracies only scale the normalized accuracy column, which is not compared.
    rows = [
        {"task": task, "split": split, "accuracy": 1.0}
        for task in TASKS
        for split in ("validation", "test")
    ]
    return pd.DataFrame(rows)


def run_upcycle(ws: Workspace) -> tuple[float, pd.DataFrame]:
    ws.run.clear_complete("merge/")
    started = time.process_time()
    merge_step(ws, "full", SEED, STEP, placeholder_reference())
    seconds = time.process_time() - started
    rows = pd.read_csv(ws.run.root / "merges" / "full" / f"seed{SEED}" / f"step{STEP}.csv")
    return seconds, rows


@torch.no_grad()
def naive_accuracy(ws: Workspace, task_vector, heads, split: str) -> dict[str, float]:
    """Rebuild the encoder, add the task vector, tokenize padded to max_length and evaluate."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(resolve_base_model(ws.config.model.base))
    state = encoder.state_dict()
    for name, delta in task_vector.items():
        state[name] = state[name] + delta
    encoder.load_state_dict(state)
    encoder.eval()
    accuracies = {}
    for task in TASKS:
        data = ws.tasks[task].splits[split]
        encoded = ws.tokenizer(
            data.texts,
            padding="max_length",
            truncation=True,
            max_length=ws.config.model.max_length,
            return_tensors="pt",
        )
        classifier = Classifier(encoder, heads[task], ws.config.model.pooling)
        predictions = []
        batch_size = ws.config.evaluation.batch_size
        for start in range(0, len(data), batch_size):
            logits, _ = classifier(
                encoded["input_ids"][start : start + batch_size],
                encoded["attention_mask"][start : start + batch_size],
            )
            predictions.append(logits.argmax(-1))
        correct = torch.cat(predictions).numpy() == np.asarray(data.labels)
        accuracies[task] = float(correct.mean())
    return accuracies


MERGE_SECONDS: list[float] = []
"""Seconds spent in merge_task_vectors by each naive sweep; the same merges as upcycle's."""


def run_naive(ws: Workspace) -> tuple[float, pd.DataFrame]:
    started = time.process_time()
    merge_seconds = 0.0
    experts = [load_expert(ws, "full", task, SEED, STEP) for task in TASKS]
    heads = heads_for(ws, experts)
    vectors = [expert.task_vector for expert in experts]
    rows = []
    for method in METHODS:
        grid = COEFFICIENTS if MERGE_METHODS[method].uses_coefficient else [1.0]
        best = None
        for coefficient in grid:
            merge_started = time.process_time()
            merged = merge_task_vectors(
                vectors,
                method,
                coefficient=coefficient,
                density=method_density(ws, method),
                seed=SEED,
                names=TASKS,
            )
            merge_seconds += time.process_time() - merge_started
            validation = naive_accuracy(ws, merged, heads, "validation")
            mean = float(np.mean(list(validation.values())))
            if best is None or mean > best[0]:
                best = (mean, coefficient, merged, validation)
        _, coefficient, merged, validation = best
        test = naive_accuracy(ws, merged, heads, "test")
        for split, accuracies in (("validation", validation), ("test", test)):
            for task, accuracy in accuracies.items():
                rows.append(
                    {
                        "method": method,
                        "coefficient": coefficient,
                        "task": task,
                        "split": split,
                        "accuracy": accuracy,
                    }
                )
    MERGE_SECONDS.append(merge_seconds)
    return time.process_time() - started, pd.DataFrame(rows)


def compare(upcycle_rows: pd.DataFrame, naive_rows: pd.DataFrame) -> tuple[float, bool]:
    keys = ["method", "task", "split"]
    joined = upcycle_rows.merge(naive_rows, on=keys, suffixes=("_upcycle", "_naive"))
    if len(joined) != len(naive_rows):
        raise RuntimeError("the two sweeps produced different (method, task, split) rows")
    difference = (joined["accuracy_upcycle"] - joined["accuracy_naive"]).abs().max()
    same_coefficients = bool((joined["coefficient_upcycle"] == joined["coefficient_naive"]).all())
    return float(difference), same_coefficients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=128, help="validation and test size")
    parser.add_argument("--batch-size", type=int, default=32, help="evaluation batch size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1e-3, help="task vector entry std")
    parser.add_argument("--note", help="a line printed under the header, e.g. other load")
    args = parser.parse_args()
    print_header(
        "sweep_speed",
        f"python benchmarks/sweep_speed.py --examples {args.examples} "
        f"--batch-size {args.batch_size} --rounds {args.rounds} "
        f"--scale {args.scale}",
        args.note,
    )
    evaluations = sum(
        len(COEFFICIENTS) + 1 if MERGE_METHODS[m].uses_coefficient else 2 for m in METHODS
    )
    print(
        f"{len(TASKS)} tasks ({', '.join(TASKS)}), {args.examples} validation and "
        f"{args.examples} test examples each, all-MiniLM-L6-v2 with label-embedding heads, "
        f"max_length 128, batch {args.batch_size}; methods {', '.join(METHODS)}; coefficients "
        f"{COEFFICIENTS}; {evaluations} merged models evaluated per sweep"
    )
    with tempfile.TemporaryDirectory(prefix="upcycle-bench-") as folder:
        ws = build_workspace(Path(folder), examples=args.examples, batch_size=args.batch_size)
        ws.run.prepare(ws.config, ws.input_files())
        started = time.perf_counter()
        _ = ws.tokenized
        _ = ws.label_heads
        _ = ws.weight_loader
        setup = time.perf_counter() - started
        write_experts(ws, scale=args.scale)
        print(
            f"upcycle's one-time setup per stage (tokenize every split once, build heads, "
            f"encoder for evaluation): {setup:.1f} s, outside the timed sweeps"
        )
        print()

        seconds: dict[str, list[float]] = {"upcycle": [], "naive": []}
        walls: dict[str, list[float]] = {"upcycle": [], "naive": []}
        outputs = {}
        print("round  sweep    CPU seconds  wall seconds")
        for round_index in range(args.rounds):
            order = ["upcycle", "naive"] if round_index % 2 == 0 else ["naive", "upcycle"]
            for name in order:
                wall_started = time.perf_counter()
                elapsed, rows = run_upcycle(ws) if name == "upcycle" else run_naive(ws)
                walls[name].append(time.perf_counter() - wall_started)
                seconds[name].append(elapsed)
                outputs[name] = rows
                print(
                    f"{round_index + 1:5d}  {name:7s}  {elapsed:11.1f}  {walls[name][-1]:12.1f}",
                    flush=True,
                )

    difference, same_coefficients = compare(outputs["upcycle"], outputs["naive"])
    speedup = median(seconds["naive"]) / median(seconds["upcycle"])
    print()
    wall_speedup = median(walls["naive"]) / median(walls["upcycle"])
    print(
        f"median CPU seconds: upcycle {median(seconds['upcycle']):.1f}, "
        f"naive {median(seconds['naive']):.1f}"
    )
    print(
        f"speed-up of upcycle over naive in CPU time: {speedup:.2f}x (target >= 3x); "
        f"{'met' if speedup >= 3 else 'missed'}; in wall time: {wall_speedup:.2f}x"
    )
    print(
        f"CPU time in merge_task_vectors, the same merges in both sweeps: median "
        f"{median(MERGE_SECONDS):.1f} s per sweep"
    )
    merging = median(MERGE_SECONDS)
    evaluation_speedup = (median(seconds["naive"]) - merging) / (
        median(seconds["upcycle"]) - merging
    )
    print(
        f"speed-up of the rest (model loading, tokenization, evaluation), with the naive "
        f"sweep's merge time subtracted from both: {evaluation_speedup:.2f}x"
    )
    print(f"max |accuracy difference| over every method, task and split: {difference:.4f}")
    print(f"same chosen coefficients: {same_coefficients}")
    print()
    print("upcycle's accuracies (test, chosen coefficient):")
    test = outputs["upcycle"][outputs["upcycle"]["split"] == "test"]
    print(
        test.pivot_table(index=["method", "coefficient"], columns="task", values="accuracy")
        .round(4)
        .to_string()
    )


if __name__ == "__main__":
    main()
