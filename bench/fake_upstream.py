"""A fast fake OpenAI-compatible HTTP/1.1 upstream for gateway benchmarks and tests.

Why it exists: to measure what a proxy gateway costs, the upstream behind it must cost as close to
nothing as possible, otherwise the benchmark measures the upstream.  So this server skips every web
framework and speaks a deliberately minimal HTTP/1.1 directly on ``asyncio.Protocol``: request line,
headers, ``Content-Length`` request bodies, keep-alive (``Connection: close`` honoured), chunked
transfer encoding for streamed responses.  Because the generated content is fixed, whole responses
are rendered once and cached as bytes per (route, stream, model, ...) so a request usually costs one
header parse, one small ``orjson.loads`` and one ``transport.write``.

It also injects faults (an engine's 400, 429, 500, hang, slow first byte, connection dropped mid-stream, a
malformed model list), server-wide or per request through the ``x-fake-fault`` header, and records what it saw
(request counts, in-flight responses, client disconnects, last request) so tests can assert on the gateway's
behaviour, either through plain attributes from another thread or through ``GET /stats`` from another process.

A test that needs work to be *under way* (a batch seen part done, a request cancelled while it runs) must
not hope the machine is slow enough to catch it: it closes the gate (``POST /gate {"hold": true}``), so that
inference requests wait, lets exactly N through (``{"release": N}``) and opens it when it is done
(``{"open": true}``).  The pace is then the test's, on any machine.

It can serve https (``certfile``/``keyfile``, ``--certfile``/``--keyfile``), as an engine behind a site's TLS
terminator does, and then also require a client certificate signed by a given CA (``client_ca``, ``--client-ca``),
so that the gateway's per-endpoint CA and client certificates are tested against a real handshake.  Without these
options it serves plain HTTP exactly as before.

Run it in the foreground with ``python bench/fake_upstream.py --port 0``; it prints one line
``READY http://HOST:PORT`` (``https://`` with a certificate) once listening and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import hashlib
import os
import signal
import ssl
import struct
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, Final, TypedDict, Unpack, cast

import orjson

from bench.fake_responses import PATH as _RESPONSES
from bench.fake_responses import FakeResponses, Rendered
from first_jupyter.transport.multipart import FormScanner, MalformedForm, boundary_of, part_filename, part_name

FAULT_MODES: Final[tuple[str, ...]] = ("none", "400", "403", "429", "500", "hang", "slow-first-byte",
                                        "drop-mid-stream", "bare-lf-header", "bad-models")
"""Accepted values of the ``fault`` option and of the ``x-fake-fault`` request header. ``400``: the engine refuses
each inference request as vLLM does (``GET /v1/models`` still answers); ``bad-models``: ``GET /v1/models`` answers
``{"object": "list", "data": null}`` (inference still answers)."""

ENGINE_REFUSAL: Final = {"error": {"message": "temperature must be in [0, 2] (fake fault)", "type": "BadRequestError",
                                   "param": "temperature", "code": 400}}
"""What fault ``400`` answers: vLLM's error shape, its param and code included."""
MESSAGES_REFUSAL: Final = {"type": "error", "error": {"type": "invalid_request_error",
                                                      "message": "temperature must be in [0, 1] (fake fault)"}}
"""What fault ``400`` answers on the Messages routes: Anthropic's error shape, as vLLM's Messages API writes it."""

SLOW_FIRST_BYTE_DEFAULT_S: Final = 5.0
"""First-byte delay of ``slow-first-byte`` when no ``first_byte_delay`` was configured."""

PROMPT_TOKENS: Final = 8
"""Reported prompt token count; fixed so that responses stay cacheable regardless of the prompt."""

_CHAT: Final = b"/v1/chat/completions"
_COMPLETIONS: Final = b"/v1/completions"
_EMBEDDINGS: Final = b"/v1/embeddings"
_MODELS: Final = b"/v1/models"
_MESSAGES: Final = b"/v1/messages"
_COUNT_TOKENS: Final = b"/v1/messages/count_tokens"
_ANTHROPIC_ROUTES: Final = frozenset((_MESSAGES, _COUNT_TOKENS))


def _words(value: Any) -> list[str]:
    """The words of a prompt, of a list of them, or of chat messages' text: the fake's tokens."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [word for item in value for word in _words(item.get("content") if isinstance(item, dict) else item)]
    return []


def _tokenize(request: dict[str, Any], model: str) -> dict[str, Any]:
    """vLLM's ``POST /tokenize`` (``prompt``, or chat ``messages``): one token per word, numbered from 1."""
    count = len(_words(request.get("prompt", request.get("messages"))))
    return {"count": count, "max_model_len": 4096, "tokens": list(range(1, count + 1)), "token_strs": None}


def _detokenize(request: dict[str, Any], model: str) -> dict[str, Any]:
    """vLLM's ``POST /detokenize``: the text of ``tokens``, as ``_tokenize`` numbers them."""
    tokens = request.get("tokens")
    return {"prompt": " ".join(f"tok{t}" for t in tokens) if isinstance(tokens, list) else ""}


def _score_of(query: Any, document: Any) -> float:
    """A relevance in [0, 1]: the share of the document's words that the query has (fixed, so tests can order)."""
    asked, words = set(_words(query)), _words(document)
    return round(sum(w in asked for w in words) / len(words), 4) if words else 0.0


def _listed(model: str, kind: str, data: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    """vLLM's answer of a pooling route: a list of ``kind`` entries with usage."""
    return {"id": f"{kind}-fake", "object": "list", "created": 0, "model": model, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}}


def _rerank(request: dict[str, Any], model: str) -> dict[str, Any]:
    """vLLM's ``POST /v1/rerank`` (Jina's and Cohere's shape): the documents by relevance, ``top_n`` of them."""
    documents = request.get("documents") or []
    results = sorted(({"index": i, "document": {"text": doc}, "relevance_score": _score_of(request.get("query"), doc)}
                      for i, doc in enumerate(documents)), key=lambda r: -r["relevance_score"])
    top_n = request.get("top_n") or len(results)
    return {"id": "rerank-fake", "model": model, "usage": {"total_tokens": len(_words(documents))},
            "results": results[:top_n]}


def _score(request: dict[str, Any], model: str) -> dict[str, Any]:
    """vLLM's ``POST /v1/score``: ``text_1`` against each of ``text_2``."""
    second = request.get("text_2")
    pairs = second if isinstance(second, list) else [second]
    data = [{"index": i, "object": "score", "score": _score_of(request.get("text_1"), text)}
            for i, text in enumerate(pairs)]
    return _listed(model, "score", data, len(_words(pairs)))


def _inputs(request: dict[str, Any]) -> list[Any]:
    inputs = request.get("input")
    return inputs if isinstance(inputs, list) else [inputs]


def _pooling(request: dict[str, Any], model: str) -> dict[str, Any]:
    """vLLM's ``POST /pooling``: the pooled hidden state of each input (the fake's embedding vector)."""
    data = [{"index": i, "object": "pooling", "data": list(_EMBEDDING)} for i, _ in enumerate(_inputs(request))]
    return _listed(model, "pool", data, len(data))


def _classify(request: dict[str, Any], model: str) -> dict[str, Any]:
    """vLLM's ``POST /classify``: each input's label and class probabilities."""
    data = [{"index": i, "label": "positive" if "good" in _words(text) else "negative",
             "probs": [0.1, 0.9] if "good" in _words(text) else [0.9, 0.1], "num_classes": 2}
            for i, text in enumerate(_inputs(request))]
    return _listed(model, "classify", data, len(data))


_VLLM_OWN: Final[dict[bytes, Callable[[dict[str, Any], str], dict[str, Any]]]] = {
    b"/tokenize": _tokenize, b"/detokenize": _detokenize, b"/v1/rerank": _rerank, b"/v1/score": _score,
    b"/pooling": _pooling, b"/classify": _classify,
}
"""The routes vLLM serves beyond OpenAI's, answered as vLLM does (never streamed), from the request."""
_AUDIO: Final = frozenset((b"/v1/audio/transcriptions", b"/v1/audio/translations"))
_ROUTE_METHODS: Final[dict[bytes, bytes]] = {
    _CHAT: b"POST",
    _COMPLETIONS: b"POST",
    _EMBEDDINGS: b"POST",
    _RESPONSES: b"POST",
    _MODELS: b"GET",
    _MESSAGES: b"POST",
    _COUNT_TOKENS: b"POST",
    **dict.fromkeys(_VLLM_OWN, b"POST"),
    **dict.fromkeys(_AUDIO, b"POST"),
}
_TRANSCRIPT_TYPES: Final = {"text": b"text/plain; charset=utf-8", "srt": b"application/x-subrip",
                            "vtt": b"text/vtt; charset=utf-8"}
"""The answers to ``response_format`` other than JSON: text as it is, or subtitles (each with its own type)."""
_GATE: Final = b"/gate"
_CONTROL_ROUTES: Final = frozenset((b"/health", b"/stats", _GATE))
_EMBEDDING: Final = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)
_MAX_HEAD_BYTES: Final = 64 * 1024  # refuse absurd header blocks rather than buffer them forever
_MAX_CACHE_ENTRIES: Final = 4096  # models are echoed from requests, so bound the response cache
_MAX_DISCONNECTS: Final = 100_000
_REASONS: Final[dict[int, bytes]] = {
    200: b"OK",
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
}
_RETRY_AFTER: Final = b"retry-after: 1\r\n"
_DONE_EVENT: Final = b"data: [DONE]\n\n"
_LAST_CHUNK: Final = b"0\r\n\r\n"


def _json_response(status: int, body: bytes, close: bool, extra_headers: bytes = b"") -> bytes:
    """Render a complete ``application/json`` response; ``extra_headers`` are raw CRLF-ended lines."""
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            % (status, _REASONS[status], len(body)),
            extra_headers,
            b"connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )


def _error_response(status: int, message: str, err_type: str, close: bool, extra: bytes = b"") -> bytes:
    """Render an error in the OpenAI shape, which client libraries parse into typed exceptions."""
    body = orjson.dumps({"error": {"message": message, "type": err_type, "param": None, "code": None}})
    return _json_response(status, body, close, extra)


def _header(lowered_head: bytes, marker: bytes, head: bytes | None = None) -> bytes | None:
    """Value of one header, found by ``marker`` (``b"\\r\\nname:"``) in the lower-cased header block.

    Why not parse every header into a dict: a request only needs a handful of them, and a few
    ``bytes.find`` calls cost far less per request than splitting all of an SDK's 15-20 headers. ``head``: the
    block as sent, to take the value from in its own case (a form's boundary).
    """
    start = lowered_head.find(marker)
    if start < 0:
        return None
    start += len(marker)
    stop = lowered_head.find(b"\r\n", start)
    return (lowered_head if head is None else head)[start : stop if stop >= 0 else len(lowered_head)].strip()


def _http_chunk(data: bytes) -> bytes:
    """``data`` as one HTTP chunk of a chunked response."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse_chunk(payload: Any, kind: str | None = None) -> bytes:
    """Frame one SSE ``data:`` event carrying ``payload`` as a single HTTP chunk; ``kind``: its ``event:`` line
    (Anthropic's events have one)."""
    return _http_chunk((b"event: %s\n" % kind.encode() if kind else b"") + b"data: " + orjson.dumps(payload) + b"\n\n")


def _stream_head(close: bool) -> bytes:
    """The head of a streamed (chunked, server-sent events) response."""
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n" + (b"connection: close\r\n" if close else b"") + b"\r\n")


class UpstreamOptions(TypedDict, total=False):
    """Keyword arguments of ``FakeUpstream``, so that the thread helpers stay type-checked."""

    host: str
    port: int
    models: Sequence[str]
    chunks: int
    pace: float
    first_byte_delay: float
    fault: str
    max_model_len: int | None
    certfile: str | os.PathLike[str] | None
    keyfile: str | os.PathLike[str] | None
    client_ca: str | os.PathLike[str] | None
    messages: bool
    calls_tools: bool


def _server_context(certfile: str | os.PathLike[str], keyfile: str | os.PathLike[str] | None,
                    client_ca: str | os.PathLike[str] | None) -> ssl.SSLContext:
    """The TLS context of an https fake: its certificate chain, and with ``client_ca`` a client certificate signed
    by that CA required of every connection (the mutual TLS some sites put in front of their engines)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile, keyfile)
    context.set_alpn_protocols(["http/1.1"])  # the only protocol it speaks
    if client_ca is not None:
        context.load_verify_locations(cafile=client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class _AudioIntake:
    """An audio form (``/v1/audio/*``) read as it comes, never held whole, as an engine takes it: its length, the
    SHA-256 and size of its file part, the file's name and type, and its fields. What it read is what the fake
    answers with (``FakeUpstream.last_request_body``), so that a test can prove the bytes arrived intact."""

    def __init__(self, content_type: bytes | None, length: int) -> None:
        self.left = length
        self.summary: dict[str, Any] = {"bytes": length, "file_bytes": 0, "fields": {}}
        self._sha = hashlib.sha256()
        self._file = False
        self._name = ""
        self._value = bytearray()
        boundary = boundary_of(content_type.decode("latin-1") if content_type else None)
        self._scanner = FormScanner(boundary, self) if boundary is not None else None
        if boundary is None:
            self.summary["error"] = "the body is not multipart/form-data"

    def feed(self, data: bytes) -> None:
        self.left -= len(data)
        if self._scanner is not None and "error" not in self.summary:
            try:
                self._scanner.feed(data)
            except MalformedForm as exc:
                self.summary["error"] = str(exc)

    def result(self) -> bytes:
        if self._scanner is not None and not self._scanner.ended and "error" not in self.summary:
            self.summary["error"] = "the form ended before its closing boundary"
        self.summary["file_sha256"] = self._sha.hexdigest()
        return orjson.dumps(self.summary)

    def begin_part(self, head: bytes) -> None:
        self._name = part_name(head)
        filename = part_filename(head)
        self._file = filename is not None
        if self._file:
            content_type = _header(head.lower(), b"\r\ncontent-type:")
            self.summary.update(file_name=filename, file_type=content_type.decode() if content_type else None)
        self._value.clear()

    def take(self, data: bytes) -> None:
        if self._file:
            self._sha.update(data)
            self.summary["file_bytes"] += len(data)
        else:
            self._value += data

    def end_part(self) -> None:
        if not self._file:
            self.summary["fields"][self._name] = self._value.decode(errors="replace")


class _Stream:
    """A pre-rendered streamed response: cached once, then replayed with one write per event."""

    __slots__ = ("events", "head", "tail", "truncated")

    def __init__(self, head: bytes, events: tuple[bytes, ...], tail: bytes) -> None:
        self.head = head
        self.events = events  # the content events, then the final finish_reason/usage event
        self.tail = tail  # ``data: [DONE]`` and the terminating zero-length chunk
        self.truncated = events[: (len(events) - 1) // 2]  # what drop-mid-stream sends: half the content


class _Connection(asyncio.Protocol):
    """One client connection: HTTP/1.1 framing only; routing and content belong to ``FakeUpstream``.

    Requests are handled one at a time per connection.  While a response is in flight (``_busy``),
    further bytes are only buffered, and they are parsed once the response completes, so keep-alive
    and even pipelined clients are served in order.
    """

    __slots__ = (
        "_buf",
        "_busy",
        "_continue_sent",
        "_dropping",
        "_intake",
        "_task",
        "_transport",
        "_upstream",
        "close_after",
    )
    _transport: asyncio.Transport  # set by connection_made, which asyncio calls before anything else

    def __init__(self, upstream: FakeUpstream) -> None:
        self._upstream = upstream
        self._buf = bytearray()
        self._busy = False
        self._continue_sent = False  # "100 Continue" already sent for the request being received
        self._dropping = False  # set when we abort on purpose, so it is not mistaken for the client leaving
        self._task: asyncio.Task[None] | None = None
        self._intake: tuple[_AudioIntake, bytes, bytes, bytes | None, bytes] | None = None
        """An audio form being read, with its request's method, path, fault header and head."""
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Remember the transport and register with the server so ``stop()`` can close us."""
        self._transport = cast(asyncio.Transport, transport)
        self._upstream._connections.add(self)

    def data_received(self, data: bytes) -> None:
        """Buffer the bytes; parse them now unless a response is still being produced."""
        if self._intake is not None:
            data = self._take_form(data)
        self._buf += data
        if not self._busy and self._intake is None:
            self._process()

    def _take_form(self, data: bytes) -> bytes:
        """Feed an audio form its bytes as they come; at its end, answer it. What follows it is returned."""
        assert self._intake is not None
        intake, method, path, fault, head = self._intake
        mine, rest = data[: intake.left], data[intake.left :]
        intake.feed(mine)
        if intake.left == 0:
            self._intake = None
            self._upstream._dispatch(self, method, path, fault, head, intake.result())
        return rest

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop any response in progress at once, and record the disconnect if the client left."""
        upstream = self._upstream
        upstream._connections.discard(self)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._busy:
            self._busy = False
            upstream.active -= 1
            if not self._dropping:
                upstream.disconnects.append(time.monotonic())

    def _process(self) -> None:
        """Parse and dispatch every complete request in the buffer, stopping at an in-flight response."""
        transport = self._transport
        buf = self._buf
        while buf and not self._busy and self._intake is None and not transport.is_closing():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD_BYTES:
                    self._reject(431, "request header block too large")
                return
            head = bytes(buf[:end])
            request_line = head[: head.find(b"\r\n")].split(b" ")
            if len(request_line) != 3:
                self._reject(400, "malformed request line")
                return
            method, target, version = request_line
            lowered = head.lower()
            if _header(lowered, b"\r\ntransfer-encoding:") is not None:
                self._reject(501, "chunked request bodies are not supported; send Content-Length")
                return
            try:
                length = int(_header(lowered, b"\r\ncontent-length:") or 0)
            except ValueError:
                self._reject(400, "invalid Content-Length")
                return
            body_end = end + 4 + length
            path = target.partition(b"?")[0]
            if path in _AUDIO:  # read as it comes, never held whole
                self._set_close_after(version, lowered)
                fault = _header(lowered, b"\r\nx-fake-fault:")
                intake = _AudioIntake(_header(lowered, b"\r\ncontent-type:", head), length)
                self._intake = (intake, method, path, fault, head)
                rest = bytes(buf[end + 4 :])
                del buf[:]
                buf += self._take_form(rest)
                continue
            if len(buf) < body_end:
                # curl and some SDKs wait for this before sending a large body
                if not self._continue_sent and _header(lowered, b"\r\nexpect:") == b"100-continue":
                    self._continue_sent = True
                    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            self._continue_sent = False
            body = bytes(buf[end + 4 : body_end])
            del buf[:body_end]
            self._set_close_after(version, lowered)
            fault = _header(lowered, b"\r\nx-fake-fault:")
            self._upstream._dispatch(self, method, path, fault, head, body)

    def _set_close_after(self, version: bytes, lowered: bytes) -> None:
        connection = _header(lowered, b"\r\nconnection:") or b""
        if version == b"HTTP/1.1":
            self.close_after = b"close" in connection
        else:
            self.close_after = b"keep-alive" not in connection

    def _reject(self, status: int, message: str) -> None:
        """Answer a request we cannot frame, then close: the rest of the byte stream is unparseable."""
        self.close_after = True
        self.write(_error_response(status, message, "invalid_request_error", True))
        self.end()

    def write(self, data: bytes) -> None:
        """Send bytes to the client."""
        self._transport.write(data)

    def begin(self) -> None:
        """Mark an API response as in flight: counted in ``active``, and later requests wait for it."""
        self._busy = True
        self._upstream.active += 1

    def end(self) -> None:
        """Mark the current response complete, closing the connection if the client asked for that."""
        if self._busy:
            self._busy = False
            self._upstream.active -= 1
        if self.close_after:
            self._transport.close()

    def drop(self) -> None:
        """Reset the TCP connection on purpose (fault injection); not recorded as a client disconnect."""
        self._dropping = True
        self._transport.abort()

    def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Finish the response in a task (delays, pacing); ``connection_lost`` cancels it."""
        self._task = asyncio.get_running_loop().create_task(self._run(coro))

    async def _run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Await the response, then serve requests that arrived on this connection meanwhile."""
        await coro
        self._task = None
        self._process()

    def shutdown(self) -> asyncio.Task[None] | None:
        """Abort for server shutdown; returns the cancelled task, if any, so ``stop()`` can await it."""
        task = self._task
        if task is not None:
            task.cancel()
        self.drop()
        return task


class FakeUpstream:
    """Fake OpenAI-compatible upstream server; see the module docstring for why it is built this way.

    Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON, or SSE when the body has
    ``"stream": true``), ``POST /v1/embeddings``, ``GET /v1/models``, Anthropic's ``POST /v1/messages`` (a Message,
    or its event stream) and ``POST /v1/messages/count_tokens`` as vLLM serves them (unless ``messages`` is off:
    then they are 404, as on an engine without them), vLLM's own ``POST /tokenize``, ``/detokenize``,
    ``/v1/rerank``, ``/v1/score``, ``/pooling`` and ``/classify``, the Responses API (``POST /v1/responses`` and the
    calls on a kept response's id: ``bench.fake_responses``), plus the control-plane routes
    ``GET /health``, ``GET /stats`` and ``POST /gate`` (see ``hold``).  Anything else gets a 404 in the OpenAI
    error shape.

    Faults apply to the ``/v1/*`` routes only, so health checks and ``/stats`` keep answering.  A request
    header ``x-fake-fault: <mode>`` overrides the server-wide ``fault`` for that request (``none``
    included).  ``first_byte_delay`` is slept before the response headers of every routed ``/v1/*``
    response, fault responses included; only routing errors (404, 405, bad ``x-fake-fault``) are immediate.

    Observability, readable as plain attributes from any thread (or via ``GET /stats``); the
    control-plane routes are deliberately not counted so that probing does not disturb them:

    * ``requests``: requests received on the ``/v1/*`` routes and unknown paths;
    * ``active``: those whose response is still in flight (delayed, streaming, hung, held at the gate);
    * ``held``: those waiting at the closed gate;
    * ``disconnects``: ``time.monotonic()`` of every connection lost while its response was still in
      flight, which is to say the client (or gateway) went away; aborts injected by
      ``drop-mid-stream`` and by ``stop()`` are not recorded;
    * ``last_request_headers`` / ``last_request_body``: the last counted request other than ``GET /v1/models``
      (which the gateway's status readings send at any moment), decoded lazily.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        models: Sequence[str] = ("fake-model",),
        chunks: int = 16,
        pace: float = 0.0,
        first_byte_delay: float = 0.0,
        fault: str = "none",
        max_model_len: int | None = None,
        certfile: str | os.PathLike[str] | None = None,
        keyfile: str | os.PathLike[str] | None = None,
        client_ca: str | os.PathLike[str] | None = None,
        messages: bool = True,
        calls_tools: bool = False,
    ) -> None:
        """Configure the server; nothing is bound until ``start()``.

        ``port`` 0 picks a free port.  ``chunks`` is the number of content tokens per completion,
        streamed one per SSE event ``pace`` seconds apart (0: all written at once).  ``fault`` is one
        of ``FAULT_MODES``.  ``max_model_len`` is listed with each model, as vLLM lists its context
        length.  ``certfile`` (PEM chain, with its key in it or in ``keyfile``) serves https;
        ``client_ca`` then requires a client certificate that CA signed. ``messages``: serve Anthropic's
        Messages routes natively, as vLLM does (off: 404, as ``transformers serve``). ``calls_tools``: a chat
        request that offers tools, and does not end with a tool's result, is answered with a call of its first
        tool (its required arguments each ``"fake"``), as a model that uses tools would answer.
        """
        model_ids = (models,) if isinstance(models, str) else tuple(models)
        if not model_ids:
            raise ValueError("at least one model is required")
        if chunks < 0 or pace < 0 or first_byte_delay < 0:
            raise ValueError("chunks, pace and first_byte_delay must not be negative")
        if fault not in FAULT_MODES:
            raise ValueError(f"fault must be one of {', '.join(FAULT_MODES)}, not {fault!r}")
        if certfile is None and (keyfile is not None or client_ca is not None):
            raise ValueError("keyfile and client_ca need a certfile: they only apply to https")
        self._ssl: ssl.SSLContext | None = None if certfile is None else _server_context(certfile, keyfile, client_ca)
        self.host = host
        self.models = model_ids
        self.chunks = chunks
        self.pace = pace
        self.first_byte_delay = first_byte_delay
        self.fault = fault
        self.max_model_len = max_model_len
        self.messages = messages
        self.calls_tools = calls_tools
        self.requests = 0
        self.by_route: Counter[str] = Counter()
        """Requests per path (``/v1/chat/completions``, ``/v1/models``, ...), control routes excepted."""
        self.on_request: Callable[[str, bytes], None] | None = None
        """Called with each counted request's path and body as it arrives, on the server's loop: a test on that loop
        records what this engine was sent, and waits on what it awaits."""
        self.active = 0
        self.disconnects: deque[float] = deque(maxlen=_MAX_DISCONNECTS)
        self._passes: int | None = None  # None: the gate is open; else how many more requests may go through
        self._waiting: deque[asyncio.Future[None]] = deque()  # requests held at the gate, in arrival order
        self._port = port
        self._created = int(time.time())
        self._tokens = tuple(f"tok{i} " for i in range(chunks))
        self._usage = {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": chunks,
            "total_tokens": PROMPT_TOKENS + chunks,
        }
        self._last_head = b""
        self._last_body = b""
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._json_cache: dict[tuple[Any, ...], bytes] = {}
        self._stream_cache: dict[tuple[bytes, str, bool], _Stream] = {}
        self.responses = FakeResponses(Rendered(self._tokens, PROMPT_TOKENS, self._created), _json_response,
                                       _http_chunk)
        """The Responses API's kept responses (``/v1/responses`` and the calls on a response's id)."""

    @property
    def port(self) -> int:
        """The bound port once started (the configured one before)."""
        return self._port

    @property
    def url(self) -> str:
        """Base URL clients should use, e.g. ``http://127.0.0.1:PORT`` (``https://`` with a certificate; append
        ``/v1`` for OpenAI SDKs)."""
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"{'http' if self._ssl is None else 'https'}://{host}:{self._port}"

    @property
    def held(self) -> int:
        """Inference requests waiting at the closed gate (those whose client left are not counted)."""
        return sum(not waiting.done() for waiting in self._waiting)

    def hold(self) -> None:
        """Close the gate: inference requests from now on wait until released (``/v1/models`` never does).
        Call it on the server's loop; other threads and processes use ``POST /gate``."""
        if self._passes is None:
            self._passes = 0

    def release(self, count: int | None = None) -> None:
        """Let ``count`` more requests through the closed gate, held ones first, in arrival order; ``None``
        lets every one through and opens the gate.  Call it on the server's loop."""
        if count is None:
            self._passes = None
        elif self._passes is not None:
            self._passes += count
        while self._waiting and (self._passes is None or self._passes > 0):
            waiting = self._waiting.popleft()
            if not waiting.done():  # (a held request whose client left was cancelled: it takes no pass)
                waiting.set_result(None)
                if self._passes is not None:
                    self._passes -= 1

    @property
    def last_request_headers(self) -> dict[str, str]:
        """Headers of the last counted request, names lower-cased; decoded only when asked for."""
        headers: dict[str, str] = {}
        for line in self._last_head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        return headers

    @property
    def last_request_bytes(self) -> bytes:
        """The last counted request's body as it came, for tests of byte-for-byte pass-through."""
        return self._last_body

    @property
    def last_request_body(self) -> Any:
        """The last counted request's body parsed as JSON, or None when absent or not JSON."""
        try:
            return orjson.loads(self._last_body) if self._last_body else None
        except orjson.JSONDecodeError:
            return None

    async def start(self) -> int:
        """Bind and start serving on the running loop; returns the bound port."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Connection(self), self.host, self._port, backlog=1024,
                                          ssl=self._ssl)
        self._server = server
        self._port = server.sockets[0].getsockname()[1]
        return self._port

    async def stop(self) -> None:
        """Stop listening and abort open connections (Python 3.11 ``Server.close`` leaves them open)."""
        if self._server is None:
            return
        self._server.close()
        tasks = [task for conn in list(self._connections) if (task := conn.shutdown()) is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the aborted transports' connection_lost callbacks run and close sockets
        await self._server.wait_closed()
        self._server = None

    def _dispatch(
        self,
        conn: _Connection,
        method: bytes,
        path: bytes,
        fault_header: bytes | None,
        head: bytes,
        body: bytes,
    ) -> None:
        """Route one parsed request: control plane first, then faults, then the fake API."""
        close = conn.close_after
        if path in _CONTROL_ROUTES:
            control_method = b"POST" if path == _GATE else b"GET"
            if method != control_method:
                message = f"use {control_method.decode()} {path.decode()}"
                conn.write(_error_response(405, message, "invalid_request_error", close))
            elif path == _GATE:
                conn.write(self._gate(body, close))
            elif path == b"/health":
                conn.write(_json_response(200, b'{"status":"ok"}', close))
            else:
                conn.write(_json_response(200, self._stats_body(), close))
            conn.end()
            return
        self.requests += 1
        self.by_route[path.decode("latin-1")] += 1
        if self.on_request is not None:
            self.on_request(path.decode("latin-1"), body)
        if path != _MODELS:  # the gateway's status readings, at any moment, must not hide the request under test
            self._last_head = head
            self._last_body = body
        conn.begin()
        if path.startswith(_RESPONSES + b"/"):  # a call on a kept response: /v1/responses/{id}[/action]
            conn.write(self.responses.call(method, path, head, close))
            conn.end()
            return
        expected_method = _ROUTE_METHODS.get(path) if self.messages or path not in _ANTHROPIC_ROUTES else None
        if expected_method is None:
            message = f"Invalid URL ({method.decode('latin-1')} {path.decode('latin-1')})"
            conn.write(_error_response(404, message, "invalid_request_error", close))
            conn.end()
            return
        if method != expected_method:
            message = f"use {expected_method.decode()} {path.decode()}"
            conn.write(_error_response(405, message, "invalid_request_error", close))
            conn.end()
            return
        fault = self.fault
        if fault_header is not None:
            fault = fault_header.decode("latin-1")
            if fault not in FAULT_MODES:
                message = f"x-fake-fault must be one of {', '.join(FAULT_MODES)}"
                conn.write(_error_response(400, message, "invalid_request_error", close))
                conn.end()
                return
        if fault == "hang":
            return  # stays in flight until the client goes away
        if path != _MODELS and self._passes is not None:
            if self._passes == 0:
                conn.run(self._answer_after_gate(conn, path, body, close, fault))
                return
            self._passes -= 1
        pending = self._answer(conn, path, body, close, fault)
        if pending is not None:
            conn.run(pending)

    def _gate(self, body: bytes, close: bool) -> bytes:
        """``POST /gate``: ``{"hold": true}``, ``{"release": N}`` or ``{"open": true}``; answers what it holds."""
        try:
            command = orjson.loads(body)
        except orjson.JSONDecodeError:
            command = None
        release = command.get("release") if isinstance(command, dict) else None
        if isinstance(command, dict) and command.get("hold") is True:
            self.hold()
        elif isinstance(command, dict) and command.get("open") is True:
            self.release()
        elif isinstance(release, int) and not isinstance(release, bool) and release >= 0:
            self.release(release)
        else:
            message = 'send {"hold": true}, {"release": N} (N >= 0) or {"open": true}'
            return _error_response(400, message, "invalid_request_error", close)
        state = {"held": self.held, "passes": self._passes}
        return _json_response(200, orjson.dumps(state), close)

    async def _answer_after_gate(self, conn: _Connection, path: bytes, body: bytes, close: bool,
                                 fault: str) -> None:
        """Wait at the closed gate for a pass, then answer as if the request had just come. The gate may have
        opened, or been given passes, between the request's coming and this task's start: then it goes on."""
        if self._passes == 0:
            waiting = asyncio.get_running_loop().create_future()
            self._waiting.append(waiting)
            await waiting  # (cancelled with the task when the client goes away)
        elif self._passes is not None:
            self._passes -= 1
        pending = self._answer(conn, path, body, close, fault)
        if pending is not None:
            await pending

    def _answer(self, conn: _Connection, path: bytes, body: bytes, close: bool,
                fault: str) -> Coroutine[Any, Any, None] | None:
        """Write a routed request's answer now, or return the coroutine that finishes it (delays, pacing)."""
        delay = self.first_byte_delay
        if fault == "slow-first-byte" and not delay:
            delay = SLOW_FIRST_BYTE_DEFAULT_S
        reply = self._reply(path, body, close, fault)
        drop = fault == "drop-mid-stream"
        if isinstance(reply, _Stream):
            if delay or (self.pace and len(reply.events) > 1):
                return self._send_stream_paced(conn, reply, delay, drop)
            self._send_stream_now(conn, reply, drop)
        elif delay:
            return self._send_later(conn, reply, delay, drop)
        elif drop:
            conn.write(reply[: len(reply) // 2])
            conn.drop()
        else:
            conn.write(reply)
            conn.end()
        return None

    def _reply(self, path: bytes, body: bytes, close: bool, fault: str) -> bytes | _Stream:
        """The response for a routed ``/v1/*`` request, from cache whenever possible."""
        if fault == "403":
            return _error_response(403, "You are not in a group allowed to use this cluster (fake fault)",
                                   "permission_error", close)
        if fault == "429":
            return _error_response(429, "Rate limit reached (fake fault)", "requests", close, _RETRY_AFTER)
        if fault == "500":
            return _error_response(500, "Internal server error (fake fault)", "server_error", close)
        if fault == "bare-lf-header":  # a hostile upstream: a bare LF inside a value, to smuggle a header through
            return _error_response(429, "Rate limit reached (fake fault)", "requests", close,
                                   b"retry-after: 1\nX-Injected: yes\r\n")
        if path == _MODELS:
            if fault == "bad-models":
                return _json_response(200, b'{"object":"list","data":null}', close)
            return self._cached(("models", close), lambda: _json_response(200, self._models_body(), close))
        if fault == "400":
            refusal = MESSAGES_REFUSAL if path in _ANTHROPIC_ROUTES else ENGINE_REFUSAL
            return _json_response(400, orjson.dumps(refusal), close)
        if path in _AUDIO:
            return self._transcript(orjson.loads(body), close)
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error_response(400, "request body is not valid JSON", "invalid_request_error", close)
        model = request.get("model") if isinstance(request, dict) else None
        if not isinstance(model, str):
            return _error_response(400, "you must provide a model parameter", "invalid_request_error", close)
        if path == _EMBEDDINGS:
            return self._embeddings(request, model, close)
        if path == _COUNT_TOKENS:
            return _json_response(200, orjson.dumps({"input_tokens": PROMPT_TOKENS}), close)
        own = _VLLM_OWN.get(path)
        if own is not None:
            return _json_response(200, orjson.dumps(own(request, model)), close)
        if path == _RESPONSES:
            created = self.responses.create(request, model)
            if isinstance(created, list):
                return _Stream(_stream_head(close), tuple(created), _LAST_CHUNK)
            return _json_response(*created, close)
        chat = path == _CHAT
        tool = self._tool_to_call(request) if chat and self.calls_tools else None
        if tool is not None:
            return self._tool_call(tool, model, request.get("stream") is True, close)
        if request.get("stream") is True:
            key = (path, model, close)
            stream = self._stream_cache.get(key)
            if stream is None:
                if len(self._stream_cache) >= _MAX_CACHE_ENTRIES:
                    self._stream_cache.clear()
                render = self._render_message_stream if path == _MESSAGES else self._render_stream
                stream = self._stream_cache[key] = render(chat, model, close)
            return stream
        if path == _MESSAGES:
            return self._cached((path, model, close), lambda: self._render_message(model, close))
        return self._cached((path, model, close), lambda: self._render_completion(chat, model, close))

    @staticmethod
    def _tool_to_call(request: dict[str, Any]) -> dict[str, Any] | None:
        """The function a tool-using model would call now: the first tool offered, unless the conversation ends
        with a tool's result (then the model answers in words)."""
        tools, messages = request.get("tools"), request.get("messages")
        if not isinstance(tools, list) or not tools or not isinstance(tools[0], dict):
            return None
        last = messages[-1] if isinstance(messages, list) and messages else None
        if isinstance(last, dict) and last.get("role") == "tool":
            return None
        function = tools[0].get("function")
        return function if isinstance(function, dict) else None

    def _tool_call(self, function: dict[str, Any], model: str, stream: bool, close: bool) -> bytes | _Stream:
        """A chat answer that calls ``function``, whole or streamed (its name, then its arguments)."""
        schema = function.get("parameters")
        required = schema.get("required") if isinstance(schema, dict) else None
        arguments = orjson.dumps({name: "fake" for name in required or () if isinstance(name, str)}).decode()
        name = function.get("name")
        call = {"id": "call_fake", "type": "function", "function": {"name": name, "arguments": arguments}}
        base = {"id": "chatcmpl-fake", "created": self._created, "model": model}
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 1, "total_tokens": PROMPT_TOKENS + 1}
        if not stream:
            message = {"role": "assistant", "content": None, "tool_calls": [call]}
            return _json_response(200, orjson.dumps({**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": message, "finish_reason": "tool_calls"}]}), close)
        named = {**call, "index": 0, "function": {"name": name, "arguments": ""}}
        deltas = [{"role": "assistant", "tool_calls": [named]},
                  {"tool_calls": [{"index": 0, "function": {"arguments": arguments}}]}]
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [_sse_chunk({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
                  for delta in deltas]
        events.append(_sse_chunk({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
                                  "usage": usage}))
        return _Stream(_stream_head(close), tuple(events), b"%x\r\n%s\r\n" % (len(_DONE_EVENT), _DONE_EVENT) +
                       _LAST_CHUNK)

    def _render_message(self, model: str, close: bool) -> bytes:
        """A non-streamed Anthropic Message holding all tokens, as vLLM's Messages API answers."""
        usage = {"input_tokens": PROMPT_TOKENS, "output_tokens": self.chunks}
        payload = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "text", "text": "".join(self._tokens)}], "stop_reason": "end_turn",
                   "stop_sequence": None, "usage": usage}
        return _json_response(200, orjson.dumps(payload), close)

    def _render_message_stream(self, _chat: bool, model: str, close: bool) -> _Stream:
        """Anthropic's event stream of a Message, one token per ``content_block_delta``, ended by
        ``message_stop`` (no ``[DONE]``: Anthropic's streams have none)."""
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
                   "stop_reason": None, "stop_sequence": None,
                   "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 0}}
        events = [_sse_chunk({"type": "message_start", "message": message}, "message_start"),
                  _sse_chunk({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                             "content_block_start")]
        events += [_sse_chunk({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": tok}},
                              "content_block_delta") for tok in self._tokens]
        events += [_sse_chunk({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                   _sse_chunk({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": self.chunks}}, "message_delta")]
        return _Stream(_stream_head(close), tuple(events),
                       _sse_chunk({"type": "message_stop"}, "message_stop") + _LAST_CHUNK)

    def _transcript(self, form: dict[str, Any], close: bool) -> bytes | _Stream:
        """An audio route's answer, from what its form held: a transcript that tells the file's size and hash, as
        JSON, as text or subtitles (``response_format``), or streamed as OpenAI's events (``stream``)."""
        if "error" in form:
            return _error_response(400, f"the form could not be read: {form['error']}", "invalid_request_error",
                                   close)
        fields = form["fields"]
        if "model" not in fields:
            return _error_response(400, "you must provide a model parameter", "invalid_request_error", close)
        text = f"{form['file_bytes']} bytes, sha256 {form['file_sha256']}"
        if fields.get("stream") == "true":
            deltas = [_sse_chunk({"type": "transcript.text.delta", "delta": word}) for word in text.split(" ")]
            done = _sse_chunk({"type": "transcript.text.done", "text": text,
                               "usage": {"type": "tokens", "input_tokens": PROMPT_TOKENS, "output_tokens": 3,
                                         "total_tokens": PROMPT_TOKENS + 3}})
            return _Stream(_stream_head(close), (*deltas, done),
                           b"%x\r\n%s\r\n" % (len(_DONE_EVENT), _DONE_EVENT) + _LAST_CHUNK)
        kind = _TRANSCRIPT_TYPES.get(fields.get("response_format", "json"))
        if kind is None:
            return _json_response(200, orjson.dumps({"text": text, "usage": {"type": "duration", "seconds": 1}}),
                                  close)
        body = {"text": text, "srt": f"1\n00:00:00,000 --> 00:00:01,000\n{text}\n",
                "vtt": f"WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n{text}\n"}[fields["response_format"]].encode()
        return (b"HTTP/1.1 200 OK\r\ncontent-type: %b\r\ncontent-length: %d\r\n%b\r\n%b"
                % (kind, len(body), b"connection: close\r\n" if close else b"", body))

    def _cached(self, key: tuple[Any, ...], render: Callable[[], bytes]) -> bytes:
        """Memoise a rendered JSON response; content is fixed, so only the key varies."""
        response = self._json_cache.get(key)
        if response is None:
            if len(self._json_cache) >= _MAX_CACHE_ENTRIES:
                self._json_cache.clear()
            response = self._json_cache[key] = render()
        return response

    def _render_completion(self, chat: bool, model: str, close: bool) -> bytes:
        """A non-streamed ``chat.completion`` or ``text_completion`` holding all tokens."""
        text = "".join(self._tokens)
        if chat:
            payload: dict[str, Any] = {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": self._created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": self._usage,
            }
        else:
            payload = {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": self._created,
                "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                "usage": self._usage,
            }
        return _json_response(200, orjson.dumps(payload), close)

    def _render_stream(self, chat: bool, model: str, close: bool) -> _Stream:
        """All SSE events of a streamed completion, framed as HTTP chunks, plus the head and tail."""
        head = _stream_head(close)
        base: dict[str, Any]
        choices: list[dict[str, Any]]
        last: dict[str, Any]
        if chat:
            base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": self._created}
            choices = [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": tok} if i == 0 else {"content": tok},
                    "logprobs": None,
                    "finish_reason": None,
                }
                for i, tok in enumerate(self._tokens)
            ]
            last = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
        else:
            base = {"id": "cmpl-fake", "object": "text_completion", "created": self._created}
            choices = [{"text": t, "index": 0, "logprobs": None, "finish_reason": None} for t in self._tokens]
            last = {"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}
        base["model"] = model
        events = [_sse_chunk({**base, "choices": [choice]}) for choice in choices]
        events.append(_sse_chunk({**base, "choices": [last], "usage": self._usage}))
        tail = _http_chunk(_DONE_EVENT) + _LAST_CHUNK
        return _Stream(head, tuple(events), tail)

    def _embeddings(self, request: dict[str, Any], model: str, close: bool) -> bytes:
        """One small fixed vector per input, as floats or as base64 float32 (the OpenAI SDK default)."""
        inputs = request.get("input")
        # a batch of strings or of token arrays counts per item; one string or one token array is one
        count = len(inputs) if isinstance(inputs, list) and not (inputs and isinstance(inputs[0], int)) else 1
        as_base64 = request.get("encoding_format") == "base64"

        def render() -> bytes:
            vector: Any = list(_EMBEDDING)
            if as_base64:
                vector = base64.b64encode(struct.pack(f"<{len(_EMBEDDING)}f", *_EMBEDDING)).decode()
            payload = {
                "object": "list",
                "data": [{"object": "embedding", "index": i, "embedding": vector} for i in range(count)],
                "model": model,
                "usage": {"prompt_tokens": count, "total_tokens": count},
            }
            return _json_response(200, orjson.dumps(payload), close)

        return self._cached((_EMBEDDINGS, model, count, as_base64, close), render)

    def _models_body(self) -> bytes:
        """The ``/v1/models`` list of the configured models."""
        limit = {} if self.max_model_len is None else {"max_model_len": self.max_model_len}
        data = [
            {"id": model, "object": "model", "created": self._created, "owned_by": "fake-upstream", **limit}
            for model in self.models
        ]
        return orjson.dumps({"object": "list", "data": data})

    def _stats_body(self) -> bytes:
        """The ``/stats`` document, for tests running in another process."""
        return orjson.dumps(
            {
                "requests": self.requests,
                "active": self.active,
                "held": self.held,
                "disconnects": list(self.disconnects),
                "last_request_headers": self.last_request_headers,
                "last_request_body": self.last_request_body,
            }
        )

    @staticmethod
    def _send_stream_now(conn: _Connection, stream: _Stream, drop: bool) -> None:
        """Write a whole stream at once (pace 0), one ``transport.write`` per event."""
        conn.write(stream.head)
        for event in stream.truncated if drop else stream.events:
            conn.write(event)
        FakeUpstream._end_stream(conn, stream, drop)

    @staticmethod
    def _end_stream(conn: _Connection, stream: _Stream, drop: bool) -> None:
        """A drop fault aborts the connection where a healthy stream writes its tail."""
        if drop:
            conn.drop()
            return
        conn.write(stream.tail)
        conn.end()

    async def _send_stream_paced(self, conn: _Connection, stream: _Stream, delay: float, drop: bool) -> None:
        """Write a stream after ``delay``, events ``pace`` apart; cancelled if the client goes away."""
        if delay:
            await asyncio.sleep(delay)
        conn.write(stream.head)
        for i, event in enumerate(stream.truncated if drop else stream.events):
            if i and self.pace:
                await asyncio.sleep(self.pace)
            conn.write(event)
        self._end_stream(conn, stream, drop)

    @staticmethod
    async def _send_later(conn: _Connection, reply: bytes, delay: float, drop: bool) -> None:
        """Write a JSON response after ``delay`` (first-byte latency); drop faults cut it in half."""
        await asyncio.sleep(delay)
        if drop:
            conn.write(reply[: len(reply) // 2])
            conn.drop()
            return
        conn.write(reply)
        conn.end()


def run_in_thread(**kwargs: Unpack[UpstreamOptions]) -> tuple[FakeUpstream, Callable[[], None]]:
    """Serve a ``FakeUpstream(**kwargs)`` on its own event loop in a daemon thread, for sync tests.

    Returns the started server (port bound) and an idempotent ``stop()`` that shuts it down and joins
    the thread.  Startup errors (e.g. port in use) are raised here, in the caller's thread.
    """
    upstream = FakeUpstream(**kwargs)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-upstream", daemon=True)
    thread.start()
    lock = threading.Lock()
    stopped = False

    def stop() -> None:
        nonlocal stopped
        with lock:
            if stopped:
                return
            stopped = True
        try:
            asyncio.run_coroutine_threadsafe(upstream.stop(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    try:
        asyncio.run_coroutine_threadsafe(upstream.start(), loop).result(timeout=10)
    except BaseException:
        stop()
        raise
    return upstream, stop


@contextlib.contextmanager
def serving_in_thread(**kwargs: Unpack[UpstreamOptions]) -> Iterator[FakeUpstream]:
    """Context-manager form of ``run_in_thread``: yields the started server, stops it on exit."""
    upstream, stop = run_in_thread(**kwargs)
    try:
        yield upstream
    finally:
        stop()


def _parse_args(argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Command-line flags mirror the ``FakeUpstream`` constructor."""
    parser = argparse.ArgumentParser(description="Fast fake OpenAI-compatible upstream for benchmarks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (default)")
    parser.add_argument("--models", default="fake-model", help="comma-separated model ids")
    parser.add_argument("--chunks", type=int, default=16, help="content tokens per completion")
    parser.add_argument("--pace", type=float, default=0.0, help="seconds between streamed events")
    parser.add_argument("--first-byte-delay", type=float, default=0.0, help="seconds before headers")
    parser.add_argument("--fault", choices=FAULT_MODES, default="none")
    parser.add_argument("--max-model-len", type=int, help="context length listed with each model, as vLLM does")
    parser.add_argument("--certfile", help="serve https with this PEM certificate chain (its key in it or --keyfile)")
    parser.add_argument("--keyfile", help="the certificate's private key, PEM, when not in --certfile")
    parser.add_argument("--client-ca", help="with --certfile: require a client certificate signed by this CA (PEM)")
    parser.add_argument("--no-messages", dest="messages", action="store_false",
                        help="answer /v1/messages and /v1/messages/count_tokens 404, as an engine without them")
    parser.add_argument("--calls-tools", action="store_true", help="answer a chat offering tools with a tool call")
    return parser, parser.parse_args(argv)


async def _serve(upstream: FakeUpstream) -> None:
    """Serve until SIGTERM or SIGINT, announcing readiness on stdout for the parent process."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await upstream.start()
    # A stand-in for an engine must not add pauses of its own: its start-up objects leave the collector's
    # reach, and the few cycles a request leaves are collected rarely, in short sweeps.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 50)
    try:
        print(f"READY {upstream.url}", flush=True)
        await stop.wait()
    finally:
        await upstream.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: ``python bench/fake_upstream.py --port 0 --fault none --models a,b``."""
    parser, args = _parse_args(argv)
    try:
        upstream = FakeUpstream(
            host=args.host,
            port=args.port,
            models=[model.strip() for model in args.models.split(",") if model.strip()],
            chunks=args.chunks,
            pace=args.pace,
            first_byte_delay=args.first_byte_delay,
            fault=args.fault,
            max_model_len=args.max_model_len,
            certfile=args.certfile,
            messages=args.messages,
            calls_tools=args.calls_tools,
            keyfile=args.keyfile,
            client_ca=args.client_ca,
        )
    except (ValueError, OSError) as exc:  # (ssl.SSLError is an OSError: a file that is not PEM)
        parser.error(str(exc))
    asyncio.run(_serve(upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main())
