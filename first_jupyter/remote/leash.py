"""What ends a request's work on a node's engine once nobody will take its answer.

A task cannot be interrupted from outside once it runs: Globus Compute cancels only tasks that have not started.
So the function on the node watches for itself, in a thread beside its call to the engine, the two things that
say its answer is no longer wanted: the request's deadline (the gateway's timeout for it, so the node keeps it even
when it cannot reach the gateway), and the gateway refusing the task's word (it closes a task whose client left or
that it gave up on, and refuses whatever the node sends about it after that). Either way it shuts the engine's
connection: an engine stops generating for a client that has gone (vLLM aborts the request; ``transformers serve``
does so for streams, which is why the node streams from it even for a plain answer).

Standard library only, like every module that travels to an endpoint.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Literal

ALIVE_S = 1.0
"""How often a node asks whether the gateway still wants an answer it is computing (when it has sent nothing
else meanwhile): at most this long of wasted engine work after the gateway lets go."""

Why = Literal["deadline", "withdrawn"]


class Leash:
    """Watches one call to the engine; ``why`` says what ended it early (None while nothing did).

    ``wanted``: asks the gateway, returning False once it refuses the task (None when the node has no way to
    reach it); it is asked every ``every_s`` seconds. ``deadline``: when the answer is no use any more, as a Unix
    time (the node's clock; nodes keep theirs by NTP, as the gateway's host does).
    """

    def __init__(self, deadline: float | None, wanted: Callable[[], bool] | None, every_s: float = ALIVE_S) -> None:
        self._deadline = deadline
        self._wanted = wanted
        self._every = every_s
        self._released = threading.Event()
        self.why: Why | None = None

    @contextlib.contextmanager
    def holding(self, conn: http.client.HTTPConnection) -> Iterator[None]:
        """Watch ``conn`` (its request already sent) for the duration of the block. The deadline is looked at
        at once: a task that starts after it (it waited in the endpoint's queue) ends before the engine has
        computed anything for it."""
        if self._deadline is None and self._wanted is None:
            yield
            return
        watcher = threading.Thread(target=self._watch, args=(conn,), name="first-leash", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            self._released.set()
            watcher.join()

    def _watch(self, conn: http.client.HTTPConnection) -> None:
        wait = 0.0
        while not self._released.wait(wait):
            if self._deadline is not None and time.time() >= self._deadline:
                self._end(conn, "deadline")
                return
            if self._wanted is not None and not self._wanted():
                self._end(conn, "withdrawn")
                return
            wait = self._every if self._deadline is None else max(min(self._every, self._deadline - time.time()), 0)

    def _end(self, conn: http.client.HTTPConnection, why: Why) -> None:
        """Shut the engine's connection under the reading thread: its read ends, and the engine sees its client
        gone."""
        self.why = why
        sock = conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed by the other end
                sock.shutdown(socket.SHUT_RDWR)
