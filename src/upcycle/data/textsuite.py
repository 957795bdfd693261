"""Build the eight-task text suite in the folder format from Hugging Face Hub datasets.

`build_textsuite` downloads each task with `load_from_hub` (or an injected loader), then
`convert_task` turns the in-memory splits into ``<out>/<task>/{train,validation,test}.jsonl``
and ``labels.json``, the layout `upcycle.data.load_task` reads with ``format: folder``. A
``manifest.json`` lists every task with its class names, split sizes and source.

Where a dataset lacks a validation or test split, the split is cut from the source train
split. The train indices are shuffled by `stable_rng(seed, "<task>/cut")`. The first examples
go to the test split, the next to the validation split, and the rest stay in train. Each split
keeps the source order, and the same seed and source data give the same files.

Run it as ``upcycle data textsuite DIR`` or ``python -m upcycle.data.textsuite DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from upcycle.data.loaders import LABELS_FILE, class_names_problem, stable_rng
from upcycle.data.tasks import SPLITS
from upcycle.errors import ConfigError, DataError
from upcycle.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class TaskRecipe:
    """Recipe for one task of the suite: the Hub dataset, its columns and the origin of each split.

    A source label is a class name or an integer id into `class_names`. When `label_map` is
    set, a source label is instead a name that `label_map` translates to a class name: a
    string, or the ClassLabel name of an integer.
    """

    name: str
    hub_id: str
    config_name: str | None
    text_column: str
    label_column: str
    class_names: tuple[str, ...]
    source: str
    """Citation of the original dataset, copied into the manifest."""
    validation_split: str | None = "validation"
    """Source split used as validation; None cuts `validation_size` examples from train."""
    validation_size: int = 0
    test_split: str | None = "test"
    """Source split used as test; None cuts `test_size` examples from train."""
    test_size: int = 0
    train_split: str = "train"
    label_map: Mapping[str, str] | None = field(default=None)
    revision: str | None = None
    """Hub revision; ``refs/convert/parquet`` reads the Hub's Parquet export of a script dataset."""


# NOTE: the Hub ids, column names and label names below follow the dataset cards on the Hub.
# They were not checked against a live download. If a dataset differs, `convert_task` raises
# DataError naming the missing column or unmapped label.
RECIPES: tuple[TaskRecipe, ...] = (
    TaskRecipe(
        name="sst2",
        hub_id="SetFit/sst2",
        config_name=None,
        text_column="text",
        label_column="label_text",
        class_names=("negative", "positive"),
        source="Stanford Sentiment Treebank, binary, sentence level (Socher et al., 2013)",
    ),
    TaskRecipe(
        name="trec",
        hub_id="CogComp/trec",
        config_name=None,
        revision="refs/convert/parquet",
        text_column="text",
        label_column="coarse_label",
        class_names=("description", "entity", "abbreviation", "human", "location", "number"),
        label_map={
            "ABBR": "abbreviation",
            "ENTY": "entity",
            "DESC": "description",
            "HUM": "human",
            "LOC": "location",
            "NUM": "number",
        },
        source="TREC question classification, coarse classes (Li and Roth, 2002)",
        validation_split=None,
        validation_size=546,
    ),
    TaskRecipe(
        name="subj",
        hub_id="SetFit/subj",
        config_name=None,
        text_column="text",
        label_column="label_text",
        class_names=("subjective", "objective"),
        source="Subjectivity (Pang and Lee, 2004)",
        validation_split=None,
        validation_size=1000,
    ),
    TaskRecipe(
        name="cr",
        hub_id="SetFit/CR",
        config_name=None,
        text_column="text",
        label_column="label_text",
        class_names=("negative", "positive"),
        source="Customer reviews (Hu and Liu, 2004)",
        validation_split=None,
        validation_size=377,
    ),
    TaskRecipe(
        name="emotion",
        hub_id="cardiffnlp/tweet_eval",
        config_name="emotion",
        text_column="text",
        label_column="label",
        class_names=("anger", "joy", "optimism", "sadness"),
        source="TweetEval emotion (Barbieri et al., 2020)",
    ),
    TaskRecipe(
        name="irony",
        hub_id="cardiffnlp/tweet_eval",
        config_name="irony",
        text_column="text",
        label_column="label",
        class_names=("non_irony", "irony"),
        source="TweetEval irony (Barbieri et al., 2020)",
    ),
    TaskRecipe(
        name="hate",
        hub_id="cardiffnlp/tweet_eval",
        config_name="hate",
        text_column="text",
        label_column="label",
        class_names=("not-hate", "hate"),
        label_map={"non-hate": "not-hate", "hate": "hate"},
        source="TweetEval hate (Barbieri et al., 2020)",
    ),
    TaskRecipe(
        name="agnews",
        hub_id="fancyzhx/ag_news",
        config_name=None,
        text_column="text",
        label_column="label",
        class_names=("world", "sports", "business", "sci/tech"),
        label_map={
            "World": "world",
            "Sports": "sports",
            "Business": "business",
            "Sci/Tech": "sci/tech",
        },
        source="AG News (Zhang et al., 2015)",
        validation_split=None,
        validation_size=7600,
    ),
)

Loader = Callable[[TaskRecipe], Mapping[str, Any]]
"""Returns the source splits of a recipe: a DatasetDict, or a mapping of split name to a
`datasets.Dataset` or to a dict of column lists."""


def load_from_hub(recipe: TaskRecipe) -> Mapping[str, Any]:
    """Download a recipe's dataset with `datasets.load_dataset`.

    This is the only step of the build that needs network access.

    Raises:
        DataError: the dataset cannot be downloaded or read.
    """
    import datasets

    try:
        return datasets.load_dataset(recipe.hub_id, recipe.config_name, revision=recipe.revision)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        raise DataError(
            f"failed to download {recipe.hub_id} (config {recipe.config_name}, revision "
            f"{recipe.revision}) for task '{recipe.name}': {error}. Building the suite needs "
            "access to the Hugging Face Hub; on an offline machine, copy a built suite instead."
        ) from error


def build_textsuite(
    out_dir: Path,
    *,
    tasks: Sequence[str] | None = None,
    seed: int = 0,
    loader: Loader | None = None,
    recipes: Sequence[TaskRecipe] = RECIPES,
) -> list[dict[str, Any]]:
    """Build the suite's tasks in `out_dir` and write its manifest.

    `tasks` selects entries of `recipes` by name (default: all). `loader` returns a recipe's
    source splits (default: `load_from_hub`). Entries for tasks built earlier in the same
    folder stay in the manifest, so tasks can be built one at a time. Returns the manifest
    entries in recipe order.

    Raises:
        ConfigError: an unknown task name or a negative seed.
        DataError: a dataset that cannot be loaded or converted.
    """
    if seed < 0:
        raise ConfigError(f"seed must be >= 0, got {seed}")
    selected = select_recipes(tasks, recipes)
    load = loader if loader is not None else load_from_hub
    out_dir = Path(out_dir)
    entries = _read_manifest(out_dir)
    for recipe in selected:
        logger.info("building task %s from %s", recipe.name, recipe.hub_id)
        entries[recipe.name] = convert_task(recipe, load(recipe), out_dir, seed=seed)
    order = [recipe.name for recipe in recipes]
    manifest = sorted(
        entries.values(),
        key=lambda entry: order.index(entry["task"]) if entry["task"] in order else len(order),
    )
    atomic_write_json(out_dir / MANIFEST_FILE, manifest)
    return manifest


def select_recipes(
    tasks: Sequence[str] | None, recipes: Sequence[TaskRecipe] = RECIPES
) -> list[TaskRecipe]:
    """Return the recipes named in `tasks` (all when None), raising ConfigError on unknown names."""
    if tasks is None:
        return list(recipes)
    by_name = {recipe.name: recipe for recipe in recipes}
    unknown = [name for name in tasks if name not in by_name]
    if unknown:
        raise ConfigError(f"unknown suite tasks {unknown}; available: {sorted(by_name)}")
    return [by_name[name] for name in dict.fromkeys(tasks)]


def convert_task(
    recipe: TaskRecipe, dataset_dict: Mapping[str, Any], out_dir: Path, *, seed: int
) -> dict[str, Any]:
    """Write one task in the folder format under ``out_dir/<recipe.name>/``.

    `dataset_dict` maps source split names to a `datasets.Dataset` or a dict of column lists.
    Examples whose text is missing or blank are dropped, because the loader rejects them. The
    number dropped per source split is logged and stored in the manifest entry as ``dropped``.

    Returns:
        The task's manifest entry: task, classes, sizes, source and how each split was made.

    Raises:
        DataError: a missing split or column, a label that maps to no class, or a cut larger
            than the source train split.
    """
    problem = class_names_problem(list(recipe.class_names))
    if problem is not None:
        raise DataError(f"recipe '{recipe.name}' has invalid class names: {problem}")
    used = [recipe.train_split, recipe.validation_split, recipe.test_split]
    columns = {
        name: _read_columns(recipe, dataset_dict, name)
        for name in dict.fromkeys(used)
        if name is not None
    }
    examples = {name: _to_examples(recipe, name, *columns[name]) for name in columns}
    splits, origins = _assemble_splits(recipe, examples, seed=seed)

    task_dir = Path(out_dir) / recipe.name
    for split in SPLITS:
        lines = [
            json.dumps({"text": text, "label": label}, ensure_ascii=False)
            for text, label in splits[split]
        ]
        atomic_write_text(task_dir / f"{split}.jsonl", "".join(line + "\n" for line in lines))
    atomic_write_text(task_dir / LABELS_FILE, json.dumps(list(recipe.class_names)) + "\n")

    dropped = {name: count for name, (_, count) in examples.items() if count}
    return {
        "task": recipe.name,
        "classes": list(recipe.class_names),
        "sizes": {split: len(splits[split]) for split in SPLITS},
        "source": recipe.source,
        "hub_id": recipe.hub_id,
        "config_name": recipe.config_name,
        "revision": recipe.revision,
        "splits": origins,
        "seed": seed,
        "dropped": dropped,
    }


def _read_columns(
    recipe: TaskRecipe, dataset_dict: Mapping[str, Any], split_name: str
) -> tuple[list[Any], list[Any], list[str] | None]:
    """Return the texts, labels and ClassLabel names (or None) of one source split."""
    if split_name not in dataset_dict:
        raise DataError(
            f"dataset {recipe.hub_id} has no split {split_name!r} for task '{recipe.name}'; "
            f"available: {sorted(dataset_dict)}"
        )
    part = dataset_dict[split_name]
    available = list(part.column_names if hasattr(part, "column_names") else part)
    for column in (recipe.text_column, recipe.label_column):
        if column not in available:
            raise DataError(
                f"dataset {recipe.hub_id} split {split_name!r} has no column {column!r} for task "
                f"'{recipe.name}'; columns: {available}"
            )
    features = getattr(part, "features", None) or {}
    names = getattr(features.get(recipe.label_column), "names", None)
    return list(part[recipe.text_column]), list(part[recipe.label_column]), names


def _to_examples(
    recipe: TaskRecipe,
    split_name: str,
    texts: list[Any],
    labels: list[Any],
    source_names: list[str] | None,
) -> tuple[list[tuple[str, int]], int]:
    """Map one source split to (text, class id) pairs; return them and the dropped count."""
    index = {name: i for i, name in enumerate(recipe.class_names)}
    examples = []
    dropped = 0
    for row, (text, label) in enumerate(zip(texts, labels, strict=True)):
        if not isinstance(text, str) or not text.strip():
            dropped += 1
            continue
        where = f"dataset {recipe.hub_id} split {split_name!r} row {row}"
        if _SURROGATE.search(text):
            raise DataError(
                f"{where}: text contains an unpaired surrogate, which cannot be written as UTF-8"
            )
        examples.append((text, _class_id(recipe, label, index, source_names, where)))
    if dropped:
        logger.warning(
            "task %s: dropped %d examples with a missing or blank text from split %s",
            recipe.name,
            dropped,
            split_name,
        )
    return examples, dropped


def _class_id(
    recipe: TaskRecipe,
    label: Any,
    index: Mapping[str, int],
    source_names: list[str] | None,
    where: str,
) -> int:
    is_id = isinstance(label, int) and not isinstance(label, bool)
    if recipe.label_map is not None:
        key = label
        if is_id and source_names is not None and 0 <= label < len(source_names):
            key = source_names[label]
        if not isinstance(key, str) or key not in recipe.label_map:
            raise DataError(
                f"{where}: label {key!r} is not in the label map of task '{recipe.name}' "
                f"({sorted(recipe.label_map)}); update the recipe's label_map"
            )
        return index[recipe.label_map[key]]
    if isinstance(label, str) and label in index:
        return index[label]
    if is_id and 0 <= label < len(recipe.class_names):
        return label
    raise DataError(
        f"{where}: label {label!r} is neither a class name nor an id into "
        f"{list(recipe.class_names)} (task '{recipe.name}'); update the recipe"
    )


def _assemble_splits(
    recipe: TaskRecipe, examples: Mapping[str, tuple[list[tuple[str, int]], int]], *, seed: int
) -> tuple[dict[str, list[tuple[str, int]]], dict[str, str]]:
    """Pick or cut the train, validation and test splits; return them and how each was made."""
    pool = examples[recipe.train_split][0]
    cut_test = recipe.test_size if recipe.test_split is None else 0
    cut_validation = recipe.validation_size if recipe.validation_split is None else 0
    if cut_test + cut_validation >= len(pool):
        raise DataError(
            f"task '{recipe.name}': cannot cut {cut_test} test and {cut_validation} validation "
            f"examples from {len(pool)} train examples; lower the recipe's sizes"
        )

    # Cut test first, then validation, from one seeded permutation of the train indices.
    order = stable_rng(seed, f"{recipe.name}/cut").permutation(len(pool)).tolist()
    test_rows = sorted(order[:cut_test])
    validation_rows = sorted(order[cut_test : cut_test + cut_validation])
    train_rows = sorted(order[cut_test + cut_validation :])

    origin = f"cut from source split {recipe.train_split!r} with seed {seed}"
    splits = {"train": [pool[i] for i in train_rows]}
    origins = {"train": f"source split {recipe.train_split!r}"}
    if cut_test + cut_validation:
        origins["train"] += f" minus the cut examples (seed {seed})"
    for split, name, rows in (
        ("validation", recipe.validation_split, validation_rows),
        ("test", recipe.test_split, test_rows),
    ):
        if name is None:
            splits[split] = [pool[i] for i in rows]
            origins[split] = origin
        else:
            splits[split] = examples[name][0]
            origins[split] = f"source split {name!r}"
        if not splits[split]:
            raise DataError(
                f"task '{recipe.name}': the {split} split would be empty; give the recipe a "
                f"{split}_split or a {split}_size above 0"
            )
    return splits, origins


def _read_manifest(out_dir: Path) -> dict[str, dict[str, Any]]:
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(
            f"{path} is not a readable JSON manifest ({error}); delete it and build again"
        ) from error
    if not isinstance(entries, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("task"), str) for entry in entries
    ):
        raise DataError(f"{path} is not a list of task entries; delete it and build again")
    return {entry["task"]: entry for entry in entries}


def main(argv: Sequence[str] | None = None) -> int:
    """Build the suite from the command line; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="upcycle data textsuite",
        description="Download the eight text classification tasks and write them as task folders.",
    )
    parser.add_argument("out_dir", type=Path, metavar="DIR", help="folder to write the suite to")
    parser.add_argument(
        "--tasks",
        nargs="+",
        choices=[recipe.name for recipe in RECIPES],
        help="build only these tasks (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation/test cuts")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    manifest = build_textsuite(args.out_dir, tasks=args.tasks, seed=args.seed)
    logger.info("wrote %d tasks to %s", len(manifest), args.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
