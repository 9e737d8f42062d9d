"""Progress while ``first batch wait`` and ``first warm --wait`` wait: a tqdm bar when stderr is a terminal, else a
line now and then (a log file or a pipe gets no carriage returns). Progress goes to stderr, so that stdout keeps
only the outcome."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

from first_jupyter import batch_client, client
from first_jupyter.protocol import Progress, duration

TERMINAL_EVERY_S = 5.0
"""Seconds between progress lines where no bar is drawn, while a batch runs."""


def draws_bars(stream: IO[str]) -> bool:
    return stream.isatty()


def _batch_lines(stream: IO[str]) -> Callable[[batch_client.BatchProgress], None]:
    """A line when the batch's state changed and ``TERMINAL_EVERY_S`` have passed since the last one."""
    printed: list[Any] = [float("-inf"), ""]

    def shown(progress: batch_client.BatchProgress) -> None:
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
        def shown(progress: batch_client.BatchProgress) -> None:
            bar.set_description(str(progress.batch.get("id")), refresh=False)
            bar.total, bar.n = progress.total, progress.done
            counts = progress.batch.get("request_counts") or {}
            bar.set_postfix_str(f"{progress.batch.get('status')}"
                                + (f", {counts['failed']} failed" if counts.get("failed") else ""))

        return batch_client.wait(batch_id, on_update=shown)


def warm_and_wait(model: str, cluster: str | None, stream: IO[str] | None = None) -> dict[str, Any]:
    """Start ``model`` and wait until it answers; the gateway's answer (or its error: why the start failed). How
    the start goes (the gateway's progress: state, time so far, its estimate) is shown on ``stream`` (stderr): a
    bar filled by the estimate on a terminal, else a line per report."""
    stream = stream or sys.stderr
    if not draws_bars(stream):
        return client.warm(model, cluster=cluster, wait=True,
                           on_progress=lambda progress: print(progress.words(), file=stream, flush=True))
    from tqdm import tqdm

    with tqdm(total=1.0, file=stream, dynamic_ncols=True, bar_format="{desc}{percentage:3.0f}%|{bar:24}|") as bar:
        def shown(progress: Progress) -> None:
            left = "unknown" if progress.eta_s is None else duration(progress.eta_s)
            bar.set_description(f"{progress.model} on {progress.cluster}/{progress.endpoint} ({progress.state}, "
                                f"{progress.elapsed_s:.0f} s so far, about {left} to go)", refresh=False)
            bar.n = progress.fraction or 0.0  # unknown while no start of the model has been timed
            bar.refresh()

        answer = client.warm(model, cluster=cluster, wait=True, on_progress=shown)
        bar.set_description(f"{model} on {answer['cluster']}/{answer['endpoint']} ({answer['state']})", refresh=False)
        bar.n = 1.0
    return answer
