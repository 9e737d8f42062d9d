"""A batch's progress in a notebook, refreshed in the background until the batch ends, with a cancel button."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as widgets

from first_jupyter import batch_client, client
from first_jupyter.client import GatewayError
from first_jupyter.widgets.picker import ERROR_COLOR, one_line

_BAR_STYLE = {"completed": "success", "failed": "danger", "expired": "warning", "cancelled": "warning"}


class BatchMonitor:
    """A progress bar, the counts, the rate and the time still expected, read every ``every`` seconds in a
    background thread (the kernel stays free for other cells) until the batch ends; then the thread stops.

    ``batch_id`` defaults to the batch this kernel submitted last. Cancel asks the gateway to stop the batch:
    requests in flight finish and the rest are reported as not run. Displays as the last expression of a cell;
    ``widget`` is the box to embed.

    The monitor keeps to the gateway it began on: once this kernel disconnects from it, the monitor stops and
    says so, rather than start a gateway of its own with whatever configuration is set by then.
    """

    def __init__(self, batch_id: str | None = None, *, every: float = 2.0) -> None:
        self.every = every
        self.progress = batch_client.BatchProgress()
        self.title = widgets.HTML()
        self.bar = widgets.IntProgress(min=0, max=1, value=0, layout=widgets.Layout(width="24em"))
        self.counts = widgets.Label()
        self.cancel_button = widgets.Button(description="Cancel", icon="stop",
                                            tooltip="Stop the batch: requests in flight finish, the rest are not run")
        self.error_line = widgets.Label(style={"text_color": ERROR_COLOR})
        self.widget = widgets.VBox([self.title, widgets.HBox([self.bar, self.cancel_button]), self.counts,
                                    self.error_line])
        self.cancel_button.on_click(lambda _button: self.cancel())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: client.Connection | None = None
        try:
            self._conn = client.connection()
            self.batch_id = batch_client.latest_id(batch_id)
        except Exception as exc:  # a widget reports, it never raises into the frontend
            self.batch_id = batch_id or ""
            self._failed(exc)
            return
        self.refresh()
        if not self.progress.ended and not self._stop.is_set():
            self._thread = threading.Thread(target=self._follow, name="first-batch-monitor", daemon=True)
            self._thread.start()

    @property
    def batch(self) -> dict[str, Any]:
        """The batch as last read."""
        return self.progress.batch

    def refresh(self) -> None:
        """Read the batch again and show it."""
        self._show_answer(batch_client.get)

    def cancel(self) -> None:
        """Ask the gateway to stop the batch; the monitor goes on until it has stopped."""
        self._show_answer(batch_client.cancel)

    def _show_answer(self, call: Callable[..., dict[str, Any]]) -> None:
        if self._conn is not None and not client.is_current(self._conn):
            self.error_line.value = (f"Stopped following {self.batch_id}: this kernel no longer uses the gateway "
                                     f"it ran on. Run `%first batch status {self.batch_id}` to read it on the "
                                     "gateway in use.")
            self._stop.set()
            return
        try:
            self._conn = self._conn or client.connection()  # only where it could not be had at the start
            self.progress.update(call(self.batch_id, conn=self._conn))
        except Exception as exc:  # a widget reports, it never raises into the frontend
            self._failed(exc)
            return
        self._show()

    def stop(self) -> None:
        """Stop refreshing (the batch goes on)."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the monitor stops following (the batch ended, or ``stop``); False after ``timeout``."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self._thread is None or not self._thread.is_alive()

    def _follow(self) -> None:
        while not self._stop.wait(self.every):
            self.refresh()
            if self.progress.ended:
                return

    def _show(self) -> None:
        batch, progress = self.progress.batch, self.progress
        status = batch.get("status", "")
        with self.bar.hold_sync():
            self.bar.max = max(progress.total, 1)
            self.bar.value = min(progress.done, self.bar.max)
            self.bar.bar_style = _BAR_STYLE.get(status, "info")
        self.title.value = f"<b>{batch.get('id', self.batch_id)}</b> · {status} · {batch.get('endpoint', '')}"
        self.counts.value = progress.summary()
        self.cancel_button.disabled = progress.ended or status == "cancelling"
        self.error_line.value = " ".join(batch_client.describe_errors(batch).split()) if status == "failed" else ""

    def _failed(self, exc: BaseException) -> None:
        """Shown in the error line; a batch the gateway does not have is not followed any longer (a gateway that
        cannot be reached may come back, so it is read again)."""
        self.error_line.value = one_line(exc)
        if isinstance(exc, GatewayError) and exc.status == 404:
            self._stop.set()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any] | None:
        """Displayed as its widget when it is the last expression of a cell."""
        bundle: dict[str, Any] | None = self.widget._repr_mimebundle_(**kwargs)
        return bundle
