"""The real parts the replica tests stand on: redis-server, PostgreSQL and nginx start on loopback, do their job,
and are gone once stopped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from bench.state_servers import Postgres, RedisServer, nginx_in_front


def test_redis_answers_keeps_nothing_on_disk_and_is_gone_once_stopped(redis_server: RedisServer):
    client = redis.Redis.from_url(redis_server.url)
    try:
        assert client.ping()
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
    finally:
        client.close()
    assert redis_server.process is not None
    pid = redis_server.process.pid
    redis_server.stop()
    assert not psutil.pid_exists(pid)  # stopped and reaped


def test_postgres_runs_unprivileged_and_answers_on_loopback(postgres: Postgres):
    assert postgres.pid is not None
    assert psutil.Process(postgres.pid).username() != "root"
    done = psutil.Popen(["psql", postgres.url, "-Atc", "SELECT current_user, 1 + 1"], stdout=-1, text=True)
    out, _ = done.communicate(timeout=60)
    assert out.strip() == "first|2"
    pid, directory = postgres.pid, postgres.directory
    postgres.stop()
    assert not psutil.pid_exists(pid)
    assert not directory.exists()


class _Named(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.server_name.encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        """Quiet."""


@pytest.fixture
def two_upstreams() -> Iterator[list[ThreadingHTTPServer]]:
    servers = []
    for name in ("one", "two"):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Named)
        server.server_name = name
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield servers
    for server in servers:
        server.shutdown()
        server.server_close()


def test_nginx_balances_over_both_upstreams_and_names_each(tmp_path: Path, two_upstreams):
    ports = [server.server_address[1] for server in two_upstreams]
    with nginx_in_front(tmp_path / "nginx", ports) as nginx:
        answers = [httpx.get(nginx.url + "/", timeout=30) for _ in range(4)]
        assert sorted(a.text for a in answers) == ["one", "one", "two", "two"]
        assert {a.headers["x-upstream"] for a in answers} == {f"127.0.0.1:{port}" for port in ports}
        assert nginx.process is not None
        pid = nginx.process.pid
    assert not psutil.pid_exists(pid)  # stopped and reaped
