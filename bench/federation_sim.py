"""Routing across federated clusters, simulated at scale: this gateway's router against round robin and ALCF's
old order, on the same hardware, the same request trace and the same status readings.

Why this exists: what the router is for (cold starts of 10-15 minutes, batch queues, outages, bursts) cannot be
shown on one machine, and a copy of its logic in a model would prove nothing about the code that ships. So this is
a discrete-event model (a virtual clock and a heap of events, deterministic for a ``--seed``) of clusters and
their endpoints under a day of traffic, in which the policy "this router" is the real
``first_jupyter.gateway.router.Router`` run on the simulation's clock and fed what a gateway sees.

The model (each figure is a constant below; none was chosen by looking at which policy wins):

* Clusters: four, of 16 to 96 nodes. Other users hold a share of each cluster's nodes that swings with the time of
  day plus a drifting noise (re-drawn every 30 min), so which cluster has free nodes changes through the day.
* Endpoints: one per (cluster, model), as FIRST deploys them (a Globus Compute endpoint per model). An endpoint
  scales like a parsl-backed one: it asks for a block (one node) when requests wait there and no block is on its
  way, up to the cluster's ``max_blocks``; a block idle for ``IDLE_S`` is released. A block asked for waits in the
  batch queue: the scheduler's cycle (15-90 s) when a node is free, else an exponential wait whose mean is the
  cluster's (6 to 40 min); once on a node the engine loads in 10-15 min (uniform), and ``START_FAILURE`` of starts
  fail (the engine dies loading). A block serves ``SLOTS`` sequences at once; requests beyond that wait for a slot
  on the endpoint, and a sequence's time to first token grows with the block's load.
* Failures: each endpoint goes down about once a day for 5-30 min. Its blocks are lost; a request waiting there
  (for a start or a slot) fails before its first byte; one sent to it while down fails after a connect timeout
  (``CONNECT_TIMEOUT_S``); a stream already under way breaks (its first token counted). It comes back cold.
* Trace: 20 models with Zipf popularity (exponent 1.1), each served by 2 (the 15 least used) or 3 clusters in a
  random config order; single requests at a diurnal rate (1,200 an hour on average, peak in the afternoon, at
  night a sixth of the afternoon's), plus bursts (1.5 an hour on average, diurnal too) of 50-300 requests to one
  model within 30 s, as a batch script sends them. A request's prompt (its prefill time) and answer length are
  drawn with it.
* Batches: about ten a day (``BATCHES_PER_H``, diurnal), 1,000-5,000 lines to one model (Zipf too), sent by the
  gateway's runner: its lines in order, at most the model's capacity as the gateway knows it in flight (``SLOTS``
  per block up at each of its endpoints, one block's where none is), each routed as any request.
* Prefixes: each request opens with a system prompt, one of ``PREFIXES`` per model for single requests (Zipf), one
  of its own per burst and per batch. A block's prefix cache holds the last ``BLOCK_PREFIXES``; a hit saves
  ``PREFIX_SAVES`` of the request's prefill. This router is given the request's opening as the gateway hashes it
  (``prefix_of``); the baselines ignore it.
* A client gives up after ``MAX_WAIT_S`` without a first token: the request failed. So does one that every
  candidate refused.
* Readings: every 30 s the gateway reads each endpoint's state (hot, starting, queued, cold, offline) and each
  cluster's free nodes; every policy decides by those readings, so all of them act on states up to 30 s old.
* Common random numbers: the trace, the outages, the other users' load and each endpoint's k-th start (its queue
  wait, load time and failure) are drawn from streams named by the seed and the thing drawn, so every policy
  meets the same hardware, the same traffic and the same luck.

The policies, each a gateway around the same endpoints:

* this router, three times: with the config's default ``defaults.scale_out`` (``keep_hot: all``), with
  ``keep_hot: peak`` and with ``keep_hot: predicted``, each as ``first_jupyter.gateway.core`` (``_first_answer``,
  ``_start``, ``_observe``, ``GatewayStream.close``) drives it. On arrival, ``Router.candidates()`` best first
  (among hot endpoints within ``defaults.prefix_routing.tolerance`` of the best, the one last sent the request's
  system prompt, else the least loaded for its capacity), and each endpoint ``Router.to_start()`` names is asked
  to start the model: the best when its last known state needs a start (``WAITING_STATES``), or, ahead of need
  while no start is under way for the model, the best cold one: always (``all``), when the most requests the
  model had in flight within ``peak_window`` reach ``SCALE_OUT_AT`` of its hot endpoints' capacity (``peak``), or
  when fewer are up than its forecast needs (``predicted``: for its steady load, or for the bursts it has had
  around this time of day; its requests go only to those it needs until they are loaded). A start is one at a
  time per endpoint (a start under way is joined):
  ``start_asked()`` when asked (the endpoint's ``warm``), ``start_ended()`` with its length (or its failure) when
  it answers. The request goes to the best; on a failure before the first byte to the next candidate, which is
  asked to start the model too if its state needs it (and the request waits there). Before each try it takes a
  slot of that endpoint from the real ``Admission`` (``Admission.enter``, on the simulation's clock): its
  ``Health.admissible()``, ``SLOTS`` per block up and one block's more while the endpoint may still add one (so
  its own scale-out sees requests waiting, as here), interactive requests first, batch lines in what the AIMD
  window and the interactive headroom leave, users in weighted fair order (a burst is one script's, a batch its
  owner's, a single request its notebook's, known by its system prompt); a request without a slot waits at the
  gateway, counted in its model's demand (``Router.waiting``); an interactive first token that waited for no
  start is ``first_token()``. The router's ``began``/``ended`` come through it around each try; ``failed`` on a
  failure before the first byte or a stream broken by an outage; at a stream's end ``succeeded`` with its time to
  first token from when it was sent to that endpoint, or None when the router believed it had to wait for a start
  there or the endpoint was ``loaded()`` when it was sent (the gateway's ``Attempts``: a slot's wait is the load
  term's to count, not the answer time's). Each backend's
  ``capacity`` is ``SLOTS``, one block's (the config's ``concurrency``, per block); every reading also gives
  ``observe_blocks()`` the blocks each endpoint has up and serving (what a Globus Compute endpoint status counts
  as its managers), so the load term divides by what the endpoint serves at once now.
* round robin: the model's endpoints in turn, whatever their state (a cold one starts and the request waits);
  the next on a failure.
* ALCF's old order: model running > queued (or starting) > endpoint online with free nodes > online > the first
  target (offline ones, in config order); the next on a failure.

Figures, for requests that arrive after a warm-up (the gateway has been in use: the first hours after everything
was cold say little of a day): mean, median, p95 and p99 time to first token of served requests (from arrival,
failed tries, connect timeouts and start waits included), p95 with failed requests counted as ``MAX_WAIT_S`` (so
a policy cannot look fast by failing the slow ones), the share of requests served hot (the endpoint that answered
had a block up when the request was sent there), failed requests, failovers, starts (blocks asked) and node-hours
(blocks on nodes, loading included, over the whole run).

Also, for the interactive requests to a model while a batch on it runs, their p95; each batch's completion (from
its submission to its last line's end, mean); and the prefix hit rate (batch lines included).

Not modelled: walltime limits of blocks, preemption, conversations' growing prefixes, the network between
gateway and endpoint (tens of ms, nothing next to the figures compared), and a gateway shared by other users.
The baselines have no admission: each endpoint queues what it is sent, in order.

Run ``python bench/federation_sim.py`` (a day after a 6 h warm-up, about 9 s) or ``--quick`` (2 h, about a
second); ``--seed N``; ``--json PATH`` also writes the figures; ``--scale-out JSON`` (repeatable) adds this router
with other ``defaults.scale_out`` settings, to see what p95 each buys with how many node-hours. The exit status is
0 when this router's p95 time to first token, with the default config, is below both baselines', 1 when not.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError

from first_jupyter.config import Admission as AdmissionSettings
from first_jupyter.config import BatchDefaults, ScaleOut
from first_jupyter.gateway.admission import Admission, Holder, Priority
from first_jupyter.gateway.backends.base import Backend
from first_jupyter.gateway.router import WAITING_STATES, Prefix, Router, Target, prefix_of
from first_jupyter.protocol import Capability, OpenAIError

HOUR_S = 3600.0
DAY_S = 24 * HOUR_S
READING_S = 30.0
"""How often the gateway reads every endpoint's status (the gateway's ``STATUS_PERIOD_S``)."""
SCHEDULE_S = (15.0, 90.0)
"""The batch scheduler's cycle: how long a job waits for a node that is free."""
LOAD_S = (600.0, 900.0)
"""Loading the engine and the model's weights once a block holds its node."""
START_FAILURE = 0.03
IDLE_S = 1800.0
"""A block with nothing to do for this long is released (the endpoint's ``max_idletime``)."""
SLOTS = 32
"""Sequences a block serves at once; requests beyond wait on the endpoint for a slot."""
CONNECT_TIMEOUT_S = 5.0
MAX_WAIT_S = 1800.0
"""A client that has no first token after this gives up: the request failed."""
PRIOR_START_S = 600.0
"""What the router assumes a cold start takes before it has seen one: the config's default ``expected_start``."""
OUTAGE_EVERY_S = DAY_S
OUTAGE_S = (300.0, 1800.0)
LOAD_SLOT_S = 1800.0
"""Other users' share of a cluster changes every this many seconds."""
MODELS = 20
ZIPF = 1.1
THREE_CLUSTERS = 5
"""The most used models are served by three clusters, the others by two."""
SINGLES_PER_H = 1200.0
BURSTS_PER_H = 1.5
BURST_SIZE = (50, 300)
BURST_SPREAD_S = 30.0
DIURNAL = 0.7
"""Rates swing by this share around their mean over a day, peaking at ``PEAK_HOUR``."""
PEAK_HOUR = 14.0
BATCHES_PER_H = 0.4
"""Batches (a file of lines sent by the gateway's batch runner), diurnal too: about ten a day."""
BATCH_LINES = (1000, 5000)
BATCH_IN_FLIGHT = 1024
"""The runner's window: the model's capacity as the gateway knows it (``SLOTS`` per block up at each of its
endpoints, one block's where none is), at most this (``defaults.batch.max_in_flight``)."""
PREFIXES = 200
"""System prompts per model among single requests (an application's, a notebook's), drawn by Zipf; a burst and a
batch each have one of their own."""
PREFIX_SAVES = 0.6
"""The share of a request's prefill a block saves when its prefix cache holds the request's system prompt."""
BLOCK_PREFIXES = 32
"""System prompts a block's prefix cache holds (the least recently used evicted)."""
PREFILL_S = (0.15, 0.6)
"""A model's time to first token on an idle block, by its size; each request's varies around it."""
GENERATE_MEDIAN_S = 10.0

POLICIES = ("router", "router_peak", "router_predicted", "round_robin", "alcf_order")
BASELINES = ("round_robin", "alcf_order")
LABELS = {"router": "this router (keep_hot: all, the default)", "router_peak": "this router (keep_hot: peak)",
          "router_predicted": "this router (keep_hot: predicted)",
          "round_robin": "round robin", "alcf_order": "ALCF old order"}


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    name: str
    nodes: int
    busy: float
    """The mean share of nodes other users hold."""
    swing: float
    """How much that share rises in the afternoon and falls at night."""
    queue_s: float
    """The mean wait in the batch queue for a node when none is free."""
    max_blocks: int


CLUSTERS = (
    ClusterSpec("alpha", nodes=16, busy=0.45, swing=0.2, queue_s=360.0, max_blocks=2),
    ClusterSpec("beta", nodes=48, busy=0.8, swing=0.12, queue_s=1200.0, max_blocks=2),
    ClusterSpec("gamma", nodes=96, busy=0.9, swing=0.06, queue_s=2400.0, max_blocks=3),
    ClusterSpec("delta", nodes=24, busy=0.6, swing=0.25, queue_s=600.0, max_blocks=2),
)


@dataclass(frozen=True, slots=True)
class Settings:
    start_hour: float
    """The time of day at which the simulation starts, everything cold."""
    warmup_h: float
    hours: float
    """How long requests are measured after the warm-up."""


FULL = Settings(start_hour=18.0, warmup_h=6.0, hours=24.0)
QUICK = Settings(start_hour=9.0, warmup_h=1.0, hours=2.0)


@dataclass(frozen=True, slots=True)
class Call:
    """A request of the trace."""

    at: float
    model: str
    prefill_s: float
    generate_s: float
    prefix: int = 0
    """Which system prompt the request opens with (a block's prefix cache holds some)."""
    batch: int | None = None
    """The batch (index into ``Scenario.batches``) of a batch line; ``at`` is then the batch's submission."""


@dataclass(frozen=True, slots=True)
class BatchJob:
    """A batch: its lines, sent by the runner from ``at`` on, a window of them in flight."""

    at: float
    model: str
    lines: tuple[Call, ...]


@dataclass(frozen=True, slots=True)
class Scenario:
    """Everything that is the same for every policy: hardware, other users, outages, traffic."""

    seed: int
    clusters: tuple[ClusterSpec, ...]
    served: dict[str, tuple[str, ...]]
    """Model → the clusters serving it, in config order."""
    calls: tuple[Call, ...]
    measured_from: float
    """Requests that arrive earlier warm the gateway up and are not counted."""
    busy: dict[str, tuple[float, ...]] = field(default_factory=dict)
    """Cluster → other users' share of its nodes per ``LOAD_SLOT_S``; none given: nobody else."""
    outages: dict[tuple[str, str], tuple[tuple[float, float], ...]] = field(default_factory=dict)
    """(cluster, model) → (down at, up at)."""
    batches: tuple[BatchJob, ...] = ()
    start_hour: float = 0.0
    """The time of day at 0 s."""


def _diurnal(t: float, start_hour: float) -> float:
    hour = (start_hour + t / HOUR_S) % 24
    return 1 + DIURNAL * math.cos(2 * math.pi * (hour - PEAK_HOUR) / 24)


def _arrivals(rng: random.Random, per_h: float, until: float, start_hour: float) -> list[float]:
    """A Poisson process whose rate follows the day, by thinning one at the peak rate."""
    peak = per_h * (1 + DIURNAL) / HOUR_S
    times: list[float] = []
    t = 0.0
    if peak <= 0:
        return times
    while True:
        t += rng.expovariate(peak)
        if t >= until:
            return times
        if rng.random() * (1 + DIURNAL) < _diurnal(t, start_hour):
            times.append(t)


def build_scenario(seed: int, settings: Settings) -> Scenario:
    """The hardware, the other users, the outages and the trace of one run."""
    until = (settings.warmup_h + settings.hours) * HOUR_S
    names = [f"model-{i:02d}" for i in range(1, MODELS + 1)]
    rng = random.Random(f"{seed}/catalog")
    cluster_names = [c.name for c in CLUSTERS]
    served = {m: tuple(rng.sample(cluster_names, 3 if i < THREE_CLUSTERS else 2)) for i, m in enumerate(names)}
    prefill = {m: rng.uniform(*PREFILL_S) for m in names}
    weights = [1 / (i + 1) ** ZIPF for i in range(MODELS)]

    rng = random.Random(f"{seed}/trace")

    def call(at: float, model: str, prefix: int, batch: int | None = None) -> Call:
        return Call(at, model, prefill[model] * rng.lognormvariate(0, 0.25),
                    rng.lognormvariate(math.log(GENERATE_MEDIAN_S), 0.8), prefix, batch)

    prompts = [1 / (i + 1) for i in range(PREFIXES)]
    calls = [call(t, rng.choices(names, weights)[0], rng.choices(range(PREFIXES), prompts)[0])
             for t in _arrivals(rng, SINGLES_PER_H, until, settings.start_hour)]
    for n, t in enumerate(_arrivals(rng, BURSTS_PER_H, until, settings.start_hour)):
        model = rng.choices(names, weights)[0]
        calls += [call(t + rng.uniform(0, BURST_SPREAD_S), model, PREFIXES + n)
                  for _ in range(rng.randint(*BURST_SIZE))]
    calls.sort(key=lambda c: c.at)
    rng = random.Random(f"{seed}/batches")
    batches: list[BatchJob] = []
    for t in _arrivals(rng, BATCHES_PER_H, until, settings.start_hour):
        model, prefix = rng.choices(names, weights)[0], -1 - len(batches)
        batches.append(BatchJob(t, model, tuple(call(t, model, prefix, len(batches))
                                                for _ in range(rng.randint(*BATCH_LINES)))))

    end = until + MAX_WAIT_S + 2 * IDLE_S  # the last requests and the blocks they leave behind
    busy = {}
    for spec in CLUSTERS:
        rng = random.Random(f"{seed}/busy/{spec.name}")
        shares, drift = [], 0.0
        for k in range(int(end // LOAD_SLOT_S) + 1):
            drift = 0.7 * drift + rng.gauss(0, 0.05)
            day = _diurnal(k * LOAD_SLOT_S, settings.start_hour) - 1  # -DIURNAL..DIURNAL
            shares.append(min(max(spec.busy + spec.swing * day / DIURNAL + drift, 0.0), 1.0))
        busy[spec.name] = tuple(shares)
    outages = {}
    for model, where in served.items():
        for cluster in where:
            rng = random.Random(f"{seed}/outages/{cluster}/{model}")
            spans, t = [], 0.0
            while (t := t + rng.expovariate(1 / OUTAGE_EVERY_S)) < until:
                spans.append((t, t + rng.uniform(*OUTAGE_S)))
                t = spans[-1][1]
            outages[cluster, model] = tuple(spans)
    return Scenario(seed, CLUSTERS, served, tuple(calls), settings.warmup_h * HOUR_S, busy, outages, tuple(batches),
                    settings.start_hour)


# -- the world: clusters, endpoints, blocks ---------------------------------------------------------------------


class Clock:
    """Virtual time and the events due in it."""

    def __init__(self) -> None:
        self.t = 0.0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0

    def now(self) -> float:
        return self.t

    def at(self, t: float, action: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (t, self._seq, action, args))

    def run(self) -> None:
        while self._queue:
            self.t, _, action, args = heapq.heappop(self._queue)
            action(*args)


@dataclass(slots=True, eq=False)
class Request:
    call: Call
    plan: list[Endpoint] = field(default_factory=list)
    tried: int = 0
    attempt: int = 0
    """Counts sends, so that an event meant for an earlier try is recognised as stale."""
    endpoint: Endpoint | None = None
    hot_at_send: bool = False
    first_token_at: float | None = None
    failure: str | None = None
    failovers: int = 0
    prefix_hit: bool = False
    """The block that gave the first token held the request's system prompt in its prefix cache."""
    ended_at: float | None = None

    @property
    def open(self) -> bool:
        return self.first_token_at is None and self.failure is None


@dataclass(slots=True, eq=False)
class Block:
    holds_node: bool = False
    on_node_at: float | None = None
    active: int = 0
    idle_turn: int = 0
    """Bumped whenever the block gets work, so that a release planned while it was idle is recognised as stale."""
    gone: bool = False
    fails: bool = False
    load_s: float = 0.0
    prompts: OrderedDict[int, None] = field(default_factory=OrderedDict)
    """The system prompts its prefix cache holds, the least recently used first (``BLOCK_PREFIXES``)."""

    def prefill_s(self, call: Call) -> float:
        """The prefill of ``call`` here (less on a prefix hit, more with the slots in use), its prompt now cached."""
        hit = call.prefix in self.prompts
        if hit:
            self.prompts.move_to_end(call.prefix)
        else:
            self.prompts[call.prefix] = None
            if len(self.prompts) > BLOCK_PREFIXES:
                self.prompts.popitem(last=False)
        return call.prefill_s * (1 - PREFIX_SAVES * hit) * (1 + (self.active - 1) / SLOTS)


class Cluster:
    def __init__(self, spec: ClusterSpec, busy: tuple[float, ...]) -> None:
        self.spec = spec
        self.busy = busy or (0.0,)
        self.held = 0
        """Nodes held (or granted) by the endpoints' blocks."""

    def free(self, t: float) -> int:
        share = self.busy[min(int(t // LOAD_SLOT_S), len(self.busy) - 1)]
        return int(self.spec.nodes * (1 - share)) - self.held


class Endpoint:
    """One model's Globus Compute endpoint on one cluster: its blocks, the requests waiting, its outages."""

    def __init__(self, world: World, cluster: Cluster, model: str) -> None:
        self.world = world
        self.clock = world.clock
        self.cluster = cluster
        self.model = model
        self.name = f"{cluster.spec.name}/{model}"
        self.rng = random.Random(f"{world.scenario.seed}/starts/{self.name}")
        self.blocks: list[Block] = []
        self.pending: list[Block] = []
        self.waiting: deque[Request] = deque()
        self.prefilling: set[Request] = set()
        self.generating: set[Request] = set()
        self.warming: list[Callable[[str | None], None]] = []
        """Told when the model answers here (None) or cannot start (why): the gateway's ``warm()`` calls."""
        self.down = False

    def state(self) -> str:
        """What its status says: the states the router knows."""
        if self.down:
            return "offline"
        if self.blocks:
            return "hot"
        if any(b.on_node_at is not None for b in self.pending):
            return "starting"
        return "queued" if self.pending else "cold"

    def submit(self, req: Request) -> None:
        if self.down:
            self.clock.at(self.clock.t + CONNECT_TIMEOUT_S, self._unreachable, req, req.attempt)
            return
        self.waiting.append(req)
        self._dispatch()
        self._scale()

    def warm(self, done: Callable[[str | None], None]) -> None:
        """Start the model if it is not running; ``done`` once it answers, or with why it cannot start."""
        if self.down:
            self.clock.at(self.clock.t + CONNECT_TIMEOUT_S, done, "connect timeout")
        elif self.blocks:
            done(None)
        else:
            self.warming.append(done)
            if not self.pending:
                self._ask_block()

    def withdraw(self, req: Request) -> None:
        """The client gave up on ``req``."""
        if req in self.waiting:
            self.waiting.remove(req)
        self.prefilling.discard(req)

    def _unreachable(self, req: Request, attempt: int) -> None:
        if req.open and req.attempt == attempt:
            self.world.gateway.refused(req, self, "connect timeout")

    def _dispatch(self) -> None:
        while self.waiting:
            block = min(self.blocks, key=lambda b: b.active, default=None)
            if block is None or block.active >= SLOTS:
                return
            req = self.waiting.popleft()
            block.active += 1
            block.idle_turn += 1
            self.prefilling.add(req)
            req.prefix_hit = req.call.prefix in block.prompts
            self.clock.at(self.clock.t + block.prefill_s(req.call), self._first_token, req, req.attempt, block)

    def _scale(self) -> None:
        """Ask for a block when requests wait and none is on its way (parsl's scale-out, one block at a time)."""
        if self.waiting and not self.pending and len(self.blocks) < self.cluster.spec.max_blocks:
            self._ask_block()

    def _ask_block(self) -> None:
        now = self.clock.t
        block = Block()
        self.pending.append(block)
        self.world.starts += 1
        # the k-th start here draws the same numbers under every policy: three draws, whichever branch
        free = self.cluster.free(now) > 0
        queue_s = self.rng.uniform(*SCHEDULE_S) if free else self.rng.expovariate(1 / self.cluster.spec.queue_s)
        block.load_s = self.rng.uniform(*LOAD_S)
        block.fails = self.rng.random() < START_FAILURE
        if free:
            block.holds_node = True
            self.cluster.held += 1
        self.clock.at(now + queue_s, self._on_node, block)

    def _on_node(self, block: Block) -> None:
        if block.gone:
            return
        block.on_node_at = self.clock.t
        if not block.holds_node:
            block.holds_node = True
            self.cluster.held += 1
        self.clock.at(self.clock.t + block.load_s, self._loaded, block)

    def _loaded(self, block: Block) -> None:
        if block.gone:
            return
        self.pending.remove(block)
        if block.fails:
            self._release(block)
            if not self.blocks and not self.pending:
                self._fail_waiting("the engine failed to start")
            return
        self.blocks.append(block)
        warming, self.warming = self.warming, []
        for done in warming:
            done(None)
        self._dispatch()
        self._scale()
        self._settle(block)

    def _first_token(self, req: Request, attempt: int, block: Block) -> None:
        if block.gone:
            return  # lost in an outage, which already failed the request
        self.prefilling.discard(req)
        if not req.open or req.attempt != attempt:  # the client gave up meanwhile
            block.active -= 1
            self._dispatch()
            self._settle(block)
            return
        self.generating.add(req)
        self.world.gateway.first_token(req, self)
        self.clock.at(self.clock.t + req.call.generate_s, self._finished, req, block)

    def _finished(self, req: Request, block: Block) -> None:
        if block.gone:
            return  # broken by an outage, already told
        self.generating.discard(req)
        block.active -= 1
        self.world.gateway.finished(req, self)
        self.world.ended(req)
        self._dispatch()
        self._settle(block)

    def _settle(self, block: Block) -> None:
        if block.active == 0 and not self.waiting and not block.gone:
            block.idle_turn += 1
            self.clock.at(self.clock.t + IDLE_S, self._idle, block, block.idle_turn)

    def _idle(self, block: Block, turn: int) -> None:
        if not block.gone and block.idle_turn == turn and block.active == 0:
            self.blocks.remove(block)
            self._release(block)

    def _release(self, block: Block) -> None:
        block.gone = True
        if block.holds_node:
            self.cluster.held -= 1
        if block.on_node_at is not None:
            self.world.node_seconds += self.clock.t - block.on_node_at

    def _fail_waiting(self, reason: str) -> None:
        refused = [*self.waiting, *self.prefilling]
        warming, self.warming = self.warming, []
        self.waiting.clear()
        self.prefilling.clear()
        for done in warming:
            done(reason)
        for req in refused:
            self.world.gateway.refused(req, self, reason)

    def go_down(self) -> None:
        self.down = True
        for block in [*self.blocks, *self.pending]:
            self._release(block)
        self.blocks.clear()
        self.pending.clear()
        broken = list(self.generating)
        self.generating.clear()
        for req in broken:
            self.world.gateway.broken(req, self)
            self.world.ended(req)
        self._fail_waiting("endpoint down")

    def come_up(self) -> None:
        self.down = False


# -- the gateways: one per policy, around the same endpoints ----------------------------------------------------


class Gateway:
    """What every policy shares: a request goes to the candidates of its plan in turn until one gives it a first
    token; a failure before the first byte moves it on; running out of candidates or of time fails it."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.clock = world.clock

    def order(self, model: str, prefix: int = 0) -> list[Endpoint]:
        """The endpoints to try for a request to ``model`` opening with system prompt ``prefix``, in turn."""
        raise NotImplementedError

    def reading(self) -> None:
        """The status of every endpoint, read now."""

    def arrive(self, req: Request) -> None:
        req.plan = self.order(req.call.model, req.call.prefix)
        self.clock.at(req.call.at + MAX_WAIT_S, self._deadline, req)
        self._send_next(req, "no candidate")

    def _send_next(self, req: Request, reason: str) -> None:
        if req.tried >= len(req.plan):
            req.failure = reason
            self.world.ended(req)
            return
        endpoint = req.plan[req.tried]
        req.tried += 1
        req.attempt += 1
        req.endpoint = endpoint
        self.admit(req, endpoint)

    def admit(self, req: Request, endpoint: Endpoint) -> None:
        """``req`` is for ``endpoint`` now: sent at once, unless the policy holds it for a slot first."""
        self.send(req, endpoint)

    def send(self, req: Request, endpoint: Endpoint) -> None:
        req.hot_at_send = bool(endpoint.blocks) and not endpoint.down
        self.sending(req, endpoint)
        endpoint.submit(req)

    def refused(self, req: Request, endpoint: Endpoint, reason: str) -> None:
        """A failure before the first byte: the next candidate."""
        self.failed_at(req, endpoint, reason)
        if req.tried < len(req.plan):
            req.failovers += 1
        self._send_next(req, reason)

    def _deadline(self, req: Request) -> None:
        if req.open:
            if req.endpoint is not None:
                req.endpoint.withdraw(req)
                self.abandoned(req, req.endpoint)
            req.failure = "no first token in time"
            self.world.ended(req)

    # what the policy hears of each try; only this router listens

    def sending(self, req: Request, endpoint: Endpoint) -> None:
        """``req`` is about to be sent to ``endpoint``."""

    def first_token(self, req: Request, endpoint: Endpoint) -> None:
        req.first_token_at = self.clock.t

    def finished(self, req: Request, endpoint: Endpoint) -> None:
        """The answer is complete."""

    def broken(self, req: Request, endpoint: Endpoint) -> None:
        """A stream under way broke (its first token was already counted)."""

    def failed_at(self, req: Request, endpoint: Endpoint, reason: str) -> None:
        """A try failed before its first byte."""

    def abandoned(self, req: Request, endpoint: Endpoint) -> None:
        """The client gave up while ``req`` was at ``endpoint``."""


def user_of(call: Call) -> str:
    """Whose request ``call`` is, for the admission's fair order: a batch's owner, a burst's script, or the
    notebook (or application) of a single request, known by its system prompt."""
    if call.batch is not None:
        return f"batch-{call.batch}"
    return f"script-{call.prefix}" if call.prefix >= PREFIXES else f"notebook-{call.prefix}"


class SimGrant:
    """How a request waiting for a slot hears it has one (``admission.Grant``): on virtual time, not a loop."""

    def __init__(self, granted: Callable[[], None]) -> None:
        self._granted = granted
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: None, /) -> None:
        self._done = True
        self._granted()

    def cancel(self) -> bool:
        self._done = True
        return True


@dataclass(slots=True)
class SimBackend:
    """What the router reads of a backend; the calls a real one answers are the simulation's to make."""

    cluster: str
    name: str
    capacity: int
    """Requests one block's engine serves at once: ``SLOTS`` (the config's ``concurrency``, per block); the router
    multiplies it by the blocks a status reading counts."""
    max_blocks: int
    """The cluster's ``max_blocks``."""
    kind: str = "globus_compute"
    start_s: float = PRIOR_START_S

    def supports(self, model_id: str, capability: Capability) -> bool:
        return capability is Capability.chat


class RouterGateway(Gateway):
    """This router: the real ``Router``, fed as the gateway (``first_jupyter.gateway.core``) feeds it."""

    def __init__(self, world: World, scale_out: ScaleOut | None = None) -> None:
        super().__init__(world)
        self.backends = {ep: SimBackend(ep.cluster.spec.name, ep.model, SLOTS,
                                            ep.cluster.spec.max_blocks) for ep in world.endpoints.values()}
        served = {m: [f"{c}/{m}" for c in where] for m, where in world.scenario.served.items()}
        # the router reads only cluster, name, kind, capacity, start_s and supports() of a backend
        self.router = Router(cast("list[Backend]", list(self.backends.values())), served, scale_out,
                             clock=self.clock.now, day_offset_s=world.scenario.start_hour * HOUR_S)
        self.openings: dict[tuple[str, int], Prefix | None] = {}
        self.target: dict[Endpoint, Target] = {}
        for targets in self.router.catalog.values():
            for t in targets:
                self.target[world.endpoints[t.cluster, t.model_id]] = t
        self.starting: set[Endpoint] = set()
        """Where this gateway asked a start that has not answered yet (one at a time per endpoint)."""
        self.admission = Admission(self.router, AdmissionSettings(), BatchDefaults().interactive_ttft_target,
                                   clock=self.clock.now)
        self.slots: dict[Request, Holder] = {}
        """Requests holding a slot of the endpoint they were sent to (``Admission.began``), by whose slot it is."""
        self.queued: dict[Request, tuple[Holder, SimGrant]] = {}
        """Requests waiting at the gateway for a slot of their endpoint."""
        self.sent_cold: set[Request] = set()
        """Requests sent where the router believed the model had to start (the gateway's stream's opening)."""
        self.sent: dict[Request, tuple[float, bool]] = {}
        """Request → when it was last sent, and whether its answer time says nothing of the engine's speed: the
        router then believed it had to wait for a start there, or the engine was loaded (the gateway's
        ``Attempts``)."""

    def order(self, model: str, prefix: int = 0) -> list[Endpoint]:
        opening = self.openings.get((model, prefix))
        if opening is None:  # the request's messages as the gateway hashes them: its system prompt first
            opening = self.openings[model, prefix] = prefix_of(model, {"messages": [
                {"role": "system", "content": f"system prompt {prefix}"}]})
        targets = self.router.candidates(model, Capability.chat, opening)
        for target in self.router.to_start(targets):  # the best when it must start; another ahead of need
            self._start(target)
        return [self.world.endpoints[t.cluster, t.model_id] for t in targets]

    def _start(self, target: Target) -> None:
        endpoint = self.world.endpoints[target.cluster, target.model_id]
        if endpoint in self.starting:
            return  # joined, not repeated
        self.starting.add(endpoint)
        whole = self.router.start_asked(target)
        began = self.clock.t

        def done(failure: str | None) -> None:
            self.starting.discard(endpoint)
            self.router.start_ended(target, self.clock.t - began, whole, failure)

        endpoint.warm(done)

    def reading(self) -> None:
        # the gateway's ``_observe``: each model's state, then the blocks connected (a Globus Compute endpoint
        # status's managers), which make the endpoint's capacity
        for ep, backend in self.backends.items():
            self.router.observe_state(backend, ep.model, ep.state())
        for ep, backend in self.backends.items():
            self.router.observe_blocks(backend, len(ep.blocks))

    def admit(self, req: Request, endpoint: Endpoint) -> None:
        # the gateway's ``_first_answer``: a failover to one that must start the model starts it (the best was
        # started in order()), then the request takes a slot there (``Admission.began``) before it is sent
        target = self.target[endpoint]
        waits = self.router.state_of(target) in WAITING_STATES
        if waits:
            self._start(target)
        holder = (Priority.batch if req.call.batch is not None else Priority.interactive, user_of(req.call))
        grant = SimGrant(lambda: self.clock.at(self.clock.t, self._granted, req, endpoint, req.attempt))
        try:
            taken = self.admission.enter(target, holder, grant)
        except OpenAIError as exc:  # its queue is full: the client has the 429
            req.failure = exc.message
            self.world.ended(req)
            return
        if taken:
            self.slots[req] = holder
            self.send(req, endpoint)
        else:
            self.queued[req] = (holder, grant)

    def _granted(self, req: Request, endpoint: Endpoint, attempt: int) -> None:
        """A slot freed for ``req`` (counted taken as it was granted): it is sent, or, gone meanwhile, gives the
        slot back."""
        holder, _ = self.queued.pop(req)
        target = self.target[endpoint]
        self.router.began(target, waited=True)
        self.slots[req] = holder
        if req.open and req.attempt == attempt:
            self.send(req, endpoint)
        else:
            self._release(req, endpoint)

    def _release(self, req: Request, endpoint: Endpoint) -> None:
        """``req`` is over at ``endpoint``: its slot goes to the next in line, or it leaves the queue."""
        target = self.target[endpoint]
        holder = self.slots.pop(req, None)
        if holder is not None:
            self.admission.ended(target, holder)
        elif req in self.queued and not self.queued[req][1].done():
            holder, grant = self.queued.pop(req)
            self.admission.withdraw(target, holder, grant)

    def sending(self, req: Request, endpoint: Endpoint) -> None:
        target = self.target[endpoint]
        waits = self.router.state_of(target) in WAITING_STATES
        self.sent[req] = (self.clock.t, waits or self.router.health_of(target).loaded())  # before it counts
        if waits:
            self.sent_cold.add(req)

    def first_token(self, req: Request, endpoint: Endpoint) -> None:
        super().first_token(req, endpoint)
        if req.call.batch is None and req not in self.sent_cold:
            # the gateway's stream: an interactive first token that waited for no start steers batch concurrency
            self.admission.first_token(self.target[endpoint], self.clock.t - self.sent[req][0])

    def finished(self, req: Request, endpoint: Endpoint) -> None:
        # a stream's end (the gateway's ``GatewayStream.close``): its time to first token from when it was sent
        # there, none when it waited for a start or was sent into a loaded engine
        sent_at, waited = self.sent.pop(req)
        self.sent_cold.discard(req)
        assert req.first_token_at is not None
        self._release(req, endpoint)
        self.router.succeeded(self.target[endpoint], None if waited else req.first_token_at - sent_at)

    def broken(self, req: Request, endpoint: Endpoint) -> None:
        self.sent.pop(req, None)
        self.sent_cold.discard(req)
        self._release(req, endpoint)
        self.router.failed(self.target[endpoint], "stream broken")

    def failed_at(self, req: Request, endpoint: Endpoint, reason: str) -> None:
        self.sent.pop(req, None)
        self.sent_cold.discard(req)
        self._release(req, endpoint)
        self.router.failed(self.target[endpoint], reason)

    def abandoned(self, req: Request, endpoint: Endpoint) -> None:
        self.sent.pop(req, None)
        self.sent_cold.discard(req)
        self._release(req, endpoint)


class RoundRobinGateway(Gateway):
    """Each model's endpoints in turn, whatever their state."""

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.turn: dict[str, int] = {}

    def order(self, model: str, prefix: int = 0) -> list[Endpoint]:
        endpoints = self.world.served[model]
        turn = self.turn.get(model, 0)
        self.turn[model] = turn + 1
        first = turn % len(endpoints)
        return endpoints[first:] + endpoints[:first]


class AlcfGateway(Gateway):
    """ALCF's old order: model running > queued > endpoint online with free nodes > online > the first target."""

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.states: dict[Endpoint, str] = {}
        self.free: dict[str, bool] = {}

    def reading(self) -> None:
        for ep in self.world.endpoints.values():
            self.states[ep] = ep.state()
        for cluster in self.world.clusters.values():
            self.free[cluster.spec.name] = cluster.free(self.clock.t) > 0

    def rank(self, endpoint: Endpoint) -> int:
        state = self.states.get(endpoint, "offline")
        if state == "hot":
            return 0
        if state in ("queued", "starting"):
            return 1
        if state == "cold":
            return 2 if self.free.get(endpoint.cluster.spec.name) else 3
        return 4

    def order(self, model: str, prefix: int = 0) -> list[Endpoint]:
        return sorted(self.world.served[model], key=self.rank)  # stable: config order within a rank


GATEWAYS: dict[str, Callable[[World], Gateway]] = {
    "router": RouterGateway, "router_peak": lambda world: RouterGateway(world, ScaleOut(keep_hot="peak")),
    "router_predicted": lambda world: RouterGateway(world, ScaleOut(keep_hot="predicted")),
    "round_robin": RoundRobinGateway, "alcf_order": AlcfGateway}


class World:
    """One policy's run over a scenario."""

    def __init__(self, scenario: Scenario, policy: str, scale_out: ScaleOut | None = None) -> None:
        """``scale_out``: this router with these settings (``--scale-out``) instead of ``policy``."""
        self.scenario = scenario
        self.clock = Clock()
        self.clusters = {c.name: Cluster(c, scenario.busy.get(c.name, ())) for c in scenario.clusters}
        self.endpoints: dict[tuple[str, str], Endpoint] = {}
        for model, where in scenario.served.items():
            for cluster in where:
                self.endpoints[cluster, model] = Endpoint(self, self.clusters[cluster], model)
        self.served = {m: [self.endpoints[c, m] for c in where] for m, where in scenario.served.items()}
        self.starts = 0
        self.node_seconds = 0.0
        self.gateway = GATEWAYS[policy](self) if scale_out is None else RouterGateway(self, scale_out)
        self.requests = [Request(call) for call in scenario.calls]
        self.batches = [BatchRun(self, job) for job in scenario.batches]

    def capacity(self, model: str) -> int:
        """What the gateway knows the model's endpoints serve at once (``Gateway.capacity``): ``SLOTS`` per block
        up at each, one block's where none is."""
        return sum(SLOTS * max(len(ep.blocks), 1) for ep in self.served[model])

    def ended(self, req: Request) -> None:
        """``req`` is over (answered, broken, or failed): a batch line frees its slot in the runner's window."""
        if req.ended_at is None:
            req.ended_at = self.clock.t
            if req.call.batch is not None:
                self.batches[req.call.batch].line_ended()

    def run(self) -> list[Request]:
        last = self.scenario.calls[-1].at + MAX_WAIT_S if self.scenario.calls else 0.0
        self.clock.at(0.0, self._read, last)  # first: a request at 0 finds the states read
        for req in self.requests:
            self.clock.at(req.call.at, self.gateway.arrive, req)
        for run in self.batches:
            self.clock.at(run.job.at, run.pump)
        for key, spans in self.scenario.outages.items():
            for down, up in spans:
                self.clock.at(down, self.endpoints[key].go_down)
                self.clock.at(up, self.endpoints[key].come_up)
        self.clock.run()
        return self.requests

    def _read(self, until: float) -> None:
        self.gateway.reading()
        if self.clock.t + READING_S <= until or any(run.done_at is None for run in self.batches):
            self.clock.at(self.clock.t + READING_S, self._read, until)


class BatchRun:
    """The gateway's batch runner (``batch/runner.py``) on one batch: its lines in order, at most the model's
    capacity in flight (``BATCH_IN_FLIGHT`` at most), each sent through the policy as any request."""

    def __init__(self, world: World, job: BatchJob) -> None:
        self.world = world
        self.job = job
        self.left = deque(job.lines)
        self.in_flight = 0
        self.lines: list[Request] = []
        self.done_at: float | None = None

    def pump(self) -> None:
        world = self.world
        window = min(world.capacity(self.job.model), BATCH_IN_FLIGHT)
        while self.left and self.in_flight < window:
            call = self.left.popleft()
            req = Request(Call(world.clock.t, call.model, call.prefill_s, call.generate_s, call.prefix, call.batch))
            self.lines.append(req)
            self.in_flight += 1
            world.gateway.arrive(req)

    def line_ended(self) -> None:
        self.in_flight -= 1
        if self.left:
            self.world.clock.at(self.world.clock.t, self.pump)  # after the event that ended it
        elif not self.in_flight:
            self.done_at = self.world.clock.t


def simulate(scenario: Scenario, policy: str, scale_out: ScaleOut | None = None) -> tuple[list[Request], World]:
    world = World(scenario, policy, scale_out)
    return world.run(), world


# -- figures ------------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: a value some request actually saw."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)] if ordered else math.nan


def figures(requests: list[Request], world: World) -> dict[str, Any]:
    """Times to first token are the interactive requests' (batch lines are not waited on by a person); the prefix
    hit rate counts batch lines too; a batch's completion is from its submission to its last line's end."""
    since = world.scenario.measured_from
    measured = [r for r in requests if r.call.at >= since]
    served = [r for r in measured if r.first_token_at is not None]
    ttft = [r.first_token_at - r.call.at for r in served if r.first_token_at is not None]
    with_failed = ttft + [MAX_WAIT_S] * (len(measured) - len(served))
    count = len(measured)
    runs = [run for run in world.batches if run.job.at >= since]
    running = [(run.job.model, run.job.at, run.done_at if run.done_at is not None else math.inf) for run in runs]
    during = [r.first_token_at - r.call.at for r in served if r.first_token_at is not None and any(
        model == r.call.model and began <= r.call.at < done for model, began, done in running)]
    answered = served + [line for run in runs for line in run.lines if line.first_token_at is not None]
    return {
        "requests": count,
        "served": len(served),
        "failed": count - len(served),
        "ttft_mean_s": statistics.fmean(ttft) if ttft else math.nan,
        "ttft_p50_s": percentile(ttft, 0.50),
        "ttft_p95_s": percentile(ttft, 0.95),
        "ttft_p99_s": percentile(ttft, 0.99),
        "ttft_p95_with_failed_s": percentile(with_failed, 0.95),
        "served_hot": sum(r.hot_at_send for r in served) / count if count else math.nan,
        "failovers": sum(r.failovers for r in measured),
        "starts": world.starts,
        "node_hours": world.node_seconds / HOUR_S,
        "during_batches": len(during),
        "ttft_p95_during_batches_s": percentile(during, 0.95),
        "batches": len(runs),
        "batch_lines_failed": sum(line.first_token_at is None for run in runs for line in run.lines),
        "batch_completion_mean_s": statistics.fmean(done - began for _, began, done in running) if runs else math.nan,
        "prefix_hit_rate": sum(r.prefix_hit for r in answered) / len(answered) if answered else math.nan,
    }


def scale_out_label(scale_out: ScaleOut) -> str:
    said = ", ".join(f"{key}: {value}" for key, value in scale_out.model_dump(exclude_unset=True).items())
    return f"this router ({said or 'the default'})"


def run_all(seed: int, settings: Settings, more: Sequence[ScaleOut] = ()) -> dict[str, Any]:
    """Every policy, and this router once more with each of ``more``'s settings."""
    scenario = build_scenario(seed, settings)
    policies = {name: figures(*simulate(scenario, name)) for name in POLICIES}
    labels = dict(LABELS)
    for n, scale_out in enumerate(more, 1):
        policies[f"router_{n}"] = figures(*simulate(scenario, "router", scale_out))
        labels[f"router_{n}"] = scale_out_label(scale_out)
    alcf = policies["alcf_order"]["node_hours"]
    mine = policies["router"]
    ratios = {name: {"p95": policies[name]["ttft_p95_s"] / mine["ttft_p95_s"],
                     "mean": policies[name]["ttft_mean_s"] / mine["ttft_mean_s"],
                     "node_hours": policies[name]["node_hours"] / mine["node_hours"],
                     "p95_during_batches": policies[name]["ttft_p95_during_batches_s"]
                     / mine["ttft_p95_during_batches_s"],
                     "batch_completion": policies[name]["batch_completion_mean_s"] / mine["batch_completion_mean_s"],
                     "prefix_hit_rate": policies[name]["prefix_hit_rate"] / mine["prefix_hit_rate"]}
              for name in BASELINES}
    return {"seed": seed, "settings": {"start_hour": settings.start_hour, "warmup_h": settings.warmup_h,
                                       "hours": settings.hours},
            "trace": {"requests": len(scenario.calls), "models": len(scenario.served),
                      "endpoints": sum(len(w) for w in scenario.served.values())},
            "policies": policies, "ratios": ratios, "labels": labels,
            "node_hours_of_alcf": {name: f["node_hours"] / alcf for name, f in policies.items()}}


def table(result: dict[str, Any]) -> str:
    head = ("policy", "requests", "failed", "mean TTFT s", "p50 s", "p95 s", "p99 s", "p95 w/ failed s",
            "served hot", "failovers", "starts", "node-h", "p95 during batches s", "batch completion min",
            "prefix hits")
    rows = [head]
    for name, f in result["policies"].items():
        rows.append((result["labels"][name], str(f["requests"]), str(f["failed"]), f"{f['ttft_mean_s']:.1f}",
                     f"{f['ttft_p50_s']:.2f}", f"{f['ttft_p95_s']:.1f}", f"{f['ttft_p99_s']:.1f}",
                     f"{f['ttft_p95_with_failed_s']:.1f}", f"{f['served_hot']:.1%}", str(f["failovers"]),
                     str(f["starts"]), f"{f['node_hours']:.0f}", f"{f['ttft_p95_during_batches_s']:.1f}",
                     f"{f['batch_completion_mean_s'] / 60:.1f}", f"{f['prefix_hit_rate']:.1%}"))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in head) + "|")
    for name, r in result["ratios"].items():
        lines.append(f"{LABELS[name]} / this router (default): p95 x{r['p95']:.2f}, mean x{r['mean']:.2f}, "
                     f"node-hours x{r['node_hours']:.2f}, p95 during batches x{r['p95_during_batches']:.2f}, "
                     f"batch completion x{r['batch_completion']:.2f}, prefix hits x{r['prefix_hit_rate']:.2f}")
    lines.append("node-hours against ALCF's old order's, with p95 time to first token: " + "; ".join(
        f"{result['labels'][name]} x{share:.2f} at {result['policies'][name]['ttft_p95_s']:.1f} s"
        for name, share in result["node_hours_of_alcf"].items() if name.startswith("router")))
    return "\n".join(lines)


def router_ahead(result: dict[str, Any]) -> bool:
    """The acceptance: this router's p95 time to first token below both baselines' on the same hardware."""
    return all(r["p95"] > 1 for r in result["ratios"].values())


def _scale_out(text: str) -> ScaleOut:
    try:
        return ScaleOut.model_validate_json(text)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise argparse.ArgumentTypeError(f"{text!r} is not defaults.scale_out settings: {where + ': ' if where else ''}"
                                         f"{error['msg']} (JSON, e.g. {{\"keep_hot\": \"peak\"}})") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="2 h after a 1 h warm-up instead of a day after 6 h")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--scale-out", type=_scale_out, action="append", default=[],
                        metavar="JSON", help='this router once more with these defaults.scale_out settings, e.g. '
                                             '\'{"keep_hot": "peak", "peak_window": 14400}\' (repeatable)')
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    began = time.perf_counter()
    result = run_all(args.seed, settings, args.scale_out)
    result["wall_s"] = time.perf_counter() - began
    trace = result["trace"]
    print(f"{trace['requests']} requests to {trace['models']} models on {trace['endpoints']} endpoints of "
          f"{len(CLUSTERS)} clusters; measured: {settings.hours:g} h after a {settings.warmup_h:g} h warm-up "
          f"(seed {args.seed}, {result['wall_s']:.1f} s)")
    print(table(result))
    ahead = router_ahead(result)
    print("this router is ahead of both baselines on p95 time to first token" if ahead else
          "this router is NOT ahead of both baselines on p95 time to first token")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if ahead else 1


if __name__ == "__main__":
    sys.exit(main())
