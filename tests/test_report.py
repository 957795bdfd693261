"""Tests of the run report on a synthetic run directory written in the documented schemas.

The synthetic run has 2 tasks, checkpoints at steps 0, 10, 100 and 1000, 2 seeds
and 2 merging methods. Seed 0 adds 0.01 to every accuracy and seed 1 subtracts
0.01, so the mean over seeds equals the base value below. Mean merged test
accuracy over tasks is then:

    step               0     10    100   1000
    task_arithmetic   .45   .61   .68   .59
    ties              .45   .61   .66   .63

so task arithmetic is the best method, at step 100 (68.0%), 9.0 points above its
merge of the final checkpoints (59.0%). The experts' mean test accuracy is 75.0%
at step 100 and 85.0% at step 1000. The LoRA merges are the same curves 5 points
lower, under the names peft_linear and peft_ties.

Rendering is the slow part (over a second per figure on a 2-core machine), so the
full run is rendered once per module and most tests read its files.
"""

from __future__ import annotations

import logging
import struct
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

from upcycle.errors import UpcycleError
from upcycle.report import ReportError, figure_names, summary_paragraph, write_report
from upcycle.report.figures import (
    MissingData,
    RunResults,
    interference_figure,
    pooled_rate,
    select_coefficients,
)

TASKS = ("alpha", "beta")
STEPS = (0, 10, 100, 1000)
SEED_OFFSETS = {0: 0.01, 1: -0.01}
EXPERT_TEST = {"alpha": (0.50, 0.70, 0.80, 0.90), "beta": (0.40, 0.60, 0.70, 0.80)}
MERGED_TEST = {
    "task_arithmetic": {"alpha": (0.50, 0.66, 0.72, 0.62), "beta": (0.40, 0.56, 0.64, 0.56)},
    "ties": {"alpha": (0.50, 0.64, 0.70, 0.66), "beta": (0.40, 0.58, 0.62, 0.60)},
}
COEFFICIENTS = {"task_arithmetic": 0.5, "ties": 1.0, "peft_linear": 1.0, "peft_ties": 1.0}
LORA_METHODS = {"peft_linear": "task_arithmetic", "peft_ties": "ties"}
LORA_MERGE_SHIFT = -0.05
VALIDATION_SHIFT = -0.02
LORA_EXPERT_TEST = {"alpha": (0.50, 0.62, 0.72, 0.78), "beta": (0.40, 0.55, 0.66, 0.70)}
MOE_TEST = {1: (0.60, 0.70, 0.72), 2: (0.62, 0.77, 0.74)}
MOE_STEPS = (10, 100, 1000)

ALL_FIGURES = [
    "expert_accuracy",
    "lora_expert_accuracy",
    "merged_accuracy",
    "merged_normalized_accuracy",
    "best_method_per_task",
    "lora_merged_accuracy",
    "lora_merged_normalized_accuracy",
    "lora_best_method_per_task",
    "moe_accuracy",
    "difficulty",
    "forgetting",
    "interference",
    "selection",
]
MINIMAL_FIGURES = [
    "expert_accuracy",
    "merged_accuracy",
    "merged_normalized_accuracy",
    "best_method_per_task",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# Synthetic run directory


def expert_rows(accuracies: dict[str, tuple[float, ...]]) -> pd.DataFrame:
    rows = []
    for seed, offset in SEED_OFFSETS.items():
        for task, values in accuracies.items():
            for step, value in zip(STEPS, values, strict=True):
                for split, shift in (("validation", VALIDATION_SHIFT), ("test", 0.0)):
                    rows.append(
                        {
                            "seed": seed,
                            "task": task,
                            "step": step,
                            "split": split,
                            "accuracy": round(value + shift + offset, 4),
                            "n": 50,
                        }
                    )
    return pd.DataFrame(rows)


def merge_rows(*, lora: bool = False) -> pd.DataFrame:
    rows = []
    experts = LORA_EXPERT_TEST if lora else EXPERT_TEST
    methods = LORA_METHODS if lora else {method: method for method in MERGED_TEST}
    for seed, offset in SEED_OFFSETS.items():
        for method, source in methods.items():
            for task, values in MERGED_TEST[source].items():
                for index, step in enumerate(STEPS):
                    expert = experts[task][index] + offset
                    base = values[index] + (LORA_MERGE_SHIFT if lora else 0.0)
                    for split, shift in (("validation", VALIDATION_SHIFT), ("test", 0.0)):
                        accuracy = round(base + shift + offset, 4)
                        rows.append(
                            {
                                "seed": seed,
                                "method": method,
                                "step": step,
                                "coefficient": COEFFICIENTS[method],
                                "task": task,
                                "split": split,
                                "accuracy": accuracy,
                                "expert_accuracy": round(expert + shift, 4),
                                "normalized_accuracy": accuracy / (expert + shift),
                            }
                        )
    return pd.DataFrame(rows)


def moe_rows() -> pd.DataFrame:
    rows = []
    for seed, offset in SEED_OFFSETS.items():
        for top_k, values in MOE_TEST.items():
            for step, value in zip(MOE_STEPS, values, strict=True):
                for task in TASKS:
                    expert = LORA_EXPERT_TEST[task][STEPS.index(step)] + offset
                    accuracy = value + offset
                    rows.append(
                        {
                            "seed": seed,
                            "step": step,
                            "top_k": top_k,
                            "task": task,
                            "split": "test",
                            "accuracy": accuracy,
                            "expert_accuracy": expert,
                            "normalized_accuracy": accuracy / expert,
                        }
                    )
    return pd.DataFrame(rows)


def difficulty_rows() -> pd.DataFrame:
    rows = []
    for seed in SEED_OFFSETS:
        for task in TASKS:
            for index, step in enumerate(STEPS[1:]):
                rows.append(
                    {
                        "seed": seed,
                        "kind": "full",
                        "task": task,
                        "step": step,
                        "train_loss": 1.0 / (index + 1),
                        "learned_fraction": 0.3 * (index + 1),
                        "forgetting_events": index,
                        "grad_concentration_top1": 0.05 * (index + 1),
                        "grad_concentration_top5": 0.1 * (index + 1),
                        "grad_concentration_top10": 0.2 * (index + 1),
                        "full_grad_concentration_top1": float("nan"),
                        "full_grad_concentration_top5": float("nan"),
                        "full_grad_concentration_top10": float("nan"),
                    }
                )
    return pd.DataFrame(rows)


def forgetting_rows() -> pd.DataFrame:
    rows = []
    for seed in SEED_OFFSETS:
        for method in MERGED_TEST:
            for step in (100, 1000):
                for task in TASKS:
                    for score in ("learned_step", "el2n"):
                        for decile in [*range(10), "all"]:
                            n = 100 if decile == "all" else 10
                            forgotten = 45 if decile == "all" else decile
                            rows.append(
                                {
                                    "seed": seed,
                                    "kind": "full",
                                    "method": method,
                                    "step": step,
                                    "task": task,
                                    "split": "train",
                                    "score": score,
                                    "decile": decile,
                                    "n": n,
                                    "forgotten": forgotten,
                                    "rate": forgotten / n,
                                }
                            )
    return pd.DataFrame(rows)


def interference_rows() -> pd.DataFrame:
    rows = []
    for seed in SEED_OFFSETS:
        for index, step in enumerate(STEPS[1:]):
            common = {"seed": seed, "kind": "full", "step": step}
            rows += [
                {**common, "metric": "norm", "task_a": "alpha", "task_b": "", "value": 1.0},
                {**common, "metric": "norm", "task_a": "beta", "task_b": "", "value": 2.0},
                {
                    **common,
                    "metric": "cosine",
                    "task_a": "alpha",
                    "task_b": "beta",
                    "value": 0.1 - 0.03 * index,
                },
                {
                    **common,
                    "metric": "mean_cosine",
                    "task_a": "all",
                    "task_b": "",
                    "value": 0.1 - 0.03 * index,
                },
                {
                    **common,
                    "metric": "sign_conflict",
                    "task_a": "all",
                    "task_b": "",
                    "value": 0.2 + 0.05 * index,
                },
            ]
    return pd.DataFrame(rows)


def selection_rows() -> pd.DataFrame:
    rows = []
    for seed in SEED_OFFSETS:
        for strategy, compute, accuracies in (
            ("final", 1.0, {"task_arithmetic": 0.59, "ties": 0.63}),
            ("patience", 0.6, {"task_arithmetic": 0.64, "ties": 0.62}),
            ("merge-aware", 0.4, {"task_arithmetic": 0.68, "ties": 0.66}),
        ):
            for method, accuracy in accuracies.items():
                rows.append(
                    {
                        "seed": seed,
                        "kind": "full",
                        "method": method,
                        "strategy": strategy,
                        "steps": "alpha:100;beta:100",
                        "compute_fraction": compute,
                        "validation_accuracy": accuracy - 0.02,
                        "test_accuracy": accuracy,
                        "merges_evaluated": 4,
                    }
                )
    return pd.DataFrame(rows)


def write_run(root: Path, tables: dict[str, pd.DataFrame], *, name: str = "synthetic") -> Path:
    (root / "results").mkdir(parents=True)
    (root / "config.yaml").write_text(
        f"name: {name!r}\nseeds: [0, 1]\ndata:\n  tasks: [alpha, beta]\n", encoding="utf-8"
    )
    for file_name, frame in tables.items():
        frame.to_csv(root / "results" / file_name, index=False)
    return root


def full_tables() -> dict[str, pd.DataFrame]:
    return {
        "experts.csv": expert_rows(EXPERT_TEST),
        "lora_experts.csv": expert_rows(LORA_EXPERT_TEST),
        "merges.csv": merge_rows(),
        "lora_merges.csv": merge_rows(lora=True),
        "moe.csv": moe_rows(),
        "difficulty.csv": difficulty_rows(),
        "forgetting.csv": forgetting_rows(),
        "interference.csv": interference_rows(),
        "selection.csv": selection_rows(),
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with every result file, its report already written."""
    run = write_run(tmp_path_factory.mktemp("full") / "run", full_tables())
    write_report(run)
    return run


@pytest.fixture(scope="module")
def minimal_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run with only experts.csv and merges.csv, its report already written."""
    tables = {"experts.csv": expert_rows(EXPERT_TEST), "merges.csv": merge_rows()}
    run = write_run(tmp_path_factory.mktemp("minimal") / "run", tables)
    write_report(run)
    return run


@pytest.fixture
def experts_run(tmp_path: Path) -> Path:
    """A run with only experts.csv, not yet reported."""
    return write_run(tmp_path / "run", {"experts.csv": expert_rows(EXPERT_TEST)})


class PageParser(HTMLParser):
    """Collect img sources, script and stylesheet tags, and the summary paragraph's text."""

    def __init__(self) -> None:
        super().__init__()
        self.image_sources: list[str] = []
        self.external_tags: list[str] = []
        self.summary = ""
        self._in_summary = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.image_sources.append(attributes.get("src") or "")
        if tag == "script" or (tag == "link" and attributes.get("rel") == "stylesheet"):
            self.external_tags.append(tag)
        if tag == "p" and attributes.get("class") == "summary":
            self._in_summary = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "p":
            self._in_summary = False

    def handle_data(self, data: str) -> None:
        if self._in_summary:
            self.summary += data


def parse_page(index: Path) -> PageParser:
    parser = PageParser()
    parser.feed(index.read_text(encoding="utf-8"))
    return parser


def png_size(data: bytes) -> tuple[int, int]:
    # The IHDR chunk follows the 8-byte signature, its 4-byte length and 4-byte type.
    return struct.unpack(">II", data[16:24])


# Full run


def index_of(run: Path) -> Path:
    return run / "report" / "index.html"


def test_report_returns_index(experts_run: Path) -> None:
    assert write_report(experts_run) == experts_run / "report" / "index.html"


def test_report_writes_index(full_run: Path) -> None:
    assert index_of(full_run).is_file()


def test_report_image_count(full_run: Path) -> None:
    page = parse_page(index_of(full_run))
    assert len(page.image_sources) == len(ALL_FIGURES)


def test_report_images_embedded(full_run: Path) -> None:
    page = parse_page(index_of(full_run))
    for source in page.image_sources:
        assert source.startswith("data:image/png;base64,")


def test_report_loads_nothing_external(full_run: Path) -> None:
    text = index_of(full_run).read_text(encoding="utf-8")
    assert parse_page(index_of(full_run)).external_tags == []
    assert "http://" not in text
    assert "https://" not in text


def test_report_figure_files(full_run: Path) -> None:
    written = sorted(path.stem for path in (full_run / "report").glob("*.png"))
    assert written == sorted(ALL_FIGURES)


def test_report_svg_files(full_run: Path) -> None:
    written = sorted(path.stem for path in (full_run / "report").glob("*.svg"))
    assert written == sorted(ALL_FIGURES)


def test_report_png_valid(full_run: Path) -> None:
    for name in ALL_FIGURES:
        data = (full_run / "report" / f"{name}.png").read_bytes()
        assert data[:8] == PNG_MAGIC, name


def test_report_png_size(full_run: Path) -> None:
    data = (full_run / "report" / "merged_accuracy.png").read_bytes()
    assert png_size(data) == (800, 450)


def test_report_grid_png_size(full_run: Path) -> None:
    data = (full_run / "report" / "forgetting.png").read_bytes()
    assert png_size(data) == (900, 650)


def test_report_svg_parses(full_run: Path) -> None:
    for name in ALL_FIGURES:
        root = ElementTree.parse(full_run / "report" / f"{name}.svg").getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg", name


def test_report_svg_reproducible(experts_run: Path) -> None:
    write_report(experts_run)
    first = (experts_run / "report" / "expert_accuracy.svg").read_bytes()
    write_report(experts_run)
    assert (experts_run / "report" / "expert_accuracy.svg").read_bytes() == first


def test_report_lists_all_figures() -> None:
    assert set(ALL_FIGURES) <= set(figure_names())


def test_report_selection_table(full_run: Path) -> None:
    text = index_of(full_run).read_text(encoding="utf-8")
    assert "<td>merge-aware</td>" in text
    assert '<td class="number">40.0</td>' in text


def test_report_moe_caption(full_run: Path) -> None:
    text = index_of(full_run).read_text(encoding="utf-8")
    assert "The dotted line is the best LoRA merging method, PEFT linear." in text


def test_report_config_shown(full_run: Path) -> None:
    text = index_of(full_run).read_text(encoding="utf-8")
    assert "<pre>name: synthetic\nseeds:\n- 0\n- 1\n" in text
    # The config is folded, linked from the contents and placed after the last figure.
    folded = text.index("<details><summary>config.yaml of the run</summary>\n<pre>name: synthetic")
    assert '<a href="#config">Resolved config</a>' in text
    assert text.rindex("<figure") < folded < text.index("<footer>")


def test_report_logs_each_figure(experts_run: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="upcycle.report"):
        write_report(experts_run)
    messages = [record.getMessage() for record in caplog.records]
    wrote = [message for message in messages if message.startswith("wrote figure ")]
    skipped = [message for message in messages if message.startswith("skipped figure ")]
    assert len(wrote) == 1
    assert len(skipped) == len(figure_names()) - 1


# Summary paragraph


def test_summary_best_method(full_run: Path) -> None:
    assert "task arithmetic reaches the highest mean test accuracy, 68.0%" in (
        summary_paragraph(full_run)
    )


def test_summary_best_step(full_run: Path) -> None:
    assert "with experts at step 100 of 1000" in summary_paragraph(full_run)


def test_summary_point_difference(full_run: Path) -> None:
    assert "9.0 points above its merge of the final checkpoints" in summary_paragraph(full_run)


def test_summary_expert_trend(full_run: Path) -> None:
    assert "the experts' own mean rises from 75.0% at step 100 to 85.0% at step 1000" in (
        summary_paragraph(full_run)
    )


def test_summary_moe(full_run: Path) -> None:
    assert "reaches 77.0% with top-2 routing over adapters at step 100" in (
        summary_paragraph(full_run)
    )


def test_summary_selection(full_run: Path) -> None:
    assert (
        "merge-aware with task arithmetic gives the highest test accuracy, 68.0%, for 40% of"
        in summary_paragraph(full_run)
    )


def test_summary_scope(full_run: Path) -> None:
    assert summary_paragraph(full_run).endswith("Accuracies are means over 2 tasks and 2 seeds.")


def test_summary_on_page(full_run: Path) -> None:
    assert parse_page(index_of(full_run)).summary == summary_paragraph(full_run)


def test_summary_lora_merge(full_run: Path) -> None:
    assert (
        "Of the 2 LoRA merging methods, PEFT linear reaches the highest mean test accuracy, "
        "63.0%, with experts at step 100 of 1000, 9.0 points above"
    ) in summary_paragraph(full_run)


def test_summary_final_step_best(tmp_path: Path) -> None:
    merges = merge_rows()
    merges = merges[merges["step"] <= 100]
    run = write_run(tmp_path / "run", {"merges.csv": merges})
    assert "with the final checkpoints (step 100)" in summary_paragraph(run)


def test_summary_experts_only(experts_run: Path) -> None:
    assert summary_paragraph(experts_run).startswith(
        "The experts reach a mean test accuracy of 85.0% at their final step (1000)."
    )


# Partial and empty runs


def test_minimal_run_figures(minimal_run: Path) -> None:
    written = sorted(path.stem for path in (minimal_run / "report").glob("*.png"))
    assert written == sorted(MINIMAL_FIGURES)


def test_minimal_run_image_count(minimal_run: Path) -> None:
    page = parse_page(index_of(minimal_run))
    assert len(page.image_sources) == len(MINIMAL_FIGURES)


def test_minimal_run_lists_skipped(minimal_run: Path) -> None:
    text = index_of(minimal_run).read_text(encoding="utf-8")
    assert "<li>moe_accuracy: results/moe.csv is missing or empty</li>" in text


def test_empty_csv_skips_figure(experts_run: Path) -> None:
    moe_rows().iloc[:0].to_csv(experts_run / "results" / "moe.csv", index=False)
    (experts_run / "results" / "selection.csv").write_text("", encoding="utf-8")
    write_report(experts_run)
    written = sorted(path.stem for path in (experts_run / "report").glob("*.png"))
    assert written == ["expert_accuracy"]


def test_rerun_removes_stale_figure(experts_run: Path) -> None:
    moe_rows().to_csv(experts_run / "results" / "moe.csv", index=False)
    write_report(experts_run)
    (experts_run / "results" / "moe.csv").unlink()
    write_report(experts_run)
    assert not (experts_run / "report" / "moe_accuracy.png").exists()
    assert not (experts_run / "report" / "moe_accuracy.svg").exists()


def test_no_results_raises(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {})
    with pytest.raises(ReportError, match="no results to report in"):
        write_report(run)


def test_no_results_writes_nothing(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {})
    with pytest.raises(UpcycleError):
        write_report(run)
    assert not (run / "report").exists()


def test_header_only_counts_as_empty(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"experts.csv": expert_rows(EXPERT_TEST).iloc[:0]})
    with pytest.raises(ReportError, match="no results to report"):
        summary_paragraph(run)


def test_missing_run_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="run directory not found"):
        write_report(tmp_path / "absent")


def test_missing_config_renders(experts_run: Path) -> None:
    (experts_run / "config.yaml").unlink()
    text = write_report(experts_run).read_text(encoding="utf-8")
    assert "This run directory has no config.yaml." in text


# Invalid result files


def test_missing_column_raises(tmp_path: Path) -> None:
    experts = expert_rows(EXPERT_TEST).drop(columns=["split"])
    run = write_run(tmp_path / "run", {"experts.csv": experts})
    with pytest.raises(ReportError, match=r"lacks the columns \['split'\]"):
        write_report(run)


def test_percent_accuracy_raises(tmp_path: Path) -> None:
    experts = expert_rows(EXPERT_TEST)
    experts["accuracy"] *= 100
    run = write_run(tmp_path / "run", {"experts.csv": experts})
    with pytest.raises(ReportError, match="outside \\[0, 1\\]"):
        write_report(run)


def test_non_numeric_raises(tmp_path: Path) -> None:
    experts = expert_rows(EXPERT_TEST).astype({"step": str})
    experts.loc[0, "step"] = "late"
    run = write_run(tmp_path / "run", {"experts.csv": experts})
    with pytest.raises(ReportError, match="non-numeric value in column 'step'"):
        write_report(run)


# Escaping and coefficient choice


def test_report_escapes_config_name(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", {"experts.csv": expert_rows(EXPERT_TEST)}, name="<b>bold</b>")
    text = write_report(run).read_text(encoding="utf-8")
    assert "<b>bold</b>" not in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text


def test_select_coefficients_on_validation() -> None:
    rows = []
    for coefficient, validation, test in ((0.3, 0.70, 0.50), (0.5, 0.60, 0.90)):
        for split, accuracy in (("validation", validation), ("test", test)):
            rows.append(
                {
                    "seed": 0,
                    "method": "ties",
                    "step": 10,
                    "coefficient": coefficient,
                    "task": "alpha",
                    "split": split,
                    "accuracy": accuracy,
                }
            )
    chosen = select_coefficients(pd.DataFrame(rows))
    assert chosen["coefficient"].unique().tolist() == [0.3]


def test_select_coefficients_needs_validation() -> None:
    rows = [
        {
            "seed": 0,
            "method": "ties",
            "step": 10,
            "coefficient": c,
            "task": "alpha",
            "split": "test",
            "accuracy": 0.5,
        }
        for c in (0.3, 0.5)
    ]
    with pytest.raises(ReportError, match="no validation rows"):
        select_coefficients(pd.DataFrame(rows))


# Figure helpers


def test_pooled_rate_weights_by_n() -> None:
    rows = pd.DataFrame({"decile_number": [3, 3], "n": [10, 30], "forgotten": [1, 9]})
    assert pooled_rate(rows)["rate"].tolist() == [0.25]


def test_interference_from_pair_rows(tmp_path: Path) -> None:
    pairs = interference_rows()
    pairs = pairs[pairs["metric"] == "cosine"]
    results = RunResults(tmp_path, {"interference.csv": pairs})
    drawn = interference_figure(results, kind="full")
    assert "mean cosine similarity" in drawn.caption
    assert "sign-conflict" not in drawn.caption


def test_interference_without_rows(tmp_path: Path) -> None:
    norms = interference_rows()
    norms = norms[norms["metric"] == "norm"]
    results = RunResults(tmp_path, {"interference.csv": norms})
    with pytest.raises(MissingData, match="no sign_conflict or cosine rows"):
        interference_figure(results, kind="full")


def test_summary_leaves_zero_shot_out_of_method_count(tmp_path: Path) -> None:
    merges = merge_rows()
    # The merge stage writes the base model's accuracy as method "zeroshot" at step 0.
    zero_shot = merges[merges["step"] == STEPS[0]].drop_duplicates(["seed", "task", "split"])
    zero_shot = zero_shot.assign(method="zeroshot", step=0, coefficient=0.0)
    run = write_run(tmp_path / "run", {"merges.csv": pd.concat([zero_shot, merges])})
    methods = merges["method"].nunique()
    assert f"Of the {methods} merging methods," in summary_paragraph(run)
