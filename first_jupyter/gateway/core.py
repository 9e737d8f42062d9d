"""The Gateway: one request from a door to an endpoint and back, and the one object every door, magic, widget and
the CLI goes through, so behaviour (errors, accounting, timeouts) is the same whichever way a request came in.

A request is checked (``ceilings``), its candidates come from the catalog (``catalog``), each is tried in turn
until one answers before its first byte (failover), a model that must start first is started and waited for
(``starts``), and the answer is whole (``answers.Completed``) or relayed as it comes (``streamed``); every request
is accounted (``accounting``). The backends are built by the composition root (``first_jupyter.service``).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, quote

import orjson

from first_jupyter.api_types import (
    BackgroundFailures,
    CallbackCounts,
    ModelEntry,
    ModelList,
    SignIn,
    StatusReply,
    UsageSummary,
    WarmReply,
)
from first_jupyter.auth.manager import TokenManager
from first_jupyter.config import FirstConfig, FirstGatewayEndpoint, HttpEndpoint
from first_jupyter.gateway.accounting import Accounting
from first_jupyter.gateway.admission import Admission
from first_jupyter.gateway.answers import Completed, WaitingAnswer
from first_jupyter.gateway.audio import FormRequest
from first_jupyter.gateway.backends.base import Backend, RequestBody, Stream
from first_jupyter.gateway.backends.compute.backend import CallWindow
from first_jupyter.gateway.backends.compute.callbacks import CALLBACK_PATH, CallbackHub, StreamHandOff
from first_jupyter.gateway.caller import current
from first_jupyter.gateway.catalog import STATUS_PERIOD_S, Catalog
from first_jupyter.gateway.ceilings import TokenCeilings
from first_jupyter.gateway.globus_sign_in import GlobusSignIn
from first_jupyter.gateway.preferences import Preferences
from first_jupyter.gateway.response_ids import ResponseBook, ResponseIds, answer_from_copy, continued_input
from first_jupyter.gateway.router import WAITING_STATES, Prefix, Target, prefix_of
from first_jupyter.gateway.starts import Attempts, Starts
from first_jupyter.gateway.stream_watch import StreamWatch, rename_model_in_body
from first_jupyter.gateway.streamed import GatewayStream
from first_jupyter.gateway.supervisor import Supervisor
from first_jupyter.gateway.upstream import Reply, UpstreamClient, upstream_error
from first_jupyter.gateway.usage import LineUsage, UsageLog, UsageStore
from first_jupyter.protocol import (
    CLIENT_CLOSED,
    Capability,
    OpenAIError,
    ParsedRequest,
    Progress,
    check_model_name,
    shown,
)

if TYPE_CHECKING:
    from first_jupyter.batch.batches import Batches
    from first_jupyter.gateway.backends.compute.scheduler_view import SchedulerReader

DEFAULT_MODEL_KEY = "default_model"
FAILOVER_STATUSES = frozenset({429, 500, 502, 503, 504})
NOT_FOUND = 404
NOT_IMPLEMENTED = 501
FORBIDDEN = 403

_T = TypeVar("_T")
_REQUEST_IDS = itertools.count(1)
_ID_PREFIX = f"{os.getpid():x}-{int(time.time()):x}"


def _request_id() -> str:
    """Unique per process and start; cheaper than uuid4 (no urandom call on the request path)."""
    return f"{_ID_PREFIX}-{next(_REQUEST_IDS)}"


def _endpoint_scopes(config: FirstConfig) -> dict[str, list[str]]:
    """The scopes of the endpoints that take Globus tokens, for ``first login`` to ask for along with the rest."""
    scopes: dict[str, list[str]] = {}
    for cluster in config.clusters.values():
        for ep in cluster.endpoints:
            if isinstance(ep, HttpEndpoint | FirstGatewayEndpoint) and ep.globus_resource_server and ep.globus_scope:
                scopes.setdefault(ep.globus_resource_server, []).append(ep.globus_scope)
    return scopes


@dataclass
class Backends:
    """What the composition root built for a gateway's clusters: each endpoint's backend, the scheduler readers
    they share (which the gateway closes), and whether some endpoint runs Globus Compute tasks as each request's
    sender (a shared gateway then needs each caller's Compute token)."""

    backends: list[Backend]
    scheduler_readers: list[SchedulerReader] = field(default_factory=list)
    compute_as_callers: bool = False


class Gateway:
    def __init__(self, config: FirstConfig, data_dir: Path, environ: Mapping[str, str] | None = None, *,
                 backends: Callable[[Gateway, Mapping[str, str]], Backends], shared: bool = False,
                 batches: Callable[[Gateway], Batches] | None = None, usage: UsageLog | None = None,
                 responses: ResponseBook | None = None, stream_hand_off: StreamHandOff | None = None) -> None:
        """``environ``: where token sources read variables (default ``os.environ``; the server passes a copy
        taken before it removed the token variables from its own environment, which kernels inherit).
        ``backends``: builds the clusters' backends on this gateway's parts (``service.build_gateway`` passes it).
        ``shared``: a facility's gateway (``first serve``), whose requests each act as their ``Caller``; Compute
        endpoints that run as the user then run as each request's sender, never as the gateway's own sign-in.
        ``batches``: makes the Batch API's service on this gateway (``service.build_gateway`` passes it: the
        gateway runs batches' lines but does not build their service); None for a gateway without batches.
        ``usage``: where usage records go (replicas on several hosts share one in PostgreSQL); by default SQLite
        under ``data_dir``. Either way the gateway closes it, after its batches, whose runs record usage.
        ``responses``: where response ids are kept (likewise: PostgreSQL for replicas, else SQLite here).
        ``stream_hand_off``: remote streams through Redis, for replicas (``CallbackHub``)."""
        self.config = config
        self.shared = shared
        self.data_dir = data_dir
        self.supervisor = Supervisor()
        """Every background task runs under it: a failure is logged and counted, and the task goes on."""
        self.client = UpstreamClient(config.defaults.timeouts, config.defaults.limits)
        self.callbacks = CallbackHub(stream_hand_off)
        environ = os.environ if environ is None else environ
        self.auth = TokenManager(config.auth, data_dir, environ, extra_scopes=_endpoint_scopes(config))
        self.sign_in = GlobusSignIn(self.auth)
        self.preferences = Preferences(data_dir / "preferences.sqlite3")
        self.compute_window = CallWindow()
        self.own_url: str | None = None
        """The gateway's own server (loopback), once it listens: where endpoints on this machine call back."""
        built = backends(self, environ)
        self.backends = built.backends
        self.scheduler_readers = built.scheduler_readers
        self.compute_as_callers = built.compute_as_callers
        self.catalog = Catalog(config, self.backends, self.supervisor)
        self.router = self.catalog.router
        self.admission = Admission(self.router, config.defaults.admission,
                                   config.defaults.batch.interactive_ttft_target)
        """Each endpoint's slots: interactive first, batch lines in what is left, users in fair order."""
        self.catalog.state_observers.append(lambda readings: self.admission.observe(self.backends, readings))
        self.ceilings = TokenCeilings(config)
        self.catalog.state_observers.append(self.ceilings.observe)
        self.starts = Starts(self.catalog, self.supervisor, config.defaults.cold_start)
        served = self.catalog.configured
        chosen = self.preferences.get(DEFAULT_MODEL_KEY)  # the user's last choice, while it is still served
        self.default_model = chosen if chosen in served or (chosen and self.catalog.discovering) else (
            config.defaults.model or next(iter(served), None))
        self.usage: UsageLog = usage if usage is not None else UsageStore(data_dir / "usage.sqlite3",
                                                                          self.supervisor)
        self.accounting = Accounting(self.usage, self.router)
        self.record = self.accounting.record
        self.responses: ResponseBook = responses if responses is not None else ResponseIds(
            data_dir / "responses.sqlite3", config.defaults.max_response_ids, self.supervisor)
        self._batches = batches(self) if batches is not None else None

    @property
    def batches(self) -> Batches:
        """The Batch API's service on this gateway (files and batches), as ``service.build_gateway`` made it."""
        if self._batches is None:
            raise RuntimeError("This gateway was built without batches: build it with "
                               "first_jupyter.service.build_gateway.")
        return self._batches

    def own_callback_url(self) -> str | None:
        return self.own_url + CALLBACK_PATH if self.own_url else None

    # -- what the doors and the batch runner ask, answered by the part that knows ---------------------------

    async def keep_states_fresh(self, period: float = STATUS_PERIOD_S) -> None:
        await self.catalog.keep_states_fresh(period)

    async def refresh_catalog(self, *, eager: bool = False) -> None:
        await self.catalog.refresh(eager=eager)

    async def models(self) -> ModelList:
        return await self.catalog.models()

    async def model(self, model_id: str) -> ModelEntry:
        return await self.catalog.model(model_id)

    async def served_models(self, capability: Capability) -> set[str]:
        return await self.catalog.served_models(capability)

    def capacity(self, model: str) -> int:
        return self.catalog.capacity(model)

    def backends_serving(self) -> list[Backend]:
        return self.catalog.backends_serving()

    async def where_served(self, model: str) -> list[Target]:
        return await self.catalog.where_served(model)

    async def warm(self, model: str, cluster: str | None = None, wait: bool = False,
                   tried: Attempts | None = None) -> WarmReply:
        return await self.starts.warm(model, cluster, wait, tried)

    async def heard(self, work: Awaitable[_T], tried: Attempts) -> _T | WaitingAnswer:
        return await self.starts.heard(work, tried)

    def progress_of(self, attempts: Attempts, first: Target, t0: float) -> Progress:
        return self.starts.progress_of(attempts, first, t0)

    async def usage_summary(self, user: str | None = None) -> UsageSummary:
        return await self.accounting.usage_summary(user)

    async def usage_by_user(self) -> dict[str, Any]:
        return await self.accounting.usage_by_user()

    def record_offloaded(self, batch_id: str, model: str, backend: Backend, capability: Capability,
                         latency_ms: float, lines: Sequence[LineUsage]) -> None:
        self.accounting.record_offloaded(batch_id, model, backend, capability, latency_ms, lines)

    async def signed_in(self) -> SignIn:
        return await self.sign_in.signed_in()

    async def login_start(self) -> dict[str, str]:
        return await self.sign_in.login_start()

    async def login_finish(self, code: str) -> SignIn:
        return await self.sign_in.login_finish(code)

    async def logout(self) -> SignIn:
        return await self.sign_in.logout()

    async def set_default_model(self, model: str) -> str:
        """The model clients use when told none (``%%first chat``, the widgets, the sidebar); kept across restarts.

        A request to the OpenAI routes must still name its model (404 otherwise): the default is the clients'
        choice to make, not something to slip into an API call that forgot a field.
        """
        check_model_name(model)
        if model not in self.router.catalog:
            await self.catalog.refresh(eager=True)
        self.router.targets(model)  # a model served nowhere: the 404 that lists what is
        self.preferences.set(DEFAULT_MODEL_KEY, model)
        self.default_model = model
        return model

    async def status(self) -> StatusReply:
        """Clusters, endpoints with their live state, and each model with the best state among its endpoints."""
        endpoints = await self.catalog.endpoint_statuses()
        for backend, endpoint in zip(self.catalog.backends, endpoints, strict=True):
            endpoint.admission = self.admission.status(backend)
        return StatusReply(
            default_model=self.default_model, models=self.catalog.listing().data,  # just read: every state known
            endpoints=endpoints, clusters=sorted(self.config.clusters), auth=await self.signed_in(),
            callbacks=CallbackCounts(open_streams=len(self.callbacks.tasks()), accepted=self.callbacks.accepted,
                                     refused=self.callbacks.refused, url=self.own_callback_url()),
            background=BackgroundFailures.model_validate(self.supervisor.status()))

    # -- requests ----------------------------------------------------------------------------------------

    async def _continued(self, req: ParsedRequest) -> ParsedRequest:
        """A Responses request that continues an earlier response (``previous_response_id``) whose engine keeps
        no responses (``transformers serve``), made whole from the gateway's copy: the earlier conversation before
        this input, the id dropped (that engine would ignore it and answer without the conversation). Any other
        goes as it is, to the endpoint that holds the earlier response (``_targets``)."""
        previous = req.data.get("previous_response_id") if req.capability is Capability.responses else None
        if previous is None:
            return req
        home = await self.responses.home(previous, "previous_response_id")
        backend = self.catalog.backend_of(home.cluster, home.endpoint)
        if backend is None or backend.keeps_responses:
            return req
        earlier = await self.responses.copy(previous)
        if earlier is None:
            return req
        data = {key: value for key, value in req.data.items() if key != "previous_response_id"}
        data["input"] = continued_input(earlier, req.data.get("input"))
        return ParsedRequest(req.capability, data, orjson.dumps(data), asked=req.asked)

    async def _targets(self, req: ParsedRequest, prefix: Prefix | None) -> list[Target]:
        """A request's candidates (``_candidates``); a Responses request that continues an earlier response
        (``previous_response_id``) goes only where that response was created: no other engine holds it."""
        previous = req.data.get("previous_response_id") if req.capability is Capability.responses else None
        if previous is None:
            return await self.catalog.candidates(req.model, req.capability, prefix)
        home = await self.responses.home(previous, "previous_response_id")
        targets = await self.catalog.where_served(req.model)
        pinned = [t for t in targets if (t.cluster, t.endpoint) == (home.cluster, home.endpoint)]
        if not pinned:
            raise OpenAIError(400, f"The response {shown(previous)} (previous_response_id) was created on cluster "
                                   f"'{home.cluster}' endpoint '{home.endpoint}', which does not serve model "
                                   f"'{req.model}'; only that endpoint holds it. Ask for a model it serves (it "
                                   f"created the response with '{home.model}'), or leave previous_response_id "
                                   "out and send the conversation's input in full.", param="previous_response_id",
                              code="invalid_value")
        return self.catalog.allowed(req.model, pinned)

    async def stored_response(self, response_id: str, method: str, action: str, query: str) -> Completed:
        """A call on a kept response (``action``: "" for the response itself, else ``cancel`` or ``input_items``),
        sent to the endpoint that created it and answered as it answers, the model renamed, or from the gateway's
        copy where the engine keeps none (a 404) or cannot be asked again (a 501); a 404 when the id is unknown
        here or its endpoint is gone from the configuration."""
        home = await self.responses.home(response_id)
        backend = self.catalog.backend_of(home.cluster, home.endpoint)
        if backend is None:
            raise OpenAIError(404, f"The response {shown(response_id)} was created on cluster '{home.cluster}' "
                                   f"endpoint '{home.endpoint}', which is no longer in this gateway's configuration; "
                                   "only that endpoint held it. Put the endpoint back in the configuration to reach "
                                   "it, or create the response again.", param="response_id",
                              code="response_endpoint_gone")
        path = "/".join(filter(None, ("responses", quote(response_id, safe=""), action)))
        unreachable: OpenAIError | None = None
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
                    await self.responses.settled()
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
            await self.responses.settled()
        return Completed(rename_model_in_body(reply.body, home.model)[0], Target(home.model, backend))

    def _prefix(self, req: ParsedRequest) -> Prefix | None:
        """The request's opening (``prefix_of``), when there is a choice of endpoint for it to follow: no hashing
        for a model served by one endpoint."""
        if not self.config.defaults.prefix_routing.enabled or len(self.router.catalog.get(req.model, ())) < 2:
            return None
        return prefix_of(req.model, req.data)

    def _may_wait(self, targets: list[Target]) -> bool:
        """Whether the request may come to an endpoint that must start the model first (the best, or one
        failed over to): then it is bounded by ``cold_start.max_wait``, and a stream tells its progress."""
        return any(self.router.state_of(t) in WAITING_STATES for t in targets)

    async def _first_answer(self, req: ParsedRequest, targets: list[Target], tried: Attempts,
                            call: Callable[[Target], Awaitable[_T]]) -> _T:
        """``call`` on each candidate in turn until one answers. A failure before the first byte that another
        endpoint may not share (unreachable, 5xx, 429, a timeout) moves on to the next; any other (the request's
        own fault, a refused sign-in) is the answer; a refusal of the user (403) moves on too, and in a user's own
        server the router leaves that endpoint out for a while (at a shared gateway, where a caller sent it,
        one user's refusal says nothing of the others'). ``tried`` gets each target as it is tried.

        Endpoints the router names are asked to start the model (the best when it must, or another ahead of a
        burst); so is one failed over to that must start it."""
        for target in self.router.to_start(targets):
            self.starts.start(target)
        for target in targets:
            waits = self.router.state_of(target) in WAITING_STATES
            if waits:  # nothing hot answered before it
                self.starts.start(target)
                tried.waits_for(target)
                if self.config.defaults.cold_start.mode == "reject":
                    raise self.starts.not_ready(target)
            tried.holder = await self.admission.began(target)  # a slot of the endpoint (it tells the router)
            tried.add(target, waits or self.router.health_of(target).loaded())
            try:
                return await call(target)
            except OpenAIError as exc:
                self.admission.ended(target, tried.holder)
                if exc.status == FORBIDDEN:  # this user may not use that cluster; another may serve the model
                    if current() is None:
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
                self.admission.ended(target, tried.holder)
                raise
        raise AssertionError("the router gave no candidate")  # candidates() raises its 404 instead

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

    async def complete(self, req: ParsedRequest, tried: Attempts | None = None) -> Completed:
        """Serve a non-streamed request; raises ``OpenAIError`` with the status to send. ``tried``: to follow
        where it goes (``heard``)."""
        if req.capability is Capability.responses:  # (no coroutine on the path of every other request)
            req = await self._continued(req)
        t0 = time.perf_counter()
        request_id = _request_id()
        tried = tried or Attempts()
        prefix = self._prefix(req)

        async def ask(target: Target) -> Reply:
            reply = await target.backend.complete(req.model, req.capability, self._body_for(req, target, False))
            if reply.status >= 400:
                raise upstream_error(reply.status, reply.body, f"cluster '{target.cluster}' endpoint "
                                     f"'{target.endpoint}'", reply.retry_after, reply.via)
            return reply

        try:
            self.ceilings.check(req)
            targets = await self._targets(req, prefix)
            answer = self._first_answer(req, targets, tried, ask)
            if not self._may_wait(targets):
                reply = await answer
            else:
                limit = self.config.defaults.cold_start.max_wait
                try:
                    reply = await asyncio.wait_for(answer, limit)
                except TimeoutError:
                    raise self.starts.not_ready(tried.last or targets[0], waited=limit) from None
        except OpenAIError as exc:
            self.record(req, tried.last, exc.status, t0, None, None, None, request_id, exc.message)
            raise
        except asyncio.CancelledError:  # the client left; the upstream request is already closed
            self.record(req, tried.last, CLIENT_CLOSED, t0, None, None, None, request_id, None)
            raise
        target = tried.targets[-1]
        self.admission.ended(target, tried.holder)
        self.router.succeeded(target, tried.answer_time(time.perf_counter()))
        if reply.content_type is not None and "json" not in reply.content_type:  # a transcript as text, SRT, VTT
            self.record(req, target, reply.status, t0, None, None, None, request_id, None)
            return Completed(reply.body, target, reply.content_type)
        body, prompt_tokens, completion_tokens = rename_model_in_body(reply.body, req.model)
        if req.capability is Capability.responses:
            self.responses.remember_answer(body, target, req.model, req.data)
        self.record(req, target, reply.status, t0, None, prompt_tokens, completion_tokens, request_id, None)
        return Completed(body, target)

    async def stream(self, req: ParsedRequest) -> GatewayStream:
        """Open a stream; errors before the first byte raise ``OpenAIError`` so a real status can be sent."""
        if req.capability is Capability.responses:
            req = await self._continued(req)
        t0 = time.perf_counter()
        request_id = _request_id()
        tried = Attempts()
        options = req.data.get("stream_options")
        ask_usage = req.capability.asks_usage and not (
            isinstance(options, dict) and options.get("include_usage"))

        async def open_stream(target: Target) -> Stream:
            return await target.backend.stream(req.model, req.capability, self._body_for(req, target, ask_usage))

        prefix = self._prefix(req)
        watch = StreamWatch(req.model, rename=True, strip_usage_event=ask_usage)
        try:
            self.ceilings.check(req)
            targets = await self._targets(req, prefix)
            if not self._may_wait(targets):
                upstream = await self._first_answer(req, targets, tried, open_stream)
            else:  # (the opening task keeps the caller: made in the request's context)
                opening = asyncio.ensure_future(self._first_answer(req, targets, tried, open_stream))
                if await self._answers_soon(opening, targets[0]):
                    upstream = opening.result()
                else:  # the status line goes now; the wait is told in the stream
                    return GatewayStream(self, req, targets[0], tried, None, watch, t0, request_id,
                                         opening)
        except OpenAIError as exc:
            self.record(req, tried.last, exc.status, t0, None, None, None, request_id, exc.message)
            raise
        return GatewayStream(self, req, tried.targets[-1], tried, upstream, watch, t0, request_id)

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
        self.starts.cancel_all()
        for backend in self.backends:
            await backend.close()
        for reader in self.scheduler_readers:
            await reader.close()
        await self.client.close()
        await self.usage.aclose()
        await self.responses.aclose()
