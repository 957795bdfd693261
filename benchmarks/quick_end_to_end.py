"""Wall time of `upcycle run configs/quick.yaml` end to end, with each stage's time.

The run goes into a new temporary run directory, so nothing is resumed, with the
executor of `--executor` (default: local). Stage times come from the "stage ... finished
in" log lines of `upcycle.pipeline`. Torch uses every core unless OMP_NUM_THREADS sets
another number of threads.

Run: python benchmarks/quick_end_to_end.py [--executor ray] [--out DIR] > benchmarks/output/quick_end_to_end.txt
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPOSITORY, data_root, print_header


class StageTimes(logging.Handler):
    """Collects the stage durations that `upcycle.pipeline.stage` logs."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("stage "):
            self.lines.append(message)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPOSITORY / "configs/quick.yaml"))
    parser.add_argument("--executor", choices=["local", "ray"], default="local")
    parser.add_argument("--note", help="a line printed under the header, e.g. other load")
    parser.add_argument(
        "--out",
        help="a new run directory to keep the run in (default: a temporary one, deleted after)",
    )
    args = parser.parse_args()
    print_header(
        "quick_end_to_end",
        f"python benchmarks/quick_end_to_end.py --config {args.config} --executor {args.executor}",
        args.note,
    )

    from upcycle.config import load_config
    from upcycle.pipeline import run_all

    config = load_config(args.config)
    config.executor = args.executor
    handler = StageTimes()
    logging.getLogger("upcycle.pipeline").addHandler(handler)
    logging.getLogger("upcycle.pipeline").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="upcycle-bench-") as folder:
        run = Path(args.out) if args.out else Path(folder) / "run"
        if run.exists():
            sys.exit(f"--out {run} already exists; give a new directory, so that nothing is resumed")
        started = time.perf_counter()
        run_all(config, run, data_root=str(data_root()), progress=False)
        total = time.perf_counter() - started
    for line in handler.lines:
        print(line)
    print()
    print(f"{Path(args.config).name} end to end ({args.executor} executor): {total / 60:.1f} min")


if __name__ == "__main__":
    main()
