"""A small HTTP/1.1 server on asyncio protocols: the gateway's own door for programs.

Why not tornado: its HTTP/1.1 connection (header parsing into ``HTTPHeaders``, a coroutine and timeout per
request, futures per read and write) costs about 0.2 ms of CPU per request on this project's 2-core machines
before any application code runs, more than the rest of a proxied request together. Programs (notebook code,
batch runners, scripts) are where the request volume comes from, and they need none of what Jupyter's stack
adds, so they get this: one protocol object per connection, the head decoded once and split, the
body collected within a limit, one request at a time (pipelined requests wait their turn), keep-alive by
HTTP/1.1's rules, and backpressure from the transport's own flow control.

The application (``HttpApp``) is called once per request and answers through the ``Exchange``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from http import HTTPStatus
from typing import NamedTuple, Protocol, cast

from first_jupyter.transport.wire import MAX_HEAD_BYTES, ChunkedDecoder, WireError, parse_head

LINGER_S = 2.0
"""How long a refused client may go on sending before its connection is closed regardless."""
KEEPALIVE_S = 75.0
"""A connection waiting longer than this for (the rest of) a request is closed: idle clients and slow-loris."""

log = logging.getLogger(__name__)


class BodySink(Protocol):
    """Where a large body goes as it arrives (an uploaded file to disk), instead of into memory."""

    limit: int
    """The most bytes it takes; more is refused with 413."""

    def feed(self, data: bytes) -> None: ...

    def discard(self) -> None:
        """The request will not be answered (refused, or the client left): drop what was taken."""
        ...


class Request(NamedTuple):
    method: str
    path: str
    query: str
    version: str
    headers: dict[str, str]
    body: bytes
    upload: BodySink | None = None
    """The body's sink, when the app gave one (``body`` is then empty)."""


class HTTPRefusal(Exception):
    """A request refused before the application saw it; the connection is closed after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BodyTooLarge(HTTPRefusal):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(413, f"The request body is {size:,} bytes, over the limit of {limit:,}.")
        self.size = size
        self.limit = limit


class HttpApp(Protocol):
    """What the server needs of an application: the answer to each request, and two policies."""

    async def __call__(self, request: Request, exchange: Exchange) -> None: ...

    def max_body(self) -> int:
        """The largest request body taken; larger ones are refused with 413 before they are read."""
        ...

    def body_sink(self, method: str, path: str, headers: dict[str, str]) -> BodySink | None:
        """A sink for this request's body, or None to collect it (within ``max_body``)."""
        ...

    def refusal(self, refusal: HTTPRefusal) -> bytes:
        """The JSON body of an answer to a request refused before the app saw it (or failed in it)."""
        ...


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


class Exchange:
    """The answering side of one request: a whole response, or a stream of chunks with backpressure."""

    __slots__ = ("_conn", "_head_only", "_keep_alive", "_on_drain", "_streaming", "_version_11", "finished")

    def __init__(self, conn: HttpConnection, version_11: bool, keep_alive: bool, *, head_only: bool = False) -> None:
        self._conn = conn
        self._head_only = head_only
        self._version_11 = version_11
        self._keep_alive = keep_alive
        self._streaming = False
        self._on_drain: Callable[[], None] | None = None
        self.finished = False

    @property
    def client_gone(self) -> bool:
        return self._conn.closed

    def _head(self, status: int, headers: dict[str, str], framing: bytes) -> bytes:
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        lines += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers.items()]
        lines.append(framing)
        if not self._keep_alive:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def _claim(self) -> None:
        if self._streaming or self.finished:
            raise RuntimeError("this request has already been answered")

    def respond(self, status: int, headers: dict[str, str], body: bytes) -> None:
        """Send a whole response and finish the exchange."""
        self._claim()
        head = self._head(status, headers, b"Content-Length: %d\r\n" % len(body))
        self._conn.write(head if self._head_only else head + body)
        self._finish()

    def start_stream(self, status: int, headers: dict[str, str], first: bytes) -> bool:
        """Send the head and the first chunk; chunked on HTTP/1.1, raw bytes until close on HTTP/1.0."""
        self._claim()
        self._streaming = True
        if self._version_11:
            data = self._head(status, headers, b"Transfer-Encoding: chunked\r\n") + b"%x\r\n%b\r\n" % (
                len(first), first)
        else:
            self._keep_alive = False
            data = self._head(status, headers, b"") + first
        return self._conn.write(data)

    def send(self, chunk: bytes) -> bool:
        """Send one more chunk (never empty); False when the client is not keeping up: wait for ``on_drain``."""
        return self._conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._version_11 else chunk)

    def on_drain(self, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` once the client has taken what was queued (after ``send`` returned False)."""
        self._on_drain = callback

    def end_stream(self) -> None:
        if self._version_11:
            self._conn.write(b"0\r\n\r\n")
        self._finish()

    def _drained(self) -> None:
        if self._on_drain is not None:
            self._on_drain()

    def _finish(self) -> None:
        self.finished = True
        self._conn.exchange_done(self._keep_alive)


class HttpConnection(asyncio.Protocol):
    """One client connection: parse a request, run the app on it, answer, repeat."""

    def __init__(self, app: HttpApp, live: set[HttpConnection]) -> None:
        self.app = app
        self.live = live
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self._buf = b""
        self._exchange: Exchange | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0
        # the request being read, once its head is in
        self._head: tuple[str, str, str, str, dict[str, str]] | None = None
        self._left = 0
        self._chunks: ChunkedDecoder | None = None
        self._body: list[bytes] = []
        self._sink: BodySink | None = None
        self._size = 0
        self._linger = False  # a refused request's body may still be arriving: close gently

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, though uvloop's do not subclass asyncio.Transport (they register nothing either)
        self.transport = cast(asyncio.Transport, transport)
        self.live.add(self)
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return  # answered and closing (a refused request's body may still be arriving)
        self._buf = self._buf + data if self._buf else data
        if self._exchange is None:
            self._advance()
        elif len(self._buf) > MAX_HEAD_BYTES + self.app.max_body():  # a pipelining client far ahead of us
            transport = self.transport
            assert transport is not None
            transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.live.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: the request upstream is cancelled with the task
        self._drop_sink()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._exchange is not None:
            self._exchange._drained()

    # -- reading ------------------------------------------------------------------------------------------

    def _advance(self) -> None:
        """Parse as far as the buffer allows; start the app once a whole request is in."""
        try:
            if self._head is None and not self._read_head():
                return
            if not self._read_body():
                return
        except HTTPRefusal as refusal:
            self._refuse(refusal)
            return
        except WireError as exc:
            self._refuse(HTTPRefusal(400, f"Malformed HTTP request: {exc}."))
            return
        assert self._head is not None
        method, path, query, version, headers = self._head
        body = b"".join(self._body)
        sink = self._sink
        self._head, self._body, self._size, self._chunks, self._sink = None, [], 0, None, None
        keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        self._exchange = Exchange(self, version == "HTTP/1.1", keep_alive, head_only=method == "HEAD")
        self._task = self.loop.create_task(self._run(Request(method, path, query, version, headers, body, sink),
                                                     self._exchange))

    def _read_head(self) -> bool:
        end = self._buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
        if end < 0:
            if len(self._buf) >= MAX_HEAD_BYTES + 4:
                raise HTTPRefusal(431, f"The request head is over {MAX_HEAD_BYTES:,} bytes.")
            return False
        first, headers = parse_head(self._buf[:end])
        self._buf = self._buf[end + 4:]
        parts = first.split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0") or not parts[1].startswith("/"):
            raise WireError(f"bad request line {first[:80]!r}")
        path, _, query = parts[1].partition("?")
        self._head = (parts[0], path, query, parts[2], headers)
        self._sink = self.app.body_sink(parts[0], path, headers)
        limit = self._limit()
        if "transfer-encoding" in headers:
            if headers["transfer-encoding"].lower() != "chunked":
                raise HTTPRefusal(501, f"Transfer-Encoding '{headers['transfer-encoding']}' is not supported; "
                                       "send the body with Content-Length or chunked.")
            self._chunks = ChunkedDecoder()
        else:
            declared = headers.get("content-length", "0")
            if not declared.isdigit():
                raise WireError(f"bad Content-Length {declared[:40]!r}")
            self._left = int(declared)
            if self._left > limit:
                raise BodyTooLarge(self._left, limit)
        if headers.get("expect", "").lower() == "100-continue" and (self._chunks or self._left) and \
                self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _read_body(self) -> bool:
        if self._chunks is not None:
            payload, rest = self._chunks.feed(self._buf)
            self._buf = b""
            self._take(payload)
            if not self._chunks.done:
                return False
            self._buf = rest
            return True
        if self._left:
            take = self._buf[:self._left]
            self._buf = self._buf[len(take):]
            self._left -= len(take)
            self._take(take)
        return self._left == 0

    def _limit(self) -> int:
        return self._sink.limit if self._sink is not None else self.app.max_body()

    def _take(self, data: bytes) -> None:
        if data:
            self._size += len(data)
            limit = self._limit()
            if self._size > limit:
                raise BodyTooLarge(self._size, limit)
            if self._sink is not None:
                self._sink.feed(data)
            else:
                self._body.append(data)

    def _drop_sink(self) -> None:
        if self._sink is not None:
            self._sink.discard()
            self._sink = None

    # -- answering ----------------------------------------------------------------------------------------

    async def _run(self, request: Request, exchange: Exchange) -> None:
        try:
            await self.app(request, exchange)
        except asyncio.CancelledError:
            return
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            if not exchange.finished and not self.closed:
                if exchange._streaming:
                    self.close()  # the head is out: ending the connection is the only way to say it
                else:
                    exchange.respond(500, {"Content-Type": "application/json"},
                                     self.app.refusal(HTTPRefusal(500, "The gateway failed on this request; "
                                                                        "its log has the details.")))
            return
        if not exchange.finished and not self.closed:
            log.error("%s %s: the app returned without answering", request.method, request.path)
            self.close()

    def write(self, data: bytes) -> bool:
        if self.closed or self.transport is None or self.transport.is_closing():
            return True  # the client left; connection_lost cancels the app's task
        self.transport.write(data)
        return not self.paused

    def exchange_done(self, keep_alive: bool) -> None:
        self._exchange = None
        self._task = None
        if not keep_alive:
            self._close_lingering() if self._linger else self.close()
            return
        transport = self.transport
        if transport is not None and not self.closed:
            transport.resume_reading()
            self._arm_timer()
            if self._buf:
                self._advance()

    def _refuse(self, refusal: HTTPRefusal) -> None:
        """Answer a request the app never saw, then close: what follows on the connection cannot be trusted."""
        self._head = None
        self._buf = b""
        self._drop_sink()
        self._linger = True
        self._exchange = Exchange(self, True, False)
        self._exchange.respond(refusal.status, {"Content-Type": "application/json"}, self.app.refusal(refusal))

    def _arm_timer(self) -> None:
        """Start the keep-alive clock; one timer per connection, moved only when it fires early."""
        self._waiting_since = self.loop.time()
        if self._timer is None:
            self._timer = self.loop.call_at(self._waiting_since + KEEPALIVE_S, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._exchange is not None:
            return  # answering: the clock starts again when the answer is out
        deadline = self._waiting_since + KEEPALIVE_S
        if self.loop.time() >= deadline:
            self.close()
        else:
            self._timer = self.loop.call_at(deadline, self._on_timer)

    def _close_lingering(self) -> None:
        """Close after a refusal without losing it: FIN after the answer, then discard what still comes.

        The client may still be sending the body it was refused; a socket closed with bytes unread answers them
        with a reset, which wipes the answer from the client's receive buffer before it is read. So the write
        side is shut first and reading goes on (``data_received`` drops it all) until the client closes too or
        ``LINGER_S`` passes.
        """
        transport = self.transport
        if transport is None or not transport.can_write_eof():
            self.close()
            return
        self.closed = True
        transport.write_eof()
        transport.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(LINGER_S, self.close)

    def close(self) -> None:
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.close()


class HttpServer:
    """A listening socket and the connections it accepted, so that stopping it ends them all."""

    def __init__(self, server: asyncio.Server, live: set[HttpConnection]) -> None:
        self._server = server
        self._live = live

    @property
    def port(self) -> int:
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def close(self) -> None:
        self._server.close()
        for conn in list(self._live):
            conn.close()


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind and listen now, so the address is known (and can be handed out) before the event loop runs."""
    sock = socket.create_server((host, port))
    sock.setblocking(False)
    return sock


async def serve(app: HttpApp, sock: socket.socket) -> HttpServer:
    """Answer connections on a listening socket with ``app``; the server owns the socket from now on."""
    live: set[HttpConnection] = set()
    server = await asyncio.get_running_loop().create_server(lambda: HttpConnection(app, live), sock=sock)
    return HttpServer(server, live)
