"""The in-memory form of a classification task."""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "validation", "test")


@dataclass
class Split:
    """Texts and integer labels of one split, in file order."""

    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class Task:
    """A text classification task: class names and its train, validation and test splits."""

    name: str
    class_names: list[str]
    splits: dict[str, Split] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)
