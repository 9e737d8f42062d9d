"""The answer of a streamed request: the engine's bytes relayed to the client as they come, and what follows when
it ends (the router told how the endpoint did, usage recorded, a kept response remembered).

It reaches the gateway only through ``StreamHost``, what a stream needs of it, so the gateway's module and this one
do not name each other both ways.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from first_jupyter.config import FirstConfig
from first_jupyter.gateway.admission import Admission, Priority
from first_jupyter.gateway.answers import Relayed, tell_until_done
from first_jupyter.gateway.audio import FormRequest
from first_jupyter.gateway.backends.base import Stream
from first_jupyter.gateway.caller import acting_as, current
from first_jupyter.gateway.response_ids import ResponseBook
from first_jupyter.gateway.router import Router, Target
from first_jupyter.gateway.starts import Attempts
from first_jupyter.gateway.stream_watch import StreamWatch
from first_jupyter.protocol import CLIENT_CLOSED, Capability, OpenAIError, ParsedRequest, Progress


class StreamHost(Protocol):
    """What a stream needs of the gateway that opened it."""

    config: FirstConfig
    router: Router
    admission: Admission
    responses: ResponseBook

    def progress_of(self, attempts: Attempts, first: Target, t0: float) -> Progress: ...

    def record(self, req: ParsedRequest, target: Target | None, status: int, t0: float, ttft: float | None,
               prompt_tokens: int | None, completion_tokens: int | None, request_id: str,
               error: str | None) -> None: ...


class StreamShape(Protocol):
    """What a stream's bytes become on the way to a client that speaks another API than the engine (Anthropic's
    events from chat chunks), and how an error after the status line is written in the client's API."""

    def feed(self, data: bytes) -> bytes:
        """The bytes to send for ``data`` (the engine's, as watched); empty while nothing is complete."""
        ...

    def finish(self) -> bytes:
        """The last bytes, once the engine's stream has ended."""
        ...

    def fail(self, error: OpenAIError) -> bytes:
        """An error event ending the stream."""
        ...


class GatewayStream(Relayed):
    """A relayed stream: upstream bytes out as they come, usage recorded when it is closed.

    For a model that must start first, the stream is returned before any endpoint answers (``opening`` runs the
    request): its status line goes out with a progress comment at once, and more every few seconds until the
    answer begins. Its headers then name the endpoint that was asked to start; a comment says so if another
    endpoint ends up answering.

    It keeps the caller it was opened for (``caller.current`` then) and acts as them again for what it does from
    callbacks, outside the request's context: the response id its first event names, its record when closed.
    """

    __slots__ = ("_attempts", "_caller", "_gateway", "_opened_at", "_opening", "_req",
                 "_t0", "_ttft", "_upstream", "_watch", "error", "request_id", "shape", "target")

    def __init__(self, gateway: StreamHost, req: ParsedRequest, target: Target, attempts: Attempts,
                 upstream: Stream | None, watch: StreamWatch, t0: float, request_id: str,
                 opening: asyncio.Future[Stream] | None = None) -> None:
        self._gateway = gateway
        self._caller = current()
        self._req = req
        self._attempts = attempts
        self.target = target
        self._upstream = upstream
        self._watch = watch
        self._t0 = t0
        self._ttft: float | None = None
        self.error: OpenAIError | None = None
        self.request_id = request_id
        self._opening = opening
        self.shape: StreamShape | None = None
        """Set by a route whose client speaks another API than the engine's stream, before it is relayed."""
        self._opened_at = gateway.admission.clock()
        """When the engine took the request (its answer's head came): its first token is timed from here."""
        if req.capability is Capability.responses:
            watch.on_response_id = self._remember_response
            watch.on_response_done = self._keep_response

    def _keep_response(self, response: dict[str, Any]) -> None:
        """The gateway's copy of the stream's response, from the event that ends it (``response_ids``)."""
        if self._watch.response_id is not None:
            self._gateway.responses.keep(self._watch.response_id, orjson.dumps(response), self._req.data)

    def _remember_response(self, response_id: str) -> None:
        """The stream's response, remembered with the endpoint answering it as soon as its first event names it."""
        with acting_as(self._caller):
            self._gateway.responses.remember(response_id, self.target, self._req.model)

    def _error_event(self, error: OpenAIError) -> bytes:
        self.error = error
        return error.sse_event() if self.shape is None else self.shape.fail(error)

    async def relay(self, write: Callable[[bytes], bool]) -> None:
        """Send the stream into ``write`` chunk by chunk as the upstream delivers it; return at its end.

        ``write`` returns False when the client is not keeping up; call ``resume`` once it has drained. An
        upstream failure after the first byte ends the stream with an OpenAI error event.
        """
        if self._upstream is None and not await self._wait_for_start(write):
            return
        assert self._upstream is not None
        feed, shape = self._watch.feed, self.shape

        def sink(chunk: bytes) -> bool:
            if self._ttft is None:
                self._ttft = time.perf_counter()
                holder = self._attempts.holder
                if self._opening is None and holder is not None and holder[0] is Priority.interactive:  # (no start)
                    admission = self._gateway.admission
                    admission.first_token(self.target, admission.clock() - self._opened_at)
            out = feed(chunk)
            if out and shape is not None:
                out = shape.feed(out)
            return write(out) if out else True  # an empty write would end a chunked response

        try:
            await self._upstream.pipe(sink)
        except OpenAIError as exc:  # the status line is already sent: say it in the stream
            write(self._error_event(exc))
            return
        rest = self._watch.finish()
        if shape is not None:
            rest = (shape.feed(rest) if rest else b"") + shape.finish()
        if rest:
            write(rest)

    async def _wait_for_start(self, write: Callable[[bytes], bool]) -> bool:
        """Progress comments (which clients skip) until an endpoint answers; False when none did (the error is
        then the stream's last event)."""
        assert self._opening is not None
        await tell_until_done(self._opening, self._gateway.config.defaults.cold_start.progress_every,
                              functools.partial(self._gateway.progress_of, self._attempts, self.target, self._t0),
                              write)
        try:
            self._upstream = self._opening.result()
        except OpenAIError as exc:
            self.target = self._attempts.last or self.target
            write(self._error_event(exc))
            return False
        answered = self._attempts.last
        if answered is not None and answered is not self.target:
            self.target = answered
            write(f": answered by cluster '{self.target.cluster}' endpoint '{self.target.endpoint}'\n\n".encode())
        return True

    def resume(self) -> None:
        if self._upstream is not None:
            self._upstream.resume_reading()

    def close(self, *, client_gone: bool = False) -> None:
        """Release the upstream (closing it if unfinished, so the engine stops) and record usage."""
        opening = self._opening
        if self._upstream is None and opening is not None:
            if not opening.done():
                opening.cancel()  # the client left during the start: the request is withdrawn, the start goes on
            elif not opening.cancelled() and opening.exception() is None:
                self._upstream = opening.result()  # opened as the client left
                self.target = self._attempts.last or self.target
        router = self._gateway.router
        if isinstance(self._req, FormRequest):
            self._req.form.close()  # sent, or never to be
        if self._upstream is not None:
            self._upstream.close()
            self._upstream.when_done(functools.partial(self._gateway.admission.ended, self.target,
                                                       self._attempts.holder))
            if self.error is not None:
                router.failed(self.target, self.error.message)  # broke off mid-stream: keep it out if it goes on
            elif self._ttft is not None:
                router.succeeded(self.target, self._attempts.answer_time(self._ttft))
        status = CLIENT_CLOSED if client_gone else (self.error.status if self.error else 200)
        watch = self._watch
        with acting_as(self._caller):
            self._gateway.record(self._req, self.target, status, self._t0, self._ttft, watch.prompt_tokens,
                                 watch.completion_tokens, self.request_id, self.error.message if self.error else None)
