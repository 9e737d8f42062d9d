"""Byte-level watching of a relayed SSE stream: usage accounting and model renaming.

Streams are relayed as the upstream's own bytes, chunk by chunk; nothing here decodes every event. Each chunk
costs a few C-level byte searches, and only the rare chunk that carries ``"usage"`` is parsed.
"""

from __future__ import annotations

import re

import orjson

_USAGE = re.compile(rb'"usage":\s*(\{(?:[^{}]|\{[^{}]*\})*\})')
"""The usage object, whose token details (``prompt_tokens_details``, ...) may be objects one level deep."""
_MODEL = re.compile(rb'"model":\s*"((?:[^"\\]|\\.)*)"')
_TAIL = 512


def _tokens(found: bytes, prompt: int | None, completion: int | None) -> tuple[int | None, int | None]:
    """Token counts from a matched usage object, keeping what was known where it says nothing."""
    try:
        usage = orjson.loads(found)
    except orjson.JSONDecodeError:
        return prompt, completion
    return usage.get("prompt_tokens", prompt), usage.get("completion_tokens", completion)


class StreamWatch:
    """Watches chunks of one stream; optionally drops the usage-only event the client did not ask for.

    ``strip_usage_event``: the gateway asked the engine for usage (``stream_options.include_usage``) on the
    client's behalf; the event that carries only usage (``"choices":[]``) is removed so the client sees the
    stream it asked for.
    """

    __slots__ = ("_public", "_rename", "_strip", "_tail", "completion_tokens", "prompt_tokens")

    def __init__(self, public_model: str, *, rename: bool, strip_usage_event: bool) -> None:
        self._tail = b""
        self._public = public_model.encode()
        self._rename: tuple[bytes, bytes] | bool | None = rename
        self._strip = strip_usage_event
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def feed(self, chunk: bytes) -> bytes:
        """Return the bytes to send on for this upstream chunk."""
        if self._rename is not False:
            chunk = self._renamed(chunk)
        window = self._tail + chunk if self._tail else chunk
        # carry bytes over only when an event is cut between reads; engines mostly send whole events
        self._tail = b"" if window.endswith(b"\n\n") else window[-_TAIL:]
        if b'"usage"' in window:
            found = _USAGE.findall(window)
            if found:
                self.prompt_tokens, self.completion_tokens = _tokens(found[-1], self.prompt_tokens,
                                                                     self.completion_tokens)
                if self._strip:
                    chunk = _drop_usage_event(chunk)
        return chunk

    def _renamed(self, chunk: bytes) -> bytes:
        if self._rename is True:  # learn the name the engine echoes from the first event that has one
            found = _MODEL.search(chunk)
            if found is None:
                return chunk
            echoed = found.group(1)
            self._rename = (b'"model":"' + echoed + b'"', b'"model":"' + self._public + b'"') if (
                echoed != self._public) else False
            if self._rename is False:
                return chunk
        assert isinstance(self._rename, tuple)
        return chunk.replace(*self._rename)


def _drop_usage_event(chunk: bytes) -> bytes:
    idx = chunk.find(b'"choices":[]')
    if idx < 0:
        return chunk
    start = chunk.rfind(b"data:", 0, idx)
    end = chunk.find(b"\n\n", idx)
    if start < 0 or end < 0:
        return chunk  # the event spans two reads: let it through rather than corrupt the stream
    return chunk[:start] + chunk[end + 2:]


def rename_model_in_body(body: bytes, public_model: str) -> tuple[bytes, int | None, int | None]:
    """A whole JSON answer with the public model id in it, and its prompt and completion token counts.

    Byte-level like the stream watch, not a decode and re-encode: the answer's own bytes go on unless the name
    differs, and a large answer (embeddings) costs a scan instead of a parse. In a JSON answer the only
    unescaped ``"model":`` is a key (inside strings every quote is escaped), and the OpenAI shapes have one.
    """
    found = _MODEL.search(body)
    public = public_model.encode()
    if found is not None and found.group(1) != public:
        body = b'%b"model":"%b"%b' % (body[:found.start()], public, body[found.end():])
    usage = _USAGE.findall(body)
    return (body, *_tokens(usage[-1], None, None)) if usage else (body, None, None)
