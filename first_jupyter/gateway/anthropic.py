"""Anthropic's Messages routes (``/v1/messages``, ``/v1/messages/count_tokens``): passed through to an engine that
serves them, translated to and from chat completions for one that does not.

Which of the two a model gets is its configuration's to say: a model whose ``capabilities`` list ``messages`` is
served by an engine that speaks the Messages API itself (vLLM), and requests go to it as they were sent; a model
with ``chat`` and without ``messages`` (``transformers serve``, older engines, FIRST clusters without the route) has
each request translated (``gateway.messages``) and sent as chat. Where a model is served both ways, the endpoints
that serve it natively answer: nothing is lost in a translation there.

Either way the request goes through the gateway as any other (routing, failover, cold starts, quotas, usage), and
every error on these routes takes Anthropic's shape: the door writes it with the route's ``error_body``
(``error_body`` here), and a stream's with its ``shape``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import orjson

from first_jupyter.api import door_kit
from first_jupyter.gateway.answers import Completed, Relayed
from first_jupyter.gateway.messages.count_tokens import from_chat, probe_body
from first_jupyter.gateway.messages.errors import error_event, from_openai_error
from first_jupyter.gateway.messages.request import ChatTranslation, to_chat
from first_jupyter.gateway.messages.response import message_from_chat
from first_jupyter.gateway.messages.stream import ChatChunkReader, StreamTranslator
from first_jupyter.gateway.streamed import GatewayStream
from first_jupyter.protocol import Capability, OpenAIError, ParsedRequest

if TYPE_CHECKING:
    from first_jupyter.gateway.core import Gateway

error_body: Final = from_openai_error
"""How the doors write an error on these routes: Anthropic's shape, an engine's own Anthropic error as it came."""


async def start(gateway: Gateway, capability: Capability, body: bytes, limit: int) -> Completed | Relayed:
    """``door_kit.start`` for the Messages routes: the request passed through, or translated, as its model is served."""
    req = door_kit.parse(capability, body, limit)
    native = await _served_natively(gateway, req)
    if capability is Capability.count_tokens:
        return await (door_kit.run(gateway, req) if native else _count_translated(gateway, req))
    if native:
        answer = await door_kit.run(gateway, req)
        if isinstance(answer, GatewayStream):
            answer.shape = NativeEvents()
        return answer
    translation = to_chat(req.data)
    answer = await door_kit.run(gateway, _as_chat(req, translation.chat))
    if isinstance(answer, GatewayStream):
        answer.shape = TranslatedEvents(translation)
        return answer
    assert isinstance(answer, Completed)  # no progress is asked: no wait is told as events
    return Completed(orjson.dumps(message_from_chat(_answer(answer), translation)), answer.target)


async def _served_natively(gateway: Gateway, req: ParsedRequest) -> bool:
    """Whether some endpoint serving the model serves this Messages route itself (its ``capabilities``); a 404
    naming what is served for a model served nowhere, or by endpoints that can neither."""
    targets = await gateway.where_served(req.model)
    if any(t.backend.supports(req.model, req.capability) for t in targets):
        return True
    if not any(t.backend.supports(req.model, Capability.chat) for t in targets):
        raise OpenAIError(404, f"The model '{req.model}' cannot serve {req.capability.route}: its endpoints serve "
                               "neither Anthropic's Messages API (capability 'messages') nor chat completions, which "
                               "the gateway would translate to. Use a chat model (GET /first/v1/models lists each "
                               "model's capabilities).", param="model", code="unsupported_capability")
    return False


async def _count_translated(gateway: Gateway, req: ParsedRequest) -> Completed:
    """The count of an engine without the route: its prompt sent as chat, with one token to generate, whose
    usage says how many tokens the prompt is (``messages.count_tokens``)."""
    answer = await door_kit.run(gateway, _as_chat(req, probe_body(req.data)))
    assert isinstance(answer, Completed)  # the probe is never streamed
    return Completed(orjson.dumps(from_chat(_answer(answer))), answer.target)


def _as_chat(req: ParsedRequest, chat: dict[str, Any]) -> ParsedRequest:
    """The translated request, accounted as the Messages request it stands for."""
    return ParsedRequest(Capability.chat, chat, orjson.dumps(chat), asked=req.capability)


def _answer(completed: Completed) -> dict[str, Any]:
    """The engine's chat answer, decoded; a 502 where it is no JSON object."""
    try:
        answer = orjson.loads(completed.body)
    except orjson.JSONDecodeError:
        answer = None
    if not isinstance(answer, dict):
        raise OpenAIError(502, f"cluster '{completed.target.cluster}' endpoint '{completed.target.endpoint}' "
                               f"answered with no JSON object: {completed.body[:200]!r}. Retry; if it persists, "
                               "the engine is not OpenAI-compatible.", type="api_error")
    return answer


class NativeEvents:
    """A native Messages stream: the engine's events go on as they came; an error after the status line is
    Anthropic's ``event: error``."""

    @staticmethod
    def feed(data: bytes) -> bytes:
        return data

    @staticmethod
    def finish() -> bytes:
        return b""

    @staticmethod
    def fail(error: OpenAIError) -> bytes:
        return error_event(error.status, error.message)


class TranslatedEvents:
    """The engine's chat stream as Anthropic's events, chunk by chunk (``messages.stream``)."""

    def __init__(self, translation: ChatTranslation) -> None:
        self._reader = ChatChunkReader()
        self._translator = StreamTranslator(translation)

    def feed(self, data: bytes) -> bytes:
        try:
            chunks = self._reader.feed(data)
        except OpenAIError as exc:  # an event no engine writes: the stream ends with the error
            return self.fail(exc)
        return b"".join(event for chunk in chunks for event in self._translator.feed(chunk))

    def finish(self) -> bytes:
        return b"".join(self._translator.finish())

    def fail(self, error: OpenAIError) -> bytes:
        return b"".join(self._translator.fail(error))
