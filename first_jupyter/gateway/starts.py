"""Starting models on endpoints: for a request that needs one, ahead of a burst, or asked for (``warm``).

A start is asked of an endpoint once and joined while under way. A request that must wait for one is bounded by
``defaults.cold_start.max_wait``, and a client that asked to hear it is told its progress until the answer begins.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable
from typing import TypeVar

from first_jupyter.api_types import WarmReply
from first_jupyter.config import ColdStart
from first_jupyter.gateway.admission import Holder
from first_jupyter.gateway.answers import WaitingAnswer
from first_jupyter.gateway.catalog import Catalog
from first_jupyter.gateway.router import Target
from first_jupyter.gateway.supervisor import Supervisor
from first_jupyter.protocol import Capability, OpenAIError, Progress, check_model_name, duration, shown

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class Attempts:
    """The endpoints a request was sent to, in order; of the last, when, and whether it had to start the model
    first (then its answer time is a start's, not the engine's)."""

    __slots__ = ("holder", "must_start", "sent_at", "targets", "waited")

    def __init__(self, *, heard: bool = False) -> None:
        """``heard``: the client wants to hear a start's progress; ``must_start`` then resolves to the first
        endpoint the request must wait for (made only then: a future per request costs on the lean path)."""
        self.targets: list[Target] = []
        self.holder: Holder | None = None
        """Whose slot of the last target it holds (``admission``): given back as that, whatever the context."""
        self.sent_at = 0.0
        self.waited = False
        self.must_start: asyncio.Future[Target] | None = \
            asyncio.get_running_loop().create_future() if heard else None

    def waits_for(self, target: Target) -> None:
        """The request must wait for ``target`` to start its model."""
        if self.must_start is not None and not self.must_start.done():
            self.must_start.set_result(target)

    def add(self, target: Target, waited: bool) -> None:
        """``waited``: it must start the model first, or its engine was loaded when the request was sent."""
        self.targets.append(target)
        self.sent_at, self.waited = time.perf_counter(), waited

    @property
    def last(self) -> Target | None:
        return self.targets[-1] if self.targets else None

    def answer_time(self, at: float) -> float | None:
        """How long the engine took to begin answering, for the router; None after a start or into a load."""
        return None if self.waited else at - self.sent_at


class Starts:
    """The starts this gateway asked of its endpoints, while they run, and what a request waiting for one is told."""

    def __init__(self, catalog: Catalog, supervisor: Supervisor, cold_start: ColdStart) -> None:
        self.catalog = catalog
        self.router = catalog.router
        self.supervisor = supervisor
        self.cold_start = cold_start
        self.running: dict[tuple[int, str], asyncio.Task[None]] = {}
        """(backend id, model) → the start this gateway asked of it, while it runs."""

    def start(self, target: Target) -> asyncio.Task[None]:
        """Ask ``target`` to start its model, once: a start under way is joined, not repeated."""
        key = (id(target.backend), target.model_id)
        task = self.running.get(key)
        if task is None or task.done():
            whole = self.router.start_asked(target)
            task = self.running[key] = asyncio.get_running_loop().create_task(self._run(target, whole))
        return task

    async def _run(self, target: Target, whole: bool) -> None:
        began = time.monotonic()
        failure: str | None = None
        try:
            await target.backend.warm(target.model_id)
        except OpenAIError as exc:
            failure = exc.message
            log.warning("starting %s on %s/%s failed: %s", target.model_id, target.cluster, target.endpoint,
                        exc.message)
        except Exception as exc:
            failure = f"{type(exc).__name__}: {exc}"
            self.supervisor.failed("model starts", exc, f"{target.model_id} on {target.cluster}/{target.endpoint}")
        self.router.start_ended(target, time.monotonic() - began, whole,
                                failure)

    def not_ready(self, target: Target, waited: float | None = None) -> OpenAIError:
        """The 503 for a model that is starting: where, how long it should still take, when to retry."""
        wait = self.router.wait_of(target)
        how = f"this request waited {waited:g} s (defaults.cold_start.max_wait); " if waited else ""
        return OpenAIError(
            503, f"Model '{target.model_id}' is not running yet: cluster '{target.cluster}' endpoint "
                 f"'{target.endpoint}' is starting it ({self.router.state_of(target)}), expected ready in about "
                 f"{duration(wait)}. {how}Retry after that; `%first warm {target.model_id}` starts a model ahead "
                 f"of need.", type="api_error", code="model_starting",
            headers={"Retry-After": str(max(1, math.ceil(wait)))})

    def progress_of(self, attempts: Attempts, first: Target, t0: float) -> Progress:
        """Where the start a request waits for stands: at the endpoint it was last sent to (``first`` before
        any), since ``t0``."""
        target = attempts.last or first
        wait = self.router.wait_of(target)
        return Progress(target.model_id, target.cluster, target.endpoint, self.router.state_of(target),
                        round(time.perf_counter() - t0, 1), None if math.isinf(wait) else round(wait, 1))

    async def heard(self, work: Awaitable[_T], tried: Attempts) -> _T | WaitingAnswer:
        """``work``'s answer, or, once it must wait for a model's start, an answer that tells the start's progress
        until it comes (for a client that asked to hear it). ``tried`` must be the one ``work`` fills, made with
        ``Attempts(heard=True)``."""
        assert tried.must_start is not None
        t0 = time.perf_counter()
        task = asyncio.ensure_future(work)
        try:
            await asyncio.wait((task, tried.must_start), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            return task.result()
        return WaitingAnswer(task, tried.must_start.result(), self.cold_start.progress_every,
                             functools.partial(self.progress_of, tried, tried.must_start.result(), t0))

    async def warm(self, model: str, cluster: str | None = None, wait: bool = False,
                   tried: Attempts | None = None) -> WarmReply:
        """Start ``model`` where it would be served (on ``cluster`` if given) ahead of need, for the caller (on
        the clusters they may use, as them: the start's task keeps the request's context); ``wait``: return once
        it answers (at most ``cold_start.max_wait``). Its state, where, and the expected wait. ``tried``: told the
        endpoint it waits for (``heard``)."""
        check_model_name(model)
        targets = self.catalog.allowed(model, await self.catalog.where_served(model))
        capability = next(c for c in Capability if any(t.backend.supports(model, c) for t in targets))
        ordered = self.catalog.allowed(model, self.router.candidates(model, capability))
        if cluster is not None:
            ordered = [t for t in ordered if t.cluster == cluster] or [t for t in targets if t.cluster == cluster]
            if not ordered:
                raise OpenAIError(404, f"Model '{model}' is not served on cluster {shown(cluster)}; it is on "
                                       f"{', '.join(sorted({t.cluster for t in targets}))}.", param="cluster",
                                  code="cluster_not_found")
        target = ordered[0]
        state = self.router.state_of(target)
        if state == "offline":
            why = self.router.health_of(target).last_error or "its last status reading said so"
            raise OpenAIError(503, f"Model '{model}' cannot be started on cluster '{target.cluster}' endpoint "
                                   f"'{target.endpoint}': it is offline ({why}). `%first status` shows every "
                                   "endpoint.", type="api_error", code="endpoint_offline")
        started = state != "hot"
        if started:
            task = self.start(target)
            if wait:
                if tried is not None:
                    tried.waits_for(target)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), self.cold_start.max_wait)
                if self.router.state_of(target) == "offline":
                    raise OpenAIError(503, f"Starting model '{model}' on cluster '{target.cluster}' endpoint "
                                           f"'{target.endpoint}' failed: {self.router.health_of(target).last_error}",
                                      type="api_error", code="engine_start_failed")
        return WarmReply(model=model, cluster=target.cluster, endpoint=target.endpoint,
                         state=self.router.state_of(target), started=started,
                         expected_s=round(self.router.wait_of(target), 1))

    def cancel_all(self) -> None:
        for task in self.running.values():
            task.cancel()
