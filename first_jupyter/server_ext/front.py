"""The keyed front: the hot routes for requests carrying the scoped kernel key, without Jupyter's handler stack.

Why a second door: a request through a Jupyter ``APIHandler`` pays for identity lookup, XSRF and CSP logic,
default headers, activity tracking through ``get_argument``, Prometheus metrics and tornado's ``RequestHandler``
itself, about half of the server CPU a proxied request costs (see ``bench/overhead.py``). Kernels (notebook code,
magics, batch runners) are where the request volume comes from and they all present the scoped key, so that key
on the hot routes (inference and the model list) is served here, by a plain ``HTTPMessageDelegate`` that the
Jupyter application's router reaches before any handler. Everything else keeps Jupyter's door: browsers,
Jupyter tokens, a wrong key (which Jupyter answers with 401), every other route, and ``Host`` headers that
Jupyter's DNS-rebinding guard refuses (its door says why).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from types import SimpleNamespace
from typing import Any, cast

import orjson
from jupyter_server._tz import utcnow
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado.http1connection import HTTP1Connection
from tornado.httputil import (
    HTTPHeaders,
    HTTPMessageDelegate,
    HTTPServerConnectionDelegate,
    HTTPServerRequest,
    RequestStartLine,
    ResponseStartLine,
    responses,
)
from tornado.iostream import StreamClosedError
from tornado.routing import Matcher

from first_jupyter.gateway import Gateway
from first_jupyter.gateway.core import Completed
from first_jupyter.protocol import Capability, OpenAIError
from first_jupyter.server_ext import exchange

MODELS = "models"
"""The route value of ``GET models`` in the route table; inference routes map to their capability."""

_MAX_HOSTS = 256


def bearer_key_matches(header: str | None, key: bytes) -> bool:
    """Whether an ``Authorization`` header presents ``key`` as a bearer token (compared in constant time)."""
    if not header:
        return False
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key)


class HostVerdicts:
    """Jupyter's DNS-rebinding verdict per ``Host`` header, for both doors.

    The verdict comes from Jupyter's own ``check_host`` (so ``allow_remote_access`` and ``local_hostnames``
    mean what they mean to Jupyter), computed once per header: it only depends on the header and the server's
    settings, while Jupyter parses the address again on every request. Bounded, because a client can send any
    number of made-up hosts.
    """

    def __init__(self, settings: dict[str, Any], log: logging.Logger) -> None:
        self._settings = settings
        self._log = log
        self._verdicts: dict[str, bool] = {}

    def allowed(self, host: str) -> bool:
        verdict = self._verdicts.get(host)
        if verdict is None:
            probe = SimpleNamespace(settings=self._settings, request=SimpleNamespace(host=host), log=self._log)
            verdict = JupyterHandler.check_host(cast(JupyterHandler, probe))  # reads only these three
            if len(self._verdicts) >= _MAX_HOSTS:
                self._verdicts.clear()
            self._verdicts[host] = verdict
        return verdict


class KeyedFront(HTTPServerConnectionDelegate):
    """Serves the hot routes for the scoped key: what the front knows of the server, and the route matcher."""

    def __init__(self, base_url: str, key: str, gateway: Gateway | None, config_error: str | None,
                 max_request_bytes: int, hosts: HostVerdicts, settings: dict[str, Any],
                 log: logging.Logger) -> None:
        prefix = url_path_join(base_url, "first/v1/")
        self.routes: dict[tuple[str, str], Capability | str] = {("GET", prefix + MODELS): MODELS}
        self.routes.update((("POST", prefix + cap.route), cap) for cap in Capability)
        self.key = key.encode()
        self.gateway = gateway
        self.config_error = config_error
        self.limit = exchange.body_limit(max_request_bytes, gateway) if gateway is not None else 0
        self.hosts = hosts
        self.settings = settings
        self.log = log

    def matcher(self) -> KeyedRoutes:
        return KeyedRoutes(self)

    def start_request(self, server_conn: object, request_conn: Any) -> HTTPMessageDelegate:
        return KeyedExchange(self, request_conn)


class KeyedRoutes(Matcher):
    """Takes a request for the front when route, host verdict and key all say so; else Jupyter's door has it."""

    def __init__(self, front: KeyedFront) -> None:
        self.front = front

    def match(self, request: HTTPServerRequest) -> dict[str, Any] | None:
        front = self.front
        if (request.method, request.path) not in front.routes or not front.hosts.allowed(request.host):
            return None
        if not bearer_key_matches(request.headers.get("Authorization"), front.key):
            return None
        return {}


class KeyedExchange(HTTPMessageDelegate):
    """One request through the front: collects the body within the limit, then answers or relays."""

    def __init__(self, front: KeyedFront, connection: HTTP1Connection) -> None:
        self.front = front
        self.connection = connection
        self.route: Capability | str = MODELS
        self.method = self.path = ""
        self.chunks: list[bytes] = []
        self.size = 0
        self.task: asyncio.Task[None] | None = None

    # -- tornado's calls, in order -------------------------------------------------------------------------

    def headers_received(self, start_line: RequestStartLine | ResponseStartLine,  # type: ignore[override]
                         headers: HTTPHeaders) -> None:
        assert isinstance(start_line, RequestStartLine)
        self.method, self.path = start_line.method, start_line.path.partition("?")[0]
        self.route = self.front.routes[(self.method, self.path)]
        self.connection.set_close_callback(self.on_connection_close)
        if self.front.gateway is None:
            self.fail(exchange.config_error(self.front.config_error))
            return
        declared = headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.front.limit:  # refuse before reading it
            self.fail(exchange.too_large(int(declared), self.front.limit))

    def data_received(self, chunk: bytes) -> None:  # type: ignore[override]
        """Never called once an answer is out (tornado diverts the rest of the body), so no flag is needed."""
        self.size += len(chunk)
        if self.size > self.front.limit:
            self.chunks.clear()
            self.fail(exchange.too_large(self.size, self.front.limit))
            return
        self.chunks.append(chunk)

    def finish(self) -> None:
        gateway = self.front.gateway
        assert gateway is not None  # else headers_received answered
        if isinstance(self.route, Capability):
            self.task = asyncio.ensure_future(self.serve(gateway, self.route, b"".join(self.chunks)))
        else:
            self.reply(200, {}, orjson.dumps(gateway.models()))

    def on_connection_close(self) -> None:
        """The client went away: cancel at once so the upstream request is closed and the engine stops."""
        if self.task is not None and not self.task.done():
            self.task.cancel()

    # -- answering -----------------------------------------------------------------------------------------

    async def serve(self, gateway: Gateway, capability: Capability, body: bytes) -> None:
        try:
            outcome = await exchange.start(gateway, capability, body, self.front.limit)
        except asyncio.CancelledError:
            return  # the client left before anything was sent
        except OpenAIError as err:
            self.fail(err)
            return
        except Exception:
            self.front.log.exception("%s %s failed", self.method, self.path)
            self.fail(exchange.internal_error())
            return
        if isinstance(outcome, Completed):
            self.reply(200, exchange.target_headers(outcome.target), outcome.body)
            return
        self.touch()
        headers = HTTPHeaders({**exchange.STREAM_HEADERS, **exchange.target_headers(outcome.target)})
        start = ResponseStartLine("HTTP/1.1", 200, "OK")
        try:
            gone = await exchange.relay(outcome, self.connection,
                                        lambda chunk: self.connection.write_headers(start, headers, chunk))
        except Exception:  # the status line is out: all that is left is to end the connection
            self.front.log.exception("%s %s: relaying the stream failed", self.method, self.path)
            self.connection.close()
            return
        if not gone:
            self.connection.finish()

    def fail(self, err: OpenAIError) -> None:
        log = self.front.log.error if err.status >= 500 else self.front.log.warning
        log("%s %s -> %s %s", self.method, self.path, err.status, err.code or err.type)
        self.reply(err.status, err.headers, err.to_bytes())

    def reply(self, status: int, extra: dict[str, str], body: bytes) -> None:
        """A whole JSON answer; keep-alive, ``Connection: close`` and HTTP/1.0 are the connection's business."""
        self.touch()
        headers = HTTPHeaders({"Content-Type": exchange.JSON, "Content-Length": str(len(body)), **extra})
        try:
            self.connection.write_headers(ResponseStartLine("HTTP/1.1", status, responses.get(status, "Unknown")),
                                          headers, body)
            self.connection.finish()
        except StreamClosedError:
            pass  # the client left while the answer was computed: nobody to tell

    def touch(self) -> None:
        """Kernel traffic is activity: an idle-culling hub must not stop a server whose notebooks are using it."""
        self.front.settings["api_last_activity"] = utcnow()
