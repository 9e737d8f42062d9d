"""A real JupyterHub for the tests: JupyterHub with configurable-http-proxy, single-user servers with the extension.

The hub runs as in production, in a process of its own on loopback ports: ``tests/hub/authenticator.py`` logs users
in with GlobusOAuthenticator-shaped auth states, ``SimpleLocalProcessSpawner`` starts ``jupyterhub-singleuser``
(the first_jupyter extension enabled by the installed Jupyter config) with ``FIRST_CONFIG`` from the hub's
``Spawner.environment``, and the hub's roles grant ``admin:auth_state!user`` to users and to their servers' tokens,
as README's "Behind JupyterHub" tells admins to. Tests reach it only through the proxy's public URL.

configurable-http-proxy comes from npm (``tests/hub/package.json``, pinned, with its lockfile), installed by
``scripts/test.sh``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

import first_jupyter
from bench.overhead import free_port
from tests.waiting import ENGINE_GUARD_S, eventually

HERE = Path(__file__).resolve().parent
PROXY = HERE / "node_modules" / ".bin" / "configurable-http-proxy"
ADMIN_SERVICE = "test-admin"

SERVER_TOKEN_SCOPES = ["users:activity!user", "access:servers!server", "admin:auth_state!user"]
"""What README's "Behind JupyterHub" asks of a hub: the server's token may read its user's auth state."""


def hub_config(*, directory: Path, ports: dict[str, int], admin_token: str, first_config: Path) -> str:
    """The ``jupyterhub_config.py`` of one test hub. Everything it writes (database, cookie secret, the proxy's PID
    file, users' homes) goes under ``directory``. The spawned servers import this checkout's first_jupyter
    (``PYTHONPATH``), whichever checkout the environment's editable install points at."""
    settings: list[tuple[str, Any]] = [
        ("JupyterHub.ip", "127.0.0.1"),
        ("JupyterHub.port", ports["public"]),
        ("JupyterHub.hub_ip", "127.0.0.1"),
        ("JupyterHub.hub_port", ports["hub"]),
        ("JupyterHub.db_url", f"sqlite:///{directory / 'jupyterhub.sqlite'}"),
        ("JupyterHub.cookie_secret_file", str(directory / "jupyterhub_cookie_secret")),
        ("JupyterHub.cleanup_servers", True),
        ("ConfigurableHTTPProxy.command", [str(PROXY)]),
        ("ConfigurableHTTPProxy.api_url", f"http://127.0.0.1:{ports['proxy_api']}"),
        ("ConfigurableHTTPProxy.auth_token", secrets.token_hex(16)),
        ("ConfigurableHTTPProxy.pid_file", str(directory / "proxy.pid")),
        ("JupyterHub.authenticator_class", "tests.hub.authenticator.GlobusShapedAuthenticator"),
        ("GlobusShapedAuthenticator.state_dir", str(directory)),
        ("Authenticator.allow_all", True),
        ("Authenticator.enable_auth_state", True),
        # the hub asks refresh_user at most once a second per user, on that user's requests (the server's too)
        ("Authenticator.auth_refresh_age", 1),
        ("JupyterHub.spawner_class", "simple"),
        ("SimpleLocalProcessSpawner.home_dir_template", str(directory / "home" / "{username}")),
        ("Spawner.cmd", [str(Path(sys.executable).parent / "jupyterhub-singleuser")]),
        ("Spawner.args", ["--allow-root"] if os.geteuid() == 0 else []),  # a CI container runs as root
        ("Spawner.environment", {"FIRST_CONFIG": str(first_config),
                                 "PYTHONPATH": str(Path(first_jupyter.__file__).resolve().parents[1]),
                                 **_jupyter_path()}),
        ("Spawner.server_token_scopes", SERVER_TOKEN_SCOPES),
        ("Spawner.http_timeout", int(ENGINE_GUARD_S)),
        ("Spawner.start_timeout", int(ENGINE_GUARD_S)),
        ("JupyterHub.services", [{"name": ADMIN_SERVICE, "api_token": admin_token}]),
        ("JupyterHub.load_roles", [
            {"name": "user", "scopes": ["self", "admin:auth_state!user"]},
            {"name": "test-admin", "services": [ADMIN_SERVICE],
             "scopes": ["admin:users", "admin:servers", "admin:auth_state", "tokens"]},
        ]),
    ]
    return "".join(f"c.{name} = {value!r}\n" for name, value in settings)


@dataclass
class RunningHub:
    """A hub started by ``running_hub``: its public URL (the proxy), its admin service's token, its files."""

    url: str
    admin_token: str
    directory: Path
    process: subprocess.Popen[bytes]
    tokens: dict[str, str] = field(default_factory=dict)

    def admin(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The hub's REST API (``/hub/api/...``) as the admin service."""
        headers = {"Authorization": f"token {self.admin_token}"}
        return httpx.request(method, f"{self.url}/hub/api/{path}", headers=headers, timeout=60, **kwargs)

    def events(self) -> list[str]:
        """What the authenticator did: ``login NAME``, ``renewed NAME SERIAL`` lines."""
        path = self.directory / "events.log"
        return path.read_text().splitlines() if path.exists() else []

    def hold_renewals(self, name: str, held: bool) -> None:
        """Put Globus Auth out of the hub's reach for ``name`` (expired tokens are kept), or back."""
        hold = self.directory / f"{name}.hold"
        if held:
            hold.touch()
        else:
            hold.unlink(missing_ok=True)

    @contextlib.contextmanager
    def browser(self, name: str) -> Iterator[httpx.Client]:
        """A client with ``name`` logged in through the hub's login form (so the authenticator gives the auth state),
        keeping its cookies as a browser does."""
        with httpx.Client(base_url=self.url, timeout=60) as browser:
            form = browser.get("/hub/login")
            xsrf = re.search(r'name="_xsrf" value="([^"]+)"', form.text)
            assert xsrf, form.text
            answer = browser.post("/hub/login", data={"username": name, "password": "pw", "_xsrf": xsrf[1]})
            assert answer.status_code == 302, answer.text
            yield browser

    def log_in(self, name: str) -> str:
        """Log ``name`` in through the hub's login form, and return an API token of theirs, made by the admin
        service."""
        with self.browser(name):
            pass
        made = self.admin("POST", f"users/{name}/tokens", json={"note": "test"})
        assert made.status_code == 201, made.text
        self.tokens[name] = made.json()["token"]
        return self.tokens[name]

    def user(self, name: str) -> dict[str, Any]:
        answer = self.admin("GET", f"users/{name}")
        answer.raise_for_status()
        model: dict[str, Any] = answer.json()
        return model

    def start_server(self, name: str) -> None:
        """Spawn ``name``'s server and return once the hub calls it ready (it answered the hub through the proxy)."""
        started = self.admin("POST", f"users/{name}/server")
        assert started.status_code in (201, 202), started.text
        eventually(lambda: self._ready(name), f"{name}'s server ready (log: {self.directory / 'hub.log'})",
                   within=ENGINE_GUARD_S)

    def _ready(self, name: str) -> bool:
        assert self.process.poll() is None, f"the hub exited; see {self.directory / 'hub.log'}"
        server = self.user(name)["servers"].get("")
        return bool(server and server["ready"])

    def home(self, name: str) -> Path:
        return self.directory / "home" / name


def _answers(url: str, process: subprocess.Popen[bytes], log: Path) -> bool:
    assert process.poll() is None, f"the hub exited: {log.read_text()[-4000:]}"
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/hub/api/", timeout=10).status_code == 200
    return False


@contextlib.contextmanager
def running_hub(directory: Path, first_config: Path) -> Iterator[RunningHub]:
    """Start a JupyterHub in ``directory`` whose users' servers use ``first_config``; stop it and everything it
    started (the proxy, servers, their kernels) at the end, each checked gone by PID."""
    assert PROXY.exists(), f"{PROXY} is missing: `bash scripts/test.sh` installs it (cd tests/hub && jlpm install)"
    ports = {name: free_port() for name in ("public", "hub", "proxy_api")}
    admin_token = secrets.token_hex(16)
    config = directory / "jupyterhub_config.py"
    config.write_text(hub_config(directory=directory, ports=ports, admin_token=admin_token, first_config=first_config))
    log = directory / "hub.log"
    env = {**_environ(), "JUPYTERHUB_CRYPT_KEY": secrets.token_hex(32),
           "PYTHONPATH": str(HERE.parents[1])}  # tests.hub.authenticator, from this checkout
    with log.open("wb") as out:
        process = subprocess.Popen([str(Path(sys.executable).parent / "jupyterhub"), "-f", str(config)], cwd=directory,
                                   env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    hub = RunningHub(f"http://127.0.0.1:{ports['public']}", admin_token, directory, process)
    started: dict[int, psutil.Process] = {}
    try:
        eventually(lambda: _answers(hub.url, process, log), "the hub answers through its proxy", within=ENGINE_GUARD_S)
        yield hub
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            started = {p.pid: p for p in psutil.Process(process.pid).children(recursive=True)}
        process.send_signal(signal.SIGTERM)  # the hub stops its servers (cleanup_servers) and its proxy
        try:
            process.wait(ENGINE_GUARD_S)
        finally:
            _, alive = psutil.wait_procs(list(started.values()), timeout=ENGINE_GUARD_S)
            for left in alive:
                left.kill()
            if process.poll() is None:
                process.kill()
                process.wait()
        assert not alive, f"the hub left these running: {[p.pid for p in alive]}"


def _jupyter_path() -> dict[str, str]:
    """``JUPYTER_PATH`` when this process has one, so that the servers load the sidebar it names (a checkout's own
    build, ahead of the environment's), as they import this checkout's first_jupyter: a spawner passes on only
    the variables it is told to."""
    return {"JUPYTER_PATH": os.environ["JUPYTER_PATH"]} if os.environ.get("JUPYTER_PATH") else {}


def _environ() -> dict[str, str]:
    """This process's environment without what a test's own server or kernel exported (the hub's children must
    find their gateway themselves) and without variables JupyterHub reads as its own."""
    drop = ("FIRST_", "JUPYTERHUB_", "JPY_", "GLOBUS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}
