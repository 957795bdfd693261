"""summary.md: expert and merged accuracy at every checkpoint step, mean ± std over seeds."""

from __future__ import annotations

import pandas as pd

from upcycle.io import atomic_write_text
from upcycle.store import RunDir


def _mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{100 * values.iloc[0]:.1f}"
    return f"{100 * values.mean():.1f} ± {100 * values.std(ddof=1):.1f}"


def per_seed_task_mean(frame: pd.DataFrame, keys: list[str], value: str = "accuracy") -> pd.DataFrame:
    """Mean over tasks for each seed and key, keeping one row per (seed, *keys)."""
    return frame.groupby(["seed", *keys], as_index=False)[value].mean()


def trajectory_table(
    experts: pd.DataFrame, merges: pd.DataFrame | None, split: str, value: str = "accuracy"
) -> str:
    """A markdown table: one row per step, the experts' mean then one column per method."""
    experts = experts[experts["split"] == split]
    expert_means = per_seed_task_mean(experts, ["step"])
    columns = ["step", "experts"]
    methods: list[str] = []
    method_means = pd.DataFrame()
    if merges is not None and not merges.empty:
        merges = merges[(merges["split"] == split) & (merges["method"] != "zeroshot")]
        methods = list(dict.fromkeys(merges["method"]))
        method_means = per_seed_task_mean(merges, ["method", "step"], value)
        columns += methods
    best_step = {}
    for method in methods:
        by_step = method_means[method_means["method"] == method].groupby("step")[value].mean()
        best_step[method] = int(by_step.idxmax())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for step in sorted(expert_means["step"].unique()):
        cells = [str(step) if step else "0 (zero-shot)"]
        if value == "accuracy":
            cells.append(_mean_std(expert_means.loc[expert_means["step"] == step, "accuracy"]))
        else:
            cells.append("100.0" if step else "–")
        for method in methods:
            selected = method_means[(method_means["method"] == method) & (method_means["step"] == step)]
            cell = _mean_std(selected[value])
            cells.append(f"**{cell}**" if best_step.get(method) == step else cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_sentence(seeds: list[int], *, spread: bool = True) -> str:
    """Return a sentence naming the seeds behind the values.

    Over several seeds the values are means, with the standard deviation when `spread`.
    """
    if len(seeds) == 1:
        return f"Values are from seed {seeds[0]}."
    names = ", ".join(map(str, seeds))
    if spread:
        return f"Values are mean ± standard deviation over seeds {names}."
    return f"Means over seeds {names}."


def write_summary(run: RunDir, extra_sections: list[str] | None = None) -> str:
    """Write RUN/summary.md from the result tables and return its text."""
    sections = ["# Run summary", ""]
    seeds = None
    for kind, experts_name, merges_name, title in (
        ("full", "experts.csv", "merges.csv", "Full fine-tuning"),
        ("lora", "lora_experts.csv", "lora_merges.csv", "LoRA"),
    ):
        experts = run.read_result(experts_name)
        if experts is None or experts.empty:
            continue
        merges = run.read_result(merges_name)
        seeds = sorted(experts["seed"].unique())
        sections += [
            f"## {title}: mean test accuracy over tasks (%)",
            "",
            "Rows are expert checkpoint steps; each merging method column merges the experts "
            "of all tasks at that step. Bold marks each method's best step. "
            + seeds_sentence(seeds),
            "",
            trajectory_table(experts, merges, "test"),
            "",
        ]
        if merges is not None and not merges.empty:
            sections += [
                f"### {title}: normalized accuracy (merged / expert, %, test)",
                "",
                trajectory_table(experts, merges, "test", "normalized_accuracy"),
                "",
                f"### {title}: mean validation accuracy (%)",
                "",
                trajectory_table(experts, merges, "validation"),
                "",
            ]
    sections += extra_sections or []
    text = "\n".join(sections).rstrip() + "\n"
    atomic_write_text(run.root / "summary.md", text)
    return text


def best_step_sentence(experts: pd.DataFrame, merges: pd.DataFrame, method: str) -> str:
    test = merges[(merges["split"] == "test") & (merges["method"] == method)]
    by_step = test.groupby("step")["accuracy"].mean()
    last = int(by_step.index.max())
    best = int(by_step.idxmax())
    gain = 100 * (by_step.max() - by_step.loc[last])
    return (
        f"{method}: best mean test accuracy {100 * by_step.max():.1f}% at step {best} of {last}, "
        f"{gain:.1f} points above the final checkpoints"
    )



