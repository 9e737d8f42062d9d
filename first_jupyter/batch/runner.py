"""One batch run: its lines through the gateway, a window of them in flight, each result written as it ends.

The input is read as a stream (memory does not grow with the file); each request goes through
``Gateway.complete``, so routing, failover and cold starts apply as to any request. The window per model is what
its endpoints serve at once (their ``concurrency`` times the blocks up, as the router knows it; at most
``defaults.batch.max_in_flight``), read again as each slot is taken. A transient failure (429, 5xx, a timeout) is
retried with backoff, honouring ``Retry-After``; any other failure is the line's result. A large batch for an
endpoint that declares ``batch`` settings runs on its nodes instead, a run-batch task per chunk (``offload``).
Lines sharing an opening are sent together, as far as a bounded look-ahead allows (``grouping``), so that an
engine's prefix cache serves them. What is done is what the result files hold (``results``), so a run resumed after
a crash sends only the rest, whatever order its lines went in.
Cancel and expiry stop new work; requests in flight finish; the lines never sent get an error line each, so the
output and error files together hold every custom_id exactly once.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import orjson

from first_jupyter.batch.grouping import LOOKAHEAD_WINDOWS, grouped, grouping
from first_jupyter.batch.offload import Offload, plan
from first_jupyter.batch.results import Results
from first_jupyter.batch.validate import ENDPOINTS, MAX_REPORTED, check_file
from first_jupyter.config import COMPUTE_RESOURCE_SERVER, BatchDefaults
from first_jupyter.gateway.admission import as_batch
from first_jupyter.gateway.caller import CALLER_TOKEN_MISSING, acting_as
from first_jupyter.protocol import OpenAIError, ParsedRequest

if TYPE_CHECKING:
    from first_jupyter.batch.store import BatchStore
    from first_jupyter.gateway.caller import Caller
    from first_jupyter.gateway.core import Gateway

log = logging.getLogger(__name__)

TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})
BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0
OWNER_POLL_S = 5.0
"""How often a batch waiting for its owner's Compute token looks for it (in memory: nothing is asked)."""
SAVE_EVERY_S = 1.0
"""How often the counts are written to the store while a batch runs (the API reads them from there)."""
STOPS = {"cancelling": ("batch_cancelled", "The batch was cancelled before this request was sent."),
         "expired": ("batch_expired", "This request could not be executed before the completion window expired.")}


def _pending(lines: Iterable[bytes], done: set[int]) -> Iterator[dict[str, Any]]:
    """The input's requests the result files do not hold yet, in file order."""
    for raw in lines:
        if raw.strip():
            item = orjson.loads(raw)
            if hash(item["custom_id"]) not in done:
                yield item


class Window:
    """Requests in flight per model, at most ``limit(model)``; only the reader waits for a slot."""

    def __init__(self, limit: Callable[[str], int]) -> None:
        self.limit = limit
        self.in_flight: Counter[str] = Counter()
        self._freed: asyncio.Future[None] | None = None

    async def take(self, model: str) -> None:
        while self.in_flight[model] >= self.limit(model):
            self._freed = asyncio.get_running_loop().create_future()
            await self._freed
        self.in_flight[model] += 1

    def give(self, model: str) -> None:
        self.in_flight[model] -= 1
        if self._freed is not None and not self._freed.done():
            self._freed.set_result(None)


class BatchRun:
    """Runs one stored batch to its end; resumed the same way after a restart."""

    def __init__(self, gateway: Gateway, store: BatchStore, batch: dict[str, Any], settings: BatchDefaults,
                 caller: Caller | None = None) -> None:
        self.gateway = gateway
        self.caller = caller
        self.store = store
        self.batch = batch
        self.settings = settings
        output_id, error_id = store.result_ids(batch["id"])
        self.output_id, self.error_id = output_id, error_id
        self.results = Results(store.path(output_id), store.path(error_id))
        self.stop: str | None = "cancelling" if batch["status"] == "cancelling" or store.cancel_requested(
            batch["id"]) else None
        self._stopped = asyncio.Event()
        self._saved_at = 0.0
        self.models: set[str] = set()
        """The models its lines were sent to so far (whose endpoints' slots it waits for)."""

    # -- what the API asks -----------------------------------------------------------------------------------

    def cancel(self) -> dict[str, Any]:
        if self.batch["status"] in ("validating", "in_progress") and self.stop is None:
            self.stop = "cancelling"
            self._stopped.set()
            self._set("cancelling", "cancelling_at")
        return self.snapshot()

    def fail(self, message: str) -> None:
        """The run itself broke (a fault of this gateway): the batch ends failed, saying so."""
        self.batch["errors"] = {"object": "list", "data": [{"code": "internal_error", "message": message,
                                                            "param": None, "line": None}]}
        self._set("failed", "failed_at")

    def snapshot(self) -> dict[str, Any]:
        """A copy of the batch as it stands, its counts up to the last result (a door may serialize it on
        another thread while the run goes on)."""
        counts = dict(self.batch["request_counts"])
        if self.batch["status"] in ("in_progress", "cancelling", "finalizing"):
            counts["completed"], counts["failed"] = self.results.completed, self.results.failed
        if self.batch["status"] != "in_progress":
            return {**self.batch, "request_counts": counts}
        held = any(self.gateway.admission.held(model) for model in self.models)
        return {**self.batch, "request_counts": counts, "paused_for_interactive": held}

    # -- the run ----------------------------------------------------------------------------------------------

    async def run(self) -> None:
        # its tasks go to Globus Compute as its owner, where a cluster runs as users; its lines and chunks take the
        # slots interactive traffic leaves (``gateway.admission``)
        with acting_as(self.caller), as_batch():
            await self._run()

    async def _run(self) -> None:
        expiry = asyncio.get_running_loop().call_at(
            asyncio.get_running_loop().time() + max(self.batch["expires_at"] - time.time(), 0), self._expire)
        if self.stop == "cancelling" and self.batch["status"] == "in_progress":  # asked while no one ran it
            self._set("cancelling", "cancelling_at")
        try:
            if self.batch["status"] == "validating":
                await self._validate()
            if self.batch["status"] == "failed":
                return
            done = self.results.open()
            if self.batch["status"] != "finalizing":  # (a crash while finalizing: only that is left to do)
                chosen = await plan(self)
                if chosen is not None:
                    await Offload(self, chosen).run_all(done)
                else:
                    await self._send_all(done)
            self._finalize()
        finally:
            expiry.cancel()
            self.results.close(sync=False)

    def _expire(self) -> None:
        if self.batch["status"] in ("validating", "in_progress", "cancelling") and self.stop != "expired":
            self.stop = "expired"
            self._stopped.set()

    async def _validate(self) -> None:
        served = await self.gateway.served_models(ENDPOINTS[self.batch["endpoint"]])
        checked = await asyncio.to_thread(check_file, self.store.path(self.batch["input_file_id"]),
                                          self.batch["endpoint"], served)
        self.batch["request_counts"]["total"] = checked.total
        if checked.error_count or not checked.total:
            errors = [e.to_json() for e in checked.errors]
            if not checked.total:
                errors.append({"code": "empty_file", "message": "The input file has no requests.", "param": None,
                               "line": None})
            elif checked.error_count > MAX_REPORTED:
                errors.append({"code": "more_errors", "message": f"{checked.error_count - MAX_REPORTED} more lines "
                                                                 "have errors.", "param": None, "line": None})
            self.batch["errors"] = {"object": "list", "data": errors}
            self._set("failed", "failed_at")
            return
        if self.stop == "expired":
            return
        self._set("cancelling" if self.stop else "in_progress", "cancelling_at" if self.stop else "in_progress_at")

    async def _send_all(self, done: set[int]) -> None:
        window = Window(self._window_for)
        capability = ENDPOINTS[self.batch["endpoint"]]
        tasks: set[asyncio.Task[None]] = set()
        try:  # the gateway stopping (here, or while the reader waits for a slot): what is in flight is dropped,
            # and sent again on resuming
            with self.store.path(self.batch["input_file_id"]).open("rb") as lines:
                depth = LOOKAHEAD_WINDOWS * self.settings.max_in_flight
                key = grouping(self.gateway.config.defaults.prefix_routing.enabled)
                for item in grouped(_pending(lines, done), key, depth):
                    custom_id = item["custom_id"]
                    if self.stop is not None:
                        self.results.not_run(custom_id, *STOPS[self.stop])
                        continue
                    body = item["body"]
                    model = body["model"]
                    self.models.add(model)
                    await window.take(model)
                    if self.stop is not None:  # stopped while waiting for the slot: not sent
                        window.give(model)
                        self.results.not_run(custom_id, *STOPS[self.stop])
                        continue
                    task = asyncio.create_task(self._one(ParsedRequest(capability, body, orjson.dumps(body)),
                                                         custom_id, window))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    self.save_now_and_then()
            while tasks:
                await asyncio.wait(list(tasks))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        self.save_now_and_then(force=True)

    def _window_for(self, model: str) -> int:
        return max(min(self.gateway.capacity(model), self.settings.max_in_flight), 1)

    async def _one(self, req: ParsedRequest, custom_id: str, window: Window) -> None:
        try:
            attempt = 0
            while attempt < self.settings.max_attempts:
                if self.caller is not None and await self.quota_turn(req.model):
                    self.results.not_run(custom_id, *self.stopped_why())
                    return
                try:
                    done = await self.gateway.complete(req)
                except OpenAIError as exc:
                    if exc.code == CALLER_TOKEN_MISSING:  # spends no attempt: sent again once the owner is back
                        if await self.await_owner():
                            self.results.not_run(custom_id, *self.stopped_why())
                            return
                        continue
                    last = attempt == self.settings.max_attempts - 1
                    if exc.status not in TRANSIENT or last:
                        self.results.refused(custom_id, exc.status, exc.body())
                        return
                    if await self._backoff(exc, attempt):  # stopped meanwhile: not sent again
                        self.results.not_run(custom_id, *self.stopped_why())
                        return
                    attempt += 1
                else:
                    self.results.answered(custom_id, done.body)
                    return
        except Exception as exc:  # a fault of this gateway: the line says so, the batch goes on
            log.exception("batch %s: request %s failed", self.batch["id"], custom_id)
            self.results.refused(custom_id, 500, OpenAIError(500, f"The gateway failed on this request ({exc!r}).",
                                                             type="api_error").body())
        finally:
            window.give(req.model)
            self.save_now_and_then()

    async def _backoff(self, exc: OpenAIError, attempt: int) -> bool:
        """Wait before the next try; whether the batch was stopped meanwhile."""
        after = exc.headers.get("Retry-After", "")
        delay = float(after) if after.isdigit() else BACKOFF_S * 2 ** attempt * (0.5 + random.random())
        return await self.pause(delay)

    async def quota_turn(self, model: str) -> bool:
        """Wait until the owner's and the model's quotas let this request (or offloaded chunk) go, at a shared
        gateway; whether the batch was stopped meanwhile. A chunk's tokens are spent once its answers are read:
        the debt makes the next one wait."""
        assert self.caller is not None
        while (wait := await self.caller.wait_s(model)) > 0:
            if await self.pause(wait):
                return True
        return False

    async def await_owner(self) -> bool:
        """Wait until the gateway holds a Globus Compute token for the batch's owner again (their next request
        to it brings one: after a restart, or once theirs lapsed); whether the batch was stopped meanwhile."""
        while self.caller is None or self.caller.token_for(COMPUTE_RESOURCE_SERVER) is None:
            if await self.pause(OWNER_POLL_S):
                return True
        return False

    async def pause(self, seconds: float) -> bool:
        """Wait up to ``seconds`` (at most ``MAX_BACKOFF_S``); whether the batch was stopped meanwhile."""
        try:
            await asyncio.wait_for(self._stopped.wait(), min(seconds, MAX_BACKOFF_S))
        except TimeoutError:
            return False
        return True

    def stopped_why(self) -> tuple[str, str]:
        """The error code and message of a line not run because the batch was stopped."""
        return STOPS[self.stop or "cancelling"]

    def _finalize(self) -> None:
        if self.batch["status"] != "finalizing":
            self._set("finalizing", "finalizing_at")
        self.results.close(sync=True)
        for file_id, name, key, lines in ((self.output_id, "output", "output_file_id", self.results.completed),
                                          (self.error_id, "error", "error_file_id", self.results.failed)):
            path = self.store.path(file_id)
            if lines:  # a line per result: the counts are the files' lines
                self.store.add_file("batch_output", f"{self.batch['id']}_{name}.jsonl", path.stat().st_size, lines,
                                    file_id)
                self.batch[key] = file_id
            else:
                path.unlink(missing_ok=True)
        final = {"cancelling": ("cancelled", "cancelled_at"), "expired": ("expired", "expired_at")}.get(
            self.stop or "", ("completed", "completed_at"))
        self._set(*final)

    # -- the record -------------------------------------------------------------------------------------------

    def _set(self, status: str, stamp: str) -> None:
        self.batch["status"] = status
        self.batch[stamp] = int(time.time())
        self.save_now_and_then(force=True)

    def save_now_and_then(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._saved_at < SAVE_EVERY_S:
            return
        self._saved_at = now
        if self.stop is None and self.store.cancel_requested(self.batch["id"]):  # asked by another process
            self.cancel()
            return
        if self.results.completed or self.results.failed or force:
            counts = self.batch["request_counts"]
            counts["completed"], counts["failed"] = self.results.completed, self.results.failed
        self.store.save_batch(self.batch)
