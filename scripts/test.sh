#!/usr/bin/env bash
# Set everything up, then run every check: ruff, then the whole pytest suite (unit, server, engine tests).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python -m pytest -p no:cacheprovider "$@"
