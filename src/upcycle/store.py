"""The run directory: its layout, manifest and result tables.

The manifest records which units of work are complete (one expert, one merge
step, one analysis) together with the hash of the resolved config and of every
input file. A unit is marked complete only after all its files are written, so
a run killed at any point resumes by skipping marked units and redoing the rest.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from upcycle.config import EXECUTION_KEYS, RESTAGED_KEYS, parse_config
from upcycle.errors import CheckpointError, ConfigError
from upcycle.io import (
    atomic_write_csv,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temp_files,
)

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Return the dotted keys whose values differ between two nested mappings.

    A key that only `new` has is not a difference: it is a setting added to upcycle
    after the run started, filled with its default.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for key in sorted(set(old) | set(new)):
            if key not in old:
                continue
            keys += diff_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


def relative_input_names(inputs: Mapping[str, str]) -> dict[str, str]:
    """Map each input file's path below the deepest folder that contains them all to its path."""
    if not inputs:
        return {}
    paths = sorted(inputs)
    if len(paths) == 1:
        return {Path(paths[0]).name: paths[0]}
    common = os.path.commonpath(paths)
    return {Path(os.path.relpath(path, common)).as_posix(): path for path in paths}


class RunDir:
    """Paths and bookkeeping of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.results = self.root / "results"
        self.checkpoints = self.root / "checkpoints"
        self.manifest_path = self.root / "manifest.json"
        self.manifest_lock_path = self.root / "manifest.json.lock"
        self.config_path = self.root / "config.yaml"
        # path -> (size, mtime_ns, SHA-256), so every stage that checks a unit does not
        # hash the same checkpoint files again.
        self._digests: dict[Path, tuple[int, int, str]] = {}

    # Layout

    def expert_dir(self, kind: str, task: str, seed: int) -> Path:
        return self.checkpoints / kind / task / f"seed{seed}"

    def checkpoint_path(self, kind: str, task: str, seed: int, step: int) -> Path:
        return self.expert_dir(kind, task, seed) / f"step{step}.safetensors"

    def result_path(self, name: str) -> Path:
        return self.results / name

    # Manifest

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.is_file():
            return {"version": MANIFEST_VERSION, "config_hash": None, "inputs": {}, "completed": {}}
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise CheckpointError(
                f"manifest {self.manifest_path} is not valid JSON ({error}); delete it to "
                "recompute everything in this run directory"
            ) from error

    def is_complete(self, key: str) -> bool:
        """Return whether unit `key` is marked complete and the files it recorded are intact.

        A unit whose recorded files are missing or changed since `mark_complete` counts as
        not complete, so the stage that owns it recomputes it. A warning names the files.
        """
        entry = self.read_manifest()["completed"].get(key)
        if entry is None:
            return False
        problems = self.file_problems(entry.get("files", {}))
        if problems:
            logger.warning(
                "%s is marked complete, but %s, so it counts as not complete",
                key,
                "; ".join(problems),
            )
            return False
        return True

    def file_problems(self, digests: dict[str, str]) -> list[str]:
        """Describe each file of `digests` that is missing or has another SHA-256.

        `digests` maps paths relative to the run directory to SHA-256 hex digests.
        """
        problems = []
        for name, digest in sorted(digests.items()):
            path = self.root / name
            if not path.is_file():
                problems.append(f"{path} is missing")
            elif self.cached_sha256(path) != digest:
                problems.append(f"{path} changed since it was written (corrupt or edited)")
        return problems

    def cached_sha256(self, path: Path) -> str:
        """Return the SHA-256 of `path`, hashing it again only if its size or mtime changed."""
        stat = path.stat()
        cached = self._digests.get(path)
        if cached is not None and cached[:2] == (stat.st_size, stat.st_mtime_ns):
            return cached[2]
        digest = file_sha256(path)
        self._digests[path] = (stat.st_size, stat.st_mtime_ns, digest)
        return digest

    @contextmanager
    def manifest_lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the manifest while reading, changing and writing it.

        Jobs running in parallel processes (the Ray executor) mark the manifest of one run
        directory. Without the lock, two read-modify-write cycles that overlap drop one
        entry. The lock is `fcntl.flock` on a file beside the manifest, so it is POSIX only.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.manifest_lock_path, "a") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def mark_complete(
        self, key: str, info: dict[str, Any] | None = None, *, files: Iterable[Path] = ()
    ) -> None:
        """Mark unit `key` complete, with `info` and the SHA-256 of each of its `files`.

        `is_complete` checks the recorded files again, so list only files that no later
        stage rewrites.
        """
        info = dict(info or {})
        if files:
            root = self.root.resolve()
            info["files"] = {
                Path(path).resolve().relative_to(root).as_posix(): self.cached_sha256(Path(path))
                for path in files
            }
        with self.manifest_lock():
            manifest = self.read_manifest()
            manifest["completed"][key] = info
            atomic_write_json(self.manifest_path, manifest)

    def clear_complete(self, prefix: str) -> None:
        with self.manifest_lock():
            manifest = self.read_manifest()
            manifest["completed"] = {
                key: value
                for key, value in manifest["completed"].items()
                if not key.startswith(prefix)
            }
            atomic_write_json(self.manifest_path, manifest)

    # Config and inputs

    def prepare(
        self,
        config,
        input_files: list[Path],
        *,
        force: bool = False,
        data_root: Path | None = None,
    ) -> None:
        """Create the run directory or check that an existing one has the same config and data.

        It also removes the temporary files of writes that a killed run left behind, so
        no other process may write into the run directory meanwhile.

        Raises:
            ConfigError: if a config key or an input file changed since the run started and
                `force` is False. With `force`, the new config is written and every unit
                is recomputed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.read_manifest()
        inputs = {str(path): file_sha256(path) for path in sorted(input_files)}
        contents = relative_input_names(inputs)
        problems = []
        if manifest["config_hash"] is not None:
            problems = self.changes(manifest, config, inputs)
        if problems and not force:
            raise ConfigError(
                f"run directory {self.root} was started with other settings ("
                + "; ".join(problems)
                + "). Use a new run directory, or pass --force to recompute it"
            )
        if problems:
            logger.warning(
                "--force: %s; recomputing every stage of %s", "; ".join(problems), self.root
            )
            manifest["completed"] = {}
        for path in remove_stale_temp_files(self.root):
            logger.info("removed %s, left behind by a run killed while writing it", path)
        manifest["config_hash"] = config.config_hash()
        manifest["inputs"] = {**manifest.get("inputs", {}), **inputs}
        manifest["input_contents"] = {name: inputs[path] for name, path in contents.items()}
        if data_root is not None:
            manifest["data_root"] = str(Path(data_root).resolve())
        atomic_write_text(self.config_path, config.to_yaml())
        atomic_write_json(self.manifest_path, manifest)

    def recorded_data_root(self) -> Path | None:
        """Return the data folder this run was prepared with, if it still exists."""
        if not self.manifest_path.is_file():
            return None
        recorded = self.read_manifest().get("data_root")
        if recorded is None:
            return None
        if not Path(recorded).is_dir():
            logger.warning(
                "the data folder %s that run %s recorded no longer exists; give the data "
                "folder with --data or UPCYCLE_DATA",
                recorded,
                self.root,
            )
            return None
        logger.info("reading the tasks from %s, the data folder the run recorded", recorded)
        return Path(recorded)

    def changes(self, manifest: dict[str, Any], config, inputs: dict[str, str]) -> list[str]:
        """Describe the config keys and input files (path: SHA-256) that differ from the run's.

        Input files are compared by their path below the folder that contains them all, so a
        data folder moved or copied elsewhere with the same files resumes the run, and one
        whose files differ is a change. A manifest written before `input_contents` existed
        is compared by absolute path.
        """
        problems = []
        if manifest["config_hash"] != config.config_hash():
            stored = self.stored_config()
            if stored is None:
                problems.append(f"the config hash differs and {self.config_path} is missing")
            else:
                changed = [
                    key
                    for key in diff_keys(stored, config.model_dump(mode="json"))
                    if key.split(".")[0] not in EXECUTION_KEYS + RESTAGED_KEYS
                    # The data folder may move: the input files' contents are compared below.
                    and key != "data.root"
                ]
                if changed:
                    problems.append(f"config keys changed: {', '.join(changed)}")
        stored_contents = manifest.get("input_contents")
        if stored_contents is None:
            changed_files = [
                path
                for path, digest in inputs.items()
                if manifest["inputs"].get(path, digest) != digest
            ]
            added_files: list[str] = []
            missing_files: list[str] = []
        else:
            contents = relative_input_names(inputs)
            changed_files = [
                path
                for name, path in contents.items()
                if name in stored_contents and stored_contents[name] != inputs[path]
            ]
            added_files = [path for name, path in contents.items() if name not in stored_contents]
            missing_files = sorted(set(stored_contents) - set(contents))
        if changed_files:
            problems.append(f"input files changed: {', '.join(changed_files)}")
        if added_files:
            problems.append(f"input files added: {', '.join(added_files)}")
        if missing_files:
            problems.append(
                "input files missing (paths below the data folder the run was started "
                f"with): {', '.join(missing_files)}"
            )
        return problems

    def stored_config(self) -> dict[str, Any] | None:
        """Return config.yaml as a mapping, or None when it is missing.

        Keys added to upcycle after the run started get their defaults, so only a new key
        set to another value counts as a change. A config.yaml that the current schema
        rejects is compared as written.
        """
        if not self.config_path.is_file():
            return None
        raw = yaml.safe_load(self.config_path.read_text())
        try:
            return parse_config(raw, str(self.config_path)).model_dump(mode="json")
        except ConfigError:
            return raw

    # Results

    def write_result(self, name: str, frame: pd.DataFrame) -> Path:
        path = self.result_path(name)
        atomic_write_csv(path, frame)
        return path

    def read_result(self, name: str) -> pd.DataFrame | None:
        path = self.result_path(name)
        if not path.is_file():
            return None
        return pd.read_csv(path)
