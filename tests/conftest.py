"""Shared fixtures: a real Jupyter server with the extension, a fake upstream, a tiny local model.

Every part is real except what cannot run here: engines are `transformers serve` on a tiny random-weight
model built on the fly, and the fast fake upstream stands in for remote OpenAI-compatible servers.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import uvloop
import yaml
from IPython.core.interactiveshell import InteractiveShell
from yarl import URL

from bench.fake_upstream import FakeUpstream, serving_in_thread
from bench.overhead import free_port
from bench.site_network import Tinyproxy, TlsCerts, make_tls_certs
from first_jupyter.remote.tiny_model import build_tiny_model
from tests.fake_amqp import FakeAmqpBroker
from tests.waiting import ENGINE_GUARD_S, eventually

if TYPE_CHECKING:
    import responses

    from first_jupyter.api.route_table import Route

pytest_plugins = ("pytest_jupyter.jupyter_server", "tests.state_servers")


LOOPBACK = ("127.0.0.1", "::1", "localhost")


def _refuse_remote(address: Any) -> None:
    if address and address[0] not in LOOPBACK:
        raise AssertionError(f"test tried to reach {address}; only loopback is allowed")


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests talk to 127.0.0.1 only: a connection anywhere else fails the test at once.

    Two ways out are guarded: Python's sockets (asyncio, requests, the SDKs) and uvloop's connections, which
    libuv opens without Python's socket module (the gateway's own loop runs on uvloop).
    """
    real_connect = socket.socket.connect

    def guarded(self: socket.socket, address: Any) -> Any:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            _refuse_remote(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)
    real_create_connection = uvloop.Loop.create_connection

    async def guarded_create_connection(self: uvloop.Loop, protocol_factory: Any, host: Any = None,
                                        port: Any = None, **kwargs: Any) -> Any:
        _refuse_remote((host, port) if host is not None else None)
        return await real_create_connection(self, protocol_factory, host, port, **kwargs)

    monkeypatch.setattr(uvloop.Loop, "create_connection", guarded_create_connection)


@pytest.fixture(autouse=True)
def _hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hugging Face hub answers nothing: ``HF_ENDPOINT`` is a loopback port nobody listens on, so the embedded
    default serves the tiny model (``embedded_model``) unless a test starts a stand-in hub (``tests/fake_hub.py``).
    (Not ``HF_HUB_OFFLINE``: huggingface_hub reads that once, at its import, for the whole test session.)"""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-chat")


@pytest.fixture
def broker() -> Iterator[FakeAmqpBroker]:
    """An AMQP broker stub on loopback, where the Globus Compute SDK takes task results from."""
    with FakeAmqpBroker() as running:
        yield running
    assert not running.running


@pytest.fixture
def rsps(broker: FakeAmqpBroker) -> Iterator[responses.RequestsMock]:
    """The Globus Compute service over ``responses``; results by AMQP from the loopback broker. At the end no SDK
    thread may be left: the gateway's close must have stopped the result thread the SDK itself leaves running.
    (The SDKs are imported here, not with this module: most tests never need them.)"""
    import responses

    from tests.fake_compute_service import FakeComputeService

    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        FakeComputeService.amqp_url(mock, broker)
        yield mock
        eventually(lambda: not [t for t in threading.enumerate() if type(t).__name__ == "_ResultWatcher"])


@pytest.fixture
def fake_upstream() -> Iterator[FakeUpstream]:
    with serving_in_thread(models=["fake-model", "fake-embed"], chunks=8) as upstream:
        yield upstream


def gate(upstream: FakeUpstream, **command: Any) -> dict[str, Any]:
    """Work the fake upstream's gate (``hold=True``, ``release=N``, ``open=True``) from a test's thread, over HTTP:
    the upstream serves on a thread of its own, and the gate is moved on its loop. So that a test sets the pace of
    the work it watches (a batch part done, a request held in flight) instead of hoping the machine is slow enough
    to catch it under way."""
    answer = httpx.post(f"{upstream.url}/gate", json=command, timeout=30)
    answer.raise_for_status()
    state: dict[str, Any] = answer.json()
    return state


def held(upstream: FakeUpstream) -> int:
    """How many requests wait at the upstream's gate, read on its own loop (``/stats``)."""
    return int(httpx.get(f"{upstream.url}/stats", timeout=30).json()["held"])


def send_json(handler: BaseHTTPRequestHandler, data: Any, status: int = 200) -> None:
    """Answer a stand-in's request with ``data`` as JSON: what every stand-in of an HTTP service does."""
    body = json.dumps(data).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


@contextlib.contextmanager
def serving_http(handler: type[BaseHTTPRequestHandler], *, context: ssl.SSLContext | None = None,
                 server_class: type[ThreadingHTTPServer] = ThreadingHTTPServer) -> Iterator[str]:
    """A stdlib HTTP server on loopback answering with ``handler``, for the duration of the block; its base URL.
    With a server ``context`` it serves https."""
    server = server_class(("127.0.0.1", 0), handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{'https' if context is not None else 'http'}://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def in_process(fake_upstream: FakeUpstream, write_config: Callable[[dict[str, Any]], Path], tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeUpstream]:
    """``first_jupyter.client`` as in a kernel no Jupyter server started: its in-process gateway, serving the fake.

    Each test starts its own gateway (``without_a_server``) and drops it at the end.
    """
    from first_jupyter import client

    monkeypatch.setenv("FIRST_CONFIG", str(write_config(fake_cluster_config(fake_upstream))))  # before the drop:
    without_a_server(monkeypatch, tmp_path / "data")  # no moment without it once the connection is gone
    yield fake_upstream
    client.disconnect()


@pytest.fixture
def shell(in_process: FakeUpstream) -> Iterator[InteractiveShell]:
    """A real IPython shell with ``%load_ext first_jupyter``, its client on the in-process gateway."""
    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "first_jupyter")
    yield shell
    InteractiveShell.clear_instance()


def without_a_server(monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> None:
    """The client as in a kernel no Jupyter server started, with its data in ``data_dir``: the variables a server
    exports to its kernels removed (a server test in this process may have set them), the connection dropped so
    the next call starts its own in-process gateway (with ``$FIRST_CONFIG``, set by the caller)."""
    from first_jupyter import client

    monkeypatch.delenv(client.GATEWAY_URL_ENV, raising=False)
    monkeypatch.delenv(client.API_KEY_ENV, raising=False)
    monkeypatch.setenv("FIRST_DATA_DIR", str(data_dir))
    client.disconnect()


def closed_port() -> int:
    """A loopback port nothing listens on: connections to it are refused at once."""
    return free_port()


def wait_listening(port: int, server: subprocess.Popen[str], timeout: float = 180) -> None:
    """Until the server listens on ``port``; ``timeout`` only guards against a server that never does (a Jupyter
    server starting on a loaded machine can take tens of seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, server.stderr.read() if server.stderr else "the server exited"
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def jupyter_server_process(port: int, root: Path, env: dict[str, str], log: Path | None = None,
                           ) -> subprocess.Popen[str]:
    """A Jupyter server with the extension, in a process group of its own (so a test can signal all of it), on
    ``port``; ``env`` on top of this process's environment (``FIRST_CONFIG``, ``FIRST_DATA_DIR``,
    ``JUPYTER_TOKEN``). Returns once it listens. Its log goes to ``log`` when given, else to a pipe read only if it
    fails to start: a test that makes hundreds of requests must give a file, or the pipe fills (64 KB of log lines)
    and the server stops in the middle of writing one."""
    with contextlib.ExitStack() as files:
        stderr = files.enter_context(log.open("wb")) if log is not None else subprocess.PIPE
        server = subprocess.Popen([sys.executable, "-m", "jupyter", "server", "--no-browser", f"--port={port}",
                                   "--ServerApp.port_retries=0", f"--ServerApp.root_dir={root}",
                                   "--ServerApp.jpserver_extensions=first_jupyter=True", "--allow-root"],
                                  env={**os.environ, **env}, start_new_session=True, stdout=subprocess.DEVNULL,
                                  stderr=stderr, text=True)
    try:
        wait_listening(port, server)
    except BaseException:
        server.kill()
        server.wait()
        raise
    return server


def runtime_file(runtime_dir: Path) -> dict[str, Any]:
    """What the gateway's runtime file in ``runtime_dir`` says, once a server has written it: the URL and key its
    kernels are given, and the lasting key's file."""
    found: list[dict[str, Any]] = []

    def written() -> bool:
        for path in runtime_dir.glob("first-gateway-*.json"):
            with contextlib.suppress(ValueError):  # (a file still being written)
                found.append(json.loads(path.read_text()))
        return bool(found)

    eventually(written, "the gateway's runtime file", within=ENGINE_GUARD_S)
    return found[0]


@contextlib.contextmanager
def server_process(root: Path, env: dict[str, str]) -> Iterator[dict[str, Any]]:
    """``jupyter_server_process`` on a free port with ``env`` (its ``JUPYTER_RUNTIME_DIR`` holding no runtime file
    of an earlier server), until the end of the block: what its runtime file says."""
    runtime_dir = Path(env["JUPYTER_RUNTIME_DIR"])
    for earlier in runtime_dir.glob("first-gateway-*.json"):
        earlier.unlink()
    server = jupyter_server_process(free_port(), root, env)
    try:
        yield runtime_file(runtime_dir)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=ENGINE_GUARD_S)


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    def write(data: dict[str, Any]) -> Path:
        path = tmp_path / "first.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    return write


def fake_cluster_config(upstream: FakeUpstream, **defaults: Any) -> dict[str, Any]:
    return {
        "clusters": {
            "remote": {
                "backend": "http",
                "endpoints": [{
                    "name": "fake",
                    "base_url": f"{upstream.url}/v1",
                    "models": [
                        {"id": "fake-model", "capabilities": ["chat", "completions", "responses"]},
                        {"id": "fake-embed", "capabilities": ["embeddings"]},
                    ],
                }],
            }
        },
        "defaults": {"model": "fake-model", **defaults},
    }


def local_cluster_config(model_dir: Path, **endpoint: Any) -> dict[str, Any]:
    return {
        "clusters": {
            "local": {
                "backend": "local",
                "endpoints": [{"name": "engine", "engine": "transformers", "device": "cpu",
                               "models": [{"id": "tiny-chat", "path": str(model_dir)}], **endpoint}],
            }
        },
        "defaults": {"model": "tiny-chat"},
    }


def server_config(config_file: Path, data_dir: Path, **first: Any) -> dict[str, Any]:
    return {
        "ServerApp": {
            "jpserver_extensions": {"first_jupyter": True},
            "allow_unauthenticated_access": False,
            "terminals_enabled": False,
        },
        "FirstExtension": {"config_file": str(config_file), "data_dir": str(data_dir), **first},
    }


def scoped_headers(serverapp: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {serverapp.web_app.settings['first_api_key']}"}


@pytest.fixture(scope="session")
def tiny_engine(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real `transformers serve` engine on the tiny model, shared by the tests that only need to talk to it."""
    from first_jupyter.remote.launcher import EngineSpec, start_engine

    log = tmp_path_factory.mktemp("engine") / "engine.log"
    proc = start_engine(EngineSpec(model=str(tiny_model), engine="transformers", device="cpu", log_path=log))
    try:
        proc.wait_healthy(timeout=180)
        yield proc
    finally:
        proc.stop()


def engine_cluster_config(engine: Any) -> dict[str, Any]:
    """An http cluster whose endpoint is the shared real engine."""
    return {
        "clusters": {
            "hpc": {
                "backend": "http",
                "endpoints": [{"name": "node01", "base_url": engine.base_url,
                               "models": [{"id": "tiny-chat", "upstream_name": engine.model_name}]}],
            }
        },
        "defaults": {"model": "tiny-chat"},
    }


def extension(serverapp: Any) -> Any:
    return serverapp.web_app.settings["first_jupyter"]


@pytest.fixture
def first_ext(jp_serverapp: Any, http_server: Any) -> Any:
    """The running extension, with the server listening on its real port (for clients other than jp_fetch)."""
    return extension(jp_serverapp)


@dataclass(frozen=True)
class Door:
    """One way into the gateway: a base URL ending in ``/first/v1`` and the credentials that open it."""

    name: str
    url: str
    headers: dict[str, str]
    api_key: str
    """What an ``openai`` client passes as ``api_key`` through this door (sent as a bearer token)."""

    def route(self, path: str) -> URL:
        """A route's URL, kept percent-encoded (the test server's base_url has an escaped '@')."""
        return URL(f"{self.url}/{path}", encoded=True)

    def at(self, path: str) -> URL:
        """``path`` (from /first on) at this door, kept percent-encoded like ``route``."""
        return URL(self.url.removesuffix("/first/v1") + path, encoded=True)


def example_path(route: Route) -> str:
    """The route's path with each parameter filled in."""
    return re.sub(r"\([^)]*\)", "x", route.pattern)


def open_door(name: str, ext: Any, jp_auth_header: dict[str, str]) -> Door:
    """``jupyter-token``: Jupyter's handlers with a Jupyter token; ``jupyter-key``: Jupyter's handlers with the
    scoped key; ``api``: the gateway's own server, which kernels are pointed at, with the scoped key."""
    token = jp_auth_header["Authorization"].split(" ", 1)[1]
    bearer = {"Authorization": f"Bearer {ext.api_key}"}
    doors = {"jupyter-token": (ext.jupyter_gateway_url(), dict(jp_auth_header), token),
             "jupyter-key": (ext.jupyter_gateway_url(), bearer, ext.api_key),
             "api": (ext.gateway_url(), bearer, ext.api_key)}
    url, headers, api_key = doors[name]
    return Door(name, url, headers, api_key)


@pytest.fixture(params=["jupyter-token", "jupyter-key", "api"])
def door(request: pytest.FixtureRequest, first_ext: Any, jp_auth_header: dict[str, str]) -> Door:
    """Every door in turn: behaviour all doors share is tested through each."""
    return open_door(request.param, first_ext, jp_auth_header)


@pytest.fixture(params=["jupyter-key", "api"])
def key_door(request: pytest.FixtureRequest, first_ext: Any, jp_auth_header: dict[str, str]) -> Door:
    """The doors a program holding the scoped key uses: the Jupyter server's URL and the gateway's own."""
    return open_door(request.param, first_ext, jp_auth_header)


# -- the site network: a forward proxy and a test CA (bench/site_network.py) ----------------------------------------


@pytest.fixture(autouse=True)
def _no_proxy_restored() -> Iterator[None]:
    """``NO_PROXY``/``no_proxy`` as they were before each test. A Jupyter server started in this process adds the
    loopback names to them for its kernels (``server_ext.app.loopback_exempt``); left there, they would exempt
    127.0.0.1 from the proxy a later test sets, and that test would pass or fail by the order the tests ran in."""
    saved = {name: os.environ.get(name) for name in ("NO_PROXY", "no_proxy")}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def tinyproxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Tinyproxy]]:
    """Start Debian's tinyproxy on loopback: ``tinyproxy(basic_auth=(user, password), refusing=False)`` returns it
    running (``.url``, ``.requests()``, ``.log()``); every one started is stopped, by its PID, at teardown. A
    machine without tinyproxy fails the test (``scripts/system-packages.sh`` installs it)."""
    started: list[Tinyproxy] = []

    def start(*, basic_auth: tuple[str, str] | None = None, refusing: bool = False) -> Tinyproxy:
        proxy = Tinyproxy(tmp_path_factory.mktemp("tinyproxy"), basic_auth=basic_auth, refusing=refusing)
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> TlsCerts:
    """A test CA's PEM files: a server certificate for 127.0.0.1/localhost/::1, a client certificate, the CA, and an
    unrelated CA (``TlsCerts``). One set for the whole run, in files, so that servers in other processes can be
    handed the same paths the clients here trust."""
    return make_tls_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_upstream(tls_certs: TlsCerts) -> Iterator[Callable[..., FakeUpstream]]:
    """Start fake upstreams that serve https with ``tls_certs``' server certificate: ``tls_upstream(client_cert=True,
    **options)``; ``client_cert`` requires a client certificate from the same CA (``tls_certs.client_*``), the other
    options are ``FakeUpstream``'s. Each runs on a thread of its own and stops at teardown."""
    with contextlib.ExitStack() as stack:

        def start(*, client_cert: bool = False, **options: Any) -> FakeUpstream:
            options.setdefault("models", ["fake-model", "fake-embed"])
            options.setdefault("chunks", 8)
            return stack.enter_context(serving_in_thread(certfile=tls_certs.server_pem,
                                                         client_ca=tls_certs.ca if client_cert else None, **options))

        yield start


@contextlib.contextmanager
def without_cycle_collection() -> Iterator[None]:
    """The cyclic garbage collector off for the block: what is still alive in it was not freed by reference counting,
    so it lives on until a later collection (a reference cycle) rather than by chance of when one ran."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
