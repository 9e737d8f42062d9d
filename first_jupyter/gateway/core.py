"""The Gateway: validate, route, call the backend, account usage.

Handlers, magics, widgets and the CLI all go through this one object, so behaviour (errors, accounting,
timeouts) is the same whichever door a request came in by.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import parse_qsl, quote

import orjson
from pydantic import JsonValue

from first_jupyter.api_types import (
    BackgroundFailures,
    CallbackCounts,
    EndpointStatus,
    ModelCapabilities,
    ModelEntry,
    ModelList,
    PublishedDetails,
    RouterHealth,
    ServedBy,
    SignIn,
    StatusReply,
    UsageRow,
    UsageSummary,
    WarmReply,
)
from first_jupyter.auth.manager import TokenManager
from first_jupyter.auth.tokens import AuthError
from first_jupyter.caller import Caller, acting_as
from first_jupyter.config import (
    ComputeCluster,
    ComputeEndpoint,
    FirstConfig,
    FirstGatewayCluster,
    FirstGatewayEndpoint,
    HttpCluster,
    HttpEndpoint,
    LocalCluster,
    SchedulerView,
    callback_url_for,
)
from first_jupyter.gateway.answers import Completed, Relayed, WaitingAnswer, tell_until_done
from first_jupyter.gateway.audio import FormRequest
from first_jupyter.gateway.backends.base import Backend, RequestBody, Stream
from first_jupyter.gateway.backends.compute import CallWindow, ComputeBackend
from first_jupyter.gateway.backends.first_gateway import FirstGatewayBackend
from first_jupyter.gateway.backends.http import HttpBackend, reach_of
from first_jupyter.gateway.backends.local import LocalBackend
from first_jupyter.gateway.bearer import BearerTokens
from first_jupyter.gateway.callbacks import CALLBACK_PATH, CallbackHub
from first_jupyter.gateway.ceilings import TokenCeilings
from first_jupyter.gateway.preferences import Preferences
from first_jupyter.gateway.relay import StreamWatch, rename_model_in_body
from first_jupyter.gateway.response_ids import ResponseIds, answer_from_copy, continued_input
from first_jupyter.gateway.router import WAITING_STATES, Router, Target, conversation_key
from first_jupyter.gateway.supervisor import Supervisor
from first_jupyter.gateway.upstream import Reply, UpstreamClient, upstream_error
from first_jupyter.gateway.usage import PER_MODEL_KEYS, PER_USER_KEYS, LineUsage, UsageLog, UsageRecord, UsageStore
from first_jupyter.protocol import (
    CLIENT_CLOSED,
    Capability,
    OpenAIError,
    ParsedRequest,
    Progress,
    check_model_name,
    duration,
    shown,
)

if TYPE_CHECKING:
    from first_jupyter.batch.service import Batches
    from first_jupyter.gateway.compute_cloud import Credentials
    from first_jupyter.gateway.scheduler_view import SchedulerReader

DEFAULT_MODEL_KEY = "default_model"
MODEL_STATES = ("hot", "starting", "queued", "cold", "offline")
"""A model's state for users, best first: answers now, soon, after a batch job starts, after a cold start, not."""
_MODEL_STATE = {"running": "hot", "online": "hot", "starting": "starting", "queued": "queued", "stopped": "cold",
                "failed": "offline", "offline": "offline", "unknown": "unknown"}
"""Endpoint states (local engines, http upstreams) and job states (a FIRST gateway's) as model states; an endpoint
not read yet is ``unknown`` (the router still tries it)."""
STATUS_PERIOD_S = 30.0
STATUS_MAX_INTERVAL_S = 300.0
FAILOVER_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Failures before the first byte that the next endpoint may not have: worth trying it."""
FORBIDDEN = 403
NOT_FOUND, NOT_IMPLEMENTED = 404, 501
_T = TypeVar("_T")
log = logging.getLogger(__name__)
_REQUEST_IDS = itertools.count(1)
_ID_PREFIX = f"{os.getpid():x}-{int(time.time()):x}"


def _model_state(endpoint: dict[str, Any], model: str) -> str:
    """A model's state at one endpoint: its own when the endpoint tells states per model (a FIRST gateway's
    jobs), else the endpoint's."""
    own = endpoint.get("model_states", {}).get(model) if endpoint["state"] not in ("offline", "failed") else None
    return _MODEL_STATE.get(own or endpoint["state"], "offline")


CAPABILITIES_SCHEMA = 1
"""The version of the capabilities object's shape: FIRST's (``GET /{cluster}/models``, ``schema_version``)."""


def model_capabilities(kinds: list[Capability], published: PublishedDetails | None) -> ModelCapabilities:
    """A model's capabilities in the shape a FIRST gateway publishes them (its ``capabilities`` object, from
    argonne-lcf/FIRST ``docs/reference/api.md``): ``api_protocols`` are the kinds of request this gateway routes
    to the model (the names its config uses, each a route: ``Capability``), ``streaming`` whether any of them
    streams; what the model's FIRST gateway publishes besides (``context_window_tokens``, ``input_modalities``,
    ``tool_calling``, ``reasoning``, its own word on ``streaming``) is kept as it says it."""
    own: dict[str, JsonValue] = {"schema_version": CAPABILITIES_SCHEMA,
                                 "api_protocols": [kind.value for kind in kinds],
                                 "streaming": any(kind.streams for kind in kinds)}
    extra = published.capabilities if published is not None else None
    if extra:
        own.update((key, value) for key, value in extra.items() if key not in ("schema_version", "api_protocols"))
    return ModelCapabilities.model_validate(own)


def _request_id() -> str:
    """Unique per process and start; cheaper than uuid4 (no urandom call on the request path)."""
    return f"{_ID_PREFIX}-{next(_REQUEST_IDS)}"


def _build_backends(gateway: Gateway, environ: Mapping[str, str]) -> list[Backend]:
    config, client, tokens = gateway.config, gateway.client, BearerTokens(gateway.auth)
    backends: list[Backend] = []
    for cluster_name, cluster in config.clusters.items():
        if isinstance(cluster, HttpCluster):
            backends.extend(HttpBackend(
                cluster_name, ep.name, ep.base_url, ep.models, client, api_key_env=ep.api_key_env,
                globus=(tokens, ep.globus_resource_server) if ep.globus_resource_server else None,
                capacity=ep.concurrency, reach=reach_of(f"clusters.{cluster_name}.endpoints[{i}]", ep.proxy, ep.tls))
                for i, ep in enumerate(cluster.endpoints))
        elif isinstance(cluster, LocalCluster):
            backends.extend(LocalBackend(cluster_name, ep, client, gateway.data_dir / "logs")
                            for ep in cluster.endpoints)
        elif isinstance(cluster, FirstGatewayCluster):
            backends.extend(FirstGatewayBackend(cluster_name, ep, client, tokens,
                                                reach_of(f"clusters.{cluster_name}.endpoints[{i}]", ep.proxy, ep.tls))
                            for i, ep in enumerate(cluster.endpoints))
        else:
            scheduler = _scheduler_reader(gateway, cluster_name, cluster, environ) if cluster.scheduler else None
            backends.extend(_compute_backend(gateway, cluster_name, ep, environ, scheduler)
                            for ep in cluster.endpoints)
    return backends


def _credentials(gateway: Gateway, endpoint: ComputeEndpoint | SchedulerView, environ: Mapping[str, str],
                 where: str) -> Credentials:
    """Who an endpoint's Compute calls go as: its service identity; else the user, who is each request's sender
    at a shared gateway, and the user signed in here in a user's own server."""
    from first_jupyter.gateway.compute_cloud import Credentials, UserTokenAuthorizer, service_authorizer

    if endpoint.identity == "service":
        return Credentials(lambda: service_authorizer(endpoint, dict(environ)), "service", where)
    if gateway.shared:
        gateway.compute_as_callers = True
        return Credentials.of_callers(where)
    return Credentials(lambda: UserTokenAuthorizer(gateway.auth), "user", where)


def _scheduler_reader(gateway: Gateway, cluster_name: str, cluster: ComputeCluster,
                      environ: Mapping[str, str]) -> SchedulerReader:
    from first_jupyter.gateway.compute_cloud import CloudSubmitter
    from first_jupyter.gateway.scheduler_view import SchedulerReader, job_label

    view = cluster.scheduler
    assert view is not None
    where = f"cluster '{cluster_name}'"
    login = f"{where} login endpoint"
    submitter = CloudSubmitter(view, _credentials(gateway, view, environ, login), gateway.preferences,
                               gateway.compute_window, login)
    labels = {job_label(ep.name): [m.id for m in ep.models] for ep in cluster.endpoints}
    reader = SchedulerReader(view, submitter, labels, where)
    gateway.scheduler_readers.append(reader)  # shared by the cluster's endpoints: the gateway closes it
    return reader


def _compute_backend(gateway: Gateway, cluster: str, endpoint: ComputeEndpoint, environ: Mapping[str, str],
                     scheduler: SchedulerReader | None = None) -> Backend:
    """A Globus Compute endpoint's backend. The SDK and the engine are imported only by gateways that have one
    (they are slow to import, and a Jupyter server's start should not wait for them)."""
    where = f"cluster '{cluster}' endpoint '{endpoint.name}'"
    idle = gateway.config.defaults.timeouts.idle
    if endpoint.in_process is not None:
        from first_jupyter.gateway.compute_local import InProcessSubmitter

        local = InProcessSubmitter(endpoint, gateway.data_dir / "compute" / f"{cluster}-{endpoint.name}",
                                   gateway.data_dir / "logs" / f"engine-{cluster}-{endpoint.name}.log", where)
        return ComputeBackend(cluster, endpoint, local, gateway.callbacks, idle, gateway.own_callback_url,
                              engine_port=local.port, upstream_name=local.served_name, engine=local.engine)

    from first_jupyter.gateway.compute_cloud import CloudSubmitter

    submitter = CloudSubmitter(endpoint, _credentials(gateway, endpoint, environ, where), gateway.preferences,
                               gateway.compute_window, where, endpoint.status_ttl, endpoint.user_sessions)
    callback = callback_url_for(endpoint.callback_url, environ, where)
    return ComputeBackend(cluster, endpoint, submitter, gateway.callbacks, idle, lambda: callback,
                          scheduler=scheduler)


def _endpoint_scopes(config: FirstConfig) -> dict[str, list[str]]:
    """The scopes of the endpoints that take Globus tokens, for ``first login`` to ask for along with the rest."""
    scopes: dict[str, list[str]] = {}
    for cluster in config.clusters.values():
        for ep in cluster.endpoints:
            if isinstance(ep, HttpEndpoint | FirstGatewayEndpoint) and ep.globus_resource_server and ep.globus_scope:
                scopes.setdefault(ep.globus_resource_server, []).append(ep.globus_scope)
    return scopes


class Attempts:
    """The endpoints a request was sent to, in order; of the last, when, and whether it had to start the model
    first (then its answer time is a start's, not the engine's)."""

    __slots__ = ("must_start", "sent_at", "targets", "waited")

    def __init__(self, *, heard: bool = False) -> None:
        """``heard``: the client wants to hear a start's progress; ``must_start`` then resolves to the first
        endpoint the request must wait for (made only then: a future per request costs on the lean path)."""
        self.targets: list[Target] = []
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


class StreamShape(Protocol):
    """What a stream's bytes become on the way to a client that speaks another API than the engine (Anthropic's
    events from chat chunks), and how an error after the status line is written in the client's API."""

    def feed(self, data: bytes) -> bytes:
        """The bytes to send for ``data`` (the engine's, as watched); empty while nothing is complete."""
        ...

    def finish(self) -> bytes:
        """The last bytes, once the engine's stream has ended."""
        ...

    def fail(self, error: OpenAIError) -> bytes:
        """An error event ending the stream."""
        ...


class GatewayStream(Relayed):
    """A relayed stream: upstream bytes out as they come, usage recorded when it is closed.

    For a model that must start first, the stream is returned before any endpoint answers (``opening`` runs the
    request): its status line goes out with a progress comment at once, and more every few seconds until the
    answer begins. Its headers then name the endpoint that was asked to start; a comment says so if another
    endpoint ends up answering.
    """

    __slots__ = ("_attempts", "_caller", "_conversation", "_gateway", "_opening", "_req", "_t0", "_ttft", "_upstream",
                 "_watch", "error", "request_id", "shape", "target")

    def __init__(self, gateway: Gateway, req: ParsedRequest, target: Target, attempts: Attempts,
                 upstream: Stream | None, watch: StreamWatch, t0: float, request_id: str,
                 conversation: str | None = None, opening: asyncio.Future[Stream] | None = None,
                 caller: Caller | None = None) -> None:
        self._gateway = gateway
        self._caller = caller
        self._req = req
        self._attempts = attempts
        self.target = target
        self._upstream = upstream
        self._watch = watch
        self._t0 = t0
        self._ttft: float | None = None
        self.error: OpenAIError | None = None
        self.request_id = request_id
        self._conversation = conversation
        self._opening = opening
        self.shape: StreamShape | None = None
        """Set by a route whose client speaks another API than the engine's stream, before it is relayed."""
        if req.capability is Capability.responses:
            watch.on_response_id = self._remember_response
            watch.on_response_done = self._keep_response

    def _keep_response(self, response: dict[str, Any]) -> None:
        """The gateway's copy of the stream's response, from the event that ends it (``response_ids``)."""
        if self._watch.response_id is not None:
            self._gateway.responses.keep(self._watch.response_id, orjson.dumps(response), self._req.data)

    def _remember_response(self, response_id: str) -> None:
        """The stream's response, remembered with the endpoint answering it as soon as its first event names it."""
        self._gateway.responses.remember(response_id, self.target, self._req.model, self._caller)

    def _error_event(self, error: OpenAIError) -> bytes:
        self.error = error
        return error.sse_event() if self.shape is None else self.shape.fail(error)

    async def relay(self, write: Callable[[bytes], bool]) -> None:
        """Send the stream into ``write`` chunk by chunk as the upstream delivers it; return at its end.

        ``write`` returns False when the client is not keeping up; call ``resume`` once it has drained. An
        upstream failure after the first byte ends the stream with an OpenAI error event.
        """
        if self._upstream is None and not await self._wait_for_start(write):
            return
        assert self._upstream is not None
        feed, shape = self._watch.feed, self.shape

        def sink(chunk: bytes) -> bool:
            if self._ttft is None:
                self._ttft = time.perf_counter()
            out = feed(chunk)
            if out and shape is not None:
                out = shape.feed(out)
            return write(out) if out else True  # an empty write would end a chunked response

        try:
            await self._upstream.pipe(sink)
        except OpenAIError as exc:  # the status line is already sent: say it in the stream
            write(self._error_event(exc))
            return
        rest = self._watch.finish()
        if shape is not None:
            rest = (shape.feed(rest) if rest else b"") + shape.finish()
        if rest:
            write(rest)

    async def _wait_for_start(self, write: Callable[[bytes], bool]) -> bool:
        """Progress comments (which clients skip) until an endpoint answers; False when none did (the error is
        then the stream's last event)."""
        assert self._opening is not None
        await tell_until_done(self._opening, self._gateway.config.defaults.cold_start.progress_every,
                              functools.partial(self._gateway.progress_of, self._attempts, self.target, self._t0),
                              write)
        try:
            self._upstream = self._opening.result()
        except OpenAIError as exc:
            self.target = self._attempts.last or self.target
            write(self._error_event(exc))
            return False
        answered = self._attempts.last
        if answered is not None and answered is not self.target:
            self.target = answered
            write(f": answered by cluster '{self.target.cluster}' endpoint '{self.target.endpoint}'\n\n".encode())
        return True

    def resume(self) -> None:
        if self._upstream is not None:
            self._upstream.resume_reading()

    def close(self, *, client_gone: bool = False) -> None:
        """Release the upstream (closing it if unfinished, so the engine stops) and record usage."""
        opening = self._opening
        if self._upstream is None and opening is not None:
            if not opening.done():
                opening.cancel()  # the client left during the start: the request is withdrawn, the start goes on
            elif not opening.cancelled() and opening.exception() is None:
                self._upstream = opening.result()  # opened as the client left
                self.target = self._attempts.last or self.target
        router = self._gateway.router
        if isinstance(self._req, FormRequest):
            self._req.form.close()  # sent, or never to be
        if self._upstream is not None:
            self._upstream.close()
            self._upstream.when_done(functools.partial(router.ended, self.target))
            if self.error is not None:
                router.failed(self.target, self.error.message)  # broke off mid-stream: keep it out if it goes on
            elif self._ttft is not None:
                router.succeeded(self.target, self._attempts.answer_time(self._ttft))
                router.served(self._conversation, self.target)
        status = CLIENT_CLOSED if client_gone else (self.error.status if self.error else 200)
        watch = self._watch
        self._gateway.record(self._req, self.target, status, self._t0, self._ttft, watch.prompt_tokens,
                             watch.completion_tokens, self.request_id,
                             self.error.message if self.error else None, self._caller)


class Gateway:
    def __init__(self, config: FirstConfig, data_dir: Path, environ: Mapping[str, str] | None = None, *,
                 shared: bool = False, batches: Callable[[Gateway], Batches] | None = None,
                 usage: UsageLog | None = None) -> None:
        """``environ``: where token sources read variables (default ``os.environ``; the server passes a copy
        taken before it removed the token variables from its own environment, which kernels inherit).
        ``shared``: a facility's gateway (``first serve``), whose requests each come with their ``Caller``; Compute
        endpoints that run as the user then run as each request's sender, never as the gateway's own sign-in.
        ``batches``: makes the Batch API's service on this gateway (``assembly.build_gateway`` passes it: the
        gateway runs batches' lines but does not build their service); None for a gateway without batches.
        ``usage``: where usage records go (replicas on several hosts share one in PostgreSQL); by default SQLite
        under ``data_dir``. Either way the gateway closes it, after its batches, whose runs record usage."""
        self.config = config
        self.shared = shared
        self.compute_as_callers = False
        """Whether some Globus Compute endpoint runs tasks as each request's sender (set as backends are built)."""
        self.data_dir = data_dir
        self.supervisor = Supervisor()
        """Every background task runs under it: a failure is logged and counted, and the task goes on."""
        self.client = UpstreamClient(config.defaults.timeouts, config.defaults.limits)
        self.callbacks = CallbackHub()
        environ = os.environ if environ is None else environ
        self.auth = TokenManager(config.auth, data_dir, environ, extra_scopes=_endpoint_scopes(config))
        self.preferences = Preferences(data_dir / "preferences.sqlite3")
        self.compute_window = CallWindow()
        self.probe_intervals: dict[int, float] = {}
        """Backend id → seconds between its background status readings (longer while it is offline)."""
        self.own_url: str | None = None
        """The gateway's own server (loopback), once it listens: where endpoints on this machine call back."""
        self.scheduler_readers: list[SchedulerReader] = []
        self.state_observers: list[Callable[[list[dict[str, Any]]], None]] = []
        """Called with every endpoint status reading (a shared gateway's metrics)."""
        self.backends = _build_backends(self, environ)
        served: dict[str, list[str]] = {}
        for cluster_name, cluster in config.clusters.items():
            if isinstance(cluster, FirstGatewayCluster):
                continue  # known once discovered
            for ep in cluster.endpoints:
                for model in ep.models:
                    served.setdefault(model.id, []).append(f"{cluster_name}/{ep.name}")
        self.router = Router(self.backends, served, config.defaults.scale_out)
        self.ceilings = TokenCeilings(config)
        self._discovering = [b for b in self.backends if isinstance(b, FirstGatewayBackend)]
        self._discovery: asyncio.Lock | None = None
        self._starts: dict[tuple[int, str], asyncio.Task[None]] = {}
        """(backend id, model) → the start this gateway asked of it, while it runs."""
        chosen = self.preferences.get(DEFAULT_MODEL_KEY)  # the user's last choice, while it is still served
        self.default_model = chosen if chosen in served or (chosen and self._discovering) else (
            config.defaults.model or next(iter(served), None))
        self.usage: UsageLog = usage if usage is not None else UsageStore(data_dir / "usage.sqlite3",
                                                                          self.supervisor)
        self.responses = ResponseIds(data_dir / "responses.sqlite3", config.defaults.max_response_ids,
                                     self.supervisor)
        self._batches = batches(self) if batches is not None else None
        self._created = int(time.time())

    @property
    def batches(self) -> Batches:
        """The Batch API's service on this gateway (files and batches), as ``assembly.build_gateway`` made it."""
        if self._batches is None:
            raise RuntimeError("This gateway was built without batches: build it with "
                               "first_jupyter.assembly.build_gateway.")
        return self._batches

    def _observe(self, endpoints: list[dict[str, Any]]) -> None:
        """Give the router each model's state at each endpoint just read: it orders candidates by them."""
        by_name = {(e["cluster"], e["endpoint"]): e for e in endpoints}
        self.ceilings.observe(endpoints)
        for observer in self.state_observers:
            observer(endpoints)
        for model, targets in self.router.catalog.items():
            for target in targets:
                endpoint = by_name.get((target.cluster, target.endpoint))
                if endpoint is not None:
                    self.router.observe_state(target.backend, model, _model_state(endpoint, model))
        for backend in self.backends:
            blocks = by_name.get((backend.cluster, backend.name), {}).get("managers")
            if isinstance(blocks, int):  # blocks connected, each with its engine
                self.router.observe_blocks(backend, blocks)

    async def keep_states_fresh(self, period: float = STATUS_PERIOD_S) -> None:
        """Read every endpoint's status in the background, so the router's states are never older than
        ``period``; an endpoint found offline is read less and less often (up to ``STATUS_MAX_INTERVAL_S``), so a
        cluster that is down for the night costs nothing, and is read at the normal pace again once it answers."""
        interval = self.probe_intervals = {id(b): period for b in self.backends}
        due = {id(b): 0.0 for b in self.backends}

        async def read_due() -> float:
            now = time.monotonic()
            probe = [b for b in self.backends if due[id(b)] <= now]
            if probe:
                for backend in probe:  # a round that fails is tried again at the normal pace
                    due[id(backend)] = now + period
                await self.refresh_catalog()
                endpoints = await self._statuses(probe)
                self._observe(endpoints)
                for backend, endpoint in zip(probe, endpoints, strict=True):
                    offline = endpoint.get("state") in ("offline", "failed")
                    interval[id(backend)] = min(interval[id(backend)] * 2, STATUS_MAX_INTERVAL_S) if offline \
                        else period
                    due[id(backend)] = time.monotonic() + interval[id(backend)]
            return max(min(due.values(), default=now + period) - time.monotonic(), 0.05)

        await self.supervisor.repeat("status readings", read_due, period)

    async def _statuses(self, backends: Sequence[Backend]) -> list[dict[str, Any]]:
        """The backends' status readings, side by side. A reading that raises (a bug, or an answer no check
        foresaw) marks only its own endpoint failed, with the reason, and is counted as a background failure."""

        async def read(backend: Backend) -> dict[str, Any]:
            try:
                return await backend.status()
            except Exception as exc:
                where = f"cluster '{backend.cluster}' endpoint '{backend.name}'"
                self.supervisor.failed("status readings", exc, where)
                return {"cluster": backend.cluster, "endpoint": backend.name, "kind": backend.kind,
                        "state": "failed", "error": f"reading its status failed ({type(exc).__name__}: {exc}); "
                                                    "the gateway's log has the details"}

        return list(await asyncio.gather(*(read(b) for b in backends)))

    def own_callback_url(self) -> str | None:
        return self.own_url + CALLBACK_PATH if self.own_url else None

    # -- catalog and state -------------------------------------------------------------------------------

    async def refresh_catalog(self, *, eager: bool = False) -> None:
        """Read the catalogs of FIRST gateways whose last reading is due (one reading at a time)."""
        if not any(b.due(eager=eager) for b in self._discovering):
            return
        if self._discovery is None:
            self._discovery = asyncio.Lock()
        async with self._discovery:
            due = [b for b in self._discovering if b.due(eager=eager)]
            found = await asyncio.gather(*(b.discover() for b in due), return_exceptions=True)
            for backend, models in zip(due, found, strict=True):
                if isinstance(models, list):
                    self.router.serve(backend, models)
                elif not isinstance(models, OpenAIError):  # a bug, not an unreachable gateway: say so
                    self.supervisor.failed("catalog readings", models, backend.where)

    def _refresh_in_background(self) -> None:
        if any(b.due() for b in self._discovering):
            self.supervisor.spawn("catalog readings", self.refresh_catalog())

    async def _candidates(self, model: str, capability: Capability, conversation: str | None = None,
                          caller: Caller | None = None) -> list[Target]:
        """The router's candidates on the clusters the caller may use, reading discovered catalogs first when the
        model is not (yet) in them."""
        return self._allowed(model, await self._routed(model, capability, conversation), caller)

    async def _continued(self, req: ParsedRequest, caller: Caller | None) -> ParsedRequest:
        """A Responses request that continues an earlier response (``previous_response_id``) whose engine keeps
        no responses (``transformers serve``), made whole from the gateway's copy: the earlier conversation before
        this input, the id dropped (that engine would ignore it and answer without the conversation). Any other
        goes as it is, to the endpoint that holds the earlier response (``_targets``)."""
        previous = req.data.get("previous_response_id") if req.capability is Capability.responses else None
        if previous is None:
            return req
        home = await self.responses.home(previous, caller, "previous_response_id")
        backend = self._backend_of(home.cluster, home.endpoint)
        if backend is None or backend.keeps_responses:
            return req
        earlier = await self.responses.copy(previous)
        if earlier is None:
            return req
        data = {key: value for key, value in req.data.items() if key != "previous_response_id"}
        data["input"] = continued_input(earlier, req.data.get("input"))
        return ParsedRequest(req.capability, data, orjson.dumps(data), asked=req.asked)

    def _backend_of(self, cluster: str, endpoint: str) -> Backend | None:
        return next((b for b in self.backends if (b.cluster, b.name) == (cluster, endpoint)), None)

    async def _targets(self, req: ParsedRequest, conversation: str | None, caller: Caller | None) -> list[Target]:
        """A request's candidates (``_candidates``); a Responses request that continues an earlier response
        (``previous_response_id``) goes only where that response was created: no other engine holds it."""
        previous = req.data.get("previous_response_id") if req.capability is Capability.responses else None
        if previous is None:
            return await self._candidates(req.model, req.capability, conversation, caller)
        home = await self.responses.home(previous, caller, "previous_response_id")
        targets = await self.where_served(req.model)
        pinned = [t for t in targets if (t.cluster, t.endpoint) == (home.cluster, home.endpoint)]
        if not pinned:
            raise OpenAIError(400, f"The response {shown(previous)} (previous_response_id) was created on cluster "
                                   f"'{home.cluster}' endpoint '{home.endpoint}', which does not serve model "
                                   f"'{req.model}'; only that endpoint holds it. Ask for a model it serves (it "
                                   f"created the response with '{home.model}'), or leave previous_response_id "
                                   "out and send the conversation's input in full.", param="previous_response_id",
                              code="invalid_value")
        return self._allowed(req.model, pinned, caller)

    async def stored_response(self, response_id: str, method: str, action: str, query: str,
                              caller: Caller | None) -> Completed:
        """A call on a kept response (``action``: "" for the response itself, else ``cancel`` or ``input_items``),
        sent to the endpoint that created it and answered as it answers, the model renamed, or from the gateway's
        copy where the engine keeps none (a 404) or cannot be asked again (a 501); a 404 when the id is unknown
        here or its endpoint is gone from the configuration."""
        home = await self.responses.home(response_id, caller)
        backend = self._backend_of(home.cluster, home.endpoint)
        if backend is None:
            raise OpenAIError(404, f"The response {shown(response_id)} was created on cluster '{home.cluster}' "
                                   f"endpoint '{home.endpoint}', which is no longer in this gateway's configuration; "
                                   "only that endpoint held it. Put the endpoint back in the configuration to reach "
                                   "it, or create the response again.", param="response_id",
                              code="response_endpoint_gone")
        path = "/".join(filter(None, ("responses", quote(response_id, safe=""), action)))
        unreachable: OpenAIError | None = None
        with acting_as(caller):  # (an endpoint that takes each caller's own Globus token at a shared gateway)
            try:
                reply: Reply | None = await backend.call(method, path, query, b"" if method == "POST" else None)
            except OpenAIError as exc:
                if exc.status != NOT_IMPLEMENTED:
                    raise
                reply, unreachable = None, exc
        if reply is None or reply.status == NOT_FOUND:  # the engine keeps no such response: the gateway's copy
            copy = await self.responses.copy(response_id)
            if copy is not None:
                if method == "DELETE":
                    self.responses.forget(response_id)
                return Completed(answer_from_copy(copy, method, action, dict(parse_qsl(query))),
                                 Target(home.model, backend))
        if reply is None:
            assert unreachable is not None
            raise unreachable
        if reply.status >= 400:
            raise upstream_error(reply.status, reply.body, f"cluster '{home.cluster}' endpoint '{home.endpoint}'",
                                 reply.retry_after, reply.via)
        if method == "DELETE":
            self.responses.forget(response_id)
        return Completed(rename_model_in_body(reply.body, home.model)[0], Target(home.model, backend))

    @staticmethod
    def _allowed(model: str, targets: list[Target], caller: Caller | None) -> list[Target]:
        """``targets`` on the clusters ``caller`` may use (all of them for no caller); 403 when none is."""
        if caller is None:
            return targets
        allowed = [t for t in targets if caller.may_use(model, t.cluster)]
        if not allowed:
            clusters = ", ".join(sorted({t.cluster for t in targets}))
            raise OpenAIError(403, f"{caller.user} may not use '{model}' on the clusters serving it ({clusters}): "
                                   "the model and each cluster admit members of their Globus groups only. Ask the "
                                   "gateway's operator which group to join, or use another model (GET "
                                   "/first/v1/models).", type="permission_error", param="model",
                              code="cluster_not_allowed")
        return allowed

    async def served_models(self, capability: Capability) -> set[str]:
        """The models some endpoint serves ``capability`` for, catalogs read first (a batch checks its lines)."""
        await self.refresh_catalog()
        return {model for model, targets in self.router.catalog.items()
                if any(t.backend.supports(model, capability) for t in targets)}

    def capacity(self, model: str) -> int:
        """How many requests for ``model`` its endpoints take at once (0 where it is served nowhere)."""
        return sum(self.router.health_of(t).capacity for t in self.router.catalog.get(model, ()))

    def backends_serving(self) -> list[Backend]:
        """Each endpoint that serves some model now, once."""
        return list({id(t.backend): t.backend for targets in self.router.catalog.values() for t in targets}.values())

    async def where_served(self, model: str) -> list[Target]:
        """Where ``model`` is served, discovered catalogs read first when it is not in them; the 404 that lists
        what is served when nowhere (a shared gateway asks before charging a quota: a name made up by a client
        must not leave rows in the quota store)."""
        if model not in self.router.catalog:
            await self.refresh_catalog(eager=True)
        return self.router.targets(model)

    async def _routed(self, model: str, capability: Capability, conversation: str | None) -> list[Target]:
        if self._discovering:
            if model in self.router.catalog:
                self._refresh_in_background()  # a known model is served now; the reading can follow
            else:
                await self.refresh_catalog(eager=True)
                failures = [b.failure for b in self._discovering if b.failure]
                if failures and model not in self.router.catalog:
                    signin = [f for f in failures if f.status == 401]
                    if signin:
                        raise signin[0]  # it says how to sign in
                    raise OpenAIError(404, f"The model '{model}' is not in the catalog here, and reading a FIRST "
                                           f"gateway's catalog failed: {'; '.join(f.message for f in failures)}",
                                      param="model", code="model_not_found")
        return self.router.candidates(model, capability, conversation)

    def _conversation(self, req: ParsedRequest) -> str | None:
        """The request's conversation, when there is a choice of endpoint for it to stick to."""
        if not self.config.defaults.sticky_conversations or req.capability is not Capability.chat or len(
                self.router.catalog.get(req.model, ())) < 2:
            return None
        return conversation_key(req.model, req.data.get("messages"))

    def _may_wait(self, targets: list[Target]) -> bool:
        """Whether the request may come to an endpoint that must start the model first (the best, or one
        failed over to): then it is bounded by ``cold_start.max_wait``, and a stream tells its progress."""
        return any(self.router.state_of(t) in WAITING_STATES for t in targets)

    async def _first_answer(self, req: ParsedRequest, targets: list[Target], tried: Attempts,
                            call: Callable[[Target], Awaitable[_T]], caller: Caller | None) -> _T:
        """``call`` on each candidate in turn until one answers. A failure before the first byte that another
        endpoint may not share (unreachable, 5xx, 429, a timeout) moves on to the next; any other (the request's
        own fault, a refused sign-in) is the answer; a refusal of the user (403) moves on too, and in a user's own
        server the router leaves that endpoint out for a while (at a shared gateway, where ``caller`` sent it,
        one user's refusal says nothing of the others'). ``tried`` gets each target as it is tried.

        Endpoints the router names are asked to start the model (the best when it must, or another ahead of a
        burst); so is one failed over to that must start it."""
        for target in self.router.to_start(targets):
            self._start(target)
        for target in targets:
            waits = self.router.state_of(target) in WAITING_STATES
            if waits:  # nothing hot answered before it
                self._start(target)
                tried.waits_for(target)
                if self.config.defaults.cold_start.mode == "reject":
                    raise self._not_ready(target)
            tried.add(target, waits or self.router.health_of(target).loaded())
            self.router.began(target)
            try:
                return await call(target)
            except OpenAIError as exc:
                self.router.ended(target)
                if exc.status == FORBIDDEN:  # this user may not use that cluster; another may serve the model
                    if caller is None:
                        self.router.forbid(target, exc.message)
                elif exc.status in FAILOVER_STATUSES:
                    self.router.failed(target, exc.message)
                else:
                    raise
                if target is targets[-1]:
                    if len(tried.targets) > 1:
                        exc.message = f"Every endpoint serving '{req.model}' failed ({len(tried.targets)} tried); " \
                                      f"the last: {exc.message}"
                    raise
            except BaseException:
                self.router.ended(target)
                raise
        raise AssertionError("the router gave no candidate")  # candidates() raises its 404 instead

    # -- starting models -------------------------------------------------------------------------------------

    def _start(self, target: Target) -> asyncio.Task[None]:
        """Ask ``target`` to start its model, once: a start under way is joined, not repeated."""
        key = (id(target.backend), target.model_id)
        task = self._starts.get(key)
        if task is None or task.done():
            whole = self.router.start_asked(target)
            task = self._starts[key] = asyncio.get_running_loop().create_task(self._run_start(target, whole))
        return task

    async def _run_start(self, target: Target, whole: bool) -> None:
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

    def _not_ready(self, target: Target, waited: float | None = None) -> OpenAIError:
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
        return WaitingAnswer(task, tried.must_start.result(), self.config.defaults.cold_start.progress_every,
                             functools.partial(self.progress_of, tried, tried.must_start.result(), t0))

    async def warm(self, model: str, cluster: str | None = None, wait: bool = False,
                   caller: Caller | None = None, tried: Attempts | None = None) -> WarmReply:
        """Start ``model`` where it would be served (on ``cluster`` if given) ahead of need, for ``caller`` (on
        the clusters they may use, as them); ``wait``: return once it answers (at most ``cold_start.max_wait``).
        Its state, where, and the expected wait. ``tried``: told the endpoint it waits for (``heard``)."""
        check_model_name(model)
        targets = self._allowed(model, await self.where_served(model), caller)
        capability = next(c for c in Capability if any(t.backend.supports(model, c) for t in targets))
        ordered = self._allowed(model, self.router.candidates(model, capability), caller)
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
            with acting_as(caller):  # (the start's task keeps it)
                task = self._start(target)
            if wait:
                if tried is not None:
                    tried.waits_for(target)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(task), self.config.defaults.cold_start.max_wait)
                if self.router.state_of(target) == "offline":
                    raise OpenAIError(503, f"Starting model '{model}' on cluster '{target.cluster}' endpoint "
                                           f"'{target.endpoint}' failed: {self.router.health_of(target).last_error}",
                                      type="api_error", code="engine_start_failed")
        return WarmReply(model=model, cluster=target.cluster, endpoint=target.endpoint,
                         state=self.router.state_of(target), started=started,
                         expected_s=round(self.router.wait_of(target), 1))

    async def models(self) -> ModelList:
        """The OpenAI model list, each model once, with where it is served."""
        await self.refresh_catalog()
        return self._listing()

    def _listing(self) -> ModelList:
        """Each model once, where it is served and its state there as last read (``unknown`` before the first
        reading): no endpoint is probed on this path, which clients call before every prompt."""
        return ModelList(object="list", data=[self._model_entry(model_id, targets)
                                              for model_id, targets in self.router.catalog.items()])

    def _model_entry(self, model_id: str, targets: list[Target]) -> ModelEntry:
        """One model as the listing shows it: an OpenAI Model object, with its capabilities, state and places."""
        served = [ServedBy(cluster=t.cluster, endpoint=t.endpoint, state=self.router.state_of(t)) for t in targets]
        known = [s.state for s in served if s.state in MODEL_STATES]
        details = next((found for t in targets if (found := t.backend.model_details(model_id))), None)
        entry = ModelEntry(id=model_id, object="model", created=self._created, owned_by="first",
                           capabilities=model_capabilities(self.router.capabilities(model_id), details),
                           state=min(known, key=MODEL_STATES.index, default="unknown"), served_by=served)
        if details:
            entry.details = details
        return entry

    async def model(self, model_id: str) -> ModelEntry:
        """One model as the listing shows it (``GET /v1/models/{id}``, the OpenAI SDK's ``models.retrieve``);
        the 404 that lists the served models for an id served nowhere."""
        check_model_name(model_id)
        await self.refresh_catalog(eager=model_id not in self.router.catalog)
        return self._model_entry(model_id, self.router.targets(model_id))

    async def set_default_model(self, model: str) -> str:
        """The model clients use when told none (``%%first chat``, the widgets, the sidebar); kept across restarts.

        A request to the OpenAI routes must still name its model (404 otherwise): the default is the clients'
        choice to make, not something to slip into an API call that forgot a field.
        """
        check_model_name(model)
        if model not in self.router.catalog:
            await self.refresh_catalog(eager=True)
        self.router.targets(model)  # a model served nowhere: the 404 that lists what is
        self.preferences.set(DEFAULT_MODEL_KEY, model)
        self.default_model = model
        return model

    async def usage_summary(self, user: str | None = None) -> UsageSummary:
        """Requests, tokens and latency per model, from the usage store (recent requests included); ``user``: that
        user's requests only (a shared gateway's users each see their own)."""
        rows = await self.usage.per_model(user)
        summary = UsageSummary(object="list", data=[UsageRow.model_validate(dict(zip(PER_MODEL_KEYS, row, strict=True)))
                                                    for row in rows])
        if user is not None:
            summary.user = user
        return summary

    async def usage_by_user(self) -> dict[str, Any]:
        """Requests and tokens per user and model: a shared gateway's accounting, for its operators."""
        rows = await self.usage.per_user()
        return {"object": "list", "data": [dict(zip(PER_USER_KEYS, row, strict=True)) for row in rows]}

    async def status(self) -> StatusReply:
        """Clusters, endpoints with their live state, and each model with the best state among its endpoints."""
        await self.refresh_catalog()
        readings = await self._statuses(self.backends)
        self._observe(readings)
        endpoints = []
        for backend, endpoint in zip(self.backends, readings, strict=True):
            health = self.router.health_of_backend(backend)
            endpoints.append(EndpointStatus.model_validate({**endpoint, "router": RouterHealth(
                in_flight=health.in_flight, ttft_ms=round(health.ttft_s * 1000, 1), failures=health.failures,
                last_error=health.last_error, allowed=health.forbidden_until <= self.router.clock(),
                circuit="open" if health.open_until > self.router.clock() else "closed",
                expected_start_s=round(health.start_s, 1))}))
        return StatusReply(
            default_model=self.default_model, models=self._listing().data,  # just read: every state is known
            endpoints=endpoints, clusters=sorted(self.config.clusters), auth=await self.signed_in(),
            callbacks=CallbackCounts(open_streams=len(self.callbacks.tasks()), accepted=self.callbacks.accepted,
                                     refused=self.callbacks.refused, url=self.own_callback_url()),
            background=BackgroundFailures.model_validate(self.supervisor.status()))

    # -- the user's Globus identity (blocking work: sources read files, the hub, Globus Auth) ----------------

    async def signed_in(self) -> SignIn:
        """Who is signed in, with which source and until when; never a token."""
        return SignIn.model_validate(await asyncio.to_thread(self.auth.whoami))

    async def login_start(self) -> dict[str, str]:
        return {"url": await asyncio.to_thread(self._auth_call, self.auth.login_start)}

    async def login_finish(self, code: str) -> SignIn:
        return SignIn.model_validate(await asyncio.to_thread(self._auth_call, self.auth.login_finish, code))

    async def logout(self) -> SignIn:
        await asyncio.to_thread(self.auth.logout)
        return await self.signed_in()

    @staticmethod
    def _auth_call(call: Callable[..., Any], *args: Any) -> Any:
        """An ``AuthError`` as the 401 that says how to sign in (its message never holds a token)."""
        try:
            return call(*args)
        except AuthError as exc:
            raise OpenAIError(401, str(exc), type="authentication_error", code="globus_sign_in") from None

    # -- requests ----------------------------------------------------------------------------------------

    def _body_for(self, req: ParsedRequest, target: Target, ask_usage: bool) -> RequestBody:
        """The request as the engine must see it: the client's own bytes unless something must change (a form's
        from its spool, with the engine's name for the model).

        A Responses request that leaves ``stream`` out is not streamed (the OpenAI API's default, and how this
        gateway reads it), but ``transformers serve`` streams it: the engine is told ``"stream": false``."""
        upstream_name = target.backend.upstream_name(req.model)
        if isinstance(req, FormRequest):
            return req.form.body(upstream_name)
        unsaid = req.capability is Capability.responses and "stream" not in req.data
        if upstream_name == req.model and not ask_usage and not unsaid:
            return req.raw
        data = dict(req.data)
        data["model"] = upstream_name
        if ask_usage:
            data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
        if unsaid:
            data["stream"] = False
        return orjson.dumps(data)

    def record(self, req: ParsedRequest, target: Target | None, status: int, t0: float, ttft: float | None,
               prompt_tokens: int | None, completion_tokens: int | None, request_id: str,
               error: str | None, caller: Caller | None = None) -> None:
        """Account one request. A model served nowhere leaves no row: its name is whatever a client sent, and
        the usage store (and ``/first/api/usage``, the quotas) would keep and show it."""
        if req.model not in self.router.catalog:
            return
        record = UsageRecord(  # positional: the fields in order, cheaper than keywords per request
            time.time(), request_id, req.model, target.cluster if target else "",
            target.endpoint if target else "", req.asked.value, req.stream, status, prompt_tokens,
            completion_tokens, (time.perf_counter() - t0) * 1000, (ttft - t0) * 1000 if ttft else None, error,
            caller.user if caller is not None else "")
        self.usage.record(record)
        if caller is not None:
            caller.recorded(record)

    def record_offloaded(self, batch_id: str, model: str, backend: Backend, capability: Capability,
                         latency_ms: float, lines: Sequence[LineUsage], caller: Caller | None) -> None:
        """Batch lines answered by a run-batch task on a cluster's nodes, accounted as requests this gateway sent
        would be: the owner's usage and quotas count a batch whichever way it ran."""
        now, user = time.time(), caller.user if caller is not None else ""
        records = [UsageRecord(now, f"{batch_id}/{line.custom_id}", model, backend.cluster, backend.name,
                               capability.value, False, line.status, line.prompt_tokens, line.completion_tokens,
                               latency_ms, None, line.error, user) for line in lines]
        for record in records:
            self.usage.record(record)
        if caller is not None:
            caller.recorded_all(records)

    async def complete(self, req: ParsedRequest, caller: Caller | None = None,
                       tried: Attempts | None = None) -> Completed:
        """Serve a non-streamed request; raises ``OpenAIError`` with the status to send. ``tried``: to follow
        where it goes (``heard``)."""
        if req.capability is Capability.responses:  # (no coroutine on the path of every other request)
            req = await self._continued(req, caller)
        t0 = time.perf_counter()
        request_id = _request_id()
        tried = tried or Attempts()
        conversation = self._conversation(req)

        async def ask(target: Target) -> Reply:
            reply = await target.backend.complete(req.model, req.capability, self._body_for(req, target, False))
            if reply.status >= 400:
                raise upstream_error(reply.status, reply.body, f"cluster '{target.cluster}' endpoint "
                                     f"'{target.endpoint}'", reply.retry_after, reply.via)
            return reply

        try:
            self.ceilings.check(req)
            with acting_as(caller):
                targets = await self._targets(req, conversation, caller)
                answer = self._first_answer(req, targets, tried, ask, caller)
                if not self._may_wait(targets):
                    reply = await answer
                else:
                    limit = self.config.defaults.cold_start.max_wait
                    try:
                        reply = await asyncio.wait_for(answer, limit)
                    except TimeoutError:
                        raise self._not_ready(tried.last or targets[0], waited=limit) from None
        except OpenAIError as exc:
            self.record(req, tried.last, exc.status, t0, None, None, None, request_id, exc.message, caller)
            raise
        except asyncio.CancelledError:  # the client left; the upstream request is already closed
            self.record(req, tried.last, CLIENT_CLOSED, t0, None, None, None, request_id, None, caller)
            raise
        target = tried.targets[-1]
        self.router.ended(target)
        self.router.succeeded(target, tried.answer_time(time.perf_counter()))
        self.router.served(conversation, target)
        if reply.content_type is not None and "json" not in reply.content_type:  # a transcript as text, SRT, VTT
            self.record(req, target, reply.status, t0, None, None, None, request_id, None, caller)
            return Completed(reply.body, target, reply.content_type)
        body, prompt_tokens, completion_tokens = rename_model_in_body(reply.body, req.model)
        if req.capability is Capability.responses:
            self.responses.remember_answer(body, target, req.model, caller, req.data)
        self.record(req, target, reply.status, t0, None, prompt_tokens, completion_tokens, request_id, None, caller)
        return Completed(body, target)

    async def stream(self, req: ParsedRequest, caller: Caller | None = None) -> GatewayStream:
        """Open a stream; errors before the first byte raise ``OpenAIError`` so a real status can be sent."""
        if req.capability is Capability.responses:
            req = await self._continued(req, caller)
        t0 = time.perf_counter()
        request_id = _request_id()
        tried = Attempts()
        options = req.data.get("stream_options")
        ask_usage = req.capability.asks_usage and not (
            isinstance(options, dict) and options.get("include_usage"))

        async def open_stream(target: Target) -> Stream:
            return await target.backend.stream(req.model, req.capability, self._body_for(req, target, ask_usage))

        conversation = self._conversation(req)
        watch = StreamWatch(req.model, rename=True, strip_usage_event=ask_usage)
        try:
            self.ceilings.check(req)
            with acting_as(caller):  # (the opening task, made here, keeps it)
                targets = await self._targets(req, conversation, caller)
                if not self._may_wait(targets):
                    upstream = await self._first_answer(req, targets, tried, open_stream, caller)
                else:
                    opening = asyncio.ensure_future(self._first_answer(req, targets, tried, open_stream, caller))
                    if await self._answers_soon(opening, targets[0]):
                        upstream = opening.result()
                    else:  # the status line goes now; the wait is told in the stream
                        return GatewayStream(self, req, targets[0], tried, None, watch, t0, request_id,
                                             conversation, opening, caller)
        except OpenAIError as exc:
            self.record(req, tried.last, exc.status, t0, None, None, None, request_id, exc.message, caller)
            raise
        return GatewayStream(self, req, tried.targets[-1], tried, upstream, watch, t0, request_id, conversation,
                             caller=caller)

    async def _answers_soon(self, opening: asyncio.Future[Stream], best: Target) -> bool:
        """Whether a stream that may wait for a start opens (or fails, raising its error, which can still be a
        real status) within the first progress interval; at once False when the best must start the model."""
        cold_start = self.config.defaults.cold_start
        waits = cold_start.mode == "wait" and self.router.state_of(best) in WAITING_STATES
        try:
            await asyncio.wait((opening,), timeout=0 if waits else cold_start.progress_every)
        except asyncio.CancelledError:
            opening.cancel()
            raise
        if opening.done():
            opening.result()  # its error, if it failed
            return True
        return False

    async def close(self) -> None:
        if self._batches is not None:
            await self._batches.close()  # first: its runs send through the rest
        self.supervisor.cancel_all()
        for task in self._starts.values():
            task.cancel()
        for backend in self.backends:
            await backend.close()
        for reader in self.scheduler_readers:
            await reader.close()
        await self.client.close()
        await self.usage.aclose()
        self.responses.close()
