"""A small HTTP/1.1 server on asyncio protocols: the gateway's own door for programs.

Why not tornado: its HTTP/1.1 connection (header parsing into ``HTTPHeaders``, a coroutine and timeout per
request, futures per read and write) costs about 0.2 ms of CPU per request on this project's 2-core machines
before any application code runs, more than the rest of a proxied request together. Programs (notebook code,
batch runners, scripts) are where the request volume comes from, and they need none of what Jupyter's stack
adds, so they get this: one protocol object per connection, requests parsed by llhttp (httptools, as in
uvicorn: HTTP's grammar is kept by a well-tried parser, not by hand) with the head bounded, the body collected
within a limit, one request at a time (pipelined requests wait their turn), keep-alive by HTTP/1.1's rules,
backpressure from the transport's own flow control, and a cap on open connections.

The application (``HttpApp``) is called once per request and answers through the ``Exchange``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import NamedTuple, Protocol, cast

import httptools

from first_jupyter.transport.heads import MAX_HEAD_BYTES, HeadCollector, HeadTooLarge

LINGER_S = 2.0
"""How long a refused client may go on sending before its connection is closed regardless."""
KEEPALIVE_S = 75.0
"""A connection on which nothing arrives for this long while it waits for (the rest of) a request is closed: idle
clients and the slowest of slow-loris (the head's bound and the connection cap limit the rest)."""
MAX_CONNECTIONS = 1024
"""Open client connections a server takes by default; past it a new one is answered 503 and closed."""
RESERVED_DESCRIPTORS = 512
"""Descriptors kept for the rest of the process (the Jupyter server's own sockets, kernels' channels, files)."""
MAX_LINGERING_REFUSALS = 64
"""Connections refused past the cap that may linger (so that their 503 is read); more are cut at once."""

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
    keep_alive: bool = True
    """HTTP/1.1 without ``Connection: close``: the connection stays open after the answer."""


class HTTPRefusal(Exception):
    """A request refused before the application saw it; the connection is closed after the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.path = ""
        """The request's path, where its head was read before the refusal: the app may answer in that route's
        way."""


class BodyTooLarge(HTTPRefusal):
    def __init__(self, size: int, limit: int, sink: BodySink | None = None) -> None:
        """``sink``: the body's, when it had one (its limit is the one crossed)."""
        super().__init__(413, f"The request body is {size:,} bytes, over the limit of {limit:,}.")
        self.size = size
        self.limit = limit
        self.sink = sink


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
        """Send a whole response and finish the exchange (204 and 304 carry no body, nor its length)."""
        self._claim()
        bodiless = status in (204, 304)
        head = self._head(status, headers, b"" if bodiless else b"Content-Length: %d\r\n" % len(body))
        if bodiless:
            body = b""
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


class Connections:
    """A server's client connections: all it holds, and those refused past the cap while they linger."""

    __slots__ = ("cap", "live", "refused")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.live: set[HttpConnection] = set()
        self.refused: set[HttpConnection] = set()

    def served(self) -> int:
        return len(self.live) - len(self.refused)


class HttpConnection(HeadCollector, asyncio.Protocol):
    """One client connection: parse requests (llhttp), run the app on each in turn, answer, repeat."""

    def __init__(self, app: HttpApp, connections: Connections) -> None:
        self.app = app
        self.connections = connections
        self.live = connections.live
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self._parser: httptools.HttpRequestParser = httptools.HttpRequestParser(self)
        self._buf: list[bytes] = []
        """Bytes not fed to the parser yet: they came while a request was being answered (pipelining)."""
        self._buffered = 0
        self._continue = False
        """The request being read asked for ``100 Continue``, not sent yet."""
        self._queue: deque[Request] = deque()
        """Whole requests parsed and waiting their turn, oldest first."""
        self._refusal: HTTPRefusal | None = None
        """What ended parsing; answered once the requests before it are."""
        self._exchange: Exchange | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._waiting_since = 0.0
        # the request being parsed
        self._url = b""
        self._started: tuple[str, str, str, str, bool] | None = None
        self._body: list[bytes] = []
        self._sink: BodySink | None = None
        self._size = 0
        self._linger = False  # a refused request's body may still be arriving: close gently

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, though uvloop's do not subclass asyncio.Transport (they register nothing either)
        self.transport = cast(asyncio.Transport, transport)
        self.live.add(self)
        connections = self.connections
        if connections.served() > connections.cap:
            if len(connections.refused) >= MAX_LINGERING_REFUSALS:  # a flood: no descriptor is kept for it
                self.transport.abort()
                return
            connections.refused.add(self)  # it lingers for its 503 to be read, holding no served place
            self._refusal = HTTPRefusal(503, f"The gateway has {connections.cap:,} connections open, its limit "
                                             "(defaults.limits.max_client_connections); retry shortly, and reuse "
                                             "connections rather than opening new ones.")
            self._next()
            return
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        if self.closed or self._refusal is not None:
            return  # answered and closing, or refusing: what follows cannot be trusted
        if self._exchange is None and not self._queue:
            self._waiting_since = self.loop.time()  # the keep-alive clock is an idle clock: a slow upload goes on
        if self._exchange is not None or self._queue:
            self._buf.append(data)
            self._buffered += len(data)
            if self._buffered > MAX_HEAD_BYTES + self.app.max_body():  # a pipelining client far ahead of us
                transport = self.transport
                assert transport is not None
                transport.pause_reading()
            return
        self._feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.live.discard(self)
        self.connections.refused.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client left: the request upstream is cancelled with the task
        self._drop_sink()
        for request in self._queue:
            if request.upload is not None:
                request.upload.discard()
        self._queue.clear()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self._exchange is not None:
            self._exchange._drained()

    # -- reading: llhttp's callbacks ----------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Parse what came; every whole request is queued, and the first one started."""
        try:
            self._parse(data)
        except HTTPRefusal as refusal:
            refusal.path = self._started[1] if self._started is not None else ""
            self._refusal = refusal
        except HeadTooLarge:
            self._refusal = HTTPRefusal(431, f"The request head is over {MAX_HEAD_BYTES:,} bytes.")
        except httptools.HttpParserUpgrade:
            # the request asking to upgrade is whole and queued; HTTP/1.1 is all this door speaks, so it is
            # answered as such, and the connection closes after it (what follows would be another protocol)
            if self._queue:
                self._queue[-1] = self._queue[-1]._replace(keep_alive=False)
            self._refusal = _UPGRADE_IGNORED
        except httptools.HttpParserError as exc:
            self._refusal = HTTPRefusal(400, f"Malformed HTTP request: {exc}.")
        except OSError as exc:  # a body sink that could not write (a full disk, a quota)
            self._refusal = HTTPRefusal(507, f"The request body could not be stored here ({exc.strerror or exc}); "
                                             "free some space and send it again.")
        except Exception:  # a fault of ours: logged and answered, never left to the event loop
            log.exception("parsing a request failed")
            self._refusal = HTTPRefusal(500, "The gateway failed on this request; its log has the details.")
        self._next()

    def on_message_begin(self) -> None:
        self._begin_head()
        self._continue = False
        self._url = b""
        self._started = None
        self._body, self._size, self._sink = [], 0, None

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        self._url += url

    def on_headers_complete(self) -> None:
        self._end_head()
        method = self._parser.get_method().decode("ascii")
        version = "HTTP/" + self._parser.get_http_version()
        target = self._url.decode("latin-1")
        if not target.startswith("/"):
            raise HTTPRefusal(400, f"Malformed HTTP request: the target {target[:80]!r} is not a path; this "
                                   "server is not a proxy.")
        path, _, query = target.partition("?")
        headers = self.headers
        keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        self._started = (method, path, query, version, keep_alive)
        self._sink = self.app.body_sink(method, path, headers)
        limit = self._limit()
        coding = headers.get("transfer-encoding")
        if coding is not None and coding.lower() != "chunked":
            raise HTTPRefusal(501, f"Transfer-Encoding '{coding}' is not supported; send the body with "
                                   "Content-Length or chunked.")
        declared = int(headers.get("content-length", "0"))  # llhttp let only digits through
        if declared > limit:
            raise BodyTooLarge(declared, limit, self._sink)
        if headers.get("expect", "").lower() == "100-continue" and (coding or declared) and version == "HTTP/1.1":
            self._continue = True  # sent once this request is the one being read (see _next)
            self._send_continue()

    def on_body(self, data: bytes) -> None:
        self._moved()
        if data:
            self._size += len(data)
            limit = self._limit()
            if self._size > limit:
                raise BodyTooLarge(self._size, limit, self._sink)
            if self._sink is not None:
                self._sink.feed(data)
            else:
                self._body.append(data)

    def on_message_complete(self) -> None:
        self._moved()
        self._continue = False
        assert self._started is not None
        method, path, query, version, keep_alive = self._started
        body = b"".join(self._body)
        self._queue.append(Request(method, path, query, version, self.headers, body, self._sink, keep_alive))
        self._started, self._body, self._size, self._sink = None, [], 0, None

    def _limit(self) -> int:
        return self._sink.limit if self._sink is not None else self.app.max_body()

    def _send_continue(self) -> None:
        """``100 Continue`` for the request being read, once nothing before it is still being answered (an
        interim answer in the middle of another response would corrupt it)."""
        if self._continue and self._exchange is None and not self._queue and self.transport is not None \
                and not self.closed:
            self._continue = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _drop_sink(self) -> None:
        if self._sink is not None:
            self._sink.discard()
            self._sink = None

    def _next(self) -> None:
        """With no request being answered: start the next one parsed, else answer a refusal, else parse on."""
        if self._exchange is not None or self.closed:
            return
        if self._queue:
            request = self._queue.popleft()
            self._exchange = Exchange(self, request.version == "HTTP/1.1", request.keep_alive,
                                      head_only=request.method == "HEAD")
            self._task = self.loop.create_task(self._run(request, self._exchange))
        elif self._refusal is not None:
            if self._refusal is _UPGRADE_IGNORED:
                self.close()
            else:
                self._refuse(self._refusal)
        elif self._buf:
            data = b"".join(self._buf)
            self._buf.clear()
            self._buffered = 0
            if self.transport is not None:
                self.transport.resume_reading()
            self._feed(data)
        else:
            self._send_continue()

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
        if self.transport is not None and not self.closed:
            self._arm_timer()
            self._next()

    def _refuse(self, refusal: HTTPRefusal) -> None:
        """Answer a request the app never saw, then close: what follows on the connection cannot be trusted."""
        self._buf.clear()
        self._buffered = 0
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


_UPGRADE_IGNORED = HTTPRefusal(400, "upgrade ignored")
"""The marker for a connection whose client asked to switch protocols: closed once its request is answered."""


class HttpServer:
    """A listening socket and the connections it accepted, so that stopping it ends them all."""

    def __init__(self, server: asyncio.Server, connections: Connections) -> None:
        self._server = server
        self._connections = connections
        self._live = connections.live

    @property
    def connections(self) -> int:
        """Client connections open now and served (refused ones lingering for their 503 not counted)."""
        return self._connections.served()

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


def descriptor_room(max_connections: int) -> int:
    """The connection cap the process's descriptor limit allows, raising its soft limit to fit when it may.

    A cap is worth nothing above the limit: past the limit ``accept`` fails with EMFILE, for this door and for
    the Jupyter server alike, before the cap is ever reached. So the soft limit is raised (up to the hard one)
    to hold the cap plus ``RESERVED_DESCRIPTORS``; where the hard limit is lower, the cap comes down instead.
    """
    try:
        import resource  # Unix only
    except ImportError:
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + RESERVED_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < want:
        raised = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY or soft >= want:
        return max_connections
    room = max(soft - RESERVED_DESCRIPTORS, soft // 2, 1)
    log.warning("The open-file limit is %d (ulimit -n), too low for %d client connections plus the rest of the "
                "process; the gateway's door takes %d. Raise the limit (or lower "
                "defaults.limits.max_client_connections) to silence this.", soft, max_connections, room)
    return min(room, max_connections)


async def serve(app: HttpApp, sock: socket.socket, max_connections: int = MAX_CONNECTIONS) -> HttpServer:
    """Answer connections on a listening socket with ``app``; the server owns the socket from now on.

    At most ``max_connections`` are served at once (fewer where the descriptor limit says so): one more is
    answered 503 and closed at once, so that idle sockets from any local user cannot use up the process's
    descriptors, which the Jupyter server shares.
    """
    connections = Connections(descriptor_room(max_connections))
    server = await asyncio.get_running_loop().create_server(lambda: HttpConnection(app, connections), sock=sock)
    return HttpServer(server, connections)
