"""Atomic file writes and safetensors helpers.

Every file in a run directory is written to a temporary file in the same folder,
flushed to disk, then renamed over the target, so a crash or a full disk leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from upcycle.errors import CheckpointError, UpcycleError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except OSError as error:
        Path(tmp_name).unlink(missing_ok=True)
        raise UpcycleError(
            f"failed to write {path}: {error}. Nothing was replaced; free disk space "
            "or fix permissions, then run the same command again to resume."
        ) from error
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    atomic_write_text(path, frame.to_csv(index=False))


def atomic_write_parquet(path: str | Path, frame: pd.DataFrame) -> None:
    import io

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Save tensors as safetensors atomically; metadata values must be strings."""
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    data = save(contiguous, metadata=dict(metadata) if metadata else None)
    atomic_write_bytes(path, data)


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, raising `CheckpointError` for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}. Run fine-tuning again for it.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt or truncated ({error}). Delete it and run "
            "the same command again to recompute it."
        ) from error


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """Read the metadata header of a safetensors file without loading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt or truncated ({error}). Delete it and run "
            "the same command again to recompute it."
        ) from error
