"""Progress while ``first batch wait`` and ``first warm --wait`` wait: a tqdm bar when stderr is a terminal, else a
line now and then (a log file or a pipe gets no carriage returns). Progress goes to stderr, so that stdout keeps
only the outcome."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

from first_jupyter import batch_client, client

TERMINAL_EVERY_S = 5.0
"""Seconds between progress lines where no bar is drawn, while a batch runs."""
TICK_S = 0.5
"""How often a warm-up's bar moves: its progress is the time gone against the gateway's estimate."""


def draws_bars(stream: IO[str]) -> bool:
    return stream.isatty()


def _batch_lines(stream: IO[str]) -> Callable[[batch_client.Progress], None]:
    """A line when the batch's state changed and ``TERMINAL_EVERY_S`` have passed since the last one."""
    printed: list[Any] = [float("-inf"), ""]

    def shown(progress: batch_client.Progress) -> None:
        line = progress.describe()
        if not progress.ended and line != printed[1] and time.monotonic() - printed[0] >= TERMINAL_EVERY_S:
            print(line, file=stream, flush=True)
            printed[:] = [time.monotonic(), line]

    return shown


def wait_for_batch(batch_id: str | None, stream: IO[str] | None = None) -> dict[str, Any]:
    """Follow a batch until it ends, showing its progress on ``stream`` (stderr); the final batch."""
    stream = stream or sys.stderr
    if not draws_bars(stream):
        return batch_client.wait(batch_id, on_update=_batch_lines(stream))
    from tqdm import tqdm

    with tqdm(total=None, unit="req", file=stream, dynamic_ncols=True) as bar:
        def shown(progress: batch_client.Progress) -> None:
            bar.set_description(str(progress.batch.get("id")), refresh=False)
            bar.total, bar.n = progress.total, progress.done
            counts = progress.batch.get("request_counts") or {}
            bar.set_postfix_str(f"{progress.batch.get('status')}"
                                + (f", {counts['failed']} failed" if counts.get("failed") else ""))

        return batch_client.wait(batch_id, on_update=shown)


def warm_and_wait(model: str, cluster: str | None, stream: IO[str] | None = None) -> dict[str, Any]:
    """Start ``model`` and wait until it answers; the gateway's last answer. On a terminal (``stream``, stderr) a
    bar shows the time gone against the gateway's estimate while the gateway itself waits (``warm(wait=True)``,
    whose answer or error, the reason a start failed, is what counts)."""
    stream = stream or sys.stderr
    if not draws_bars(stream):
        return client.warm(model, cluster=cluster, wait=True)
    begun = client.warm(model, cluster=cluster)  # starts it, and says where and how long it is expected to take
    if begun["state"] == "hot":
        return begun
    outcome: list[Any] = []
    done = threading.Event()

    def wait() -> None:
        try:
            outcome.append(client.warm(model, cluster=begun["cluster"], wait=True))
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome.append(exc)
        finally:
            done.set()

    threading.Thread(target=wait, name="first-warm-wait", daemon=True).start()
    from tqdm import tqdm

    started = time.monotonic()
    where = f"{model} on {begun['cluster']}/{begun['endpoint']}"
    with tqdm(total=max(float(begun["expected_s"]), 1.0), desc=where, unit="s", file=stream, dynamic_ncols=True,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s {postfix}") as bar:
        while not done.wait(TICK_S):
            gone = time.monotonic() - started
            bar.total = max(bar.total, gone)  # slower than expected: the bar stays short of its end
            bar.n = gone
            bar.set_postfix_str("starting")
        bar.n = bar.total = max(bar.total, time.monotonic() - started)
        bar.set_postfix_str("done" if not isinstance(outcome[0], BaseException) else "failed")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    answer: dict[str, Any] = outcome[0]
    return answer
