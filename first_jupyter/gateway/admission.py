"""Who gets an endpoint's slots: interactive requests first, batches in what is left, users in weighted fair order.

An endpoint serves ``capacity`` requests at once (its concurrency times the blocks up, as the router knows it, and
one block's more while it may still scale out: ``Health.admissible``, for a Globus Compute endpoint grows only for
tasks it sees waiting).
Without this, a batch of 100,000 lines fills every slot and each chat waits behind thousands of lines in the
engine's queue. Here every request takes a slot of its endpoint before it is sent (``began``) and gives it back when
its answer ends (``ended``); a request that finds none waits in the endpoint's queue for its class:

- **Interactive first.** A freed slot goes to a waiting interactive request before any batch line.
- **Headroom.** Batch lines never take the slots that interactive traffic recently needed: the most interactive
  requests in flight or waiting at once within ``HEADROOM_WINDOW_S`` are kept free, so a chat finds a slot at once
  instead of waiting for a batch line to end. With no interactive traffic for that long, a batch has every slot.
- **AIMD.** Batch concurrency is also steered, as TCP steers a window: halved (at most once per ``PERIOD_S``) when
  an interactive request misses ``defaults.batch.interactive_ttft_target`` (its first token after the engine took
  it), waits a quarter of it for a slot, or the engine reports requests waiting in its own queue (vLLM's
  ``vllm:num_requests_waiting``); and grown by ``capacity / ADD_STEPS`` per ``PERIOD_S`` while none of that
  happens, back to full.
- **Fairness.** Within a class, users are served in weighted fair order (start-time fair queueing: each request is
  tagged with its user's virtual finish time, and the smallest tag goes first), so one user's burst of 500
  requests does not delay another user's single chat behind it. ``defaults.admission.weights`` weighs users. And
  while several users send to an endpoint, none holds more than all but ``1 / RESERVE_SHARE`` of its slots, so
  another's chat finds one free rather than waiting for one of the burst's answers to end.
- **Bounded.** A queue holds at most ``max_queued`` requests per class and ``max_queued_per_user`` per user; past
  it a 429 with ``Retry-After``.

The class of a request is the ``PRIORITY`` context variable (the batch runner sets ``batch``; everything else is
interactive), and its user is the acting caller's (``gateway.caller.current``), so no signature carries either. All
logic runs on an injectable clock and sleeps nowhere: a unit test or a simulation drives it on virtual time.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from first_jupyter.api_types import AdmissionStatus
from first_jupyter.config import Admission as AdmissionSettings
from first_jupyter.gateway.backends.base import Backend
from first_jupyter.gateway.caller import current
from first_jupyter.gateway.router import Demand, Router, Target
from first_jupyter.protocol import OpenAIError


class Priority(StrEnum):
    interactive = "interactive"
    batch = "batch"


PRIORITY: ContextVar[Priority] = ContextVar("first_priority", default=Priority.interactive)
"""The class of the request the current code sends: interactive unless a batch's run set it."""

Holder = tuple[Priority, str]
"""Whose slot: its class and its user."""

PERIOD_S = 1.0
"""How often batch concurrency may be cut, and the unit of its growth."""
ADD_STEPS = 8
"""Growth per period: this share of the capacity, so a batch halved to nothing is back to full in about this many
periods once interactive traffic is gone."""
QUEUE_SHARE = 0.25
"""An interactive request that waited this share of the TTFT target for a slot counts as a miss: the engine's own
time comes on top of the wait."""
HEADROOM_WINDOW_S = 60.0
"""How long the most interactive requests seen at once keeps its slots free of batch lines (and how long a user
counts as about, for ``RESERVE_SHARE``)."""
RESERVE_SHARE = 8
"""While several users send interactive requests to an endpoint, none holds more than all but this share of its
slots: a request of another finds one free at once, instead of waiting for one of a burst's requests to end."""
DRAIN_WEIGHT = 0.1
"""Weight of each freed slot in the moving average of the time between two (for ``Retry-After``)."""
ANONYMOUS = ""
"""The user of requests with no caller (a user's own Jupyter server serves one person)."""
ENGINE_WAITING_KEY = "engine_waiting"
"""The key of an endpoint's status reading that counts the requests waiting in its engine's own queue."""


@contextlib.contextmanager
def as_batch() -> Iterator[None]:
    """Send the block's requests as batch lines: they take only the slots interactive traffic leaves."""
    token = PRIORITY.set(Priority.batch)
    try:
        yield
    finally:
        PRIORITY.reset(token)


class Grant(Protocol):
    """How a waiting request hears that it has a slot: an asyncio future on the gateway's loop, or whatever a
    simulation on virtual time passes (``enter``)."""

    def done(self) -> bool:
        """Granted, or given up (then ``cancel`` was called)."""
        ...

    def set_result(self, result: None, /) -> None:
        """The slot is the request's (already counted taken)."""
        ...

    def cancel(self) -> bool:
        ...


@dataclass(slots=True)
class _Waiter:
    finish: float
    seq: int
    """Its arrival's order, which breaks ties of tags."""
    start: float
    user: str
    since: float
    granted: Grant


@dataclass(slots=True)
class FairQueue:
    """One class's requests waiting for an endpoint's slots: a line per user, the users in weighted fair order."""

    vtime: float = 0.0
    """The start tag of the request served last: a user who arrives now starts from it, not from zero, so an
    idle user earns no credit to burst with later."""
    lines: dict[str, deque[_Waiter]] = field(default_factory=dict)
    finish: dict[str, float] = field(default_factory=dict)
    """Each waiting user's last finish tag."""
    per_user: dict[str, int] = field(default_factory=dict)
    """Each user's requests waiting (those withdrawn not counted)."""
    heap: list[tuple[float, int, str]] = field(default_factory=list)
    """Each user with a line, once, by the finish tag of its first request."""
    length: int = 0
    seq: Iterator[int] = field(default_factory=itertools.count)

    def push(self, user: str, weight: float, since: float, granted: Grant) -> None:
        start = max(self.vtime, self.finish.get(user, 0.0))
        finish = self.finish[user] = start + 1 / weight
        waiter = _Waiter(finish, next(self.seq), start, user, since, granted)
        line = self.lines.get(user)
        if line is None:
            line = self.lines[user] = deque()
            heapq.heappush(self.heap, (finish, waiter.seq, user))
        line.append(waiter)
        self.per_user[user] = self.per_user.get(user, 0) + 1
        self.length += 1

    def pop(self, eligible: Callable[[str], bool]) -> _Waiter | None:
        """The next request to serve: the smallest tag among the users ``eligible`` says may take a slot now;
        None when none waits."""
        passed: list[tuple[float, int, str]] = []
        found = None
        while self.heap and found is None:
            entry = heapq.heappop(self.heap)
            user = entry[2]
            line = self.lines[user]
            while line and line[0].granted.done():  # withdrawn while it waited (``withdraw`` counted it out)
                line.popleft()
            if not line:
                del self.lines[user]
                self.finish.pop(user, None)
            elif line[0].seq != entry[1]:  # its first request left: placed again by the next one's tag
                heapq.heappush(self.heap, (line[0].finish, line[0].seq, user))
            elif not eligible(user):
                passed.append(entry)
            else:
                found = line.popleft()
                if line:
                    heapq.heappush(self.heap, (line[0].finish, line[0].seq, user))
                else:
                    del self.lines[user]
        for entry in passed:
            heapq.heappush(self.heap, entry)
        if found is not None:
            self.vtime = found.start
            self._count_out(found.user)
        return found

    def withdraw(self, user: str) -> None:
        """A waiting request of ``user`` left (cancelled); its entry is dropped when it comes up."""
        self._count_out(user)

    def _count_out(self, user: str) -> None:
        self.length -= 1
        left = self.per_user[user] - 1
        if left:
            self.per_user[user] = left
        else:  # no request of the user waits: its tags start afresh from the queue's virtual time
            del self.per_user[user]
            if user not in self.lines:
                self.finish.pop(user, None)


@dataclass(slots=True)
class Gate:
    """One endpoint's slots, its queues and its batch concurrency."""

    backend: Backend
    capacity: Callable[[], int]
    in_flight: dict[Priority, int] = field(default_factory=lambda: dict.fromkeys(Priority, 0))
    queues: dict[Priority, FairQueue] = field(default_factory=lambda: {p: FairQueue() for p in Priority})
    interactive: Demand = field(default_factory=lambda: Demand(HEADROOM_WINDOW_S))
    """Interactive requests in flight or waiting, and their recent peak: the headroom kept from batch lines."""
    window: float = math.inf
    """The AIMD batch concurrency, before the headroom; infinite until the first cut (full)."""
    cut_at: float = -math.inf
    raised_at: float = -math.inf
    drain_s: float = 1.0
    """The time between two slots freed, on average: how fast the queue drains (for ``Retry-After``)."""
    released_at: float = 0.0
    engine_waiting: int | None = None
    """Requests waiting in the engine's own queue, where it reports it."""
    holding: dict[str, int] = field(default_factory=dict)
    """Interactive slots each user holds."""
    seen: OrderedDict[str, float] = field(default_factory=OrderedDict)
    """Users of interactive requests here within ``HEADROOM_WINDOW_S``, by when they last sent one."""

    def may_hold_more(self, user: str, now: float) -> bool:
        """Whether ``user`` may take another interactive slot: any while no other user was seen here within the
        window, else all but ``capacity / RESERVE_SHARE`` of them, kept for the others' next requests."""
        capacity = self.capacity()
        if self.holding.get(user, 0) < max(capacity - max(capacity // RESERVE_SHARE, 1), 1):
            return True
        self.saw(None, now)
        return len(self.seen) <= 1 and (not self.seen or user in self.seen)

    def saw(self, user: str | None, now: float) -> None:
        """``user`` sent an interactive request now (None: no one); those quiet for the window are forgotten."""
        if user is not None:
            self.seen[user] = now
            self.seen.move_to_end(user)
        while self.seen and next(iter(self.seen.values())) < now - HEADROOM_WINDOW_S:
            self.seen.popitem(last=False)

    def batch_limit(self, now: float) -> int:
        """The batch lines this endpoint may have in flight now: the AIMD window, less the headroom; at least one,
        so a batch always moves (and its answers keep the controller evaluated)."""
        capacity = self.capacity()
        return max(1, min(math.floor(self.grown(now)), capacity - self.interactive.peak(now)))

    def grown(self, now: float) -> float:
        """The AIMD window, grown by the periods passed without a miss since it last grew (at most the capacity)."""
        capacity = self.capacity()
        if self.window < capacity and now - self.raised_at >= PERIOD_S:
            periods = math.floor((now - self.raised_at) / PERIOD_S)
            self.window = min(self.window + periods * max(capacity / ADD_STEPS, 1.0), capacity)
            self.raised_at += periods * PERIOD_S
        return min(self.window, capacity)

    def held(self, now: float) -> bool:
        """Batch lines wait while a cut is in effect (interactive requests missed their target): not merely the
        headroom kept for interactive traffic, which costs a batch a few slots, not its pace."""
        return bool(self.queues[Priority.batch].length) and self.grown(now) < self.capacity()

    def miss(self, now: float) -> None:
        """Interactive traffic suffers: halve the batch window (once per period)."""
        if now - self.cut_at < PERIOD_S:
            return
        self.window = max(min(self.window, self.capacity()) / 2, 1.0)
        self.cut_at = self.raised_at = now


class Admission:
    """Every endpoint's slots, queues and batch concurrency (see the module)."""

    def __init__(self, router: Router, settings: AdmissionSettings, ttft_target: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``ttft_target``: ``defaults.batch.interactive_ttft_target``; ``clock``: seconds (a test or simulation
        passes its own)."""
        self.router = router
        self.settings = settings
        self.ttft_target = ttft_target
        self.clock = clock
        self._gates: dict[int, Gate] = {}

    def gate(self, backend: Backend) -> Gate:
        gate = self._gates.get(id(backend))
        if gate is None:
            health = self.router.health_of_backend(backend)
            gate = self._gates[id(backend)] = Gate(backend, health.admissible)
        return gate

    # -- one request -----------------------------------------------------------------------------------------

    async def began(self, target: Target) -> Holder:
        """Take a slot of ``target`` for the current request (its class and user from the context), waiting in the
        endpoint's queue when none is free to it; a 429 when that queue is full. The router is told once it has
        one. Returns whose slot it is, for ``ended``."""
        holder = self.holder()
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.enter(target, holder, granted):
            return holder
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # the slot came as the request left: hand it on
                self._free(self.gate(target.backend), holder)
                self.router.left(target.model_id)
            else:
                self.withdraw(target, holder, granted)
            raise
        self.router.began(target, waited=True)  # (the slot was counted as it was granted)
        return holder

    def enter(self, target: Target, holder: Holder, granted: Grant) -> bool:
        """``began`` without waiting: True when ``holder`` took a slot of ``target`` now (the router is told);
        else it waits in the endpoint's queue, and ``granted`` is set once a slot is its own (maybe before this
        returns), after which its sender tells the router (``router.began(target, waited=True)``); a 429 when that
        queue is full. The router counts a waiting request in its model's demand from the start."""
        gate = self.gate(target.backend)
        priority, user = holder
        now = self.clock()
        queue = gate.queues[priority]
        if priority is Priority.interactive:
            gate.interactive.rose(now)
            gate.saw(user, now)
        if not queue.length and self._may_take(gate, holder, now):
            self._count_in(gate, holder)
            self.router.began(target)
            return True
        self._check_room(gate, queue, priority, user, target)
        self.router.waiting(target.model_id)
        queue.push(user, self.settings.weights.get(user, 1.0), now, granted)
        self._hand_on(gate)  # (a slot kept from a user who holds many may be free to this one)
        return False

    def withdraw(self, target: Target, holder: Holder, granted: Grant) -> None:
        """A request waiting for a slot (``enter``) left before it had one."""
        granted.cancel()
        self.router.left(target.model_id)
        priority, user = holder
        gate = self.gate(target.backend)
        gate.queues[priority].withdraw(user)
        if priority is Priority.interactive:
            gate.interactive.fell()

    @staticmethod
    def holder() -> Holder:
        """The current request's class and user, from the context: what ``ended`` needs where it runs outside it
        (a stream's end)."""
        caller = current()
        return PRIORITY.get(), caller.user if caller is not None else ANONYMOUS

    def ended(self, target: Target, holder: Holder | None) -> None:
        """The request's answer ended (or it failed): its slot (``began``'s answer) goes to the next in line.
        None: it never took one, and nothing is given back."""
        if holder is None:
            return
        self.router.ended(target)
        gate = self.gate(target.backend)
        now = self.clock()
        gate.drain_s += DRAIN_WEIGHT * (min(now - gate.released_at, PERIOD_S * ADD_STEPS) - gate.drain_s)
        gate.released_at = now
        self._free(gate, holder)

    def first_token(self, target: Target, seconds: float) -> None:
        """An interactive answer's first token came ``seconds`` after the engine took the request."""
        if seconds > self.ttft_target:
            self.gate(target.backend).miss(self.clock())

    def engine_reports(self, backend: Backend, waiting: int) -> None:
        """The engine says ``waiting`` requests wait in its own queue (vLLM's ``vllm:num_requests_waiting``):
        while interactive traffic is about, batch lines back off, as they are the ones that can wait."""
        gate = self.gate(backend)
        gate.engine_waiting = waiting
        now = self.clock()
        if waiting > 0 and gate.interactive.peak(now) > 0:
            gate.miss(now)

    def observe(self, backends: list[Backend], readings: list[dict[str, Any]]) -> None:
        """Status readings (``catalog.state_observers``, after the router counted the blocks up): each engine's
        own queue, where one reports it; and the slots of blocks that came up go to those waiting at once."""
        by_name = {(b.cluster, b.name): b for b in backends}
        for reading in readings:
            waiting = reading.get(ENGINE_WAITING_KEY)
            backend = by_name.get((str(reading.get("cluster")), str(reading.get("endpoint"))))
            if isinstance(waiting, int) and backend is not None:
                self.engine_reports(backend, waiting)
        for gate in self._gates.values():
            if any(queue.length for queue in gate.queues.values()):
                self._hand_on(gate)

    # -- slots -----------------------------------------------------------------------------------------------

    def _may_take(self, gate: Gate, holder: Holder, now: float) -> bool:
        if sum(gate.in_flight.values()) >= gate.capacity():
            return False
        priority, user = holder
        if priority is Priority.interactive:
            return gate.may_hold_more(user, now)
        return gate.in_flight[Priority.batch] < gate.batch_limit(now)

    @staticmethod
    def _count_in(gate: Gate, holder: Holder) -> None:
        priority, user = holder
        gate.in_flight[priority] += 1
        if priority is Priority.interactive:
            gate.holding[user] = gate.holding.get(user, 0) + 1

    def _free(self, gate: Gate, holder: Holder) -> None:
        priority, user = holder
        gate.in_flight[priority] -= 1
        if priority is Priority.interactive:
            gate.interactive.fell()
            left = gate.holding[user] - 1
            if left:
                gate.holding[user] = left
            else:
                del gate.holding[user]
        self._hand_on(gate)

    def _hand_on(self, gate: Gate) -> None:
        """Free slots to the waiting, interactive first; a slot is counted taken as it is granted (the waiter's
        task runs later), so two releases never give one slot twice."""
        now = self.clock()
        capacity = gate.capacity()
        for priority in Priority:  # (interactive first: the enum's order)
            queue = gate.queues[priority]

            def eligible(user: str, priority: Priority = priority) -> bool:
                return self._may_take(gate, (priority, user), now)

            while queue.length and sum(gate.in_flight.values()) < capacity:
                waiter = queue.pop(eligible)
                if waiter is None:
                    break
                if priority is Priority.interactive and now - waiter.since >= QUEUE_SHARE * self.ttft_target:
                    gate.miss(now)
                self._count_in(gate, (priority, waiter.user))
                waiter.granted.set_result(None)

    def _check_room(self, gate: Gate, queue: FairQueue, priority: Priority, user: str, target: Target) -> None:
        settings = self.settings
        if queue.length < settings.max_queued and queue.per_user.get(user, 0) < settings.max_queued_per_user:
            return
        if priority is Priority.interactive:
            gate.interactive.fell()
        mine = queue.length < settings.max_queued  # (else everyone's queue is full)
        waiting, setting = (queue.per_user.get(user, 0), "max_queued_per_user") if mine else (
            queue.length, "max_queued")
        retry = max(1, math.ceil(queue.length * gate.drain_s))
        raise OpenAIError(429, f"{waiting} {priority} requests {'of yours ' if mine else ''}for model "
                               f"'{target.model_id}' already wait for a slot of cluster '{target.cluster}' endpoint "
                               f"'{target.endpoint}' (defaults.admission.{setting}). Retry after {retry} s, or send "
                               "fewer requests at once; a batch (POST /v1/batches) queues any number of them.",
                          type="rate_limit_error", code="queue_full", headers={"Retry-After": str(retry)})

    # -- what is shown ---------------------------------------------------------------------------------------

    def status(self, backend: Backend) -> AdmissionStatus:
        """``/first/api/status``'s view of an endpoint's slots."""
        gate = self.gate(backend)
        now = self.clock()
        limit = gate.batch_limit(now)
        return AdmissionStatus(
            capacity=gate.capacity(), in_flight_interactive=gate.in_flight[Priority.interactive],
            in_flight_batch=gate.in_flight[Priority.batch], queued_interactive=gate.queues[Priority.interactive].length,
            queued_batch=gate.queues[Priority.batch].length, batch_concurrency=limit,
            batch_held=gate.held(now), engine_waiting=gate.engine_waiting)

    def report(self, backends: list[Backend]) -> list[tuple[str, str, AdmissionStatus]]:
        """``/metrics``' view: each endpoint's cluster, name and slots."""
        return [(backend.cluster, backend.name, self.status(backend)) for backend in backends]

    def held(self, model: str) -> bool:
        """Whether batch lines for ``model`` wait because interactive traffic holds its endpoints' batch
        concurrency down (the sidebar says the batch is paused for it)."""
        now = self.clock()
        return any(self.gate(t.backend).held(now) for t in self.router.catalog.get(model, ()))
