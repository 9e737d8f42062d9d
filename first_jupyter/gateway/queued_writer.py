"""SQLite writes taken off the request path: put on a queue by the event loop, committed in batches by one thread.

A synchronous SQLite commit per request would cost more than the whole proxying. So what must be kept (usage
records, where each response was created) goes onto an in-memory queue, and one writer thread commits what has
gathered in one transaction; ``flush()`` makes it visible to readers (tests, the usage API, another process).
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from first_jupyter.gateway.supervisor import Supervisor

_T = TypeVar("_T")


def json_available(conn: sqlite3.Connection) -> bool:
    """Whether SQLite's JSON functions are there, to write a batch in one statement over one JSON array: they are
    built in from 3.38 and in most older distribution builds, but not all.

    Why one statement: ``executemany`` steps SQLite once per row and gives up the GIL around each step; with the
    event loop busy, taking it back costs up to the interpreter's 5 ms switch interval every time, so a batch of a
    few hundred rows crawls and keeps stealing the GIL from requests in flight (measured: 2 ms per row beside a
    busy thread). One statement is one step, with the GIL released throughout."""
    try:
        conn.execute("SELECT json_extract('[1]', '$[0]') FROM json_each('[]')")
    except sqlite3.OperationalError:
        return False
    return True


class QueuedWriter(Generic[_T]):
    """One writer thread for one SQLite file; ``put`` is one lock-free queue put on the event loop.

    ``write(conn, items)`` commits one batch (inside a transaction the writer opens); a failure is recorded by
    ``supervisor`` as ``task`` and the batch is lost, the writer goes on."""

    def __init__(self, path: Path, write: Callable[[sqlite3.Connection, list[_T]], None], task: str,
                 supervisor: Supervisor, *, interval: float = 0.25) -> None:
        """``interval``: how long a batch gathers after its first item (0: committed as soon as the thread runs)."""
        self._path = path
        self._write = write
        self._task = task
        self._supervisor = supervisor
        self._queue: queue.SimpleQueue[_T | threading.Event | None] = queue.SimpleQueue()
        self._interval = interval
        self._hurry = threading.Event()  # flush and close: commit now rather than at the batch's end
        self._thread = threading.Thread(target=self._write_loop, name=f"first-{task.replace(' ', '-')}",
                                        daemon=True)
        self._thread.start()

    def put(self, item: _T) -> None:
        self._queue.put(item)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every item handed to ``put`` before this call is committed."""
        if self._thread.is_alive():
            done = threading.Event()
            self._queue.put(done)
            self._hurry.set()
            done.wait(timeout)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._hurry.set()
            self._thread.join(timeout=10)

    def _write_loop(self) -> None:
        """Block for the first item, let a batch gather for one interval, then commit it in one transaction.

        Waking once per batch rather than once per item keeps this thread off the GIL while requests run.
        """
        conn = sqlite3.connect(self._path)
        # WAL with synchronous=NORMAL: a commit survives the server crashing and costs half as much CPU;
        # only a power cut may lose the last batches, an acceptable risk for what is kept here.
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            running = True
            while running:
                items = [self._queue.get()]
                if items[0] is not None and self._interval:
                    self._hurry.wait(self._interval)
                    self._hurry.clear()
                while True:
                    try:
                        items.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                batch: list[_T] = [item for item in items if item is not None and not isinstance(
                    item, threading.Event)]
                if batch:
                    with self._supervisor.guard(self._task, f"{len(batch)} records lost"), conn:
                        self._write(conn, batch)
                for item in items:
                    if isinstance(item, threading.Event):
                        item.set()
                running = None not in items
        finally:
            conn.close()
