"""Replicas of a shared gateway on several hosts, for real: two ``first serve`` processes, each with a state dir of
its own, sharing one redis-server and one PostgreSQL, behind nginx; Globus introspection answered by a loopback
stand-in through the real globus-sdk. The official openai client talks to nginx, as a user's would."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bench.fake_globus_auth import FakeGlobusAuth, fake_globus_auth
from tests.state_servers import Nginx, Postgres, RedisServer, nginx_in_front
from tests.test_resource_server import GATEWAY
from tests.test_shared_gateway import CHAT, gateway_processes, serve_section
from tests.waiting import GUARD_S, eventually

BURST = 5


@dataclass
class Replicas:
    balancer: Nginx
    redis: RedisServer
    postgres: Postgres
    auth: FakeGlobusAuth
    ports: list[int]
    state_dirs: list[Path]

    def client(self, token: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.balancer.url}/first/v1", api_key=token, max_retries=0)

    def chat(self, token: str) -> Any:
        """The raw answer to a chat request through nginx, or the ``openai.APIStatusError`` that refused it."""
        try:
            return self.client(token).chat.completions.with_raw_response.create(**CHAT)
        except openai.APIStatusError as refused:
            return refused

    def replica(self, n: int, path: str, token: str | None = None) -> httpx.Response:
        """``path`` asked of the n-th replica itself, not through nginx."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(f"http://127.0.0.1:{self.ports[n]}{path}", headers=headers, timeout=GUARD_S)

    def requests_seen(self, n: int, token: str) -> int | None:
        """The chat requests in the user's ``/first/api/usage``, as the n-th replica answers it; None while it
        answers 503 (its pool reconnecting after an outage)."""
        answer = self.replica(n, "/first/api/usage", token)
        if answer.status_code == 503:
            return None
        return sum(row["requests"] for row in answer.json()["data"] if row["model"] == CHAT["model"])


@pytest.fixture
def replicas(tmp_path: Path, fake_upstream: Any, redis_server: RedisServer, postgres: Postgres) -> Iterator[Replicas]:
    state_dirs = [tmp_path / f"state-{n}" for n in range(2)]

    def serve(n: int) -> dict[str, Any]:
        return serve_section(state_dirs[n], state={"redis": redis_server.url, "database": postgres.url},
                             quotas={"per_user": {"requests_per_s": 0.001, "burst": BURST}})

    with fake_globus_auth(GATEWAY) as auth, gateway_processes(tmp_path, fake_upstream, auth.url, serve) as urls:
        ports = [int(url.rsplit(":", 1)[1]) for url in urls]
        with nginx_in_front(tmp_path / "nginx", ports) as balancer:
            yield Replicas(balancer, redis_server, postgres, auth, ports, state_dirs)


def served_by(answer: Any) -> str:
    return (answer.response if isinstance(answer, openai.APIStatusError) else answer).headers["x-upstream"]


def test_a_users_quota_is_enforced_once_across_replicas_with_the_same_429(replicas: Replicas):
    answers = [replicas.chat("AT-ada") for _ in range(2 * BURST)]
    allowed, refused = answers[:BURST], answers[BURST:]
    assert [a.http_response.status_code for a in allowed] == [200] * BURST  # the burst, not twice the burst
    assert all(isinstance(a, openai.RateLimitError) for a in refused)
    upstreams = {f"127.0.0.1:{port}" for port in replicas.ports}
    assert {served_by(a) for a in allowed} == upstreams  # both replicas served some and refused some
    assert {served_by(a) for a in refused} == upstreams
    assert [a.headers["x-ratelimit-remaining-requests"] for a in allowed] == [str(n) for n in range(BURST)][::-1]
    for answer in refused:
        assert answer.status_code == 429
        assert answer.response.json()["error"]["code"] == "rate_limit_exceeded"
        assert answer.response.json()["error"]["type"] == "rate_limit_error"
        assert "You are over your limit of 0.001 requests per second" in answer.message
        assert int(answer.response.headers["Retry-After"]) >= 1
        assert answer.response.headers["x-ratelimit-limit-requests"] == str(BURST)
        assert answer.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert replicas.chat("AT-bob").http_response.status_code == 200  # another user's bucket
    assert not any((state / "quotas.sqlite3").exists() for state in replicas.state_dirs)  # the buckets are in Redis


def test_a_token_introspected_by_one_replica_is_not_introspected_by_the_other(replicas: Replicas):
    before = replicas.auth.introspections
    answers = [replicas.chat("AT-carol") for _ in range(4)]
    assert [a.http_response.status_code for a in answers] == [200] * 4
    assert len({served_by(a) for a in answers}) == 2
    assert replicas.auth.introspections == before + 1


def test_redis_going_away_is_a_503_with_retry_after_and_its_return_needs_no_restart(replicas: Replicas):
    assert replicas.chat("AT-ada").http_response.status_code == 200
    port = replicas.redis.port
    replicas.redis.stop()
    for _ in range(2):  # each replica
        down = replicas.chat("AT-ada")
        assert isinstance(down, openai.InternalServerError)
        assert (down.status_code, down.response.json()["error"]["code"]) == (503, "state_unavailable")
        assert down.response.headers["Retry-After"] == "2"
        assert f"Redis at 127.0.0.1:{port}" in down.message
    for n in range(2):
        health = replicas.replica(n, "/healthz")
        assert (health.status_code, health.headers["Retry-After"]) == (503, "2")
        assert health.json()["state"] == {"sqlite": "ok", "redis": "unreachable: ConnectionError",
                                          "postgresql": "ok"}
    assert replicas.client("AT-ada").models.list().data  # what needs no Redis goes on
    replicas.redis.start(port)  # back, empty: nothing was saved
    back = [replicas.chat("AT-ada") for _ in range(2)]
    assert [a.http_response.status_code for a in back] == [200, 200]
    assert len({served_by(a) for a in back}) == 2
    assert [replicas.replica(n, "/healthz").status_code for n in range(2)] == [200, 200]


def test_usage_recorded_by_both_replicas_is_read_through_either(replicas: Replicas):
    answers = [replicas.chat("AT-dora") for _ in range(4)]
    assert [a.http_response.status_code for a in answers] == [200] * 4
    assert len({served_by(a) for a in answers}) == 2
    for n in range(2):  # each replica's records are written within its batch interval
        eventually(lambda n=n: replicas.requests_seen(n, "AT-dora") == 4, f"replica {n} counts all 4")
    assert not any((state / "usage.sqlite3").exists() for state in replicas.state_dirs)  # in PostgreSQL


def test_healthz_names_each_backend_and_a_lost_database_is_a_503_while_requests_go_on(replicas: Replicas):
    for n in range(2):
        health = replicas.replica(n, "/healthz")
        assert health.status_code == 200
        assert health.json()["state"] == {"sqlite": "ok", "redis": "ok", "postgresql": "ok"}
    assert replicas.chat("AT-erin").http_response.status_code == 200
    replicas.postgres.pause()
    try:
        for n in range(2):
            down = replicas.replica(n, "/healthz")
            assert down.status_code == 503
            assert down.headers["Retry-After"] == "2"
            assert down.json()["state"]["postgresql"] == "unreachable: PoolTimeout"
            assert down.json()["state"]["redis"] == "ok"
        during = [replicas.chat("AT-erin") for _ in range(2)]  # requests go on; their usage waits in memory
        assert [a.http_response.status_code for a in during] == [200, 200]
        assert len({served_by(a) for a in during}) == 2
        refused = replicas.replica(0, "/first/api/usage", "AT-erin")
        assert (refused.status_code, refused.json()["error"]["code"]) == (503, "state_unavailable")
        assert refused.headers["Retry-After"] == "2"
    finally:
        replicas.postgres.resume()
    for n in range(2):
        eventually(lambda n=n: replicas.requests_seen(n, "AT-erin") == 3, f"replica {n} counts all 3")
        health = replicas.replica(n, "/healthz").json()
        assert health["state"]["postgresql"] == "ok"
        assert health["usage_records"] == {"buffered": 0, "dropped": 0}
