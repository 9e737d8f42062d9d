"""The deployment example (``deploy/``) kept honest: its config loads with the real loader, its nginx site passes
``nginx -t`` and balances, streams and fails over for real on loopback, its systemd unit passes
``systemd-analyze verify``, and its compose file names the same files, hosts, ports and variables as the rest.

Docker is not run here (no daemon, no compose plugin on the test machines): compose.yaml is read as YAML and
checked against the other files, which is what a drift between them would break.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml

from bench.site_network import free_loopback_port
from bench.state_servers import DEPLOY, NGINX_SITE, START_GUARD_S, Nginx, binary, nginx_in_front
from first_jupyter.config import REDIS_PASSWORD_ENV, FirstConfig, load_config
from first_jupyter.paths import DATA_DIR_ENV
from tests.conftest import send_json, serving_http
from tests.waiting import GUARD_S

EXAMPLE = DEPLOY / "first.yaml"
UNIT = DEPLOY / "systemd" / "first-serve@.service"
UNIT_FIRST = "/opt/first/venv/bin/first"
"""Where the unit expects the gateway's command; the test points it at this venv's, which systemd checks exists."""
CONFIG_IN_CONTAINER = "/etc/first/first.yaml"
GATEWAYS = ("first-serve-1", "first-serve-2")
LIBPQ_PASSWORD_ENV = "PGPASSWORD"
STREAM = ("one", "two", "three")
SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def example_config(tmp_path: Path) -> FirstConfig:
    """deploy/first.yaml through the real loader."""
    return load_config(EXAMPLE, tmp_path / "data")


def files_dir(tmp_path: Path) -> str:
    """The example's serve.state.files_dir, as the loader reads it."""
    config = example_config(tmp_path)
    assert config.serve is not None
    assert config.serve.state.files_dir is not None
    return config.serve.state.files_dir


def directive(text: str, name: str) -> str:
    """The value of the one ``name`` directive in an nginx file (a failure if there is none, or several)."""
    values = re.findall(rf"^\s*{name}\s+([^;]+);", text, re.MULTILINE)
    assert len(values) == 1, f"{name}: {values}"
    return str(values[0])


def env_names(text: str) -> set[str]:
    """The variables an env file sets (commented ones are not)."""
    return {line.split("=", 1)[0] for line in text.splitlines() if re.match(r"^[A-Z_]+=", line)}


def secret_names(config: FirstConfig) -> set[str]:
    assert config.serve is not None
    return {config.serve.auth.client_secret_env, REDIS_PASSWORD_ENV, LIBPQ_PASSWORD_ENV}


def test_the_example_config_loads_with_the_real_loader_and_names_no_secret(tmp_path: Path):
    config = example_config(tmp_path)
    assert config.serve is not None
    state = config.serve.state
    assert (urlsplit(state.redis).hostname, urlsplit(state.database).hostname) == ("first-redis", "first-db")
    assert config.serve.state_dir is None  # $FIRST_DATA_DIR, set per replica by the unit and by compose
    assert env_names((DEPLOY / "first.env.example").read_text()) == secret_names(config)


@dataclass
class Replica:
    """A stand-in for one ``first serve`` behind nginx: it names itself, notes the connections its requests came
    on, and holds a stream open until the test has seen its first event."""

    name: str
    connections: set[tuple[str, int]] = field(default_factory=set)
    requests: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)
    seen: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))

    def handler(self) -> type[BaseHTTPRequestHandler]:
        replica = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keeps connections open, as tornado does

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the test reads what it needs from the replica."""

            def do_GET(self) -> None:
                replica.connections.add(self.client_address)
                replica.requests += 1
                replica.headers.append(dict(self.headers))
                if self.path == "/stream":
                    self.stream()
                else:
                    send_json(self, {"replica": replica.name})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.do_GET()

            def stream(self) -> None:
                """Server-sent events, without X-Accel-Buffering (whether they pass at once is up to nginx), each
                sent once the client has the one before."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("X-Replica", replica.name)
                self.end_headers()
                for event in STREAM:
                    self.chunk(f"data: {event}\n\n".encode())
                    if not replica.seen.acquire(timeout=GUARD_S):
                        self.chunk(f"data: {event} was held back\n\n".encode())
                        break
                self.chunk(b"")

            def chunk(self, data: bytes) -> None:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

        return Handler


@dataclass
class Balanced:
    nginx: Nginx
    replicas: list[Replica]
    stops: list[contextlib.ExitStack]

    def get(self, path: str = "/v1/models") -> httpx.Response:
        return httpx.get(f"{self.nginx.url}{path}", timeout=GUARD_S)


@pytest.fixture
def balanced(tmp_path: Path) -> Iterator[Balanced]:
    replicas = [Replica(name) for name in GATEWAYS]
    with contextlib.ExitStack() as outer:
        stops = [outer.enter_context(contextlib.ExitStack()) for _ in replicas]
        urls = [stop.enter_context(serving_http(r.handler())) for stop, r in zip(stops, replicas, strict=True)]
        for replica in replicas:
            outer.callback(replica.seen.release, len(STREAM))  # a stream still held ends at teardown
        nginx = outer.enter_context(nginx_in_front(tmp_path / "nginx", [int(u.rsplit(":", 1)[1]) for u in urls]))
        yield Balanced(nginx, replicas, stops)


def test_the_nginx_site_passes_nginx_t_without_a_warning(tmp_path: Path):
    nginx = Nginx(tmp_path, [free_loopback_port(), free_loopback_port()])
    nginx.port = free_loopback_port()
    checked = nginx.check()
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr
    assert not re.search(r"\[(warn|emerg|alert|crit)\]", checked.stderr), checked.stderr


def test_nginx_spreads_requests_over_both_replicas_on_kept_alive_connections(balanced: Balanced):
    answers = [balanced.get() for _ in range(8)]
    assert [a.status_code for a in answers] == [200] * 8
    assert {a.json()["replica"] for a in answers} == set(GATEWAYS)
    for replica in balanced.replicas:
        assert len(replica.connections) < replica.requests  # HTTP/1.1 keepalive to the upstream
        seen = replica.headers[-1]
        assert (seen["X-Real-IP"], seen["X-Forwarded-For"], seen["X-Forwarded-Proto"]) == ("127.0.0.1",) * 2 + (
            "http",)
        assert "Connection" not in seen  # what the client sent is not passed on: the upstream connection stays open


def test_a_stream_reaches_the_client_event_by_event(balanced: Balanced):
    events = []
    with httpx.stream("GET", f"{balanced.nginx.url}/stream", timeout=2 * GUARD_S) as answer:
        assert answer.headers["content-type"] == "text/event-stream"
        replica = next(r for r in balanced.replicas if r.name == answer.headers["x-replica"])
        for line in answer.iter_lines():
            if line:
                events.append(line)
                replica.seen.release()  # it came while the replica held the rest back
    assert events == [f"data: {event}" for event in STREAM]


def test_a_replica_that_is_down_is_passed_over_for_reads_and_writes(balanced: Balanced):
    balanced.stops[0].close()  # first-serve-1 goes away: its port refuses connections
    answers = [balanced.get() for _ in range(4)]
    answers += [httpx.post(f"{balanced.nginx.url}/v1/chat/completions", json={"n": n}, timeout=GUARD_S)
                for n in range(4)]
    assert [a.status_code for a in answers] == [200] * 8
    assert {a.json()["replica"] for a in answers} == {"first-serve-2"}


def test_nginx_takes_the_gateways_largest_body_and_outwaits_a_cold_start(tmp_path: Path):
    config = example_config(tmp_path)
    site = NGINX_SITE.read_text()
    size = re.fullmatch(r"(\d+)([kmg]?)", directive(site, "client_max_body_size").lower())
    assert size is not None
    assert int(size[1]) * SIZE_UNITS[size[2]] == config.defaults.batch.max_file_bytes
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        assert int(directive(site, timeout).removesuffix("s")) > config.defaults.cold_start.max_wait
    assert directive(site, "proxy_buffering") == "off"


def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path):
    unit = UNIT.read_text()
    assert re.findall(r"^ExecStart=(.*)$", unit, re.MULTILINE) == [f"{UNIT_FIRST} serve --config /etc/first/%i.yaml"]
    assert f"Environment={DATA_DIR_ENV}=%S/first/%i\n" in unit
    assert "EnvironmentFile=/etc/first/%i.env\n" in unit
    assert f"ReadWritePaths=-{files_dir(tmp_path)}\n" in unit  # the example's files_dir, on the shared mount
    here = tmp_path / "units"
    here.mkdir()
    (here / UNIT.name).write_text(unit.replace(UNIT_FIRST, str(Path(sys.executable).with_name("first"))))
    (here / "first-serve@first.service").symlink_to(UNIT.name)
    verified = subprocess.run([binary("systemd-analyze", "systemd"), "verify", "--man=no",
                               "./first-serve@first.service"], capture_output=True, text=True, cwd=here,
                              check=False, timeout=START_GUARD_S)
    assert verified.returncode == 0, verified.stderr
    assert not [line for line in verified.stderr.splitlines() if "first-serve" in line], verified.stderr


def test_compose_runs_the_same_files_hosts_ports_and_variables(tmp_path: Path):
    config = example_config(tmp_path)
    assert config.serve is not None
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {*GATEWAYS, "nginx", "first-redis", "first-db"}
    state = config.serve.state
    assert {urlsplit(state.redis).hostname, urlsplit(state.database).hostname} <= set(services)
    upstreams = re.findall(r"^\s*server ([\w-]+):(\d+)", NGINX_SITE.read_text(), re.MULTILINE)
    assert upstreams == [(name, str(config.serve.listen.port)) for name in GATEWAYS]
    assert f"./{NGINX_SITE.parent.name}/{NGINX_SITE.name}:" in services["nginx"]["volumes"][0]
    assert compose["configs"]["first"]["file"] == f"./{EXAMPLE.name}"
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f'"--config", "{CONFIG_IN_CONTAINER}"' in dockerfile
    assert f"ENV {DATA_DIR_ENV}=/var/lib/first\n" in dockerfile
    mounts = []
    for name in GATEWAYS:
        gateway = services[name]
        assert gateway["configs"] == [{"source": "first", "target": CONFIG_IN_CONTAINER}]
        assert set(gateway["environment"]) == secret_names(config)
        volumes = dict(reversed(v.split(":")) for v in gateway["volumes"])
        assert volumes[files_dir(tmp_path)] == "files"  # one volume for files_dir, shared by both
        mounts.append(volumes["/var/lib/first"])
    assert len(set(mounts)) == 2  # a state dir each
    database = urlsplit(state.database)
    db = services["first-db"]["environment"]
    assert (db["POSTGRES_USER"], db["POSTGRES_DB"]) == (database.username, database.path.lstrip("/"))
    assert db["POSTGRES_PASSWORD"].startswith(f"${{{LIBPQ_PASSWORD_ENV}:?")
    assert f"$${REDIS_PASSWORD_ENV}" in " ".join(services["first-redis"]["command"])
