"""Replicas of a shared gateway on several hosts, for real: two ``first serve`` processes, each with a state dir of
its own, sharing one redis-server, one PostgreSQL and one files dir, behind nginx; Globus introspection answered by
a loopback stand-in through the real globus-sdk. The official openai client talks to nginx, as a user's would, or
to one replica itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psycopg
import pytest

from bench.fake_globus_auth import FakeGlobusAuth, fake_globus_auth
from bench.serve_processes import batch_holder
from bench.state_servers import Nginx, Postgres, RedisServer, nginx_in_front
from tests.conftest import gate, held
from tests.test_resource_server import GATEWAY
from tests.test_shared_gateway import CHAT, gateway_processes, serve_section
from tests.waiting import GUARD_S, eventually

BURST = 5
LEASE_S = 2.0
"""The batch lease in these tests: a killed replica's batch is taken over within seconds."""


@dataclass
class Replicas:
    balancer: Nginx
    redis: RedisServer
    postgres: Postgres
    auth: FakeGlobusAuth
    ports: list[int]
    state_dirs: list[Path]
    procs: list[subprocess.Popen[bytes]]

    def client(self, token: str, n: int | None = None) -> openai.OpenAI:
        """The official client, through nginx, or to the n-th replica itself."""
        url = self.balancer.url if n is None else f"http://127.0.0.1:{self.ports[n]}"
        return openai.OpenAI(base_url=f"{url}/first/v1", api_key=token, max_retries=0)

    def batch_holder(self, batch_id: str) -> int | None:
        """The replica whose run holds the batch's lease now, as the shared database says; None: no run does."""
        return batch_holder(self.postgres.url, self.procs, batch_id)

    def kill(self, n: int) -> None:
        """SIGKILL the n-th replica, as a host dying would: nothing of it runs after, no lease is let go."""
        os.kill(self.procs[n].pid, signal.SIGKILL)
        assert self.procs[n].wait(60) == -signal.SIGKILL

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


@contextlib.contextmanager
def _replicas(tmp_path: Path, fake_upstream: Any, redis_server: RedisServer, postgres: Postgres,
              quotas: dict[str, Any]) -> Iterator[Replicas]:
    state_dirs = [tmp_path / f"state-{n}" for n in range(2)]
    procs: list[subprocess.Popen[bytes]] = []

    def serve(n: int) -> dict[str, Any]:
        return serve_section(state_dirs[n], quotas=quotas, state={
            "redis": redis_server.url, "database": postgres.url, "files_dir": str(tmp_path / "shared-files"),
            "batch_lease_s": LEASE_S})

    with fake_globus_auth(GATEWAY) as auth, \
            gateway_processes(tmp_path, fake_upstream, auth.url, serve, procs=procs) as urls:
        ports = [int(url.rsplit(":", 1)[1]) for url in urls]
        with nginx_in_front(tmp_path / "nginx", ports) as balancer:
            yield Replicas(balancer, redis_server, postgres, auth, ports, state_dirs, procs)


@pytest.fixture
def replicas(tmp_path: Path, fake_upstream: Any, redis_server: RedisServer, postgres: Postgres) -> Iterator[Replicas]:
    with _replicas(tmp_path, fake_upstream, redis_server, postgres,
                   {"per_user": {"requests_per_s": 0.001, "burst": BURST}}) as replicas:
        yield replicas


@pytest.fixture
def unlimited_replicas(tmp_path: Path, fake_upstream: Any, redis_server: RedisServer,
                       postgres: Postgres) -> Iterator[Replicas]:
    """Replicas without quotas: a batch's lines go as fast as the upstream answers."""
    with _replicas(tmp_path, fake_upstream, redis_server, postgres, {}) as replicas:
        yield replicas


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


# -- files and batches ---------------------------------------------------------------------------------------------

def _batch_input(path: Path, count: int) -> Path:
    path.write_bytes(b"".join(json.dumps({
        "custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {**CHAT, "messages": [{"role": "user", "content": f"question {i}"}]}}).encode() + b"\n"
        for i in range(count)))
    return path


def _ids_in(client: openai.OpenAI, batch: Any) -> list[str]:
    """The custom_ids of a finished batch's output and error files, in order, repeats kept."""
    ids = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id is not None:
            ids += [json.loads(line)["custom_id"] for line in client.files.content(file_id).text.splitlines()]
    return ids


def test_a_file_uploaded_through_one_replica_is_read_through_the_other(replicas: Replicas, tmp_path: Path):
    source = _batch_input(tmp_path / "in.jsonl", 3)
    uploaded = replicas.client("AT-fay", 0).files.create(file=source.open("rb"), purpose="batch")
    other = replicas.client("AT-fay", 1)
    assert other.files.retrieve(uploaded.id).bytes == source.stat().st_size
    assert other.files.content(uploaded.id).content == source.read_bytes()
    assert [f.id for f in other.files.list()] == [uploaded.id]
    with pytest.raises(openai.NotFoundError):  # another user's file is not theirs to read, on either replica
        replicas.client("AT-gus", 1).files.retrieve(uploaded.id)
    assert other.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        replicas.client("AT-fay", 0).files.retrieve(uploaded.id)
    assert not any((state / "batches" / "users").exists() for state in replicas.state_dirs)  # in the files dir


def test_a_batch_made_on_one_replica_is_followed_and_cancelled_on_the_other(unlimited_replicas: Replicas,
                                                                             fake_upstream: Any, tmp_path: Path):
    replicas, lines = unlimited_replicas, 150  # more than the 64 the endpoint takes at once: some are never sent
    gate(fake_upstream, hold=True)  # the lines wait at the upstream: the cancel comes mid-run on any machine
    first, other = replicas.client("AT-hal", 0), replicas.client("AT-hal", 1)
    uploaded = first.files.create(file=_batch_input(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch")
    batch = first.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    eventually(lambda: held(fake_upstream) > 0 and other.batches.retrieve(batch.id).status == "in_progress",
               "the batch runs, as the other replica sees")
    runner = replicas.batch_holder(batch.id)
    assert runner is not None
    asked_of = replicas.client("AT-hal", 1 - runner)  # the cancel goes to the replica that does not run it
    assert asked_of.batches.cancel(batch.id).status == "cancelling"
    eventually(lambda: first.batches.retrieve(batch.id).status == "cancelling", "the runner took the cancel")
    gate(fake_upstream, open=True)  # what was in flight is answered; the rest is never sent
    eventually(lambda: other.batches.retrieve(batch.id).status == "cancelled", "the batch ends cancelled")
    done = first.batches.retrieve(batch.id)
    assert done.request_counts.completed + done.request_counts.failed == lines
    assert done.request_counts.failed > 0  # the lines never sent, each with its error line
    assert sorted(_ids_in(other, done)) == sorted(f"q{i}" for i in range(lines))


def test_a_killed_replicas_batch_is_finished_by_the_other_with_every_line_once(unlimited_replicas: Replicas,
                                                                                fake_upstream: Any, tmp_path: Path):
    replicas, lines, before_the_kill = unlimited_replicas, 120, 30
    gate(fake_upstream, hold=True)  # the first 30 are answered, the rest wait: the kill comes mid-run
    gate(fake_upstream, release=before_the_kill)
    through = replicas.client("AT-ivy")
    uploaded = through.files.create(file=_batch_input(tmp_path / "in.jsonl", lines).open("rb"), purpose="batch")
    batch = through.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                   completion_window="24h")
    eventually(lambda: replicas.batch_holder(batch.id) is not None and held(fake_upstream) > 0
               and through.batches.retrieve(batch.id).request_counts.completed >= before_the_kill,
               "the batch runs, some lines answered and the next held")
    runner = replicas.batch_holder(batch.id)
    assert runner is not None
    replicas.kill(runner)
    gate(fake_upstream, open=True)
    survivor = replicas.client("AT-ivy", 1 - runner)
    eventually(lambda: survivor.batches.retrieve(batch.id).status == "completed",
               "the other replica takes the lapsed lease and finishes the batch")
    done = survivor.batches.retrieve(batch.id)
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (lines, lines, 0)
    assert sorted(_ids_in(survivor, done)) == sorted(f"q{i}" for i in range(lines))  # each once: none lost, none twice


def test_a_response_created_through_one_replica_is_reached_through_the_other(replicas: Replicas):
    first, second = (openai.OpenAI(base_url=f"http://127.0.0.1:{port}/first/v1", api_key="AT-fay", max_retries=0)
                     for port in replicas.ports)
    created = first.responses.create(model=CHAT["model"], input="Tell me about the cluster.")

    def written() -> bool:  # replica 0 writes its response ids at once; the test waits for that write
        with psycopg.connect(replicas.postgres.url) as conn:
            return conn.execute("SELECT 1 FROM responses WHERE response_id = %s", (created.id,)).fetchone() is not None

    eventually(written, "the response id is in PostgreSQL")
    assert second.responses.retrieve(created.id).id == created.id  # replica 1 never saw it created
    other_user = openai.OpenAI(base_url=f"http://127.0.0.1:{replicas.ports[1]}/first/v1", api_key="AT-gus",
                               max_retries=0)
    with pytest.raises(openai.NotFoundError):  # each caller reaches only their own, on every replica
        other_user.responses.retrieve(created.id)
    second.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        first.responses.retrieve(created.id)


def _served_in_metrics(replicas: Replicas, n: int) -> float:
    """The chat requests answered 200 that the n-th replica's own ``/metrics`` counts."""
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(replicas.replica(n, "/metrics").text)
    return sum(sample.value for family in families if family.name == "first_requests"
               for sample in family.samples if sample.name == "first_requests_total"
               and sample.labels.get("status") == "200" and sample.labels.get("model") == CHAT["model"])


def test_each_replica_exposes_its_own_metrics_for_prometheus_to_scrape_each(replicas: Replicas):
    answers = [replicas.chat(token) for token in ("AT-ada", "AT-bob", "AT-cy") for _ in range(2)]
    assert [a.http_response.status_code for a in answers] == [200] * 6
    served = [sum(served_by(a) == f"127.0.0.1:{port}" for a in answers) for port in replicas.ports]
    assert all(served)  # nginx sent some to each
    assert [_served_in_metrics(replicas, n) for n in range(2)] == served  # each counts its own, none the other's
