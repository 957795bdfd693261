"""Helpers shared by the benchmark scripts: the machine header, data paths and peak memory."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's processor string."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def memory_gib() -> float:
    """Return the machine's total memory in GiB, from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def quiet_libraries() -> None:
    """Turn off transformers' progress bars and warnings, which go to stderr anyway."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def print_header(name: str, command: str, note: str | None = None) -> None:
    """Print the benchmark's name, the date, the command, the machine it runs on and a note."""
    quiet_libraries()
    load = os.getloadavg()
    print(f"benchmark: {name}")
    print(f"date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}")
    print(f"command: {command}")
    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores, {memory_gib():.1f} GiB memory")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    print(f"load average at start (1, 5, 15 min): {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}")
    if note:
        print(f"note: {note}")
    print()


def data_root() -> Path:
    """Return the text suite folder: UPCYCLE_DATA, else shared/data/textsuite beside the repo."""
    root = Path(os.environ.get("UPCYCLE_DATA", REPOSITORY.parent / "shared/data/textsuite"))
    if not (root / "sst2" / "train.jsonl").is_file():
        sys.exit(f"the text suite was not found at {root}; set UPCYCLE_DATA to its folder")
    return root


def peak_rss_mib() -> float:
    """Return this process's peak resident set size in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    """Return this process's current resident set size in MiB, from /proc/self/status."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_child(module_args: list[str]) -> dict:
    """Run `python -m ...` in a fresh process and return the JSON object of its last line.

    Each measured variant runs in its own process, so one variant's peak memory does not
    include another's.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY / "src"), str(REPOSITORY)])}
    completed = subprocess.run(
        [sys.executable, *module_args], capture_output=True, text=True, env=env, check=False
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{' '.join(module_args)} failed with exit code {completed.returncode}:\n"
            f"{completed.stderr[-3000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2
