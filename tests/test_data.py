"""Task loading: every format, labels, subsampling, the data root and the error messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import pydantic
import pytest

from upcycle.data import (
    SPLITS,
    Split,
    Task,
    TaskSource,
    check_unique_task_names,
    load_task,
    resolve_data_root,
)
from upcycle.data.loaders import subsample_split
from upcycle.errors import ConfigError, DataError

REAL_SUITE = Path(os.environ.get("UPCYCLE_DATA") or "/work/shared/data/textsuite")

TRAIN = [("good film", 1), ("bad film", 0), ("fine acting", 1)]
VALIDATION = [("dull plot", 0), ("great cast", 1)]
TEST = [("awful", 0), ("lovely", 1)]


def jsonl(rows: list[tuple[object, object]]) -> str:
    return "".join(json.dumps({"text": text, "label": label}) + "\n" for text, label in rows)


def write_folder_task(
    root: Path, name: str = "toy", labels: object = ("negative", "positive")
) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for split, rows in zip(SPLITS, (TRAIN, VALIDATION, TEST), strict=True):
        (folder / f"{split}.jsonl").write_text(jsonl(rows), encoding="utf-8")
    if labels is not None:
        (folder / "labels.json").write_text(json.dumps(list(labels)), encoding="utf-8")
    return folder


def load(root: Path, **fields: object) -> Task:
    fields.setdefault("name", "toy")
    return load_task(TaskSource(**fields), data_root=root)


def load_error(root: Path, **fields: object) -> str:
    with pytest.raises(DataError) as info:
        load(root, **fields)
    return str(info.value)


# --- formats -------------------------------------------------------------------------------


def test_folder_format_loads_splits(tmp_path):
    write_folder_task(tmp_path)
    task = load(tmp_path)
    assert task.name == "toy"
    assert task.class_names == ["negative", "positive"]
    assert task.splits["train"] == Split(
        texts=["good film", "bad film", "fine acting"], labels=[1, 0, 1]
    )
    assert task.splits["validation"] == Split(texts=["dull plot", "great cast"], labels=[0, 1])
    assert task.splits["test"] == Split(texts=["awful", "lovely"], labels=[0, 1])


def test_folder_keeps_texts_exactly(tmp_path):
    folder = write_folder_task(tmp_path)
    texts = ["  padded  ", "tab\tinside", "line\u2028separator", "caf\u00e9 \U0001f600", "a\nb"]
    rows = [(text, i % 2) for i, text in enumerate(texts)]
    # Blank lines and CRLF line ends are layout, not examples.
    content = "\r\n".join(json.dumps({"text": t, "label": y}) for t, y in rows) + "\r\n\n  \n"
    (folder / "train.jsonl").write_text(content, encoding="utf-8", newline="")
    task = load(tmp_path)
    assert task.splits["train"].texts == texts
    assert task.splits["train"].labels == [0, 1, 0, 1, 0]


def test_folder_labels_option_overrides_file(tmp_path):
    write_folder_task(tmp_path, labels=["x", "y"])
    task = load(tmp_path, labels=["neg", "pos"])
    assert task.class_names == ["neg", "pos"]


def test_folder_explicit_path(tmp_path):
    write_folder_task(tmp_path / "elsewhere", name="data")
    absolute = load_task(
        TaskSource(name="toy", path=str(tmp_path / "elsewhere" / "data")), data_root=None
    )
    relative = load(tmp_path, path="elsewhere/data")
    assert absolute.splits["test"].texts == ["awful", "lovely"]
    assert relative.splits["test"].texts == ["awful", "lovely"]


def test_jsonl_custom_columns_and_files(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    rows = [{"sentence": "one", "y": "pos", "id": 7}, {"sentence": "two", "y": "neg", "id": 8}]
    content = "".join(json.dumps(row) + "\n" for row in rows)
    for name in ("tr.jsonl", "dev.jsonl", "te.jsonl"):
        (folder / name).write_text(content, encoding="utf-8")
    task = load(
        tmp_path,
        format="jsonl",
        splits={"train": "tr.jsonl", "validation": "dev.jsonl", "test": "te.jsonl"},
        text_column="sentence",
        label_column="y",
        labels=["neg", "pos"],
    )
    assert task.splits["validation"] == Split(texts=["one", "two"], labels=[1, 0])


def test_jsonl_reads_labels_file(tmp_path):
    folder = write_folder_task(tmp_path)
    task = load(tmp_path, format="jsonl")
    assert task.class_names == ["negative", "positive"]
    assert folder.is_dir()


def test_label_names_and_ids_mix(tmp_path):
    folder = write_folder_task(tmp_path, labels=["negative", "positive", "neutral"])
    rows = [("a", "neutral"), ("b", 0), ("c", "positive"), ("d", "1"), ("e", 2)]
    (folder / "train.jsonl").write_text(jsonl(rows), encoding="utf-8")
    task = load(tmp_path)
    assert task.splits["train"].labels == [2, 0, 1, 1, 2]


def test_digit_class_name_wins_over_id(tmp_path):
    folder = write_folder_task(tmp_path, labels=["1", "0"])
    (folder / "train.jsonl").write_text(jsonl([("a", "1"), ("b", 1)]), encoding="utf-8")
    task = load(tmp_path)
    assert task.splits["train"].labels == [0, 1]


def write_delimited(folder: Path, extension: str, content: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        (folder / f"{split}.{extension}").write_text(content, encoding="utf-8", newline="")


def test_csv_quoting_and_labels(tmp_path):
    content = (
        "id,text,label\r\n"
        '1,"comma, inside",positive\r\n'
        '2,"say ""hi""",0\r\n'
        '3,"two\nlines",1\r\n'
        "\r\n"
        "4, spaced ,negative\r\n"
    )
    write_delimited(tmp_path / "toy", "csv", content)
    task = load(tmp_path, format="csv", labels=["negative", "positive"])
    assert task.splits["train"].texts == ["comma, inside", 'say "hi"', "two\nlines", " spaced "]
    assert task.splits["train"].labels == [1, 0, 1, 0]


def test_tsv_format(tmp_path):
    content = 'label\ttext\nneg\ta, b\npos\t"tab\tquoted"\n'
    write_delimited(tmp_path / "toy", "tsv", content)
    task = load(tmp_path, format="tsv", labels=["neg", "pos"])
    assert task.splits["test"] == Split(texts=["a, b", "tab\tquoted"], labels=[0, 1])


def test_csv_with_byte_order_mark(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    for split in SPLITS:
        (folder / f"{split}.csv").write_bytes(b"\xef\xbb\xbftext,label\nhello,1\n")
    task = load(tmp_path, format="csv", labels=["a", "b"])
    assert task.splits["train"] == Split(texts=["hello"], labels=[1])


def toy_dataset(rows: list[tuple[str, int]], names: list[str] | None) -> datasets.Dataset:
    label_feature = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
    features = datasets.Features({"text": datasets.Value("string"), "label": label_feature})
    texts, labels = zip(*rows, strict=True)
    return datasets.Dataset.from_dict({"text": texts, "label": labels}, features=features)


def toy_dataset_dict(names: list[str] | None = None) -> datasets.DatasetDict:
    return datasets.DatasetDict(
        {
            split: toy_dataset(rows, names)
            for split, rows in zip(SPLITS, (TRAIN, VALIDATION, TEST), strict=True)
        }
    )


def test_hf_saved_dataset_dict(tmp_path):
    toy_dataset_dict(["neg", "pos"]).save_to_disk(str(tmp_path / "toy"))
    task = load(tmp_path, format="hf")
    assert task.class_names == ["neg", "pos"]
    assert task.splits["train"] == Split(
        texts=["good film", "bad film", "fine acting"], labels=[1, 0, 1]
    )


def test_hf_saved_dataset_per_split(tmp_path):
    names = {"train": "tr", "validation": "va", "test": "te"}
    for split, rows in zip(SPLITS, (TRAIN, VALIDATION, TEST), strict=True):
        toy_dataset(rows, None).save_to_disk(str(tmp_path / "saved" / names[split]))
    task = load(tmp_path, format="hf", path="saved", splits=names, labels=["neg", "pos"])
    assert task.splits["validation"] == Split(texts=["dull plot", "great cast"], labels=[0, 1])


def test_hf_local_csv_files(tmp_path):
    content = "text,label\nfirst,b\nsecond,a\n"
    write_delimited(tmp_path / "csvset", "csv", content)
    task = load(tmp_path, format="hf", path=str(tmp_path / "csvset"), labels=["a", "b"])
    assert task.splits["test"] == Split(texts=["first", "second"], labels=[1, 0])


def test_hf_single_dataset_rejected(tmp_path):
    toy_dataset(TRAIN, ["neg", "pos"]).save_to_disk(str(tmp_path / "toy"))
    message = load_error(tmp_path, format="hf")
    assert "one saved Dataset without splits" in message


def test_hf_missing_split_lists_available(tmp_path):
    toy_dataset_dict(["neg", "pos"]).save_to_disk(str(tmp_path / "toy"))
    message = load_error(tmp_path, format="hf", splits={"validation": "dev"})
    assert "no split 'dev'" in message
    assert "['test', 'train', 'validation']" in message


def test_hf_missing_column_lists_columns(tmp_path):
    toy_dataset_dict(["neg", "pos"]).save_to_disk(str(tmp_path / "toy"))
    message = load_error(tmp_path, format="hf", text_column="sentence")
    assert "no column 'sentence'" in message
    assert "['text', 'label']" in message


def test_hf_plain_labels_need_class_names(tmp_path):
    toy_dataset_dict(None).save_to_disk(str(tmp_path / "toy"))
    message = load_error(tmp_path, format="hf")
    assert "is not a ClassLabel" in message


def test_hf_label_out_of_range_names_row(tmp_path):
    dataset = toy_dataset_dict(None)
    dataset["test"] = toy_dataset([("a", 0), ("b", -1)], None)
    dataset.save_to_disk(str(tmp_path / "toy"))
    message = load_error(tmp_path, format="hf", labels=["neg", "pos"])
    assert "split 'test' row 1: label -1 is outside range(2)" in message


def test_hf_load_failure_suggests_local_path(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    message = load_error(tmp_path, format="hf", path="someone/missing")
    assert "failed to load dataset 'someone/missing'" in message
    assert "set the task's path to that folder" in message


def test_hf_missing_absolute_path(tmp_path):
    message = load_error(tmp_path, format="hf", path=str(tmp_path / "absent"))
    assert f"dataset folder not found: {tmp_path / 'absent'}" in message


# --- subsampling ---------------------------------------------------------------------------


def big_task(root: Path, size: int = 50) -> None:
    folder = write_folder_task(root)
    rows = [(f"example {i}", i % 2) for i in range(size)]
    (folder / "train.jsonl").write_text(jsonl(rows), encoding="utf-8")


def subsample(root: Path, limit: int, seed: int) -> Task:
    limits = {"train": limit, "validation": None}
    return load_task(TaskSource(name="toy"), data_root=root, max_examples=limits, seed=seed)


def test_subsample_size_and_order(tmp_path):
    big_task(tmp_path)
    train = subsample(tmp_path, 10, seed=0).splits["train"]
    indices = [int(text.split()[1]) for text in train.texts]
    assert len(train) == 10
    assert indices == sorted(indices)
    assert train.labels == [i % 2 for i in indices]


def test_subsample_deterministic(tmp_path):
    big_task(tmp_path)
    first = subsample(tmp_path, 10, seed=3).splits["train"]
    second = subsample(tmp_path, 10, seed=3).splits["train"]
    assert first == second


def test_subsample_seed_changes_draw(tmp_path):
    big_task(tmp_path)
    first = subsample(tmp_path, 10, seed=0).splits["train"]
    other = subsample(tmp_path, 10, seed=1).splits["train"]
    assert first.texts != other.texts


def test_subsample_small_split_kept(tmp_path):
    big_task(tmp_path)
    task = subsample(tmp_path, 10, seed=0)
    assert task.splits["validation"].texts == ["dull plot", "great cast"]
    assert len(subsample(tmp_path, 50, seed=0).splits["train"]) == 50


def test_subsample_key_changes_draw():
    split = Split(texts=[str(i) for i in range(100)], labels=[0] * 100)
    first = subsample_split(split, 5, seed=0, key="a/train")
    other = subsample_split(split, 5, seed=0, key="b/train")
    assert first.texts != other.texts


def test_subsample_rejects_bad_limits(tmp_path):
    big_task(tmp_path)
    source = TaskSource(name="toy")
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        load_task(source, data_root=tmp_path, max_examples={"dev": 3})
    with pytest.raises(ConfigError, match=r"max_examples\['train'\] must be None or >= 1"):
        load_task(source, data_root=tmp_path, max_examples={"train": 0})
    with pytest.raises(ConfigError, match="seed must be an integer >= 0"):
        load_task(source, data_root=tmp_path, seed=-1)


# --- data root -----------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path):
    for name in ("config", "cli", "env"):
        (tmp_path / name).mkdir()
    return tmp_path


def test_data_root_config_wins(roots):
    env = {"UPCYCLE_DATA": str(roots / "env")}
    assert resolve_data_root(str(roots / "config"), str(roots / "cli"), env) == roots / "config"


def test_data_root_cli_before_env(roots):
    env = {"UPCYCLE_DATA": str(roots / "env")}
    assert resolve_data_root(None, str(roots / "cli"), env) == roots / "cli"


def test_data_root_env_last(roots, monkeypatch):
    monkeypatch.setenv("UPCYCLE_DATA", str(roots / "env"))
    assert resolve_data_root(None, None) == roots / "env"


def test_data_root_unset(monkeypatch):
    monkeypatch.delenv("UPCYCLE_DATA", raising=False)
    assert resolve_data_root(None, None) is None
    assert resolve_data_root("", None, {"UPCYCLE_DATA": ""}) is None


@pytest.mark.parametrize(
    ("config_root", "cli_root", "env_root", "origin"),
    [
        ("missing", None, None, "config key data.root"),
        (None, "missing", None, "option --data"),
        (None, None, "missing", "environment variable UPCYCLE_DATA"),
    ],
)
def test_data_root_missing_names_origin(tmp_path, config_root, cli_root, env_root, origin):
    def absent(value: str | None) -> str | None:
        return str(tmp_path / value) if value else None

    env = {"UPCYCLE_DATA": absent(env_root)} if env_root else {}
    with pytest.raises(DataError) as info:
        resolve_data_root(absent(config_root), absent(cli_root), env)
    assert origin in str(info.value)
    assert str(tmp_path / "missing") in str(info.value)


# --- task sources --------------------------------------------------------------------------


def test_source_rejects_unknown_key():
    with pytest.raises(pydantic.ValidationError, match="extra_forbidden|Extra inputs"):
        TaskSource(name="toy", labelz=["a", "b"])


@pytest.mark.parametrize("name", ["", "a/b", "has space", "../up", "caf\u00e9"])
def test_source_rejects_bad_name(name):
    with pytest.raises(pydantic.ValidationError, match="letters, digits"):
        TaskSource(name=name)


def test_source_rejects_bad_labels():
    with pytest.raises(pydantic.ValidationError, match="at least two classes"):
        TaskSource(name="toy", labels=["only"])
    with pytest.raises(pydantic.ValidationError, match="duplicate class names"):
        TaskSource(name="toy", labels=["a", "b", "a"])


def test_source_default_split_names():
    assert TaskSource(name="t", format="csv", splits={"test": "eval.csv"}).split_names() == {
        "train": "train.csv",
        "validation": "validation.csv",
        "test": "eval.csv",
    }
    assert TaskSource(name="t", format="hf").split_names()["validation"] == "validation"


def test_unique_task_names():
    sources = [TaskSource(name="a"), TaskSource(name="b"), TaskSource(name="a")]
    with pytest.raises(DataError, match=r"duplicate task names \['a'\]"):
        check_unique_task_names(sources)
    check_unique_task_names(sources[:2])


# --- errors --------------------------------------------------------------------------------


def test_error_missing_split_file(tmp_path):
    folder = write_folder_task(tmp_path)
    (folder / "validation.jsonl").unlink()
    message = load_error(tmp_path)
    assert f"validation split file not found: {folder / 'validation.jsonl'}" in message
    assert "task 'toy'" in message


def test_error_missing_task_folder(tmp_path):
    message = load_error(tmp_path)
    assert f"task folder not found: {tmp_path / 'toy'}" in message


def test_error_no_data_root():
    with pytest.raises(DataError, match="no data root is set"):
        load_task(TaskSource(name="toy"), data_root=None)


def test_error_missing_labels_file(tmp_path):
    folder = write_folder_task(tmp_path, labels=None)
    message = load_error(tmp_path)
    assert f"class list not found: {folder / 'labels.json'}" in message
    assert "set `labels`" in message


def test_error_jsonl_without_class_list(tmp_path):
    write_folder_task(tmp_path, labels=None)
    assert "has no class list" in load_error(tmp_path, format="jsonl")


def test_error_malformed_json_line(tmp_path):
    folder = write_folder_task(tmp_path)
    path = folder / "train.jsonl"
    path.write_text(jsonl(TRAIN[:2]) + '{"text": "cut', encoding="utf-8")
    message = load_error(tmp_path)
    assert f"{path}:3: invalid JSON in task 'toy'" in message


def test_error_json_line_not_object(tmp_path):
    folder = write_folder_task(tmp_path)
    path = folder / "test.jsonl"
    path.write_text(jsonl(TEST) + '["text", 1]\n', encoding="utf-8")
    message = load_error(tmp_path)
    assert f"{path}:3: expected a JSON object" in message
    assert "got list" in message


def test_error_json_missing_column(tmp_path):
    folder = write_folder_task(tmp_path)
    path = folder / "train.jsonl"
    path.write_text('{"sentence": "x", "label": 0}\n', encoding="utf-8")
    message = load_error(tmp_path)
    assert f"{path}:1: missing column 'text'" in message
    assert "['label', 'sentence']" in message


def test_error_csv_wrong_field_count(tmp_path):
    write_delimited(tmp_path / "toy", "csv", "text,label\nfine,0\ntoo,many,1\n")
    message = load_error(tmp_path, format="csv", labels=["a", "b"])
    assert f"{tmp_path / 'toy' / 'train.csv'}:3: expected 2 fields" in message
    assert "found 3" in message


def test_error_csv_line_after_quoted_newline(tmp_path):
    write_delimited(tmp_path / "toy", "csv", 'text,label\n"multi\nline",0\nshort\n')
    message = load_error(tmp_path, format="csv", labels=["a", "b"])
    assert f"{tmp_path / 'toy' / 'train.csv'}:4: expected 2 fields" in message


def test_error_csv_bad_quoting(tmp_path):
    write_delimited(tmp_path / "toy", "csv", 'text,label\n"open quote,0\n')
    message = load_error(tmp_path, format="csv", labels=["a", "b"])
    assert f"{tmp_path / 'toy' / 'train.csv'}:" in message
    assert "malformed CSV" in message


def test_error_csv_missing_header_column(tmp_path):
    write_delimited(tmp_path / "toy", "csv", "sentence,label\nx,0\n")
    message = load_error(tmp_path, format="csv", labels=["a", "b"])
    assert f"{tmp_path / 'toy' / 'train.csv'}:1: column 'text' is missing" in message


def test_error_csv_empty_file(tmp_path):
    write_delimited(tmp_path / "toy", "csv", "")
    message = load_error(tmp_path, format="csv", labels=["a", "b"])
    assert f"{tmp_path / 'toy' / 'train.csv'}: the file is empty" in message


def test_error_label_id_out_of_range(tmp_path):
    folder = write_folder_task(tmp_path)
    path = folder / "validation.jsonl"
    path.write_text(jsonl([("ok", 1), ("bad", 2)]), encoding="utf-8")
    message = load_error(tmp_path)
    assert f"{path}:2: label 2 is outside range(2)" in message
    assert "['negative', 'positive']" in message


def test_error_unknown_label_name(tmp_path):
    folder = write_folder_task(tmp_path)
    path = folder / "train.jsonl"
    path.write_text(jsonl([("ok", "positive"), ("bad", "postive")]), encoding="utf-8")
    message = load_error(tmp_path)
    assert f"{path}:2: unknown label 'postive'" in message
    assert "['negative', 'positive']" in message


@pytest.mark.parametrize("label", [1.0, True, None, [1]])
def test_error_label_wrong_type(tmp_path, label):
    folder = write_folder_task(tmp_path)
    path = folder / "train.jsonl"
    path.write_text(jsonl([("text", label)]), encoding="utf-8")
    message = load_error(tmp_path)
    assert f"{path}:1: label must be an integer id or a class name" in message


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_error_blank_text(tmp_path, text):
    folder = write_folder_task(tmp_path)
    path = folder / "test.jsonl"
    path.write_text(jsonl([("ok", 0), (text, 1)]), encoding="utf-8")
    message = load_error(tmp_path)
    assert f"{path}:2: empty or whitespace-only text" in message


def test_error_text_not_string(tmp_path):
    folder = write_folder_task(tmp_path)
    path = folder / "test.jsonl"
    path.write_text(jsonl([(12, 0)]), encoding="utf-8")
    assert f"{path}:1: text must be a string" in load_error(tmp_path)


def test_error_unpaired_surrogate(tmp_path):
    folder = write_folder_task(tmp_path)
    path = folder / "test.jsonl"
    path.write_text('{"text": "a\\ud800", "label": 0}\n', encoding="utf-8")
    assert f"{path}:1: text contains an unpaired surrogate" in load_error(tmp_path)


def test_error_one_class(tmp_path):
    folder = write_folder_task(tmp_path, labels=["only"])
    message = load_error(tmp_path)
    assert f"{folder / 'labels.json'}: invalid class list" in message
    assert "at least two classes" in message


def test_error_duplicate_class_names(tmp_path):
    write_folder_task(tmp_path, labels=["a", "b", "a"])
    assert "duplicate class names ['a']" in load_error(tmp_path)


@pytest.mark.parametrize("content", ['{"a": 1}', '["a", 2]', '"ab"', "[]"])
def test_error_labels_not_string_list(tmp_path, content):
    folder = write_folder_task(tmp_path)
    (folder / "labels.json").write_text(content, encoding="utf-8")
    assert f"{folder / 'labels.json'}: invalid class list" in load_error(tmp_path)


def test_error_labels_invalid_json(tmp_path):
    folder = write_folder_task(tmp_path)
    (folder / "labels.json").write_text('["a",\n "b"', encoding="utf-8")
    assert f"{folder / 'labels.json'}:2: invalid JSON" in load_error(tmp_path)


def test_error_empty_split(tmp_path):
    folder = write_folder_task(tmp_path)
    path = folder / "validation.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    message = load_error(tmp_path)
    assert f"{path}: the validation split of task 'toy' has no examples" in message


def test_error_not_utf8(tmp_path):
    folder = write_folder_task(tmp_path)
    path = folder / "train.jsonl"
    path.write_bytes(b'{"text": "ok", "label": 0}\n{"text": "caf\xe9", "label": 1}\n')
    message = load_error(tmp_path)
    assert f"{path}:2: invalid UTF-8 at byte offset 40" in message


# --- real data -----------------------------------------------------------------------------


def test_real_task_subsampled():
    limits = {"train": 64, "validation": 32, "test": None}
    task = load_task(TaskSource(name="trec"), data_root=REAL_SUITE, max_examples=limits, seed=0)
    assert task.class_names == [
        "description",
        "entity",
        "abbreviation",
        "human",
        "location",
        "number",
    ]
    assert len(task.splits["train"]) == 64
    assert len(task.splits["validation"]) == 32
    assert len(task.splits["test"]) == 500
    assert all(0 <= label < 6 for split in task.splits.values() for label in split.labels)
