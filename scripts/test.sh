#!/usr/bin/env bash
# Sets everything up (scripts/bootstrap.sh), then runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
