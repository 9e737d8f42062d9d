"""The tornado door: the route table (``api.route_table``) as tornado handlers, thin shells over ``api.door_kit``.

Every route is written once here, as ``TableRoute`` (and ``OpenTableRoute`` for the callback route, which checks its
own signatures), on ``GatewayDoor``, whose hooks each door fills: who the caller is, how they authenticate, whose
usage and batches they see. A door declares its three handler classes on its own base and ``door_routes`` maps the
table's paths to them: Jupyter's (``server_ext.handlers``, Jupyter's auth and authorizer) and the shared gateway's
(``serve.door``, Globus bearer tokens, groups, quotas).

The gateway runs on its own loop in a Jupyter server (``transport.loop_thread``) and on tornado's in ``first serve``
(``SameLoop``); the handlers hand it the work either way.

Every route takes its body as a stream (``GatewayDoor``), so that the caller is known from the head before a body
byte is read: a refused request costs the server its head only, whatever length it announces.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from asyncio import Future
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from jupyter_server.auth.decorator import allow_unauthenticated
from tornado import web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, StreamClosedError

from first_jupyter.api import door_kit
from first_jupyter.api.route_table import (
    Bare,
    Call,
    ErrorBody,
    Route,
    Spool,
    Whole,
    body_sink,
    method_not_allowed,
    paths,
)
from first_jupyter.api_types import ApiObject, SignIn, json_body
from first_jupyter.batch.batches import Batches
from first_jupyter.gateway.answers import Completed, Relayed
from first_jupyter.gateway.caller import acting_as
from first_jupyter.gateway.core import Gateway
from first_jupyter.protocol import OpenAIError
from first_jupyter.transport.loop_thread import LoopThread

if TYPE_CHECKING:
    from first_jupyter.serve.policy import SharedCaller

UNBOUNDED_BODY = 1 << 62
"""Tornado's own bound on a body, lifted: the door counts the bytes itself, and refuses the byte that crosses its
route's limit with a 413 in the OpenAI shape (tornado's answer is a bare 400, or a stray one after a refusal)."""
DRAIN_BYTES = 1024 * 1024
"""A refused request's body up to this size is read and dropped before the answer; a larger one is refused from
the head and its connection closed. Most clients send the whole request before they read, and a connection closed
on bytes it never read is reset, which loses the answer to some (asyncio's transports drop what they received when
a write fails)."""

T = TypeVar("T")


class SameLoop:
    """Where the gateway runs when it runs on tornado's own loop (``first serve``: nothing else shares the
    process): ``call`` just awaits, where a ``LoopThread`` would hand the coroutine to its own loop."""

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return await coro


@web.stream_request_body
class GatewayDoor(web.RequestHandler):
    """What every door's handlers share: the gateway, the loop it runs on, the body within its limit, JSON,
    OpenAI-shaped errors; and the hooks where doors differ (who the caller is, whose usage and batches, who may
    change the default model).

    ``prepare`` runs on the request's head alone (the body is streamed): it authenticates, then sets the route's
    limit. The route's method runs once the whole body is in, as ``body`` (or in the upload's file).
    """

    open_route = False
    """Answered without the door's authentication (the callback route checks its own signatures)."""

    _body_unread = True
    """Until ``prepare`` admits the request, and again once it is refused while its body arrives: tornado then
    closes the connection after the answer rather than read the rest, and the answer says so (``Connection:
    close``), so that a client's next request goes on a new connection instead of failing on this one."""
    _refusal: OpenAIError | web.HTTPError | None = None
    """A refusal waiting for the small body it drops (``DRAIN_BYTES``)."""
    _upload: Spool | None = None
    _limit = 0
    _received = 0
    _chunks: list[bytes]
    content_type = door_kit.JSON
    """The answer's type (``answer_as``): JSON but for a transcript as text or subtitles, or a file as JSONL."""

    async def prepare(self) -> None:
        """From the head alone, admit the request (``_admit``) or refuse it: at once, or once a small announced
        body has been read and dropped (``DRAIN_BYTES``)."""
        self.request.connection.set_max_body_size(UNBOUNDED_BODY)  # type: ignore[union-attr]  # never None while handled
        try:
            await self._admit()
        except (OpenAIError, web.HTTPError) as refusal:
            declared = self._declared_length()
            if declared is None or not 0 < declared <= DRAIN_BYTES or \
                    self.request.headers.get("Expect", "").lower() == "100-continue":  # it waits to be told to send
                raise
            self._refusal = refusal

    async def _admit(self) -> None:
        """Who sent it, then what its route takes: the body's limit, and where the body goes."""
        await self.authenticate()
        if not self.open_route:
            if not self.current_user:
                raise web.HTTPError(403)  # each door's error_for says why, and how to authenticate
            await self.authorize()
        self._upload = self.upload_sink()
        self._limit = self._upload.limit if self._upload is not None else door_kit.body_limit(
            self.settings["first_max_request_bytes"], self.settings.get("first_gateway"))
        declared = self._declared_length()
        if declared is not None and declared > self._limit:
            raise self.too_large(declared)
        self._chunks = []
        self._body_unread = False

    def _declared_length(self) -> int | None:
        declared = self.request.headers.get("Content-Length", "")
        return int(declared) if declared.isascii() and declared.isdigit() else None

    def data_received(self, chunk: bytes) -> None:
        self._received += len(chunk)
        if self._refusal is not None:
            if self._received >= (self._declared_length() or 0):
                self._refuse(self._refusal)  # all of it dropped: the client, done sending, reads the answer
        elif self._received > self._limit:  # a chunked body, which announces no length
            self.discard_upload()
            self._refuse(self.too_large(self._received))
        elif self._upload is not None:
            self._upload.feed(chunk)
        else:
            self._chunks.append(chunk)

    def _refuse(self, refusal: OpenAIError | web.HTTPError) -> None:
        """Answer ``refusal`` while the body is being read, as tornado answers one raised by a handler."""
        self._body_unread = True
        self.log_exception(type(refusal), refusal, refusal.__traceback__)
        status = refusal.status if isinstance(refusal, OpenAIError) else refusal.status_code
        self.send_error(status, exc_info=(type(refusal), refusal, refusal.__traceback__))

    @property
    def body(self) -> bytes:
        return b"".join(self._chunks)

    def too_large(self, size: int) -> OpenAIError:
        return self._upload.too_large() if self._upload is not None else door_kit.too_large(size, self._limit)

    def discard_upload(self) -> None:
        if self._upload is not None:
            self._upload.discard()

    def on_connection_close(self) -> None:
        self.discard_upload()
        super().on_connection_close()  # ends the wait for a body that will not come

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway | None = self.settings.get("first_gateway")
        if gateway is None:
            raise door_kit.config_error(self.settings.get("first_config_error"))
        return gateway

    @property
    def loop_thread(self) -> LoopThread | SameLoop:
        """Where the gateway runs: its coroutines are started there, never on Jupyter's loop (a standalone
        gateway runs on the server's own loop)."""
        thread: LoopThread | SameLoop = self.settings["first_loop"]
        return thread

    def answer_as(self, content_type: str) -> None:
        self.content_type = content_type
        self.set_header("Content-Type", content_type)

    def write_json(self, payload: ApiObject | dict[str, Any] | list[Any]) -> None:
        self.set_header("Content-Type", door_kit.JSON)
        self.finish(json_body(payload))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """An OpenAIError is an answer, not a crash: no traceback in the server log."""
        if isinstance(value, OpenAIError):
            logging.getLogger("first_jupyter").info("%s %s -> %s %s", self.request.method, self.request.path,
                                                    value.status, value.code)
            return
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error in the OpenAI shape, those raised by the server's machinery (auth, unknown methods) too."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(exc, OpenAIError):
            reason = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else None
            exc = self.error_for(status_code, reason)
        self.send_error_body(exc, closing=self._body_unread)

    def error_for(self, status_code: int, reason: str | None) -> OpenAIError:
        """The OpenAI error for a status the server's machinery set (``reason``: its message, if any)."""
        if status_code == 405:
            return OpenAIError(405, f"{self.request.method} is not allowed on {self.request.path}.",
                               code="method_not_allowed")
        if status_code >= 500:
            return door_kit.internal_error(reason)
        return OpenAIError(status_code, reason or f"The request failed ({status_code}).")

    def send_error_body(self, err: OpenAIError, *, closing: bool = False) -> None:
        """``closing``: the body is not read, so tornado will close the connection after this answer."""
        self.clear()
        self.set_status(err.status)
        for name, value in err.headers.items():
            self.set_header(name, value)
        if closing:
            self.set_header("Connection", "close")
        self.set_header("Content-Type", door_kit.JSON)
        self.finish(self.error_body()(err))

    def error_body(self) -> ErrorBody:
        """How this request's errors are written: its route's way (``Route.error_body``)."""
        return OpenAIError.to_bytes

    # -- where doors differ ---------------------------------------------------------------------------------

    async def authenticate(self) -> None:
        """Who sent the request, from its head alone: sets ``current_user``, or raises the door's refusal."""
        raise NotImplementedError

    async def authorize(self) -> None:
        """Whether the authenticated caller may make this request, from its head alone (before any body byte is
        read): raises the door's refusal if not. Here every caller the door admits may: the shared gateway's
        policy (groups, quotas, operators) decides per route once the request runs."""

    def upload_sink(self) -> Spool | None:
        """Where this request's body goes instead of memory (an uploaded file or an audio form, to disk); None to
        collect it."""
        return None

    def caller(self) -> SharedCaller | None:
        """The request's sender, when the door serves many (the shared gateway); None in a user's own server."""
        return None

    def usage_user(self) -> str | None:
        """Whose usage to answer with: None for all (a user's own server holds only theirs)."""
        return None

    def batches(self) -> Batches:
        return self.gateway.batches

    def check_default_change(self) -> None:
        """Refuse (403) a caller who may not change the default model, which every client of the gateway uses."""

    async def whoami(self) -> SignIn | None:
        """Who is signed in, where the door knows it itself; None: the gateway's Globus sign-in says."""
        return None

    def signs_in(self) -> bool:
        """Whether the sign-in routes are served (a user's own server signs in to Globus for its user)."""
        return True


class TableRoute(GatewayDoor):
    """One path of the route table (``api.route_table``), every method it takes, on this door.

    The route's function runs on the gateway's loop (``answer_across``); a stream's chunks come back through a
    ``ClientRelay``. Cancelling this handler's task (the client left) cancels the request there.
    """

    routes: Mapping[str, Route]
    _route: Route | None = None
    _task: asyncio.Task[Any] | None = None
    _gone = False
    abandoned = False
    """The client left before its request began: it was not begun (tornado's own flag says only when a request
    that has begun is finished)."""

    def initialize(self, routes: Mapping[str, Route]) -> None:
        self.routes = routes

    def error_body(self) -> ErrorBody:
        return next(iter(self.routes.values())).error_body  # (one path: its methods' errors are alike)

    def route(self) -> Route:
        """The request's route; a 405 naming the path's methods (asked once the caller is known)."""
        if self._route is None:
            method = self.request.method or ""
            route = self.routes.get(method)
            if route is None:
                raise method_not_allowed(method, self.request.path, self.routes)
            self._route = route
        return self._route

    def upload_sink(self) -> Spool | None:
        return body_sink(self.route(), self.gateway, self.batches, self.request.headers.get("Content-Type"))

    def on_connection_close(self) -> None:
        """The client went away: cancel at once so the upstream request is closed and the engine stops. It may
        leave before the request began (while ``prepare`` authenticated it): then the request never begins."""
        self._gone = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        super().on_connection_close()

    def client_left(self) -> bool:
        """Whether the client has closed its side. Tornado notices only while it reads, and not at all while
        ``prepare`` runs with the body already in its buffer (a client that sent it all, then left while it was
        signed in); so the socket is asked directly: an end of stream, with nothing unread, is a client gone."""
        stream = self.request.connection.stream  # type: ignore[union-attr]  # never None while handled
        if stream.closed():
            return True
        if type(stream) is not IOStream or stream.socket is None:  # TLS: no peeking under the record layer
            return False
        try:
            return stream.socket.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    async def _serve(self, *params: str) -> None:
        if self._gone or self.client_left():
            self.abandoned = True
            return
        self._task = asyncio.current_task()
        route, caller = self.route(), self.caller()
        call = Call(self.gateway, self, params, self.request.query, self.body, self._upload, self._limit,
                    self.request.headers.get)
        client = ClientRelay(self, caller.headers if caller is not None else {}) if route.streams else None
        try:
            answer = await self.loop_thread.call(answer_across(route, call, client))
        except asyncio.CancelledError:
            return  # the client left; the gateway's side has closed the upstream and recorded it
        finally:
            self._task = None  # the task's context holds this handler (Jupyter's CallContext): a cycle, and the
            # handler with its body would outlive the request until a full collection
        if answer is None:  # a stream, relayed
            assert client is not None
            if not client.gone:
                client.start_if_silent()
                self.finish()
        elif isinstance(answer, Completed):
            for name, value in {**door_kit.target_headers(answer.target), **(caller.headers if caller else {})}.items():
                self.set_header(name, value)
            self.answer_as(answer.content_type)
            self.finish(answer.body)
        elif isinstance(answer, Path):
            await self._send_file(answer)
        elif isinstance(answer, Bare):
            self.set_status(answer.status)
            self.finish()
        else:
            self.write_json(answer)

    async def _send_file(self, path: Path) -> None:
        self.answer_as(door_kit.JSONL)
        with path.open("rb") as f:
            while chunk := f.read(door_kit.FILE_CHUNK):
                self.write(chunk)
                await self.flush()  # as fast as the client takes it
        self.finish()

    @web.authenticated
    async def get(self, *params: str) -> None:
        await self._serve(*params)

    post = put = delete = patch = get


class OpenTableRoute(TableRoute):
    """A path answered without the door's authentication: a node's callback batches, each signed with its task's
    own key (``gateway.backends.compute.callbacks``); a node has no Jupyter login."""

    open_route = True

    def check_xsrf_cookie(self) -> None:
        """Not a browser form: the signature is the check."""

    @allow_unauthenticated
    async def post(self, *params: str) -> None:
        await self._serve(*params)


async def answer_across(route: Route, call: Call, client: ClientRelay | None) -> Whole | None:
    """On the gateway's loop: answer the request as the door's caller (``Door.caller``); a stream is relayed into
    ``client`` here (None is returned), anything else is returned for the handler to send.

    The caller is entered here, inside the coroutine handed to the gateway's loop, not around the hand-over: a
    ``LoopThread`` runs it as a task of another thread's loop, which must not depend on what context that
    thread's call carried over. The stream never leaves this coroutine, so however it ends (done, upstream
    error, the handler cancelling it) it is closed and recorded here, on the loop it belongs to.
    """
    with acting_as(call.door.caller()):
        answer = await route.answer(call)
        if not isinstance(answer, Relayed):
            return answer
        assert client is not None  # only a route that streams answers with a stream
        client.open(door_kit.stream_headers(answer.target), answer.resume)
        gone = False
        try:
            await answer.relay(client.write)
        except asyncio.CancelledError:
            gone = True
            raise
        finally:
            answer.close(client_gone=gone or client.gone)
    return None


class ClientRelay:
    """One stream crossing from the gateway's loop to a handler's client on Jupyter's loop, with backpressure.

    ``open`` and ``write`` are called on the gateway's loop; each chunk is handed to Jupyter's loop and there
    goes straight to the socket when it takes it all, else to tornado's stream. Bytes not yet on the socket are
    in transit: above ``HIGH`` the gateway's ``write`` answers False, which pauses the upstream, and the
    upstream is resumed once the client has drained below ``LOW``. Tornado's own write path (two futures and a
    loop callback per chunk) is used only for the first chunk, which carries the headers.
    """

    HIGH = 256 * 1024
    LOW = 64 * 1024

    def __init__(self, handler: TableRoute, headers: dict[str, str]) -> None:
        """``headers``: the door's own for the answer (a shared gateway's caller's allowance)."""
        self._handler = handler
        self._door_headers = headers
        self._loop = asyncio.get_running_loop()
        connection = handler.request.connection
        assert isinstance(connection, HTTP1Connection)  # tornado's HTTP server; no other kind serves Jupyter
        self._connection = connection
        self._lock = threading.Lock()
        self._in_transit = 0
        self._paused = False
        self._resume: Callable[[], None] | None = None
        self._gateway_loop: asyncio.AbstractEventLoop | None = None
        self._headers: dict[str, str] = {}
        self._started = False
        self._socket_stream: IOStream | None = None  # set when chunks are framed here (HTTP/1.1 chunked)
        self._plain_socket = False
        self.gone = False

    # -- on the gateway's loop ----------------------------------------------------------------------------

    def open(self, headers: dict[str, str], resume: Callable[[], None]) -> None:
        self._headers = {**headers, **self._door_headers}
        self._resume = resume
        self._gateway_loop = asyncio.get_running_loop()

    def write(self, chunk: bytes) -> bool:
        with self._lock:
            self._in_transit += len(chunk)
            keep_going = self._in_transit < self.HIGH
            if not keep_going:
                self._paused = True
        self._loop.call_soon_threadsafe(self._arrive, chunk)
        return keep_going

    # -- on Jupyter's loop ----------------------------------------------------------------------------------

    def _arrive(self, chunk: bytes) -> None:
        if self.gone:
            return
        try:
            drained = self._send(chunk)
        except StreamClosedError:
            self._leave()
            return
        if drained is None:
            self._drained(len(chunk))
        else:
            drained.add_done_callback(lambda done: self._on_drained(done, len(chunk)))

    def _send(self, chunk: bytes) -> Future[None] | None:
        """Put ``chunk`` on the wire; the future of its draining when the socket could not take it all now."""
        if not self._started:
            drained = self._start(chunk)
        elif self._socket_stream is None:  # HTTP/1.0: the body is the raw bytes until the connection ends
            drained = self._connection.write(chunk)
        else:
            frame = b"%x\r\n%b\r\n" % (len(chunk), chunk)
            if self._plain_socket and not self._socket_stream.writing():  # nothing queued: send now
                sock = self._socket_stream.socket
                if sock is None:  # the client closed while this chunk crossed between the loops
                    raise StreamClosedError()
                try:
                    sent = sock.send(frame)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    raise StreamClosedError() from None
                if sent == len(frame):
                    return None
                frame = frame[sent:]
            drained = self._socket_stream.write(frame)
        if drained.done():
            drained.exception()  # retrieved, so a closed client logs nothing
            return None
        return drained

    def _start(self, chunk: bytes) -> Future[None]:
        """The status line and headers, with the first chunk, through tornado as the handler would send them."""
        self._started = True
        handler = self._handler
        for name, value in self._headers.items():
            handler.set_header(name, value)
        self._connection.stream.set_nodelay(True)  # each event goes out at once, not held back for an ACK
        handler.write(chunk)
        drained = handler.flush()
        if self._connection._chunking_output:
            self._socket_stream = self._connection.stream
            self._plain_socket = type(self._socket_stream) is IOStream  # not TLS: its send fails otherwise
        return drained

    def start_if_silent(self) -> None:
        """The engine sent nothing at all: the headers still go out, for a complete, empty answer."""
        if not self._started:
            self._started = True
            for name, value in self._headers.items():
                self._handler.set_header(name, value)

    def _on_drained(self, drained: Future[None], size: int) -> None:
        if not drained.cancelled():
            drained.exception()  # a closed client ends the request through the connection's close callback
        self._drained(size)

    def _drained(self, size: int) -> None:
        with self._lock:
            self._in_transit -= size
            wake = self._paused and self._in_transit <= self.LOW
            if wake:
                self._paused = False
        if wake and self._resume is not None and self._gateway_loop is not None:
            self._gateway_loop.call_soon_threadsafe(self._resume)

    def _leave(self) -> None:
        self.gone = True
        self._handler.on_connection_close()


class NotFoundRoute(GatewayDoor):
    """Unknown routes under /first answer in the OpenAI shape instead of the server's HTML 404."""

    @web.authenticated
    def get(self) -> None:
        raise door_kit.unknown_route(self.request.path)

    post = delete = put = patch = get


Routes = list[tuple[str, type[GatewayDoor], dict[str, Any]]]


def door_routes(table: type[TableRoute], open_table: type[OpenTableRoute], not_found: type[NotFoundRoute], *,
                everything_else: str = "/first(?:/.*)?") -> Routes:
    """The FIRST routes as a door's handlers, relative to the server's base URL: each path of the table answered by
    the door's ``table`` class (``open_table`` for a path with an open route, the callback). Paths matching
    ``everything_else`` and no route are answered 404 by the door's ``not_found`` too: under /first/ in Jupyter
    (the rest is Jupyter's), every path at the shared gateway (tornado's own 404 would read an unauthenticated body
    first)."""
    return [
        *((pattern + "/?", open_table if any(r.open for r in methods.values()) else table, {"routes": methods})
          for pattern, methods in paths().items()),
        (everything_else, not_found, {}),
    ]
