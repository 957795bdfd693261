"""The run directory: its layout, manifest and result tables.

The manifest records which units of work are complete (one expert, one merge
step, one analysis) together with the hash of the resolved config and of every
input file. A unit is marked complete only after all its files are written, so
a run killed at any point resumes by skipping marked units and redoing the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from upcycle.errors import CheckpointError, ConfigError
from upcycle.io import atomic_write_csv, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Return the dotted keys whose values differ between two nested mappings."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = []
        for key in sorted(set(old) | set(new)):
            keys += diff_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return keys
    return [] if old == new else [prefix.rstrip(".")]


class RunDir:
    """Paths and bookkeeping of one run directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.results = self.root / "results"
        self.checkpoints = self.root / "checkpoints"
        self.manifest_path = self.root / "manifest.json"
        self.config_path = self.root / "config.yaml"

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
        return key in self.read_manifest()["completed"]

    def mark_complete(self, key: str, info: dict[str, Any] | None = None) -> None:
        manifest = self.read_manifest()
        manifest["completed"][key] = info or {}
        atomic_write_json(self.manifest_path, manifest)

    def clear_complete(self, prefix: str) -> None:
        manifest = self.read_manifest()
        manifest["completed"] = {
            key: value for key, value in manifest["completed"].items() if not key.startswith(prefix)
        }
        atomic_write_json(self.manifest_path, manifest)

    # Config and inputs

    def prepare(self, config, input_files: list[Path], *, force: bool = False) -> None:
        """Create the run directory or check that an existing one has the same config and data.

        Raises:
            ConfigError: if the config or an input file changed since the run started and
                `force` is False. With `force`, the new config is written and every unit
                is recomputed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        manifest = self.read_manifest()
        new_config = config.model_dump(mode="json")
        inputs = {str(path): file_sha256(path) for path in sorted(input_files)}
        if manifest["config_hash"] is not None and not force:
            problems = []
            if manifest["config_hash"] != config.config_hash() and self.config_path.is_file():
                old_config = yaml.safe_load(self.config_path.read_text())
                changed = [
                    key for key in diff_keys(old_config, new_config)
                    if key.split(".")[0] not in ("name", "executor")
                ]
                if changed:
                    problems.append(f"config keys changed: {', '.join(changed)}")
            changed_files = [
                path for path, digest in inputs.items()
                if manifest["inputs"].get(path, digest) != digest
            ]
            if changed_files:
                problems.append(f"input files changed: {', '.join(changed_files)}")
            if problems:
                raise ConfigError(
                    f"run directory {self.root} was started with other settings ("
                    + "; ".join(problems)
                    + "). Use a new run directory, or pass --force to recompute it"
                )
        if force and manifest["config_hash"] not in (None, config.config_hash()):
            logger.warning("--force: recomputing every stage of %s", self.root)
            manifest["completed"] = {}
        manifest["config_hash"] = config.config_hash()
        manifest["inputs"] = {**manifest.get("inputs", {}), **inputs}
        atomic_write_text(self.config_path, config.to_yaml())
        atomic_write_json(self.manifest_path, manifest)

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
