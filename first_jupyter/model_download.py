"""Download a model from the Hugging Face hub into a directory once, and say how far it has got.

The embedded default's real model is fetched by the gateway itself, in a thread, as soon as the gateway starts:
so the terminal that started JupyterLab shows tqdm's bar (huggingface_hub's own, on stderr), and
``/first/api/status`` shows the same bytes, which the sidebar reads. The engine starts once it is complete.

huggingface_hub does the work, through its public ``snapshot_download`` into a local directory. A file it has not
finished stays as ``.cache/huggingface/download/<file>.incomplete`` there, and the next download asks the hub for
the rest of it (an HTTP range), so a download cut off (the network, a stopped server) resumes where it stopped,
at the next start or the next request.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

from first_jupyter.embedded_model import DOWNLOADED_MARKER, ENDPOINT_ENV
from first_jupyter.protocol import OpenAIError

ONLY_TOP_LEVEL = ["*/*"]
"""Files in sub-folders (``onnx/``, ``runs/``) are other formats or training logs, not what transformers loads."""

State = Literal["waiting", "downloading", "done", "failed"]


class ModelDownloader:
    """One model's download, run at most once at a time, in a daemon thread; readable from any thread."""

    def __init__(self, repo: str, target: Path, where: str) -> None:
        self.repo = repo
        self.target = target
        self.where = where
        self.state: State = "done" if (target / DOWNLOADED_MARKER).is_file() else "waiting"
        self.done_bytes = 0
        self.total_bytes = 0
        self.error: str | None = None
        self.started_at: float | None = None
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None
        if self.state == "done":
            self._finished.set()

    def start(self) -> None:
        """Begin (or, after a failure, resume) the download; nothing if it runs or is done."""
        with self._lock:
            if self.state in ("downloading", "done"):
                return
            self.state, self.error, self.started_at = "downloading", None, time.time()
            self.done_bytes = self.total_bytes = 0
            self._finished.clear()
            self._thread = threading.Thread(target=self._run, name="first-model-download", daemon=True)
            self._thread.start()

    def wait(self) -> None:
        """Until the model is all there (starting the download if it is not running); a failure as the 503 that
        says what to do."""
        self.start()
        self._finished.wait()
        if self.state == "failed":
            raise OpenAIError(503, self.failure(), type="api_error", code="model_download_failed")

    def failure(self) -> str:
        return (f"Downloading {self.repo} into {self.target} for {self.where} failed: {self.error}. The part "
                "downloaded is kept: the next request resumes it. Without a route to the Hugging Face hub, set "
                "HF_HUB_OFFLINE=1 and restart to serve the tiny offline model.")

    def status(self) -> dict[str, Any]:
        """What ``/first/api/status`` shows of it: the sidebar draws a bar from the bytes."""
        return {"repo": self.repo, "path": str(self.target), "state": self.state, "done_bytes": self.done_bytes,
                "total_bytes": self.total_bytes, "started": self.started_at, "error": self.error}

    def _advance(self, n: float, total: float | None) -> None:
        self.done_bytes += int(n)
        self.total_bytes = int(total or 0)

    def _run(self) -> None:
        from huggingface_hub import snapshot_download

        try:
            snapshot_download(self.repo, local_dir=self.target, ignore_patterns=ONLY_TOP_LEVEL,
                              endpoint=os.environ.get(ENDPOINT_ENV), tqdm_class=_bar_for(self))
            (self.target / DOWNLOADED_MARKER).write_text(json.dumps({"repo": self.repo}) + "\n")
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            self.state = "done"
        finally:
            self._finished.set()


def _bar_for(download: ModelDownloader) -> type[Any]:
    """huggingface_hub's tqdm (drawn on a terminal, quiet elsewhere), also counting the bytes into ``download``.

    ``snapshot_download`` makes one bar in bytes for all files (its total grows as it learns each file's size,
    and a resumed file counts what was already there) and one in files; only the first is counted. tqdm keeps
    no count when it does not draw, so the bytes are counted here, not read from the bar.
    """
    from huggingface_hub.utils.tqdm import tqdm as hub_tqdm

    class Counting(hub_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.counts_bytes = kwargs.get("unit") == "B"
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]  # huggingface_hub's is unannotated

        def update(self, n: float | None = 1) -> bool | None:
            if self.counts_bytes:
                download._advance(n or 0, self.total)
            return super().update(n)

    return Counting
