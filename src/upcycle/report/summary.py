"""The paragraph that opens the report, computed from the result tables.

Every accuracy in it is a mean over tasks, then over seeds, on the test split,
printed in percent with one decimal. A point difference
is computed from unrounded means, so it can differ by 0.1 from the difference
of the two printed accuracies.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from upcycle.report.figures import (
    KINDS,
    BestStep,
    Kind,
    MissingData,
    RunResults,
    best_method,
    kind_prefix,
    load_results,
    merged_curves,
    method_label,
    seed_stats,
    select_coefficients,
    selection_table,
)

KIND_ADJECTIVES = {"full": "", "lora": "LoRA "}


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def merge_sentence(results: RunResults, kind: Kind) -> str | None:
    """Return a sentence comparing the best method's best step with its final step, or None."""
    merges = results.get(f"{kind_prefix(kind)}merges.csv")
    if merges is None:
        return None
    try:
        curves = merged_curves(merges)
        # The zero-shot rows are the base model at step 0, not a merging method.
        curves = curves[curves["method"] != "zeroshot"]
        top = best_method(curves)
    except MissingData:
        return None
    methods = curves["method"].nunique()
    adjective = KIND_ADJECTIVES[kind]
    sentence = (
        f"Of the {methods} {adjective}merging method{'s' if methods > 1 else ''}, "
        f"{method_label(top.method)} reaches the highest mean test accuracy, "
        f"{percent(top.best_value)}, "
    )
    if top.best_step == top.final_step:
        sentence += f"with the final checkpoints (step {top.final_step})"
    else:
        gain = 100 * (top.best_value - top.final_value)
        sentence += f"with experts at step {top.best_step} of {top.final_step}, "
        if abs(gain) < 0.05:
            sentence += "matching its merge of the final checkpoints"
        else:
            sentence += f"{gain:.1f} points above its merge of the final checkpoints"
    return sentence + expert_clause(merges, top) + "."


def expert_clause(merges: pd.DataFrame, top: BestStep) -> str:
    """Return the clause on the experts' own mean test accuracy at the best and final step."""
    test = select_coefficients(merges)
    test = test[(test["split"] == "test") & (test["method"] == top.method)]
    reference = seed_stats(test, ["step"], "expert_accuracy").set_index("step")["mean"]
    at_best = reference.get(top.best_step)
    at_final = reference.get(top.final_step)
    if at_final is None or pd.isna(at_final):
        return ""
    if top.best_step == top.final_step or at_best is None or pd.isna(at_best):
        return f"; the experts' own mean there is {percent(at_final)}"
    if round(100 * at_final, 1) == round(100 * at_best, 1):
        return f"; the experts' own mean stays at {percent(at_final)}"
    verb = "rises" if at_final > at_best else "falls"
    return (
        f"; the experts' own mean {verb} from {percent(at_best)} at step {top.best_step} "
        f"to {percent(at_final)} at step {top.final_step}"
    )


def expert_sentence(results: RunResults, kind: Kind) -> str | None:
    """Return a sentence on the experts' mean test accuracy at the final and best step, or None."""
    experts = results.get(f"{kind_prefix(kind)}experts.csv")
    if experts is None:
        return None
    test = experts[experts["split"] == "test"]
    stats = seed_stats(test, ["step"], "accuracy").dropna(subset=["mean"])
    if stats.empty:
        return None
    final = stats.iloc[-1]
    best = stats.loc[stats["mean"].idxmax()]
    sentence = (
        f"The {KIND_ADJECTIVES[kind]}experts reach a mean test accuracy of "
        f"{percent(final['mean'])} at their final step ({int(final['step'])})"
    )
    if int(best["step"]) != int(final["step"]):
        sentence += f", after a peak of {percent(best['mean'])} at step {int(best['step'])}"
    return sentence + "."


def moe_sentence(results: RunResults) -> str | None:
    """Return a sentence on the best mixture of experts over top-k and adapter step, or None."""
    moe = results.get("moe.csv")
    if moe is None:
        return None
    stats = seed_stats(moe[moe["split"] == "test"], ["top_k", "step"], "accuracy")
    stats = stats.dropna(subset=["mean"])
    if stats.empty:
        return None
    best = stats.loc[stats["mean"].idxmax()]
    return (
        f"The mixture of experts upcycled from the LoRA adapters reaches "
        f"{percent(best['mean'])} with top-{int(best['top_k'])} routing over adapters at step "
        f"{int(best['step'])}."
    )


def selection_sentence(results: RunResults, kind: Kind) -> str | None:
    """Return a sentence on the stopping strategy with the highest test accuracy, or None."""
    try:
        table = selection_table(results, kind)
    except MissingData:
        return None
    table = table.dropna(subset=["test_accuracy"])
    if table.empty:
        return None
    best = table.loc[table["test_accuracy"].idxmax()]
    return (
        f"Among the {KIND_ADJECTIVES[kind]}stopping strategies, {best['strategy']} with "
        f"{method_label(str(best['method']))} gives the highest test accuracy, "
        f"{percent(best['test_accuracy'])}, for {100 * best['compute_fraction']:.0f}% of the "
        "fine-tuning compute."
    )


def scope_sentence(results: RunResults) -> str | None:
    """Return a sentence with the number of tasks and seeds behind the averages, or None."""
    for name in ("experts.csv", "merges.csv", "lora_experts.csv", "lora_merges.csv", "moe.csv"):
        table = results.get(name)
        if table is not None:
            tasks = table["task"].nunique()
            seeds = table["seed"].nunique()
            seed_phrase = "one seed" if seeds == 1 else f"{seeds} seeds"
            return f"Accuracies are means over {tasks} tasks and {seed_phrase}."
    return None


def summarize(results: RunResults) -> str:
    """Build the summary paragraph from loaded result tables."""
    findings: list[str | None] = []
    for kind in KINDS:
        sentence = merge_sentence(results, kind)
        findings.append(sentence if sentence is not None else expert_sentence(results, kind))
    findings.append(moe_sentence(results))
    findings += [selection_sentence(results, kind) for kind in KINDS]
    written = [sentence for sentence in findings if sentence]
    if not written:
        return (
            "This run has no expert, merge or MoE accuracies yet, so the figures below show "
            "only the analysis tables it has."
        )
    scope = scope_sentence(results)
    return " ".join([*written, scope] if scope else written)


def summary_paragraph(run_dir: str | Path) -> str:
    """Read the results of `run_dir` and return the report's opening paragraph as plain text.

    Raises:
        ReportError: if `run_dir` is not a directory, has no result rows, or a result
            file is invalid.
    """
    return summarize(load_results(run_dir))
