"""The fake upstream's Responses API, as vLLM and OpenAI serve it: created responses are kept, and can be
retrieved, deleted, cancelled (a background one) and their input items listed; a follow-up turn must name a kept
``previous_response_id``, or it is refused 404 as an engine that never created it refuses it.

So a test proves that the gateway sends a response's later calls to the engine that created it: any other engine
(another fake) answers 404. Streams are OpenAI's events, each an ``event:`` line and a ``data:`` line, ending with
``response.completed`` and its usage (no ``[DONE]``). A stream's events are rendered once per model and only the
response id is put into each request's copy, so that the bench measures the gateway, not this fake.
"""

from __future__ import annotations

import itertools
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import parse_qsl

import orjson

PATH: Final = b"/v1/responses"
_ID_MARK: Final = "resp_" + "0" * 24
"""Where each request's own id goes in the rendered bytes: an id of the same length, so chunk sizes hold."""
_MESSAGE_ID: Final = "msg_fake"
_MOST_KEPT: Final = 10_000


class Rendered:
    """What a renderer needs of the fake: its tokens, usage figures and framing, passed in to avoid a cycle."""

    def __init__(self, tokens: tuple[str, ...], prompt_tokens: int, created: int) -> None:
        self.tokens = tokens
        self.usage = {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": len(tokens), "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": prompt_tokens + len(tokens)}
        self.created = created


class _Kept:
    """One kept response: its object, as the engine answers it, and its input items."""

    __slots__ = ("body", "items")

    def __init__(self, body: dict[str, Any], items: list[dict[str, Any]]) -> None:
        self.body = body
        self.items = items


def _input_items(request: dict[str, Any], response_id: str) -> list[dict[str, Any]]:
    """A request's ``input`` as the input items the engine lists: a string is one user message."""
    given = request.get("input")
    if isinstance(given, str):
        given = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": given}]}]
    items = [item for item in given if isinstance(item, dict)] if isinstance(given, list) else []
    return [{"id": f"in_{response_id[5:]}_{i}", **item} for i, item in enumerate(items)]


def _error(status: int, message: str, param: str | None = None) -> tuple[int, bytes]:
    return status, orjson.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                           "code": None}})


class FakeResponses:
    """The Responses routes of one fake upstream; ``framed(status, body, close)`` frames a JSON answer, ``chunk``
    an event as one HTTP chunk."""

    def __init__(self, rendered: Rendered, framed: Callable[[int, bytes, bool], bytes],
                 chunk: Callable[[bytes], bytes]) -> None:
        self._rendered = rendered
        self._framed = framed
        self._chunk = chunk
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(4)
        """Ids unique across fakes, as engines' (uuids) are: a gateway in front of two must never mistake one
        engine's response for the other's."""
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._streams: dict[str, tuple[bytes, ...]] = {}

    def _response(self, response_id: str, model: str, request: dict[str, Any], status: str,
                  output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        return {"id": response_id, "object": "response", "created_at": self._rendered.created, "status": status,
                "background": request.get("background") is True, "error": None, "incomplete_details": None,
                "instructions": None, "model": model, "output": output, "parallel_tool_calls": True,
                "previous_response_id": request.get("previous_response_id"), "store": request.get("store", True),
                "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto", "tools": [],
                "top_p": 1.0, "truncation": "disabled", "usage": usage, "metadata": {}}

    def _message(self, status: str = "completed") -> dict[str, Any]:
        text = "".join(self._rendered.tokens) if status == "completed" else ""
        content = [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []
        return {"id": _MESSAGE_ID, "type": "message", "status": status, "role": "assistant", "content": content}

    def create(self, request: dict[str, Any], model: str) -> tuple[int, bytes] | list[bytes]:
        """A created response: its JSON answer (status, body), or its stream's events, each an HTTP chunk."""
        previous = request.get("previous_response_id")
        if previous is not None and previous not in self._kept:
            return _error(404, f"Previous response with id '{previous}' not found.", "previous_response_id")
        response_id = f"resp_{self._prefix}{next(self._ids):016x}"
        background = request.get("background") is True
        status = "queued" if background else "completed"
        body = self._response(response_id, model, request, status, [] if background else [self._message()],
                              None if background else self._rendered.usage)
        if request.get("store", True) is not False:
            self._kept[response_id] = _Kept(body, _input_items(request, response_id))
            if len(self._kept) > _MOST_KEPT:
                self._kept.popitem(last=False)
        if request.get("stream") is not True:
            return 200, orjson.dumps(body)
        events = self._streams.get(model)
        if events is None:
            events = self._streams[model] = self._render_stream(model)
        mark, own = _ID_MARK.encode(), response_id.encode()
        return [event.replace(mark, own) if mark in event else event for event in events]

    def _render_stream(self, model: str) -> tuple[bytes, ...]:
        """The events of a streamed response, each an HTTP chunk, with ``_ID_MARK`` for its id."""
        started = self._response(_ID_MARK, model, {}, "in_progress", [], None)
        done = self._response(_ID_MARK, model, {}, "completed", [self._message()], self._rendered.usage)
        where = {"item_id": _MESSAGE_ID, "output_index": 0, "content_index": 0}
        text = "".join(self._rendered.tokens)
        events: list[tuple[str, dict[str, Any]]] = [
            ("response.created", {"response": started}),
            ("response.in_progress", {"response": started}),
            ("response.output_item.added", {"output_index": 0, "item": self._message("in_progress")}),
            ("response.content_part.added", {**where, "part": {"type": "output_text", "text": "",
                                                              "annotations": []}}),
            *(("response.output_text.delta", {**where, "delta": token, "logprobs": []})
              for token in self._rendered.tokens),
            ("response.output_text.done", {**where, "text": text, "logprobs": []}),
            ("response.content_part.done", {**where, "part": {"type": "output_text", "text": text,
                                                             "annotations": []}}),
            ("response.output_item.done", {"output_index": 0, "item": self._message()}),
            ("response.completed", {"response": done}),
        ]
        return tuple(self._chunk(b"event: %s\ndata: %s\n\n" % (kind.encode(), orjson.dumps(
            {"type": kind, "sequence_number": number, **fields}))) for number, (kind, fields) in enumerate(events))

    def call(self, method: bytes, path: bytes, head: bytes, close: bool) -> bytes:
        """``GET``/``DELETE /v1/responses/{id}``, ``POST .../cancel``, ``GET .../input_items`` (query: ``limit``,
        ``order``), framed."""
        response_id, _, action = path[len(PATH) + 1:].decode("latin-1").partition("/")
        target = head[:head.find(b"\r\n")].split(b" ")[1]
        query = dict(parse_qsl(target.partition(b"?")[2].decode("latin-1")))
        return self._framed(*self._on_kept(method.decode("latin-1"), response_id, action, query), close)

    def _on_kept(self, method: str, response_id: str, action: str, query: dict[str, str]) -> tuple[int, bytes]:
        allowed = {"": ("GET", "DELETE"), "cancel": ("POST",), "input_items": ("GET",)}.get(action)
        if allowed is None:
            return _error(404, f"Invalid URL ({method} /v1/responses/{response_id}/{action})")
        if method not in allowed:
            return _error(405, f"use {' or '.join(allowed)}")
        kept = self._kept.get(response_id)
        if kept is None:
            return _error(404, f"Response with id '{response_id}' not found.")
        if action == "input_items":
            items = kept.items if query.get("order", "desc") == "asc" else kept.items[::-1]
            page = items[:int(query.get("limit", "20"))]
            return 200, orjson.dumps({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                                      "last_id": page[-1]["id"] if page else None,
                                      "has_more": len(page) < len(items)})
        if action == "cancel":
            if not kept.body["background"]:
                return _error(400, "Only responses created with background=true can be cancelled.")
            kept.body["status"] = "cancelled"
        if method == "DELETE":
            del self._kept[response_id]
            return 200, orjson.dumps({"id": response_id, "object": "response.deleted", "deleted": True})
        return 200, orjson.dumps(kept.body)

