"""End-to-end runs of a tiny CLIP on image tasks and a tiny decoder on text tasks.

Both runs fine-tune full and LoRA experts, merge them, upcycle the LoRA experts into MoE
layers, analyse difficulty, forgetting and interference, pick stopping steps and write the
summary and the report.

The MoE path of both families is also tested from the stage's parts: the runs' LoRA
adapters upcycled into MoE layers, routers trained on mixed batches through
`ModelFamily.mixture_logits`, and the upcycled model evaluated.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import MOODS, TOPICS, make_task
from safetensors.torch import load_file
from test_clip import clip_config, make_image_dataset, make_image_folder, make_tiny_clip
from test_decoder import decoder_config, make_tiny_decoder

from upcycle.config import parse_config
from upcycle.evaluation import collate, concat_batches, model_inputs, predict
from upcycle.merging.sweep import load_expert
from upcycle.moe.upcycle import train_router, upcycle_to_moe
from upcycle.pipeline import run_all
from upcycle.workspace import Workspace

METHODS = ["average", "dare_task_arithmetic", "dare_ties", "task_arithmetic", "ties"]
STEPS = [3, 6]
SPLITS = ["test", "validation"]
TASKS = {"clip": ["colors", "tones"], "decoder": ["mood", "topic"]}
SECTIONS = {
    "training": {
        "methods": ["full", "lora"],
        "steps": 6,
        "batch_size": 4,
        "learning_rate": 1e-3,
        "warmup_steps": 1,
        "checkpoint_steps": STEPS,
        "lora": {"rank": 2, "alpha": 4.0, "learning_rate": 1e-2},
    },
    "recorder": {"full_gradient_examples": 4},
    "merging": {"coefficients": [0.5, 1.0], "lora_methods": ["peft_linear"]},
    "evaluation": {"batch_size": 8},
    "moe": {"enabled": True, "top_k": 1, "router_steps": 2, "batch_size": 4},
}


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip-run")
    model_dir = make_tiny_clip(root / "model")
    make_image_folder(root / "suite" / "colors", ["red", "green", "blue"])
    make_image_dataset(root / "suite" / "tones", ["bright", "dark"])
    raw = clip_config(model_dir, root / "suite", **SECTIONS)
    config = parse_config(raw)
    run_all(config, root / "run", progress=False)
    return config, root / "run"


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("decoder-run")
    model_dir = make_tiny_decoder(root / "model")
    make_task(root / "suite" / "topic", TOPICS, sizes=(16, 6, 6), seed=1)
    make_task(root / "suite" / "mood", MOODS, sizes=(16, 6, 6), seed=2)
    raw = decoder_config(model_dir, root / "suite", **SECTIONS)
    config = parse_config(raw)
    run_all(config, root / "run", progress=False)
    return config, root / "run"


@pytest.fixture(params=["clip", "decoder"])
def family_run(request):
    return request.getfixturevalue(f"{request.param}_run")


@pytest.fixture(params=["clip", "decoder"])
def named_run(request):
    """The family's name with its run: (family, (config, run_dir))."""
    return request.param, request.getfixturevalue(f"{request.param}_run")


def test_expert_tables_have_every_step(family_run):
    _, run_dir = family_run
    for name in ("experts.csv", "lora_experts.csv"):
        experts = pd.read_csv(run_dir / "results" / name)
        # 2 tasks x (zero-shot + 2 checkpoint steps) x 2 splits.
        assert len(experts) == 2 * 3 * 2, name
        assert sorted(experts["step"].unique()) == [0, *STEPS], name
        assert experts["accuracy"].between(0, 1).all(), name


def test_merge_tables_have_every_method(family_run):
    _, run_dir = family_run
    merges = pd.read_csv(run_dir / "results/merges.csv")
    merged = merges[merges["method"] != "zeroshot"]
    assert sorted(merged["method"].unique()) == METHODS
    # 5 methods x 2 steps x 2 tasks x 2 splits.
    assert len(merged) == 5 * 2 * 2 * 2
    lora_merges = pd.read_csv(run_dir / "results/lora_merges.csv")
    assert "peft_linear" in set(lora_merges["method"])


def test_difficulty_recorded(family_run):
    _, run_dir = family_run
    difficulty = pd.read_csv(run_dir / "results/difficulty.csv")
    assert len(difficulty) == 2 * 2 * 2
    assert difficulty["grad_concentration_top10"].between(0, 1).all()
    assert difficulty["full_grad_concentration_top10"].between(0, 1).all()
    examples = pd.read_parquet(run_dir / "results/examples.parquet")
    assert examples["last_grad_norm"].notna().all()


def test_selection_and_summary_written(family_run):
    _, run_dir = family_run
    selection = pd.read_csv(run_dir / "results/selection.csv")
    assert set(selection["kind"]) == {"full", "lora"}
    assert "task_arithmetic" in (run_dir / "summary.md").read_text()


def test_clip_checkpoint_keys_are_vision_tower(clip_run):
    _, run_dir = clip_run
    full = load_file(run_dir / "checkpoints/full/colors/seed0/step6.safetensors")
    assert "visual_projection.weight" in full
    assert all(name.startswith(("vision_model.", "visual_projection.")) for name in full)
    assert full["visual_projection.weight"].abs().sum() > 0
    lora = load_file(run_dir / "checkpoints/lora/tones/seed0/step6.safetensors")
    assert any(".self_attn.q_proj.lora_A" in name for name in lora)
    assert any(".mlp.fc2.lora_B" in name for name in lora)


def test_decoder_checkpoint_omits_tied_head(decoder_run):
    _, run_dir = decoder_run
    full = load_file(run_dir / "checkpoints/full/mood/seed0/step6.safetensors")
    assert "lm_head.weight" not in full
    assert full["model.embed_tokens.weight"].abs().sum() > 0
    lora = load_file(run_dir / "checkpoints/lora/topic/seed0/step3.safetensors")
    assert any(".mlp.gate_proj.lora_A" in name for name in lora)


def test_analysis_and_report(named_run):
    family, (_, run_dir) = named_run
    forgetting = pd.read_csv(run_dir / "results/forgetting.csv")
    assert set(forgetting["kind"]) == {"full", "lora"}
    assert set(forgetting["task"]) == set(TASKS[family])
    assert forgetting["rate"].dropna().between(0, 1).all()
    interference = pd.read_csv(run_dir / "results/interference.csv")
    assert set(interference["step"]) >= set(STEPS)
    report = (run_dir / "report/index.html").read_text()
    assert "<img" in report


def test_clip_zero_shot_rows(clip_run):
    _, run_dir = clip_run
    zero = pd.read_csv(run_dir / "zeroshot.csv")
    assert sorted(zero["task"].unique()) == ["colors", "tones"]
    assert zero["n"].tolist() == [6, 6, 6, 6]


def mixed_batches(ws: Workspace, *, steps: int, per_task: int) -> list[dict]:
    """Router-training batches with `per_task` training examples of every task each."""
    batches = []
    for step in range(steps):
        parts = []
        for index, task in enumerate(ws.task_names):
            size = len(ws.tokenized[(task, "train")])
            rows = np.random.default_rng([step, index]).choice(size, per_task, replace=False)
            parts.append(collate(ws.tokenized[(task, "train")], rows, ws.pad_id))
        merged, segments = concat_batches(parts, ws.pad_id)
        inputs = model_inputs(merged, ws.device)
        batches.append(
            {
                "inputs": inputs,
                "labels": merged["labels"],
                "segments": segments,
                "attention_mask": ws.family.routing_mask(inputs),
            }
        )
    return batches


def test_moe_through_family_seam(family_run):
    config, run_dir = family_run
    ws = Workspace(config, run_dir)
    experts = [load_expert(ws, "lora", task, 0, 6) for task in ws.task_names]
    adapters = {expert.task: expert.adapter_state for expert in experts}
    lora = config.training.lora
    model = upcycle_to_moe(ws.fresh_encoder(), adapters, rank=lora.rank, alpha=lora.alpha, top_k=2)
    heads = [ws.label_heads[task] for task in ws.task_names]

    def loss_fn(encoder, batch):
        logits = ws.family.mixture_logits(encoder, heads, batch["inputs"], batch["segments"])
        losses = [
            F.cross_entropy(part, batch["labels"][start:stop], reduction="sum")
            for part, (start, stop) in zip(logits, batch["segments"], strict=True)
        ]
        return torch.stack(losses).sum() / len(batch["labels"])

    losses = train_router(
        model, mixed_batches(ws, steps=3, per_task=2), loss_fn=loss_fn, steps=3, seed=0
    )
    assert len(losses) == 3
    assert np.isfinite(losses).all()
    for task, head in zip(ws.task_names, heads, strict=True):
        split = ws.tokenized[(task, "test")]
        predictions = predict(
            ws.classifier(model, head), split, pad_id=ws.pad_id, batch_size=8, device=ws.device
        )
        assert predictions.shape == (len(split),)
        assert set(predictions.tolist()) <= set(range(ws.tasks[task].num_classes))


def test_moe_rows_cover_every_step(named_run):
    family, (_, run_dir) = named_run
    moe = pd.read_csv(run_dir / "results/moe.csv")
    expected = sorted(
        (step, task, split) for step in STEPS for task in TASKS[family] for split in SPLITS
    )
    assert sorted(zip(moe["step"], moe["task"], moe["split"])) == expected


def test_moe_expert_accuracy_is_lora_expert(family_run):
    _, run_dir = family_run
    moe = pd.read_csv(run_dir / "results/moe.csv")
    experts = pd.read_csv(run_dir / "results/lora_experts.csv")
    keys = ["seed", "step", "task", "split"]
    joined = moe.merge(experts, on=keys, suffixes=("", "_lora"), validate="one_to_one")
    assert len(joined) == len(moe)
    assert (joined["expert_accuracy"] == joined["accuracy_lora"]).all()
    assert moe["accuracy"].between(0, 1).all()


def test_moe_router_fractions_sum_to_one(family_run):
    _, run_dir = family_run
    router = pd.read_csv(run_dir / "results/moe_router.csv")
    sums = router.groupby(["step", "task", "layer"])["fraction"].sum()
    assert np.allclose(sums, 1.0)


def test_moe_router_has_every_adapted_layer(named_run):
    family, (_, run_dir) = named_run
    task = TASKS[family][0]
    adapter = load_file(run_dir / f"checkpoints/lora/{task}/seed0/step6.safetensors")
    adapted = {name.split(".lora_A")[0] for name in adapter if ".lora_A" in name}
    router = pd.read_csv(run_dir / "results/moe_router.csv")
    # Every (step, task, layer) has one row per expert, and every adapted layer is routed.
    assert router["layer"].nunique() == len(adapted)
    assert len(router) == len(STEPS) * 2 * len(adapted) * 2
