"""A small pooled HTTP/1.1 client for upstream engines, built on asyncio protocols.

The gateway's budget is a fraction of a millisecond of CPU per proxied request and tens of microseconds per
relayed chunk. General-purpose clients spend more than that on machinery the gateway does not need (cookie
jars, redirects, tracing hooks, one task per request). This client does only what talking to OpenAI-compatible
engines takes: keep-alive connections pooled per host with sized limits, requests written in one call,
responses parsed incrementally (``Content-Length``, chunked, or read to EOF), body bytes handed on as they
arrive, and timeouts that are idle timeouts: one timer per response, re-armed only when it fires.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, cast
from urllib.parse import urlsplit

from first_jupyter.transport.wire import MAX_HEAD_BYTES, ChunkedDecoder, WireError, parse_head

PAUSE_BYTES = 1024 * 1024  # stop reading the upstream while this much is waiting for a slow client


class HTTPClientError(Exception):
    """The exchange failed below HTTP: connect, disconnect, malformed response."""


class ConnectFailed(HTTPClientError):
    pass


class Disconnected(HTTPClientError):
    pass


class ProtocolViolation(HTTPClientError):
    pass


class FirstByteTimeout(TimeoutError):
    pass


class IdleTimeout(TimeoutError):
    pass


class Origin(NamedTuple):
    """Where to connect: the pool key (a tuple, so hashing it on every request is one C call)."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"


@dataclass(frozen=True, slots=True)
class Url:
    """A parsed upstream URL with the request-line target and Host header precomputed."""

    origin: Origin
    target: str
    host_header: str
    text: str = field(compare=False)

    @classmethod
    def parse(cls, text: str) -> Url:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {text!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(Origin(parts.scheme, parts.hostname, port), target,
                   host if port == default else f"{host}:{port}", text)


class Response:
    """One response; its body is read as it arrives, and closing it early aborts the connection."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_complete",
        "_conn",
        "_error",
        "_first_byte",
        "_got_bytes",
        "_head_seen",
        "_idle",
        "_last_data",
        "_loop",
        "_piped",
        "_sent",
        "_sink",
        "_timer",
        "_waiter",
        "headers",
        "slot",
        "status",
    )

    def __init__(self, conn: _Connection, first_byte: float, idle: float) -> None:
        self.slot: _Slot | None = None
        self.status = 0
        self.headers: dict[str, str] = {}
        self._conn: _Connection | None = conn
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: BaseException | None = None
        self._loop = conn.loop
        self._first_byte = first_byte
        self._idle = idle
        self._head_seen = False
        self._got_bytes = False
        self._sink: Callable[[bytes], bool] | None = None
        self._piped: asyncio.Future[None] | None = None
        self._sent = self._last_data = self._loop.time()
        # one timer per response, set for the nearer deadline and re-armed only if it fires early
        self._timer: asyncio.TimerHandle | None = self._loop.call_at(self._sent + min(first_byte, idle),
                                                                     self._on_timer)

    # -- called by the connection -------------------------------------------------------------------------

    def _on_timer(self) -> None:
        """Fire on a deadline; if it has not really passed (data came since), re-arm instead."""
        self._timer = None
        if self._complete or self._error is not None:
            return
        now = self._loop.time()
        conn = self._conn
        if not self._head_seen:
            if now < self._sent + self._first_byte:
                self._timer = self._loop.call_at(self._sent + self._first_byte, self._on_timer)
            else:
                self._fail(FirstByteTimeout(f"no response within {self._first_byte:g} s"))
        elif (conn is not None and conn.paused) or now - self._last_data < self._idle:
            self._timer = self._loop.call_at(max(self._last_data, now) + self._idle, self._on_timer)
        else:
            self._fail(IdleTimeout(f"nothing received for {self._idle:g} s"))

    def _head(self, status: int, headers: dict[str, str]) -> None:
        self.status, self.headers, self._head_seen = status, headers, True
        self._last_data = self._loop.time()  # from here on the idle timeout applies: the first-byte timer,
        self._wake()                         # when it fires, re-arms itself for the idle deadline

    def _data(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        if self._sink is not None:
            try:
                keep_going = self._sink(data)
            except Exception as exc:  # the consumer broke: end this exchange, report through pipe()
                self._fail(exc)
                return
            if not keep_going and self._conn is not None:
                self._conn.pause()
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > PAUSE_BYTES and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._cancel_timer()
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._complete or self._error is not None:
            return
        self._error = exc
        self._cancel_timer()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        piped = self._piped
        if piped is not None and not piped.done():
            if self._error is not None:
                piped.set_exception(self._error)
            elif self._complete:
                piped.set_result(None)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- called by the user -------------------------------------------------------------------------------

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    async def wait_head(self) -> None:
        while not self._head_seen:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def next_chunk(self) -> bytes:
        """The body bytes received since the last call, waiting for some; ``b""`` at the end."""
        while True:
            if self._chunks:
                data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
                if len(self._chunks) > 1:
                    self._chunks.clear()
                if self._buffered > PAUSE_BYTES and self._conn is not None:
                    self._conn.resume()
                self._buffered = 0
                return data
            if self._error is not None:
                raise self._error
            if self._complete:
                self.release()
                return b""
            await self._wait()

    async def pipe(self, sink: Callable[[bytes], bool]) -> None:
        """Hand every body chunk to ``sink`` as it arrives, inside the socket callback: no task switch or
        future per chunk. ``sink`` returns False when its consumer is full; reading then pauses until
        ``resume_reading``. Returns at the end of the body; raises what ended it early."""
        while self._chunks:
            if not sink(self._chunks.popleft()) and self._conn is not None:
                self._conn.pause()
        self._buffered = 0
        self._sink = sink
        if self._error is None and not self._complete:
            self._piped = self._loop.create_future()
            await self._piped
        if self._error is not None:
            raise self._error
        self.release()

    def resume_reading(self) -> None:
        if self._conn is not None:
            self._conn.resume()

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.next_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Give the connection back: to the pool after a complete body, else close it (the upstream stops)."""
        self._cancel_timer()
        if self.slot is not None:
            self.slot.release()
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._complete and self._error is None:
            conn.done()
        else:
            if self._error is None:
                self._error = Disconnected("response closed before its end")
            conn.abort()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self, pool: Pool, origin: Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self.reusable = True
        self.idle_since = 0.0
        self.used = 0
        self._resp: Response | None = None
        self._head = bytearray()
        self._in_head = True
        self._mode = ""  # "length" | "chunked" | "eof" | "none"
        self._left = 0
        self._chunks = ChunkedDecoder()

    # -- asyncio.Protocol ---------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport, though uvloop's do not subclass asyncio.Transport (they register nothing either)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        resp = self._resp
        if resp is None:
            self.abort()  # bytes nobody asked for: the connection's state is unknown
            return
        resp._got_bytes = True
        try:
            if self._in_head:
                data = self._parse_head(data, resp)
                if self._in_head or (not data and self._mode not in ("none", "length")):
                    return
            self._parse_body(data, resp)
        except ProtocolViolation as exc:
            resp._fail(exc)

    def eof_received(self) -> bool:
        resp = self._resp
        if resp is not None and not self._in_head and self._mode == "eof":
            self.reusable = False
            self._end(resp)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        resp = self._resp
        if resp is not None and not resp._complete:
            resp._fail(Disconnected(f"the upstream closed the connection{f' ({exc})' if exc else ''}"))
        self._resp = None

    # -- exchange -----------------------------------------------------------------------------------------

    def send(self, head: bytes, body: bytes | None, first_byte: float, idle: float) -> Response:
        assert self.transport is not None
        self._in_head, self._head, self._mode, self._left = True, bytearray(), "", 0
        self._chunks = ChunkedDecoder()
        resp = self._resp = Response(self, first_byte, idle)
        length = len(body) if body else 0
        self.transport.write(head + b"Content-Length: %d\r\n\r\n" % length + (body or b""))
        self.used += 1
        return resp

    def _parse_head(self, data: bytes, resp: Response) -> bytes:
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > MAX_HEAD_BYTES:
                raise ProtocolViolation("response headers too large")
            return b""
        raw, rest = bytes(self._head[:end]), bytes(self._head[end + 4:])
        try:
            first, headers = parse_head(raw)
        except WireError as exc:
            raise ProtocolViolation(str(exc)) from None
        parts = first.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolViolation(f"not an HTTP/1.x status line: {first[:80]!r}")
        status = int(parts[1])
        if 100 <= status < 200:  # informational: the real head follows
            self._head = bytearray()
            return self._parse_head(rest, resp) if rest else b""
        self._in_head = False
        self._head = bytearray()
        if headers.get("connection", "").lower() == "close" or parts[0] == "HTTP/1.0":
            self.reusable = False
        if status in (204, 304):
            self._mode = "none"
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._mode = "chunked"
        elif "content-length" in headers:
            try:
                self._left = int(headers["content-length"])
            except ValueError:
                raise ProtocolViolation("bad Content-Length") from None
            self._mode = "length"
        else:
            self._mode = "eof"
            self.reusable = False
        resp._head(status, headers)
        return rest

    def _parse_body(self, data: bytes, resp: Response) -> None:
        mode = self._mode
        if mode == "chunked":
            self._parse_chunked(data, resp)
        elif mode == "length":
            if data:
                take = data if len(data) <= self._left else data[:self._left]
                self._left -= len(take)
                resp._data(take)
            if self._left == 0:
                self._end(resp)
        elif mode == "eof":
            if data:
                resp._data(data)
        else:  # "none"
            self._end(resp)

    def _parse_chunked(self, data: bytes, resp: Response) -> None:
        try:
            payload, _ = self._chunks.feed(data)  # bytes after the end: nothing was asked, so nothing to keep
        except WireError as exc:
            raise ProtocolViolation(str(exc)) from None
        if payload:
            resp._data(payload)
        if self._chunks.done:
            self._end(resp)

    def _end(self, resp: Response) -> None:
        self._resp = None
        resp._finish()

    # -- pool side ----------------------------------------------------------------------------------------

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def done(self) -> None:
        """The exchange finished cleanly: back to the pool, or closed if it cannot be reused."""
        self.resume()
        self._resp = None
        if self.reusable and not self.closed:
            self.pool._put_back(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        self.reusable = False
        self._resp = None
        self.pool._active.discard(self)
        if self.transport is not None:
            self.transport.abort()


class _Slot:
    """Permission to run one exchange under the pool's limits; released exactly once."""

    __slots__ = ("_sems",)

    def __init__(self, sems: tuple[asyncio.Semaphore, ...]) -> None:
        self._sems = sems

    def release(self) -> None:
        sems, self._sems = self._sems, ()
        for sem in sems:
            sem.release()


class Pool:
    """Keep-alive connections per origin, with a limit in all and per host."""

    def __init__(self, *, limit: int, limit_per_host: int, connect_timeout: float,
                 keepalive: float = 60.0) -> None:
        self._limit = asyncio.Semaphore(limit) if limit else None
        self._limit_per_host = limit_per_host
        self._per_host: dict[Origin, asyncio.Semaphore] = {}
        self._idle: dict[Origin, list[_Connection]] = {}
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self._ssl: ssl.SSLContext | None = None
        self._active: set[_Connection] = set()
        self.opened = 0

    async def request(self, method: str, url: Url, head_lines: bytes, body: bytes | None, *, first_byte: float,
                      idle: float) -> Response:
        """Send a request and wait for the response head; the body is read from the returned Response.

        ``head_lines`` are the extra header lines (each ending in CRLF); Host and Content-Length are added.
        A request on a reused connection that the upstream had closed meanwhile is sent once more on a new
        one, since the upstream never saw it.
        """
        origin = url.origin
        slot = await self._acquire(origin)
        head = f"{method} {url.target} HTTP/1.1\r\nHost: {url.host_header}\r\n".encode("latin-1") + head_lines
        try:
            for attempt in range(2):
                conn, reused = await self._connection(origin)
                self._active.add(conn)
                resp = conn.send(head, body, first_byte, idle)
                try:
                    await resp.wait_head()
                except Disconnected:
                    if reused and not resp._got_bytes and attempt == 0:
                        continue  # the slot stays with the retry: the failed response never owned it
                    raise
                except BaseException:
                    resp.release()
                    raise
                resp.slot = slot
                return resp
            raise AssertionError("unreachable")
        except BaseException:
            slot.release()
            raise

    async def _acquire(self, origin: Origin) -> _Slot:
        sem = self._per_host.get(origin)
        if sem is None:
            sem = self._per_host[origin] = asyncio.Semaphore(self._limit_per_host)
        await sem.acquire()
        if self._limit is None:
            return _Slot((sem,))
        try:
            await self._limit.acquire()
        except BaseException:
            sem.release()
            raise
        return _Slot((sem, self._limit))

    async def _connection(self, origin: Origin) -> tuple[_Connection, bool]:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive:
                return conn, True
            conn.abort()
        loop = asyncio.get_running_loop()
        if origin.tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _Connection(self, origin), origin.host, origin.port,
                    ssl=self._ssl if origin.tls else None)
        except TimeoutError:
            raise ConnectFailed(f"connect timed out after {self._connect_timeout:g} s") from None
        except OSError as exc:
            raise ConnectFailed(exc.strerror or str(exc)) from None
        self.opened += 1
        return proto, False

    def _put_back(self, conn: _Connection) -> None:
        self._active.discard(conn)
        conn.idle_since = time.monotonic()
        bucket = self._idle.setdefault(conn.origin, [])
        if len(bucket) < self._limit_per_host:
            bucket.append(conn)
        else:
            conn.abort()

    def close(self) -> None:
        for bucket in self._idle.values():
            for conn in bucket:
                conn.closed = True
                if conn.transport is not None:
                    conn.transport.abort()
        self._idle.clear()
        for conn in list(self._active):
            resp = conn._resp
            if resp is not None:
                resp._fail(Disconnected("the gateway is shutting down"))
        self._active.clear()
