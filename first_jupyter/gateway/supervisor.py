"""Background work that one failure must not end.

The gateway keeps work going behind the requests: status readings, the usage writer, batch runs and their
resumer, model starts, catalog readings. An exception that escapes such a loop ends it without a word, and the
gateway then runs on with stale states or unwritten usage for the rest of the process. So every one of them runs
under the ``Supervisor``: a failure is logged with its traceback, counted (``/first/api/status`` shows the counts
and the last error of each kind of task), and the loop goes on with its next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

log = logging.getLogger(__name__)


class Supervisor:
    """Counts and logs the failures of the gateway's background tasks, by kind of task (``"status readings"``):
    the kinds are few and fixed, so the status stays small however often something fails."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the usage writer fails on its own thread
        self._failures: dict[str, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def failed(self, task: str, exc: BaseException, detail: str = "") -> None:
        """Record one failure of ``task`` (``detail``: which one, e.g. the batch id); the task goes on."""
        log.error("background task %s failed%s; it goes on", task, f" ({detail})" if detail else "", exc_info=exc)
        with self._lock:
            entry = self._failures.setdefault(task, {"failures": 0})
            entry["failures"] += 1
            entry["last_error"] = f"{detail + ': ' if detail else ''}{type(exc).__name__}: {exc}"
            entry["last_failed_at"] = time.time()

    @contextlib.contextmanager
    def guard(self, task: str, detail: str = "") -> Iterator[None]:
        """One round of ``task``: an ``Exception`` in it is recorded and swallowed (cancellation is not)."""
        try:
            yield
        except Exception as exc:
            self.failed(task, exc, detail)

    async def repeat(self, task: str, step: Callable[[], Awaitable[float]], retry_s: float) -> None:
        """Run ``step`` forever, each time after the seconds the last one returned; ``retry_s`` after a failure."""
        while True:
            wait = retry_s
            with self.guard(task):
                wait = await step()
            await asyncio.sleep(wait)

    def spawn(self, task: str, work: Coroutine[Any, Any, None], detail: str = "") -> asyncio.Task[None]:
        """Run ``work`` as a task of its own, kept until it ends, its failure recorded."""
        running = asyncio.get_running_loop().create_task(work)
        self._tasks.add(running)

        def ended(done: asyncio.Task[None]) -> None:
            self._tasks.discard(done)
            if not done.cancelled() and (exc := done.exception()) is not None:
                self.failed(task, exc, detail)

        running.add_done_callback(ended)
        return running

    def cancel_all(self) -> None:
        """Stop the tasks ``spawn`` started that still run (the gateway is closing)."""
        for running in list(self._tasks):
            running.cancel()

    def status(self) -> dict[str, Any]:
        """For ``/first/api/status``: the failures of all tasks, and of each kind that failed."""
        with self._lock:
            tasks = {name: dict(entry) for name, entry in sorted(self._failures.items())}
        return {"failures": sum(entry["failures"] for entry in tasks.values()), "tasks": tasks}
