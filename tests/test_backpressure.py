"""A client that stops reading a stream pauses the upstream through every door, and nothing is lost.

The upstream here honours TCP flow control (it writes only as fast as the gateway reads) and counts what it got
out; if any part of the gateway buffered without bound, the whole stream would leave the upstream while the
client reads nothing.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from tests.conftest import Door, server_config
from tests.waiting import GUARD_S

EVENT = b'data: {"object":"chat.completion.chunk","model":"push-model","choices":[{"delta":{"content":"' + (
    b"x" * 16_000) + b'"}}]}\n\n'
EVENTS = 4096  # 64 MB: several times what the sockets and the gateway's buffers on both hops can hold
TOTAL = EVENTS * len(EVENT)
CHAT = b'{"model": "push-model", "messages": [{"role": "user", "content": "hi"}], "stream": true}'
QUIET_ROUND_TRIPS = 3
"""Requests through the same door that must come and go while the blocked upstream stays blocked: each proves that
every hop's loop turned over meanwhile, so a hop still reading the upstream would have let it write more."""


class PushingUpstream:
    """Streams ``EVENTS`` events to each chat request as fast as its client takes them (and lists its model to
    the gateway's background status readings)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.written = 0
        self.finished = False
        self.blocked = False
        """Whether the stream is waiting for the gateway to take what it wrote (its socket buffers are full)."""
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._answer, sock=self.sock)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        else:
            self.sock.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if head.startswith(b"GET "):  # the gateway reading its status: a model list, not the stream
                listing = b'{"object":"list","data":[{"id":"push-model","object":"model"}]}'
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%b" % (len(listing), listing))
                await writer.drain()
                return
            length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n")
                              if line.startswith(b"content-length:")))
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            frame = b"%x\r\n%b\r\n" % (len(EVENT), EVENT)
            for _ in range(EVENTS):
                writer.write(frame)
                self.blocked = True  # seen by others only while drain() really waits
                await writer.drain()  # blocks while the gateway is not reading: that is the point
                self.blocked = False
                self.written += len(EVENT)
            done = b"data: [DONE]\n\n"
            writer.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(done), done))
            await writer.drain()
            self.finished = True
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
def pushing() -> Iterator[PushingUpstream]:
    upstream = PushingUpstream(socket.create_server(("127.0.0.1", 0)))
    yield upstream
    upstream.close()


@pytest.fixture
def jp_server_config(pushing, write_config, tmp_path: Path):
    config = {"clusters": {"push": {"backend": "http", "endpoints": [
        {"name": "pusher", "base_url": pushing.url, "models": [{"id": "push-model"}]}]}},
        "defaults": {"timeouts": {"first_byte": 2 * GUARD_S, "idle": 2 * GUARD_S}}}
    return server_config(write_config(config), tmp_path / "data")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """The rest of a chunked response body, decoded (chunk boundaries fall anywhere, even inside an event)."""
    parts: list[bytes] = []
    while size := int((await asyncio.wait_for(reader.readline(), GUARD_S)).strip(), 16):
        parts.append(await asyncio.wait_for(reader.readexactly(size), GUARD_S))
        assert await reader.readexactly(2) == b"\r\n"
    assert await reader.readexactly(2) == b"\r\n"  # no trailers
    return b"".join(parts)


async def _stalled(pushing: PushingUpstream, door: Door) -> int:
    """Wait until the upstream is blocked for good: blocked, and still blocked with nothing more written after
    ``QUIET_ROUND_TRIPS`` requests through the same door; what it had written by then. A gateway that buffered without
    bound never gets there: it keeps reading, and the upstream writes on until it has finished."""
    async with aiohttp.ClientSession() as session, asyncio.timeout(GUARD_S):
        while not pushing.finished:
            if not pushing.blocked:
                await asyncio.sleep(0.01)
                continue
            written = pushing.written
            for _ in range(QUIET_ROUND_TRIPS):
                async with session.get(door.route("models"), headers=door.headers) as resp:
                    assert resp.status == 200
                    await resp.read()
            if pushing.blocked and pushing.written == written:
                return written
    raise AssertionError("the upstream sent its whole stream to a client that reads nothing")


async def test_a_client_that_stops_reading_pauses_the_upstream(first_ext, door, pushing):
    await pushing.start()
    url = URL(door.route("chat/completions"))
    headers = "".join(f"{name}: {value}\r\n" for name, value in door.headers.items())
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(f"POST {url.raw_path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Type: application/json"
                     f"\r\nContent-Length: {len(CHAT)}\r\n\r\n".encode() + CHAT)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD_S)
        assert head.startswith(b"HTTP/1.1 200")
        # the client reads nothing more: everything fills up, and the upstream stops
        stalled = await _stalled(pushing, door)
        assert stalled < TOTAL / 2
        assert not pushing.finished

        body = await _read_chunked(reader)  # reading again resumes the upstream, and every byte arrives
        assert pushing.finished
        assert body == EVENT * EVENTS + b"data: [DONE]\n\n"
    finally:
        writer.close()
