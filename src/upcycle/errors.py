"""Exceptions raised by upcycle for bad input and broken files.

Every error raised for user input derives from `UpcycleError`, so callers (the
command line and the fuzz tests) can tell upcycle's own messages from bugs.
"""


class UpcycleError(Exception):
    """Base class of every error upcycle raises on purpose."""


class ConfigError(UpcycleError, ValueError):
    """An invalid run config or command-line option."""


class DataError(UpcycleError, ValueError):
    """A task file or dataset that cannot be loaded as a classification task."""


class ModelError(UpcycleError, ValueError):
    """A base model or head that cannot be loaded or built."""


class CheckpointError(UpcycleError, ValueError):
    """A checkpoint or task vector that is missing, corrupt or incompatible."""


class MergeError(UpcycleError, ValueError):
    """Experts or options that cannot be merged together."""


class TrainingError(UpcycleError, RuntimeError):
    """Fine-tuning that cannot continue, such as a non-finite loss."""
