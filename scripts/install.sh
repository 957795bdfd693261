#!/usr/bin/env bash
# Create a virtual environment and install upcycle with its test dependencies.
# torch 2.13.0 goes in first, so the package's own torch range is already met and pip
# fetches no other build. pip takes torch from its configured index; on PyPI that is the
# CUDA build on Linux, and TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes the
# CPU build instead. Usage: [TORCH_INDEX_URL=URL] bash scripts/install.sh [VENV_DIR]
set -euo pipefail
venv="${1:-.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  python -m pip install -q torch==2.13.0 --index-url "$TORCH_INDEX_URL"
else
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[test]"
