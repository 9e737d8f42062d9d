"""Remote streams: a node's signed batches reach the waiting stream through the callback route, in order, as
they come; forged or replayed batches are refused without disturbing it; a dead node ends it with an error."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bench.fake_upstream import FakeUpstream, serving_in_thread
from first_jupyter.gateway.backends.compute.callbacks import CallbackHub, RemoteStream
from first_jupyter.protocol import OpenAIError
from first_jupyter.remote.inference import sign, stream_engine
from tests.conftest import fake_cluster_config, open_door, server_config

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
PACE = 0.02
SLOW_PACE = 1.0
"""The engine's pace until the first batch is in: 30 s for the whole answer, at most a second to wait once let go."""
GUARD_S = 30.0
"""Failure guards only: what they bound takes milliseconds."""


def _batch(stream: RemoteStream, seq: int, message: dict[str, Any], key: str | None = None) -> tuple[str, str, str,
                                                                                                    bytes]:
    body = json.dumps(message).encode()
    return stream.task_id, str(seq), sign(key or stream.key, stream.task_id, seq, body), body


async def _collect(stream: RemoteStream, idle: float = GUARD_S) -> list[bytes]:
    """The stream's chunks to its end; ``idle`` is a failure guard unless a test is about the idle timeout."""
    return [chunk async for chunk in stream.chunks(idle)]


async def test_batches_reach_the_stream_in_order():
    hub = CallbackHub()
    stream = hub.open()
    assert hub.deliver(*_batch(stream, 0, {"data": "data: a\n\n"})) == 204
    assert hub.deliver(*_batch(stream, 1, {"data": "data: b\n\n"})) == 204
    assert hub.deliver(*_batch(stream, 1, {"data": "data: b\n\n"})) == 409  # a replay
    assert hub.deliver(*_batch(stream, 3, {"data": "data: d\n\n"})) == 409  # out of order
    assert hub.deliver(*_batch(stream, 2, {"data": "forged"}, key="not-the-tasks-key")) == 403
    assert hub.deliver("no-such-task", "0", "sig", b"{}") == 403
    assert hub.deliver(*_batch(stream, 2, {"done": True})) == 204
    assert await _collect(stream) == [b"data: a\n\n", b"data: b\n\n"]
    hub.close(stream)
    assert hub.deliver(*_batch(stream, 3, {"data": "late"})) == 403


async def test_a_node_reporting_a_failure_ends_the_stream_with_its_reason():
    hub = CallbackHub()
    stream = hub.open()
    hub.deliver(*_batch(stream, 0, {"data": "data: a\n\n"}))
    hub.deliver(*_batch(stream, 1, {"error": "the engine's stream broke off on the node"}))
    with pytest.raises(OpenAIError, match="broke off on the node") as info:
        await _collect(stream)
    assert (info.value.status, info.value.code) == (502, "remote_error")


async def test_a_silent_node_ends_the_stream_after_the_idle_timeout():
    stream = CallbackHub().open()
    with pytest.raises(OpenAIError, match=r"sent nothing for 0\.3 s") as info:
        await asyncio.wait_for(_collect(stream, idle=0.3), GUARD_S)  # the guard only fails a stream left hanging
    assert info.value.status == 504


# -- through a real server, from the function that runs on the node ------------------------------------------------


@pytest.fixture
def engine() -> Any:
    """An engine that holds its answer after the first event (30 s for the rest) until the test lets it go on at
    ``PACE``: the first batch reaches the stream while the node is still generating, on any machine."""
    with serving_in_thread(models=["fake-model"], chunks=30, pace=SLOW_PACE) as upstream:
        yield upstream


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path: Path):
    return server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "data")


@pytest.mark.parametrize("door_name", ["jupyter-key", "api"])
async def test_a_node_streams_back_through_the_callback_route(first_ext, jp_auth_header, engine: FakeUpstream,
                                                              door_name):
    """The node's function posts to the server with no Jupyter credentials; a forged batch sent meanwhile is
    refused and the stream goes on; the first events arrive long before the node has finished."""
    callback = open_door(door_name, first_ext, jp_auth_header).url.removesuffix("/v1") + "/api/callback"
    gateway, thread = first_ext.gateway, first_ext.loop_thread
    stream = await thread.call(_open(gateway.callbacks))
    chunks: list[bytes] = []
    generating: list[bool] = []

    async def consume() -> None:
        async for chunk in stream.chunks(GUARD_S):  # an idle timeout far beyond any pause of the node here
            if not chunks:  # the first batch is in: was the engine still at work, then let it go on
                generating.append(engine.active == 1)
                engine.pace = PACE
            chunks.append(chunk)

    consumer = thread.submit(consume())
    node = asyncio.ensure_future(asyncio.to_thread(
        stream_engine, engine.port, "chat/completions", CHAT, callback, stream.task_id, stream.key, 16384, 0.05))
    forged = await asyncio.to_thread(_post_forged, callback, stream.task_id)
    summary = await node
    await asyncio.wrap_future(consumer)
    assert forged == 403
    assert summary["status"] == 200
    whole = b"".join(chunks)
    assert whole.count(b"data: {") == 31
    assert generating == [True]  # the first batch came while the node was still generating
    gateway.callbacks.close(stream)


async def _open(hub: CallbackHub) -> RemoteStream:
    return hub.open()  # on the gateway's loop, which the stream's queue belongs to


def _post_forged(url: str, task_id: str) -> int:
    body = b'{"data": "data: {\\"forged\\": true}\\n\\n"}'
    request = urllib.request.Request(url, data=body, method="POST", headers={  # noqa: S310 (loopback server)
        "X-First-Task": task_id, "X-First-Seq": "0", "X-First-Signature": "0" * 64,
        "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=GUARD_S) as resp:  # noqa: S310 (loopback test server)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_threads_deliver_while_the_loop_waits():
    """``deliver`` runs on the server's threads; the stream's queue is fed on its own loop."""
    loop = asyncio.new_event_loop()
    try:
        hub = CallbackHub()
        stream = loop.run_until_complete(_open(hub))
        sender = threading.Thread(target=lambda: [hub.deliver(*_batch(stream, i, m)) for i, m in enumerate(
            ({"data": "data: x\n\n"}, {"done": True}))])
        sender.start()
        assert loop.run_until_complete(_collect(stream)) == [b"data: x\n\n"]
        sender.join()
    finally:
        loop.close()
