"""A batch run as run-batch tasks on a cluster's nodes, one per chunk of lines, instead of request by request.

Chunk k holds the input's requests k·chunk_lines to (k+1)·chunk_lines - 1, so a chunk is the same after a restart
(within it, lines sharing an opening are written together).
Its pending lines (those the batch's result files do not hold yet) go to ``<shared_path>/<batch>/chunk-k.input
.jsonl``, with each model's engine name; a Globus Compute task runs the endpoint's command on them there
(``first_jupyter.remote.run_batch.run_chunk``); its output, renamed into place only when whole, is read back
into the batch's output and error files. A task that fails (a lost node, a command that crashed) is run again, up
to ``defaults.batch.max_attempts``: only its chunk is redone. After a restart, a chunk whose output is already
there is read, not run again. Cancel and expiry start no new chunk; running chunks finish and are read; the lines
of the others are reported as not run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import orjson

from first_jupyter.batch.grouping import Line, grouping
from first_jupyter.batch.validate import ENDPOINTS
from first_jupyter.config import BatchOffload, ComputeEndpoint, ModelConfig
from first_jupyter.gateway.caller import CALLER_TOKEN_MISSING
from first_jupyter.gateway.router import Target
from first_jupyter.gateway.stream_watch import token_counts
from first_jupyter.gateway.usage import LineUsage
from first_jupyter.protocol import OpenAIError
from first_jupyter.remote.run_batch import run_chunk

if TYPE_CHECKING:
    from first_jupyter.batch.runner import BatchRun
    from first_jupyter.gateway.backends.compute.backend import ComputeBackend

log = logging.getLogger(__name__)

READ_SLICE = 1000
"""Output lines recorded between two turns of the event loop: a chunk of 10,000 must not stall the gateway."""
RETRY_AFTER_S = 5.0
TIMEOUT_SLACK_S = 60.0


@dataclass(frozen=True)
class Plan:
    backend: ComputeBackend
    settings: BatchOffload
    model: ModelConfig


def models_in(path: Path) -> set[str]:
    """The models a (validated) input file asks for."""
    with path.open("rb") as lines:
        return {orjson.loads(raw)["body"]["model"] for raw in lines if raw.strip()}


def _on_compute(backend: object) -> TypeGuard[ComputeBackend]:
    """Whether the backend asks a Globus Compute endpoint (no other backend has a ``ComputeEndpoint``): told by
    its endpoint, so that the compute backend's module is not imported here."""
    return isinstance(getattr(backend, "endpoint", None), ComputeEndpoint)


async def plan(run: BatchRun) -> Plan | None:
    """Where to offload this batch: an endpoint with ``batch`` settings that serves its model, when it has at
    least ``min_lines`` requests for one model (a run-batch task loads one); else None (request by request)."""
    total = run.batch["request_counts"]["total"]
    candidates: dict[int, ComputeBackend] = {
        id(backend): backend for backend in run.gateway.backends_serving()
        if _on_compute(backend) and backend.endpoint.batch is not None and total >= backend.endpoint.batch.min_lines}
    if not candidates:
        return None
    models = await asyncio.to_thread(models_in, run.store.path(run.batch["input_file_id"]))
    if len(models) != 1:
        return None
    (wanted,) = models
    for backend in candidates.values():
        model = next((m for m in backend.endpoint.models if m.id == wanted), None)
        allowed = run.caller is None or run.caller.may_use(wanted, backend.cluster)  # the owner's groups
        if model is not None and backend.endpoint.batch is not None and allowed:
            return Plan(backend, backend.endpoint.batch, model)
    return None


@dataclass
class Chunk:
    index: int
    pending: set[str]
    """custom_ids not in the result files yet."""
    input: Path
    output: Path


def _split(source: Path, folder: Path, size: int, done: set[int], engine_names: dict[str, str],
           key: Callable[[Line], Hashable]) -> list[Chunk]:
    """Each chunk with lines still to do; its input written (atomically: a task from before a restart may be
    reading the previous one) unless its output is already there; lines of equal ``key`` together."""
    chunks: list[Chunk] = []
    current: dict[Hashable, list[bytes]] = {}
    """The chunk's pending lines by opening (``grouping``): written a group after another, so that the engine's
    prefix cache serves each group's lines (the chunk's lines stay the same: k·chunk_lines onwards)."""
    pending: set[str] = set()
    index = 0
    seen = 0

    def close() -> None:
        if pending:
            chunk = Chunk(index, set(pending), folder / f"chunk-{index:05d}.input.jsonl",
                          folder / f"chunk-{index:05d}.output.jsonl")
            if not chunk.output.exists():
                fresh = chunk.input.with_name(chunk.input.name + ".new")
                fresh.write_bytes(b"".join(b"".join(group) for group in current.values()))
                os.replace(fresh, chunk.input)
            chunks.append(chunk)
        current.clear()
        pending.clear()

    with source.open("rb") as lines:
        for raw in lines:
            if not raw.strip():
                continue
            if seen and seen % size == 0:
                close()
                index += 1
            seen += 1
            item = orjson.loads(raw)
            if hash(item["custom_id"]) in done:
                continue
            group = current.setdefault(key(item), [])
            item["body"]["model"] = engine_names[item["body"]["model"]]
            group.append(orjson.dumps(item) + b"\n")
            pending.add(item["custom_id"])
    close()
    return chunks


def _error_body(message: str, status: int) -> dict[str, Any]:
    return OpenAIError(status, message, type="api_error" if status >= 500 else "invalid_request_error").body()


class Offload:
    """The chunks of one batch run on one endpoint's nodes."""

    def __init__(self, run: BatchRun, chosen: Plan) -> None:
        self.run = run
        self.backend = chosen.backend
        self.settings = chosen.settings
        self.model = chosen.model
        self.folder = Path(chosen.settings.shared_path).expanduser() / run.batch["id"]
        self._slots = asyncio.Semaphore(chosen.settings.parallel)
        run.models.add(chosen.model.id)

    async def run_all(self, done: set[int]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        names = {self.model.id: self.backend.upstream_name(self.model.id)}
        chunks = await asyncio.to_thread(_split, self.run.store.path(self.run.batch["input_file_id"]), self.folder,
                                         self.settings.chunk_lines, done, names,
                                         grouping(self.run.gateway.config.defaults.prefix_routing.enabled))
        await asyncio.gather(*(self._chunk(chunk) for chunk in chunks))
        self.run.save_now_and_then(force=True)
        await asyncio.to_thread(shutil.rmtree, self.folder, True)

    async def _chunk(self, chunk: Chunk) -> None:
        error = ""
        async with self._slots:
            attempt = 0
            while attempt < self.run.settings.max_attempts:
                if not chunk.output.exists():
                    if self.run.stop is not None:
                        break
                    if self.run.caller is not None and await self.run.quota_turn(self.model.id):
                        break  # stopped while waiting its turn
                    try:
                        await self._task(chunk)
                    except Exception as exc:  # the node, the command or the task failed: only this chunk redoes
                        if isinstance(exc, OpenAIError) and exc.code == CALLER_TOKEN_MISSING:  # spends no attempt
                            if await self.run.await_owner():
                                break
                            continue
                        error = self._describe(exc)
                        log.warning("batch %s chunk %d (attempt %d): %s", self.run.batch["id"], chunk.index,
                                    attempt + 1, error)
                        if await self.run.pause(RETRY_AFTER_S * 2 ** attempt):
                            break
                        attempt += 1
                        continue
                await self._read(chunk)
                return
        for custom_id in sorted(chunk.pending):
            if self.run.stop is not None:
                self.run.results.not_run(custom_id, *self.run.stopped_why())
            else:
                self.run.results.refused(custom_id, 502, _error_body(
                    f"The chunk of this request failed on {self.backend.where} "
                    f"{self.run.settings.max_attempts} times; the last time: {error}", 502))
        self.run.save_now_and_then()

    async def _task(self, chunk: Chunk) -> None:
        served_name = self.backend.upstream_name(self.model.id)
        values = {"{input}": str(chunk.input), "{port}": str(self.backend.engine_port),
                  "{model}": self.model.path or served_name, "{served_name}": served_name}
        admission, target = self.run.gateway.admission, Target(self.model.id, self.backend)
        holder = await admission.began(target)  # a batch slot of its endpoint while it runs, as a batch line takes
        try:
            task = await self.backend.submitter.submit(run_chunk, self.settings.command, values, str(chunk.output),
                                                       self.settings.chunk_timeout)
            try:
                await asyncio.wait_for(asyncio.wrap_future(task), self.settings.chunk_timeout + TIMEOUT_SLACK_S)
            except TimeoutError:
                task.cancel()
                raise TimeoutError(f"no result within {self.settings.chunk_timeout:g} s") from None
            except asyncio.CancelledError:
                task.cancel()
                raise
        finally:
            admission.ended(target, holder)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, OpenAIError):
            return exc.message
        if isinstance(exc, TimeoutError):
            return str(exc)
        return self.backend.submitter.describe(exc).message

    async def _read(self, chunk: Chunk) -> None:
        """Record the chunk's answers, and account them a slice at a time; a request its output lacks is a failure
        of that request."""
        took_ms = _took_ms(chunk)
        read: list[LineUsage] = []
        with chunk.output.open("rb") as lines:
            for number, raw in enumerate(lines, 1):
                if raw.strip():
                    self._record(orjson.loads(raw), chunk.pending, read)
                if number % READ_SLICE == 0:
                    self._account(read, took_ms)
                    read = []
                    await asyncio.sleep(0)
        for custom_id in sorted(chunk.pending):
            self._refused(custom_id, 500, _error_body(
                f"The run-batch command on {self.backend.where} gave no result for this request.", 500), read)
        self._account(read, took_ms)
        chunk.pending.clear()
        self.run.save_now_and_then()

    def _record(self, line: dict[str, Any], pending: set[str], read: list[LineUsage]) -> None:
        custom_id = line.get("custom_id")
        if custom_id not in pending:
            return  # not this chunk's, or recorded already
        pending.discard(custom_id)
        response = line.get("response") or {}
        status, body, error = response.get("status_code"), response.get("body"), line.get("error")
        if status == 200 and error is None and isinstance(body, dict):
            self.run.results.answered(custom_id, orjson.dumps(body))
            usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
            read.append(LineUsage(custom_id, 200, *token_counts(usage), None))
            return
        if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
            body = _error_body(str(error or body or "run-batch gave no answer"), status or 500)
        self._refused(custom_id, status or 500, body, read)

    def _refused(self, custom_id: str, status: int, body: dict[str, Any], read: list[LineUsage]) -> None:
        self.run.results.refused(custom_id, status, body)
        read.append(LineUsage(custom_id, status, None, None, str(body["error"].get("message"))))

    def _account(self, read: list[LineUsage], took_ms: float) -> None:
        if read:
            self.run.gateway.record_offloaded(self.run.batch["id"], self.model.id, self.backend,
                                              ENDPOINTS[self.run.batch["endpoint"]], took_ms, read)


def _took_ms(chunk: Chunk) -> float:
    """What each of the chunk's lines is accounted as having taken: from its input written to its output whole. A
    run-batch task answers its lines together, so no line has a time of its own."""
    try:
        return max(0.0, chunk.output.stat().st_mtime - chunk.input.stat().st_mtime) * 1000
    except OSError:  # the input is gone (the folder was cleared by hand): the time is unknown
        return 0.0
