"""Conversion of in-memory datasets into the suite's folder format, with an injected loader."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import datasets
import pytest

from upcycle.data import TaskSource, load_task
from upcycle.data.textsuite import RECIPES, build_textsuite, convert_task
from upcycle.errors import ConfigError, DataError

RECIPE = {recipe.name: recipe for recipe in RECIPES}
TREC_NAMES = ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]
HATE_NAMES = ["non-hate", "hate"]


def labelled(texts: list[str], labels: list[int], names: list[str]) -> datasets.Dataset:
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)}
    )
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def trec_source() -> datasets.DatasetDict:
    """TREC as the Hub stores it: coarse_label is a ClassLabel in ABBR..NUM order."""
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "coarse_label": datasets.ClassLabel(names=TREC_NAMES),
            "fine_label": datasets.Value("int64"),
        }
    )

    def split(prefix: str, count: int) -> datasets.Dataset:
        rows = {
            "text": [f"{prefix} question {i} ?" for i in range(count)],
            "coarse_label": [i % 6 for i in range(count)],
            "fine_label": [0] * count,
        }
        return datasets.Dataset.from_dict(rows, features=features)

    return datasets.DatasetDict({"train": split("train", 20), "test": split("test", 6)})


def hate_source() -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {
            "train": labelled(["t0", "t1", "t2"], [0, 1, 0], HATE_NAMES),
            "validation": labelled(["v0", "v1"], [1, 0], HATE_NAMES),
            "test": labelled(["s0", "s1", "s2"], [1, 1, 0], HATE_NAMES),
        }
    )


SMALL_TREC = dataclasses.replace(RECIPE["trec"], validation_size=5)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_trec_validation_cut_from_train(tmp_path):
    entry = convert_task(SMALL_TREC, trec_source(), tmp_path, seed=0)
    train = read_jsonl(tmp_path / "trec" / "train.jsonl")
    validation = read_jsonl(tmp_path / "trec" / "validation.jsonl")
    cut_texts = {row["text"] for row in train} | {row["text"] for row in validation}
    assert len(train) == 15
    assert len(validation) == 5
    assert cut_texts == {f"train question {i} ?" for i in range(20)}
    assert entry["sizes"] == {"train": 15, "validation": 5, "test": 6}
    assert entry["splits"]["validation"] == "cut from source split 'train' with seed 0"


def test_trec_keeps_source_order(tmp_path):
    convert_task(SMALL_TREC, trec_source(), tmp_path, seed=0)
    for split in ("train", "validation"):
        numbers = [
            int(row["text"].split()[2]) for row in read_jsonl(tmp_path / "trec" / f"{split}.jsonl")
        ]
        assert numbers == sorted(numbers)


def test_trec_labels_mapped_by_name(tmp_path):
    convert_task(SMALL_TREC, trec_source(), tmp_path, seed=0)
    test = read_jsonl(tmp_path / "trec" / "test.jsonl")
    # Source ids 0..5 are ABBR, ENTY, DESC, HUM, LOC, NUM; the suite orders the classes
    # description, entity, abbreviation, human, location, number.
    assert [row["label"] for row in test] == [2, 1, 0, 3, 4, 5]
    assert [row["text"] for row in test] == [f"test question {i} ?" for i in range(6)]


def test_trec_labels_file(tmp_path):
    convert_task(SMALL_TREC, trec_source(), tmp_path, seed=0)
    labels = json.loads((tmp_path / "trec" / "labels.json").read_text(encoding="utf-8"))
    assert labels == ["description", "entity", "abbreviation", "human", "location", "number"]


def test_trec_cut_depends_on_seed(tmp_path):
    convert_task(SMALL_TREC, trec_source(), tmp_path / "a", seed=0)
    convert_task(SMALL_TREC, trec_source(), tmp_path / "b", seed=0)
    convert_task(SMALL_TREC, trec_source(), tmp_path / "c", seed=1)
    first = (tmp_path / "a" / "trec" / "validation.jsonl").read_text(encoding="utf-8")
    again = (tmp_path / "b" / "trec" / "validation.jsonl").read_text(encoding="utf-8")
    other = (tmp_path / "c" / "trec" / "validation.jsonl").read_text(encoding="utf-8")
    assert first == again
    assert first != other


def test_hate_official_splits(tmp_path):
    entry = convert_task(RECIPE["hate"], hate_source(), tmp_path, seed=0)
    folder = tmp_path / "hate"
    assert read_jsonl(folder / "train.jsonl") == [
        {"text": "t0", "label": 0},
        {"text": "t1", "label": 1},
        {"text": "t2", "label": 0},
    ]
    assert read_jsonl(folder / "validation.jsonl") == [
        {"text": "v0", "label": 1},
        {"text": "v1", "label": 0},
    ]
    assert [row["label"] for row in read_jsonl(folder / "test.jsonl")] == [1, 1, 0]
    assert json.loads((folder / "labels.json").read_text(encoding="utf-8")) == ["not-hate", "hate"]
    assert entry["splits"] == {
        "train": "source split 'train'",
        "validation": "source split 'validation'",
        "test": "source split 'test'",
    }


def test_build_writes_manifest(tmp_path):
    sources = {"trec": trec_source(), "hate": hate_source()}
    loaded = []

    def loader(recipe):
        loaded.append(recipe.name)
        return sources[recipe.name]

    # The full-size TREC recipe cuts 546 examples, more than the 20 here, so shrink the cut.
    recipes = [SMALL_TREC if recipe.name == "trec" else recipe for recipe in RECIPES]
    build_textsuite(tmp_path, tasks=["hate", "trec"], seed=0, loader=loader, recipes=recipes)
    manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert loaded == ["hate", "trec"]
    assert [entry["task"] for entry in manifest] == ["trec", "hate"]
    assert manifest[0]["classes"][0] == "description"
    assert manifest[0]["sizes"] == {"train": 15, "validation": 5, "test": 6}
    assert manifest[1]["sizes"] == {"train": 3, "validation": 2, "test": 3}
    assert manifest[1]["hub_id"] == "cardiffnlp/tweet_eval"
    assert manifest[1]["config_name"] == "hate"


def test_build_keeps_earlier_tasks(tmp_path):
    build_textsuite(tmp_path, tasks=["hate"], loader=lambda recipe: hate_source())
    emotion = {
        split: {"text": [f"{split} {i}" for i in range(4)], "label": [0, 1, 2, 3]}
        for split in ("train", "validation", "test")
    }
    manifest = build_textsuite(tmp_path, tasks=["emotion"], loader=lambda recipe: emotion)
    assert [entry["task"] for entry in manifest] == ["emotion", "hate"]
    assert (tmp_path / "hate" / "train.jsonl").is_file()


def test_built_task_loads(tmp_path):
    convert_task(RECIPE["hate"], hate_source(), tmp_path, seed=0)
    task = load_task(TaskSource(name="hate"), data_root=tmp_path)
    assert task.class_names == ["not-hate", "hate"]
    assert task.splits["test"].texts == ["s0", "s1", "s2"]
    assert task.splits["test"].labels == [1, 1, 0]


def test_blank_texts_dropped_and_counted(tmp_path):
    source = hate_source()
    source["train"] = labelled(["t0", " ", "t2", ""], [0, 1, 0, 1], HATE_NAMES)
    entry = convert_task(RECIPE["hate"], source, tmp_path, seed=0)
    assert [row["text"] for row in read_jsonl(tmp_path / "hate" / "train.jsonl")] == ["t0", "t2"]
    assert entry["dropped"] == {"train": 2}


def test_texts_written_exactly(tmp_path):
    source = hate_source()
    texts = ["  @user café \U0001f600 ", "line\nbreak", 'quote " and \\ slash']
    source["test"] = labelled(texts, [0, 1, 0], HATE_NAMES)
    convert_task(RECIPE["hate"], source, tmp_path, seed=0)
    assert [row["text"] for row in read_jsonl(tmp_path / "hate" / "test.jsonl")] == texts


def test_unmapped_label_rejected(tmp_path):
    source = hate_source()
    source["test"] = labelled(["a"], [0], ["offensive", "hate"])
    with pytest.raises(DataError, match="label 'offensive' is not in the label map"):
        convert_task(RECIPE["hate"], source, tmp_path, seed=0)


def test_missing_column_rejected(tmp_path):
    source = {"train": {"sentence": ["a"], "label": [0]}}
    with pytest.raises(DataError, match=r"has no column 'text'.*\['sentence', 'label'\]"):
        convert_task(RECIPE["emotion"], source, tmp_path, seed=0)


def test_missing_split_rejected(tmp_path):
    source = hate_source()
    del source["validation"]
    with pytest.raises(DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
        convert_task(RECIPE["hate"], source, tmp_path, seed=0)


def test_cut_larger_than_train_rejected(tmp_path):
    with pytest.raises(DataError, match="cannot cut 0 test and 546 validation examples from 20"):
        convert_task(RECIPE["trec"], trec_source(), tmp_path, seed=0)


def test_unknown_task_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown suite tasks \['sst5'\]"):
        build_textsuite(tmp_path, tasks=["sst5"], loader=lambda recipe: {})


def test_recipes_cover_suite():
    assert [recipe.name for recipe in RECIPES] == [
        "sst2",
        "trec",
        "subj",
        "cr",
        "emotion",
        "irony",
        "hate",
        "agnews",
    ]
    for recipe in RECIPES:
        mapped = set(recipe.label_map.values()) if recipe.label_map else set(recipe.class_names)
        assert mapped == set(recipe.class_names), recipe.name


def test_surrogate_text_rejected(tmp_path):
    source = hate_source()
    source["test"] = {"text": ["ok", "bad \ud800"], "label": ["non-hate", "hate"]}
    with pytest.raises(DataError, match="split 'test' row 1: text contains an unpaired surrogate"):
        convert_task(RECIPE["hate"], source, tmp_path, seed=0)
