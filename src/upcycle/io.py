"""Atomic file writes and safetensors helpers.

Every file in a run directory is written to a temporary file in the same folder,
flushed to disk, then renamed over the target, so a crash or a full disk leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from upcycle.errors import CheckpointError, UpcycleError

TEMP_SUFFIX = ".tmp"
"""Suffix of the temporary files `atomic_write_bytes` writes; their names also start with a dot."""


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename.

    Raises:
        UpcycleError: if creating the folder, writing or renaming fails, for example on a
            full disk. The previous file at `path` is then unchanged and the temporary
            file is removed.
    """
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent
        )
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except OSError as error:
        _remove_temp_file(tmp_name)
        raise UpcycleError(write_failure_message(path, error)) from error
    except BaseException:
        _remove_temp_file(tmp_name)
        raise
    fsync_directory(path.parent)


def write_failure_message(path: Path, error: OSError) -> str:
    """Describe a failed write of `path` and what to do, naming a full disk as such."""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        reason = error.strerror or os.strerror(error.errno)
        return (
            f"failed to write {path}: the disk is full ({reason}). The previous "
            f"{path.name} is unchanged; free disk space, then run the same command again "
            "to resume."
        )
    return (
        f"failed to write {path}: {error}. The previous {path.name} is unchanged; fix the "
        "cause (permissions, a read-only file system), then run the same command again to "
        "resume."
    )


def _remove_temp_file(name: str | None) -> None:
    if name is not None:
        Path(name).unlink(missing_ok=True)


def fsync_directory(folder: Path) -> None:
    """Flush the entries of `folder` to disk, so a rename into it survives a power loss.

    This is best effort: Windows cannot open a folder for fsync and some network file
    systems reject it. The renamed file itself is complete either way.
    """
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the temporary files that writes killed midway left under `folder`.

    Only names that `atomic_write_bytes` creates (a leading dot and `TEMP_SUFFIX`) are
    removed. Call it only while no other process writes into `folder`.

    Returns:
        The removed paths.
    """
    removed = []
    for path in sorted(Path(folder).rglob(f".*{TEMP_SUFFIX}")):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


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
    """Save tensors as safetensors atomically; metadata values must be strings.

    Equal tensors and metadata give equal bytes in every process (see
    `sort_safetensors_metadata`), so a recomputed checkpoint matches the original file.
    """
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    data = save(contiguous, metadata=dict(metadata) if metadata else None)
    atomic_write_bytes(path, sort_safetensors_metadata(data))


def sort_safetensors_metadata(data: bytes) -> bytes:
    """Return serialized safetensors `data` with the metadata entries in sorted key order.

    safetensors writes the metadata map in hash-map order, which changes from process to
    process. The header is an 8-byte little-endian length and then JSON, padded with
    spaces to a multiple of 8 bytes. Tensor offsets count from the end of the header,
    so rewriting the header leaves the tensor data valid.
    """
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, raising `CheckpointError` for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file not found: {path}. Run `upcycle run` (or `upcycle finetune`) "
            "on its run directory again to recompute it."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint file {path} is corrupt or truncated ({error}). Delete it, then run "
            "`upcycle run` (or `upcycle finetune`) on its run directory again to recompute it."
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
            f"checkpoint file {path} is corrupt or truncated ({error}). Delete it, then run "
            "`upcycle run` (or `upcycle finetune`) on its run directory again to recompute it."
        ) from error
