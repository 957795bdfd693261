"""Image classification tasks: image folders, image columns of datasets, and pixel tensors.

Two layouts hold image tasks:

- ``images``: a task folder with ``train/``, ``validation/`` and ``test/`` beneath it, each
  with one subfolder per class (``<task>/train/<class>/<file>.png``). The class names are the
  task's ``labels``, else ``labels.json`` in the task folder, else the sorted subfolder names
  of ``train/``.
- ``hf`` with ``image_column`` set: a Hugging Face dataset (Hub id or local folder, as for
  text tasks) whose image column contains `datasets.Image` values.

An image split keeps its images unopened: a `Split` of an image task has `images`, an
`ImageList` that decodes an image when it is read, and `texts` holding one identifier per
example (the file path or the dataset row) for messages. `encode_images` then runs the
model's own image processor once per split and keeps the resized and cropped pixels, so
every later batch only rescales and normalises.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from upcycle.data.tasks import Split
from upcycle.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")
"""File extensions read as images in an image folder (compared in lower case)."""

PREPROCESS_BATCH = 256
"""Images passed to the image processor at once when a split is encoded."""


class ImageList(Sequence):
    """The images of one split, decoded to RGB `PIL.Image` objects only when read.

    The images come from file paths or from one column of a `datasets.Dataset`. `select`
    returns a subset without decoding anything.

    Args:
        files: image file paths, or None for a dataset.
        dataset: a `datasets.Dataset` with the image column, or None for files.
        column: the image column of `dataset`.
        rows: the dataset rows (or file positions) in this list, in order; default all.
        origin: the dataset's name or folder, for messages.
    """

    def __init__(
        self,
        *,
        files: Sequence[Path] | None = None,
        dataset: Any = None,
        column: str | None = None,
        rows: Sequence[int] | None = None,
        origin: str = "",
    ) -> None:
        if (files is None) == (dataset is None):
            raise ValueError("ImageList needs exactly one of files and dataset")
        self.files = list(files) if files is not None else None
        self.dataset = dataset
        self.column = column
        size = len(self.files) if self.files is not None else len(dataset)
        self.rows = list(range(size)) if rows is None else [int(row) for row in rows]
        self.origin = origin

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int):  # type: ignore[override]
        return self.read([position])[0]

    def select(self, positions: Sequence[int]) -> ImageList:
        """Return the images at `positions` of this list, still unopened."""
        return ImageList(
            files=self.files,
            dataset=self.dataset,
            column=self.column,
            rows=[self.rows[i] for i in positions],
            origin=self.origin,
        )

    def describe(self, position: int) -> str:
        """Return the file path or ``<dataset> row N`` of the image at `position`."""
        row = self.rows[position]
        if self.files is not None:
            return str(self.files[row])
        return f"dataset {self.origin} row {row}"

    def read(self, positions: Sequence[int]) -> list:
        """Decode the images at `positions` as RGB `PIL.Image` objects.

        Raises:
            DataError: for a file or dataset value that is not a readable image; the
                message names the file or row.
        """
        if self.files is not None:
            return [_open_image_file(self.files[self.rows[i]]) for i in positions]
        rows = [self.rows[i] for i in positions]
        values = self.dataset[rows][self.column]
        return [
            _as_rgb_image(value, self.describe(i))
            for i, value in zip(positions, values, strict=True)
        ]


def _open_image_file(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise DataError(
            f"failed to read image {path}: {error}. Replace or remove the file."
        ) from error


def _as_rgb_image(value: Any, where: str):
    """Convert a decoded dataset value (PIL image, array, or {'bytes', 'path'}) to RGB PIL."""
    import io

    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, np.ndarray):
        return Image.fromarray(value).convert("RGB")
    if isinstance(value, Mapping) and (value.get("bytes") or value.get("path")):
        try:
            if value.get("bytes"):
                with Image.open(io.BytesIO(value["bytes"])) as image:
                    return image.convert("RGB")
            return _open_image_file(Path(value["path"]))
        except (OSError, UnidentifiedImageError) as error:
            raise DataError(f"{where}: failed to decode the image: {error}") from error
    raise DataError(
        f"{where}: expected an image (a datasets.Image value, a PIL image or an array), got "
        f"{type(value).__name__}. Set image_column to the column that holds the images."
    )


# ---------------------------------------------------------------------------------------------
# Loading image tasks


def read_image_task(source, data_root: Path | None) -> tuple[list[str], dict[str, Split]]:
    """Load the class names and the three splits of an image task.

    `source` is a `TaskSource` with format ``images`` or with ``image_column`` set. Labels
    are checked as for text tasks (a class name or an id into the class list).

    Raises:
        DataError: a missing folder, split or column, an empty split, a class folder or
            label that is not a known class, or a file that is not an image.
    """
    if source.format == "images":
        return _read_image_folder_task(source, data_root)
    if source.format == "hf":
        return _read_hf_image_task(source, data_root)
    raise DataError(
        f"task '{source.name}' has image_column {source.image_column!r} but format "
        f"{source.format!r}; image tasks use format 'images' (an image folder) or 'hf'"
    )


def _read_image_folder_task(source, data_root: Path | None) -> tuple[list[str], dict[str, Split]]:
    from upcycle.data.loaders import LABELS_FILE, _read_labels_file, _task_folder

    folder = _task_folder(source, data_root)
    split_folders = {split: folder / name for split, name in source.split_names().items()}
    for split, path in split_folders.items():
        if not path.is_dir():
            raise DataError(
                f"{split} split folder not found: {path} (task '{source.name}'). Create it with "
                f"one subfolder per class, or set `splits: {{{split}: FOLDER}}` in the task entry."
            )
    if source.labels is not None:
        class_names = list(source.labels)
    elif (folder / LABELS_FILE).is_file():
        class_names = _read_labels_file(folder / LABELS_FILE, source.name)
    else:
        class_names = sorted(p.name for p in split_folders["train"].iterdir() if p.is_dir())
        if len(class_names) < 2:
            raise DataError(
                f"{split_folders['train']} has {len(class_names)} class folders (task "
                f"'{source.name}'); an image task needs one subfolder per class, at least two."
            )
    splits = {}
    for split, path in split_folders.items():
        files, labels = _class_folder_files(path, class_names, source.name)
        if not files:
            raise DataError(
                f"{path}: the {split} split of task '{source.name}' has no images. Add images "
                f"with extensions {', '.join(IMAGE_EXTENSIONS)} to its class folders."
            )
        images = ImageList(files=files, origin=str(path))
        texts = [str(file) for file in files]
        splits[split] = Split(texts=texts, labels=labels, images=images)
    return class_names, splits


def _class_folder_files(
    split_folder: Path, class_names: Sequence[str], task: str
) -> tuple[list[Path], list[int]]:
    """List the image files of every class folder in a split folder, sorted by class and name."""
    index = {name: i for i, name in enumerate(class_names)}
    files: list[Path] = []
    labels: list[int] = []
    for entry in sorted(split_folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            raise DataError(
                f"{entry}: files directly inside a split folder are not allowed (task '{task}'). "
                "Move the file into the folder of its class."
            )
        if entry.name not in index:
            raise DataError(
                f"{entry}: folder {entry.name!r} is not a class of task '{task}'; the classes "
                f"are {list(class_names)}. Rename the folder or fix the task's class list."
            )
        for path in sorted(entry.rglob("*")):
            if path.name.startswith(".") or path.is_dir():
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise DataError(
                    f"{path}: unsupported image file extension {path.suffix!r} (task '{task}'); "
                    f"supported: {', '.join(IMAGE_EXTENSIONS)}. Convert or remove the file."
                )
            files.append(path)
            labels.append(index[entry.name])
    return files, labels


def _read_hf_image_task(source, data_root: Path | None) -> tuple[list[str], dict[str, Split]]:
    from upcycle.data.loaders import (
        _Example,
        _hf_class_names,
        _label_id,
        _open_hf_dataset,
        select_hf_split,
    )

    dataset, origin = _open_hf_dataset(source, data_root)
    parts = {}
    for split, split_name in source.split_names().items():
        part = select_hf_split(dataset, split_name, origin=origin, task=source.name, split=split)
        for column in (source.image_column, source.label_column):
            if column not in part.column_names:
                raise DataError(
                    f"dataset {origin} split {split_name!r} has no column {column!r} (task "
                    f"'{source.name}'); columns: {part.column_names}. Set image_column and "
                    "label_column in the task entry."
                )
        parts[split] = (split_name, part)

    class_names = _hf_class_names(source, parts["train"][1], origin)
    index = {name: i for i, name in enumerate(class_names)}
    splits = {}
    for split, (split_name, part) in parts.items():
        where = f"{origin} split {split_name!r}"
        if len(part) == 0:
            raise DataError(
                f"dataset {where} has no examples (task '{source.name}'). Point the {split} "
                "split at another dataset split with `splits` in the task entry."
            )
        labels = [
            _label_id(
                _Example(None, value, f"dataset {where} row {row}"), index, class_names, source.name
            )
            for row, value in enumerate(part[source.label_column])
        ]
        images = ImageList(
            dataset=part.select_columns([source.image_column]),
            column=source.image_column,
            origin=where,
        )
        texts = [images.describe(i) for i in range(len(images))]
        splits[split] = Split(texts=texts, labels=labels, images=images)
    return class_names, splits


# ---------------------------------------------------------------------------------------------
# Pixel tensors


@dataclass
class ImageSplit:
    """Preprocessed images of one split with their labels, ready to be batched.

    `pixels` [N, 3, H, W] is the image processor's output before rescaling and
    normalisation: uint8 when that output is whole numbers in 0..255 (as for CLIP's resize
    and center crop), else float32. `collate` rescales and normalises a batch with the
    processor's own constants, so a batch equals the processor's `pixel_values` up to
    float32 rounding while the cache takes a quarter of the memory.
    """

    pixels: torch.Tensor
    labels: torch.Tensor
    rescale_factor: float | None
    image_mean: torch.Tensor | None
    image_std: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        """Return zeros [N]: every image has the same size, so batches need no sorting."""
        return np.zeros(len(self), dtype=np.int64)

    def collate(self, indices: np.ndarray | Sequence[int]) -> dict[str, torch.Tensor]:
        """Return pixel_values [B, 3, H, W] float32, labels [B] and indices [B] of a batch."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        pixel_values = self.pixels[index].float()
        if self.rescale_factor is not None:
            pixel_values = pixel_values * self.rescale_factor
        if self.image_mean is not None:
            pixel_values = (pixel_values - self.image_mean) / self.image_std
        return {"pixel_values": pixel_values, "labels": self.labels[index], "indices": index}

    def subset(self, indices: np.ndarray | Sequence[int]) -> ImageSplit:
        """Return the examples at `indices` as a new split, in that order."""
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageSplit(
            self.pixels[index],
            self.labels[index],
            self.rescale_factor,
            self.image_mean,
            self.image_std,
        )


def encode_images(
    processor, split: Split, *, task: str, split_name: str, batch_size: int = PREPROCESS_BATCH
) -> ImageSplit:
    """Run `processor` (an `AutoImageProcessor`) over a split's images once.

    The processor resizes and crops (and converts to RGB) with rescaling and normalisation
    turned off. Its rescale factor, mean and standard deviation are applied per batch by
    `ImageSplit.collate`.

    Raises:
        DataError: for a split without images or an image that cannot be read.
    """
    if split.images is None:
        raise DataError(
            f"the {split_name} split of task '{task}' has no images: this model family "
            "classifies images. Load the task with format 'images' or an image_column."
        )
    chunks = []
    for start in range(0, len(split.images), batch_size):
        positions = range(start, min(start + batch_size, len(split.images)))
        images = split.images.read(positions)
        output = processor(images=images, do_rescale=False, do_normalize=False, return_tensors="pt")
        chunks.append(torch.as_tensor(output["pixel_values"]))
    pixels = torch.cat(chunks)
    whole = pixels.dtype == torch.uint8 or bool(
        ((pixels == pixels.round()) & (pixels >= 0) & (pixels <= 255)).all()
    )
    pixels = pixels.to(torch.uint8) if whole else pixels.float()
    do_rescale = getattr(processor, "do_rescale", False)
    do_normalize = getattr(processor, "do_normalize", False)
    mean = std = None
    if do_normalize:
        mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32).view(-1, 1, 1)
    logger.info(
        "task %s %s: %d images preprocessed to %s %s",
        task,
        split_name,
        len(pixels),
        tuple(pixels.shape[1:]),
        pixels.dtype,
    )
    return ImageSplit(
        pixels=pixels,
        labels=torch.tensor(split.labels, dtype=torch.long),
        rescale_factor=float(processor.rescale_factor) if do_rescale else None,
        image_mean=mean,
        image_std=std,
    )
