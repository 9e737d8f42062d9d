"""The Jupyter server the browser tests run against (started by Playwright, see playwright.config.js).

Galata's test settings (no token, port 8888, a temporary root), plus a FIRST config of three clusters:
- ``local``: the embedded default's path, the Globus Compute engine run in this process, whose block starts
  ``transformers serve`` on the tiny model (built on first use in a data dir of its own);
- ``remote``: an OpenAI-compatible endpoint, the fake upstream (bench/fake_upstream.py), serving ``fake-model``,
  whose fixed answer ("tok0 tok1 ...") tells its answers from the tiny model's;
- ``alcf``: an existing FIRST gateway, the stand-in of tests/ui/first_stand_in.py, for the notebook tests: a
  running model whose answer is Markdown, and a queued one whose start the test holds and then lets go.
The fake's URL is written to ``$FIRST_UI_STATE/fake_upstream_url`` for the tests, and the URL that lets the held
start go to ``$FIRST_UI_STATE/first_control_url``; both stand-ins are stopped, by their PIDs, when the server
exits.

Globus Auth is answered on loopback by ``LoopbackGlobusAuth`` (a thread of this server), which the real
globus-sdk reaches through ``GLOBUS_SDK_SERVICE_URL_AUTH``: its authorize page shows the code a user would paste
(``good-code``; any other is refused as Globus refuses a wrong one), its token endpoint grants tokens for that
code, and userinfo names the identity. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from jupyterlab.galata import configure_jupyter_server

c = get_config()  # type: ignore[name-defined]  # noqa: F821 (given by traitlets when it runs this file)
configure_jupyter_server(c)
c.ServerApp.port = int(os.environ.get("FIRST_UI_PORT", "8888"))

ROOT = Path(__file__).resolve().parents[2]
state = Path(os.environ.get("FIRST_UI_STATE") or tempfile.mkdtemp(prefix="first-ui-"))
state.mkdir(parents=True, exist_ok=True)
data = state / "data"


def _started(argv: list[str]) -> tuple[subprocess.Popen[str], str]:
    """A stand-in started from the repository's root, and what its ``READY`` line says once it listens; stopped,
    by its PID, when the server exits. Its standard input is a pipe that closes when this server goes, even
    killed, so a stand-in that watches it never outlives the test."""
    process = subprocess.Popen([sys.executable, *argv], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    ready = process.stdout.readline().strip() if process.stdout else ""
    if not ready.startswith("READY "):
        process.kill()
        raise SystemExit(f"{argv[-1]} did not start: {ready!r}")
    atexit.register(_stop, process)
    return process, ready.removeprefix("READY ")


def _stop(process: subprocess.Popen[str]) -> None:
    """SIGTERM, then SIGKILL if it is not gone in a minute (a guard for a loaded machine, not a pace)."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


_, fake_url = _started([str(ROOT / "bench" / "fake_upstream.py"), "--port", "0", "--models", "fake-model",
                        "--chunks", "8"])
(state / "fake_upstream_url").write_text(fake_url)
# the FIRST cluster of the notebook tests: a model whose answer is Markdown, and one whose start is held
_, first_urls = _started(["-m", "tests.ui.first_stand_in"])
first = json.loads(first_urls)
(state / "first_control_url").write_text(first["control"])



class LoopbackGlobusAuth(BaseHTTPRequestHandler):
    """The Globus Auth endpoints a native-app sign-in uses, as the browser and the SDK see them: the authorize
    page, the token grant (with an OpenID id_token, which the SDK checks against the keys at jwk.json), userinfo."""

    CODE = "good-code"
    CLIENT_ID = "5d2e8f3a-7c41-4b9e-8a6d-2f1e0c9b8a7d"
    IDENTITY = "0b2f6e1c-5a49-4d8a-9a3e-1f2d3c4b5a69"
    KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    issuer = ""  # the server's URL, once it listens

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the server's own log is what the tests read."""

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.startswith("/v2/oauth2/authorize"):
            page = f'<html><body><p>Your authorization code:</p><code id="auth-code">{self.CODE}</code></body></html>'
            self._send(200, page.encode(), "text/html")
        elif self.path.startswith("/v2/oauth2/userinfo"):
            identity = {"sub": self.IDENTITY, "preferred_username": "ada@uni.edu", "name": "Ada Lovelace",
                        "email": "ada@uni.edu"}
            self._send(200, json.dumps(identity).encode(), "application/json")
        elif self.path == "/.well-known/openid-configuration":
            oidc = {"issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwk.json",
                    "id_token_signing_alg_values_supported": ["RS512"]}
            self._send(200, json.dumps(oidc).encode(), "application/json")
        elif self.path == "/jwk.json":
            key = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.KEY.public_key()))
            self._send(200, json.dumps({"keys": [{**key, "alg": "RS512", "use": "sig"}]}).encode(),
                       "application/json")
        else:
            self._send(404, b"{}", "application/json")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
        if self.path != "/v2/oauth2/token" or form.get("code") != self.CODE:
            self._send(401, json.dumps({"error": "invalid_grant"}).encode(), "application/json")
            return
        compute = {"access_token": "AT-compute", "refresh_token": "RT-compute", "expires_in": 172800,
                   "scope": "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all",
                   "token_type": "Bearer", "resource_server": "funcx_service"}
        now = int(time.time())
        id_token = jwt.encode({"sub": self.IDENTITY, "aud": self.CLIENT_ID, "iss": self.issuer, "iat": now,
                               "exp": now + 3600}, self.KEY, algorithm="RS512")
        tokens = {"access_token": "AT-auth", "refresh_token": "RT-auth", "scope": "openid profile email",
                  "expires_in": 172800, "token_type": "Bearer", "resource_server": "auth.globus.org",
                  "id_token": id_token, "state": "_default", "other_tokens": [compute]}
        self._send(200, json.dumps(tokens).encode(), "application/json")


globus_auth = ThreadingHTTPServer(("127.0.0.1", 0), LoopbackGlobusAuth)
threading.Thread(target=globus_auth.serve_forever, name="loopback-globus-auth", daemon=True).start()
LoopbackGlobusAuth.issuer = f"http://127.0.0.1:{globus_auth.server_port}"
os.environ["GLOBUS_SDK_SERVICE_URL_AUTH"] = f"{LoopbackGlobusAuth.issuer}/"

config = {
    "clusters": {
        "local": {"backend": "globus_compute", "endpoints": [{
            "name": "engine", "in_process": {},
            "models": [{"id": "tiny-chat", "path": str(data / "models" / "tiny-chat"), "build_tiny": True}]}]},
        "remote": {"backend": "http", "endpoints": [{
            "name": "vllm-1", "base_url": f"{fake_url}/v1", "models": [{"id": "fake-model"}]}]},
        "alcf": {"backend": "first", "endpoints": [{"name": "gateway", "base_url": first["first"]}]},
    },
    # a held start's status line is redrawn each second, so that the test sees it change in place
    "defaults": {"model": "tiny-chat", "cold_start": {"progress_every": 1.0}},
    "auth": {"client_id": LoopbackGlobusAuth.CLIENT_ID, "sources": ["native"]},
}
(state / "first.yaml").write_text(yaml.safe_dump(config))
os.environ["FIRST_CONFIG"] = str(state / "first.yaml")
os.environ["FIRST_DATA_DIR"] = str(data)
os.environ.pop("FIRST_LOCAL_MODEL", None)
