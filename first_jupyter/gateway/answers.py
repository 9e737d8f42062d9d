"""What the gateway answers a request with, as the doors send it: a whole answer, or events relayed as they come.

``Completed`` and ``GatewayStream`` (in ``core``) are the answers of a plain and a streamed request;
``WaitingAnswer`` is a plain request's answer that waits for a model's start and tells its progress meanwhile
(``protocol.PROGRESS_HEADER``). The doors send every ``Relayed`` alike: a response of server-sent events.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from first_jupyter.api_types import json_body
from first_jupyter.protocol import OpenAIError, Progress

if TYPE_CHECKING:
    from first_jupyter.gateway.router import Target


class Completed:
    """A finished non-streamed answer, with where it ran; ``content_type``: the engine's, for an answer that is not
    JSON (an audio transcript as text, SRT or WebVTT), passed on as it came."""

    __slots__ = ("body", "content_type", "target")

    def __init__(self, body: bytes, target: Target, content_type: str = "application/json") -> None:
        self.body = body
        self.target = target
        self.content_type = content_type


class Relayed(ABC):
    """An answer the doors send as server-sent events: they open the response, then ``relay`` writes it."""

    __slots__ = ()
    target: Target
    """Where it runs (the endpoint asked first, until another answers): the response's X-First headers."""

    @abstractmethod
    async def relay(self, write: Callable[[bytes], bool]) -> None:
        """Write the answer; ``write`` returns False while the client is not keeping up."""

    @abstractmethod
    def resume(self) -> None:
        """The client has drained what it was sent: go on."""

    @abstractmethod
    def close(self, *, client_gone: bool = False) -> None:
        """The door is done with it (answered, or the client left): release what it holds."""


async def tell_until_done(work: asyncio.Future[Any], every: float, progress: Callable[[], Progress],
                          write: Callable[[bytes], bool]) -> None:
    """A progress comment at once and then every ``every`` seconds, until ``work`` is done."""
    while True:
        write(progress().comment())
        done, _ = await asyncio.wait((work,), timeout=every)
        if done:
            return


class WaitingAnswer(Relayed):
    """A non-streamed request that waits for a model's start, answered as progress comments and then one
    ``data:`` event holding the whole answer (or the error event, since the status line has gone out)."""

    __slots__ = ("_every", "_progress", "_work", "error", "target")

    def __init__(self, work: asyncio.Future[Any], target: Target, every: float,
                 progress: Callable[[], Progress]) -> None:
        """``work``: the request itself, which resolves to the answer (``Completed``, or a JSON value) or raises
        its ``OpenAIError``; ``progress``: where the start stands now."""
        self._work = work
        self.target = target
        self._every = every
        self._progress = progress
        self.error: OpenAIError | None = None

    async def relay(self, write: Callable[[bytes], bool]) -> None:
        await tell_until_done(self._work, self._every, self._progress, write)
        try:
            answer = self._work.result()
        except OpenAIError as exc:
            self.error = exc
            write(exc.sse_event())
            return
        if isinstance(answer, Completed):  # the engine's bytes, as the plain answer would carry them
            self.target = answer.target
            body = answer.body
        else:
            body = json_body(answer)
        write(b"data: " + body + b"\n\n")

    def resume(self) -> None:
        """Nothing to resume: the answer is written whole, and the comments are few."""

    def close(self, *, client_gone: bool = False) -> None:
        """A client that left withdraws the request (which records itself, as a plain request would)."""
        if not self._work.done():
            self._work.cancel()
