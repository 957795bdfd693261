"""Classification tasks: the in-memory form, loaders for local files and datasets, the suite."""

from upcycle.data.loaders import (
    TaskSource,
    check_unique_task_names,
    load_task,
    resolve_data_root,
)
from upcycle.data.tasks import SPLITS, Split, Task

__all__ = [
    "SPLITS",
    "Split",
    "Task",
    "TaskSource",
    "check_unique_task_names",
    "load_task",
    "resolve_data_root",
]
