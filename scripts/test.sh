#!/usr/bin/env bash
# Set everything up (Python and Node packages, and the Debian packages the tests run as real parts), then run every
# check: ruff, mypy (strict), the sidebar's unit tests (vitest), the whole pytest suite (unit, server, kernel, engine
# tests), the example notebooks under nbval, then the sidebar in a real browser (Debian's Chromium, installed here
# when missing, driven by Playwright).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-packages.sh  # the site's parts the tests run for real: tinyproxy, redis, postgresql, nginx
. .venv/bin/activate
# configurable-http-proxy for the real JupyterHub of tests/test_jupyterhub.py, pinned with its lockfile
(cd tests/hub && jlpm install --silent)
ruff check .
mypy  # strict, over first_jupyter/ ([tool.mypy] in pyproject.toml)
(cd labextension && jlpm test)
python -m pytest -p no:cacheprovider "$@"
# The example notebooks, top to bottom in fresh kernels, as a user without a Jupyter server runs them: on the
# embedded default (the tiny offline model: HF_HUB_OFFLINE) in a data dir of their own, with no server's gateway in the
# environment. Cells marked NBVAL_CHECK_OUTPUT must reproduce their saved output; every cell must run.
notebook_data=$(mktemp -d)
trap 'rm -rf "$notebook_data"' EXIT
env -u FIRST_GATEWAY_URL -u FIRST_API_KEY -u FIRST_CONFIG -u FIRST_LOCAL_MODEL FIRST_DATA_DIR="$notebook_data" HF_HUB_OFFLINE=1 \
  python -m pytest -p no:cacheprovider --nbval-lax notebooks
# The JupyterLab sidebar in Chromium against a real server (tests/ui/run.sh); screenshots in tests/ui/artifacts.
bash tests/ui/run.sh
