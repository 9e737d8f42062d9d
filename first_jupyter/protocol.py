"""OpenAI request and error models shared by every layer.

Validation is deliberately narrow: the fields a gateway must understand (model, messages, numeric ranges,
``stream``) are checked so that a user gets a precise 400 naming the field, while every other field is kept
exactly as sent, because engines such as vLLM accept many extra sampling fields the OpenAI schema lacks.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

CLIENT_CLOSED = 499  # nginx's convention for "the client went away before the answer was complete"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (any case of the scheme); None for any other."""
    scheme, _, token = (authorization or "").partition(" ")
    return (token.strip() or None) if scheme.lower() == "bearer" else None


class Capability(StrEnum):
    """What a request asks an engine to do; each maps to one OpenAI route."""

    chat = "chat"
    completions = "completions"
    embeddings = "embeddings"

    @property
    def route(self) -> str:
        return _ROUTES[self]


_ROUTES = {
    Capability.chat: "chat/completions",
    Capability.completions: "completions",
    Capability.embeddings: "embeddings",
}


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

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.body())

    def sse_event(self) -> bytes:
        """The error as a final server-sent event, for failures after a stream has started."""
        return b"data: " + self.to_bytes() + b"\n\n"


class _Passthrough(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class TextPart(_Passthrough):
    type: Literal["text"]
    text: str


class ImagePart(_Passthrough):
    type: Literal["image_url"]
    image_url: dict[str, Any] | str


class AudioPart(_Passthrough):
    type: Literal["input_audio"]
    input_audio: dict[str, Any]


class FilePart(_Passthrough):
    type: Literal["file"]
    file: dict[str, Any]


class RefusalPart(_Passthrough):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[TextPart | ImagePart | AudioPart | FilePart | RefusalPart, Field(discriminator="type")]


class ChatMessage(_Passthrough):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class _SamplingFields(_Passthrough):
    model: str | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    max_tokens: int | None = Field(default=None, ge=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: str | list[str] | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(_Passthrough):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)

    @property
    def stream(self) -> bool:
        return False


_REQUEST_MODELS: dict[Capability, type[ChatCompletionRequest | CompletionRequest | EmbeddingRequest]] = {
    Capability.chat: ChatCompletionRequest,
    Capability.completions: CompletionRequest,
    Capability.embeddings: EmbeddingRequest,
}


class ParsedRequest:
    """A validated request: the decoded body (every field as sent) plus what the gateway reads from it."""

    __slots__ = ("capability", "data", "model", "raw", "stream")

    def __init__(self, capability: Capability, data: dict[str, Any], raw: bytes) -> None:
        self.capability = capability
        self.data = data
        self.raw = raw
        self.model: str = data.get("model") or ""  # empty: the gateway answers 404 with the known ids
        self.stream: bool = bool(data.get("stream", False))


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in {"str", "list[ContentPart]", "none", "list[str]", "list[int]", "list[list[int]]"} or (
            isinstance(part, str) and part[:1].isupper()
        ):
            continue  # pydantic names the union member it tried; users know only field names
        else:
            path += f".{part}" if path else part
    return path


def parse_request(capability: Capability, raw: bytes) -> ParsedRequest:
    """Decode and validate a request body, raising ``OpenAIError(400)`` that names the offending field."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(400, f"The request body is not valid JSON ({exc}). Send a JSON object with "
                               f"'Content-Type: application/json'.", code="invalid_json") from None
    if not isinstance(data, dict):
        raise OpenAIError(400, "The request body must be a JSON object, e.g. "
                               '{"model": "...", "messages": [...]}.', code="invalid_json")
    try:
        _REQUEST_MODELS[capability].model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = _field_path(tuple(err["loc"])) or None
        raise OpenAIError(400, f"Invalid value for '{field}': {err['msg']}. Fix that field and send the "
                               f"request again.", param=field, code="invalid_value") from None
    return ParsedRequest(capability, data, raw)
