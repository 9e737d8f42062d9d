"""The gateway's OpenAI routes, for every door: Jupyter's handlers and the gateway's own HTTP server.

The helpers (body limit, starting an inference, response headers, errors) are what any door needs so that all
answer alike. ``GatewayApp`` is the door for programs: the routes on ``transport.http_server``, with a bearer key,
served on loopback, where kernels reach it through ``FIRST_GATEWAY_URL``.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import orjson

from first_jupyter.batch import routes as batch_routes
from first_jupyter.batch.upload import Upload
from first_jupyter.caller import Caller
from first_jupyter.config import Limits
from first_jupyter.gateway.callbacks import CALLBACK_PATH
from first_jupyter.gateway.core import Completed, Gateway, GatewayStream
from first_jupyter.gateway.router import Target
from first_jupyter.protocol import Capability, OpenAIError, bearer_token, parse_request
from first_jupyter.transport.http_server import BodySink, BodyTooLarge, Exchange, HTTPRefusal, Request
from first_jupyter.transport.proxies import is_loopback

JSON = "application/json"
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""Server-sent events: never cached, never held back by a buffering reverse proxy (nginx honours the last)."""

LIMIT_SETTING = "c.FirstExtension.max_request_bytes"
FILE_CHUNK = 256 * 1024
JSONL = "application/jsonl"


def config_error(reason: str | None) -> OpenAIError:
    """Why there is no gateway: the configuration named at start was invalid."""
    return OpenAIError(503, f"The FIRST gateway is not running because its configuration is invalid:\n{reason}\n"
                            "Fix the file and restart the Jupyter server.", type="api_error", code="config_error")


def internal_error(reason: str | None = None) -> OpenAIError:
    """A failure of the gateway itself; the traceback goes to the server log, never to the client."""
    return OpenAIError(500, reason or "The gateway failed on this request; its log has the details. Retry, and "
                                      "report it if it persists.", type="api_error")


def body_limit(max_request_bytes: int, gateway: Gateway | None) -> int:
    """The largest request body accepted: the extension's traitlet when set, else the config file's limit
    (the default limit without a gateway, so that a request still reaches the answer saying why)."""
    limits = gateway.config.defaults.limits if gateway is not None else Limits()
    return max_request_bytes or limits.max_request_bytes


def unknown_route(path: str) -> OpenAIError:
    return OpenAIError(404, f"No route {path}. This gateway serves /first/v1/models, chat/completions, completions, "
                            "embeddings, files and batches, and /first/api/status, usage, default_model and "
                            "models/{id}/warm.", code="unknown_route")


def too_large(size: int, limit: int) -> OpenAIError:
    return OpenAIError(413, f"The request body is {size:,} bytes, over this gateway's limit of {limit:,}. Send "
                            f"less (fewer or shorter messages), or raise {LIMIT_SETTING}.", code="request_too_large")


def target_headers(target: Target) -> dict[str, str]:
    """Where the answer was computed, for clients that want to know (and for debugging failover)."""
    return {"X-First-Cluster": target.cluster, "X-First-Endpoint": target.endpoint}


def stream_headers(target: Target) -> dict[str, str]:
    return {**STREAM_HEADERS, **target_headers(target)}


async def start(gateway: Gateway, capability: Capability, body: bytes, limit: int,
                caller: Caller | None = None) -> Completed | GatewayStream:
    """Validate a request body and run it: the whole answer, or an open stream whose status is 200."""
    if len(body) > limit:
        raise too_large(len(body), limit)
    req = parse_request(capability, body)
    if caller is not None:
        await gateway.where_served(req.model)
        caller.admit(req)
    return await gateway.stream(req, caller) if req.stream else await gateway.complete(req, caller)


def requested_model(body: bytes) -> str:
    """The ``model`` of a ``{"model": "..."}`` body (setting the default model), or a 400 saying what to send."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, 'Send a JSON body {"model": "<id>"}; GET /first/v1/models lists the ids.',
                          param="model", code="invalid_value")
    return model


_AUTH_ROUTES = ("whoami", "login", "login_code", "logout")
WARM_PATH = re.compile(r"^/first/api/models/(.+)/warm$")
"""Model ids may hold slashes (``meta-llama/Llama-3.1-8B-Instruct``): everything between is the id."""


async def warm_route(gateway: Gateway, model: str, body: bytes, caller: Caller | None = None) -> dict[str, Any]:
    """Start a model ahead of need (for ``caller``, at a shared gateway); the body may name a ``cluster`` and
    ask to ``wait`` until it answers."""
    try:
        options = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError:
        options = None
    if not isinstance(options, dict) or not isinstance(options.get("cluster", ""), str | None) or \
            not isinstance(options.get("wait", False), bool):
        raise OpenAIError(400, 'Send no body, or {"cluster": "<name>", "wait": true|false}: the cluster to start '
                               "the model on (default: the best), and whether to answer only once it serves.",
                          code="invalid_value")
    return await gateway.warm(model, options.get("cluster") or None, options.get("wait", False), caller)


def deliver_batch(gateway: Gateway, header: Callable[[str], str | None], body: bytes) -> int:
    """A node's batch for a remote stream (``gateway.callbacks``): the status to answer, 204 when taken."""
    return gateway.callbacks.deliver(header("x-first-task") or "", header("x-first-seq") or "",
                                     header("x-first-signature") or "", body)


async def auth_route(gateway: Gateway, what: str, body: bytes) -> dict[str, Any]:
    """Signing in from a client (the sidebar, ``%first login``): the answers carry URLs and identities, never
    tokens; the tokens stay in this server."""
    if what == "whoami":
        return await gateway.signed_in()
    if what == "login":
        return await gateway.login_start()
    if what == "logout":
        return await gateway.logout()
    try:
        code = orjson.loads(body).get("code")
    except (orjson.JSONDecodeError, AttributeError):
        code = None
    if not isinstance(code, str) or not code.strip():
        raise OpenAIError(400, 'Send {"code": "..."}: the authorization code Globus showed after sign-in.',
                          param="code", code="invalid_value")
    return await gateway.login_finish(code)


class HostVerdicts:
    """A DNS-rebinding verdict per ``Host`` header, computed once: it depends only on the header and settings.

    Bounded, because a client can send any number of made-up hosts. Each door brings its own rule: Jupyter's
    ``check_host`` for its handlers, ``is_loopback_host`` for the gateway's own server.
    """

    def __init__(self, most: int = 256) -> None:
        self._most = most
        self._verdicts: dict[str, bool] = {}

    def allowed(self, host: str, rule: Callable[[str], bool]) -> bool:
        verdict = self._verdicts.get(host)
        if verdict is None:
            verdict = rule(host)
            if len(self._verdicts) >= self._most:
                self._verdicts.clear()
            self._verdicts[host] = verdict
        return verdict


def bearer_key_matches(header: str | None, key: bytes) -> bool:
    """Whether an ``Authorization`` header presents ``key`` as a bearer token (compared in constant time)."""
    given = bearer_token(header)
    return given is not None and hmac.compare_digest(given.encode(), key)


_HOST = re.compile(r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::[0-9]*)?")
"""A ``Host`` header (RFC 9110: uri-host [":" port]): a bracketed IPv6 address, or a name or IPv4 address; then
a port of digits only."""


def is_loopback_host(host: str) -> bool:
    """Whether a ``Host`` header names this machine by a loopback name or address; a malformed one does not
    (``127.0.0.1:evil.com``, ``[::1``)."""
    parsed = _HOST.fullmatch(host)
    return parsed is not None and is_loopback(parsed.group("ip6") or parsed.group("name"))


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class GatewayApp:
    """The OpenAI routes on the gateway's own server, for holders of the key, asked for by a loopback name."""

    def __init__(self, gateway: Gateway | None, *, key: str, max_request_bytes: int = 0,
                 config_error_text: str | None = None, on_activity: Callable[[], None] | None = None,
                 log: logging.Logger | None = None) -> None:
        self.gateway = gateway
        self.key = key.encode()
        self.limit = body_limit(max_request_bytes, gateway)
        self.config_error_text = config_error_text
        self.on_activity = on_activity
        self.log = log or logging.getLogger(__name__)
        self.routes: dict[str, dict[str, Capability | str]] = {
            "/first/v1/models": {"GET": "models"}, "/first/api/status": {"GET": "status"},
            "/first/api/usage": {"GET": "usage"},
            "/first/api/default_model": {"GET": "get_default_model", "PUT": "set_default_model"},
            "/first/api/whoami": {"GET": "whoami"}, "/first/api/login": {"POST": "login"},
            "/first/api/login/code": {"POST": "login_code"}, "/first/api/logout": {"POST": "logout"}}
        self.routes.update((f"/first/v1/{cap.route}", {"POST": cap}) for cap in Capability)
        self._hosts = HostVerdicts()

    # -- HttpApp ----------------------------------------------------------------------------------------------

    def max_body(self) -> int:
        return self.limit

    def body_sink(self, method: str, path: str, headers: dict[str, str]) -> BodySink | None:
        """An uploaded file goes to disk as it arrives; only for a holder of the key (others get no sink, so
        their body is held to the usual limit and refused)."""
        if self.gateway is None or not batch_routes.is_upload(method, path) or not bearer_key_matches(
                headers.get("authorization"), self.key) or not self._hosts.allowed(headers.get("host", ""),
                                                                                  is_loopback_host):
            return None
        return self.gateway.batches.upload(headers.get("content-type"))

    def refusal(self, refusal: HTTPRefusal) -> bytes:
        if isinstance(refusal, BodyTooLarge):  # an upload's limit is the file's, with its own setting
            sink = refusal.sink
            return (sink.too_large() if isinstance(sink, Upload) else too_large(refusal.size, refusal.limit)).to_bytes()
        err = internal_error(refusal.message) if refusal.status >= 500 else OpenAIError(refusal.status,
                                                                                         refusal.message)
        return err.to_bytes()

    async def __call__(self, request: Request, exchange: Exchange) -> None:
        try:
            await self._answer(request, exchange)
        except OpenAIError as err:
            log = self.log.error if err.status >= 500 else self.log.warning
            log("%s %s -> %s %s", request.method, request.path, err.status, err.code or err.type)
            exchange.respond(err.status, {"Content-Type": JSON, **err.headers}, err.to_bytes())

    # -- routes -----------------------------------------------------------------------------------------------

    async def _answer(self, request: Request, exchange: Exchange) -> None:
        self._check_host(request)
        if request.path == CALLBACK_PATH and request.method == "POST" and self.gateway is not None:
            status = deliver_batch(self.gateway, request.headers.get, request.body)
            exchange.respond(status, {"Content-Type": JSON}, b"")  # signed per task: no key, no Jupyter auth
            return
        if not bearer_key_matches(request.headers.get("authorization"), self.key):
            raise OpenAIError(401, "Not authenticated. Send 'Authorization: Bearer $FIRST_API_KEY' (set in "
                                   "kernels the Jupyter server starts; also in the gateway's runtime file).",
                              type="authentication_error", code="invalid_api_key")
        if self.on_activity is not None:
            self.on_activity()
        route = self.routes.get(request.path)
        batch = batch_routes.ROUTE.match(request.path) if route is None else None
        if batch is not None:
            if self.gateway is None:
                raise config_error(self.config_error_text)
            answer = await batch_routes.answer(self.gateway.batches, request.method, batch,
                                               batch_routes.query_of(request.query), request.body, request.upload)
            if isinstance(answer, Path):
                await self._send_file(answer, exchange)
            else:
                self._json(exchange, answer)
            return
        warm = WARM_PATH.match(request.path) if route is None else None
        if warm is not None:
            route = {"POST": "warm"}
        if route is None:
            raise unknown_route(request.path)
        what = route.get(request.method)
        if what is None:
            allowed = ", ".join(route)
            raise OpenAIError(405, f"{request.method} is not allowed on {request.path}; use {allowed}.",
                              code="method_not_allowed", headers={"Allow": allowed})
        gateway = self.gateway
        if gateway is None:
            raise config_error(self.config_error_text)
        if what == "models":
            self._json(exchange, await gateway.models())
        elif what == "status":
            self._json(exchange, await gateway.status())
        elif what == "usage":
            self._json(exchange, await gateway.usage_summary())
        elif warm is not None:
            self._json(exchange, await warm_route(gateway, unquote(warm.group(1)), request.body))
        elif isinstance(what, str) and what in _AUTH_ROUTES:
            self._json(exchange, await auth_route(gateway, what, request.body))
        elif what == "get_default_model":
            self._json(exchange, {"default_model": gateway.default_model})
        elif what == "set_default_model":
            model = await gateway.set_default_model(requested_model(request.body))
            self._json(exchange, {"default_model": model})
        else:
            assert isinstance(what, Capability)
            outcome = await start(gateway, what, request.body, self.limit)
            if isinstance(outcome, Completed):
                exchange.respond(200, {"Content-Type": JSON, **target_headers(outcome.target)}, outcome.body)
            else:
                await self._relay(outcome, exchange)

    def _check_host(self, request: Request) -> None:
        """DNS-rebinding guard: a page that rebinds its own name to 127.0.0.1 still sends that name as Host."""
        host = request.headers.get("host", "")
        if not self._hosts.allowed(host, is_loopback_host):
            raise OpenAIError(403, f"Requests for host '{host}' are refused: this server only answers on "
                                   "loopback. Use 127.0.0.1 or localhost.", type="permission_error",
                              code="host_not_allowed")

    @staticmethod
    def _json(exchange: Exchange, payload: Any) -> None:
        exchange.respond(200, {"Content-Type": JSON}, orjson.dumps(payload))

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
    async def _relay(stream: GatewayStream, exchange: Exchange) -> None:
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
