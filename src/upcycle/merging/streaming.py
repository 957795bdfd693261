"""Merging of task vectors stored as safetensors files, one parameter at a time.

Every expert's file is opened lazily with `safetensors.safe_open`. Names and
shapes are checked from the file headers before any tensor is read, and then
each parameter is read from every expert, merged and kept. A parameter larger
than `block_elements` is read and merged in blocks of rows, for the methods
whose result does not depend on the block layout (`BLOCKED_METHODS`), with the
files reopened for each block so that no mapped page outlives its block. Peak
memory is then about the merged task vector plus one block per expert, whatever
the size of the largest parameter (a word embedding matrix is half of a small
BERT model).

The result equals `merge_task_vectors` on the loaded files, for the same options
and seed. The one exception is TIES on a blocked parameter: each expert's trim
threshold is its k-th largest magnitude over the whole parameter, and entries
whose magnitude equals that threshold are all kept, where `torch.topk` keeps
exactly k of them. Such ties need equal float magnitudes (other than zero, whose
entries take no part in the merge) at the threshold, and change only those entries.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
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
    MergeMethod,
    merge_tensor,
    resolve_expert_names,
    resolve_method,
)

logger = logging.getLogger(__name__)

BLOCKED_METHODS = ("average", "task_arithmetic", "ties")
"""Methods whose large parameters are merged in blocks of rows. Their merge is
elementwise once TIES has its per-expert trim thresholds; DARE draws its random drop
over the whole parameter, so it merges whole parameters."""

DEFAULT_BLOCK_ELEMENTS = 1 << 16
"""Elements per expert in one block (256 KiB of float32)."""


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


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
"""Floating dtypes by their safetensors header name; other dtypes merge as whole tensors,
where `merge_tensor` rejects them with its own error."""


def _row_blocks(shape: Sequence[int], block_elements: int) -> list[tuple[int, int]]:
    rows = int(shape[0])
    row_elements = max(1, math.prod(int(size) for size in shape[1:]))
    step = max(1, block_elements // row_elements)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _magnitude_bits(block: torch.Tensor) -> torch.Tensor:
    # The bit patterns of non-negative float32 numbers, read as integers, sort as the
    # numbers do, with NaN above infinity as torch.topk ranks it.
    return block.abs().to(torch.float32).reshape(-1).view(torch.int32)


def _kth_largest_magnitude(blocks: Callable[[], Iterator[torch.Tensor]], k: int) -> float:
    """The k-th largest magnitude over the tensor that `blocks()` yields block by block.

    An exact radix select on the float32 bit patterns makes two passes over the blocks,
    each with a histogram of 2**16 bins: the first counts the high 16 bits, the second the
    low 16 bits inside the high bin that contains the k-th value. No temporary of the
    tensor's size is made.
    """
    high = torch.zeros(1 << 16, dtype=torch.int64)
    for block in blocks():
        high += torch.bincount(_magnitude_bits(block) >> 16, minlength=1 << 16)
    from_top = high.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, k))
    high_bin = (1 << 16) - 1 - position
    remaining = k - (int(from_top[position - 1]) if position > 0 else 0)

    low = torch.zeros(1 << 16, dtype=torch.int64)
    for block in blocks():
        bits = _magnitude_bits(block)
        low += torch.bincount(bits[(bits >> 16) == high_bin] & 0xFFFF, minlength=1 << 16)
    low_bin = (1 << 16) - 1 - int(torch.searchsorted(low.flip(0).cumsum(0), remaining))
    pattern = torch.tensor([(high_bin << 16) | low_bin], dtype=torch.int32)
    return float(pattern.view(torch.float32))


def _merge_in_blocks(
    key: str,
    shape: Sequence[int],
    dtype: torch.dtype,
    paths: Sequence[Path],
    spec: MergeMethod,
    *,
    coefficient: float,
    density: float,
    seed: int,
    names: Sequence[str],
    block_elements: int,
) -> torch.Tensor:
    ranges = _row_blocks(shape, block_elements)
    thresholds: list[float | None] = []
    trim = spec.name == "ties" and density < 1
    if trim:
        # PEFT's magnitude pruning keeps int(density * numel) entries of each expert.
        keep = int(density * math.prod(shape))
        for path in paths:

            def blocks(path: Path = path) -> Iterator[torch.Tensor]:
                for start, stop in ranges:
                    with ExitStack() as stack:
                        yield _read_slice(_open_lazily(path, stack), key, path, start, stop)

            thresholds.append(_kth_largest_magnitude(blocks, keep) if keep > 0 else None)
    merged = torch.empty(tuple(shape), dtype=dtype)
    for start, stop in ranges:
        with ExitStack() as stack:
            blocks = [
                _read_slice(_open_lazily(path, stack), key, path, start, stop) for path in paths
            ]
            if trim:
                blocks = [
                    _trim_block(block, threshold) for block, threshold in zip(blocks, thresholds)
                ]
            # With density 1, PEFT's ties skips its own trimming and elects signs and
            # merges as it does after trimming.
            merged[start:stop] = merge_tensor(
                key,
                blocks,
                spec,
                coefficient=coefficient,
                density=1.0 if trim else density,
                seed=seed,
                names=names,
            )
            del blocks
    return merged


def _trim_block(block: torch.Tensor, threshold: float | None) -> torch.Tensor:
    block = block.to(torch.float32)
    if threshold is None:
        return torch.zeros_like(block)
    # Multiply by the mask, as PEFT's magnitude pruning does, so that NaN stays NaN.
    return block * (block.abs() >= threshold)


def _read_slice(handle: Any, key: str, path: Path, start: int, stop: int) -> torch.Tensor:
    try:
        return handle.get_slice(key)[start:stop]
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
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> None:
    """Merge the task vectors stored in `paths` and write the result to `out_path`.

    Options mean what they mean in `merge_task_vectors`. `names` defaults to the file
    paths, and `metadata` goes into the output file's header. With a method of
    `BLOCKED_METHODS`, a parameter of more than `block_elements` elements is merged in
    blocks of rows of about that many elements per expert. The output is written to a
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
    if block_elements < 1:
        raise MergeError(f"block_elements is {block_elements}; give a positive number of elements")

    merged: dict[str, torch.Tensor] = {}
    blocked: dict[str, tuple[list[int], torch.dtype]] = {}
    with ExitStack() as stack:
        handles = [_open_lazily(path, stack) for path in paths]
        keys = check_same_keys([handle.keys() for handle in handles], expert_names)
        for key in keys:
            shapes = [handle.get_slice(key).get_shape() for handle in handles]
            shape = check_same_shapes(key, shapes, expert_names)
            if (
                spec.name in BLOCKED_METHODS
                and len(shape) >= 1
                and math.prod(shape) > block_elements
                and shape[0] > 1
            ):
                dtypes = [
                    _SAFETENSORS_DTYPES.get(handle.get_slice(key).get_dtype()) for handle in handles
                ]
                if all(dtype is not None and dtype.is_floating_point for dtype in dtypes):
                    blocked[key] = (list(shape), functools.reduce(torch.promote_types, dtypes))

        for key in keys:
            if key in blocked:
                continue
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

    # The large parameters last, with no file held open between their blocks.
    for key, (shape, dtype) in blocked.items():
        merged[key] = _merge_in_blocks(
            key,
            shape,
            dtype,
            paths,
            spec,
            coefficient=coefficient,
            density=density,
            seed=seed,
            names=expert_names,
            block_elements=block_elements,
        )
    merged = {key: merged[key] for key in keys}

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
