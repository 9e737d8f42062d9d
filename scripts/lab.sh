#!/usr/bin/env bash
# Set everything up, then start JupyterLab with the FIRST extension on the embedded default:
# the Globus Compute engine run in the server, whose block starts a local engine (vLLM with a GPU, else
# `transformers serve` on the CPU) serving a small model.
# Extra arguments go to `jupyter lab` (e.g. --port 8889).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ -z "${FIRST_CONFIG:-}" ] && [ -z "${FIRST_LOCAL_MODEL:-}" ]; then
  model_dir=$(python -c "from first_jupyter.paths import default_data_dir; print(default_data_dir() / 'models' / 'tiny-chat')")
  first tiny-model "$model_dir" >/dev/null
  echo "first-jupyter: no FIRST_CONFIG or FIRST_LOCAL_MODEL set, so the embedded default serves 'tiny-chat',"
  echo "  a tiny model built offline in $model_dir with RANDOM weights: its answers are random tokens."
  echo "  Set FIRST_LOCAL_MODEL=/path/to/a/real/model (or FIRST_CONFIG=clusters.yaml) for real answers."
fi
extra=()
if [ "$(id -u)" = 0 ]; then extra+=(--allow-root); fi
exec jupyter lab --no-browser "${extra[@]}" "$@"
