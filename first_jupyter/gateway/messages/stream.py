"""An engine's chat-completion stream as Anthropic's stream of events, translated chunk by chunk.

The gateway relays streams as they come, never whole, so the translation is incremental: ``ChatChunkReader``
turns the engine's bytes into chunk dicts as they arrive, and ``StreamTranslator`` turns each chunk into the
Anthropic events it implies, as SSE bytes (``event: X\\ndata: {...}\\n\\n``) ready to write:

``message_start`` (and a ``ping``) with the first chunk; ``content_block_start`` / ``content_block_delta`` /
``content_block_stop`` for the text (``text_delta``) and for each tool call (one ``tool_use`` block per tool-call
index, its arguments as ``input_json_delta`` pieces as they come); and at the end ``message_delta`` with the stop
reason and the usage (the engine sends its usage last, so it waits for ``finish``), then ``message_stop``.

Anthropic's blocks come one after another, so a block is closed when the next one starts. Engines stream each
tool call whole before the next; arguments that still came for a closed tool block would go to its index, which
Anthropic's clients accumulate, rather than be lost.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from first_jupyter.gateway.messages.errors import error_event, stream_error_event
from first_jupyter.gateway.messages.request import ChatTranslation
from first_jupyter.gateway.messages.response import message_id, stop_reason, tool_use_id, usage
from first_jupyter.protocol import OpenAIError

MAX_EVENT: Final = 1 << 20
"""An engine's SSE event still unfinished past this many bytes fails the stream: memory per stream is bounded."""


def _sse(kind: str, payload: dict[str, Any]) -> bytes:
    """One Anthropic event: its type as the SSE ``event`` and in the data, as Anthropic writes them."""
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **payload}) + b"\n\n"


class ChatChunkReader:
    """An engine's SSE bytes, cut anywhere, as the JSON objects of its ``data:`` events, in order.

    ``data: [DONE]`` sets ``done``; comments and other fields are skipped. Line ends may be LF or CRLF.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self.done = False
        """Whether the engine said ``data: [DONE]``: the stream ended as it should."""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The chunks completed by ``data``; an unfinished event waits for the next bytes."""
        events = (self._buffer + data).replace(b"\r\n", b"\n").split(b"\n\n")
        self._buffer = events.pop()
        if len(self._buffer) > MAX_EVENT:
            raise OpenAIError(502, f"The engine sent a stream event over {MAX_EVENT:,} bytes long; the stream is "
                                   "ended. Retry; if it persists, the engine's stream is broken.", type="api_error")
        return [chunk for event in events if (chunk := self._chunk(event)) is not None]

    def _chunk(self, event: bytes) -> dict[str, Any] | None:
        lines = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        if not lines:
            return None
        data = b"\n".join(lines)
        if data == b"[DONE]":
            self.done = True
            return None
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            chunk = None
        if not isinstance(chunk, dict):
            raise OpenAIError(502, f"The engine's stream holds an event that is no JSON object: {data[:200]!r}. "
                                   "Retry; if it persists, the engine is not OpenAI-compatible.", type="api_error")
        return chunk


class StreamTranslator:
    """Chat-completion chunks in, Anthropic events out: ``feed`` each chunk, then ``finish`` at the stream's end
    (``data: [DONE]``, or the engine closing it), or ``fail`` when it broke. Nothing comes after an error event."""

    def __init__(self, translation: ChatTranslation) -> None:
        self._translation = translation
        self._started = False
        self._ended = False
        self._next_block = 0
        self._open: int | None = None  # the index of the block now open
        self._text_block: int | None = None  # the same, while it is a text block
        self._tool_blocks: dict[int, int] = {}  # a tool call's index in the chat stream -> its block's index
        self._finish_reason: Any = None
        self._matched: Any = None
        self._usage: Any = None

    def feed(self, chunk: dict[str, Any]) -> list[bytes]:
        """The events one chunk implies (none for a chunk that carries only usage)."""
        if self._ended:
            return []
        if "error" in chunk or chunk.get("object") == "error":  # an engine failing mid-stream: OpenAI's, vLLM's
            self._ended = True
            return [stream_error_event(chunk)]
        events = [] if self._started else self._start(chunk)
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # (one answer is asked for; a second choice would belong to no message)
            delta = given if isinstance(given := choice.get("delta"), dict) else {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                events += self._text(text)
            for call in delta.get("tool_calls") or ():
                events += self._tool_call(call)
            if choice.get("finish_reason") is not None:
                self._finish_reason = choice["finish_reason"]
                self._matched = choice.get("stop_reason")
        return events

    def finish(self) -> list[bytes]:
        """The last events: the open block closed, ``message_delta`` with stop reason and usage, ``message_stop``;
        an error event instead when the engine ended without saying why it stopped (an answer cut short)."""
        if self._ended:
            return []
        if not self._started or self._finish_reason is None:
            what = "before it sent anything" if not self._started else "without saying why it stopped"
            return self.fail(OpenAIError(502, f"The engine ended the stream {what}, so the answer may be cut short. "
                                              "Retry.", type="api_error"))
        self._ended = True
        reason, sequence = stop_reason(self._finish_reason, self._matched, self._translation,
                                       used_tools=bool(self._tool_blocks))
        return [*self._close(), _sse("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                                      "usage": usage(self._usage)}),
                _sse("message_stop", {})]

    def fail(self, error: OpenAIError) -> list[bytes]:
        """An ``event: error`` for a failure after the stream began (the engine gone, a timeout): its status picks
        the event's type, as it would have picked the answer's status. The stream ends with it."""
        if self._ended:
            return []
        self._ended = True
        return [error_event(error.status, error.message)]

    def _start(self, chunk: dict[str, Any]) -> list[bytes]:
        self._started = True
        message = {"id": message_id(chunk.get("id")), "type": "message", "role": "assistant",
                   "model": self._translation.model, "content": [], "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": usage(chunk.get("usage"))["input_tokens"], "output_tokens": 0}}
        return [_sse("message_start", {"message": message}), _sse("ping", {})]

    def _text(self, text: str) -> list[bytes]:
        events = []
        if self._text_block is None:
            block = self._next_block
            events = self._open_block({"type": "text", "text": ""})
            self._text_block = block
        return [*events, self._delta(self._text_block, {"type": "text_delta", "text": text})]

    def _tool_call(self, call: Any) -> list[bytes]:
        if not isinstance(call, dict):
            return []
        index = call.get("index", 0)
        function = given if isinstance(given := call.get("function"), dict) else {}
        events = []
        block = self._tool_blocks.get(index)
        if block is None:
            block = self._next_block
            self._tool_blocks[index] = block
            events = self._open_block({"type": "tool_use", "id": tool_use_id(call.get("id")),
                                       "name": function.get("name") or "",
                                       "input": {}})
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            events.append(self._delta(block, {"type": "input_json_delta", "partial_json": arguments}))
        return events

    def _open_block(self, block: dict[str, Any]) -> list[bytes]:
        events = self._close()
        self._open = self._next_block
        self._next_block += 1
        return [*events, _sse("content_block_start", {"index": self._open, "content_block": block})]

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        events = [_sse("content_block_stop", {"index": self._open})]
        self._open = self._text_block = None
        return events

    @staticmethod
    def _delta(index: int, delta: dict[str, Any]) -> bytes:
        return _sse("content_block_delta", {"index": index, "delta": delta})
