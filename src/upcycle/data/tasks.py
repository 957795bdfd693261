"""The in-memory form of a classification task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from upcycle.data.images import ImageList

SPLITS = ("train", "validation", "test")


@dataclass
class Split:
    """Texts and integer labels of one split, in file order.

    In an image task, `images` holds the split's images, unopened, and each entry of `texts`
    identifies its image (the file path or dataset row) for messages.
    """

    texts: list[str]
    labels: list[int]
    images: ImageList | None = None

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Task:
    """A classification task of texts or images: class names and its three splits."""

    name: str
    class_names: list[str]
    splits: dict[str, Split] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
