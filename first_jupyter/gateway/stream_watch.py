"""Watching a relayed SSE stream: usage accounting, the model renamed, the usage-only event dropped.

Streams are relayed as the upstream's own bytes, chunk by chunk. Most events need nothing: a chunk of them costs
a check of its last bytes and two C-level byte searches, and goes on as it came, decoded by no one. An event is
parsed only when it may need something: when it carries a ``usage`` object (once per stream: the tokens are
counted, and the event is dropped if it is the usage-only event the client did not ask for), or when it holds the
engine's name for the model and the client asked for another (then that event is renamed). Such an event, and
only it, is parsed (orjson), changed and written anew; the events around it keep their bytes.

Why parse rather than match bytes: engines do not agree on spacing. Python's ``json.dumps`` writes
``"model": "x"`` and ``"choices": []`` where orjson writes ``"model":"x"``; a byte pattern written for one
spelling misses the other, and a usage-only event that slips through breaks every client that reads
``chunk.choices[0]``. A parsed event has one spelling. Byte searches only pick the events worth parsing, and they
err on the side of parsing: the parse decides.

The Responses API's events (``response.created``, ``response.output_text.delta``, ..., ``response.completed``)
go the same way: deltas carry neither the model nor a usage, so they cost what a chat chunk costs; the few events
that carry the whole response (its ``id``, ``model`` and, at the end, ``usage`` with ``input_tokens`` and
``output_tokens``) are the ones parsed, for the same reasons, and the response id is learned from the first.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import orjson

_SEPARATORS = (b"\n\n", b"\n\r\n", b"\r\r")
"""What ends an SSE event: a blank line after LF, CRLF or CR line ends (``\\r\\n\\r\\n`` ends with ``\\n\\r\\n``)."""
_USAGE_KEY = b'"usage"'
_USAGE_VALUE = re.compile(rb'"usage"\s*:\s*[^\sn]')
"""A ``usage`` key whose value is no ``null``: OpenAI writes ``"usage":null`` in every event once usage is asked
for, and those events need no parse. A filter only: the parse decides what the event holds."""
_MODEL_KEY = b'"model"'
"""What picks the events to parse while the engine's name for the model is not yet known."""
_MAX_EVENT = 1 << 20
"""An event still unfinished past this many bytes goes on unwatched rather than held: memory per stream has a
bound, whatever the upstream sends."""
_ESCAPED = re.compile(r"""[^\x20-\x7e]|["\\/<>&']""")
"""Characters some JSON encoder escapes: ``/`` (``\\/``), ``<>&'`` (Go's, HTML-safe encoders), all past ASCII."""

_MODEL = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.)*)"')
_USAGE = re.compile(rb'"usage"\s*:\s*(\{(?:[^{}]|\{[^{}]*\})*\})')
"""The usage object, whose token details (``prompt_tokens_details``, ...) may be objects one level deep."""


RESPONSE_ENDS = frozenset(("response.completed", "response.incomplete", "response.failed"))
"""The events that end a Responses API stream, each carrying the whole response."""


def _first_end(data: bytes, start: int = 0) -> int:
    """The index just past the first event separator at or after ``start``; -1 when there is none."""
    first = -1
    for sep in _SEPARATORS:
        at = data.find(sep, start)
        if at >= 0 and (first < 0 or at + len(sep) < first):
            first = at + len(sep)
    return first


def _last_end(data: bytes) -> int:
    """The index just past the last event separator; 0 when there is none."""
    last = 0
    for sep in _SEPARATORS:
        at = data.rfind(sep)
        if at >= 0 and at + len(sep) > last:
            last = at + len(sep)
    return last


def _may_change(partial: bytes) -> bool:
    """Whether an event of which only ``partial`` has come may need a rewrite, so must be held until its end.

    Not when its data is already seen to be no JSON object (``data: [DONE]``): such an event goes on at once, so
    that a last event the upstream never ends with a blank line still reaches the client.
    """
    if not partial.startswith(b"data:"):
        return True  # another field first (``event:``, ``id:``, a comment), or the first bytes of one
    head = partial[5:64].lstrip()
    return not head or head.startswith(b"{")


def _name_marker(name: str) -> bytes:
    """Bytes that every sane JSON spelling of ``name`` contains: its longest run of characters no encoder escapes.

    A name with no such run (all of it past ASCII, say) falls back on the ``"model"`` key: every event is then
    parsed, which is slower but misses none.
    """
    run = max(_ESCAPED.split(name), key=len)
    return run.encode() if run else _MODEL_KEY


def _single(event: bytes) -> tuple[Any, bytes] | None:
    """An event made of one data line and nothing else, parsed, and its separator; None when it is not that.

    The line is parsed as it stands: JSON allows the space after ``data:``, and a second line, field or event
    after the first is no whitespace, so fails the parse. This spares cutting the usual event into lines.
    """
    if not event.startswith(b"data:"):
        return None
    body = event.rstrip(b"\r\n")
    try:
        return orjson.loads(body[5:]), event[len(body):]
    except orjson.JSONDecodeError:
        return None


def _data_value(line: bytes) -> bytes:
    """The value of a ``data:`` line, less the one space that may follow the colon (the SSE rule)."""
    value = line[5:]
    return value[1:] if value.startswith(b" ") else value


class StreamWatch:
    """Watches the chunks of one stream: counts its tokens, renames its model, drops the usage-only event.

    ``rename``: put ``public_model`` where the engine names the model otherwise. The engine's name is learned from
    the first event that names one; if it is the public id already, nothing is renamed.

    ``strip_usage_event``: the gateway asked the engine for usage (``stream_options.include_usage``) on the
    client's behalf; the event that carries only usage (``"choices": []``) is removed so that the client sees the
    stream it asked for.

    An event cut between two chunks is held until its end has come (a client can use no part of an event before
    its blank line anyway); an event seen to need nothing goes on without waiting (see ``_may_change``). An event
    the upstream leaves unfinished when it breaks off is therefore not sent, and the error event that follows is
    not glued to half of it.
    """

    __slots__ = ("_carry", "_engine", "_marker", "_passing", "_public", "_renaming", "_strip", "_tail",
                 "completion_tokens", "on_response_done", "on_response_id", "prompt_tokens", "response_id")

    def __init__(self, public_model: str, *, rename: bool, strip_usage_event: bool) -> None:
        self._public = public_model
        self._renaming = rename
        self._engine: str | None = None
        """The engine's name for the model, once an event has said it."""
        self._marker: bytes | None = _MODEL_KEY if rename else None
        """Bytes every event to rename contains; None when no event needs a rename."""
        self._strip = strip_usage_event
        self._carry = b""
        """The start of an event whose end has not come yet."""
        self._passing = False
        """Within an event that goes on untouched as it comes, until its end."""
        self._tail = b""
        """While passing: the last bytes passed, where a separator cut between chunks begins."""
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.response_id: str | None = None
        """A Responses API stream's response id, once an event has carried the response."""
        self.on_response_id: Callable[[str], None] | None = None
        """Called once with ``response_id`` as soon as it is known (the response can be asked for at once)."""
        self.on_response_done: Callable[[dict[str, Any]], None] | None = None
        """Called with the whole response (its model renamed) from the event that ends a Responses API stream."""

    def feed(self, chunk: bytes) -> bytes:
        """Return the bytes to send on for this upstream chunk (empty while an event is still held)."""
        if self._passing:
            return self._pass_on(chunk)
        data = self._carry + chunk if self._carry else chunk
        if data.endswith(_SEPARATORS):  # engines mostly send whole events
            self._carry = b""
            marker = self._marker  # the test of _may_need, inline on the path every chunk takes
            if (marker is None or marker not in data) and (_USAGE_KEY not in data or
                                                           _USAGE_VALUE.search(data) is None):
                return data
            return self._complete(data)
        end = _last_end(data)
        partial = data[end:]
        whole = data[:end]
        out = self._complete(whole) if whole and self._may_need(whole) else whole
        if len(partial) <= _MAX_EVENT and _may_change(partial):
            self._carry = partial
            return out
        self._carry = b""
        self._passing = True
        self._tail = partial[-3:]
        return out + partial

    def finish(self) -> bytes:
        """At the stream's clean end: what is still held (a last event without its blank line), as it would have
        gone on had its end come."""
        held, self._carry = self._carry, b""
        return self._complete(held) if held and self._may_need(held) else held

    def _pass_on(self, chunk: bytes) -> bytes:
        """Pass bytes of an event that needs nothing until its end, then watch the events after it again."""
        probe = self._tail + chunk
        end = _first_end(probe)
        if end < 0:
            self._tail = probe[-3:]
            return chunk
        self._passing = False
        self._tail = b""
        cut = end - (len(probe) - len(chunk))  # >= 1: the tail holds no whole separator
        if cut >= len(chunk):
            return chunk
        return chunk[:cut] + self.feed(chunk[cut:])

    def _may_need(self, data: bytes) -> bool:
        """Whether some event in ``data`` may need a parse: a few byte searches, no decoding."""
        marker = self._marker
        if marker is not None and marker in data:
            return True
        return _USAGE_KEY in data and _USAGE_VALUE.search(data) is not None

    def _complete(self, data: bytes) -> bytes:
        """Whole events, those that need it rewritten or dropped; the rest keep their bytes."""
        single = _single(data)
        if single is not None:  # one event of one data line: most chunks, parsed without being cut up
            new = self._changed(*single)
            return data if new is None else new
        pieces: list[bytes] = []
        kept = 0  # data[kept:start] goes on as it came
        start = 0
        while start < len(data):
            end = _first_end(data, start)
            if end < 0:
                end = len(data)
            event = data[start:end]
            if self._may_need(event):
                new = self._rewritten(event)
                if new is not None:
                    pieces += (data[kept:start], new)
                    kept = end
            start = end
        if not pieces:
            return data
        pieces.append(data[kept:])
        return b"".join(pieces)

    def _rewritten(self, event: bytes) -> bytes | None:
        """One whole event parsed: b"" to drop it, its new bytes to rename it, None to keep it as it came."""
        single = _single(event)
        if single is not None:
            return self._changed(*single)
        body = event.rstrip(b"\r\n")  # other fields than data, or data over several lines
        lines = [line for line in body.splitlines() if line]
        data_at = [i for i, line in enumerate(lines) if line.startswith(b"data:")]
        if not data_at:
            return None
        try:
            obj = orjson.loads(b"\n".join(_data_value(lines[i]) for i in data_at))
        except orjson.JSONDecodeError:
            return None  # not ours to judge: it goes on as it came
        new = self._changed(obj, b"")
        if not new:
            return new
        sep = event[len(body):]
        lines[data_at[0]] = new
        for i in reversed(data_at[1:]):
            del lines[i]
        return (b"\r\n" if sep.startswith(b"\r\n") else sep[:1]).join(lines) + sep

    def _changed(self, obj: Any, sep: bytes) -> bytes | None:
        """What becomes of a parsed event: its tokens counted; b"" to drop it, its new data line ended by ``sep``
        to rename it, None to keep it as it came."""
        if not isinstance(obj, dict):
            return None
        message = obj.get("message")  # Anthropic's message_start: the model and first usage are the message's
        holder = message if isinstance(message, dict) and obj.get("type") == "message_start" else obj
        usage = holder.get("usage")
        if isinstance(usage, dict):
            self._count(usage)
            if self._strip and obj.get("choices") == []:
                return b""
        response = holder.get("response")
        named = self._response_event(response) if isinstance(response, dict) else holder
        renamed = self._renaming and self._renamed(named)
        if isinstance(response, dict) and self.on_response_done is not None and obj.get("type") in RESPONSE_ENDS:
            self.on_response_done(response)
        if not renamed:
            return None
        return b"data: " + orjson.dumps(obj) + sep

    def _response_event(self, response: dict[str, Any]) -> dict[str, Any]:
        """A Responses API event that carries the response (created, in progress, completed, failed): its id is
        learned from the first, its tokens counted from the last; the response is what holds the model."""
        response_id = response.get("id")
        if self.response_id is None and isinstance(response_id, str):
            self.response_id = response_id
            if self.on_response_id is not None:
                self.on_response_id(response_id)
        usage = response.get("usage")
        if isinstance(usage, dict):
            self._count(usage)
        return response

    def _renamed(self, obj: dict[str, Any]) -> bool:
        """Put the public id in the event's top-level ``model`` if it is the engine's name; whether it did."""
        model = obj.get("model")
        if not isinstance(model, str):
            return False
        if self._engine is None:
            if model == self._public:  # the engine says the public id already: nothing to rename, ever
                self._renaming = False
                self._marker = None
                return False
            self._engine = model
            self._marker = _name_marker(model)
        if model != self._engine:
            return False
        obj["model"] = self._public
        return True

    def _count(self, usage: dict[str, Any]) -> None:
        """Token counts from a usage object, keeping what was known where it says nothing (Anthropic's
        message_delta tells only the output tokens)."""
        prompt, completion = token_counts(usage)
        if prompt is not None:
            self.prompt_tokens = prompt
        if completion is not None:
            self.completion_tokens = completion


def token_counts(usage: Any) -> tuple[int | None, int | None]:
    """Prompt and completion tokens of a usage object: chat's and completions' (``prompt_tokens``,
    ``completion_tokens``), or Anthropic's and the Responses API's (``input_tokens``, ``output_tokens``), so that
    every API is accounted alike."""
    if not isinstance(usage, dict):
        return None, None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return (prompt if type(prompt) is int else None), (completion if type(completion) is int else None)


def _tokens(found: bytes) -> tuple[int | None, int | None]:
    """Token counts from a matched usage object."""
    try:
        return token_counts(orjson.loads(found))
    except orjson.JSONDecodeError:
        return None, None


def rename_model_in_body(body: bytes, public_model: str) -> tuple[bytes, int | None, int | None]:
    """A whole JSON answer with the public model id in it, and its prompt and completion token counts.

    Byte-level, not a decode and re-encode: the answer's own bytes go on unless the name differs, and a large
    answer (embeddings) costs a scan instead of a parse. In a JSON answer the only unescaped ``"model"`` followed
    by a colon is a key (inside strings every quote is escaped), and the OpenAI shapes have one; the patterns
    allow any spacing around the colon.
    """
    found = _MODEL.search(body)
    public = public_model.encode()
    if found is not None and found.group(1) != public:
        body = b'%b"model":"%b"%b' % (body[:found.start()], public, body[found.end():])
    usage = _USAGE.findall(body)
    return (body, *_tokens(usage[-1])) if usage else (body, None, None)
