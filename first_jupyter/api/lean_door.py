"""The lean door: the route table (``api.route_table``) on the gateway's own HTTP server, for programs.

Served on loopback, for holders of the key, where kernels reach it through ``FIRST_GATEWAY_URL``; it costs a third
of the CPU per request of Jupyter's door, which serves the same routes.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote

from first_jupyter.api.door_kit import (
    FILE_CHUNK,
    JSON,
    JSONL,
    HostVerdicts,
    body_limit,
    config_error,
    internal_error,
    is_loopback_host,
    key_matches,
    stream_headers,
    target_headers,
    too_large,
)
from first_jupyter.api.route_table import Answer, Bare, Call, Matcher, Spool, body_sink
from first_jupyter.api_types import ApiObject, json_body
from first_jupyter.batch.batches import Batches
from first_jupyter.gateway.answers import Completed, Relayed
from first_jupyter.gateway.core import Gateway
from first_jupyter.lasting_key import LastingKey
from first_jupyter.protocol import OpenAIError
from first_jupyter.transport.http_server import BodySink, BodyTooLarge, Exchange, HTTPRefusal, Request


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _OwnServer:
    """The lean door's side of a route: one user, the gateway's own batches, signing in served."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    def caller(self) -> None:
        """One user: no caller, so none is entered for its routes (``gateway.caller``)."""
        return None

    def usage_user(self) -> None:
        return None

    def batches(self) -> Batches:
        return self._gateway.batches

    def check_default_change(self) -> None:
        """The server's own user may."""

    async def whoami(self) -> None:
        return None

    def signs_in(self) -> bool:
        return True


class GatewayApp:
    """The gateway's routes on its own server, for holders of the key, asked for by a loopback name."""

    def __init__(self, gateway: Gateway | None, *, key: str, max_request_bytes: int = 0,
                 config_error_text: str | None = None, on_activity: Callable[[], None] | None = None,
                 log: logging.Logger | None = None, lasting: LastingKey | None = None) -> None:
        self.gateway = gateway
        self.key = key.encode()
        self.lasting = lasting
        """The lasting key, when the server keeps one: it opens what ``key`` opens."""
        self.limit = body_limit(max_request_bytes, gateway)
        self.config_error_text = config_error_text
        self.on_activity = on_activity
        self.log = log or logging.getLogger(__name__)
        self.routes = Matcher()
        self._door = _OwnServer(gateway) if gateway is not None else None
        self._hosts = HostVerdicts()

    # -- HttpApp ----------------------------------------------------------------------------------------------

    def max_body(self) -> int:
        return self.limit

    def body_sink(self, method: str, path: str, headers: dict[str, str]) -> BodySink | None:
        """An uploaded file or an audio form goes to disk as it arrives; only for a holder of the key (others get no
        sink, so their body is held to the usual limit and refused)."""
        if self.gateway is None or not key_matches(headers.get, self.key, self.lasting) or \
                not self._hosts.allowed(headers.get("host", ""), is_loopback_host):
            return None
        try:
            route, _ = self.routes.match(method, path)
        except OpenAIError:
            return None
        return body_sink(route, self.gateway, self._door.batches, headers.get("content-type")) \
            if self._door is not None else None

    def refusal(self, refusal: HTTPRefusal) -> bytes:
        write = self.routes.error_body(refusal.path)
        if isinstance(refusal, BodyTooLarge):  # an upload's limit is the file's, with its own setting
            sink = cast(Spool | None, refusal.sink)  # (every sink here is one of the route table's)
            return write(sink.too_large() if sink is not None else too_large(refusal.size, refusal.limit))
        return write(internal_error(refusal.message) if refusal.status >= 500 else OpenAIError(refusal.status,
                                                                                                refusal.message))

    async def __call__(self, request: Request, exchange: Exchange) -> None:
        try:
            await self._answer(request, exchange)
        except OpenAIError as err:
            log = self.log.error if err.status >= 500 else self.log.warning
            log("%s %s -> %s %s", request.method, request.path, err.status, err.code or err.type)
            exchange.respond(err.status, {"Content-Type": JSON, **err.headers},
                             self.routes.error_body(request.path)(err))

    # -- routes -----------------------------------------------------------------------------------------------

    async def _answer(self, request: Request, exchange: Exchange) -> None:
        self._check_host(request)
        authenticated = key_matches(request.headers.get, self.key, self.lasting)
        try:
            route, params = self.routes.match(request.method, request.path)
        except OpenAIError:
            if not authenticated:  # what is served is not told to strangers
                raise self._not_authenticated() from None
            raise
        if not route.open and not authenticated:
            raise self._not_authenticated()
        if self.on_activity is not None and not route.open:
            self.on_activity()
        if self.gateway is None or self._door is None:
            raise config_error(self.config_error_text)
        call = Call(self.gateway, self._door, tuple(unquote(p) for p in params), request.query, request.body,
                    cast(Spool | None, request.upload), self.limit, request.headers.get)
        await self._send(await route.answer(call), exchange)

    @staticmethod
    def _not_authenticated() -> OpenAIError:
        return OpenAIError(401, "Not authenticated. Send 'Authorization: Bearer $FIRST_API_KEY' or 'x-api-key: "
                                "$FIRST_API_KEY' (set in kernels the Jupyter server starts; also in the gateway's "
                                "runtime file).",
                           type="authentication_error", code="invalid_api_key")

    async def _send(self, answer: Answer, exchange: Exchange) -> None:
        if isinstance(answer, Completed):
            exchange.respond(200, {"Content-Type": answer.content_type, **target_headers(answer.target)}, answer.body)
        elif isinstance(answer, Relayed):
            await self._relay(answer, exchange)
        elif isinstance(answer, Path):
            await self._send_file(answer, exchange)
        elif isinstance(answer, Bare):
            exchange.respond(answer.status, {"Content-Type": JSON}, b"")
        else:
            self._json(exchange, answer)

    def _check_host(self, request: Request) -> None:
        """DNS-rebinding guard: a page that rebinds its own name to 127.0.0.1 still sends that name as Host."""
        host = request.headers.get("host", "")
        if not self._hosts.allowed(host, is_loopback_host):
            raise OpenAIError(403, f"Requests for host '{host}' are refused: this server only answers on "
                                   "loopback. Use 127.0.0.1 or localhost.", type="permission_error",
                              code="host_not_allowed")

    @staticmethod
    def _json(exchange: Exchange, payload: ApiObject | dict[str, Any] | list[Any]) -> None:
        exchange.respond(200, {"Content-Type": JSON}, json_body(payload))

    @staticmethod
    async def _send_file(path: Path, exchange: Exchange) -> None:
        """A file's contents in chunks, as fast as the client takes them (a 200 MB output never sits in memory)."""
        with path.open("rb") as f:
            chunk = f.read(FILE_CHUNK)
            if not chunk:
                exchange.respond(200, {"Content-Type": JSONL}, b"")
                return
            ready = exchange.start_stream(200, {"Content-Type": JSONL}, chunk)
            loop = asyncio.get_running_loop()
            try:
                while chunk := f.read(FILE_CHUNK):
                    if not ready:
                        drained: asyncio.Future[None] = loop.create_future()
                        exchange.on_drain(functools.partial(_wake, drained))
                        await drained
                    ready = exchange.send(chunk)
            finally:
                exchange.on_drain(None)
        exchange.end_stream()

    @staticmethod
    async def _relay(stream: Relayed, exchange: Exchange) -> None:
        """Push the stream into the connection; the transport's flow control pauses the upstream when needed."""
        headers = stream_headers(stream.target)
        started = False

        def write(chunk: bytes) -> bool:
            nonlocal started
            if started:
                return exchange.send(chunk)
            started = True
            return exchange.start_stream(200, headers, chunk)

        exchange.on_drain(stream.resume)
        gone = False
        try:
            await stream.relay(write)
        except asyncio.CancelledError:
            gone = True
            raise
        finally:
            stream.close(client_gone=gone or exchange.client_gone)
            exchange.on_drain(None)
        if started:
            exchange.end_stream()
        else:  # the engine sent nothing at all: still a complete, empty answer
            exchange.respond(200, headers, b"")
