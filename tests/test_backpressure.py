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

import pytest
from yarl import URL

from tests.conftest import server_config

EVENT = b'data: {"object":"chat.completion.chunk","model":"push-model","choices":[{"delta":{"content":"' + (
    b"x" * 16_000) + b'"}}]}\n\n'
EVENTS = 4096  # 64 MB: several times what the sockets and the gateway's buffers on both hops can hold
TOTAL = EVENTS * len(EVENT)
CHAT = b'{"model": "push-model", "messages": [{"role": "user", "content": "hi"}], "stream": true}'


class PushingUpstream:
    """Streams ``EVENTS`` events to each chat request as fast as its client takes them (and lists its model to
    the gateway's background status readings)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.written = 0
        self.finished = False
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
                await writer.drain()  # blocks while the gateway is not reading: that is the point
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
        "defaults": {"timeouts": {"first_byte": 5.0, "idle": 30.0}}}
    return server_config(write_config(config), tmp_path / "data")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    """The rest of a chunked response body, decoded (chunk boundaries fall anywhere, even inside an event)."""
    parts: list[bytes] = []
    while size := int((await asyncio.wait_for(reader.readline(), 30)).strip(), 16):
        parts.append(await asyncio.wait_for(reader.readexactly(size), 30))
        assert await reader.readexactly(2) == b"\r\n"
    assert await reader.readexactly(2) == b"\r\n"  # no trailers
    return b"".join(parts)


async def test_a_client_that_stops_reading_pauses_the_upstream(first_ext, door, pushing):
    await pushing.start()
    url = URL(door.route("chat/completions"))
    headers = "".join(f"{name}: {value}\r\n" for name, value in door.headers.items())
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(f"POST {url.raw_path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Content-Type: application/json"
                     f"\r\nContent-Length: {len(CHAT)}\r\n\r\n".encode() + CHAT)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(1.0)  # the client reads nothing more: everything fills up and the upstream stalls
        stalled = pushing.written
        await asyncio.sleep(0.5)
        assert pushing.written == stalled, "the upstream kept sending to a client that reads nothing"
        assert stalled < TOTAL / 2

        body = await _read_chunked(reader)  # reading again resumes the upstream, and every byte arrives
        assert pushing.finished
        assert body == EVENT * EVENTS + b"data: [DONE]\n\n"
    finally:
        writer.close()
