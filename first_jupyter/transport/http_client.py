"""A small pooled HTTP/1.1 client for upstream engines, built on asyncio protocols.

The gateway's budget is a fraction of a millisecond of CPU per proxied request and tens of microseconds per
relayed chunk. General-purpose clients spend more than that on machinery the gateway does not need (cookie
jars, redirects, tracing hooks, one task per request). This client does only what talking to OpenAI-compatible
engines takes: keep-alive connections pooled per host with sized limits, requests written in one call,
responses parsed incrementally by llhttp (httptools: HTTP's grammar kept by a well-tried parser, the framing,
``Content-Length``, chunked or read to EOF, included), body bytes handed on as they arrive, and timeouts that
are idle timeouts: one timer per response, re-armed only when it fires.

The field is not loopback: an origin may be reached through an HTTP forward proxy (a ``CONNECT`` tunnel for
https, absolute-form requests for http) and with TLS settings of its own; both are part of the pool's key.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, cast
from urllib.parse import quote, urlsplit

import httptools

from first_jupyter.transport import proxies
from first_jupyter.transport.heads import MAX_HEAD_BYTES, HeadCollector, HeadTooLarge
from first_jupyter.transport.proxies import Proxy
from first_jupyter.transport.tls import TlsSettings, client_context, describe_tls_failure, trust_snapshot

PAUSE_BYTES = 1024 * 1024  # stop reading the upstream while this much is waiting for a slow client
MAX_INTERIM = 16
"""Interim (1xx) responses taken before the final one; more is a broken or hostile upstream."""
STALE_WINDOW_S = 1.0
"""A reused connection that closes this soon after a request went out, with no byte back, had been closed by the
upstream before the request reached it: the request is sent again. Later, the upstream may have been working on
it (a proxy's idle timeout cutting a long generation), and sending it again could run it twice."""


class HTTPClientError(Exception):
    """The exchange failed below HTTP: connect, disconnect, malformed response."""


class ConnectFailed(HTTPClientError):
    pass


class ProxyFailed(ConnectFailed):
    """The proxy could not be reached, or refused the tunnel; the message names it (never its credentials)."""


class TlsFailed(ConnectFailed):
    """The TLS handshake (or the certificate check after it) failed; the message says which setting fixes it."""


class Disconnected(HTTPClientError):
    pass


class ProtocolViolation(HTTPClientError):
    pass


class ResponseTooLarge(HTTPClientError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the answer is over {limit:,} bytes")
        self.limit = limit


class FirstByteTimeout(TimeoutError):
    pass


class IdleTimeout(TimeoutError):
    pass


class StreamedBody(Protocol):
    """A request body sent from where it lies (a file on disk) instead of from memory: its length, known ahead so
    that it goes with ``Content-Length``, and its bytes in chunks, from the start at each call (a request sent again
    on a fresh connection sends its body again)."""

    @property
    def length(self) -> int: ...

    def chunks(self) -> Iterator[bytes]: ...


Body = bytes | StreamedBody | None


class Origin(NamedTuple):
    """Where to connect and how: the pool key (a tuple, so hashing it on every request is one C call).

    The proxy and the TLS context are part of it, so that endpoints with different settings never share a
    connection; contexts are shared per setting (``tls.client_context``), so equal settings do.
    """

    scheme: str
    host: str
    port: int
    proxy: Proxy | None = None
    ssl: ssl.SSLContext | None = None

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Url:
    """A parsed upstream URL with the request-line target and the fixed header lines precomputed."""

    origin: Origin
    target: str
    host_header: str
    text: str = field(compare=False)
    proxy_lines: bytes = field(default=b"", compare=False, repr=False)
    """``Proxy-Authorization``, on requests sent to a proxy in absolute form."""

    @classmethod
    def parse(cls, text: str, *, proxy: Proxy | None = None, context: ssl.SSLContext | None = None) -> Url:
        """``proxy`` None connects directly (the gateway's own loopback hops); ``context`` None, for https, is
        the environment's trust (``tls.client_context()``)."""
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {text!r}")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        hostname = parts.hostname if parts.hostname.isascii() else parts.hostname.encode("idna").decode("ascii")
        host = hostname if ":" not in hostname else f"[{hostname}]"
        host_header = host if port == default else f"{host}:{port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if not target.isascii():  # a request line is ASCII: what is not goes percent-encoded, as browsers send it
            target = quote(target, safe="!#$%&'()*+,/:;=?@[]~")
        tls = parts.scheme == "https"
        if tls and context is None:
            context = client_context()
        lines = b""
        if proxy is not None and not tls:  # plain http through a proxy: the whole URL goes in the request line
            target = f"http://{host_header}{target}"
            lines = proxy.header_lines()
        return cls(Origin(parts.scheme, hostname, port, proxy, context if tls else None), target,
                   host_header, text, lines)


@dataclass(frozen=True, slots=True)
class Reach:
    """How one endpoint is reached from here: its proxy setting and its TLS settings.

    ``proxy`` None means the environment decides (``HTTPS_PROXY``, ``NO_PROXY``...), ``"none"`` a direct
    connection; ``source`` names the setting in errors (``clusters.alcf.endpoints[0].proxy``).
    """

    proxy: str | None = None
    tls: TlsSettings = field(default_factory=TlsSettings)
    source: str = "proxy"
    environ: dict[str, str] = field(default_factory=lambda: {**proxies.snapshot(), **trust_snapshot()},
                                    compare=False, repr=False)
    """The proxy and trust variables as they were when the endpoint was set up."""

    def url(self, text: str) -> Url:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {text!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        proxy = proxies.choose(self.proxy, parts.scheme, parts.hostname, port, source=self.source,
                               environ=self.environ)
        context = client_context(self.tls, self.environ) if parts.scheme == "https" else None
        return Url.parse(text, proxy=proxy, context=context)


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
        accepted = True
        while self._chunks:
            accepted = sink(self._chunks.popleft())
            if not accepted and self._conn is not None:
                self._conn.pause()
        if accepted and self._buffered > PAUSE_BYTES and self._conn is not None:
            self._conn.resume()  # reading paused while nobody took the bytes; the sink took them all
        self._buffered = 0
        self._sink = sink
        try:
            if self._error is None and not self._complete:
                self._piped = self._loop.create_future()
                await self._piped
        finally:
            self._sink = None  # it holds its consumer (a stream that holds this response): no cycle after the end
        if self._error is not None:
            raise self._error
        self.release()

    def resume_reading(self) -> None:
        if self._conn is not None:
            self._conn.resume()

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; over ``limit`` bytes the exchange is ended (the connection closed) and
        ResponseTooLarge raised, so a huge answer costs at most the limit in memory."""
        parts = []
        size = 0
        while chunk := await self.next_chunk():
            size += len(chunk)
            if limit is not None and size > limit:
                self._fail(ResponseTooLarge(limit))
                self.release()
                raise ResponseTooLarge(limit)
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


class _Connection(HeadCollector, asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time. llhttp parses its responses."""

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
        self._parser: httptools.HttpResponseParser = httptools.HttpResponseParser(self)
        self._interim = 0
        self._in_interim = False
        self._to_eof = False
        """The response has neither length nor chunks: its body ends when the upstream closes."""
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        """Set while a streamed body waits for the transport to take what it holds."""

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
            self._parse(data)
        except ProtocolViolation as exc:
            self._broken(resp, exc)
        except HeadTooLarge:
            self._broken(resp, ProtocolViolation(f"response head over {MAX_HEAD_BYTES:,} bytes"))
        except httptools.HttpParserUpgrade:
            self._broken(resp, ProtocolViolation("the upstream switched protocols, which was not asked for"))
        except httptools.HttpParserError as exc:
            self._broken(resp, ProtocolViolation(f"malformed response: {exc}"))
        except Exception as exc:  # a consumer's fault surfacing here: the exchange ends, the loop never sees it
            self._broken(resp, ProtocolViolation(f"unreadable response ({type(exc).__name__}: {exc})"))

    def _broken(self, resp: Response, exc: ProtocolViolation) -> None:
        self.reusable = False  # even after a whole response: what followed it was not HTTP
        resp._fail(exc)

    def eof_received(self) -> bool:
        resp = self._resp
        if resp is not None and resp._head_seen and self._to_eof:
            self.reusable = False
            self._end(resp)
        return False

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake_drain()

    def _wake_drain(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake_drain()
        resp = self._resp
        if resp is not None and not resp._complete:
            if isinstance(exc, ssl.SSLError):  # TLS 1.3 reports a refused client certificate here, after the
                resp._fail(TlsFailed(describe_tls_failure(exc, self.origin.host)))  # handshake
            else:
                why = f"the upstream closed the connection{f' ({exc})' if exc else ''}"
                if self.origin.tls and self.used == 1 and not resp._got_bytes:
                    why += ("; a TLS upstream that hangs up on a new connection before answering may demand a "
                            "client certificate (mutual TLS): set the endpoint's tls.client_cert and tls.client_key")
                resp._fail(Disconnected(why))
        self._resp = None

    # -- llhttp's callbacks -------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._resp is None:  # more bytes right behind a whole response
            raise ProtocolViolation("bytes after the end of the response")
        self._begin_head()

    def on_headers_complete(self) -> None:
        self._end_head()
        resp = self._resp
        if resp is None:
            raise ProtocolViolation("a response that nothing asked for")
        status = self._parser.get_status_code()
        self._in_interim = 100 <= status < 200
        if self._in_interim:  # informational: the real head follows
            self._interim += 1
            if self._interim > MAX_INTERIM:
                raise ProtocolViolation(f"more than {MAX_INTERIM} interim (1xx) responses")
            return
        headers = self.headers
        if not self._parser.should_keep_alive():
            self.reusable = False
        self._to_eof = (status not in (204, 304) and "content-length" not in headers
                        and "transfer-encoding" not in headers)
        resp._head(status, headers)

    def on_body(self, data: bytes) -> None:
        self._moved()
        resp = self._resp
        if data and resp is not None:
            resp._data(data)

    def on_message_complete(self) -> None:
        self._moved()
        if self._in_interim:
            self._in_interim = False
            return
        resp = self._resp
        if resp is not None:
            self._end(resp)

    # -- exchange -----------------------------------------------------------------------------------------

    def send(self, head: bytes, body: Body, first_byte: float, idle: float) -> Response:
        """Send the head, and the body when it is in memory (``send_body`` sends a streamed one)."""
        assert self.transport is not None
        self._interim, self._in_interim, self._to_eof = 0, False, False
        resp = self._resp = Response(self, first_byte, idle)
        if body is None or isinstance(body, bytes):
            length = len(body) if body else 0
            self.transport.write(head + b"Content-Length: %d\r\n\r\n" % length + (body or b""))
        else:
            self.transport.write(head + b"Content-Length: %d\r\n\r\n" % body.length)
        self.used += 1
        return resp

    async def send_body(self, resp: Response, body: StreamedBody) -> None:
        """A streamed body after its head, a chunk at a time as the transport takes it: what waits in memory is
        bounded by the transport's high-water mark, whatever the body's size. It stops early when the answer has
        begun (an upstream that refuses the body before reading it all); the connection is then not reused. The
        first-byte clock runs from the last byte sent, so a long upload is not taken for a silent upstream."""
        transport = self.transport
        assert transport is not None
        for chunk in body.chunks():
            if self.closed or resp._head_seen or resp._error is not None:
                self.reusable = False
                return
            transport.write(chunk)
            resp._sent = self.loop.time()
            if self._writing_paused:
                self._drain = self.loop.create_future()
                await self._drain

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


class _Tunnel(HeadCollector, asyncio.Protocol):
    """The CONNECT exchange with a proxy, before TLS starts inside the tunnel it opens."""

    def __init__(self, origin: Origin, proxy: Proxy) -> None:
        self._origin = origin
        self._proxy = proxy
        self._parser: httptools.HttpResponseParser = httptools.HttpResponseParser(self)
        self.established: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        authority = self._origin.authority
        cast(asyncio.Transport, transport).write(
            f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n".encode("latin-1")
            + self._proxy.header_lines() + b"\r\n")

    def data_received(self, data: bytes) -> None:
        if self.established.done():
            return
        try:
            self._parse(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade, HeadTooLarge) as exc:
            self._refused(f"answered CONNECT with something that is not a tunnel ({type(exc).__name__}: {exc})")

    def on_message_begin(self) -> None:
        self._begin_head()

    def on_headers_complete(self) -> None:
        self._end_head()
        status = self._parser.get_status_code()
        if 200 <= status < 300:
            if not self.established.done():
                self.established.set_result(None)
            return
        hint = {407: ": it wants credentials; put them in the proxy URL (http://user:password@host:port)",
                403: ": it does not allow this destination; ask the site which proxy to use, or list the host in "
                     "NO_PROXY (or set the endpoint's proxy: none) if it is reachable directly"}.get(status, "")
        self._refused(f"refused to tunnel to {self._origin.authority} (HTTP {status}){hint}")

    def _refused(self, why: str) -> None:
        if not self.established.done():
            self.established.set_exception(ProxyFailed(f"the proxy {self._proxy.display} {why}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._refused("closed the connection before the tunnel was open")


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
        self._active: set[_Connection] = set()
        self.opened = 0
        self.closed = False

    async def request(self, method: str, url: Url, head_lines: bytes, body: Body, *, first_byte: float,
                      idle: float) -> Response:
        """Send a request and wait for the response head; the body is read from the returned Response.

        ``head_lines`` are the extra header lines (each ending in CRLF); Host and Content-Length are added.
        A request on a reused connection that the upstream had closed meanwhile is sent once more on a new
        one, since the upstream never saw it (a proxy such as tinyproxy closes after each answer without saying
        so).
        """
        origin = url.origin
        head = (f"{method} {url.target} HTTP/1.1\r\nHost: {url.host_header}\r\n".encode("ascii") + url.proxy_lines
                + head_lines)
        if self.closed:
            raise Disconnected("the gateway is shutting down")
        slot = await self._acquire(origin)
        try:
            for attempt in range(2):
                conn, reused = await self._connection(origin, fresh=attempt > 0)
                self._active.add(conn)
                resp = conn.send(head, body, first_byte, idle)
                try:
                    if body is not None and not isinstance(body, bytes):
                        await conn.send_body(resp, body)
                    await resp.wait_head()
                except Disconnected:
                    if (reused and not resp._got_bytes and attempt == 0 and not self.closed
                            and resp._loop.time() - resp._sent < STALE_WINDOW_S):
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

    async def _connection(self, origin: Origin, *, fresh: bool = False) -> tuple[_Connection, bool]:
        """A pooled connection if one is idle (unless ``fresh``: a retry must not meet another stale one), else a
        new one."""
        idle = None if fresh else self._idle.get(origin)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive:
                return conn, True
            conn.abort()
        proxy = origin.proxy
        via = f" through the proxy {proxy.display}" if proxy is not None else ""
        try:
            async with asyncio.timeout(self._connect_timeout):
                conn = await self._open(origin)
        except TimeoutError:
            raise (ProxyFailed if proxy is not None else ConnectFailed)(
                f"connect timed out after {self._connect_timeout:g} s{via}") from None
        except ssl.SSLError as exc:
            raise TlsFailed(describe_tls_failure(exc, origin.host)) from None
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            if proxy is not None:
                raise ProxyFailed(f"cannot reach the proxy {proxy.display}: {why}") from None
            if origin.ssl is not None and isinstance(exc, (ConnectionResetError, ConnectionAbortedError,
                                                           BrokenPipeError)):
                raise TlsFailed(f"{origin.host} cut the TLS handshake ({why}); if it demands a client certificate, "
                                f"set the endpoint's tls.client_cert and tls.client_key") from None
            raise ConnectFailed(why) from None
        self.opened += 1
        return conn, False

    async def _open(self, origin: Origin) -> _Connection:
        """A new connection: direct, to the proxy (plain http), or through a CONNECT tunnel (https)."""
        loop = asyncio.get_running_loop()
        conn = _Connection(self, origin)
        proxy = origin.proxy
        if proxy is None:
            await loop.create_connection(lambda: conn, origin.host, origin.port, ssl=origin.ssl,
                                         server_hostname=origin.host if origin.ssl is not None else None)
            return conn
        if origin.ssl is None:
            await loop.create_connection(lambda: conn, proxy.host, proxy.port)
            return conn
        transport, tunnel = await loop.create_connection(lambda: _Tunnel(origin, proxy), proxy.host, proxy.port)
        try:
            await tunnel.established
        except BaseException:
            transport.abort()
            raise
        try:
            secured = await loop.start_tls(transport, conn, origin.ssl, server_hostname=origin.host)
        except ssl.SSLError:
            transport.abort()
            raise
        except OSError as exc:  # the proxy opened the tunnel: what failed is the origin's side of the handshake
            transport.abort()
            raise TlsFailed(f"{origin.host} cut the TLS handshake through the proxy {proxy.display} "
                            f"({exc.strerror or type(exc).__name__}); if it demands a client certificate, set the "
                            f"endpoint's tls.client_cert and tls.client_key") from None
        except BaseException:
            transport.abort()
            raise
        if secured is None:  # the transport closed during the handshake
            raise TlsFailed(f"the TLS handshake with {origin.host} through the proxy {proxy.display} was cut off")
        conn.connection_made(secured)  # start_tls hands the protocol its transport but does not call this
        return conn

    def _put_back(self, conn: _Connection) -> None:
        self._active.discard(conn)
        conn.idle_since = time.monotonic()
        bucket = self._idle.setdefault(conn.origin, [])
        if len(bucket) < self._limit_per_host:
            bucket.append(conn)
        else:
            conn.abort()

    def close(self) -> None:
        self.closed = True
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
