"""Backend for a Globus Compute endpoint: each request runs as a task on a node, next to the node's engine.

The tasks are the functions of ``first_jupyter.remote.inference``; how a task reaches a node (the Globus Compute
service, or the engine run in this process for the embedded default) is a ``Submitter``'s business, so this
module holds what both share: the payload limit, the wait, the stream through the callback route and the errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import orjson

from first_jupyter.config import ComputeEndpoint, ModelConfig
from first_jupyter.gateway.backends.base import RequestBody, json_only
from first_jupyter.gateway.backends.compute.callbacks import CallbackHub, RemoteStream
from first_jupyter.gateway.backends.compute.submitter import Submitter
from first_jupyter.gateway.ceilings import LIMITS_KEY, reported_limits
from first_jupyter.gateway.upstream import Reply
from first_jupyter.protocol import Capability, OpenAIError
from first_jupyter.remote.inference import (
    BATCH_BYTES,
    BATCH_S,
    REQUEST_TIMEOUT_S,
    call_engine,
    engine_health,
    engine_route,
    stream_engine,
)
from first_jupyter.remote.launcher import EngineKind, engine_keeps_responses, engine_serves

if TYPE_CHECKING:
    from first_jupyter.api_types import PublishedDetails
    from first_jupyter.gateway.backends.compute.scheduler_view import SchedulerReader

SUBMIT_LIMIT_BYTES = 10 * 1000 * 1000
"""Globus Compute refuses a task submission over 10 MB (its arguments serialized)."""


STATUS_CALLS, STATUS_WINDOW_S = 20, 10.0
"""The service allows 20 status requests per 10 s (per identity); the gateway stays under it."""


class CallWindow:
    """At most ``calls`` in any ``window_s`` seconds; shared by every endpoint asked with one identity."""

    def __init__(self, calls: int = STATUS_CALLS - 2, window_s: float = STATUS_WINDOW_S) -> None:
        self._calls = calls
        self._window = window_s
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def take(self) -> bool:
        """Whether one more call fits now (and count it if so)."""
        now = time.monotonic()
        with self._lock:
            while self._times and now - self._times[0] >= self._window:
                self._times.popleft()
            if len(self._times) >= self._calls:
                return False
            self._times.append(now)
            return True


def too_large(size: int) -> OpenAIError:
    return OpenAIError(413, f"The request is {size / 1e6:.1f} MB once serialized, more than a Globus Compute task "
                            f"may carry ({SUBMIT_LIMIT_BYTES / 1e6:.0f} MB). Send fewer or shorter inputs, or split "
                            f"them across requests (a batch does this for you).", code="request_too_large")


def remote_summary(text: str) -> str:
    """The line of a remote traceback that says what went wrong (its last with words: the engine frames a
    lost worker's traceback with rules of dashes), without the frames before it."""
    lines = [line.strip() for line in text.strip().splitlines() if any(c.isalnum() for c in line)]
    return lines[-1][:500] if lines else "no details"


class RemoteAnswer:
    """A stream whose events come from a node, through the callback route or as the task's whole result."""

    __slots__ = ("_chunks", "_drained", "_first", "_grace_s", "_hub", "_remote", "_task", "on_close")

    def __init__(self, hub: CallbackHub, remote: RemoteStream, task: Future[Any], chunks: AsyncIterator[bytes],
                 first: bytes | None, grace_s: float) -> None:
        """``grace_s``: how long after the stream is closed its node is taken to be still at work, at most
        (a node refused stops at once; one that never says so is taken for dead after this)."""
        self._hub = hub
        self._remote = remote
        self._task = task
        self._chunks = chunks
        self._first = first
        self._grace_s = grace_s
        self._drained = asyncio.Event()
        self.on_close: Callable[[], None] | None = None

    async def pipe(self, sink: Callable[[bytes], bool]) -> None:
        """Every event into ``sink``, the next taken only once a slow client has drained the last. On one host
        the node's batches wait in the stream's queue meanwhile (small, and paced by the node); where replicas
        share Redis they wait there, up to its bound, and then hold the node back (``redis_streams``)."""
        if self._first:
            await self._put(sink, self._first)
        async for chunk in self._chunks:
            await self._put(sink, chunk)

    async def _put(self, sink: Callable[[bytes], bool], chunk: bytes) -> None:
        self._drained.clear()
        if not sink(chunk):
            await self._drained.wait()

    def resume_reading(self) -> None:
        """The client has drained what ``pipe`` gave it: the next event may come."""
        self._drained.set()

    def close(self) -> None:
        """Refuse the node's later batches: the node that is refused stops its engine's generation."""
        self._hub.close(self._remote)
        if self.on_close is not None:
            self.on_close()
            self.on_close = None

    def when_done(self, callback: Callable[[], None]) -> None:
        """``callback`` once the node's task has ended (the engine's work with it), on this loop."""
        when_ended(self._task, callback, self._grace_s)


def when_ended(task: Future[Any], callback: Callable[[], None], grace_s: float) -> None:
    """``callback``, once, on the running loop, when ``task`` ends or ``grace_s`` seconds have passed (a task
    whose end never comes back, its node lost, must not count as work forever)."""
    if task.done():
        callback()
        return
    loop = asyncio.get_running_loop()
    fired = False

    def fire() -> None:
        nonlocal fired
        if not fired:
            fired = True
            timer.cancel()
            callback()

    def ended(_: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the gateway has stopped
            loop.call_soon_threadsafe(fire)

    timer = loop.call_later(grace_s, fire)
    task.add_done_callback(ended)


class ComputeBackend:
    kind = "globus_compute"

    def __init__(self, cluster: str, endpoint: ComputeEndpoint, submitter: Submitter, hub: CallbackHub,
                 idle_timeout: float, callback_url: Callable[[], str | None], engine_port: int | None = None,
                 upstream_name: str | None = None, scheduler: SchedulerReader | None = None,
                 engine: EngineKind | None = None) -> None:
        """``callback_url``: where nodes POST stream batches, asked per request (a gateway learns its own URL
        once its server listens); None: streams come back whole. ``engine_port``: the engine's port on the
        node, when the submitter chose it (else the endpoint's); ``upstream_name``: the one model's name at its
        engine, when the submitter knows it; ``scheduler``: the cluster's scheduler view, when it has one;
        ``engine``: the engine its nodes run, when the submitter chose it (its routes bound the model's
        capabilities); else the config's capabilities are the model's."""
        self._scheduler = scheduler
        self.keeps_responses = engine_keeps_responses(engine)
        self.cluster = cluster
        self.name = endpoint.name
        self.endpoint = endpoint
        self.start_s = endpoint.start_s
        self.capacity = endpoint.concurrency  # per block; status readings say how many blocks are up
        self.max_blocks = endpoint.scale_out_blocks
        self.where = f"cluster '{cluster}' endpoint '{endpoint.name}'"
        self.submitter = submitter
        self._models: dict[str, ModelConfig] = {m.id: m for m in endpoint.models}
        self._hub = hub
        self._idle = idle_timeout
        self._callback_url = callback_url
        self.engine_port = engine_port or endpoint.engine_port
        self._upstream_name = upstream_name
        self._engine = engine
        self._limits: dict[str, int] = {}
        """Each model's ``max_model_len``, as its engine reported it when last asked to start it."""

    def upstream_name(self, model_id: str) -> str:
        model = self._models[model_id]
        return self._upstream_name or model.upstream_name or model.id

    def model_details(self, model_id: str) -> PublishedDetails | None:
        return None

    def supports(self, model_id: str, capability: Capability) -> bool:
        return capability in self._models[model_id].capabilities and (
            self._engine is None or engine_serves(self._engine, capability))

    async def _task(self, body: bytes, function: Callable[..., Any], *args: Any) -> Future[Any]:
        if len(body) > SUBMIT_LIMIT_BYTES:  # too large already: no need to serialize it to know
            raise too_large(len(body))
        return await self.submitter.submit(function, *args)

    async def _result(self, task: Future[Any], what: str) -> Any:
        """A task's value within the endpoint's timeout; its failure as the OpenAI error that carries the remote
        summary; ``what``: the timeout's words. The task itself is left as it is when the wait ends early (the
        caller leaves, the timeout): the caller decides what becomes of it."""
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(task)), self.endpoint.timeout)
        except TimeoutError:
            raise OpenAIError(504, f"{self.where} did not {what} within {self.endpoint.timeout:g} s (its queue or a "
                                   "cold start may be long); `%first status` shows where it stands, and the "
                                   "endpoint's timeout can be raised.", type="api_error",
                              code="upstream_timeout") from None
        except (OpenAIError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise self.submitter.describe(exc) from None

    async def _withdraw(self, task: Future[Any], remote: RemoteStream, told: bool, deadline: float) -> None:
        """Stop a request's work on its node, and return once it has stopped, so that the request counts in flight
        (the router's load) as long as the engine works on it.

        The node is refused from now on, and a node refused stops the engine at once (``remote.leash``); a task
        that has not started is cancelled (should it start all the same, its first word is refused). ``told``:
        the node can hear the refusal (it has the callback URL); if not, it stops only at ``deadline`` (a Unix
        time). Either way the wait ends after the idle timeout more at the latest: a node that has not come back
        by then is taken for lost.
        """
        started = await self._hub.started(remote)
        self._hub.close(remote)
        if told and not started:
            task.cancel()
            return
        if not task.done():
            wait = (0.0 if told else max(deadline - time.time(), 0.0)) + self._idle
            with contextlib.suppress(Exception):  # its failure, or the wait's end: either way, it is over
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(task)), wait)

    async def complete(self, model_id: str, capability: Capability, body: RequestBody) -> Reply:
        """A plain request as a task that the node can be told to stop (``_withdraw``), and that stops by itself
        at the endpoint's timeout (its deadline), when this gateway stops waiting for it."""
        body = json_only(body, self.where, capability)
        url = self._callback_url()
        remote = await self._hub.begin(self.where)
        deadline = time.time() + self.endpoint.timeout
        try:
            task = await self._task(body, call_engine, self.engine_port, capability.path, orjson.loads(body),
                                    self.endpoint.timeout, url, remote.task_id, remote.key, deadline)
            try:
                result = await self._result(task, "answer")
            except BaseException:
                await self._withdraw(task, remote, url is not None, deadline)
                raise
        finally:
            self._hub.close(remote)
        return Reply(int(result["status"]), str(result["body"]).encode())

    async def stream(self, model_id: str, capability: Capability, body: RequestBody) -> RemoteAnswer:
        body = json_only(body, self.where, capability)
        url = self._callback_url()
        remote = await self._hub.begin(self.where)
        deadline = time.time() + self.endpoint.timeout  # kept by the node only when the stream comes back whole
        try:
            task = await self._task(body, stream_engine, self.engine_port, capability.path, orjson.loads(body),
                                    url, remote.task_id, remote.key, BATCH_BYTES, BATCH_S, REQUEST_TIMEOUT_S,
                                    deadline if url is None else None)
        except BaseException:
            self._hub.close(remote)
            raise
        remote.watch(task, lambda exc: self.submitter.describe(exc).message)
        chunks = remote.chunks(self._idle, first_timeout=self.endpoint.timeout)
        try:  # the first event, or the refusal that must become a real status before any byte is sent
            first = await anext(chunks, None)
        except BaseException:
            await self._withdraw(task, remote, url is not None, deadline)
            raise
        return RemoteAnswer(self._hub, remote, task, chunks, first, self._idle)

    async def warm(self, model_id: str) -> None:
        """A health probe as a task: the endpoint starts a block for it (its ``worker_init`` starts the engine and
        waits until it serves), so the probe runs once the model answers, and fails with the start's reason."""
        task = await self.submitter.submit(engine_health, self.engine_port)
        try:
            health = await self._result(task, f"start model '{model_id}'")
        except BaseException:
            task.cancel()
            raise
        if not health.get("healthy"):
            raise OpenAIError(503, f"The engine on {self.where} does not answer: {health.get('error') or health}",
                              type="api_error", code="engine_unhealthy")
        self._limits = reported_limits(health.get("listing"), {self.upstream_name(m): m for m in self._models})

    async def call(self, method: str, path: str, query: str, body: bytes | None) -> Reply:
        """A call on a response the engine keeps (``path`` relative to ``/v1``), as a task: the node's function
        sends it to its engine, which created the response (these calls carry no body)."""
        task = await self.submitter.submit(engine_route, self.engine_port, method,
                                           path + (f"?{query}" if query else ""), self.endpoint.timeout)
        try:
            result = await self._result(task, "answer")
        except BaseException:
            task.cancel()
            raise
        return Reply(int(result["status"]), str(result["body"]).encode())

    async def status(self) -> dict[str, Any]:
        state = await self.submitter.status()
        info = {"cluster": self.cluster, "endpoint": self.name, "kind": self.kind, "models": sorted(self._models),
                "callback": self._callback_url() is not None, LIMITS_KEY: self._limits, **state}
        if self._scheduler is not None:
            view = await self._scheduler.read()
            info["scheduler"] = {"jobs": self._scheduler.jobs_of(self.name), "free_nodes": view["free_nodes"],
                                 "checked": view["checked"], "errors": view["errors"]}
            if state["state"] == "stopped":  # online with no workers: the queue says whether its blocks come
                info["model_states"] = self._scheduler.model_states(self.name, sorted(self._models))
        return info

    async def close(self) -> None:
        await self.submitter.close()
