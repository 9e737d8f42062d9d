"""The Batch API over a data dir, for both doors: files, batches, and the runs that carry them out.

Runs are resumed wherever a gateway on the same data dir is up: each run holds a claim on its batch for as long as
it runs (``claims``: a lock file on one host, a lease in the shared database across hosts), so a Jupyter server and
a plain IPython session sharing a data dir, or two replicas, never run one batch twice, and a run whose process
died is taken up by the next gateway that looks.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from first_jupyter.api_types import BatchPage, BatchReply
from first_jupyter.batch.claims import Claim, Claims, FileClaims
from first_jupyter.batch.runner import BatchRun
from first_jupyter.batch.store import FINAL_STATES, BatchStore, Store, StoredFile, new_id
from first_jupyter.batch.upload import Upload
from first_jupyter.batch.validate import ENDPOINTS
from first_jupyter.config import BatchDefaults
from first_jupyter.protocol import OpenAIError, list_page, page_limit, shown

if TYPE_CHECKING:
    from first_jupyter.batch.pg_store import PgBatchState
    from first_jupyter.gateway.caller import Caller
    from first_jupyter.gateway.core import Gateway

log = logging.getLogger(__name__)

RESUME_EVERY_S = 15.0
_WINDOW = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 7 * 86400
MAX_METADATA = 16
STATE_UNAVAILABLE = "state_unavailable"
"""The code of the 503 a store answers while the shared database cannot be reached (``serve.pg_state.unavailable``)."""


def _window_s(window: Any) -> int:
    match = _WINDOW.match(window) if isinstance(window, str) else None
    seconds = int(match.group(1)) * _UNITS[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise OpenAIError(400, f"completion_window {shown(window)} is not a duration up to 7 days; send '24h' "
                               "(OpenAI's value), or another such as '30m', '2h' or '3d'.", param="completion_window")
    return seconds


def _metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items()):
        raise OpenAIError(400, f"metadata must be an object of at most {MAX_METADATA} string values (keys up to 64 "
                               "characters, values up to 512).", param="metadata")
    return metadata


class Batches:
    def __init__(self, gateway: Gateway, root: Path, settings: BatchDefaults, caller: Caller | None = None,
                 shared: PgBatchState | None = None) -> None:
        """``caller``: whose batches these are, at a shared gateway (each user has a store of their own).
        ``shared``: the database that replicas on several hosts share, ``root`` then in its files dir."""
        self.gateway = gateway
        self.settings = settings
        self.root = root
        self.caller = caller
        self.store: BatchStore
        self.claims: Claims
        if shared is None:
            self.store, self.claims = Store(root), FileClaims(root / "locks")
        else:
            from first_jupyter.batch.pg_store import PgLeases

            assert caller is not None  # (a shared gateway's stores are each user's)
            self.store, self.claims = shared.store(root, caller.user), PgLeases(shared)
        self.runs: dict[str, BatchRun] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}

    # -- files ------------------------------------------------------------------------------------------------

    def upload(self, content_type: str | None) -> Upload:
        """A sink for one ``POST /files`` body, spooled beside the files until it is complete."""
        return Upload(content_type, self.store.files_dir / f".upload-{secrets.token_hex(8)}",
                      self.settings.max_file_bytes, self.settings.max_file_lines)

    def add_file(self, upload: Upload) -> dict[str, Any]:
        purpose, filename = upload.finish()
        file_id = new_id("file-")
        upload.dest.rename(self.store.path(file_id))
        return self.store.add_file(purpose, filename, upload.bytes, upload.lines, file_id).to_json()

    def files(self, query: Mapping[str, str]) -> dict[str, Any]:
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise OpenAIError(400, f"order must be 'asc' or 'desc'; it is {shown(order)}.", param="order")
        found, more = self.store.files(query.get("purpose"), query.get("after"), page_limit(query, 10_000, 10_000),
                                       newest_first=order == "desc")
        return list_page([f.to_json() for f in found], more)

    def file(self, file_id: str) -> StoredFile:
        found = self.store.file(file_id)
        if found is None:
            raise OpenAIError(404, f"No file {shown(file_id)} here. GET /first/v1/files lists the files.",
                              param="file_id", code="file_not_found")
        return found

    def content(self, file_id: str) -> Path:
        return self.store.path(self.file(file_id).id)

    def delete_file(self, file_id: str) -> dict[str, Any]:
        self.file(file_id)
        user = self.store.in_use(file_id)
        if user is not None:
            raise OpenAIError(409, f"File '{file_id}' is the input of batch '{user}', which has not finished. Cancel "
                                   "the batch (or let it finish) first.", param="file_id", code="file_in_use")
        self.store.delete_file(file_id)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches ----------------------------------------------------------------------------------------------

    async def create(self, body: bytes) -> BatchReply:
        try:
            asked = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise OpenAIError(400, f"The body is not JSON ({exc}). Send input_file_id, endpoint and "
                                   "completion_window.") from None
        if not isinstance(asked, dict):
            raise OpenAIError(400, "The body must be a JSON object with input_file_id, endpoint and "
                                   "completion_window.")
        input_file_id = asked.get("input_file_id")
        if not isinstance(input_file_id, str):
            raise OpenAIError(400, "input_file_id is missing: upload the JSONL with POST /first/v1/files "
                                   "(purpose=batch) and send its id.", param="input_file_id")
        source = self.store.file(input_file_id)
        if source is None:
            raise OpenAIError(400, f"No file {shown(input_file_id)} here: upload the JSONL with POST /first/v1/files "
                                   "(purpose=batch) and send the id it answers.", param="input_file_id",
                              code="file_not_found")
        if source.purpose != "batch":
            raise OpenAIError(400, f"File '{input_file_id}' has purpose '{source.purpose}'; a batch reads a file "
                                   "uploaded with purpose=batch.", param="input_file_id")
        endpoint = asked.get("endpoint")
        if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:  # (a list or an object is no key)
            raise OpenAIError(400, f"endpoint {shown(endpoint)} is not one a batch can call; use one of "
                                   f"{', '.join(ENDPOINTS)}.", param="endpoint")
        window = asked.get("completion_window", "24h")
        now = int(time.time())
        batch: dict[str, Any] = {
            "id": new_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": None,
            "input_file_id": input_file_id, "completion_window": window, "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
            "expires_at": now + _window_s(window), "finalizing_at": None, "completed_at": None, "failed_at": None,
            "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": _metadata(asked.get("metadata"))}
        self.store.add_batch(batch)
        answer = BatchReply.model_validate(batch)  # a copy as created: its run changes the batch
        self._run(batch)
        return answer

    def batches(self, query: Mapping[str, str]) -> BatchPage:
        found, more = self.store.batches(query.get("after"), page_limit(query, 20, 100))
        return BatchPage.model_validate(list_page([self._live(b) for b in found], more))

    def batch(self, batch_id: str) -> BatchReply:
        return BatchReply.model_validate(self._found(batch_id))

    def cancel(self, batch_id: str) -> BatchReply:
        stored = self._found(batch_id)
        if stored["status"] in FINAL_STATES:
            if stored["status"] == "cancelled":
                return BatchReply.model_validate(stored)
            raise OpenAIError(409, f"Batch '{batch_id}' has {stored['status']}; only one validating or in progress "
                                   "can be cancelled.", param="batch_id", code="batch_not_cancellable")
        self.store.request_cancel(batch_id)
        run = self.runs.get(batch_id)
        # without a run here, its run (in another process, or the next to start) stops it
        return BatchReply.model_validate(run.cancel() if run is not None else {**stored, "status": "cancelling"})

    def _found(self, batch_id: str) -> dict[str, Any]:
        """The batch as it stands (its run's copy, while it runs here); 404 for one that is not here."""
        found = self.store.batch(batch_id)
        if found is None:
            raise OpenAIError(404, f"No batch {shown(batch_id)} here. GET /first/v1/batches lists the batches.",
                              param="batch_id", code="batch_not_found")
        return self._live(found)

    def _live(self, batch: dict[str, Any]) -> dict[str, Any]:
        run = self.runs.get(batch["id"])
        return run.snapshot() if run is not None else batch

    # -- runs -------------------------------------------------------------------------------------------------

    async def keep_running(self, every: float = RESUME_EVERY_S) -> None:
        """Resume what a stopped gateway left unfinished, now and whenever another's run stops."""

        async def resume() -> float:
            self.resume()
            return every

        await self.gateway.supervisor.repeat("batch resumer", resume, every)

    def resume(self) -> None:
        """Run the batches left under way that no run holds (a stopped gateway's): each from its result files."""
        for batch in self.store.unfinished():
            if batch["id"] not in self.runs:
                self._run(batch)

    async def ended(self, batch_id: str) -> None:
        """Until the batch's run here ends (at once when none runs here): what one who started or resumed it
        waits on, instead of polling its state."""
        task = self._tasks.get(batch_id)
        if task is not None:
            await asyncio.wait((task,))

    def _run(self, batch: dict[str, Any]) -> None:
        claim = self.claims.claim(batch["id"])
        if claim is None:
            return  # another gateway runs it
        run = BatchRun(self.gateway, self.store, batch, self.settings, self.caller)
        self.runs[batch["id"]] = run
        task = asyncio.get_running_loop().create_task(run.run())
        self._tasks[batch["id"]] = task
        keeper = None if claim.renew_every is None else asyncio.get_running_loop().create_task(
            self._keep(claim, claim.renew_every, run, task))

        def ended(done: asyncio.Task[None]) -> None:
            self.runs.pop(batch["id"], None)
            self._tasks.pop(batch["id"], None)
            if keeper is not None:
                keeper.cancel()
            claim.release()
            if not done.cancelled() and (exc := done.exception()) is not None:
                self.gateway.supervisor.failed("batch runs", exc, batch["id"])
                if isinstance(exc, OpenAIError) and exc.code == STATE_UNAVAILABLE:
                    return  # not the batch's fault: resumed, here or by another replica, once the state is back
                run.fail(f"The gateway failed running this batch ({exc!r}); its log has the details.")

        task.add_done_callback(ended)

    async def _keep(self, claim: Claim, every: float, run: BatchRun, task: asyncio.Task[None]) -> None:
        """Renew the run's claim while it runs, and pass on a cancel asked through another replica. A run that
        cannot renew stops (what it wrote stays, and is resumed from): it cannot know whether another took over."""
        batch_id = run.batch["id"]
        while True:
            await asyncio.sleep(every)
            try:
                held = claim.renew()
                cancel = held and self.store.cancel_requested(batch_id)
            except OpenAIError as exc:
                log.warning("batch %s: its lease could not be renewed (%s); the run stops, to be resumed",
                            batch_id, exc.message)
                held = cancel = False
            if not held:
                task.cancel()
                return
            if cancel:
                run.cancel()

    async def close(self) -> None:
        """Stop the runs (they resume from their files at the next start) and the store."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.store.close()
