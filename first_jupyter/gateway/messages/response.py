"""An engine's chat completion as Anthropic's Message, and the pieces the stream translation shares with it.

The Message carries the model as the client named it, the answer's text and tool calls as ``text`` and
``tool_use`` blocks (in that order, as a chat message holds them), ``stop_reason`` from ``finish_reason``, and
the engine's token counts as ``usage``. A reasoning engine's ``reasoning_content`` is left out: Anthropic's
``thinking`` blocks carry a signature no engine can make, and clients check it.
"""

from __future__ import annotations

import uuid
from typing import Any, Final

import orjson

from first_jupyter.gateway.messages.request import ChatTranslation
from first_jupyter.protocol import OpenAIError

_STOP_REASONS: Final[dict[str, str]] = {
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
"""``finish_reason`` to ``stop_reason``; ``stop`` (and anything an engine invents) is decided in ``stop_reason``."""


def stop_reason(finish_reason: Any, matched: Any, translation: ChatTranslation,
                used_tools: bool) -> tuple[str, str | None]:
    """``stop_reason`` and ``stop_sequence`` for an answer that ended with ``finish_reason``.

    ``matched`` is what vLLM puts in a choice's ``stop_reason``: the stop string that ended the answer, or None
    at the end of the turn. Engines that say nothing of it (``transformers serve``) answer ``end_turn`` for a stop
    sequence too: the matched string is cut from the text, so nothing else can tell. An answer that called tools
    and then ``stop``-ped (vLLM, with a named tool choice) is ``tool_use``, so that a client's tool loop runs it.
    """
    if finish_reason in _STOP_REASONS:
        return _STOP_REASONS[finish_reason], None
    if isinstance(matched, str) and matched in translation.stop_sequences:
        return "stop_sequence", matched
    return ("tool_use" if used_tools else "end_turn"), None


def message_id(upstream_id: Any) -> str:
    """A Message id from the engine's completion id, so that the two can be matched in logs."""
    if isinstance(upstream_id, str) and upstream_id:
        return "msg_" + upstream_id.removeprefix("chatcmpl-")
    return "msg_" + uuid.uuid4().hex


def tool_use_id(call_id: Any) -> str:
    """A ``tool_use`` id: the engine's tool-call id as it is, since the client sends it back in its
    ``tool_result`` and the engine must know it again; a fresh one where the engine gave none."""
    return call_id if isinstance(call_id, str) and call_id else "toolu_" + uuid.uuid4().hex


def usage(chat_usage: Any) -> dict[str, int]:
    """Anthropic's usage from the engine's; 0 where the engine reported no count (an engine that ignores
    ``stream_options``), since Anthropic's clients require the numbers."""
    found = chat_usage if isinstance(chat_usage, dict) else {}
    return {"input_tokens": _count(found.get("prompt_tokens")), "output_tokens": _count(found.get("completion_tokens"))}


def _tool_input(arguments: Any, name: Any) -> dict[str, Any]:
    """A tool call's arguments, a JSON string, as the object Anthropic's ``tool_use.input`` is."""
    if arguments is None or arguments == "":
        return {}
    try:
        parsed = orjson.loads(arguments) if isinstance(arguments, str) else arguments
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(502, f"The engine called the tool {name!r} with arguments that are not JSON ({exc}): "
                               f"{str(arguments)[:200]!r}. Retry; a model that does this often needs a tool parser "
                               "on the engine (vLLM's --tool-call-parser).", type="api_error") from None
    if not isinstance(parsed, dict):
        raise OpenAIError(502, f"The engine called the tool {name!r} with arguments that are no JSON object: "
                               f"{str(arguments)[:200]!r}. Retry.", type="api_error")
    return parsed


def message_from_chat(answer: dict[str, Any], translation: ChatTranslation) -> dict[str, Any]:
    """The Message for the engine's (non-streamed) chat completion."""
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise OpenAIError(502, "The engine's answer holds no choices, so there is no message to return. Retry; "
                               "if it persists, the engine is not OpenAI-compatible.", type="api_error")
    choice = choices[0]
    message = given if isinstance(given := choice.get("message"), dict) else {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise OpenAIError(502, f"The engine's answer holds a tool call that is not OpenAI's shape: {call!r:.200}. "
                                   "Retry; if it persists, the engine is not OpenAI-compatible.", type="api_error")
        name = function.get("name")
        content.append({"type": "tool_use", "id": tool_use_id(call.get("id")), "name": name,
                        "input": _tool_input(function.get("arguments"), name)})
    reason, sequence = stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), translation,
                                   used_tools=any(block["type"] == "tool_use" for block in content))
    return {"id": message_id(answer.get("id")), "type": "message", "role": "assistant", "model": translation.model,
            "content": content, "stop_reason": reason, "stop_sequence": sequence, "usage": usage(answer.get("usage"))}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
