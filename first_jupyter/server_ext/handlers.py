"""Tornado handlers under ``{base_url}/first/``: thin shells that parse, call the Gateway, and write.

Two ways in: Jupyter's own auth (cookie + XSRF from the browser, or a Jupyter token), and the scoped key the
extension gives the kernels it starts (``Authorization: Bearer $FIRST_API_KEY``), which opens these routes
and nothing else of the server.
"""

from __future__ import annotations

import asyncio
import hmac
from asyncio import Future
from typing import Any, ClassVar

import orjson
from jupyter_server.auth.identity import User
from jupyter_server.base.handlers import APIHandler
from jupyter_server.prometheus.log_functions import prometheus_log_method
from tornado import web
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, StreamClosedError

from first_jupyter.gateway import Gateway
from first_jupyter.gateway.core import GatewayStream
from first_jupyter.protocol import Capability, OpenAIError, parse_request

SCOPED_USER = User(username="first-scoped-key", name="FIRST kernel key", display_name="FIRST kernel key")
_AUTH_HELP = ("Authenticate with 'Authorization: Bearer $FIRST_API_KEY' (set in kernels the Jupyter server "
              "starts) or with a Jupyter token ('Authorization: token ...').")


class FirstHandler(APIHandler):
    """Base for every FIRST route: scoped-key auth, OpenAI-shaped errors, access to the Gateway."""

    _scoped = False
    _host_verdicts: ClassVar[dict[tuple[int, str], bool]] = {}

    def check_host(self) -> bool:
        """Jupyter's DNS-rebinding guard, remembered per Host header: it parses addresses on every call."""
        host = (id(self.application), self.request.host)
        verdict = self._host_verdicts.get(host)
        if verdict is None:
            verdict = super().check_host()
            if len(self._host_verdicts) > 256:  # spoofed Host headers must not grow this without bound
                self._host_verdicts.clear()
            self._host_verdicts[host] = verdict
        return verdict

    def _log(self) -> None:
        """Successful answers are accounted in the usage store; keep the metric, skip the access-log line."""
        if self.get_status() < 400:
            prometheus_log_method(self)
        else:
            super()._log()

    async def prepare(self) -> None:  # type: ignore[override]
        header = self.request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and given:
            key: str = self.settings["first_api_key"]
            if hmac.compare_digest(given.strip().encode(), key.encode()):
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
            raise OpenAIError(503, "The FIRST gateway is not running because its configuration is invalid:\n"
                                   f"{self.settings.get('first_config_error')}\nFix the file and restart "
                                   "the Jupyter server.", type="api_error", code="config_error")
        return gateway

    def write_json(self, payload: Any) -> None:
        self.set_header("Content-Type", "application/json")
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
        self.set_header("Content-Type", "application/json")
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
        else:
            err = OpenAIError(status_code, reason or "The gateway failed on this request; its log has the "
                                                     "details. Retry, and report it if it persists.",
                              type="api_error" if status_code >= 500 else "invalid_request_error")
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
        try:
            gateway = self.gateway
            body = self.request.body
            limit: int = self.settings["first_max_request_bytes"] or gateway.config.defaults.limits.max_request_bytes
            if len(body) > limit:
                raise OpenAIError(413, f"The request body is {len(body):,} bytes, over this gateway's limit of "
                                       f"{limit:,}. Send less (fewer or shorter messages), or raise "
                                       f"c.FirstExtension.max_request_bytes.", code="request_too_large")
            req = parse_request(self.capability, body)
            if not req.stream:
                done = await gateway.complete(req)
                self.set_header("Content-Type", "application/json")
                self.set_header("X-First-Cluster", done.target.cluster)
                self.set_header("X-First-Endpoint", done.target.endpoint)
                self.finish(done.body)
                return
            stream = await gateway.stream(req)
        except asyncio.CancelledError:
            return  # the client left before anything was sent; nothing to clean up beyond the task
        await self._relay(stream)

    async def _relay(self, stream: GatewayStream) -> None:
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self.set_header("X-First-Cluster", stream.target.cluster)
        self.set_header("X-First-Endpoint", stream.target.endpoint)
        socket_stream: IOStream | None = None
        plain_socket = False

        def on_drained(drained: Future[None]) -> None:
            if not drained.cancelled():
                drained.exception()  # a closed client is handled by on_connection_close
            stream.resume()

        def write(chunk: bytes) -> bool:
            """After the first chunk (sent with the headers), frame each chunk and hand it to the socket
            stream: tornado's flush() adds two futures and a loop callback per chunk, most of the relay's cost."""
            nonlocal socket_stream, plain_socket
            if socket_stream is not None:
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
            else:
                self.write(chunk)
                drained = self.flush()
                connection = self.request.connection
                if isinstance(connection, HTTP1Connection) and connection._chunking_output:
                    socket_stream = connection.stream
                    plain_socket = type(socket_stream) is IOStream  # not TLS: its send has other failure modes
            if drained.done():
                drained.exception()  # retrieved, so a closed client logs nothing; on_connection_close acts
                return True
            drained.add_done_callback(on_drained)  # the client is slow: pause the upstream until drained
            return False

        gone = False
        try:
            if isinstance(self.request.connection, HTTP1Connection):  # each event goes out at once, never
                self.request.connection.stream.set_nodelay(True)     # held back waiting for an ACK (Nagle)
            await stream.relay(write)
        except (asyncio.CancelledError, StreamClosedError):
            gone = True
        finally:
            stream.close(client_gone=gone)
        if not gone:
            self.finish()


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
