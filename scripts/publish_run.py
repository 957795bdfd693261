"""Copy the shareable part of a run directory (config, summary, result tables, report) to DEST.

Checkpoints and per-step work files stay behind. Usage:
    python scripts/publish_run.py RUN DEST
"""

import shutil
import sys
from pathlib import Path


def publish(run: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("config.yaml", "summary.md"):
        if (run / name).is_file():
            shutil.copy2(run / name, dest / name)
    results = dest / "results"
    results.mkdir(exist_ok=True)
    for path in sorted((run / "results").glob("*")):
        if path.suffix in (".csv", ".parquet"):
            shutil.copy2(path, results / path.name)
    if (run / "report").is_dir():
        shutil.copytree(run / "report", dest / "report", dirs_exist_ok=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/publish_run.py RUN DEST")
    publish(Path(sys.argv[1]), Path(sys.argv[2]))
