"""Relaying streams through the gateway: chunk by chunk, cancelled when the client leaves, faults reported."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import openai
import pytest

from bench.fake_upstream import serving_in_thread
from tests.conftest import fake_cluster_config, open_door, send_json, server_config, serving_http
from tests.waiting import GUARD_S, eventually_async

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
GENEROUS = {"first_byte": 2 * GUARD_S, "idle": 2 * GUARD_S}
"""The gateway's timeouts where they are not under test: longer than any wait, so they cannot end a request that a
test expects some other cause to end (and a loaded machine never meets them)."""
NEVER = 3600.0
"""An upstream pace that means "no further event during the test"."""
ASKED = "/v1/chat/completions"
"""The route whose requests the tests count at the upstream. Not ``active`` alone: the gateway's background status
readings (``GET /v1/models``) pass through ``active`` too, for a moment, at any time."""


@pytest.fixture
def slow_upstream():
    with serving_in_thread(models=["fake-model", "fake-embed"], chunks=200, pace=0.02) as upstream:
        yield upstream


@pytest.fixture
def timeouts() -> dict[str, float]:
    """The gateway's upstream timeouts; a test of one of them parametrizes ``timeouts`` to make it short."""
    return GENEROUS


@pytest.fixture
def jp_server_config(slow_upstream, timeouts, write_config, tmp_path: Path):
    config = fake_cluster_config(slow_upstream, timeouts=timeouts)
    return server_config(write_config(config), tmp_path / "data")


async def test_chunks_arrive_before_the_stream_ends(first_ext, door, slow_upstream):
    upstream_busy: list[int] = []  # the upstream's responses in flight as each event reached the client
    async with aiohttp.ClientSession() as session, session.post(door.route("chat/completions"), json=CHAT,
                                                                headers=door.headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        assert resp.headers["X-First-Cluster"] == "remote"
        async for line in resp.content:
            if line.startswith(b"data: {"):
                upstream_busy.append(slow_upstream.active)
    assert len(upstream_busy) == 201  # 200 tokens and the final usage event
    # relayed one by one, not held until the end: the first event reached the client while the upstream was still
    # sending (it had 199 events, 20 ms apart, to go: the order, not a time, is what is checked)
    assert upstream_busy[0] >= 1
    assert slow_upstream.by_route[ASKED] == 1


async def test_client_disconnect_cancels_upstream(first_ext, door, slow_upstream):
    # one event, then none for an hour: the cancel cannot ride on a failed write of the next chunk, and the gateway's
    # timeouts are longer than the wait below, so only the client's leaving can end the request upstream
    slow_upstream.pace = NEVER
    async with aiohttp.ClientSession() as session:
        resp = await session.post(door.route("chat/completions"), json=CHAT, headers=door.headers)
        async for line in resp.content:
            if line.startswith(b"data: "):
                break
        assert slow_upstream.active >= 1  # the stream is in flight upstream
        resp.close()  # drops the connection mid-stream
        await eventually_async(lambda: slow_upstream.disconnects)  # the upstream request was cancelled
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
    ("fault", "status", "words", "timeouts"),
    [("429", 429, "retry after", GENEROUS), ("500", 500, "HTTP 500", GENEROUS),
     # the upstream never answers: the first-byte timeout, short here, is what ends the request
     ("hang", 504, "did not answer within 1 s", {**GENEROUS, "first_byte": 1.0})],
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


@pytest.mark.parametrize("timeouts", [{**GENEROUS, "idle": 1.0}])
async def test_idle_timeout_mid_stream(first_ext, door, slow_upstream):
    """A stream that stalls longer than the idle timeout ends with an error event, not a hang."""
    slow_upstream.pace = NEVER  # one event, then the stream stalls for good: the 1 s idle timeout must end it
    async with aiohttp.ClientSession() as session, session.post(door.route("chat/completions"), json=CHAT,
                            headers=door.headers) as resp:
        body = (await resp.read()).decode()
    assert resp.status == 200
    assert '"code":"upstream_idle_timeout"' in body


async def test_client_leaving_a_plain_request_cancels_it_upstream(first_ext, slow_upstream, door):
    """Not only streams: a non-stream request whose client gives up is cancelled upstream and counted as 499."""
    slow_upstream.fault = "hang"  # the answer never comes (a long completion): only the client's leaving ends it
    async with aiohttp.ClientSession() as session:
        asking = asyncio.ensure_future(session.post(door.route("chat/completions"), json={**CHAT, "stream": False},
                                                    headers=door.headers))
        await eventually_async(lambda: slow_upstream.by_route[ASKED] == 1)  # the request reached the upstream
        asking.cancel()  # the client gives up
        with pytest.raises(asyncio.CancelledError):
            await asking
    await eventually_async(lambda: slow_upstream.disconnects)  # the upstream request was cancelled
    gateway = first_ext.gateway
    await asyncio.to_thread(gateway.usage.flush)
    assert gateway.usage.query("SELECT status, stream FROM usage") == [(499, 0)]


class _Arrivals:
    """How many events a stream read in another thread has received, for the test to wait on."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = threading.Condition()

    def add(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block until ``count`` events have arrived; False if ``timeout`` passed first."""
        with self._changed:
            return self._changed.wait_for(lambda: self.count >= count, timeout)


def _stream_in_thread(url: str, headers: dict[str, str], arrivals: _Arrivals) -> None:
    """Read a whole stream with the blocking ``openai`` client, counting its events into ``arrivals``."""
    client = openai.OpenAI(base_url=url, api_key=headers["Authorization"].split(" ", 1)[1], max_retries=0)
    with client.chat.completions.create(model="fake-model", messages=CHAT["messages"], stream=True) as stream:
        for _ in stream:
            arrivals.add()


async def test_kernels_streams_keep_flowing_while_jupyters_loop_is_blocked(first_ext, jp_auth_header):
    """The gateway runs on its own loop: a slow Jupyter handler (a big notebook save) stalls none of the streams
    on the URL kernels use (Jupyter's own URL is served by Jupyter's loop, so there a stream waits for it)."""
    api = open_door("api", first_ext, jp_auth_header)
    arrivals = _Arrivals()
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(_stream_in_thread, api.url, api.headers, arrivals)  # its thread starts here
        # Block Jupyter's loop, which this test runs on, from before the stream is asked for until it has begun and
        # 20 events have come (of 201, 20 ms apart): a gateway served by this loop could send none of them, and the
        # wait would run out instead.
        flowed = arrivals.wait_for(21, GUARD_S)
        stalled_at = arrivals.count
        await asyncio.wait_for(asyncio.wrap_future(reading), GUARD_S)  # the whole stream, or its error
    assert flowed, f"the stream stood still at event {stalled_at} while Jupyter's loop was blocked"
    assert arrivals.count == 201


class _SpacedEngine(BaseHTTPRequestHandler):
    """An engine that writes JSON as Python's ``json.dumps`` does (``"model": "x"``, ``"choices": []``) and names the
    model its own way: the stream the gateway must rename, and strip of the usage-only event, by parsing."""

    protocol_version = "HTTP/1.1"
    asked_usage: ClassVar[list[bool]] = []
    """Per stream: whether the request the engine got asked for usage."""

    def do_GET(self) -> None:
        send_json(self, {"object": "list", "data": [{"id": SPACED_ENGINE, "object": "model"}]})

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).asked_usage.append(bool((request.get("stream_options") or {}).get("include_usage")))
        base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": request["model"]}
        events = [{**base, "choices": [{"index": 0, "delta": {"content": c}, "finish_reason": None}]} for c in "hi"]
        events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        events.append({**base, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7,
                                                       "prompt_tokens_details": {"cached_tokens": 0}}})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for data in [*(json.dumps(e).encode() for e in events), b"[DONE]"]:
            event = b"data: " + data + b"\n\n"
            self.wfile.write(b"%x\r\n%b\r\n" % (len(event), event))
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, *args: Any) -> None:
        pass


SPACED_ENGINE = "engine/tiny-spaced"


class TestEngineWritingSpacedJson:
    """Issue 21 through the gateway: before streams were rewritten by parsing, ``"model": "x"`` reached clients
    un-renamed and the usage-only event reached clients that never asked for it, whose ``choices[0]`` then raised."""

    @pytest.fixture
    def jp_server_config(self, write_config, tmp_path: Path) -> Iterator[dict[str, Any]]:
        _SpacedEngine.asked_usage = []
        with serving_http(_SpacedEngine) as url:
            config = {"clusters": {"remote": {"backend": "http", "endpoints": [{
                "name": "spaced", "base_url": f"{url}/v1",
                "models": [{"id": "fake-model", "upstream_name": SPACED_ENGINE}]}]}},
                "defaults": {"model": "fake-model", "timeouts": GENEROUS}}
            yield server_config(write_config(config), tmp_path / "data")

    async def test_renamed_and_stripped_for_the_openai_client(self, first_ext, jp_auth_header):
        api = open_door("api", first_ext, jp_auth_header)
        client = openai.AsyncOpenAI(base_url=api.url, api_key=api.api_key, max_retries=0)
        stream = await client.chat.completions.create(model="fake-model", messages=CHAT["messages"], stream=True)
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hi"  # each has a choice to read
        assert {c.model for c in chunks} == {"fake-model"}
        assert all(c.usage is None for c in chunks)
        stream = await client.chat.completions.create(model="fake-model", messages=CHAT["messages"], stream=True,
                                                      stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]  # asked for: the usage-only event is its last
        assert chunks[-1].choices == []
        assert chunks[-1].usage is not None
        assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 2)
        assert {c.model for c in chunks} == {"fake-model"}
        assert _SpacedEngine.asked_usage == [True, True]  # the first on the client's behalf, for accounting
        gateway = first_ext.gateway
        await asyncio.to_thread(gateway.usage.flush)
        assert gateway.usage.query("SELECT prompt_tokens, completion_tokens FROM usage") == [(5, 2), (5, 2)]
