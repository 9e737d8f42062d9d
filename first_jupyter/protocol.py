"""OpenAI requests and errors as every layer sees them, and the progress comments of a wait for a model's start.

The gateway checks only what it needs itself: a JSON object, the ``model`` it routes on, ``stream`` (and, in a
stream, the ``stream_options`` it adds to), and how deep the body nests (it must be able to write the body again).
Everything else goes to the engine exactly as sent, for the engine to judge: engines such as vLLM take content
parts, sampling fields and ranges the OpenAI schema lacks, and a gateway that refused them would stand between a
user and their engine. An engine's own 400 reaches the client as the engine said it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import orjson

CLIENT_CLOSED = 499  # nginx's convention for "the client went away before the answer was complete"
MAX_NESTING = 128
"""How deep a request body may nest objects and lists. orjson reads 1024 levels but writes only about 254, and
the gateway writes bodies again (a renamed model, a batch line, a task for a cluster), some inside a few levels
of its own: far below what it can write, far above what any request needs (a tool's JSON schema nests a dozen)."""
MAX_MODEL_NAME = 256
"""The longest model name taken: longer than any served name (Hugging Face ids are at most 96 characters), short
enough that a made-up name does no harm in an error message or a log line."""
SHOWN_CHARS = 80
"""The most of a client's value an error message quotes."""


PROGRESS_HEADER = "x-first-progress"
"""Sent with a request that is not streamed by a client that wants to hear how a model's start is going, should
the request have to wait for one: it is then answered as a stream of progress comments and one ``data:`` event
holding the whole answer (or the error), since a cold start on a cluster takes minutes. OpenAI clients never send
it, and see nothing new."""
PROGRESS_MARKER = b": first-progress "
"""Starts the SSE comment line that carries a ``Progress`` as JSON (the line before it says the same in words)."""


def duration(seconds: float) -> str:
    """An expected wait in words: seconds, minutes, or unknown (infinite: no start timed yet)."""
    if math.isinf(seconds):
        return "an unknown time"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


@dataclass(frozen=True)
class Progress:
    """Where a start stands, as one progress comment carries it."""

    model: str
    cluster: str
    endpoint: str
    state: str
    elapsed_s: float
    eta_s: float | None
    """Expected seconds left; None when unknown (no start of this model timed yet)."""

    def words(self) -> str:
        """The wait in one line, as a stream's readers, a cell's status line and a terminal show it."""
        left = duration(math.inf if self.eta_s is None else self.eta_s)
        return (f"waiting for model '{self.model}' on cluster '{self.cluster}' endpoint '{self.endpoint}': "
                f"{self.state}, {self.elapsed_s:.0f} s so far, about {left} to go")

    @property
    def fraction(self) -> float | None:
        """How far along the wait is by its estimate (0 to 1), for a progress bar; None when unknown."""
        if self.eta_s is None:
            return None
        total = self.elapsed_s + self.eta_s
        return min(1.0, self.elapsed_s / total) if total > 0 else 1.0

    def comment(self) -> bytes:
        """The SSE comment lines: one for people, one for clients, then the blank line that ends the event."""
        return f": {self.words()}\n".encode() + PROGRESS_MARKER + orjson.dumps(asdict(self)) + b"\n\n"

    @classmethod
    def from_comment(cls, line: bytes) -> Progress | None:
        """The progress a stream's comment line carries; None for any other line (or one this client cannot
        read: a newer gateway's, which it skips as every SSE client skips comments)."""
        if not line.startswith(PROGRESS_MARKER):
            return None
        try:
            return cls(**orjson.loads(line[len(PROGRESS_MARKER):]))
        except (orjson.JSONDecodeError, TypeError):
            return None


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (any case of the scheme); None for any other."""
    scheme, _, token = (authorization or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


def presented_token(authorization: str | None, api_key: str | None) -> str | None:
    """The credential a request presents: its bearer token, else its ``x-api-key`` header.

    Anthropic's clients send their key as ``x-api-key`` (and OpenAI's as a bearer token); both are the same
    credential, taken by the same rules at every door, on every route, so that one key works with either SDK.
    A bearer token wins where both are sent (Anthropic's clients send ``Authorization`` for ``auth_token``)."""
    return bearer_token(authorization) or (api_key or "").strip() or None


class Capability(StrEnum):
    """What a request asks an engine to do; each maps to one route of the engine's (``path``, from the server's
    root) and one of the gateway's (``public_path``). vLLM serves most under ``/v1``, and the ones that are its
    own (tokenize, detokenize, pooling, classify) at its root: the gateway mirrors that under ``/first``, so a
    client's base URL is the same for both (``{server}/first/v1`` and ``{server}/first``), as at vLLM."""

    chat = "chat"
    completions = "completions"
    embeddings = "embeddings"
    messages = "messages"
    """Anthropic's Messages API: native where a model lists it (vLLM serves it), else translated to chat."""
    count_tokens = "count_tokens"
    """Anthropic's token count, ``/v1/messages/count_tokens``: native along with ``messages``."""
    tokenize = "tokenize"
    detokenize = "detokenize"
    rerank = "rerank"
    score = "score"
    pooling = "pooling"
    classify = "classify"
    responses = "responses"
    transcriptions = "transcriptions"
    translations = "translations"

    @property
    def route(self) -> str:
        """The route's name, as errors and the usage log say it: relative to ``/v1/`` where it is under it."""
        return _ENGINE_PATHS[self]

    @property
    def path(self) -> str:
        """The engine's path, from its server's root (``/v1/chat/completions``, ``/tokenize``)."""
        return f"/{self.route}" if self in _AT_ROOT else f"/v1/{self.route}"

    @property
    def public_path(self) -> str:
        """The gateway's path for it: the engine's under ``/first``."""
        return f"/first{self.path}"

    @property
    def streams(self) -> bool:
        """Whether its answer may be a stream (``"stream": true``); the others' answers are one JSON object."""
        return self not in _NOT_STREAMED

    @property
    def asks_usage(self) -> bool:
        """Whether its stream reports token usage only when asked (``stream_options.include_usage``), which the
        gateway then asks for, to account it."""
        return self in _USAGE_ASKED

    @property
    def takes_form(self) -> bool:
        """Whether its body is a ``multipart/form-data`` form (an audio file and fields) rather than JSON."""
        return self in _FORMS


_ENGINE_PATHS = {
    Capability.chat: "chat/completions",
    Capability.completions: "completions",
    Capability.embeddings: "embeddings",
    Capability.messages: "messages",
    Capability.count_tokens: "messages/count_tokens",
    Capability.tokenize: "tokenize",
    Capability.detokenize: "detokenize",
    Capability.rerank: "rerank",
    Capability.score: "score",
    Capability.pooling: "pooling",
    Capability.classify: "classify",
    Capability.responses: "responses",
    Capability.transcriptions: "audio/transcriptions",
    Capability.translations: "audio/translations",
}
_AT_ROOT = frozenset({Capability.tokenize, Capability.detokenize, Capability.pooling, Capability.classify})
"""vLLM's own routes, which it serves at its root rather than under ``/v1`` (``vllm/entrypoints``)."""
_NOT_STREAMED = frozenset({Capability.embeddings, Capability.count_tokens, Capability.tokenize,
                           Capability.detokenize, Capability.rerank, Capability.score, Capability.pooling,
                           Capability.classify})
_USAGE_ASKED = frozenset({Capability.chat, Capability.completions})

ANTHROPIC = frozenset({Capability.messages, Capability.count_tokens})
"""The routes that speak Anthropic's API: their errors take Anthropic's shape, at every door."""
_FORMS = frozenset({Capability.transcriptions, Capability.translations})


class OpenAIError(Exception):
    """An error that becomes an OpenAI-shaped response: ``{"error": {message, type, param, code}}``.

    ``message`` must tell the user what to do next, not only what went wrong.
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.engine_body: bytes | None = None
        """The engine's own error answer, where this error is one (``upstream.upstream_error``): a route whose API
        the engine speaks natively may send it on as it came."""

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def sse_event(self) -> bytes:
        """The error as a final server-sent event, for failures after a stream has started."""
        return b"data: " + self.to_bytes() + b"\n\n"


class ParsedRequest:
    """A checked request: the decoded body (every field as sent) plus what the gateway reads from it (an audio
    form's is ``gateway.audio.FormRequest``)."""

    __slots__ = ("asked", "capability", "data", "model", "raw", "stream")

    def __init__(self, capability: Capability, data: dict[str, Any], raw: bytes,
                 asked: Capability | None = None) -> None:
        """``asked``: the route the client came by, where the request is sent as another (a Messages request
        translated to chat); its usage is accounted, and its stream's errors shaped, as the route's."""
        self.capability = capability
        self.asked = asked or capability
        self.data = data
        self.raw = raw
        self.model: str = data.get("model") or ""  # empty: the gateway answers 404 with the known ids
        self.stream: bool = data.get("stream") is True


def json_kind(value: object) -> str:
    """What a decoded JSON value is, in JSON's words, for a message that says what was sent instead."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)


def nests_deeper(value: object, limit: int) -> bool:
    """Whether objects and lists in ``value`` nest more than ``limit`` levels (the value itself is the first).

    Level by level, and a level's scalars are skipped by C code (``set(map(type, ...))``), so that a body of many
    numbers (token ids, embeddings input) costs next to nothing on the request path."""
    level = [value] if isinstance(value, dict | list) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        below: list[dict[Any, Any] | list[Any]] = []
        for container in level:
            items = container.values() if isinstance(container, dict) else container
            kinds = set(map(type, items))
            if dict in kinds or list in kinds:
                below.extend(item for item in items if isinstance(item, dict | list))
        level = below
    return False


def shown(value: object) -> str:
    """A client's value as an error message quotes it: its repr, cut short, so that an answer never sends a 10 MB
    field back to the client that sent it (and a batch's kept errors stay small)."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}..."


def _invalid(field: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"Invalid value for '{field}': {message}. Fix that field and send the request again.",
                       param=field, code="invalid_value")


def too_deep() -> OpenAIError:
    """The refusal of a body nested deeper than ``MAX_NESTING`` (a request's, or a batch line's)."""
    return OpenAIError(400, f"The request body nests objects and lists more than {MAX_NESTING} levels deep, which "
                            f"this gateway does not take. Flatten it (no request needs that depth).",
                       code="nesting_too_deep")


def check_model_name(model: str) -> None:
    """A 400 naming the field for a model name longer than any served (``MAX_MODEL_NAME``), wherever a client names
    one (a request, the default model, a model to warm)."""
    if len(model) > MAX_MODEL_NAME:
        raise _invalid("model", f"it is {len(model):,} characters long, and no model name here is longer than "
                                f"{MAX_MODEL_NAME}; GET /first/v1/models lists them")


def check_request(capability: Capability, data: dict[str, Any]) -> None:
    """Check a decoded request body for what the gateway reads, raising ``OpenAIError(400)`` that names the field.
    The rest is the engine's to judge."""
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise _invalid("model", f"it must be a model id (a string), not {json_kind(model)}; GET /first/v1/models "
                                "lists them")
    if model is not None:
        check_model_name(model)
    stream = data.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _invalid("stream", f"it must be true, false or null, not {json_kind(stream)}")
    if stream and not capability.streams:
        raise _invalid("stream", f"{capability.route} answers are not streamed; leave 'stream' out, or set it to "
                                 "false")
    options = data.get("stream_options")
    if stream and capability.asks_usage and options is not None and not isinstance(options, dict):
        raise _invalid("stream_options", f"it must be an object such as {{\"include_usage\": true}}, not "
                                         f"{json_kind(options)}")
    if nests_deeper(data, MAX_NESTING):
        raise too_deep()


def parse_request(capability: Capability, raw: bytes) -> ParsedRequest:
    """Decode and check a request body (``check_request``), raising ``OpenAIError(400)`` that says what to fix."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):  # orjson stops reading at 1024 levels
            raise too_deep() from None
        raise OpenAIError(400, f"The request body is not valid JSON ({exc}). Send a JSON object with "
                               f"'Content-Type: application/json'.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "The request body must be a JSON object, e.g. "
                               '{"model": "...", "messages": [...]}.', code="invalid_json")
    check_request(capability, data)
    return ParsedRequest(capability, data, raw)


def list_page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """One page of an OpenAI list (files, batches, a response's input items), its ids for the next page's ``after``."""
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": has_more}


def page_limit(query: Mapping[str, str], default: int, most: int) -> int:
    """A list route's ``limit`` query parameter, from 1 to ``most``; a 400 naming it otherwise."""
    given = query.get("limit", str(default))
    if not (given.isascii() and given.isdigit()) or not 1 <= int(given) <= most:  # not '²', which int() refuses
        raise OpenAIError(400, f"limit must be a whole number from 1 to {most}; it is {shown(given)}.", param="limit")
    return int(given)

