"""Load classification tasks from local files or Hugging Face datasets.

`TaskSource.format` selects the layout of a task:

- ``folder``: ``<task>/train.jsonl``, ``validation.jsonl``, ``test.jsonl`` and ``labels.json``,
  the list of class names whose index is the label id (the layout `build_textsuite` writes);
- ``jsonl``, ``csv``, ``tsv``: one file per split in a folder. CSV and TSV files start with a
  header row. They follow the quoting rules of Python's `csv` module (the ``excel`` and
  ``excel-tab`` dialects), so a field that contains the delimiter, a quote or a newline is
  quoted.
- ``hf``: a `datasets.DatasetDict` saved with ``save_to_disk``, a folder with one saved
  `datasets.Dataset` per split, a local folder of data files that `datasets.load_dataset`
  reads, or a Hugging Face Hub id. With ``image_column`` set, the task classifies images.
- ``images``: ``<task>/train/<class>/<image file>``, likewise ``validation/`` and ``test/``
  (see `upcycle.data.images`).

A label is an integer id into the class list or a class name. A string label that matches no
class name is read as a decimal id, so CSV files may hold either. Valid texts are kept exactly,
without stripping. Every problem with the contents of a file raises `DataError`, naming the
file, the line (or dataset row), the task and the fix.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from upcycle.data.tasks import SPLITS, Split, Task
from upcycle.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SplitName = Literal["train", "validation", "test"]
TaskFormat = Literal["folder", "jsonl", "csv", "tsv", "hf", "images"]

DATA_ENV_VAR = "UPCYCLE_DATA"
LABELS_FILE = "labels.json"
FILE_EXTENSIONS: dict[str, str] = {"folder": "jsonl", "jsonl": "jsonl", "csv": "csv", "tsv": "tsv"}
"""File extension of the split files of each file-based format."""

_TASK_NAME = re.compile(r"[A-Za-z0-9_-]+")
_DECIMAL_ID = re.compile(r"-?[0-9]{1,18}")
_HF_SLICE = re.compile(r"(?P<split>[^\[\]]+)\[(?P<start>-?[0-9]+%?)?:(?P<stop>-?[0-9]+%?)?\]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_MAX_SHOWN = 80


class TaskSource(BaseModel):
    """One entry of the run config's ``data.tasks`` list: where a task's splits come from."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Task name; it also names the task's checkpoint folders.")
    format: TaskFormat = "folder"
    path: str | None = Field(
        None,
        description=(
            "Task folder (folder, jsonl, csv, tsv; default <data root>/<name>) or, for hf, a "
            "local dataset folder or Hub id (default <data root>/<name> if it exists, else "
            "<name> as a Hub id). Relative paths resolve against the data root."
        ),
    )
    splits: dict[SplitName, str] | None = Field(
        None,
        description=(
            "File name of each split (default train.<ext>, validation.<ext>, test.<ext>); for "
            "hf, the dataset split name or a slice of one such as train[90%:] (default train, "
            "validation, test); for images, the split folder (default train, validation, test)."
        ),
    )
    text_column: str = Field("text", min_length=1)
    label_column: str = Field("label", min_length=1)
    labels: list[str] | None = Field(
        None,
        description=(
            "Class names; the index is the label id. Default: labels.json in the task folder, "
            "or the ClassLabel names of an hf dataset."
        ),
    )
    hf_name: str | None = Field(None, description="Dataset config name passed to load_dataset.")
    image_column: str | None = Field(
        None,
        min_length=1,
        description="Column of an hf dataset that contains the images of an image task.",
    )
    class_templates: list[str] | None = Field(
        None,
        min_length=1,
        description=(
            "Templates for this task's class names in zero-shot heads, each with one {} for "
            "the name; default: model.class_templates."
        ),
    )

    @field_validator("name")
    @classmethod
    def _folder_safe_name(cls, value: str) -> str:
        if not _TASK_NAME.fullmatch(value):
            raise ValueError(
                f"task name {value!r} is invalid: use one or more letters, digits, '-' or '_', "
                "because it becomes a folder name"
            )
        return value

    @field_validator("splits")
    @classmethod
    def _non_empty_split_names(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            empty = sorted(split for split, name in value.items() if not name.strip())
            if empty:
                raise ValueError(f"splits {empty} map to an empty file or split name")
        return value

    @field_validator("labels")
    @classmethod
    def _valid_class_names(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            problem = class_names_problem(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @field_validator("class_templates")
    @classmethod
    def _templates_have_slot(cls, value: list[str] | None) -> list[str] | None:
        bad = [template for template in value or [] if template.count("{}") != 1]
        if bad:
            raise ValueError(f"templates must contain exactly one '{{}}' for the class name: {bad}")
        return value

    @model_validator(mode="after")
    def _image_column_needs_hf(self) -> TaskSource:
        if self.image_column is not None and self.format != "hf":
            raise ValueError(
                f"image_column is set but format is {self.format!r}: image_column names a column "
                "of an hf dataset. Use format 'hf', or format 'images' without image_column for "
                "an image folder"
            )
        return self

    @property
    def is_image_task(self) -> bool:
        """Whether the task classifies images (format images, or an hf image_column)."""
        return self.format == "images" or self.image_column is not None

    def split_names(self) -> dict[str, str]:
        """Return the file, folder or dataset split name of each of train, validation and test."""
        if self.format in ("hf", "images"):
            names = {split: split for split in SPLITS}
        else:
            extension = FILE_EXTENSIONS[self.format]
            names = {split: f"{split}.{extension}" for split in SPLITS}
        names.update(self.splits or {})
        return names


@dataclass
class _Example:
    """One raw example before validation; `where` is ``file:line`` or a dataset row."""

    text: Any
    label: Any
    where: str


# ---------------------------------------------------------------------------------------------
# Public entry points


def load_task(
    source: TaskSource,
    *,
    data_root: Path | None,
    max_examples: Mapping[str, int | None] | None = None,
    seed: int = 0,
) -> Task:
    """Load one task's class names and its train, validation and test splits.

    `max_examples` maps a split name to the number of examples to keep (None keeps all). A
    split longer than that is subsampled: the examples are shuffled by
    ``numpy.random.default_rng([seed, crc32("<task>/<split>")])`` and the first N are kept, in
    file order. The draw is deterministic for a given seed, task and split, and differs between
    tasks and splits. A split of N or fewer examples is kept whole.

    Raises:
        DataError: a missing, unreadable or malformed file or dataset, or an invalid label
            or text. The message names the file and line, the task and the fix.
        ConfigError: a negative seed, or a `max_examples` key or value that is invalid.
    """
    limits = _check_limits(max_examples, seed)
    if source.is_image_task:
        from upcycle.data.images import read_image_task

        class_names, image_splits = read_image_task(source, data_root)
        splits = {
            split: subsample_split(
                image_splits[split], limits.get(split), seed=seed, key=f"{source.name}/{split}"
            )
            for split in SPLITS
        }
        return Task(name=source.name, class_names=list(class_names), splits=splits)
    if source.format == "hf":
        class_names, raw_splits, locations = _read_hf_task(source, data_root)
    elif source.format in FILE_EXTENSIONS:
        class_names, raw_splits, locations = _read_file_task(source, data_root)
    else:
        raise DataError(
            f"task '{source.name}' has unsupported format {source.format!r}; supported formats: "
            f"{sorted([*FILE_EXTENSIONS, 'hf', 'images'])}"
        )

    splits = {}
    for split in SPLITS:
        encoded = _encode_split(
            raw_splits[split], class_names, task=source.name, split=split, location=locations[split]
        )
        splits[split] = subsample_split(
            encoded, limits.get(split), seed=seed, key=f"{source.name}/{split}"
        )
    return Task(name=source.name, class_names=list(class_names), splits=splits)


def resolve_data_root(
    config_root: str | None, cli_root: str | None, env: Mapping[str, str] = os.environ
) -> Path | None:
    """Choose the data root: config key ``data.root``, then ``--data DIR``, then UPCYCLE_DATA.

    The first of the three that is set (and not empty) wins, so a root in the config file
    takes precedence over the command line. Returns None when none is set.

    Raises:
        DataError: the chosen value is not an existing folder; the message names its origin.
    """
    candidates = (
        (config_root, "config key data.root"),
        (cli_root, "option --data"),
        (env.get(DATA_ENV_VAR), f"environment variable {DATA_ENV_VAR}"),
    )
    for value, origin in candidates:
        if not value:
            continue
        root = Path(value).expanduser()
        if not root.is_dir():
            raise DataError(
                f"data root {str(root)!r} from {origin} is not an existing folder. Set {origin} "
                "to the folder that contains the task folders."
            )
        return root
    return None


def check_unique_task_names(sources: Iterable[TaskSource]) -> None:
    """Raise `DataError` if two task sources share a name, since names key checkpoint folders."""
    names = [source.name for source in sources]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(
            f"duplicate task names {duplicates}: give every task its own name, because the name "
            "keys its checkpoint and result folders"
        )


def class_names_problem(names: Sequence[Any]) -> str | None:
    """Return why `names` is not a valid class list, or None when it is.

    A valid list has at least two distinct, non-empty strings.
    """
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        return f"class names must be a list of strings, got {_show(names)}"
    if len(names) < 2:
        return f"a task needs at least two classes, got {len(names)}: {_show(list(names))}"
    empty = [i for i, name in enumerate(names) if not name.strip()]
    if empty:
        return f"class names at positions {empty} are empty: {_show(list(names))}"
    bad = [i for i, name in enumerate(names) if _SURROGATE.search(name)]
    if bad:
        return f"class names at positions {bad} contain unpaired surrogates, not valid Unicode"
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        return f"duplicate class names {duplicates} in {_show(list(names))}"
    return None


def stable_rng(seed: int, key: str) -> np.random.Generator:
    """Return a generator seeded by `seed` and a CRC32 of `key`, equal across processes.

    Python's `hash` of a string changes between processes, so the key is hashed with CRC32.
    """
    return np.random.default_rng([seed, zlib.crc32(key.encode("utf-8"))])


def subsample_split(split: Split, limit: int | None, *, seed: int, key: str) -> Split:
    """Keep `limit` examples of `split` drawn by `stable_rng(seed, key)`, in their file order."""
    if limit is None or len(split) <= limit:
        return split
    chosen = sorted(stable_rng(seed, key).permutation(len(split))[:limit].tolist())
    return Split(
        texts=[split.texts[i] for i in chosen],
        labels=[split.labels[i] for i in chosen],
        images=split.images.select(chosen) if split.images is not None else None,
    )


def _encode_split(
    examples: Sequence[_Example],
    class_names: Sequence[str],
    *,
    task: str,
    split: str,
    location: str,
) -> Split:
    """Check the texts and map the labels of raw examples to ids into `class_names`.

    Raises:
        DataError: an empty split, a text that is not a non-blank string, or a label that is
            neither a class name nor an id in ``range(len(class_names))``.
    """
    if not examples:
        raise DataError(
            f"{location}: the {split} split of task '{task}' has no examples. Add examples, or "
            "point the split at another file with `splits` in the task entry."
        )
    index = {name: i for i, name in enumerate(class_names)}
    texts = [_check_text(example, task) for example in examples]
    labels = [_label_id(example, index, class_names, task) for example in examples]
    return Split(texts=texts, labels=labels)


# ---------------------------------------------------------------------------------------------
# File formats: folder, jsonl, csv, tsv


def _read_file_task(
    source: TaskSource, data_root: Path | None
) -> tuple[list[str], dict[str, list[_Example]], dict[str, str]]:
    folder = _task_folder(source, data_root)
    class_names = _class_names_for_files(source, folder)
    raw_splits, locations = {}, {}
    for split, file_name in source.split_names().items():
        path = folder / file_name
        if not path.is_file():
            raise DataError(
                f"{split} split file not found: {path} (task '{source.name}'). Create it, or set "
                f"`splits: {{{split}: FILE}}` in the task entry to the file that holds the split."
            )
        if source.format in ("folder", "jsonl"):
            raw_splits[split] = _read_jsonl(path, source)
        else:
            raw_splits[split] = _read_delimited(path, source)
        locations[split] = str(path)
    return class_names, raw_splits, locations


def _task_folder(source: TaskSource, data_root: Path | None) -> Path:
    if source.path is None:
        if data_root is None:
            raise DataError(
                f"task '{source.name}' has no path and no data root is set. Set config key "
                f"data.root, pass --data DIR or set {DATA_ENV_VAR} to the folder that contains "
                f"'{source.name}/', or set the task's path."
            )
        folder = data_root / source.name
    else:
        folder = Path(source.path).expanduser()
        if not folder.is_absolute() and data_root is not None:
            folder = data_root / folder
    if not folder.is_dir():
        raise DataError(
            f"task folder not found: {folder} (task '{source.name}', format {source.format}). "
            "Check the data root and the task's path."
        )
    return folder


def _class_names_for_files(source: TaskSource, folder: Path) -> list[str]:
    if source.labels is not None:
        return list(source.labels)
    labels_path = folder / LABELS_FILE
    if labels_path.is_file():
        return _read_labels_file(labels_path, source.name)
    if source.format == "folder":
        raise DataError(
            f"class list not found: {labels_path} (task '{source.name}'). Write the class names "
            "there as a JSON list of strings, or set `labels` in the task entry."
        )
    raise DataError(
        f"task '{source.name}' has no class list: set `labels: [...]` in the task entry or "
        f"write {labels_path} as a JSON list of class names (the index is the label id)."
    )


def _read_labels_file(path: Path, task: str) -> list[str]:
    text = _read_utf8(path, task)
    try:
        names = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}:{error.lineno}: invalid JSON in the class list of task '{task}' "
            f'({error.msg}). Write a JSON list of class names, such as ["negative", "positive"].'
        ) from error
    except (ValueError, RecursionError) as error:
        raise DataError(
            f"{path}: invalid JSON in the class list of task '{task}' ({error}). Write a JSON "
            "list of class names."
        ) from error
    problem = class_names_problem(names)
    if problem is not None:
        raise DataError(
            f"{path}: invalid class list of task '{task}': {problem}. Write a JSON list of at "
            "least two distinct class names; the index is the label id."
        )
    return list(names)


def _read_utf8(path: Path, task: str) -> str:
    """Read a whole file as UTF-8, dropping a leading byte order mark."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path} (task '{task}'): {error}") from error
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as error:
        offset = start + error.start
        line = data[:offset].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: invalid UTF-8 at byte offset {offset} (task '{task}': "
            f"{error.reason}). Convert the file to UTF-8."
        ) from error


def _read_jsonl(path: Path, source: TaskSource) -> list[_Example]:
    text = _read_utf8(path, source.name)
    columns = (source.text_column, source.label_column)
    examples = []
    # Split on "\n" only: str.splitlines would also split on U+2028 and other characters
    # that JSON allows unescaped inside strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except (ValueError, RecursionError) as error:
            raise DataError(
                f"{where}: invalid JSON in task '{source.name}' ({error}). Each line must be one "
                f'JSON object such as {{"{columns[0]}": "...", "{columns[1]}": 0}}.'
            ) from error
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected a JSON object in task '{source.name}', got "
                f"{type(record).__name__} {_show(record)}. Write one object per line."
            )
        for column in columns:
            if column not in record:
                raise DataError(
                    f"{where}: missing column {column!r} in task '{source.name}'; the line has "
                    f"{_show(sorted(record))}. Add the column, or set text_column and "
                    "label_column in the task entry."
                )
        examples.append(_Example(record[columns[0]], record[columns[1]], where))
    return examples


def _read_delimited(path: Path, source: TaskSource) -> list[_Example]:
    text = _read_utf8(path, source.name)
    dialect = "excel-tab" if source.format == "tsv" else "excel"
    reader = csv.reader(io.StringIO(text, newline=""), dialect=dialect, strict=True)
    header: list[str] | None = None
    positions: tuple[int, int] = (0, 0)
    examples = []
    next_line = 1
    try:
        for row in reader:
            # A quoted field may span lines, so a record starts after the previous one ended.
            where = f"{path}:{next_line}"
            next_line = reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if header is None:
                header = row
                positions = _header_positions(header, source, where)
                continue
            if len(row) != len(header):
                raise DataError(
                    f"{where}: expected {len(header)} fields as in the header {_show(header)}, "
                    f"found {len(row)} (task '{source.name}'). Quote fields that contain the "
                    "delimiter, a quote or a line break."
                )
            examples.append(_Example(row[positions[0]], row[positions[1]], where))
    except csv.Error as error:
        raise DataError(
            f"{path}:{reader.line_num}: malformed {source.format.upper()} in task "
            f"'{source.name}' ({error}). Check the quoting near that line."
        ) from error
    if header is None:
        raise DataError(
            f"{path}: the file is empty (task '{source.name}'). Write a header row naming "
            f"{source.text_column!r} and {source.label_column!r}, then one row per example."
        )
    return examples


def _header_positions(header: list[str], source: TaskSource, where: str) -> tuple[int, int]:
    positions = []
    for column in (source.text_column, source.label_column):
        count = header.count(column)
        if count != 1:
            problem = "missing from" if count == 0 else "repeated in"
            raise DataError(
                f"{where}: column {column!r} is {problem} the header {_show(header)} (task "
                f"'{source.name}'). Name it exactly once, or set text_column and label_column "
                "in the task entry."
            )
        positions.append(header.index(column))
    return positions[0], positions[1]


# ---------------------------------------------------------------------------------------------
# Hugging Face datasets


def _read_hf_task(
    source: TaskSource, data_root: Path | None
) -> tuple[list[str], dict[str, list[_Example]], dict[str, str]]:
    dataset, origin = _open_hf_dataset(source, data_root)
    split_names = source.split_names()
    raw_splits, locations, parts = {}, {}, {}
    for split, split_name in split_names.items():
        part = select_hf_split(dataset, split_name, origin=origin, task=source.name, split=split)
        for column in (source.text_column, source.label_column):
            if column not in part.column_names:
                raise DataError(
                    f"dataset {origin} split {split_name!r} has no column {column!r} (task "
                    f"'{source.name}'); columns: {part.column_names}. Set text_column and "
                    "label_column in the task entry."
                )
        parts[split] = part
        locations[split] = f"dataset {origin} split {split_name!r}"

    class_names = _hf_class_names(source, parts["train"], origin)
    for split, part in parts.items():
        texts = list(part[source.text_column])
        labels = list(part[source.label_column])
        raw_splits[split] = [
            _Example(text, label, f"{locations[split]} row {row}")
            for row, (text, label) in enumerate(zip(texts, labels, strict=True))
        ]
    return class_names, raw_splits, locations


def _open_hf_dataset(source: TaskSource, data_root: Path | None) -> tuple[Mapping[str, Any], str]:
    """Open a saved DatasetDict, per-split saved Datasets, local data files or a Hub id.

    Returns the splits by name and the folder or Hub id they came from.
    """
    import datasets

    local = _local_hf_path(source, data_root)
    target = str(local) if local is not None else (source.path or source.name)
    if local is not None and (local / "state.json").is_file():
        raise DataError(
            f"{target} contains one saved Dataset without splits (task '{source.name}'). Save "
            "a DatasetDict with train, validation and test splits, or one saved Dataset per "
            "split in subfolders named after the splits."
        )
    try:
        if local is None:
            return datasets.load_dataset(target, name=source.hf_name), target
        if (local / "dataset_dict.json").is_file():
            return datasets.load_from_disk(target), target
        split_names = {parse_hf_split(name)[0] for name in source.split_names().values()}
        saved = [name for name in split_names if (local / name / "state.json").is_file()]
        if saved:
            return {name: datasets.load_from_disk(str(local / name)) for name in saved}, target
        return datasets.load_dataset(target, name=source.hf_name), target
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        raise DataError(
            f"failed to load dataset {target!r} (task '{source.name}'): {error}. If the Hub "
            "cannot be reached or the id is not found there, save the dataset locally "
            "(DatasetDict.save_to_disk, or a folder of train/validation/test data files) and "
            "set the task's path to that folder."
        ) from error


def parse_hf_split(name: str) -> tuple[str, str | None, str | None]:
    """Split a name such as ``train[:90%]`` into ("train", None, "90%").

    A name without brackets is returned with bounds None.
    """
    match = _HF_SLICE.fullmatch(name)
    if match is None:
        return name, None, None
    return match["split"], match["start"], match["stop"]


def select_hf_split(
    dataset: Mapping[str, Any], split_name: str, *, origin: str, task: str, split: str
) -> Any:
    """Return the rows of `dataset` that a split name or slice such as ``train[90%:]`` selects.

    Bounds are row numbers or percentages of the split's rows, and may be negative as in
    Python slices. A percentage is rounded to the nearest row, as `datasets` rounds split
    slices by default, so ``train[:90%]`` and ``train[90%:]`` never overlap.

    Raises:
        DataError: the dataset has no split of that name.
    """
    name, start, stop = parse_hf_split(split_name)
    if name not in dataset:
        raise DataError(
            f"dataset {origin} has no split {name!r} (task '{task}'); available splits: "
            f"{sorted(dataset)}. Map the {split} split with `splits: {{{split}: NAME}}` in the "
            "task entry, where NAME is a split or a slice of one such as train[90%:]."
        )
    part = dataset[name]
    if name == split_name:
        return part
    size = len(part)
    rows = range(size)[slice(_slice_bound(start, size), _slice_bound(stop, size))]
    return part.select(rows)


def _slice_bound(bound: str | None, size: int) -> int | None:
    if bound is None:
        return None
    if bound.endswith("%"):
        return round(size * int(bound[:-1]) / 100)
    return int(bound)


def _local_hf_path(source: TaskSource, data_root: Path | None) -> Path | None:
    """Return the local folder an hf source names, or None when it is a Hub id."""
    if source.path is None:
        candidate = data_root / source.name if data_root is not None else None
        return candidate if candidate is not None and candidate.exists() else None
    path = Path(source.path).expanduser()
    if path.is_absolute():
        if not path.exists():
            raise DataError(
                f"dataset folder not found: {path} (task '{source.name}'). Check the task's path."
            )
        return path
    if data_root is not None and (data_root / path).exists():
        return data_root / path
    return None


def _hf_class_names(source: TaskSource, train: Any, origin: str) -> list[str]:
    if source.labels is not None:
        return list(source.labels)
    names = getattr(train.features.get(source.label_column), "names", None)
    if names is None:
        raise DataError(
            f"dataset {origin} column {source.label_column!r} is not a ClassLabel, so it has no "
            f"class names (task '{source.name}'). Set `labels: [...]` in the task entry."
        )
    problem = class_names_problem(list(names))
    if problem is not None:
        raise DataError(
            f"dataset {origin} column {source.label_column!r} has invalid class names (task "
            f"'{source.name}'): {problem}. Set `labels: [...]` in the task entry."
        )
    return list(names)


# ---------------------------------------------------------------------------------------------
# Validation of single examples


def _check_text(example: _Example, task: str) -> str:
    text = example.text
    if not isinstance(text, str):
        raise DataError(
            f"{example.where}: text must be a string in task '{task}', got "
            f"{type(text).__name__} {_show(text)}."
        )
    if not text.strip():
        raise DataError(
            f"{example.where}: empty or whitespace-only text in task '{task}'. Remove the "
            "example or fill in its text."
        )
    if _SURROGATE.search(text):
        raise DataError(
            f"{example.where}: text contains an unpaired surrogate (task '{task}'), which is not "
            "valid Unicode. Fix the escape sequence in the file."
        )
    return text


def _label_id(
    example: _Example, index: Mapping[str, int], class_names: Sequence[str], task: str
) -> int:
    value = example.label
    if isinstance(value, str):
        if value in index:
            return index[value]
        if not _DECIMAL_ID.fullmatch(value.strip()):
            raise DataError(
                f"{example.where}: unknown label {_show(value)} in task '{task}'; the classes "
                f"are {_show(list(class_names))}. Use one of these names or its index."
            )
        label = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        label = value
    else:
        raise DataError(
            f"{example.where}: label must be an integer id or a class name in task '{task}', "
            f"got {type(value).__name__} {_show(value)}."
        )
    if not 0 <= label < len(class_names):
        hint = (
            " A label of -1 usually marks a split whose labels are hidden." if label == -1 else ""
        )
        raise DataError(
            f"{example.where}: label {label} is outside range({len(class_names)}) in task "
            f"'{task}'; the classes are {_show(list(class_names))}.{hint}"
        )
    return label


def _check_limits(max_examples: Mapping[str, int | None] | None, seed: int) -> dict[str, int]:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"subsample seed must be an integer >= 0, got {seed!r}")
    limits = {}
    for split, limit in (max_examples or {}).items():
        if split not in SPLITS:
            raise ConfigError(f"max_examples has unknown split {split!r}; use one of {SPLITS}")
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"max_examples[{split!r}] must be None or >= 1, got {limit!r}")
        limits[split] = limit
    return limits


def _show(value: Any) -> str:
    """Return `repr(value)`, shortened so that error messages stay readable."""
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."
