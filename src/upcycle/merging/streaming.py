"""Merging of task vectors stored as safetensors files, one parameter at a time.

Every expert's file is opened lazily with `safetensors.safe_open`. Names and
shapes are checked from the file headers before any tensor is read, and then
each parameter is read from every expert, merged and kept, so peak memory is
about the merged task vector plus one parameter per expert. The result equals
`merge_task_vectors` on the loaded files, for the same options and seed.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from upcycle.errors import CheckpointError, MergeError, UpcycleError
from upcycle.merging.methods import (
    check_merge_options,
    check_same_keys,
    check_same_shapes,
    merge_tensor,
    resolve_expert_names,
    resolve_method,
)

logger = logging.getLogger(__name__)


def _corrupt_file_error(path: Path, error: Exception) -> CheckpointError:
    return CheckpointError(
        f"task vector file {path} is missing, corrupt or truncated ({error}). Recompute it "
        "with the command that wrote it"
    )


def _open_lazily(path: Path, stack: ExitStack) -> Any:
    try:
        return stack.enter_context(safe_open(str(path), framework="pt"))
    except (SafetensorError, OSError, ValueError) as error:
        raise _corrupt_file_error(path, error) from error


def _read_tensor(handle: Any, key: str, path: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except (SafetensorError, OSError, ValueError) as error:
        raise _corrupt_file_error(path, error) from error


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str] | None:
    if metadata is None:
        return None
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MergeError(
                f"metadata entry {key!r}: {value!r} is not a pair of strings. Safetensors "
                "headers store only strings, so convert the value with str() or json.dumps()"
            )
    return dict(metadata)


def _save_atomically(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None
) -> None:
    # save_file writes straight to disk, so unlike upcycle.io.atomic_save_safetensors no
    # serialized copy of the whole model is held in memory.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp_name, metadata=metadata)
        with open(tmp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except OSError as error:
        Path(tmp_name).unlink(missing_ok=True)
        raise UpcycleError(
            f"failed to write {path}: {error}. Nothing was replaced; free disk space or fix "
            "permissions, then run the merge again"
        ) from error
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def merge_safetensors_files(
    paths: Sequence[str | Path],
    out_path: str | Path,
    method: str,
    *,
    coefficient: float = 1.0,
    density: float = 1.0,
    seed: int = 0,
    names: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Merge the task vectors stored in `paths` and write the result to `out_path`.

    Options mean what they mean in `merge_task_vectors`. `names` defaults to the file
    paths, and `metadata` goes into the output file's header. The output is written to a
    temporary file in its folder and renamed over `out_path`, so an interrupted merge
    leaves any earlier file in place.

    Raises:
        MergeError: for the errors of `merge_task_vectors`, found from the file headers
            before any tensor is read where possible, or metadata that is not strings.
        CheckpointError: for a missing, corrupt or truncated input file.
        UpcycleError: when the output file cannot be written.
    """
    paths = [Path(path) for path in paths]
    out_path = Path(out_path)
    spec = resolve_method(method)
    expert_names = resolve_expert_names(
        len(paths), names if names is not None else [str(path) for path in paths]
    )
    check_merge_options(spec, coefficient=coefficient, density=density)
    header_metadata = _check_metadata(metadata)

    merged: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = [_open_lazily(path, stack) for path in paths]
        keys = check_same_keys([handle.keys() for handle in handles], expert_names)
        for key in keys:
            shapes = [handle.get_slice(key).get_shape() for handle in handles]
            check_same_shapes(key, shapes, expert_names)

        for key in keys:
            tensors = [_read_tensor(handle, key, path) for handle, path in zip(handles, paths)]
            merged[key] = merge_tensor(
                key,
                tensors,
                spec,
                coefficient=coefficient,
                density=density,
                seed=seed,
                names=expert_names,
            ).contiguous()
            del tensors

    _save_atomically(merged, out_path, header_metadata)
    logger.info(
        "merged %d experts with %s (coefficient %g, density %g, seed %d) into %s",
        len(paths),
        method,
        coefficient,
        density,
        seed,
        out_path,
    )
