#!/usr/bin/env bash
# The browser tests of the FIRST sidebar and of `%first` cells' outputs: JupyterLab in Debian's Chromium, driven by
# Playwright (galata).
# Installs Chromium from Debian when it is missing (Playwright's own browser download is skipped), then runs
# every test in tests/ui/tests against a Jupyter server Playwright starts (jupyter_server_test_config.py), and
# behind a real JupyterHub that hub.spec.ts starts (tests/hub/serve_for_ui.py; its proxy from tests/hub's lockfile).
# Screenshots of the panel and of the cells are written to tests/ui/artifacts. Expects .venv set up (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")"
export CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$CHROMIUM" ]; then
  sudo=()
  if [ "$(id -u)" != 0 ]; then sudo=(sudo); fi
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq chromium >/dev/null
fi
. ../../.venv/bin/activate
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
jlpm install --silent
(cd ../hub && jlpm install --silent)
state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
rm -rf artifacts
FIRST_UI_STATE="$state" jlpm playwright test "$@"
echo "tests/ui: screenshots of the panel and the cells in $(pwd)/artifacts"
