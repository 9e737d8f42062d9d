"""Prometheus metrics for the gateway, correct when several processes serve one port.

``first serve`` runs several processes on one host behind one port, so a scrape of ``/metrics`` reaches one of
them at random; each process's own counters would be a random fraction of the truth. prometheus_client's
multiprocess mode solves this: every process writes its values into memory-mapped files in one directory
(``PROMETHEUS_MULTIPROC_DIR``), and whichever process answers the scrape merges all the files.

prometheus_client picks how it stores values (a plain float or a memory-mapped file) once, when it is first
imported, from that environment variable. Setting the variable later changes nothing, so ``first serve`` must set
it before anything imports prometheus_client (Jupyter server does, for one); ``GatewayMetrics`` refuses to start
when the variable is set but the import came first, rather than serve numbers from one process only. Without the
variable (one process: tests, the gateway embedded in a Jupyter server) the metrics are kept and rendered in
process.

The metrics live in a registry of their own, never prometheus_client's global ``REGISTRY``: Jupyter server
registers its own metrics there, and its name clashes or its per-process values must not leak into the gateway's
answer. One ``GatewayMetrics`` per process: in multiprocess mode two instances would write the same files and
overwrite each other's counts.

Labels are bounded on purpose: model (capped, see ``_MAX_MODELS``), cluster, endpoint and status come from the
configuration or HTTP; the requesting user never becomes a label, as every new user would be a new series forever.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)

from first_jupyter.api_types import AdmissionStatus
from first_jupyter.gateway.usage import UsageRecord
from first_jupyter.protocol import CLIENT_CLOSED

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

REFUSAL_REASONS = ("unauthenticated", "forbidden", "rate_limited", "bad_request")
ENDPOINT_STATES = ("running", "online", "starting", "queued", "stopped", "offline", "failed", "unknown")

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
"""Seconds, for both latency and time to first token: a cached short answer takes tens of milliseconds, a long
generation tens of seconds, and a model started on demand on a batch-scheduled cluster several minutes."""

_MAX_MODELS = 256
"""Distinct model labels one process keeps before it counts further models as ``_OTHER_MODEL``. Models served are
bounded by the configuration, but a request for a model that is served nowhere is still counted (as a 404) under
the name the client sent, and clients can send any number of names."""
_OTHER_MODEL = "(other)"


class _ModelSeries(NamedTuple):
    """The children of every per-model metric, looked up once per request instead of once per metric."""

    label: str
    prompt_tokens: Counter
    completion_tokens: Counter
    latency: Histogram
    ttft: Histogram
    in_flight: Gauge


class GatewayMetrics:
    """The gateway's metrics; multiprocess when ``PROMETHEUS_MULTIPROC_DIR`` is set (the directory must exist).

    Label children are cached in dicts keyed by label values: ``.labels()`` converts and checks every value and
    takes a lock, several times the cost of the increment itself, and ``observe`` runs on the event loop once per
    request.
    """

    def __init__(self) -> None:
        path = os.environ.get(MULTIPROC_ENV)
        if path and not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError(f"{MULTIPROC_ENV} was set after prometheus_client was imported, so each process "
                               "would keep its own values and /metrics would show one process's share; call "
                               "share_across_processes instead")
        self._registry = CollectorRegistry()
        if path:
            # the own registry still holds this process's metrics, but the answer must merge every process's files
            self._exposed = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._exposed, path)
        else:
            self._exposed = self._registry
        registry = self._registry
        self._requests = Counter("first_requests_total", "Finished inference requests, by HTTP status (499: the "
                                 "client went away, counted here but not as an error)",
                                 ("model", "cluster", "status"), registry=registry)
        self._errors = Counter("first_request_errors_total", "Finished inference requests with an error status "
                               "(>= 400, except 499: a client that leaves is no failure of the gateway)",
                               ("model", "cluster", "status"), registry=registry)
        self._tokens = Counter("first_tokens_total", "Tokens reported by the engines, prompt or completion",
                               ("model", "kind"), registry=registry)
        self._latency = Histogram("first_request_latency_seconds", "Time from a request's arrival to its last byte",
                                  ("model",), buckets=_LATENCY_BUCKETS, registry=registry)
        self._ttft = Histogram("first_time_to_first_token_seconds", "Time from a streamed request's arrival to its "
                               "first token", ("model",), buckets=_LATENCY_BUCKETS, registry=registry)
        # livesum: the total across the processes that are alive; a dead process's requests are no longer in flight
        self._in_flight = Gauge("first_requests_in_flight", "Inference requests being served", ("model",),
                                multiprocess_mode="livesum", registry=registry)
        # mostrecent, not livemax: every process reports the endpoints on its own, so around a change of state
        # their reports disagree. The max over processes would then read 1 for both the old and the new state
        # until every process had reported again. mostrecent keeps, for each series, the latest write in any
        # process (the write time is stored beside the value), and a report sets all the states of an endpoint
        # together, so the newest report wins whole: one state at 1. Not livemostrecent: when the process that
        # reported last dies, its report is still the latest thing known.
        self._endpoint_state = Gauge("first_endpoint_state", "1 for the endpoint's current state, 0 for the others",
                                     ("cluster", "endpoint", "state"), multiprocess_mode="mostrecent",
                                     registry=registry)
        # livesum: each process routes its own requests and counts them; the sum over live processes is the gateway's
        self._prefix_routed = Gauge("first_prefix_routed", "Requests with an opening (system prompt, first messages) "
                                    "routed to the endpoint while its model had a choice", ("cluster", "endpoint"),
                                    multiprocess_mode="livesum", registry=registry)
        self._prefix_hits = Gauge("first_prefix_hits", "Of first_prefix_routed, those sent there because it was last "
                                  "sent part of their opening (its prefix cache holds it)", ("cluster", "endpoint"),
                                  multiprocess_mode="livesum", registry=registry)
        # livesum: each process has its own slots and queues (``gateway.admission``); the endpoint's are their sum
        self._slots = Gauge("first_admission_requests", "Requests holding (state=in_flight) or waiting for "
                            "(state=queued) an endpoint's slots, by class (interactive, batch)",
                            ("cluster", "endpoint", "class", "state"), multiprocess_mode="livesum", registry=registry)
        self._batch_concurrency = Gauge("first_batch_concurrency", "Batch requests an endpoint may have in flight, "
                                        "as the admission controller chose it (AIMD on interactive time to first "
                                        "token, less the slots kept for interactive traffic)",
                                        ("cluster", "endpoint"), multiprocess_mode="livesum", registry=registry)
        self.refreshers: list[Callable[[], None]] = []
        """Called before each scrape is rendered: values read from their owner then rather than kept up to date
        on every request (``app.make_app`` adds the admission's)."""
        refused = Counter("first_refused_total", "Requests refused before they reached the gateway", ("reason",),
                          registry=registry)
        # created now, so that every reason reads 0 rather than being absent until its first refusal
        self._refused = {reason: refused.labels(reason) for reason in REFUSAL_REASONS}
        self._models: dict[str, _ModelSeries] = {}
        self._by_status: dict[tuple[str, str, int], tuple[Counter, ...]] = {}
        self._endpoints: dict[tuple[str, str], tuple[Gauge, ...]] = {}

    def _series(self, model: str) -> _ModelSeries:
        """The per-model children on a miss in the ``_models`` cache, where the model cap is applied."""
        label = model if len(self._models) < _MAX_MODELS else _OTHER_MODEL
        series = self._models.get(label)
        if series is None:
            series = self._models[label] = _ModelSeries(
                label, self._tokens.labels(label, "prompt"), self._tokens.labels(label, "completion"),
                self._latency.labels(label), self._ttft.labels(label), self._in_flight.labels(label))
        return series

    def _status_counters(self, key: tuple[str, str, int]) -> tuple[Counter, ...]:
        """The counters one request with these labels increments: the request, and the error if it is one."""
        model, cluster, status = key
        counters: tuple[Counter, ...] = (self._requests.labels(model, cluster, str(status)),)
        if status >= 400 and status != CLIENT_CLOSED:
            counters += (self._errors.labels(model, cluster, str(status)),)
        self._by_status[key] = counters
        return counters

    def request_started(self, model: str) -> None:
        (self._models.get(model) or self._series(model)).in_flight.inc()

    def request_ended(self, model: str) -> None:
        (self._models.get(model) or self._series(model)).in_flight.dec()

    def observe(self, record: UsageRecord) -> None:
        """Count a finished request: on the event loop once per request, so lookups in dicts and increments only."""
        series = self._models.get(record.model) or self._series(record.model)
        key = (series.label, record.cluster, record.status)
        for counter in self._by_status.get(key) or self._status_counters(key):
            counter.inc()
        if record.prompt_tokens is not None:
            series.prompt_tokens.inc(record.prompt_tokens)
        if record.completion_tokens is not None:
            series.completion_tokens.inc(record.completion_tokens)
        series.latency.observe(record.latency_ms / 1000)
        if record.ttft_ms is not None:
            series.ttft.observe(record.ttft_ms / 1000)

    def refused(self, reason: str) -> None:
        """A request turned away before the gateway; ``reason`` is one of ``REFUSAL_REASONS`` (KeyError if not)."""
        self._refused[reason].inc()

    def endpoint_states(self, endpoints: list[dict[str, Any]]) -> None:
        """Report each endpoint's state (dicts with "cluster", "endpoint", "state"); a state outside
        ``ENDPOINT_STATES`` is reported as "unknown", so that an engine's new word cannot make new series.

        Endpoints missing from a report keep their last values: multiprocess mode cannot remove a series.
        """
        for endpoint in endpoints:
            where = (endpoint["cluster"], endpoint["endpoint"])
            gauges = self._endpoints.get(where)
            if gauges is None:
                gauges = self._endpoints[where] = tuple(self._endpoint_state.labels(*where, state)
                                                        for state in ENDPOINT_STATES)
            state = endpoint["state"] if endpoint["state"] in ENDPOINT_STATES else "unknown"
            for known, gauge in zip(ENDPOINT_STATES, gauges, strict=True):
                gauge.set(1.0 if known == state else 0.0)

    def prefix_routing(self, counts: list[tuple[str, str, int, int]]) -> None:
        """Report each endpoint's prefix routing so far: (cluster, endpoint, requests routed, prefix hits)."""
        for cluster, endpoint, routed, hits in counts:
            self._prefix_routed.labels(cluster, endpoint).set(routed)
            self._prefix_hits.labels(cluster, endpoint).set(hits)

    def admission(self, endpoints: list[tuple[str, str, AdmissionStatus]]) -> None:
        """Each endpoint's slots per class, and the batch concurrency chosen (cluster, endpoint, status)."""
        for cluster, endpoint, status in endpoints:
            for priority, in_flight, queued in (("interactive", status.in_flight_interactive,
                                                 status.queued_interactive),
                                                ("batch", status.in_flight_batch, status.queued_batch)):
                self._slots.labels(cluster, endpoint, priority, "in_flight").set(in_flight)
                self._slots.labels(cluster, endpoint, priority, "queued").set(queued)
            self._batch_concurrency.labels(cluster, endpoint).set(status.batch_concurrency)

    def render(self) -> tuple[bytes, str]:
        """The text exposition and its Content-Type; in multiprocess mode, merged from every process's files."""
        for refresh in self.refreshers:
            refresh()
        return generate_latest(self._exposed), CONTENT_TYPE_LATEST


def share_across_processes(path: Path) -> None:
    """Keep values in ``path``'s files from now on, for the processes about to be forked.

    prometheus_client chooses where values live when it is imported, and importing ``first_jupyter`` (its Jupyter
    extension points) already imported it; the choice is a module attribute read whenever a metric is made, so it is
    made again here. Metrics made before (Jupyter server's, in prometheus_client's global registry) keep their own
    values, which the gateway's answer never includes.
    """
    os.environ[MULTIPROC_ENV] = str(path)
    values.ValueClass = values.get_value_class()
    reset_multiprocess_dir(path)


def reset_multiprocess_dir(path: Path) -> None:
    """Empty (or create) the multiprocess directory when ``first serve`` starts, before its processes do.

    A previous run's files would otherwise be merged in: its counters added to the new ones, and its "live" gauges
    counted for processes that no longer exist (their pids may even belong to new processes now). Only the ``.db``
    files prometheus_client writes are removed.
    """
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink(missing_ok=True)


def process_exited(pid: int) -> None:
    """Forget a dead process's live gauges (its in-flight requests are gone); its counters keep counting.

    Called by the process that notices the death (``first serve``'s supervisor); nothing to do in one process.
    """
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)
