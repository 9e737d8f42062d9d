"""The gateway's HTTP/1.1 client: framing, keep-alive, retries on stale connections, timeouts, limits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from bench.fake_upstream import serving_in_thread
from first_jupyter.transport.http_client import (
    ConnectFailed,
    Disconnected,
    FirstByteTimeout,
    IdleTimeout,
    Pool,
    ProtocolViolation,
    Url,
)
from tests.waiting import GUARD_S, eventually_async

JSON_HEAD = b"Content-Type: application/json\r\n"
NEVER = 3600.0
"""An upstream pace that means "no further event during the test"."""
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "asyncio.Future[None] | object"]


async def _held_open(reader: asyncio.StreamReader) -> None:
    """Keep the connection open until the client closes it: only the response's own framing can end its body."""
    await reader.read()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + (await reader.readexactly(length) if length else b"")


@asynccontextmanager
async def scripted(script) -> AsyncIterator[tuple[Url, dict]]:
    """A loopback server whose every connection runs ``script(reader, writer, state)``."""
    state: dict = {"connections": 0, "open": 0, "max_open": 0, "requests": []}
    handlers: set[asyncio.Task] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())
        state["connections"] += 1
        state["open"] += 1
        state["max_open"] = max(state["max_open"], state["open"])
        try:
            await script(reader, writer, state)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            state["open"] -= 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Url.parse(f"http://127.0.0.1:{port}/v1/chat/completions"), state
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


def _pool(**kwargs) -> Pool:
    return Pool(limit=kwargs.pop("limit", 10), limit_per_host=kwargs.pop("limit_per_host", 10),
                connect_timeout=kwargs.pop("connect_timeout", GUARD_S), **kwargs)


CHUNKED = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
           b"7\r\ndata: a\r\n" b"b;ext=1\r\ndata: bcde\n\r\n" b"0\r\nX-Trailer: t\r\n\r\n")


async def test_chunked_body_survives_every_split_point():
    for split in range(1, len(CHUNKED)):
        async def script(reader, writer, state, split=split):
            await _read_request(reader)
            writer.write(CHUNKED[:split])
            await writer.drain()
            await asyncio.sleep(0.001)  # (most likely two reads at the client; the test holds either way)
            writer.write(CHUNKED[split:])
            await writer.drain()
            await _held_open(reader)

        async with scripted(script) as (url, _):
            pool = _pool()
            resp = await pool.request("POST", url, JSON_HEAD, b"{}", first_byte=GUARD_S, idle=GUARD_S)
            assert resp.status == 200
            assert resp.headers["content-type"] == "text/event-stream"
            assert await resp.read() == b"data: adata: bcde\n", split
            pool.close()


async def test_keep_alive_reuses_one_connection():
    with serving_in_thread(models=["m"]) as upstream:
        pool = _pool()
        url = Url.parse(f"{upstream.url}/v1/chat/completions")
        for _ in range(5):
            resp = await pool.request("POST", url, JSON_HEAD, b'{"model": "m", "messages": []}',
                                      first_byte=GUARD_S, idle=GUARD_S)
            assert resp.status == 200
            assert b'"object":"chat.completion"' in await resp.read()
        assert pool.opened == 1
        pool.close()


async def test_a_stale_keep_alive_connection_is_retried_on_a_new_one():
    async def script(reader, writer, state):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # then the server drops the idle connection, as servers do after their keep-alive timeout

    async with scripted(script) as (url, state):
        pool = _pool()
        first = await pool.request("POST", url, JSON_HEAD, b"{}", first_byte=GUARD_S, idle=GUARD_S)
        assert await first.read() == b"ok"
        await eventually_async(lambda: state["open"] == 0)  # the server has dropped the idle connection
        second = await pool.request("POST", url, JSON_HEAD, b"{}", first_byte=GUARD_S, idle=GUARD_S)
        assert await second.read() == b"ok"
        assert state["connections"] == 2
        pool.close()


@pytest.mark.parametrize(
    ("response", "body"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", b"until the end"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nx", b"x"),
    ],
)
async def test_body_framings(response, body):
    async def script(reader, writer, state):
        await _read_request(reader)
        writer.write(response)
        await writer.drain()
        if b"Connection: close" in response:
            writer.close()
        else:
            await _held_open(reader)

    async with scripted(script) as (url, _):
        pool = _pool()
        resp = await pool.request("GET", url, b"", None, first_byte=GUARD_S, idle=GUARD_S)
        assert await resp.read() == body
        pool.close()


async def test_request_is_sent_with_host_and_length():
    async def script(reader, writer, state):
        state["requests"].append(await _read_request(reader))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    async with scripted(script) as (url, state):
        pool = _pool()
        resp = await pool.request("POST", url, JSON_HEAD + b"Authorization: Bearer k\r\n", b'{"a":1}',
                                  first_byte=GUARD_S, idle=GUARD_S)
        assert await resp.read() == b""
        sent = state["requests"][0]
        assert sent.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"\r\nAuthorization: Bearer k\r\nContent-Length: 7\r\n\r\n{\"a\":1}" in sent
        pool.close()


async def test_first_byte_and_idle_timeouts():
    async def silent(reader, writer, state):
        await _read_request(reader)
        await _held_open(reader)  # no answer, ever: only the first-byte timeout can end the request

    wrote_last: list[float] = []

    async def stalls(reader, writer, state):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        wrote_last.append(asyncio.get_running_loop().time())
        await writer.drain()
        await _held_open(reader)  # then nothing more, ever: only the idle timeout can end it

    async with scripted(silent) as (url, _):
        pool = _pool()
        with pytest.raises(FirstByteTimeout, match=r"no response within 0\.2 s"):
            await pool.request("POST", url, b"", b"{}", first_byte=0.2, idle=GUARD_S)
        pool.close()
    async with scripted(stalls) as (url, _):
        pool = _pool()
        resp = await pool.request("POST", url, b"", b"{}", first_byte=GUARD_S, idle=0.3)
        chunks: list[bytes] = []
        loop = asyncio.get_running_loop()
        with pytest.raises(IdleTimeout, match=r"nothing received for 0\.3 s"):  # the idle limit, not the first-byte one
            await resp.pipe(lambda c: chunks.append(c) or True)
        assert chunks == [b"abc"]
        # not before the idle limit had passed since the last bytes were written (the server shares this loop's
        # clock); no upper bound: how late a timer fires is the machine's business
        assert loop.time() - wrote_last[0] >= 0.3
        resp.release()
        pool.close()


async def test_releasing_early_closes_the_connection_so_the_upstream_stops():
    # one event, then none for an hour: only the connection's closing can end the request upstream
    with serving_in_thread(models=["m"], chunks=100, pace=NEVER) as upstream:
        pool = _pool()
        url = Url.parse(f"{upstream.url}/v1/chat/completions")
        resp = await pool.request("POST", url, JSON_HEAD, b'{"model": "m", "messages": [], "stream": true}',
                                  first_byte=GUARD_S, idle=GUARD_S)
        assert b"data:" in await resp.next_chunk()
        resp.release()
        await eventually_async(lambda: upstream.disconnects)
        assert len(upstream.disconnects) == 1
        pool.close()


async def test_per_host_limit_bounds_open_connections():
    async def slow(reader, writer, state):
        while True:
            await _read_request(reader)
            # answer only once two connections are open: the requests pile up, and only the limit keeps the other
            # four from opening connections of their own
            await eventually_async(lambda: state["max_open"] >= 2)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx")
            await writer.drain()

    async with scripted(slow) as (url, state):
        pool = _pool(limit_per_host=2)

        async def one() -> bytes:
            resp = await pool.request("POST", url, b"", b"{}", first_byte=GUARD_S, idle=GUARD_S)
            return await resp.read()

        assert await asyncio.gather(*(one() for _ in range(6))) == [b"x"] * 6
        assert state["max_open"] == 2
        pool.close()


async def test_a_slow_consumer_pauses_reading_and_gets_everything():
    body = b"".join(b"%x\r\n%b\r\n" % (1000, bytes([65 + i % 26]) * 1000) for i in range(3000))

    async def script(reader, writer, state):
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body + b"0\r\n\r\n")
        await writer.drain()
        await _held_open(reader)

    async with scripted(script) as (url, _):
        pool = _pool()
        resp = await pool.request("POST", url, b"", b"{}", first_byte=GUARD_S, idle=GUARD_S)
        received: list[bytes] = []
        paused = 0
        loop = asyncio.get_running_loop()

        def sink(chunk: bytes) -> bool:
            nonlocal paused
            received.append(chunk)
            if len(received) % 5 == 0:  # pretend the client is full now and then
                paused += 1
                loop.call_later(0.001, resp.resume_reading)
                return False
            return True

        await resp.pipe(sink)
        data = b"".join(received)
        assert len(data) == 3_000_000
        assert data[:1000] == b"A" * 1000
        assert data[-1000:] == bytes([65 + 2999 % 26]) * 1000
        assert paused > 0
        pool.close()


async def test_connect_failures_and_bad_responses():
    pool = _pool()
    with pytest.raises(ConnectFailed):
        await pool.request("GET", Url.parse("http://127.0.0.1:9/"), b"", None, first_byte=GUARD_S, idle=GUARD_S)

    async def garbage(reader, writer, state):
        await _read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await _held_open(reader)

    async def hangs_up(reader, writer, state):
        await _read_request(reader)

    async with scripted(garbage) as (url, _):
        with pytest.raises(ProtocolViolation):
            await pool.request("GET", url, b"", None, first_byte=GUARD_S, idle=GUARD_S)
    async with scripted(hangs_up) as (url, _):
        with pytest.raises(Disconnected):
            await pool.request("GET", url, b"", None, first_byte=GUARD_S, idle=GUARD_S)
    pool.close()


def test_url_parsing():
    url = Url.parse("https://gateway.example.org/resource_server/polaris/vllm/v1/chat/completions?x=1")
    assert (url.origin.scheme, url.origin.host, url.origin.port) == ("https", "gateway.example.org", 443)
    assert url.target == "/resource_server/polaris/vllm/v1/chat/completions?x=1"
    assert url.host_header == "gateway.example.org"
    assert Url.parse("http://[::1]:8000/v1").host_header == "[::1]:8000"
    with pytest.raises(ValueError, match="not an http"):
        Url.parse("ftp://x/")


async def test_a_slow_first_byte_within_its_limit_is_not_an_idle_timeout():
    """The first-byte limit (model loading, long prompts) may exceed the idle limit between chunks."""

    async def thinks(reader, writer, state):
        await _read_request(reader)
        await asyncio.sleep(0.6)  # at least twice the idle limit (a sleep is never shorter, however slow the machine)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await _held_open(reader)

    async with scripted(thinks) as (url, _):
        pool = _pool()
        resp = await pool.request("POST", url, b"", b"{}", first_byte=GUARD_S, idle=0.3)
        assert await resp.read() == b"ok"
        pool.close()
