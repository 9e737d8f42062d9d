"""What every door of the gateway needs: Jupyter's handlers and the gateway's own HTTP server.

The helpers (body limit, starting an inference, response headers, errors) are what any door needs so that all
answer alike. The routes themselves are declared once, in ``api.route_table``.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable

import orjson

from first_jupyter.api_types import SignIn, WarmReply
from first_jupyter.config import Limits
from first_jupyter.gateway.answers import Completed, Relayed
from first_jupyter.gateway.audio import HOW as AUDIO_HOW
from first_jupyter.gateway.audio import AudioForm
from first_jupyter.gateway.caller import current
from first_jupyter.gateway.core import Gateway
from first_jupyter.gateway.router import Target
from first_jupyter.gateway.starts import Attempts
from first_jupyter.lasting_key import LastingKey
from first_jupyter.protocol import Capability, OpenAIError, ParsedRequest, parse_request, presented_token
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


_INFERENCE_PATHS = ", ".join(cap.public_path for cap in Capability)


def unknown_route(path: str) -> OpenAIError:
    return OpenAIError(404, f"No route {path}. This gateway serves /first/v1/models, {_INFERENCE_PATHS}, "
                            "/first/v1/responses/{id}, /first/v1/files and batches, and /first/api/status, usage, "
                            "default_model and models/{id}/warm.", code="unknown_route")


def too_large(size: int, limit: int) -> OpenAIError:
    return OpenAIError(413, f"The request body is {size:,} bytes, over this gateway's limit of {limit:,}. Send "
                            f"less (fewer or shorter messages), or raise {LIMIT_SETTING}.", code="request_too_large")


def target_headers(target: Target) -> dict[str, str]:
    """Where the answer was computed, for clients that want to know (and for debugging failover)."""
    return {"X-First-Cluster": target.cluster, "X-First-Endpoint": target.endpoint}


def stream_headers(target: Target) -> dict[str, str]:
    return {**STREAM_HEADERS, **target_headers(target)}


async def start(gateway: Gateway, capability: Capability, body: bytes, limit: int, *,
                progress: bool = False) -> Completed | Relayed:
    """Validate a request body and run it: the whole answer, or an open stream whose status is 200.
    ``progress``: a plain request that must wait for a model's start tells the start's progress meanwhile."""
    return await run(gateway, parse(capability, body, limit), progress=progress)


def parse(capability: Capability, body: bytes, limit: int) -> ParsedRequest:
    """A request body within ``limit``, decoded and checked (``protocol.parse_request``)."""
    if len(body) > limit:
        raise too_large(len(body), limit)
    return parse_request(capability, body)


async def run(gateway: Gateway, req: ParsedRequest, *, progress: bool = False) -> Completed | Relayed:
    """Run a checked request, admitted first at a shared gateway (the caller's groups and quotas)."""
    caller = current()
    if caller is not None:
        await gateway.where_served(req.model)
        await caller.admit(req)
    if req.stream:
        return await gateway.stream(req)
    if progress:
        tried = Attempts(heard=True)
        return await gateway.heard(gateway.complete(req, tried), tried)
    return await gateway.complete(req)


async def start_form(gateway: Gateway, capability: Capability, form: AudioForm | None) -> Completed | Relayed:
    """Run an audio request whose form has come whole to its spool (``gateway.audio``). The spool is closed when
    the request ends: here for a whole answer, by the stream when it closes."""
    if form is None:
        raise OpenAIError(400, f"The request body is missing. {AUDIO_HOW}", code="invalid_form")
    spooled = form.finish()
    try:
        answer = await run(gateway, spooled.request(capability))
    except BaseException:
        spooled.close()
        raise
    if isinstance(answer, Completed):
        spooled.close()
    return answer


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




async def warm_route(gateway: Gateway, model: str, body: bytes, *, progress: bool = False) -> WarmReply | Relayed:
    """Start a model ahead of need (for the caller, at a shared gateway); the body may name a ``cluster`` and
    ask to ``wait`` until it answers, telling the start's progress meanwhile when asked (``progress``)."""
    try:
        options = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError:
        options = None
    if not isinstance(options, dict) or not isinstance(options.get("cluster", ""), str | None) or \
            not isinstance(options.get("wait", False), bool):
        raise OpenAIError(400, 'Send no body, or {"cluster": "<name>", "wait": true|false}: the cluster to start '
                               "the model on (default: the best), and whether to answer only once it serves.",
                          code="invalid_value")
    cluster, wait = options.get("cluster") or None, options.get("wait", False)
    if progress and wait:
        tried = Attempts(heard=True)
        return await gateway.heard(gateway.warm(model, cluster, wait, tried), tried)
    return await gateway.warm(model, cluster, wait)


async def deliver_batch(gateway: Gateway, header: Callable[[str], str | None], body: bytes) -> int:
    """A node's batch for a remote stream (``backends.compute.callbacks``): the status to answer, 204 when taken."""
    return await gateway.callbacks.receive(header("x-first-task") or "", header("x-first-seq") or "",
                                     header("x-first-signature") or "", body)


async def auth_route(gateway: Gateway, what: str, body: bytes) -> SignIn | dict[str, str]:
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


def key_matches(header: Callable[[str], str | None], key: bytes, lasting: LastingKey | None = None) -> bool:
    """Whether a request presents ``key``, as a bearer token or as ``x-api-key`` (``protocol.presented_token``), or
    else the ``lasting`` key when the server keeps one (compared in constant time): both scoped keys open the same
    doors. ``header``: the request's header by lower-case name."""
    given = presented_token(header("authorization"), header("x-api-key"))
    if given is None:
        return False
    presented = given.encode()
    return hmac.compare_digest(presented, key) or (lasting is not None and lasting.matches(presented))


_HOST = re.compile(r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9.-]+))(?::[0-9]*)?")
"""A ``Host`` header (RFC 9110: uri-host [":" port]): a bracketed IPv6 address, or a name or IPv4 address; then
a port of digits only."""


def is_loopback_host(host: str) -> bool:
    """Whether a ``Host`` header names this machine by a loopback name or address; a malformed one does not
    (``127.0.0.1:evil.com``, ``[::1``)."""
    parsed = _HOST.fullmatch(host)
    return parsed is not None and is_loopback(parsed.group("ip6") or parsed.group("name"))
