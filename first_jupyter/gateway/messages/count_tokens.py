"""``POST /v1/messages/count_tokens`` for an engine without the Messages API: counted by the engine, exactly.

A count must come from the model's own tokenizer and chat template, which only the engine holds; an estimate
here would be a number that looks exact and is not. So the request is translated like a Messages request (its
prompt-making part: system, messages, tools) and the engine counts it, one of two ways, which the gateway picks:

* ``tokenize_body`` -> the engine's ``POST /tokenize`` (vLLM; at the server's root, not under ``/v1``), which
  applies the chat template with the generation prompt and answers ``count``: no generation at all;
* ``probe_body`` -> ``POST /v1/chat/completions`` with ``max_tokens: 1`` (every OpenAI-compatible engine,
  ``transformers serve`` included), whose ``usage.prompt_tokens`` is the count of that same prompt, paid for
  with one generated token.

Either answer becomes ``{"input_tokens": n}`` (``from_tokenize``, ``from_chat``). ``tool_choice`` is left out of
both: it does not change the prompt, and on ``/tokenize`` it is no field at all.
"""

from __future__ import annotations

from typing import Any

from first_jupyter.gateway.messages.request import chat_conversation
from first_jupyter.protocol import OpenAIError

_NOT_PROMPT = ("tool_choice", "parallel_tool_calls")


def tokenize_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body for the engine's ``POST /tokenize`` that counts this ``count_tokens`` request's prompt."""
    chat = _prompt(body)
    chat["add_generation_prompt"] = True
    return chat


def probe_body(body: dict[str, Any]) -> dict[str, Any]:
    """The body for the engine's ``POST /v1/chat/completions`` whose usage counts this request's prompt."""
    chat = _prompt(body)
    chat["max_tokens"] = 1
    chat["stream"] = False
    return chat


def from_tokenize(answer: dict[str, Any]) -> dict[str, int]:
    """``{"input_tokens": n}`` from the engine's ``/tokenize`` answer."""
    return {"input_tokens": _tokens(answer.get("count"), "/tokenize answered no 'count'")}


def from_chat(answer: dict[str, Any]) -> dict[str, int]:
    """``{"input_tokens": n}`` from the usage of the engine's answer to ``probe_body``."""
    usage = answer.get("usage")
    found = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return {"input_tokens": _tokens(found, "its chat answer reported no usage.prompt_tokens")}


def _prompt(body: dict[str, Any]) -> dict[str, Any]:
    chat = chat_conversation(body)
    for name in _NOT_PROMPT:
        chat.pop(name, None)
    return chat


def _tokens(value: Any, missing: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise OpenAIError(502, f"The engine could not count the tokens: {missing}. Retry; if it persists, this "
                           "engine cannot count tokens for /v1/messages/count_tokens.", type="api_error")
