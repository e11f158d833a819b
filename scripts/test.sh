#!/usr/bin/env bash
# Install everything opd_lens needs (Python deps into .venv, the JS toolchain and bundle, Debian's Chromium for the
# browser tests), then lint, type-check (mypy, tsc) and run every test: JS unit tests in Chromium, then pytest.
# Usage: bash scripts/test.sh [extra pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x /usr/bin/chromium ] && [ -z "${CHROMIUM:-}" ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
fi

npm --prefix js ci --no-audit --no-fund --loglevel=error
npm --prefix js run build

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
mypy
npm --prefix js run typecheck
npm --prefix js test
python -m pytest "$@"
