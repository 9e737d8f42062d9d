"""A Messages request as a chat-completions request, for an engine that serves only the latter.

What it translates:

* ``system`` (a string, or text blocks) becomes the first, ``system`` message;
* content blocks: ``text`` and ``image`` (``base64`` and ``url`` sources, as ``image_url`` parts); an
  assistant's ``tool_use`` blocks become its ``tool_calls``; a user's ``tool_result`` blocks become ``tool``
  messages, in order, before the rest of that user turn (images in a tool result go there too: a chat tool
  message holds text only); ``thinking`` blocks of earlier turns are dropped, as chat templates drop reasoning;
* ``tools`` (custom tools) become function tools, ``tool_choice`` auto/any/tool/none becomes auto/required/the
  named function/none, and ``disable_parallel_tool_use`` becomes ``parallel_tool_calls: false``;
* ``max_tokens``, ``temperature``, ``top_p``, ``stop_sequences`` (as ``stop``), ``top_k`` where the engine takes
  it, ``metadata.user_id`` (as ``user``), ``stream`` (asking for the usage event Anthropic's stream ends with);
* ``output_config``: its JSON-schema ``format`` as ``response_format``, its ``effort`` as ``reasoning_effort``.

Text-only content is sent as one string (text blocks joined by a newline, as vLLM joins text parts): many chat
templates render only string content. Every field this module does not know goes to the engine untouched, as on
the chat route, so that the engine judges its own parameters (vLLM's ``chat_template_kwargs``, say).

Validation goes only as far as translation needs, and each refusal is an ``OpenAIError(400)`` naming the field,
which the door answers in Anthropic's shape (``errors.from_openai_error``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import orjson

from first_jupyter.protocol import OpenAIError, shown

DROPPED: Final = frozenset({"service_tier", "cache_control", "inference_geo", "speed", "diagnostics",
                            "workspace_id", "user_profile_id"})
"""Hints for Anthropic's platform (its prompt cache, tiers, regions, accounts) that no engine acts on and an engine
may refuse (OpenAI's ``service_tier`` takes other values; ``transformers serve`` refuses unknown fields): dropped
rather than passed. Fields that ask for a feature (``thinking``, ``container``) go on, for the engine to judge."""

_TRANSLATED: Final = frozenset({"model", "messages", "system", "tools", "tool_choice", "max_tokens", "stop_sequences",
                                "stream", "metadata", "top_k", "output_config"})
"""Fields this module rewrites; ``temperature`` and ``top_p`` mean the same in both APIs and pass as they are."""

_TOOL_CHOICES: Final[dict[str, str]] = {"auto": "auto", "any": "required", "none": "none"}
_PARTS_SEPARATOR: Final = "\n"


@dataclass(frozen=True, slots=True)
class ChatTranslation:
    """A Messages request translated: the chat body for the engine, and what translating its answer needs."""

    chat: dict[str, Any]
    """The chat-completions request body, ``model`` as the client named it (the gateway routes on it)."""
    model: str
    """The model as the client named it, which every Message and stream event carries."""
    stream: bool
    stop_sequences: tuple[str, ...]
    """The client's stop sequences, to tell ``stop_sequence`` from ``end_turn`` when the engine says which one
    matched."""


def decode(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; a clear 400 for anything else."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(400, f"The request body is not valid JSON ({exc}). Send a JSON object with "
                               "'Content-Type: application/json'.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, 'The request body must be a JSON object, e.g. {"model": "...", "max_tokens": 256, '
                               '"messages": [{"role": "user", "content": "Hello"}]}.', code="invalid_json")
    return body


def to_chat(body: dict[str, Any], *, engine_takes_top_k: bool = True) -> ChatTranslation:
    """Translate a ``POST /v1/messages`` body. ``engine_takes_top_k``: false for an engine that refuses fields
    outside OpenAI's schema (``transformers serve`` answers 422 to ``top_k``), where it is left out."""
    chat = chat_conversation(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise _missing("max_tokens", 'the most tokens to generate, e.g. "max_tokens": 1024')
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _invalid("max_tokens", f"must be a whole number of at least 1, not {shown(max_tokens)}")
    chat["max_tokens"] = max_tokens
    stop_sequences = body.get("stop_sequences")
    if stop_sequences is not None:
        chat["stop"] = stop_sequences
    stream = body.get("stream") is True
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}  # Anthropic's stream ends with the usage
    elif "stream" in body:
        chat["stream"] = body["stream"]  # false, or a wrong value the engine judges as on the chat route
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise _invalid("metadata", 'must be an object, e.g. {"user_id": "..."}')
    if metadata and metadata.get("user_id") is not None:
        chat["user"] = metadata["user_id"]
    if engine_takes_top_k and "top_k" in body:
        chat["top_k"] = body["top_k"]
    if body.get("output_config") is not None:
        chat.update(_output_config(body["output_config"]))
    stops = tuple(s for s in stop_sequences if isinstance(s, str)) if isinstance(stop_sequences, list) else ()
    return ChatTranslation(chat=chat, model=chat["model"], stream=stream, stop_sequences=stops)


def chat_conversation(body: dict[str, Any]) -> dict[str, Any]:
    """The part of a chat request that makes the prompt (model, messages, tools, tool choice, and the fields
    passed through), shared by a Messages request and a ``count_tokens`` one, which has no ``max_tokens``."""
    model = body.get("model")
    if model is None:
        raise _missing("model", 'the model to use, e.g. "model": "<id>"; GET /v1/models lists the ids')
    if not isinstance(model, str) or not model:
        raise _invalid("model", "must be a model id (a non-empty string); GET /v1/models lists the ids")
    messages = body.get("messages")
    if messages is None:
        raise _missing("messages", 'the conversation, e.g. "messages": [{"role": "user", "content": "Hello"}]')
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", 'must be a non-empty list, e.g. [{"role": "user", "content": "Hello"}]')
    chat: dict[str, Any] = {key: value for key, value in body.items() if key not in _TRANSLATED | DROPPED}
    chat["model"] = model
    chat["messages"] = _chat_messages(body.get("system"), messages)
    tools = body.get("tools")
    if tools is not None:
        chat["tools"] = _tools(tools)
    tool_choice = body.get("tool_choice")
    if tool_choice is not None:
        chat.update(_tool_choice(tool_choice))
    return chat


def _chat_messages(system: Any, messages: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if system is not None:
        out.append({"role": "system", "content": _system(system)})
    for i, message in enumerate(messages):
        out.extend(_message(message, f"messages[{i}]"))
    return out


def _system(system: Any) -> str:
    """The system prompt as one string: chat templates put it in one place, as text."""
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise _invalid("system", "must be a string or a list of text blocks")
    return _PARTS_SEPARATOR.join(_text(block, f"system[{i}]") for i, block in enumerate(system))


def _message(message: Any, path: str) -> list[dict[str, Any]]:
    """One Anthropic message as the chat messages it becomes (a user turn with tool results becomes several)."""
    if not isinstance(message, dict):
        raise _invalid(path, 'must be an object, e.g. {"role": "user", "content": "Hello"}')
    role = message.get("role")
    if role not in ("user", "assistant"):
        raise _invalid(f"{path}.role", f"must be 'user' or 'assistant', not {shown(role)}; a system prompt goes in "
                                       "the top-level 'system' field")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list) or not content:
        raise _invalid(f"{path}.content", "must be a string or a non-empty list of content blocks")
    blocks = [(block, f"{path}.content[{j}]") for j, block in enumerate(content)]
    return _assistant_turn(blocks) if role == "assistant" else _user_turn(blocks)


def _user_turn(blocks: list[tuple[Any, str]]) -> list[dict[str, Any]]:
    """Tool results first, as ``tool`` messages in their order (a chat template wants them right after the
    assistant's calls), then the rest of the turn as one user message."""
    tool_messages: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block, path in blocks:
        kind = _block_type(block, path)
        if kind == "tool_result":
            tool_message, images = _tool_result(block, path)
            tool_messages.append(tool_message)
            parts.extend(images)
        elif kind in _PART_OF:
            parts.append(_PART_OF[kind](block, path))
        else:
            raise _unsupported(kind, path, "user")
    return tool_messages + ([{"role": "user", "content": _content(parts)}] if parts else [])


def _assistant_turn(blocks: list[tuple[Any, str]]) -> list[dict[str, Any]]:
    texts: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    for block, path in blocks:
        kind = _block_type(block, path)
        if kind == "text":
            texts.append(_text(block, path))
        elif kind == "tool_use":
            tool_calls.append(_tool_call(block, path))
        elif kind not in ("thinking", "redacted_thinking"):
            raise _unsupported(kind, path, "assistant")
    message: dict[str, Any] = {"role": "assistant",
                               "content": _PARTS_SEPARATOR.join(texts) if texts or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return [message]


def _block_type(block: Any, path: str) -> str:
    if not isinstance(block, dict) or not isinstance(kind := block.get("type"), str):
        raise _invalid(path, 'must be a content block with a "type", e.g. {"type": "text", "text": "Hello"}')
    return kind


def _text(block: Any, path: str) -> str:
    if _block_type(block, path) != "text":
        raise _invalid(f"{path}.type", f"must be 'text' here, not {shown(block['type'])}")
    return _string(block, "text", path)


def _text_part(block: dict[str, Any], path: str) -> dict[str, Any]:
    return {"type": "text", "text": _string(block, "text", path)}


def _image_part(block: dict[str, Any], path: str) -> dict[str, Any]:
    """An image block as an ``image_url`` part: a URL as it is, base64 data as a ``data:`` URL."""
    source = block.get("source")
    where = f"{path}.source"
    if not isinstance(source, dict):
        raise _invalid(where, 'must be {"type": "base64", "media_type": "image/png", "data": "..."} or '
                              '{"type": "url", "url": "https://..."}')
    kind = source.get("type")
    if kind == "base64":
        media_type = _string(source, "media_type", where)
        url = f"data:{media_type};base64,{_string(source, 'data', where)}"
    elif kind == "url":
        url = _string(source, "url", where)
    else:
        raise _invalid(f"{where}.type", f"must be 'base64' or 'url', not {shown(kind)}: the engine behind this gateway "
                                        "cannot read Anthropic's Files API; send the image itself")
    return {"type": "image_url", "image_url": {"url": url}}


_PART_OF: Final[dict[str, Callable[[dict[str, Any], str], dict[str, Any]]]] = {"text": _text_part,
                                                                               "image": _image_part}
"""The blocks a user turn (and a tool result) may hold besides tool results, and the chat part each becomes."""


def _tool_result(block: dict[str, Any], path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A ``tool_result`` as a ``tool`` message, and its images, which a tool message cannot hold.

    ``is_error`` has no place in a chat message and is left out: the result's text is what says it failed.
    """
    tool_use_id = _string(block, "tool_use_id", path)
    content = block.get("content", "")
    if isinstance(content, str):
        return {"role": "tool", "tool_call_id": tool_use_id, "content": content}, []
    if not isinstance(content, list):
        raise _invalid(f"{path}.content", "must be a string or a list of text and image blocks")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    for k, item in enumerate(content):
        where = f"{path}.content[{k}]"
        kind = _block_type(item, where)
        if kind == "text":
            texts.append(_string(item, "text", where))
        elif kind == "image":
            images.append(_image_part(item, where))
        else:
            raise _unsupported(kind, where, "tool_result")
    return {"role": "tool", "tool_call_id": tool_use_id, "content": _PARTS_SEPARATOR.join(texts)}, images


def _tool_call(block: dict[str, Any], path: str) -> dict[str, Any]:
    arguments = block.get("input", {})
    if not isinstance(arguments, dict):
        raise _invalid(f"{path}.input", "must be an object: the tool's arguments")
    return {"id": _string(block, "id", path), "type": "function",
            "function": {"name": _string(block, "name", path), "arguments": orjson.dumps(arguments).decode()}}


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text alone as one string, which every chat template renders; with images, the parts as they are."""
    if all(part["type"] == "text" for part in parts):
        return _PARTS_SEPARATOR.join(part["text"] for part in parts)
    return parts


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _invalid("tools", 'must be a list of tools, e.g. [{"name": "...", "input_schema": {...}}]')
    out = []
    for i, tool in enumerate(tools):
        path = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _invalid(path, 'must be an object {"name": "...", "description": "...", "input_schema": {...}}')
        kind = tool.get("type", "custom")
        if kind != "custom":
            raise _invalid(f"{path}.type", f"{shown(kind)} is one of Anthropic's server tools, which this engine "
                                           "cannot run; define the tool yourself with a name and an input_schema")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise _invalid(f"{path}.input_schema", 'must be a JSON schema object, e.g. {"type": "object", '
                                                   '"properties": {...}}')
        function: dict[str, Any] = {"name": _string(tool, "name", path), "parameters": schema}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(choice: Any) -> dict[str, Any]:
    """The chat fields for a ``tool_choice``: ``tool_choice`` and, when asked, ``parallel_tool_calls``."""
    if not isinstance(choice, dict):
        raise _invalid("tool_choice", 'must be an object, e.g. {"type": "auto"}')
    kind = choice.get("type")
    fields: dict[str, Any]
    if kind == "tool":
        fields = {"tool_choice": {"type": "function", "function": {"name": _string(choice, "name", "tool_choice")}}}
    elif kind in _TOOL_CHOICES:
        fields = {"tool_choice": _TOOL_CHOICES[kind]}
    else:
        raise _invalid("tool_choice.type", f"must be 'auto', 'any', 'tool' or 'none', not {shown(kind)}")
    if choice.get("disable_parallel_tool_use") is True:
        fields["parallel_tool_calls"] = False
    return fields


def _output_config(config: Any) -> dict[str, Any]:
    """The chat fields for ``output_config``: a JSON schema the answer must follow, and the reasoning effort."""
    if not isinstance(config, dict):
        raise _invalid("output_config", 'must be an object, e.g. {"format": {"type": "json_schema", "schema": {...}}}')
    fields: dict[str, Any] = {}
    output_format = config.get("format")
    if output_format is not None:
        if not isinstance(output_format, dict) or output_format.get("type") != "json_schema":
            raise _invalid("output_config.format", 'must be {"type": "json_schema", "schema": {...}}')
        schema = output_format.get("schema")
        if not isinstance(schema, dict):
            raise _invalid("output_config.format.schema", "must be a JSON schema object")
        fields["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
    if config.get("effort") is not None:
        fields["reasoning_effort"] = config["effort"]
    return fields


def _string(obj: dict[str, Any], name: str, path: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}"
        raise _invalid(f"{path}.{name}", f"must be a string, and is {what}")
    return value


def _unsupported(kind: str, path: str, where: str) -> OpenAIError:
    allowed = {"user": "text, image and tool_result", "assistant": "text, tool_use and thinking",
               "tool_result": "text and image"}[where]
    return _invalid(f"{path}.type", f"a {shown(kind)} block cannot be translated for this engine; a {where} block here "
                                    f"may be {allowed}")


def _invalid(field: str, why: str) -> OpenAIError:
    return OpenAIError(400, f"Invalid value for '{field}': {why}. Fix that field and send the request again.",
                       param=field, code="invalid_value")


def _missing(field: str, what: str) -> OpenAIError:
    return OpenAIError(400, f"Missing '{field}': the Messages API requires it. Add {what}, and send the request "
                            "again.", param=field, code="missing_field")
