"""Errors in Anthropic's shape: ``{"type": "error", "error": {"type": ..., "message": ...}}``.

Anthropic's clients pick their exception class from the HTTP status and show ``error.type`` and
``error.message``; an OpenAI-shaped body would reach the user as an unreadable dict. So every error on the
Messages routes is rewritten here: an ``OpenAIError`` (status kept, message kept, since it already says what to do
next), whether the gateway raised it or made it from an engine's error answer (``upstream.upstream_error``, which
reads every usual shape and names the cluster), and an error the engine writes into a stream, which becomes
Anthropic's ``event: error``.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from first_jupyter.protocol import OpenAIError

_ERROR_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",  # the gateway's "no capacity now, retry": what Anthropic says with 529
    504: "timeout_error",
    529: "overloaded_error",
}
"""Anthropic's error type for each HTTP status it documents; other 4xx are ``invalid_request_error``, other 5xx
``api_error``."""

_STATUS_OF_TYPE: Final[dict[str, int]] = {
    # OpenAI's types, and the names of the exceptions vLLM puts in ``type``
    "invalid_request_error": 400,
    "BadRequestError": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "NotFoundError": 404,
    "rate_limit_error": 429,
    "requests": 429,
    "tokens": 429,
    "insufficient_quota": 429,
    "server_error": 500,
    "api_error": 500,
    "InternalServerError": 500,
    "overloaded_error": 529,
}
"""The status an error written into a stream stands for, where the engine named only its type: a stream's HTTP
status is 200 whatever fails in it."""

_MAX_RAW_MESSAGE: Final = 500
"""How much of an in-stream error without a message goes into the event's: enough to read, bounded."""


def error_type(status: int) -> str:
    """Anthropic's ``error.type`` for an HTTP status."""
    known = _ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str) -> bytes:
    """The JSON body of an error answer with this status."""
    return orjson.dumps({"type": "error", "error": {"type": error_type(status), "message": message}})


def from_openai_error(exc: OpenAIError) -> bytes:
    """An error answer in Anthropic's shape (a validation failure, no route, no capacity, the engine's refusal);
    the door answers with ``exc.status`` and ``exc.headers`` as for any route. An engine's own error that is
    Anthropic's shape already (vLLM's Messages API) goes on as the engine wrote it."""
    if exc.engine_body is not None and anthropic_shaped(exc.engine_body):
        return exc.engine_body
    return error_body(exc.status, exc.message)


def anthropic_shaped(body: bytes) -> bool:
    """Whether an error answer is Anthropic's ``{"type": "error", "error": {"type": ..., "message": ...}}``."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    error = data.get("error") if isinstance(data, dict) and data.get("type") == "error" else None
    return isinstance(error, dict) and isinstance(error.get("type"), str) and isinstance(error.get("message"), str)


def error_event(status: int, message: str) -> bytes:
    """An error after the stream has begun (the status line, 200, is gone): Anthropic's ``event: error``."""
    return b"event: error\ndata: " + error_body(status, message) + b"\n\n"


def stream_error_event(payload: dict[str, Any]) -> bytes:
    """An error the engine wrote into its stream (``data: {"error": {...}}``) as Anthropic's ``event: error``."""
    error = payload.get("error")
    detail: dict[str, Any] = error if isinstance(error, dict) else payload
    message = detail.get("message")
    return error_event(_status_of(detail), message if isinstance(message, str) and message
                       else f"The engine's stream failed: {orjson.dumps(payload).decode()[:_MAX_RAW_MESSAGE]}")


def _status_of(detail: dict[str, Any]) -> int:
    """The HTTP status an in-stream error stands for: vLLM's ``code`` is one, else the error's type says."""
    code = detail.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        return code
    kind = detail.get("type")
    return _STATUS_OF_TYPE.get(kind, 500) if isinstance(kind, str) else 500

