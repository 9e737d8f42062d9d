"""Resolve a requested model to the endpoints that may serve it, best first.

Each model is served from the endpoints listed in config, or discovered from a FIRST gateway. Its candidates are
ordered by the time to first token each is expected to give: the wait its state implies (hot answers now, a cold
one must start a block: as long as its starts have taken, less what a start under way has already spent), plus
the answers it has been giving (a moving average) scaled by its load (requests in flight for the sequences its
engine serves at once). The router also says which endpoints to start: the best one when it must start the model
(nothing hot ranks before it), and, ahead of need, the model's other endpoints: all of them while it is in use, or
only as many as its recent peak load needs (``defaults.scale_out``), so a burst drains through several hot engines
rather than waiting in one engine's queue for a start that takes minutes. Among hot endpoints about as fast as the
best (``defaults.prefix_routing.tolerance``), a request goes where the longest part of its opening (system prompt,
first messages) was last sent: that engine's prefix cache holds it, so its first token comes sooner (a
conversation's next turn is one case). An endpoint that keeps failing before its first byte is kept out for a
cooldown (a circuit breaker), so requests stop paying its timeout; one that refuses the user (403) is left out for
longer, as a cluster the user may not use. The gateway fails over to the next candidate on such failures, never
after a byte was sent.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import orjson

from first_jupyter.config import PrefixRouting, ScaleOut
from first_jupyter.gateway.backends.base import Backend
from first_jupyter.gateway.forecast import Forecast
from first_jupyter.protocol import Capability, OpenAIError


@dataclass(frozen=True, slots=True)
class Target:
    model_id: str
    backend: Backend

    @property
    def cluster(self) -> str:
        return self.backend.cluster

    @property
    def endpoint(self) -> str:
        return self.backend.name


START_FLOOR_S = 5.0
"""A start under way that has taken longer than expected is still expected to take a little longer, not none."""
FAILURES_TO_OPEN = 3
COOLDOWN_S = 30.0
FORBIDDEN_S = 600.0
"""How long an endpoint that refused this user (403: not in its allowed groups, no allocation) is left out: the
user's access rarely changes within minutes, and asking again costs a refused request each time."""
FIRST_TTFT_S = 0.5
"""The time to first token assumed of an endpoint never measured: optimistic, so a new one gets tried."""
EWMA_WEIGHT = 0.2
START_WEIGHT = 0.5
"""Starts are few and their length changes with the queue: the last ones count for much."""
SCALE_OUT_AT = 0.75
"""The share of its capacity in flight at which a model's hot endpoints are too few: another one is started."""
BURST_TURNS = 3
"""A burst's requests come within about half a minute and most answers take seconds: each of a hot endpoint's
slots serves several of them while it lasts. ``keep_hot: predicted`` plans a burst's peak in flight at this many
times an endpoint's capacity each (the last of it waits for a slot), not at ``SCALE_OUT_AT``: an endpoint per
three quarters of its capacity in a burst would keep most of the facility hot for minutes a day."""
PREFIX_BLOCK_BYTES = 512
"""A request's opening is hashed in blocks of at most this many bytes of its serialized messages (a message's end
also ends a block, so that a conversation's next turn, which repeats the earlier ones, matches them whole)."""
PREFIX_BLOCKS = 16
"""At most this many blocks are hashed: the opening an engine's prefix cache saves the most on, at a bounded cost
per request whatever the prompt's length."""
PREFIX_MOST = 50_000
"""Block hashes remembered (the least recently routed forgotten first): about 3,000 requests' full openings."""
PREFIX_HOLDERS = 3
"""Endpoints remembered per block, the last one sent it first: a prefix spilled to a second endpoint under load is
cached there too."""
STARTING = frozenset({"starting", "queued"})
WAITING_STATES = STARTING | {"cold"}
"""States whose endpoints must start the model before they answer: a request to them is a cold start."""


@dataclass(slots=True)
class Health:
    """What the router has seen of one endpoint."""

    start_s: float
    """How long a cold start of a model here takes (configured, then learned from the starts seen)."""
    capacity: int
    """Requests it serves at once before answers slow down (vLLM batches them): its engine's, times the blocks
    it has up when a status reading says so."""
    max_blocks: int = 1
    """The blocks its endpoint may scale out to (``Backend.max_blocks``)."""
    blocks: int = 1
    """The blocks the last status reading counted up (at least one: a cold endpoint starts one)."""
    in_flight: int = 0
    last_sent: float = -math.inf
    """When a request was last sent here: between bursts, requests go round the hot endpoints of a model by it,
    so each stays hot (an endpoint that gets nothing is released at the end of its hot window)."""
    ttft_s: float = FIRST_TTFT_S
    prefix_routed: int = 0
    """Requests with an opening (``prefix_of``) routed here, when the model had a choice of endpoints."""
    prefix_hits: int = 0
    """Of those, the ones sent here because it was last sent part of their opening (its prefix cache holds it)."""
    failures: int = 0
    """Consecutive failures before a first byte; reset by any success."""
    open_until: float = 0.0
    """While in the future, the circuit is open: the endpoint is not tried (unless nothing else can serve)."""
    forbidden_until: float = 0.0
    """While in the future, the endpoint refused this user: it is not tried (unless nothing else can serve)."""
    last_error: str | None = None
    states: dict[str, str] = field(default_factory=dict)
    """Model → state (hot, starting, queued, cold, offline) from the last status reading."""
    since: dict[str, float] = field(default_factory=dict)
    """Model → when its start began (its job queued, or this gateway asked), while one is under way."""

    def wait_s(self, model_id: str, now: float) -> float:
        """The seconds before the model can answer here, by its state: none when hot (or not read yet)."""
        state = self.states.get(model_id, "hot")
        if state == "hot":
            return 0.0
        if state == "offline":
            return math.inf
        if state == "cold":  # not begun: behind a start asked just now, which requests waiting there can join
            return self.start_s + START_FLOOR_S
        # queued or starting: a start under way (through the queue, then the engine loading), expected to take as
        # long as starts here take, less what it has spent
        return max(self.start_s - (now - self.since.get(model_id, now)), START_FLOOR_S)

    def expected_s(self, model_id: str, now: float) -> float:
        return self.wait_s(model_id, now) + self.ttft_s * (1 + self.in_flight / self.capacity)

    def loaded(self) -> bool:
        return self.in_flight >= SCALE_OUT_AT * self.capacity

    def admissible(self) -> int:
        """The requests to send it at once: its capacity, and one block's more while its endpoint may add one.
        A Globus Compute endpoint scales out only for tasks it sees waiting: held back at the gateway, no
        request would ever make it grow, however many wait."""
        return self.capacity + (self.capacity // self.blocks if self.blocks < self.max_blocks else 0)


@dataclass(slots=True)
class Demand:
    """A model's requests in flight across all its endpoints, and the most it had at once within a window: the
    capacity it is kept hot for."""

    window_s: float
    in_flight: int = 0
    peaks: deque[tuple[float, int]] = field(default_factory=deque)
    """(when, requests in flight then), each smaller than the one before it: the front is the window's peak."""

    def rose(self, now: float) -> None:
        self.in_flight += 1
        while self.peaks and self.peaks[-1][1] <= self.in_flight:
            self.peaks.pop()
        self.peaks.append((now, self.in_flight))

    def fell(self) -> None:
        self.in_flight -= 1

    def peak(self, now: float) -> int:
        while self.peaks and self.peaks[0][0] < now - self.window_s:
            self.peaks.popleft()
        return max(self.in_flight, self.peaks[0][1] if self.peaks else 0)


Prefix = tuple[int, ...]
"""A request's opening as chained block hashes: block i's hash covers blocks 0..i, so two requests share their
first k hashes exactly when they share their first k blocks (as an engine's prefix cache keys its KV blocks)."""


def prefix_of(model_id: str, data: Mapping[str, object], most: int = PREFIX_BLOCKS) -> Prefix | None:
    """The opening of a request's body as chained block hashes (``most`` at most, each message cut at
    ``PREFIX_BLOCK_BYTES``): a chat's messages, a completion's prompt, a Responses request's instructions and input;
    None when it has none. Python's own hash: these stay in this process, and it is the cheapest. (A batch groups
    its lines by their first block alone: ``most=1``.)"""
    parts = _opening(data)
    if not parts:
        return None
    chained = hash(model_id)
    hashes: list[int] = []
    for part in parts:
        raw = orjson.dumps(part)
        for at in range(0, len(raw), PREFIX_BLOCK_BYTES):
            chained = hash((chained, raw[at:at + PREFIX_BLOCK_BYTES]))
            hashes.append(chained)
            if len(hashes) == most:
                return tuple(hashes)
    return tuple(hashes)


def _opening(data: Mapping[str, object]) -> list[object]:
    """What an engine reads first of the request, in order, one item per message."""
    messages = data.get("messages")
    if isinstance(messages, list):
        return messages
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    opening: list[object] = [data["instructions"]] if isinstance(data.get("instructions"), str) else []
    given = data.get("input")
    if isinstance(given, list):
        return opening + given
    return [*opening, given] if isinstance(given, str) else opening


class Router:
    def __init__(self, backends: list[Backend], served: dict[str, list[str]],
                 scale_out: ScaleOut | None = None, clock: Callable[[], float] = time.monotonic,
                 prefix_routing: PrefixRouting | None = None, day_offset_s: float | None = None) -> None:
        """``served`` maps each model id to the names (``cluster/endpoint``) of the backends that serve it;
        ``scale_out``: which endpoints to keep hot (the config's ``defaults.scale_out``); ``clock``: seconds, for
        cooldowns, starts and peaks (a simulation passes its own); ``prefix_routing``: the config's
        ``defaults.prefix_routing``; ``day_offset_s``: added to ``clock`` gives the local time of day (for
        ``keep_hot: predicted``; the wall clock's by default)."""
        self.clock = clock
        self.scale_out = scale_out or ScaleOut()
        self.tolerance_s = (prefix_routing or PrefixRouting()).tolerance
        self._by_peak = self.scale_out.keep_hot == "peak"
        self._predicted = self.scale_out.keep_hot == "predicted"
        self.day_offset_s = day_offset_s if day_offset_s is not None else \
            time.time() + time.localtime().tm_gmtoff - clock()
        self.forecasts: dict[str, Forecast] = {}
        by_name = {f"{b.cluster}/{b.name}": b for b in backends}
        self.catalog: dict[str, list[Target]] = {
            model: [Target(model, by_name[name]) for name in names] for model, names in served.items()
        }
        self._known = ", ".join(sorted(self.catalog)) or "(none configured)"
        self.health: dict[int, Health] = {id(b): Health(b.start_s, b.capacity, b.max_blocks) for b in backends}
        self._holders: OrderedDict[int, tuple[Target, ...]] = OrderedDict()
        """Block hash (``prefix_of``) → the endpoints last sent it, the latest first (``PREFIX_MOST`` hashes)."""
        self.demand: dict[str, Demand] = {}

    def health_of_backend(self, backend: Backend) -> Health:
        """Kept by backend (a discovered catalog adds targets later; their health starts empty)."""
        health = self.health.get(id(backend))
        if health is None:
            health = self.health[id(backend)] = Health(backend.start_s, backend.capacity, backend.max_blocks)
        return health

    def health_of(self, target: Target) -> Health:
        return self.health_of_backend(target.backend)

    # -- what was seen ---------------------------------------------------------------------------------------

    def observe_blocks(self, backend: Backend, blocks: int) -> None:
        """A status reading counted the endpoint's blocks (engines) up: its capacity is theirs together."""
        health = self.health_of_backend(backend)
        health.blocks = max(blocks, 1)
        health.capacity = backend.capacity * health.blocks

    def observe_state(self, backend: Backend, model_id: str, state: str) -> None:
        health = self.health_of_backend(backend)
        if state not in STARTING:
            health.since.pop(model_id, None)
        elif model_id not in health.since:
            health.since[model_id] = self.clock()
        health.states[model_id] = state

    def state_of(self, target: Target) -> str:
        """The model's state at that endpoint as last seen; ``unknown`` before any reading."""
        return self.health_of(target).states.get(target.model_id, "unknown")

    def wait_of(self, target: Target) -> float:
        """Seconds before the model can answer there, as far as the router knows."""
        return self.health_of(target).wait_s(target.model_id, self.clock())

    def start_asked(self, target: Target) -> bool:
        """The gateway asked ``target`` to start the model; whether the start is worth learning from (it began
        cold, so its length is a whole start's)."""
        whole = self.state_of(target) == "cold"
        self.observe_state(target.backend, target.model_id, "starting")
        return whole

    def start_ended(self, target: Target, seconds: float, whole: bool, failure: str | None = None) -> None:
        """A start asked of ``target`` answered after ``seconds`` (or failed, saying why): the model is hot there,
        and a whole start teaches how long the next will take."""
        if failure is not None:
            self.failed(target, failure)
            self.observe_state(target.backend, target.model_id, "offline")  # until a reading says more
            return
        health = self.health_of(target)
        health.failures, health.open_until, health.last_error = 0, 0.0, None
        if whole:
            health.start_s += START_WEIGHT * (max(seconds, START_FLOOR_S) - health.start_s)
        self.observe_state(target.backend, target.model_id, "hot")

    def demand_of(self, model_id: str) -> Demand:
        demand = self.demand.get(model_id)
        if demand is None:
            demand = self.demand[model_id] = Demand(self.scale_out.peak_window)
        return demand

    def forecast_of(self, model_id: str) -> Forecast:
        forecast = self.forecasts.get(model_id)
        if forecast is None:
            forecast = self.forecasts[model_id] = Forecast(self.scale_out.demand_window, self.day_offset_s)
        return forecast

    def began(self, target: Target, waited: bool = False) -> None:
        """A request was sent to ``target``; ``waited``: it was counted in its model's demand as it began to wait
        for a slot there (``waiting``)."""
        health = self.health_of(target)
        health.in_flight += 1
        health.last_sent = self.clock()
        if not waited:
            self.waiting(target.model_id)

    def waiting(self, model_id: str) -> None:
        """A request for ``model_id`` waits at the gateway for a slot (admission): demand all the same, for what a
        model needs hot is what it is asked, not what its slots let through."""
        if self._by_peak:  # only ``keep_hot: peak`` reads a model's demand: no cost per request otherwise
            self.demand_of(model_id).rose(self.clock())
        elif self._predicted:
            self.forecast_of(model_id).rose(self.clock())

    def left(self, model_id: str) -> None:
        """A request for ``model_id`` is over: answered or failed (``ended``), or gone while it waited."""
        if self._by_peak:
            self.demand_of(model_id).fell()
        elif self._predicted:
            self.forecast_of(model_id).fell(self.clock())

    def ended(self, target: Target) -> None:
        self.health_of(target).in_flight -= 1
        self.left(target.model_id)

    def needed(self, target: Target, ahead_s: float) -> int:
        """How many endpoints of ``target``'s model its forecast needs hot (``keep_hot: predicted``): one, or as
        many as put the predicted requests in flight at ``SCALE_OUT_AT`` of one block's capacity each, or the
        burst it expects (``Forecast.burst``) at ``BURST_TURNS`` times that capacity each, whichever is more."""
        forecast, now, capacity = self.forecast_of(target.model_id), self.clock(), target.backend.capacity
        steady = forecast.predicted(now, ahead_s) / (SCALE_OUT_AT * capacity)
        burst = forecast.burst(now, self.scale_out.burst_hours) / (BURST_TURNS * capacity)
        return max(1, math.ceil(max(steady, burst)))

    def succeeded(self, target: Target, ttft_s: float | None) -> None:
        """An answer began ``ttft_s`` after the request was sent there; None when that says nothing of how fast
        the engine answers: the request waited for a start, or was sent while the engine was loaded (its wait
        for a slot is the load term's to count, and learning it too would count it twice)."""
        health = self.health_of(target)
        health.failures, health.open_until, health.last_error = 0, 0.0, None
        self.observe_state(target.backend, target.model_id, "hot")  # it answers: hot, whatever was last read
        if ttft_s is not None:
            health.ttft_s += EWMA_WEIGHT * (ttft_s - health.ttft_s)

    def forbid(self, target: Target, reason: str) -> None:
        """The endpoint refused this user (403): the clusters a user may use are learned, not configured twice."""
        health = self.health_of(target)
        health.forbidden_until, health.last_error = self.clock() + FORBIDDEN_S, reason

    def failed(self, target: Target, reason: str) -> None:
        """A failure before the first byte; the circuit opens after ``FAILURES_TO_OPEN`` in a row."""
        health = self.health_of(target)
        health.failures += 1
        health.last_error = reason
        if health.failures >= FAILURES_TO_OPEN:
            health.open_until = self.clock() + COOLDOWN_S

    # -- the choice ------------------------------------------------------------------------------------------

    def candidates(self, model_id: str, capability: Capability, prefix: Prefix | None = None) -> list[Target]:
        """The endpoints to try for this request, best first; those with an open circuit only when nothing else
        can serve (then the one whose cooldown ends first). When the best is hot, the first is taken among the hot
        ones expected within ``tolerance_s`` of it: the one last sent the longest part of ``prefix``
        (``prefix_of``) that is not ``loaded()``, else the least loaded; the request's prefix is then remembered
        as sent there."""
        able = self._able(model_id, capability)
        now = self.clock()
        allowed = [t for t in able if self.health_of(t).forbidden_until <= now] or able  # none: let it say why
        closed = [t for t in allowed if self.health_of(t).open_until <= now]
        if not closed:
            return sorted(allowed, key=lambda t: self.health_of(t).open_until)[:1]
        if len(closed) == 1:
            return closed
        expected = {id(t.backend): self.health_of(t).expected_s(model_id, now) for t in closed}
        ordered = sorted(closed, key=lambda t: expected[id(t.backend)])  # stable: config order on ties
        if self.state_of(ordered[0]) in ("hot", "unknown"):  # share the load among hot ones about as good
            near = [t for t in ordered if self.state_of(t) in ("hot", "unknown") and not self.health_of(t).failures
                    and expected[id(t.backend)] <= expected[id(ordered[0].backend)] + self.tolerance_s] or ordered[:1]
            if self._predicted:  # only the best the forecast needs, the others left to idle out; but a burst
                kept = near[:self.needed(ordered[0], 0.0)]  # that loads those drains through every hot one
                near = kept if any(not self.health_of(t).loaded() for t in kept) else near
            holder = self._holder(prefix, near) if prefix else None
            chosen = holder or min(near, key=self._share)
            if chosen is not ordered[0]:
                ordered.remove(chosen)
                ordered.insert(0, chosen)
            if prefix:
                self._routed(prefix, chosen, holder is not None)
        return ordered

    def _holder(self, prefix: Prefix, near: list[Target]) -> Target | None:
        """The endpoint of ``near`` last sent the longest part of ``prefix`` with room (not ``loaded()``); the
        least loaded of several."""
        for block in reversed(prefix):
            holders = self._holders.get(block)
            if holders:
                able = [t for t in holders if t in near and not self.health_of(t).loaded()]
                if able:
                    return able[0] if len(able) == 1 else min(able, key=self._share)
        return None

    def _routed(self, prefix: Prefix, target: Target, hit: bool) -> None:
        """``prefix`` goes to ``target``: its blocks are remembered there, first among their holders."""
        health = self.health_of(target)
        health.prefix_routed += 1
        health.prefix_hits += hit
        holders = self._holders
        for block in prefix:
            known = holders.get(block)
            if known is None:
                holders[block] = (target,)
            else:
                if known[0] is not target:
                    holders[block] = (target, *(t for t in known if t is not target))[:PREFIX_HOLDERS]
                holders.move_to_end(block)
        while len(holders) > PREFIX_MOST:
            holders.popitem(last=False)

    def _share(self, target: Target) -> tuple[float, float]:
        """The load on a hot endpoint, for sharing: the part of its capacity in use, then how recently it was sent
        a request (so that equal loads, idle ones included, take turns)."""
        health = self.health_of(target)
        return health.in_flight / health.capacity, health.last_sent

    def to_start(self, ordered: list[Target]) -> list[Target]:
        """Which of a request's candidates (``candidates()``'s order) to ask to start the model: the first when it
        must start it (nothing hot ranks before it); and, ahead of need, the best cold one of the rest while no
        start is under way for the model: always (``keep_hot: all``), or when the most requests the model had in
        flight within ``peak_window`` reach ``SCALE_OUT_AT`` of its hot endpoints' capacity (``keep_hot: peak``).
        One start at a time: each start asked is a block in a batch queue, and the next request sees its effect."""
        first = self.state_of(ordered[0])
        if first in WAITING_STATES:
            return ordered[:1]
        if len(ordered) == 1:
            return []
        if self._predicted:
            return self._to_start_predicted(ordered)
        by_peak = self._by_peak
        peak = self.demand_of(ordered[0].model_id).peak(self.clock()) if by_peak else 0
        if by_peak and first in ("hot", "unknown") and peak < SCALE_OUT_AT * self.health_of(ordered[0]).capacity:
            return []  # the common case, on every request: the best hot one alone has room for the peak
        states = [self.state_of(t) for t in ordered]
        if "cold" not in states or "starting" in states or "queued" in states:
            return []
        if by_peak and peak < SCALE_OUT_AT * sum(self.health_of(t).capacity for t, state in
                                                 zip(ordered, states, strict=True) if state in ("hot", "unknown")):
            return []
        return [ordered[states.index("cold")]]

    def _to_start_predicted(self, ordered: list[Target]) -> list[Target]:
        """``keep_hot: predicted``: the best cold endpoint while fewer are hot or starting than the forecast needs
        by the time a start there would answer, and no start is under way."""
        states = [self.state_of(t) for t in ordered]
        if "cold" not in states or "starting" in states or "queued" in states:
            return []
        cold = ordered[states.index("cold")]
        up = sum(state in ("hot", "unknown") for state in states)
        return [cold] if up < self.needed(ordered[0], self.health_of(cold).start_s) else []

    def serve(self, backend: Backend, model_ids: list[str]) -> None:
        """Make ``backend`` the server of exactly ``model_ids`` (a catalog it discovered), keeping the rest."""
        for model in list(self.catalog):
            kept = [t for t in self.catalog[model] if t.backend is not backend]
            if kept:
                self.catalog[model] = kept
            else:
                del self.catalog[model]
        for model in model_ids:
            self.catalog.setdefault(model, []).append(Target(model, backend))
        self._known = ", ".join(sorted(self.catalog)) or "(none configured)"

    def targets(self, model_id: str) -> list[Target]:
        """Where ``model_id`` is served; the 404 that lists the served models when nowhere."""
        targets = self.catalog.get(model_id)
        if not targets:
            asked = f"The model '{model_id}' does not exist here" if model_id else "The request names no model"
            raise OpenAIError(404, f"{asked}. Available models: {self._known}. Set 'model' to one of them "
                                   f"(GET /first/v1/models lists them).", param="model", code="model_not_found")
        return targets

    def capabilities(self, model_id: str) -> list[Capability]:
        """What ``model_id`` can be asked here: each kind some endpoint serving it serves (its config's, or what
        the engine or gateway in front of it reports), in ``Capability``'s order."""
        targets = self.catalog.get(model_id, ())
        return [c for c in Capability if any(t.backend.supports(model_id, c) for t in targets)]

    def _able(self, model_id: str, capability: Capability) -> list[Target]:
        able = [t for t in self.targets(model_id) if t.backend.supports(model_id, capability)]
        if able:
            return able
        own = ", ".join(f"{c.value} ({c.public_path})" for c in self.capabilities(model_id)) or "nothing"
        served = sorted(m for m, ts in self.catalog.items() if any(t.backend.supports(m, capability) for t in ts))
        raise OpenAIError(404, f"The model '{model_id}' cannot serve {capability.route}: no endpoint serving it "
                               f"has that route. It serves {own}. Models that can serve {capability.route}: "
                               f"{', '.join(served) or 'none'}.", param="model", code="unsupported_route")
