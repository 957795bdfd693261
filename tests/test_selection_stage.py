"""The select stage, online stopping in the training loop, and merges of experts that stopped
at different steps, on tiny runs whose experts learn within 24 steps.

Expected steps and compute fractions are recomputed here from the run's own CSV files with
`apply_rule`, independently of `upcycle.selection.trajectory`.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from conftest import make_tiny_model, tiny_config_dict, tiny_vocabulary

from upcycle.cli import build_parser
from upcycle.config import parse_config
from upcycle.errors import ConfigError
from upcycle.pipeline import run_finetune, run_merge, run_select
from upcycle.selection import Evaluation, apply_rule, make_rule
from upcycle.selection.stage import options_from_arguments, summary_section
from upcycle.selection.trajectory import checkpoint_for
from upcycle.store import RunDir
from upcycle.workspace import Workspace

TASKS = ["topic", "mood", "topic2"]
STEPS = [4, 8, 12, 16, 24]
BUDGET = 24
METHODS = ["average", "task_arithmetic", "ties"]
COEFFICIENTS = [0.5, 1.0]
PLATEAU = {"window": 1, "threshold": 0.1}
RULES = {
    "patience": {"patience": 2},
    "plateau": PLATEAU,
    "learned-fraction": {"threshold": 1e-4},
    "gradient-concentration": {"threshold": 0.3},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny BERT whose tokenizer maps every word of the tiny suite to its own id."""
    from transformers import BertTokenizerFast

    folder = make_tiny_model(tmp_path_factory.mktemp("learnable-bert"))
    vocabulary = {word: index for index, word in enumerate(tiny_vocabulary())}
    BertTokenizerFast(vocab=vocabulary).save_pretrained(folder)
    return folder


def selection_config(model_dir, suite, **training):
    raw = tiny_config_dict(model_dir, suite)
    raw["training"].update(steps=BUDGET, checkpoint_steps=STEPS, learning_rate=5e-3, **training)
    raw["merging"] = {"methods": METHODS, "coefficients": COEFFICIENTS}
    raw["selection"] = {"rules": RULES, "merge_aware_methods": ["task_arithmetic"]}
    return parse_config(raw)


def new_workspace(config, run_dir) -> Workspace:
    ws = Workspace(config, run_dir)
    ws.run.prepare(config, ws.input_files())
    return ws


@pytest.fixture(scope="module")
def selected_run(model_dir, tiny_suite, tmp_path_factory):
    ws = new_workspace(selection_config(model_dir, tiny_suite), tmp_path_factory.mktemp("run"))
    run_finetune(ws, progress=False)
    run_merge(ws)
    run_select(ws)
    return ws


@pytest.fixture(scope="module")
def plateau_run(model_dir, tiny_suite, tmp_path_factory):
    """The same run, with the plateau rule stopping each expert during fine-tuning."""
    config = selection_config(
        model_dir, tiny_suite, stopping={"rule": "plateau", "params": PLATEAU}
    )
    ws = new_workspace(config, tmp_path_factory.mktemp("plateau-run"))
    run_finetune(ws, progress=False)
    run_merge(ws)
    run_select(ws)
    return ws


def trajectory(run_dir, task: str, *, zero_shot: bool = False) -> list[Evaluation]:
    """One task's evaluations, read straight from experts.csv and difficulty.csv."""
    experts = pd.read_csv(run_dir / "results/experts.csv")
    rows = experts[(experts["task"] == task) & (experts["split"] == "validation")]
    difficulty = pd.read_csv(run_dir / "results/difficulty.csv").set_index(["task", "step"])
    evaluations = []
    for row in rows.sort_values("step").itertuples():
        if row.step == 0:
            if zero_shot:
                evaluations.append(Evaluation(step=0, validation_accuracy=row.accuracy))
            continue
        statistics = difficulty.loc[(task, row.step)]
        evaluations.append(
            Evaluation(
                step=row.step,
                validation_accuracy=row.accuracy,
                learned_fraction=statistics["learned_fraction"],
                grad_concentration_top5=statistics["grad_concentration_top5"],
            )
        )
    return evaluations


def selection_row(run_dir, method: str, strategy: str) -> pd.Series:
    table = pd.read_csv(run_dir / "results/selection.csv")
    rows = table[(table["method"] == method) & (table["strategy"] == strategy)]
    assert len(rows) == 1, (method, strategy)
    return rows.iloc[0]


def merge_means(run_dir, method: str, split: str) -> pd.Series:
    merges = pd.read_csv(run_dir / "results/merges.csv")
    rows = merges[(merges["method"] == method) & (merges["split"] == split)]
    return rows.groupby("step")["accuracy"].mean()


# Offline comparison


def test_selection_has_every_strategy(selected_run):
    table = pd.read_csv(selected_run.run.root / "results/selection.csv")
    expected = ["final", "best-individual", *(f"rule:{name}" for name in RULES), "best-common"]
    for method in METHODS:
        strategies = list(table.loc[table["method"] == method, "strategy"])
        if method == "task_arithmetic":
            assert strategies == [*expected, "merge-aware"]
        else:
            assert strategies == expected
    assert set(table["kind"]) == {"full"}
    assert set(table["seed"]) == {0}


def test_final_is_last_step(selected_run):
    run_dir = selected_run.run.root
    for method in METHODS:
        row = selection_row(run_dir, method, "final")
        assert json.loads(row["steps"]) == {task: BUDGET for task in TASKS}
        assert row["compute_fraction"] == 1.0
        assert row["merges_evaluated"] == 0
        assert row["test_accuracy"] == pytest.approx(merge_means(run_dir, method, "test")[BUDGET])


def test_best_individual_by_hand(selected_run):
    run_dir = selected_run.run.root
    best = {}
    for task in TASKS:
        evaluations = trajectory(run_dir, task)
        top = max(evaluation.validation_accuracy for evaluation in evaluations)
        best[task] = next(e.step for e in evaluations if e.validation_accuracy == top)
    row = selection_row(run_dir, "ties", "best-individual")
    assert json.loads(row["steps"]) == best
    assert row["compute_fraction"] == pytest.approx(sum(best.values()) / (3 * BUDGET))


@pytest.mark.parametrize("name", list(RULES))
def test_rule_steps_by_hand(selected_run, name):
    run_dir = selected_run.run.root
    rule = make_rule(name, **RULES[name])
    chosen, spent = {}, {}
    for task in TASKS:
        evaluations = trajectory(run_dir, task, zero_shot=name == "plateau")
        result = apply_rule(rule, evaluations)
        chosen[task] = result.chosen_step
        spent[task] = result.stopped_step if result.stopped_step is not None else BUDGET
    row = selection_row(run_dir, "average", f"rule:{name}")
    assert json.loads(row["steps"]) == chosen
    assert row["compute_fraction"] == pytest.approx(sum(spent.values()) / (3 * BUDGET))
    assert row["merges_evaluated"] == 0


def test_best_common_from_merge_stage(selected_run):
    run_dir = selected_run.run.root
    for method, grid_size in (("average", 1), ("task_arithmetic", 2), ("ties", 2)):
        validation = merge_means(run_dir, method, "validation")
        best_step = int(validation.idxmax())
        row = selection_row(run_dir, method, "best-common")
        assert json.loads(row["steps"]) == {task: best_step for task in TASKS}
        assert row["compute_fraction"] == pytest.approx(best_step / BUDGET)
        assert row["validation_accuracy"] == pytest.approx(validation.max())
        assert row["test_accuracy"] == pytest.approx(
            merge_means(run_dir, method, "test")[best_step]
        )
        assert row["merges_evaluated"] == len(STEPS) * grid_size


def test_merge_aware_beats_common(selected_run):
    run_dir = selected_run.run.root
    common = selection_row(run_dir, "task_arithmetic", "best-common")
    aware = selection_row(run_dir, "task_arithmetic", "merge-aware")
    steps = json.loads(aware["steps"])
    assert set(steps) == set(TASKS)
    assert aware["validation_accuracy"] >= common["validation_accuracy"]
    assert aware["merges_evaluated"] > common["merges_evaluated"]
    assert aware["compute_fraction"] == pytest.approx(sum(steps.values()) / (3 * BUDGET))


def test_comparison_marked_and_resumed(selected_run):
    unit = selected_run.run.root / "selection/full/seed0/ties.csv"
    modified = unit.stat().st_mtime_ns
    run_select(selected_run)
    assert unit.stat().st_mtime_ns == modified
    assert selected_run.run.is_complete("select/comparison")


def test_summary_lists_strategies(selected_run):
    text = "\n".join(summary_section(selected_run.run))
    assert "## Full fine-tuning: checkpoint selection" in text
    assert "| strategy | average | task_arithmetic | ties |" in text
    assert "| merge-aware | – |" in text
    row = selection_row(selected_run.run.root, "ties", "final")
    assert "| final | " in text
    assert f"{100 * row['test_accuracy']:.1f} (100%)" in text
    assert "Values are from seed 0." in text


def test_summary_names_all_seeds(tmp_path):
    run = RunDir(tmp_path / "run")
    rows = pd.DataFrame(
        {
            "seed": [0, 3],
            "kind": ["full", "full"],
            "method": ["ties", "ties"],
            "strategy": ["final", "final"],
            "steps": ['{"a": 4}', '{"a": 4}'],
            "compute_fraction": [1.0, 1.0],
            "validation_accuracy": [0.5, 0.7],
            "test_accuracy": [0.6, 0.8],
            "merges_evaluated": [0, 0],
        }
    )
    run.write_result("selection.csv", rows)
    text = "\n".join(summary_section(run))
    assert "Means over seeds 0, 3." in text
    assert "| final | 70.0 (100%) |" in text


# One rule


def test_rule_option_writes_chosen_steps(selected_run):
    run_dir = selected_run.run.root
    run_select(selected_run, rule="plateau", params=PLATEAU)
    run_select(selected_run, rule="patience", params={"patience": 1})
    run_select(selected_run, rule="plateau", params=PLATEAU)
    table = pd.read_csv(run_dir / "results/selected_steps.csv")
    assert len(table) == 2 * len(TASKS)
    plateau = table[table["rule"] == "plateau"].set_index("task")
    assert set(plateau["params"]) == {json.dumps({"threshold": 0.1, "window": 1})}
    for task in TASKS:
        result = apply_rule(
            make_rule("plateau", **PLATEAU), trajectory(run_dir, task, zero_shot=True)
        )
        stopped = result.stopped_step
        assert plateau.loc[task, "chosen_step"] == result.chosen_step
        if stopped is None:
            assert pd.isna(plateau.loc[task, "stopped_step"])
        else:
            assert plateau.loc[task, "stopped_step"] == stopped
        spent = stopped if stopped is not None else BUDGET
        assert plateau.loc[task, "compute_fraction"] == pytest.approx(spent / BUDGET)


def test_rule_arguments_parsed():
    args = build_parser().parse_args(
        ["select", "RUN", "--rule", "plateau", "--param", "window=2", "--param", "threshold=0.2"]
    )
    assert options_from_arguments(args) == {
        "rule": "plateau",
        "params": {"window": 2, "threshold": 0.2},
    }


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--param", "window=2"], "--param needs --rule NAME"),
        (["--rule", "plateau", "--param", "window"], "--param 'window' is invalid"),
        (["--rule", "plateau", "--param", "window=wide"], "--param 'window=wide' is invalid"),
        (["--rule", "early"], "unknown stopping rule 'early'"),
    ],
)
def test_rule_arguments_rejected(arguments, message):
    args = build_parser().parse_args(["select", "RUN", *arguments])
    with pytest.raises(ConfigError, match=message):
        options_from_arguments(args)


# Online stopping


def test_fixed_rule_stops_at_budget(model_dir, tiny_suite, tmp_path):
    config = selection_config(
        model_dir, tiny_suite, stopping={"rule": "fixed", "params": {"step": 8}}
    )
    config.data.tasks = config.data.tasks[:1]
    ws = new_workspace(config, tmp_path)
    run_finetune(ws, progress=False)
    folder = ws.run.expert_dir("full", "topic", 0)
    assert sorted(path.name for path in folder.glob("step*.safetensors")) == [
        "step4.safetensors",
        "step8.safetensors",
    ]
    entry = ws.run.read_manifest()["completed"]["finetune/full/topic/seed0"]
    assert entry["stopped_step"] == 8
    assert entry["chosen_step"] == 8
    assert entry["checkpoint_steps"] == [4, 8]
    accuracy = pd.read_csv(folder / "accuracy.csv")
    assert sorted(accuracy["step"].unique()) == [4, 8]
    assert sorted(pd.read_csv(folder / "difficulty.csv")["step"]) == [4, 8]
    assert (folder / "examples.parquet").is_file()
    assert not (folder / "training_state.pt").exists()


def test_stopped_expert_not_retrained(model_dir, tiny_suite, tmp_path):
    config = selection_config(
        model_dir, tiny_suite, stopping={"rule": "fixed", "params": {"step": 4}}
    )
    config.data.tasks = config.data.tasks[:1]
    ws = new_workspace(config, tmp_path)
    run_finetune(ws, progress=False)
    path = ws.run.checkpoint_path("full", "topic", 0, 4)
    modified = path.stat().st_mtime_ns
    run_finetune(ws, progress=False)
    assert path.stat().st_mtime_ns == modified


def test_plateau_stops_where_offline_rule_does(selected_run, plateau_run):
    completed = plateau_run.run.read_manifest()["completed"]
    stops = {}
    for task in TASKS:
        offline = apply_rule(
            make_rule("plateau", **PLATEAU), trajectory(selected_run.run.root, task, zero_shot=True)
        )
        entry = completed[f"finetune/full/{task}/seed0"]
        assert entry["stopped_step"] == offline.stopped_step, task
        assert entry["chosen_step"] == offline.chosen_step, task
        stops[task] = entry["stopped_step"]
        saved = sorted(
            int(path.stem.removeprefix("step"))
            for path in plateau_run.run.expert_dir("full", task, 0).glob("step*.safetensors")
        )
        last = stops[task] if stops[task] is not None else BUDGET
        assert saved == [step for step in STEPS if step <= last], task
    # The tiny tasks stop at different steps, which the merge tests below rely on.
    assert len(set(stops.values())) > 1


def test_checkpoint_for_stopped_expert(plateau_run):
    for task in TASKS:
        entry = plateau_run.run.read_manifest()["completed"][f"finetune/full/{task}/seed0"]
        for step in STEPS:
            stopped = entry["stopped_step"]
            expected = entry["chosen_step"] if stopped is not None and step > stopped else step
            assert checkpoint_for(plateau_run, "full", task, 0, step) == expected, (task, step)


def test_checkpoint_for_unfinished_expert(plateau_run):
    assert checkpoint_for(plateau_run, "lora", "topic", 0, 24) == 24


def test_merge_uses_stopped_checkpoints(plateau_run):
    run_dir = plateau_run.run.root
    merges = pd.read_csv(run_dir / "results/merges.csv")
    experts = pd.read_csv(run_dir / "results/experts.csv").set_index(["task", "step", "split"])
    assert sorted(merges.loc[merges["method"] == "ties", "step"].unique()) == STEPS
    final = merges[(merges["method"] == "ties") & (merges["step"] == BUDGET)]
    assert len(final) == 2 * len(TASKS)
    for row in final.itertuples():
        step = checkpoint_for(plateau_run, "full", row.task, 0, BUDGET)
        assert row.expert_accuracy == pytest.approx(
            experts.loc[(row.task, step, row.split), "accuracy"]
        )


def test_selection_on_stopped_run(plateau_run):
    run_dir = plateau_run.run.root
    completed = plateau_run.run.read_manifest()["completed"]
    last = {
        task: completed[f"finetune/full/{task}/seed0"]["stopped_step"] or BUDGET for task in TASKS
    }
    row = selection_row(run_dir, "ties", "final")
    chosen = {task: completed[f"finetune/full/{task}/seed0"]["chosen_step"] for task in TASKS}
    assert json.loads(row["steps"]) == chosen
    assert row["compute_fraction"] == pytest.approx(sum(last.values()) / (3 * BUDGET))
