"""Remote streams across replicas that share a real redis-server: a node's batches that reach the replica which
does not hold the client's stream arrive there whole and in order; replays are refused whichever replica gets
them; a client that stalls holds the node back instead of growing Redis.

Two replicas are two ``CallbackHub``s with their own Redis clients; the other replica's callback route is served
over HTTP on loopback, and the node is the real node-side function (``remote.inference.stream_engine``, which
signs and POSTs the batches), streaming from the fake engine. ``first serve``'s compute path cannot carry this:
its embedded Globus Compute engine always calls back to its own process (``Gateway.own_callback_url``), never to
an endpoint's ``callback_url``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from aiohttp import web

from bench.fake_upstream import serving_in_thread
from bench.state_servers import RedisServer
from first_jupyter.gateway.backends.compute.callbacks import CALLBACK_PATH, CallbackHub, RemoteStream
from first_jupyter.remote.inference import BUSY, sign, stream_engine
from first_jupyter.serve import redis_streams
from first_jupyter.serve.redis_state import connect
from first_jupyter.serve.redis_streams import MAX_BACKLOG, RedisCallbacks
from tests.waiting import GUARD_S, eventually_async

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Pair:
    owner: CallbackHub
    other: CallbackHub
    other_url: str
    """The other replica's callback route."""


def _hub(url: str) -> CallbackHub:
    hub = CallbackHub()
    hub.shared = RedisCallbacks(connect(url), url)
    return hub


@contextlib.asynccontextmanager
async def replicas(redis_server: RedisServer) -> AsyncIterator[Pair]:
    """Two replicas' hubs on the test's loop, the other one's callback route listening."""
    owner, other = _hub(redis_server.url), _hub(redis_server.url)

    async def callback(request: web.Request) -> web.Response:
        status = await other.receive(request.headers.get("x-first-task", ""), request.headers.get("x-first-seq", ""),
                                     request.headers.get("x-first-signature", ""), await request.read())
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post(CALLBACK_PATH, callback)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Pair(owner, other, f"http://127.0.0.1:{port}{CALLBACK_PATH}")
    finally:
        await runner.cleanup()
        for hub in (owner, other):
            assert hub.shared is not None
            await hub.shared.settle()
            await hub.shared.client.aclose()


def _batch(stream: RemoteStream, seq: int, message: dict[str, Any], key: str | None = None) -> tuple[str, str, str,
                                                                                                    bytes]:
    body = json.dumps(message).encode()
    return stream.task_id, str(seq), sign(key or stream.key, stream.task_id, seq, body), body


async def test_a_stream_whose_callbacks_land_on_the_other_replica_arrives_whole(redis_server: RedisServer):
    with serving_in_thread(models=["fake-model"], chunks=40, pace=0.002) as engine:
        async with replicas(redis_server) as pair:
            direct = await asyncio.to_thread(stream_engine, engine.port, "chat/completions", CHAT, None, "t", "k")
            stream = await pair.owner.begin()
            node = asyncio.ensure_future(asyncio.to_thread(
                stream_engine, engine.port, "chat/completions", CHAT, pair.other_url, stream.task_id, stream.key,
                256, 0.0))
            whole = b"".join([chunk async for chunk in stream.chunks(GUARD_S)])
            summary = await node
            pair.owner.close(stream)
            assert pair.other.accepted == summary["batches"]  # every one, its done message included
    assert summary["status"] == 200
    assert summary["batches"] > 10  # many batches, each through the other replica and Redis
    assert _contents(whole) == _contents(direct["body"].encode())  # the whole answer, in order
    assert whole.rstrip().endswith(b"data: [DONE]")

def _contents(stream: bytes) -> str:
    """The text of a chat stream's deltas, in the order they came."""
    text = []
    for line in stream.splitlines():
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:]).get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


async def test_order_is_kept_and_a_replay_is_refused_whichever_replica_gets_it(redis_server: RedisServer):
    async with replicas(redis_server) as pair:
        await _order_and_replays(pair)


async def _order_and_replays(pair: Pair) -> None:
    stream = await pair.owner.begin()
    assert await pair.other.receive(*_batch(stream, 0, {"data": "data: a\n\n"})) == 204
    assert await pair.owner.receive(*_batch(stream, 1, {"data": "data: b\n\n"})) == 204
    assert await pair.other.receive(*_batch(stream, 1, {"data": "data: b\n\n"})) == 409  # replayed on the other
    assert await pair.owner.receive(*_batch(stream, 0, {"data": "data: a\n\n"})) == 409  # and on the owner
    assert await pair.other.receive(*_batch(stream, 3, {"data": "data: d\n\n"})) == 409  # ahead of its turn
    assert await pair.other.receive(*_batch(stream, 2, {"data": "forged"}, key="not-the-key")) == 403
    assert await pair.other.receive(*_batch(stream, 2, {"alive": True})) == 204  # no place in the sequence
    assert await pair.other.started(stream)
    assert await pair.other.receive(*_batch(stream, 2, {"data": "data: c\n\n"})) == 204
    assert await pair.owner.receive(*_batch(stream, 3, {"done": True})) == 204
    assert [chunk async for chunk in stream.chunks(GUARD_S)] == [b"data: a\n\n", b"data: b\n\n", b"data: c\n\n"]
    pair.owner.close(stream)
    assert pair.owner.shared is not None
    await pair.owner.shared.settle()  # the keys' deletion, which closing starts
    assert await pair.other.receive(*_batch(stream, 4, {"data": "late"})) == 403  # closed for every replica


async def test_a_stalled_client_holds_the_node_back_within_the_bound(redis_server: RedisServer,
                                                                    monkeypatch: pytest.MonkeyPatch):
    async with replicas(redis_server) as pair:
        await _stalled_client(pair, redis_server.url, monkeypatch)


async def _stalled_client(pair: Pair, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    stream = await pair.owner.begin()
    for seq in range(MAX_BACKLOG):  # the client reads nothing meanwhile
        assert await pair.other.receive(*_batch(stream, seq, {"data": f"data: {seq}\n\n"})) == 204
    assert pair.other.shared is not None
    batches = f"first:callback:{stream.task_id}:batches"
    held = asyncio.ensure_future(pair.other.receive(*_batch(stream, MAX_BACKLOG, {"data": "data: more\n\n"})))

    watcher = redis.Redis.from_url(redis_url)

    def node_waits() -> bool:  # the POST is held: its replica waits in Redis for the owner's word
        return any(client["cmd"] == "blpop" for client in watcher.client_list())

    await eventually_async(node_waits, "the held batch waits for room")
    watcher.close()
    assert not held.done()
    assert await pair.other.shared.client.xlen(batches) == MAX_BACKLOG  # the bound, not one more
    chunks = stream.chunks(GUARD_S)
    assert await anext(chunks) == b"data: 0\n\n"  # the client reads: room, and the held batch is taken
    assert await held == 204

    monkeypatch.setattr(redis_streams, "FULL_WAIT_S", 0.0)  # a client that stays behind: BUSY, the node resends
    backlog = await pair.other.shared.client.xlen(batches)
    for seq in range(MAX_BACKLOG + 1, MAX_BACKLOG + 1 + MAX_BACKLOG - backlog):
        assert await pair.other.receive(*_batch(stream, seq, {"data": f"data: {seq}\n\n"})) == 204
    last = _batch(stream, 2 * MAX_BACKLOG + 1 - backlog, {"done": True})
    assert await pair.other.receive(*last) == BUSY
    assert await pair.other.shared.client.xlen(batches) == MAX_BACKLOG
    rest = [await anext(chunks) for _ in range(2 * MAX_BACKLOG - backlog)]
    assert await pair.other.receive(*last) == 204  # the same batch, sent again once there is room
    assert [chunk async for chunk in chunks] == []
    assert rest[0] == b"data: 1\n\n"
    assert rest[MAX_BACKLOG - 1] == b"data: more\n\n"
    assert rest[-1] == f"data: {2 * MAX_BACKLOG - backlog}\n\n".encode()
    pair.owner.close(stream)
