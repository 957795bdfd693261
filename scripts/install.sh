#!/usr/bin/env bash
# Create a virtual environment and install upcycle with its test dependencies.
# torch 2.13.0 (CPU build) goes in first, so the package's own torch range is already met
# and pip does not fetch a CUDA build. Usage: bash scripts/install.sh [VENV_DIR]
set -euo pipefail
venv="${1:-.venv}"
python3 -m venv "$venv"
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
