#!/usr/bin/env bash
# Install everything opd_lens needs into .venv, then lint and run every test.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
# The CPU build of torch 2.13.0 installs from local disk in seconds; pyproject.toml itself accepts torch>=2.4.
pip install --quiet "torch==2.13.0"
pip install --quiet -e ".[dev]"

ruff check .
ruff format --check .
python -m pytest "$@"
