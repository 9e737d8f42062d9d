"""The Jupyter server the browser tests run against (started by Playwright, see playwright.config.js).

Galata's test settings (no token, port 8888, a temporary root), plus a FIRST config of two clusters:
- ``local``: the embedded default's path, the Globus Compute engine run in this process, whose block starts
  ``transformers serve`` on the tiny model (built on first use in a data dir of its own);
- ``remote``: an OpenAI-compatible endpoint, the fake upstream (bench/fake_upstream.py), serving ``fake-model``,
  whose fixed answer ("tok0 tok1 ...") tells its answers from the tiny model's.
The fake's URL is written to ``$FIRST_UI_STATE/fake_upstream_url`` for the tests; it is stopped, by its PID,
when the server exits.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from jupyterlab.galata import configure_jupyter_server

c = get_config()  # type: ignore[name-defined]  # noqa: F821 (given by traitlets when it runs this file)
configure_jupyter_server(c)
c.ServerApp.port = int(os.environ.get("FIRST_UI_PORT", "8888"))

ROOT = Path(__file__).resolve().parents[2]
state = Path(os.environ.get("FIRST_UI_STATE") or tempfile.mkdtemp(prefix="first-ui-"))
state.mkdir(parents=True, exist_ok=True)
data = state / "data"

fake = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--port", "0", "--models",
                         "fake-model", "--chunks", "8"], stdout=subprocess.PIPE, text=True)
ready = fake.stdout.readline().strip() if fake.stdout else ""
if not ready.startswith("READY "):
    fake.kill()
    raise SystemExit(f"the fake upstream did not start: {ready!r}")
fake_url = ready.removeprefix("READY ")
(state / "fake_upstream_url").write_text(fake_url)


def _stop_fake() -> None:
    if fake.poll() is None:
        os.kill(fake.pid, signal.SIGTERM)
        fake.wait(10)


atexit.register(_stop_fake)

config = {
    "clusters": {
        "local": {"backend": "globus_compute", "endpoints": [{
            "name": "engine", "in_process": {},
            "models": [{"id": "tiny-chat", "path": str(data / "models" / "tiny-chat"), "build_tiny": True}]}]},
        "remote": {"backend": "http", "endpoints": [{
            "name": "vllm-1", "base_url": f"{fake_url}/v1", "models": [{"id": "fake-model"}]}]},
    },
    "defaults": {"model": "tiny-chat"},
}
(state / "first.yaml").write_text(yaml.safe_dump(config))
os.environ["FIRST_CONFIG"] = str(state / "first.yaml")
os.environ["FIRST_DATA_DIR"] = str(data)
os.environ.pop("FIRST_LOCAL_MODEL", None)
