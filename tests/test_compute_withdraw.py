"""No work outlives its client on the Globus Compute path: a plain request whose client leaves, or that runs past
its deadline, stops the engine's generation on the node, and counts in flight (the router's load) until it has.

The real gateway with its own door (whose callback route the node is told to reach), the real globus-compute-sdk
over HTTP answered by ``responses`` and a loopback AMQP broker (``tests.fake_compute_service``: the "node" runs the
task's function in a thread here), and the fake upstream as the node's engine, its answer held at its gate: it is
at work on the request until either the test opens the gate or the request's client (the node) goes away, which
is what it records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import responses

from bench.fake_upstream import FakeUpstream, serving_in_thread
from first_jupyter.api.lean_door import GatewayApp
from first_jupyter.config import parse_config
from first_jupyter.gateway.core import Gateway
from first_jupyter.protocol import CLIENT_CLOSED
from first_jupyter.service import GatewayService, build_gateway
from tests.conftest import gate, held
from tests.fake_amqp import FakeAmqpBroker
from tests.fake_compute_service import FakeComputeService
from tests.test_compute_cloud import ENDPOINT, TOKEN, _node_config
from tests.waiting import GUARD_S, eventually_async

KEY = "door-key"
BODY = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64}


@pytest.fixture
def engine() -> Iterator[FakeUpstream]:
    """The node's engine, at work on each request (its answer held) until the test lets it answer."""
    with serving_in_thread(models=["fake-model"], chunks=8) as upstream:
        gate(upstream, hold=True)
        yield upstream


@contextlib.asynccontextmanager
async def _gateway(rsps: responses.RequestsMock, broker: FakeAmqpBroker, engine: FakeUpstream, tmp_path: Path,
                   told: bool, deadline_s: float = 900.0) -> AsyncIterator[tuple[Gateway, int]]:
    """The gateway serving its door on a port of its own; ``told``: the endpoint has that door's callback route
    as its ``callback_url``, so its node can be told to stop; else it knows only its deadline (the endpoint's
    timeout, ``deadline_s``)."""
    service = FakeComputeService(broker)
    service.install(rsps, ENDPOINT)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    config = _node_config(engine.port)
    endpoint = config["clusters"]["hpc"]["endpoints"][0]
    endpoint["timeout"] = deadline_s
    if told:
        endpoint["callback_url"] = f"http://127.0.0.1:{port}/first/api/callback"
    gateway = build_gateway(parse_config(config, "test"), tmp_path, environ={"FIRST_GLOBUS_TOKEN": TOKEN})
    running = GatewayService(gateway, GatewayApp(gateway, key=KEY), sock)
    try:
        yield gateway, port
    finally:
        gate(engine, open=True)
        await running.stop()
        service.join()


async def _send(port: int, body: dict[str, Any]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(b"POST /first/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " +
                 KEY.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" %
                 (len(data), data))
    await writer.drain()
    return reader, writer


def _in_flight(gateway: Gateway) -> int:
    return gateway.router.health_of_backend(gateway.backends[0]).in_flight


def _statuses(gateway: Gateway) -> list[int]:
    return [int(row[0]) for row in gateway.usage.query("SELECT status FROM usage ORDER BY rowid")]


async def _leave(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def test_a_client_that_leaves_stops_the_generation_on_the_node(rsps, broker, engine, tmp_path):
    async with _gateway(rsps, broker, engine, tmp_path, told=True) as (gateway, port):
        _, writer = await _send(port, BODY)
        await eventually_async(lambda: held(engine) == 1, "the engine at work")
        assert _in_flight(gateway) == 1
        await _leave(writer)
        await eventually_async(lambda: len(engine.disconnects) == 1, "the node goes away from the engine")
        await eventually_async(lambda: _in_flight(gateway) == 0, "the request is no longer in flight")
        await eventually_async(lambda: _statuses(gateway) == [CLIENT_CLOSED], "the request is accounted")
        assert (engine.requests, engine.active) == (1, 0)


async def test_a_stream_whose_client_leaves_counts_in_flight_until_the_node_stops(rsps, broker, tmp_path):
    """The engine sends its first event, then nothing for a minute (a stream that is not over): the node, asking
    meanwhile whether it is still wanted, learns that its client left, and stops."""
    with serving_in_thread(models=["fake-model"], chunks=8, pace=60.0) as slow:
        async with _gateway(rsps, broker, slow, tmp_path, told=True) as (gateway, port):
            reader, writer = await _send(port, {**BODY, "stream": True})
            assert (await asyncio.wait_for(reader.readuntil(b"data: "), GUARD_S)).startswith(b"HTTP/1.1 200")
            await _leave(writer)
            await eventually_async(lambda: len(slow.disconnects) == 1, "the node goes away from the engine")
            await eventually_async(lambda: _in_flight(gateway) == 0, "the request is no longer in flight")
            assert (slow.requests, slow.active) == (1, 0)


async def test_a_request_counts_in_flight_until_its_engine_work_ends(rsps, broker, engine, tmp_path):
    """A node that cannot be told (no callback URL) works on until its deadline or its answer: the request still
    counts meanwhile, so the router does not pile more onto an engine that is busy."""
    async with _gateway(rsps, broker, engine, tmp_path, told=False) as (gateway, port):
        _, writer = await _send(port, BODY)
        await eventually_async(lambda: held(engine) == 1, "the engine at work")
        await _leave(writer)
        await eventually_async(lambda: not gateway.callbacks.tasks(), "the gateway lets the request go")
        assert _in_flight(gateway) == 1  # the engine still works on it
        assert engine.active == 1
        gate(engine, open=True)  # the engine's work ends (with its answer, which nobody takes)
        await eventually_async(lambda: _in_flight(gateway) == 0, "the request is no longer in flight")
        assert _statuses(gateway) == [CLIENT_CLOSED]
        assert len(engine.disconnects) == 0  # it ran to its end: nothing cut it off


async def test_a_request_past_its_deadline_stops_the_generation_on_the_node(rsps, broker, engine, tmp_path):
    """The node keeps the request's deadline (the endpoint's timeout) itself: here it cannot reach the gateway."""
    async with _gateway(rsps, broker, engine, tmp_path, told=False, deadline_s=0.5) as (gateway, port):
        reader, _ = await _send(port, BODY)
        answer = await asyncio.wait_for(reader.read(65536), GUARD_S)
        assert answer.startswith(b"HTTP/1.1 504")
        assert b"upstream_timeout" in answer
        await eventually_async(lambda: len(engine.disconnects) == 1, "the node goes away from the engine")
        await eventually_async(lambda: _in_flight(gateway) == 0, "the request is no longer in flight")
        assert (engine.requests, engine.active) == (1, 0)
