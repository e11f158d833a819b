#!/usr/bin/env bash
# Build the documentation site into build/docs/html (open build/docs/html/index.html, from file://, offline): the
# pages in docs/, the API reference from the docstrings, and the classroom notebooks executed on the demo zoo with
# their widgets live. The notebooks train the zoo the first time (PRESET=classroom, the default: ~7 min on 2 cores;
# PRESET=ci: ~1 min) into DEMO (default build/docs/demo-PRESET) and reuse it afterwards. No network.
# Needs the dev environment: bash scripts/test.sh --co -q (or pip install -e ".[docs,zoo]").
# Usage: [PRESET=ci] [DEMO=DIR] [OUT=DIR] bash scripts/docs.sh [extra sphinx-build arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${PRESET:-classroom}"
DEMO="$(realpath -m "${DEMO:-build/docs/demo-$PRESET}")"
OUT="${OUT:-build/docs/html}"
[ -x .venv/bin/python ] && PATH="$PWD/.venv/bin:$PATH"
export OPD_LENS_DEMO="$DEMO" OPD_LENS_PRESET="$PRESET"
python -m sphinx -b html -E -W --keep-going -q docs "$OUT" "$@"
echo "docs: $OUT/index.html (notebooks executed on $DEMO, preset $PRESET)"
