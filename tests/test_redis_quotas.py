"""The Redis side of the quotas, beyond the answers it shares with SQLite (tests/test_quotas.py): the script is
atomic across clients, keys expire once their bucket would be full, Redis's own clock serves where none is passed,
and an outage is a 503 with Retry-After that ends, without a new client, when Redis is back."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Any

import pytest

from bench.state_servers import RedisServer
from first_jupyter.config import Quota, Quotas
from first_jupyter.protocol import OpenAIError
from first_jupyter.serve.redis_quotas import PREFIX, RedisQuotas
from first_jupyter.serve.redis_state import connect
from tests.test_quotas import FakeClock

NOW = FakeClock().now


async def test_replicas_admitting_together_take_exactly_the_burst(redis_server: RedisServer):
    quotas = Quotas(per_user=Quota(requests_per_s=1, burst=20), per_model=Quota(requests_per_s=1, burst=1000))
    clients = [connect(redis_server.url) for _ in range(4)]
    stores = [RedisQuotas(client, redis_server.url, quotas, clock=lambda: NOW) for client in clients]
    try:
        answers = await asyncio.gather(*(stores[i % 4].admit("alice", "m") for i in range(100)))
        assert sum(answer.allowed for answer in answers) == 20
        assert sorted(a.headers["x-ratelimit-remaining-requests"] for a in answers if a.allowed) == sorted(
            str(n) for n in range(20))
        refused = await stores[0].admit("alice", "m")
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert (await stores[1].admit("bob", "m")).allowed  # the model's bucket was charged 20 only
    finally:
        for client in clients:
            await client.aclose()


async def expires_when_full(client: Any, key: str, capacity: float, rate: float) -> bool:
    """Whether ``key`` expires when its bucket, as written, would have refilled to ``capacity`` (and a second's
    margin): Redis's time is frozen while a script runs, so its write time and its expiry time are on one clock."""
    level, updated = await client.hmget(PREFIX + key, "level", "updated")
    full_ms = float(updated) * 1000 + math.ceil((capacity - float(level)) / rate * 1000) + 1000
    return abs(await client.pexpiretime(PREFIX + key) - full_ms) <= 1


async def test_a_bucket_lives_until_it_would_be_full_on_redis_own_clock(redis_server: RedisServer):
    client = connect(redis_server.url)
    store = RedisQuotas(client, redis_server.url, Quotas(per_user=Quota(requests_per_s=0.5, burst=3,
                                                                        tokens_per_min=60)))
    try:
        assert [(await store.admit("alice", "m")).allowed for _ in range(4)] == [True, True, True, False]
        level, updated = await client.hmget(f"{PREFIX}u:req:alice", "level", "updated")
        assert float(level) < 1  # Redis's clock moved a little between the admits: refilled by that much
        seconds, micros = await client.time()
        assert seconds - 600 < float(updated) <= seconds + micros / 1e6  # Redis's own time, now
        assert await expires_when_full(client, "u:req:alice", 3, 0.5)
        assert await client.exists(f"{PREFIX}u:tok:alice") == 0  # admitting only reads the token bucket
        store.spend("alice", "m", 30)
        await store.settled()
        assert await expires_when_full(client, "u:tok:alice", 60, 1)
    finally:
        await client.aclose()


async def test_without_limits_nothing_reaches_redis(redis_server: RedisServer):
    url = redis_server.url
    redis_server.stop()  # anything sent would fail
    client = connect(url)
    try:
        for quotas in (Quotas(), Quotas(models={"big": Quota(requests_per_s=1)})):
            store = RedisQuotas(client, url, quotas)
            assert (await store.admit("alice", "small")).allowed
            store.spend("alice", "small", 1000)
            await store.close()
    finally:
        await client.aclose()


async def test_an_outage_is_a_503_with_retry_after_and_ends_when_redis_is_back(redis_server: RedisServer, caplog):
    client = connect(redis_server.url)
    store = RedisQuotas(client, redis_server.url, Quotas(per_user=Quota(requests_per_s=1, burst=2,
                                                                        tokens_per_min=60)), clock=lambda: NOW)
    try:
        assert (await store.admit("alice", "m")).allowed
        redis_server.stop()
        with pytest.raises(OpenAIError) as down:
            await store.admit("alice", "m")
        assert (down.value.status, down.value.code) == (503, "state_unavailable")
        assert down.value.headers["Retry-After"] == "2"
        assert f"Redis at 127.0.0.1:{redis_server.port}" in down.value.message
        assert "serve.state.redis" in down.value.message
        caplog.set_level(logging.WARNING, logger="first_jupyter.serve.redis_quotas")
        store.spend("alice", "m", 10)  # forgiven, and said so
        await store.settled()
        assert "10 tokens not taken" in caplog.text

        redis_server.start(redis_server.port)  # back, empty (nothing was saved): the same client reconnects
        back = await store.admit("alice", "m")
        assert back.allowed
        assert back.headers["x-ratelimit-remaining-requests"] == "1"
    finally:
        await client.aclose()
