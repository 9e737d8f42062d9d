"""Relaying streams through the gateway: chunk by chunk, cancelled when the client leaves, faults reported."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import openai
import pytest

from bench.fake_upstream import serving_in_thread
from tests.conftest import fake_cluster_config, open_door, server_config

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture
def slow_upstream():
    with serving_in_thread(models=["fake-model", "fake-embed"], chunks=200, pace=0.02) as upstream:
        yield upstream


@pytest.fixture
def jp_server_config(slow_upstream, write_config, tmp_path: Path):
    config = fake_cluster_config(slow_upstream, timeouts={"first_byte": 1.0, "idle": 1.0})
    return server_config(write_config(config), tmp_path / "data")


async def test_chunks_arrive_before_the_stream_ends(first_ext, door):
    arrivals: list[float] = []
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(door.route("chat/completions"), json=CHAT,
                                headers=door.headers) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert resp.headers["X-First-Cluster"] == "remote"
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 201  # 200 tokens and the final usage event
    # paced at 20 ms upstream, so relayed one by one: the first came long before the last
    assert arrivals[0] < 0.5 * arrivals[-1]
    assert arrivals[-1] > 200 * 0.02 * 0.9


async def test_client_disconnect_cancels_upstream_within_100ms(first_ext, door, slow_upstream):
    slow_upstream.pace = 0.4  # far apart, so the cancel cannot ride on a failed write of the next chunk
    async with aiohttp.ClientSession() as session:
        resp = await session.post(door.route("chat/completions"), json=CHAT,
                                  headers=door.headers)
        seen = 0
        async for line in resp.content:
            seen += line.startswith(b"data: ")
            if seen == 3:
                break
        assert slow_upstream.active == 1
        closed_at = time.monotonic()
        resp.close()  # drops the connection mid-stream
    deadline = closed_at + 2
    while not slow_upstream.disconnects and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert slow_upstream.disconnects, "the upstream request was never cancelled"
    lag = slow_upstream.disconnects[-1] - closed_at
    assert lag < 0.1, f"upstream cancelled {lag * 1000:.0f} ms after the client left"
    gateway = first_ext.gateway
    await asyncio.to_thread(gateway.usage.flush)
    assert gateway.usage.query("SELECT status, stream FROM usage") == [(499, 1)]


async def test_upstream_dropping_mid_stream_ends_with_an_error_event(key_door, slow_upstream):
    client = openai.AsyncOpenAI(base_url=key_door.url, api_key=key_door.api_key, max_retries=0)
    slow_upstream.fault = "drop-mid-stream"
    stream = await client.chat.completions.create(model="fake-model", messages=CHAT["messages"], stream=True)
    received = 0
    with pytest.raises(openai.APIError) as info:
        async for _ in stream:
            received += 1
    assert 0 < received < 200
    assert "broke off its answer" in str(info.value)


@pytest.mark.parametrize(
    ("fault", "status", "words"),
    [("429", 429, "retry after"), ("500", 500, "HTTP 500"), ("hang", 504, "did not answer within 1 s")],
)
async def test_upstream_faults_become_openai_errors(first_ext, door, slow_upstream, fault, status, words):
    slow_upstream.fault = fault
    async with aiohttp.ClientSession() as session:
        for stream in (False, True):
            async with session.post(door.route("chat/completions"),
                                    json={**CHAT, "stream": stream}, headers=door.headers) as resp:
                body = json.loads(await resp.read())
                assert resp.status == status
                assert words in body["error"]["message"]
                if status == 429:
                    assert resp.headers["Retry-After"] == "1"


async def test_idle_timeout_mid_stream(first_ext, door, slow_upstream):
    """A stream that stalls longer than the idle timeout ends with an error event, not a hang."""
    slow_upstream.pace = 1.5  # each chunk now comes after more than the 1 s idle timeout
    async with aiohttp.ClientSession() as session, session.post(door.route("chat/completions"), json=CHAT,
                            headers=door.headers) as resp:
        body = (await resp.read()).decode()
    assert resp.status == 200
    assert '"code":"upstream_idle_timeout"' in body


async def test_client_leaving_a_plain_request_cancels_it_upstream(first_ext, slow_upstream, door):
    """Not only streams: a non-stream request whose client gives up is cancelled upstream and counted as 499."""
    slow_upstream.fault = "slow-first-byte"  # the answer takes a while, as a long completion does
    async with aiohttp.ClientSession() as session:
        with pytest.raises(asyncio.TimeoutError):
            await session.post(door.route("chat/completions"), json={**CHAT, "stream": False}, headers=door.headers,
                               timeout=aiohttp.ClientTimeout(total=0.3))
        left_at = time.monotonic()
    deadline = left_at + 2
    while not slow_upstream.disconnects and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    assert slow_upstream.disconnects, "the upstream request was never cancelled"
    assert slow_upstream.disconnects[-1] - left_at < 0.1
    gateway = first_ext.gateway
    await asyncio.to_thread(gateway.usage.flush)
    assert gateway.usage.query("SELECT status, stream FROM usage") == [(499, 0)]



def _stream_in_thread(url: str, headers: dict[str, str]) -> list[float]:
    """Read a whole stream with the blocking ``openai`` client; the ``time.monotonic()`` of each event."""
    client = openai.OpenAI(base_url=url, api_key=headers["Authorization"].split(" ", 1)[1], max_retries=0)
    with client.chat.completions.create(model="fake-model", messages=CHAT["messages"], stream=True) as stream:
        return [time.monotonic() for _ in stream]


async def test_kernels_streams_keep_flowing_while_jupyters_loop_is_blocked(first_ext, jp_auth_header):
    """The gateway runs on its own loop: a slow Jupyter handler (a big notebook save) stalls none of the streams
    on the URL kernels use (Jupyter's own URL is served by Jupyter's loop, so there a stream waits for it)."""
    api = open_door("api", first_ext, jp_auth_header)
    reader = asyncio.ensure_future(asyncio.to_thread(_stream_in_thread, api.url, api.headers))
    await asyncio.sleep(0.5)  # the stream is under way (events 20 ms apart, 4 s in all)
    blocked_from = time.monotonic()
    time.sleep(1.0)  # noqa: ASYNC251 (the point: Jupyter's loop, which this test runs on, is blocked)
    blocked_to = time.monotonic()
    arrivals = await reader
    during = [t for t in arrivals if blocked_from + 0.1 < t < blocked_to]
    assert len(during) >= 20, f"only {len(during)} events arrived in the 0.9 s Jupyter's loop was blocked"
