"""Jupyter's door to the gateway: tornado handlers under ``{base_url}/first/``, thin shells over ``gateway.api``.

Two ways in: Jupyter's own auth (cookie + XSRF from the browser, or a Jupyter token), and the scoped key the
extension gives the kernels it starts (``Authorization: Bearer $FIRST_API_KEY``), which opens these routes
and nothing else of the server. Kernels are pointed at the gateway's own lean server (``gateway.api``) rather
than here; this door answers the same routes alike for browsers, Jupyter tokens and anyone using this URL.
"""

from __future__ import annotations

import asyncio
from asyncio import Future
from collections.abc import Callable
from typing import Any

import orjson
from jupyter_server.auth.identity import User
from jupyter_server.base.handlers import APIHandler
from jupyter_server.prometheus.log_functions import prometheus_log_method
from tornado import web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, StreamClosedError

from first_jupyter.gateway import api
from first_jupyter.gateway.core import Completed, Gateway, GatewayStream
from first_jupyter.protocol import Capability, OpenAIError

SCOPED_USER = User(username="first-scoped-key", name="FIRST kernel key", display_name="FIRST kernel key")
_AUTH_HELP = ("Authenticate with 'Authorization: Bearer $FIRST_API_KEY' (set in kernels the Jupyter server "
              "starts) or with a Jupyter token ('Authorization: token ...').")


class FirstHandler(APIHandler):
    """Base for every FIRST route on Jupyter's door: scoped-key auth, OpenAI-shaped errors, the Gateway."""

    _scoped = False

    def check_host(self) -> bool:
        """Jupyter's DNS-rebinding guard, remembered per Host header: Jupyter parses it on every request."""
        hosts: api.HostVerdicts = self.settings["first_host_verdicts"]
        return hosts.allowed(self.request.host, self._jupyter_host_verdict)

    def _jupyter_host_verdict(self, _host: str) -> bool:
        return super().check_host()  # reads the same Host header from the request

    def _log(self) -> None:
        """Successful answers are accounted in the usage store; keep the metric, skip the access-log line."""
        if self.get_status() < 400:
            prometheus_log_method(self)
        else:
            super()._log()

    async def prepare(self) -> None:  # type: ignore[override]
        if api.bearer_key_matches(self.request.headers.get("Authorization"), self.settings["first_api_key"].encode()):
            if not self.check_host():
                raise OpenAIError(403, f"Requests for host '{self.request.host}' are refused (DNS-rebinding "
                                       "guard). Use 127.0.0.1 or localhost, or set "
                                       "ServerApp.allow_remote_access.", type="permission_error",
                                  code="host_not_allowed")
            self._scoped = True
            self.current_user = self._jupyter_current_user = SCOPED_USER
            return  # a bearer key is not a cookie: no XSRF check applies
        await super().prepare()

    def check_xsrf_cookie(self) -> None:
        if not self._scoped:
            super().check_xsrf_cookie()

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway | None = self.settings.get("first_gateway")
        if gateway is None:
            raise api.config_error(self.settings.get("first_config_error"))
        return gateway

    def write_json(self, payload: Any) -> None:
        self.set_header("Content-Type", api.JSON)
        self.finish(orjson.dumps(payload))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """An OpenAIError is an answer, not a crash: no traceback in the server log."""
        if isinstance(value, OpenAIError):
            self.log.info("%s %s -> %s %s", self.request.method, self.request.path, value.status, value.code)
            return
        super().log_exception(typ, value, tb)

    def send_error_body(self, err: OpenAIError) -> None:
        self.clear()
        self.set_status(err.status)
        for name, value in err.headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", api.JSON)
        self.finish(err.to_bytes())

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors raised by Jupyter's machinery (auth, XSRF, unknown methods) in the OpenAI shape too."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, OpenAIError):
            self.send_error_body(exc)
            return
        reason = exc.log_message if isinstance(exc, web.HTTPError) and exc.log_message else None
        if status_code == 403 and self.current_user is None:
            err = OpenAIError(401, f"Not authenticated. {_AUTH_HELP}", type="authentication_error",
                              code="invalid_api_key")
        elif status_code == 403:
            err = OpenAIError(403, f"Forbidden: {reason or 'cross-site request refused'}. Browser requests need "
                                   "the '_xsrf' cookie echoed in an 'X-XSRFToken' header; scripts should send "
                                   "a bearer key instead.", type="permission_error", code="forbidden")
        elif status_code == 405:
            err = OpenAIError(405, f"{self.request.method} is not allowed on {self.request.path}.",
                              code="method_not_allowed")
        elif status_code >= 500:
            err = api.internal_error(reason)
        else:
            err = OpenAIError(status_code, reason or f"The request failed ({status_code}).")
        self.send_error_body(err)


class ModelsHandler(FirstHandler):
    @web.authenticated
    def get(self) -> None:
        self.write_json(self.gateway.models())


class StatusHandler(FirstHandler):
    @web.authenticated
    async def get(self) -> None:
        self.write_json(await self.gateway.status())


class InferenceHandler(FirstHandler):
    """POST chat/completions, completions and embeddings: one handler, the capability set per route."""

    capability: Capability
    _task: asyncio.Task[Any] | None = None

    def initialize(self, capability: Capability) -> None:  # type: ignore[override]
        self.capability = capability

    def on_connection_close(self) -> None:
        """The client went away: cancel at once so the upstream request is closed and the engine stops."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    @web.authenticated
    async def post(self) -> None:
        self._task = asyncio.current_task()
        gateway = self.gateway
        limit = api.body_limit(self.settings["first_max_request_bytes"], gateway)
        try:
            outcome = await api.start(gateway, self.capability, self.request.body, limit)
        except asyncio.CancelledError:
            return  # the client left before anything was sent; nothing to clean up beyond the task
        if isinstance(outcome, Completed):
            for name, value in api.target_headers(outcome.target).items():
                self.set_header(name, value)
            self.set_header("Content-Type", api.JSON)
            self.finish(outcome.body)
            return
        for name, value in api.stream_headers(outcome.target).items():
            self.set_header(name, value)
        connection = self.request.connection
        assert isinstance(connection, HTTP1Connection)  # tornado's HTTP server; no other kind serves Jupyter

        def send_first(chunk: bytes) -> Future[None]:
            self.write(chunk)
            return self.flush()

        if not await relay(outcome, connection, send_first):
            self.finish()


async def relay(stream: GatewayStream, connection: HTTP1Connection,
                send_first: Callable[[bytes], Future[None]]) -> bool:
    """Relay ``stream`` to the client of ``connection``; True when the client left before the end.

    ``send_first`` sends the status line and headers with the first chunk, as the door's own machinery does it.
    Every later chunk is framed here and handed straight to the socket, or, when the socket refuses it, to
    tornado's stream, which also pauses the upstream until the client has drained (backpressure): tornado's
    own write path adds two futures and a loop callback per chunk, most of what relaying would cost.
    """
    started = False
    socket_stream: IOStream | None = None  # set when chunks are framed here (HTTP/1.1 chunked encoding)
    plain_socket = False

    def on_drained(drained: Future[None]) -> None:
        if not drained.cancelled():
            drained.exception()  # a closed client ends the relay through the connection's close callback
        stream.resume()

    def write(chunk: bytes) -> bool:
        nonlocal started, socket_stream, plain_socket
        if not started:
            started = True
            drained = send_first(chunk)
            if connection._chunking_output:  # else HTTP/1.0: the body is the raw bytes until the connection ends
                socket_stream = connection.stream
                plain_socket = type(socket_stream) is IOStream  # not TLS: its send has other failure modes
        elif socket_stream is None:
            drained = connection.write(chunk)
        else:
            frame = b"%x\r\n%b\r\n" % (len(chunk), chunk)
            if plain_socket and not socket_stream.writing():  # nothing queued: send now, queue the rest
                try:
                    sent = socket_stream.socket.send(frame)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    raise StreamClosedError() from None
                if sent == len(frame):
                    return True
                frame = frame[sent:]
            drained = socket_stream.write(frame)
        if drained.done():
            drained.exception()  # retrieved, so a closed client logs nothing
            return True
        drained.add_done_callback(on_drained)  # the client is slow: pause the upstream until drained
        return False

    gone = False
    try:
        connection.stream.set_nodelay(True)  # each event goes out at once, not held back waiting for an ACK
        await stream.relay(write)
    except (asyncio.CancelledError, StreamClosedError):
        gone = True
    finally:
        stream.close(client_gone=gone)
    return gone


class NotFoundHandler(FirstHandler):
    """Unknown routes under /first/v1 answer in the OpenAI shape instead of Jupyter's HTML 404."""

    @web.authenticated
    def get(self, path: str) -> None:
        raise OpenAIError(404, f"No route /first/v1/{path}. This gateway serves models, chat/completions, "
                               "completions and embeddings.", code="unknown_route")

    post = get


def routes() -> list[tuple[str, type[FirstHandler], dict[str, Any]]]:
    """URL patterns relative to the server's base_url (the ExtensionApp prefixes it)."""
    inference = [(f"/first/v1/{cap.route}", InferenceHandler, {"capability": cap}) for cap in Capability]
    return [
        ("/first/v1/models", ModelsHandler, {}),
        *inference,
        ("/first/api/status", StatusHandler, {}),
        ("/first/v1/(.*)", NotFoundHandler, {}),
    ]
