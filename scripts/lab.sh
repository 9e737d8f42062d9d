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
  echo "first-jupyter: no FIRST_CONFIG or FIRST_LOCAL_MODEL set, so the embedded default serves a small model:"
  echo "  where the Hugging Face hub answers, a real one, downloaded once into the data dir (its progress below"
  echo "  and in the sidebar); offline (HF_HUB_OFFLINE=1, or no route), 'tiny-chat', whose RANDOM weights answer in"
  echo "  random tokens. The server's log below says which, and why."
fi
extra=()
if [ "$(id -u)" = 0 ]; then extra+=(--allow-root); fi
exec jupyter lab --no-browser "${extra[@]}" "$@"
