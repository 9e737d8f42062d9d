#!/usr/bin/env bash
# Create .venv and install first-jupyter with everything needed to run and test it.
# torch comes first, pinned to the CPU build, so that transformers does not pull a CUDA build.
# The JupyterLab sidebar (labextension/) is built with jlpm (Node) and linked into the environment, so that
# JupyterLab loads what is built here; a wheel carries it prebuilt instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
# the sidebar's link into .venv (below) is removed first: pip would write the package's copy through it
linked=.venv/share/jupyter/labextensions/first-jupyter
if [ -L "$linked" ]; then rm "$linked"; fi
python -m pip install -q -e ".[dev]"
(cd labextension && jlpm install --silent && jlpm build:prod >/dev/null)
jupyter-builder develop --overwrite . >/dev/null
