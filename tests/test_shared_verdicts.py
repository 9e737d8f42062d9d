"""Token introspection shared by replicas through Redis: a token introspected by one replica is not introspected
again by another within its cache time, whatever the verdict; what Redis holds is of no use without the token; and
Redis out of reach costs introspections, never a request."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import responses

from bench.state_servers import RedisServer
from first_jupyter.auth.resource_server import Identity, TokenIntrospector
from first_jupyter.config import COMPUTE_RESOURCE_SERVER, ResourceServer
from first_jupyter.protocol import OpenAIError
from first_jupyter.serve.redis_state import connect
from first_jupyter.serve.redis_verdicts import PREFIX, RedisVerdicts
from tests.test_quotas import FakeClock
from tests.test_resource_server import GATEWAY, MY_GROUPS, Globus

Replica = Callable[..., TokenIntrospector]


@pytest.fixture
def globus() -> Iterator[Globus]:
    """Globus Auth and Groups, answered through the real globus-sdk (as in tests/test_resource_server.py)."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield Globus(rsps)


@pytest.fixture
def replica(redis_server: RedisServer, jp_asyncio_loop: asyncio.AbstractEventLoop) -> Iterator[Replica]:
    """Introspectors as replicas have them, each with its own Redis client, on a clock the test moves (from now:
    the introspected tokens' expiry is real time)."""
    clients = []

    def open_(clock: FakeClock, **settings: Any) -> TokenIntrospector:
        clients.append(connect(redis_server.url))
        return TokenIntrospector(ResourceServer(client_id=GATEWAY, **settings), "gateway-secret",
                                 want_groups=bool(settings.get("groups")), want_compute=False, clock=clock,
                                 shared=RedisVerdicts(clients[-1], redis_server.url, clock=clock))

    yield open_
    for client in clients:
        jp_asyncio_loop.run_until_complete(client.aclose())


def now() -> FakeClock:
    clock = FakeClock()
    clock.now = time.time()
    return clock


def introspections(globus: Any) -> int:
    return globus.requests_to("/v2/oauth2/token/introspect")


async def test_a_token_is_introspected_once_for_every_replica_within_its_cache_time(replica, globus):
    clock = now()
    first, second = (replica(clock, groups=[MY_GROUPS[0]], cache_s=60) for _ in range(2))
    ada = await first.identify("Bearer AT-ada")
    assert introspections(globus) == 1
    assert await second.identify("Bearer AT-ada") == ada  # its groups too: Groups was asked once
    assert (introspections(globus), globus.requests_to("/v2/groups/my_groups")) == (1, 1)
    clock.now += 61  # past the cache time: the second replica asks again, and shares the new verdict
    await second.identify("Bearer AT-ada")
    await first.identify("Bearer AT-ada")
    assert introspections(globus) == 2


async def test_a_refused_token_is_refused_by_every_replica_without_asking_again(replica, globus):
    globus.answer = {"active": False}
    first, second = replica(now()), replica(now())
    for one in (first, second, second):
        with pytest.raises(OpenAIError) as refused:
            await one.identify("Bearer AT-old")
        assert (refused.value.status, refused.value.code) == (401, "inactive_token")
        assert refused.value.headers["WWW-Authenticate"].startswith("Bearer")
    assert introspections(globus) == 1


async def test_what_redis_holds_is_sealed_with_the_token(redis_server: RedisServer):
    client = connect(redis_server.url)
    verdicts = RedisVerdicts(client, redis_server.url, clock=lambda: 1000.0)
    token = "AT-ada-secret"
    key = hashlib.sha256(token.encode()).digest()
    ada = Identity("id-1", "ada@uni.edu", False, math.inf, frozenset(MY_GROUPS),
                   {COMPUTE_RESOURCE_SERVER: ("compute-token-of-ada", math.inf)})
    try:
        await verdicts.put(key, token, 1060.0, ada)
        assert await verdicts.get(key, token) == (1060.0, ada)
        stored = await client.get(PREFIX + key.hex())
        assert b"compute-token-of-ada" not in stored
        assert b"ada@uni.edu" not in stored
        assert 0 < await client.pttl(PREFIX + key.hex()) <= 60_000  # it expires with the verdict
        assert await verdicts.get(key, "AT-someone-else") is None  # moved under another token: opens for none
        await verdicts.put(key, token, 999.0, ada)  # a verdict already over is not kept
        assert await verdicts.get(key, token) == (1060.0, ada)
    finally:
        await client.aclose()


async def test_without_redis_each_replica_introspects_for_itself_until_it_is_back(redis_server, replica, globus,
                                                                                     caplog):
    caplog.set_level(logging.WARNING, logger="first_jupyter.serve.redis_verdicts")
    first, second = replica(now()), replica(now())
    redis_server.stop()
    await first.identify("Bearer AT-ada")
    await second.identify("Bearer AT-ada")
    assert introspections(globus) == 2  # served all the same
    assert caplog.text.count("not shared while Redis") == 2  # once per replica, when the outage began
    redis_server.start(redis_server.port)
    await first.identify("Bearer AT-bob")
    await second.identify("Bearer AT-bob")
    assert introspections(globus) == 3
