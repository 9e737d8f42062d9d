"""Every route of the gateway, declared once: method, path, what answers it, and what its body may be.

Both doors are built from this table: Jupyter's tornado handlers (``server_ext.handlers``, which the shared
gateway of ``first serve`` reuses on its own door) and the gateway's own server (``api.door_kit.GatewayApp``).
So a new route is one ``Route`` here plus its answering function, and both doors serve it alike; the doors keep
only what is theirs: who the caller is, how bytes reach the socket.

A route's function runs on the gateway's loop, acting as the request's sender where the door has one (the door
enters ``gateway.caller.acting_as`` with its ``caller()`` around it, and everything below reads the caller from
there), and returns an answer for the door to send: a JSON value, a whole inference answer (``Completed``),
events (``Relayed``: a stream, or a wait told as it goes), a file to send in chunks (``Path``), or a bare status
(``Bare``).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol
from urllib.parse import parse_qsl

from first_jupyter.api import door_kit
from first_jupyter.api_types import ApiObject, SignIn
from first_jupyter.batch.upload import Upload
from first_jupyter.gateway import anthropic
from first_jupyter.gateway.answers import Completed, Relayed
from first_jupyter.gateway.audio import AudioForm
from first_jupyter.gateway.backends.compute.callbacks import CALLBACK_PATH
from first_jupyter.protocol import ANTHROPIC, PROGRESS_HEADER, Capability, OpenAIError

if TYPE_CHECKING:
    from first_jupyter.batch.batches import Batches
    from first_jupyter.gateway.caller import Caller
    from first_jupyter.gateway.core import Gateway


@dataclass(frozen=True)
class Bare:
    """An answer that is only a status (a node's callback batch: 204 when taken)."""

    status: int


Whole = ApiObject | dict[str, Any] | list[Any] | Completed | Path | Bare
"""An answer the door sends whole (a ``Relayed`` one is written as it comes)."""
Answer = Whole | Relayed


class Door(Protocol):
    """What a route asks of the door it came through; the doors differ only here."""

    def caller(self) -> Caller | None:
        """The request's sender, where a door serves many (the shared gateway); None in a user's own server.
        Asked once, by the door itself, which runs the route acting as them (``gateway.caller.acting_as``)."""
        ...

    def usage_user(self) -> str | None:
        """Whose usage to answer with: None for all (a user's own server holds only theirs)."""
        ...

    def batches(self) -> Batches:
        """The caller's batches and files."""
        ...

    def check_default_change(self) -> None:
        """Refuse (403) a caller who may not change the default model, which every client of the gateway uses."""
        ...

    async def whoami(self) -> SignIn | None:
        """Who is signed in, where the door knows it itself (the shared gateway: the caller's identity); None to
        ask the gateway (a user's own server: its Globus sign-in)."""
        ...

    def signs_in(self) -> bool:
        """Whether sign-in routes (login, code, logout) are served: not at a shared gateway, whose callers bring
        their own tokens."""
        ...


class Spool(Protocol):
    """Where a large body goes as it arrives instead of memory (a door's body sink): an uploaded file, an audio
    form; ``too_large``: its refusal in its own words, with its own setting."""

    limit: int

    def feed(self, data: bytes) -> None: ...

    def discard(self) -> None: ...

    def too_large(self) -> OpenAIError: ...


@dataclass
class Call:
    """One request as a route sees it, whichever door it came through."""

    gateway: Gateway
    door: Door
    params: tuple[str, ...]
    """The path's parameters, percent-decoded (a model id, a file or batch id)."""
    query: str
    body: bytes
    upload: Spool | None
    """The body's sink, for a route whose body is a file or a form (``body`` is then empty)."""
    limit: int
    header: Callable[[str], str | None]

    def query_params(self) -> dict[str, str]:
        return query_of(self.query)


Answering = Callable[[Call], Awaitable[Answer]]
ErrorBody = Callable[[OpenAIError], bytes]
"""How a route's errors are written: OpenAI's shape, or Anthropic's on the Messages routes."""
BodyKind = Literal["none", "request", "file", "form"]


@dataclass(frozen=True)
class Route:
    """One method on one path. ``pattern``: a regular expression of the path (from the server's root, groups for
    the parameters); ``body``: none, a request (within ``max_request_bytes``), a file streamed to disk (within
    ``max_file_bytes``), or an audio form spooled to disk for an engine (within ``max_audio_bytes``);
    ``streams``: whether the answer may be a stream; ``open``: answered without the door's authentication (a
    node's callback carries its own signature); ``error_body``: how every error answer on it is written, the door's
    own refusals (authentication, limits) included, so that a client reads them in its API."""

    method: str
    pattern: str
    answer: Answering
    body: BodyKind = "none"
    streams: bool = False
    open: bool = False
    error_body: ErrorBody = OpenAIError.to_bytes
    compiled: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compiled", re.compile(self.pattern + "/?"))


def query_of(query: str) -> dict[str, str]:
    """A request's query string as its parameters (the last of a repeated one), percent-decoded as UTF-8; a 400
    naming the parameter whose value is not UTF-8 (``after=%FF``), rather than a guess at what it meant."""
    params: dict[str, str] = {}
    for name, raw in parse_qsl(query, encoding="latin-1"):
        try:
            params[name] = raw.encode("latin-1").decode()
        except UnicodeError:
            raise OpenAIError(400, f"The query parameter {name!r} is not percent-encoded UTF-8 text; send its value "
                                   "URL-encoded from UTF-8 (as every HTTP client library does).", param=name,
                              code="invalid_value") from None
    return params


# -- the answering functions ------------------------------------------------------------------------------------


def body_sink(route: Route, gateway: Gateway, batches: Callable[[], Batches],
              content_type: str | None) -> Spool | None:
    """Where a request's body goes as it arrives, by its route's kind; None: into memory, within the limit."""
    if route.body == "file":
        return batches().upload(content_type)
    if route.body == "form":
        return AudioForm(content_type, gateway.data_dir / "audio", gateway.config.defaults.limits.max_audio_bytes)
    return None


def _inference(capability: Capability) -> Answering:
    if capability in ANTHROPIC:
        async def infer(call: Call) -> Answer:
            return await anthropic.start(call.gateway, capability, call.body, call.limit)
    elif capability.takes_form:
        async def infer(call: Call) -> Answer:
            form = call.upload if isinstance(call.upload, AudioForm) else None
            return await door_kit.start_form(call.gateway, capability, form)
    else:
        async def infer(call: Call) -> Answer:
            return await door_kit.start(call.gateway, capability, call.body, call.limit,
                                        progress=call.header(PROGRESS_HEADER) is not None)
    infer.__name__ = infer.__qualname__ = f"infer_{capability.name}"
    return infer


def _stored_response(method: str, action: str = "") -> Answering:
    """A call on a response an engine keeps (``action``: "" for the response itself, ``cancel``,
    ``input_items``): sent to the endpoint that created it, its query as sent."""
    async def stored(call: Call) -> Answer:
        return await call.gateway.stored_response(call.params[0], method, action, call.query)
    stored.__name__ = stored.__qualname__ = f"{method.lower()}_response{'_' + action if action else ''}"
    return stored


async def _models(call: Call) -> Answer:
    return await call.gateway.models()


async def _model(call: Call) -> Answer:
    return await call.gateway.model(call.params[0])


async def _status(call: Call) -> Answer:
    return await call.gateway.status()


async def _usage(call: Call) -> Answer:
    return await call.gateway.usage_summary(call.door.usage_user())


async def _default_model(call: Call) -> Answer:
    """Without probing every endpoint, as status does: clients ask before each prompt that names no model."""
    return {"default_model": call.gateway.default_model}


async def _set_default_model(call: Call) -> Answer:
    call.door.check_default_change()
    return {"default_model": await call.gateway.set_default_model(door_kit.requested_model(call.body))}


async def _warm(call: Call) -> Answer:
    return await door_kit.warm_route(call.gateway, call.params[0], call.body,
                                     progress=call.header(PROGRESS_HEADER) is not None)


async def _whoami(call: Call) -> Answer:
    own = await call.door.whoami()
    return own if own is not None else await door_kit.auth_route(call.gateway, "whoami", b"")


def _signing_in(what: str) -> Answering:
    async def sign_in(call: Call) -> Answer:
        if not call.door.signs_in():
            raise OpenAIError(404, "This is a shared gateway: sign in with Globus on your side (`first login`, or "
                                   "your app's Globus login) and send the access token as a bearer token.",
                              code="unknown_route")
        return await door_kit.auth_route(call.gateway, what, call.body)
    sign_in.__name__ = sign_in.__qualname__ = what
    return sign_in


async def _callback(call: Call) -> Answer:
    return Bare(await door_kit.deliver_batch(call.gateway, call.header, call.body))


async def _files(call: Call) -> Answer:
    return call.door.batches().files(call.query_params())


async def _add_file(call: Call) -> Answer:
    if not isinstance(call.upload, Upload):
        raise OpenAIError(400, "The upload is missing: send the file as multipart/form-data.")
    return call.door.batches().add_file(call.upload)


async def _file(call: Call) -> Answer:
    return call.door.batches().file(call.params[0]).to_json()


async def _delete_file(call: Call) -> Answer:
    return call.door.batches().delete_file(call.params[0])


async def _file_content(call: Call) -> Answer:
    return call.door.batches().content(call.params[0])


async def _batches(call: Call) -> Answer:
    return call.door.batches().batches(call.query_params())


async def _create_batch(call: Call) -> Answer:
    return await call.door.batches().create(call.body)


async def _batch(call: Call) -> Answer:
    return call.door.batches().batch(call.params[0])


async def _cancel_batch(call: Call) -> Answer:
    return call.door.batches().cancel(call.params[0])


_ID = "([^/]+)"
"""A file, batch or response id: one path segment."""
_MODEL = "(.+)"
"""Model ids may hold slashes (``meta-llama/Llama-3.1-8B-Instruct``): everything between is the id."""

ROUTES: tuple[Route, ...] = (
    Route("GET", "/first/v1/models", _models),
    Route("GET", f"/first/v1/models/{_MODEL}", _model),
    *(Route("POST", cap.public_path, _inference(cap),
            body="form" if cap.takes_form else "request", streams=cap.streams,
            error_body=anthropic.error_body if cap in ANTHROPIC else OpenAIError.to_bytes) for cap in Capability),
    Route("GET", f"/first/v1/responses/{_ID}", _stored_response("GET")),
    Route("DELETE", f"/first/v1/responses/{_ID}", _stored_response("DELETE")),
    Route("POST", f"/first/v1/responses/{_ID}/cancel", _stored_response("POST", "cancel")),
    Route("GET", f"/first/v1/responses/{_ID}/input_items", _stored_response("GET", "input_items")),
    Route("GET", "/first/v1/files", _files),
    Route("POST", "/first/v1/files", _add_file, body="file"),
    Route("GET", f"/first/v1/files/{_ID}", _file),
    Route("DELETE", f"/first/v1/files/{_ID}", _delete_file),
    Route("GET", f"/first/v1/files/{_ID}/content", _file_content),
    Route("GET", "/first/v1/batches", _batches),
    Route("POST", "/first/v1/batches", _create_batch, body="request"),
    Route("GET", f"/first/v1/batches/{_ID}", _batch),
    Route("POST", f"/first/v1/batches/{_ID}/cancel", _cancel_batch),
    Route("GET", "/first/api/status", _status),
    Route("GET", "/first/api/usage", _usage),
    Route("GET", "/first/api/default_model", _default_model),
    Route("PUT", "/first/api/default_model", _set_default_model, body="request"),
    Route("POST", f"/first/api/models/{_MODEL}/warm", _warm, body="request", streams=True),
    Route("GET", "/first/api/whoami", _whoami),
    Route("POST", "/first/api/login", _signing_in("login"), body="request"),
    Route("POST", "/first/api/login/code", _signing_in("login_code"), body="request"),
    Route("POST", "/first/api/logout", _signing_in("logout"), body="request"),
    Route("POST", CALLBACK_PATH, _callback, body="request", open=True),
)


def paths(routes: tuple[Route, ...] = ROUTES) -> dict[str, dict[str, Route]]:
    """The table by path pattern, then method: one handler per path for tornado, and the methods for a 405."""
    by_path: dict[str, dict[str, Route]] = {}
    for route in routes:
        by_path.setdefault(route.pattern, {})[route.method] = route
    return by_path


class Matcher:
    """Finds a request's route: a dict lookup for the fixed paths (every inference route), a scan of the few
    patterns with parameters otherwise."""

    def __init__(self, routes: tuple[Route, ...] = ROUTES) -> None:
        self._by_path = paths(routes)
        self._fixed = {pattern: methods for pattern, methods in self._by_path.items() if "(" not in pattern}
        self._patterns = [(methods[next(iter(methods))].compiled, methods)
                          for pattern, methods in self._by_path.items() if pattern not in self._fixed]

    def error_body(self, path: str) -> ErrorBody:
        """How errors on ``path`` are written, whatever the method: its routes' way, OpenAI's for a path that is
        no route."""
        methods = self._fixed.get(path.rstrip("/") or path)
        return next(iter(methods.values())).error_body if methods else OpenAIError.to_bytes

    def match(self, method: str, path: str) -> tuple[Route, tuple[str, ...]]:
        """The route and its raw (still percent-encoded) parameters; a 404 naming what is served, or a 405
        naming the methods the path takes."""
        methods: Mapping[str, Route] | None = self._fixed.get(path.rstrip("/") or path)
        params: tuple[str, ...] = ()
        if methods is None:
            for compiled, candidate in self._patterns:
                found = compiled.fullmatch(path)
                if found is not None:
                    methods, params = candidate, found.groups()
                    break
        if methods is None:
            raise door_kit.unknown_route(path)
        route = methods.get(method)
        if route is None:
            raise method_not_allowed(method, path, methods)
        return route, params


def method_not_allowed(method: str, path: str, methods: Mapping[str, Route]) -> OpenAIError:
    allowed = ", ".join(methods)
    return OpenAIError(405, f"{method} is not allowed on {path}; use {allowed}.", code="method_not_allowed",
                       headers={"Allow": allowed})
