"""Usage records in PostgreSQL (``serve.state.database``), for real: a throwaway PostgreSQL cluster on loopback,
its schema upgraded by two replicas at once, and an outage that records wait out in memory."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from bench.state_servers import Postgres
from first_jupyter.gateway.usage import UsageRecord
from first_jupyter.protocol import OpenAIError
from first_jupyter.serve.pg_state import MIGRATIONS, upgrade
from first_jupyter.serve.pg_usage import PgUsage
from tests.waiting import GUARD_S, eventually_async


def _record(n: int, user: str = "ada@uni.edu") -> UsageRecord:
    return UsageRecord(1000.0 + n, f"req-{n}", "tiny-chat", "remote", "ep", "chat", n % 2 == 0, 500 if n == 1 else 200,
                       n, 2 * n, 10.0 + n, None, None, user)


def _stored(postgres: Postgres) -> list[tuple[str, str]]:
    with psycopg.connect(postgres.url) as conn:
        return [(str(rid), str(user)) for rid, user in conn.execute('SELECT request_id, "user" FROM usage ORDER BY id')]


def test_two_replicas_upgrading_a_fresh_database_together_end_with_one_schema(postgres: Postgres):
    async def both() -> list[int]:
        conns = [await psycopg.AsyncConnection.connect(postgres.url, autocommit=True) for _ in range(2)]
        try:
            return list(await asyncio.gather(*(upgrade(conn) for conn in conns)))
        finally:
            for conn in conns:
                await conn.close()

    assert asyncio.run(both()) == [len(MIGRATIONS)] * 2
    assert asyncio.run(both()) == [len(MIGRATIONS)] * 2  # already there: nothing to do, no error
    with psycopg.connect(postgres.url) as conn:
        versions = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
        assert versions == [(v,) for v in range(1, len(MIGRATIONS) + 1)]  # each step applied once
        assert conn.execute("SELECT COUNT(*) FROM usage").fetchone() == (0,)


def test_records_wait_out_an_outage_in_memory_and_all_arrive_once_the_database_is_back(postgres: Postgres):
    async def run() -> None:
        store = PgUsage(postgres.url, batch_interval=0.01)
        try:
            for n in range(3):
                store.record(_record(n))
            assert await store.flush(GUARD_S)
            await asyncio.to_thread(postgres.pause)
            for n in range(3, 8):
                store.record(_record(n, "bob@uni.edu" if n % 2 else "ada@uni.edu"))
            await eventually_async(lambda: store.outage is not None, "the writer finds the database gone")
            assert store.buffered == 5
            with pytest.raises(OpenAIError) as refused:
                await store.per_user()
            assert (refused.value.status, refused.value.code) == (503, "state_unavailable")
            assert refused.value.headers == {"Retry-After": "2"}
            assert f"PostgreSQL at 127.0.0.1:{postgres.port}/postgres" in refused.value.message
            await asyncio.to_thread(postgres.resume)
            assert await store.flush(GUARD_S)
            assert (store.buffered, store.dropped, store.outage) == (0, 0, None)
            per_user = await store.per_user()
            assert [row[:6] for row in per_user] == [("ada@uni.edu", "tiny-chat", 5, 1, 0 + 1 + 2 + 4 + 6,
                                                      2 * (0 + 1 + 2 + 4 + 6)),
                                                     ("bob@uni.edu", "tiny-chat", 3, 0, 3 + 5 + 7, 2 * (3 + 5 + 7))]
            (ada,) = await store.per_model("ada@uni.edu")
            assert ada[:5] == ("tiny-chat", 5, 1, 13, 26)
            assert ada[-1] == 16.0  # the last request's latency: req-6's
        finally:
            await store.aclose()

    asyncio.run(run())
    assert [rid for rid, _ in _stored(postgres)] == [f"req-{n}" for n in range(8)]  # all, once, in order


def test_past_its_bound_the_buffer_drops_the_oldest_and_counts_them(postgres: Postgres):
    async def run() -> tuple[int, int]:
        store = PgUsage(postgres.url, batch_interval=0.01, buffer_limit=3)
        try:
            store.record(_record(0))
            assert await store.flush(GUARD_S)
            await asyncio.to_thread(postgres.pause)
            for n in range(1, 6):
                store.record(_record(n))
            assert (store.buffered, store.dropped) == (3, 2)
            await asyncio.to_thread(postgres.resume)
            assert await store.flush(GUARD_S)
            return store.buffered, store.dropped
        finally:
            await store.aclose()

    assert asyncio.run(run()) == (0, 2)
    assert [rid for rid, _ in _stored(postgres)] == ["req-0", "req-3", "req-4", "req-5"]
