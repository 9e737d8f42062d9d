"""A capacity-limited fake inference engine, for benches of scheduling (``bench/mixed_load.py``).

``fake_upstream.py`` answers at once, to measure what the gateway costs; this one answers as slowly as an engine
that is busy, to measure whom the gateway makes wait. It speaks enough of vLLM's OpenAI server for the gateway:
``GET /v1/models``, ``POST /v1/chat/completions`` (streamed or not) and ``GET /metrics`` (``vllm:num_requests_waiting``
and ``vllm:num_requests_running``).

The model of time, all on the event loop's clock (so a bench may run it on virtual time):

- ``slots`` sequences run at once (vLLM's ``max_num_seqs``); a request beyond them waits, first come first served.
- A request's first token comes after its prefill: ``prefill_s_per_token`` for each prompt token not in the prefix
  cache. Each further token takes ``decode_s_per_token``. Sequences do not slow each other down: the engine models
  slot contention and prefix caching, not the compute two sequences share.
- The prefix cache holds the last ``cache_prefixes`` prefixes seen (least recently used out). A request's prefix is
  its first message (the system prompt) when there are several; a hit spares that message's tokens their prefill.
  The engine counts its lookups and hits (``cache``), whatever routed the request there.

Tokens are words (whitespace-separated) here.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import orjson

STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
               b"Cache-Control: no-cache\r\n\r\n")


@dataclass(frozen=True, slots=True)
class EngineSettings:
    slots: int = 32
    prefill_s_per_token: float = 0.0005
    decode_s_per_token: float = 0.02
    cache_prefixes: int = 16


@dataclass(slots=True)
class CacheCounts:
    lookups: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.lookups if self.lookups else None


@dataclass(slots=True)
class _Slots:
    free: int
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)

    async def take(self) -> None:
        if self.free and not self.waiting:
            self.free -= 1
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.give()
            else:
                self.waiting.remove(turn)
            raise

    def give(self) -> None:
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes straight to it
                return
        self.free += 1


def _words(content: Any) -> int:
    return len(content.split()) if isinstance(content, str) else 0


class FakeEngine:
    """One engine serving ``model`` on 127.0.0.1 (``start`` returns its port)."""

    def __init__(self, model: str, settings: EngineSettings) -> None:
        self.model = model
        self.settings = settings
        self.cache = CacheCounts()
        self._prefixes: OrderedDict[int, None] = OrderedDict()
        self._slots = _Slots(settings.slots)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def waiting(self) -> int:
        return len(self._slots.waiting)

    @property
    def running(self) -> int:
        return self.settings.slots - self._slots.free

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    # -- the model of time ----------------------------------------------------------------------------------

    def _prefill_s(self, messages: list[dict[str, Any]]) -> float:
        tokens = sum(_words(m.get("content")) for m in messages)
        if len(messages) > 1:
            prefix = hash(str(messages[0].get("content")))
            self.cache.lookups += 1
            if prefix in self._prefixes:
                self.cache.hits += 1
                self._prefixes.move_to_end(prefix)
                tokens -= _words(messages[0].get("content"))
            else:
                self._prefixes[prefix] = None
                if len(self._prefixes) > self.settings.cache_prefixes:
                    self._prefixes.popitem(last=False)
        return tokens * self.settings.prefill_s_per_token

    # -- HTTP -----------------------------------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *headers = head.decode("latin-1").split("\r\n")
                method, path, _ = line.split(" ", 2)
                length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")),
                              0)
                body = await reader.readexactly(length) if length else b""
                await self._answer(method, path.split("?", 1)[0], body, writer)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _answer(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if method == "GET" and path == "/v1/models":
            writer.write(_json(200, {"object": "list", "data": [{"id": self.model, "object": "model",
                                                                 "owned_by": "fake-engine"}]}))
        elif method == "GET" and path == "/metrics":
            text = (f'vllm:num_requests_waiting{{model_name="{self.model}"}} {self.waiting}\n'
                    f'vllm:num_requests_running{{model_name="{self.model}"}} {self.running}\n').encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(text), text))
        elif method == "POST" and path == "/v1/chat/completions":
            await self._chat(orjson.loads(body), writer)
        else:
            writer.write(_json(404, {"error": {"message": f"no route {method} {path}", "type": "not_found"}}))
        await writer.drain()

    async def _chat(self, request: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        messages = request.get("messages") or []
        tokens = int(request.get("max_tokens") or 16)
        prompt = sum(_words(m.get("content")) for m in messages)
        usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
        stream = bool(request.get("stream"))
        if stream:
            writer.write(STREAM_HEAD)  # the head at once, as vLLM sends it; the first token after the prefill
        await self._slots.take()
        try:
            await asyncio.sleep(self._prefill_s(messages))
            if not stream:
                await asyncio.sleep(tokens * self.settings.decode_s_per_token)
                writer.write(_json(200, {"id": "chatcmpl-fake", "object": "chat.completion", "model": self.model,
                                         "choices": [{"index": 0, "finish_reason": "length", "message": {
                                             "role": "assistant", "content": " ".join(["word"] * tokens)}}],
                                         "usage": usage}))
                return
            writer.write(_event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": "word"}}]}))
            await asyncio.sleep((tokens - 1) * self.settings.decode_s_per_token)
            writer.write(_event({"choices": [{"index": 0, "delta": {"content": " word" * (tokens - 1)},
                                              "finish_reason": "length"}]}))
            if (request.get("stream_options") or {}).get("include_usage"):
                writer.write(_event({"choices": [], "usage": usage}))
            writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        finally:
            self._slots.give()


def _json(status: int, payload: Any) -> bytes:
    body = orjson.dumps(payload)
    return b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status, len(body), body)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(payload: dict[str, Any]) -> bytes:
    return _chunk(b"data: " + orjson.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                            "model": "fake", **payload}) + b"\n\n")

