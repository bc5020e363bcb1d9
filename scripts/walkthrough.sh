#!/usr/bin/env bash
# Sets everything up (scripts/bootstrap.sh), then executes the walkthrough notebooks in a real
# kernel and writes the rendered HTML to artifacts/.
set -euo pipefail
cd "$(dirname "$0")/.."
NBTROUBLE_NO_BROWSER=1 bash scripts/bootstrap.sh
exec .venv/bin/python scripts/run_walkthrough.py "$@"
