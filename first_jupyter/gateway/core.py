"""The Gateway: validate, route, call the backend, account usage.

Handlers, magics, widgets and the CLI all go through this one object, so behaviour (errors, accounting,
timeouts) is the same whichever door a request came in by.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import orjson

from first_jupyter.auth.manager import TokenManager
from first_jupyter.auth.tokens import AuthError
from first_jupyter.config import (
    ComputeEndpoint,
    FirstConfig,
    FirstGatewayCluster,
    FirstGatewayEndpoint,
    HttpCluster,
    HttpEndpoint,
    LocalCluster,
)
from first_jupyter.gateway.backends.base import Backend, Stream
from first_jupyter.gateway.backends.compute import CallWindow, ComputeBackend
from first_jupyter.gateway.backends.first_gateway import FirstGatewayBackend
from first_jupyter.gateway.backends.http import HttpBackend
from first_jupyter.gateway.backends.local import LocalBackend
from first_jupyter.gateway.bearer import BearerTokens
from first_jupyter.gateway.callbacks import CALLBACK_PATH, CallbackHub
from first_jupyter.gateway.preferences import Preferences
from first_jupyter.gateway.relay import StreamWatch, rename_model_in_body
from first_jupyter.gateway.router import Router, Target
from first_jupyter.gateway.upstream import Reply, UpstreamClient, upstream_error
from first_jupyter.gateway.usage import UsageRecord, UsageStore
from first_jupyter.protocol import Capability, OpenAIError, ParsedRequest

DEFAULT_MODEL_KEY = "default_model"
MODEL_STATES = ("hot", "starting", "queued", "cold", "offline")
"""A model's state for users, best first: answers now, soon, after a batch job starts, after a cold start, not."""
_MODEL_STATE = {"running": "hot", "online": "hot", "starting": "starting", "queued": "queued", "stopped": "cold",
                "failed": "offline", "offline": "offline"}
"""Endpoint states (local engines, http upstreams) and job states (a FIRST gateway's) as model states."""
STATUS_PERIOD_S = 30.0
STATUS_MAX_INTERVAL_S = 300.0
FAILOVER_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Failures before the first byte that the next endpoint may not have: worth trying it."""
FORBIDDEN = 403
CLIENT_CLOSED = 499  # nginx's convention for "the client went away before the answer was complete"
_T = TypeVar("_T")
_REQUEST_IDS = itertools.count(1)
_ID_PREFIX = f"{os.getpid():x}-{int(time.time()):x}"


def _model_state(endpoint: dict[str, Any], model: str) -> str:
    """A model's state at one endpoint: its own when the endpoint tells states per model (a FIRST gateway's
    jobs), else the endpoint's."""
    own = endpoint.get("model_states", {}).get(model) if endpoint["state"] == "online" else None
    return _MODEL_STATE.get(own or endpoint["state"], "offline")


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
                globus=(tokens, ep.globus_resource_server) if ep.globus_resource_server else None)
                for ep in cluster.endpoints)
        elif isinstance(cluster, LocalCluster):
            backends.extend(LocalBackend(cluster_name, ep, client, gateway.data_dir / "logs")
                            for ep in cluster.endpoints)
        elif isinstance(cluster, FirstGatewayCluster):
            backends.extend(FirstGatewayBackend(cluster_name, ep, client, tokens) for ep in cluster.endpoints)
        else:
            backends.extend(_compute_backend(gateway, cluster_name, ep, environ) for ep in cluster.endpoints)
    return backends


def _compute_backend(gateway: Gateway, cluster: str, endpoint: ComputeEndpoint,
                     environ: Mapping[str, str]) -> Backend:
    """A Globus Compute endpoint's backend. The SDK and the engine are imported only by gateways that have one
    (they are slow to import, and a Jupyter server's start should not wait for them)."""
    where = f"cluster '{cluster}' endpoint '{endpoint.name}'"
    idle = gateway.config.defaults.timeouts.idle
    if endpoint.in_process is not None:
        from first_jupyter.gateway.compute_local import InProcessSubmitter

        local = InProcessSubmitter(endpoint, gateway.data_dir / "compute" / f"{cluster}-{endpoint.name}",
                                   gateway.data_dir / "logs" / f"engine-{cluster}-{endpoint.name}.log", where)
        return ComputeBackend(cluster, endpoint, local, gateway.callbacks, idle, gateway.own_callback_url,
                              engine_port=local.port, upstream_name=local.served_name)

    from first_jupyter.gateway.compute_cloud import (
        CloudSubmitter,
        UserTokenAuthorizer,
        service_authorizer,
    )

    def authorizer() -> Any:
        if endpoint.identity == "service":
            return service_authorizer(endpoint, dict(environ))
        return UserTokenAuthorizer(gateway.auth)

    submitter = CloudSubmitter(endpoint, authorizer, gateway.preferences, gateway.compute_window, where)
    return ComputeBackend(cluster, endpoint, submitter, gateway.callbacks, idle, lambda: endpoint.callback_url)


def _endpoint_scopes(config: FirstConfig) -> dict[str, list[str]]:
    """The scopes of the endpoints that take Globus tokens, for ``first login`` to ask for along with the rest."""
    scopes: dict[str, list[str]] = {}
    for cluster in config.clusters.values():
        for ep in cluster.endpoints:
            if isinstance(ep, HttpEndpoint | FirstGatewayEndpoint) and ep.globus_resource_server and ep.globus_scope:
                scopes.setdefault(ep.globus_resource_server, []).append(ep.globus_scope)
    return scopes


class Completed:
    """A finished non-streamed answer, with where it ran."""

    __slots__ = ("body", "target")

    def __init__(self, body: bytes, target: Target) -> None:
        self.body = body
        self.target = target


class GatewayStream:
    """A relayed stream: upstream bytes out as they come, usage recorded when it is closed."""

    __slots__ = ("_gateway", "_req", "_t0", "_ttft", "_upstream", "_watch", "error", "request_id", "target")

    def __init__(self, gateway: Gateway, req: ParsedRequest, target: Target, upstream: Stream,
                 watch: StreamWatch, t0: float, request_id: str) -> None:
        self._gateway = gateway
        self._req = req
        self.target = target
        self._upstream = upstream
        self._watch = watch
        self._t0 = t0
        self._ttft: float | None = None
        self.error: OpenAIError | None = None
        self.request_id = request_id

    async def relay(self, write: Callable[[bytes], bool]) -> None:
        """Send the stream into ``write`` chunk by chunk as the upstream delivers it; return at its end.

        ``write`` returns False when the client is not keeping up; call ``resume`` once it has drained. An
        upstream failure after the first byte ends the stream with an OpenAI error event.
        """
        feed = self._watch.feed

        def sink(chunk: bytes) -> bool:
            if self._ttft is None:
                self._ttft = time.perf_counter()
            out = feed(chunk)
            return write(out) if out else True  # an empty write would end a chunked response

        try:
            await self._upstream.pipe(sink)
        except OpenAIError as exc:  # the status line is already sent: say it in the stream
            self.error = exc
            write(exc.sse_event())

    def resume(self) -> None:
        self._upstream.resume_reading()

    def close(self, *, client_gone: bool = False) -> None:
        """Release the upstream (closing it if unfinished, so the engine stops) and record usage."""
        self._upstream.close()
        status = CLIENT_CLOSED if client_gone else (self.error.status if self.error else 200)
        router = self._gateway.router
        router.ended(self.target)
        if self.error is not None:
            router.failed(self.target, self.error.message)  # broke off mid-stream: keep it out if it goes on
        elif self._ttft is not None:
            router.succeeded(self.target, self._ttft - self._t0)
        watch = self._watch
        self._gateway.record(self._req, self.target, status, self._t0, self._ttft, watch.prompt_tokens,
                             watch.completion_tokens, self.request_id,
                             self.error.message if self.error else None)


class Gateway:
    def __init__(self, config: FirstConfig, data_dir: Path, environ: Mapping[str, str] | None = None) -> None:
        """``environ``: where token sources read variables (default ``os.environ``; the server passes a copy
        taken before it removed the token variables from its own environment, which kernels inherit)."""
        self.config = config
        self.data_dir = data_dir
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
        self.backends = _build_backends(self, environ)
        served: dict[str, list[str]] = {}
        for cluster_name, cluster in config.clusters.items():
            if isinstance(cluster, FirstGatewayCluster):
                continue  # known once discovered
            for ep in cluster.endpoints:
                for model in ep.models:
                    served.setdefault(model.id, []).append(f"{cluster_name}/{ep.name}")
        self.router = Router(self.backends, served)
        self._discovering = [b for b in self.backends if isinstance(b, FirstGatewayBackend)]
        self._discovery: asyncio.Lock | None = None
        self._background: set[asyncio.Task[None]] = set()
        chosen = self.preferences.get(DEFAULT_MODEL_KEY)  # the user's last choice, while it is still served
        self.default_model = chosen if chosen in served or (chosen and self._discovering) else (
            config.defaults.model or next(iter(served), None))
        self.usage = UsageStore(data_dir / "usage.sqlite3")
        self._created = int(time.time())

    def _observe(self, endpoints: list[dict[str, Any]]) -> None:
        """Give the router each model's state at each endpoint just read: it orders candidates by them."""
        by_name = {(e["cluster"], e["endpoint"]): e for e in endpoints}
        for model, targets in self.router.catalog.items():
            for target in targets:
                endpoint = by_name.get((target.cluster, target.endpoint))
                if endpoint is not None:
                    self.router.observe_state(target.backend, model, _model_state(endpoint, model))

    async def keep_states_fresh(self, period: float = STATUS_PERIOD_S) -> None:
        """Read every endpoint's status in the background, so the router's states are never older than
        ``period``; an endpoint found offline is read less and less often (up to ``STATUS_MAX_INTERVAL_S``), so a
        cluster that is down for the night costs nothing, and is read at the normal pace again once it answers."""
        interval = self.probe_intervals = {id(b): period for b in self.backends}
        due = {id(b): 0.0 for b in self.backends}
        while True:
            now = time.monotonic()
            probe = [b for b in self.backends if due[id(b)] <= now]
            if probe:
                await self.refresh_catalog()
                endpoints = list(await asyncio.gather(*(b.status() for b in probe)))
                self._observe(endpoints)
                for backend, endpoint in zip(probe, endpoints, strict=True):
                    offline = endpoint.get("state") in ("offline", "failed")
                    interval[id(backend)] = min(interval[id(backend)] * 2, STATUS_MAX_INTERVAL_S) if offline \
                        else period
                    due[id(backend)] = time.monotonic() + interval[id(backend)]
            await asyncio.sleep(max(min(due.values(), default=now + period) - time.monotonic(), 0.05))

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
                    raise models

    def _refresh_in_background(self) -> None:
        if any(b.due() for b in self._discovering):
            task = asyncio.get_running_loop().create_task(self.refresh_catalog())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _candidates(self, model: str, capability: Capability) -> list[Target]:
        """The router's candidates, reading discovered catalogs first when the model is not (yet) in them."""
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
        return self.router.candidates(model, capability)

    async def _first_answer(self, req: ParsedRequest, tried: list[Target],
                            call: Callable[[Target], Awaitable[_T]]) -> _T:
        """``call`` on each candidate in turn until one answers. A failure before the first byte that another
        endpoint may not share (unreachable, 5xx, 429, a timeout) moves on to the next; any other (the request's
        own fault, a refused sign-in) is the answer; a refusal of the user (403) moves on too, and the router leaves
        that endpoint out for a while. ``tried`` gets each target as it is tried."""
        targets = await self._candidates(req.model, req.capability)
        for target in targets:
            tried.append(target)
            self.router.began(target)
            try:
                return await call(target)
            except OpenAIError as exc:
                self.router.ended(target)
                if exc.status == FORBIDDEN:  # this user may not use that cluster; another may serve the model
                    self.router.forbid(target, exc.message)
                elif exc.status in FAILOVER_STATUSES:
                    self.router.failed(target, exc.message)
                else:
                    raise
                if target is targets[-1]:
                    if len(tried) > 1:
                        exc.message = f"Every endpoint serving '{req.model}' failed ({len(tried)} tried); " \
                                      f"the last: {exc.message}"
                    raise
            except BaseException:
                self.router.ended(target)
                raise
        raise AssertionError("the router gave no candidate")  # candidates() raises its 404 instead

    async def models(self) -> dict[str, Any]:
        """The OpenAI model list, each model once, with where it is served."""
        await self.refresh_catalog()
        return self._listing()

    def _listing(self) -> dict[str, Any]:
        """Each model once, where it is served and its state there as last read (``unknown`` before the first
        reading): no endpoint is probed on this path, which clients call before every prompt."""
        data = []
        for model_id, targets in self.router.catalog.items():
            caps = sorted({c.value for t in targets for c in Capability if t.backend.supports(model_id, c)})
            served = [{"cluster": t.cluster, "endpoint": t.endpoint,
                       "state": self.router.health_of(t).states.get(model_id, "unknown")} for t in targets]
            known = [s["state"] for s in served if s["state"] in MODEL_STATES]
            data.append({"id": model_id, "object": "model", "created": self._created, "owned_by": "first",
                         "capabilities": caps, "state": min(known, key=MODEL_STATES.index, default="unknown"),
                         "served_by": served})
        return {"object": "list", "data": data}

    async def set_default_model(self, model: str) -> str:
        """The model clients use when told none (``%%first chat``, the widgets, the sidebar); kept across restarts.

        A request to the OpenAI routes must still name its model (404 otherwise): the default is the clients'
        choice to make, not something to slip into an API call that forgot a field.
        """
        if model not in self.router.catalog:
            await self.refresh_catalog(eager=True)
        self.router.targets(model)  # a model served nowhere: the 404 that lists what is
        self.preferences.set(DEFAULT_MODEL_KEY, model)
        self.default_model = model
        return model

    async def usage_summary(self) -> dict[str, Any]:
        """Requests, tokens and latency per model, from the usage store (recent requests included)."""
        rows = await asyncio.to_thread(self._usage_rows)
        keys = ("model", "requests", "errors", "prompt_tokens", "completion_tokens", "mean_latency_ms",
                "mean_ttft_ms", "last_used")
        return {"object": "list", "data": [dict(zip(keys, row, strict=True)) for row in rows]}

    def _usage_rows(self) -> list[tuple[object, ...]]:
        self.usage.flush()
        return self.usage.query(
            "SELECT model, COUNT(*), SUM(status >= 400), COALESCE(SUM(prompt_tokens), 0), "
            "COALESCE(SUM(completion_tokens), 0), AVG(latency_ms), AVG(ttft_ms), MAX(ts) "
            "FROM usage WHERE model != '' GROUP BY model ORDER BY model")

    async def status(self) -> dict[str, Any]:
        """Clusters, endpoints with their live state, and each model with the best state among its endpoints."""
        await self.refresh_catalog()
        endpoints = list(await asyncio.gather(*(b.status() for b in self.backends)))  # probes run side by side
        self._observe(endpoints)
        models = self._listing()["data"]  # just read: every state is known
        for backend, endpoint in zip(self.backends, endpoints, strict=True):
            health = self.router.health_of_backend(backend)
            endpoint["router"] = {"in_flight": health.in_flight, "ttft_ms": round(health.ttft_s * 1000, 1),
                                  "failures": health.failures, "last_error": health.last_error,
                                  "allowed": health.forbidden_until <= time.monotonic(),
                                  "circuit": "open" if health.open_until > time.monotonic() else "closed"}
        return {"default_model": self.default_model, "models": models, "endpoints": endpoints,
                "clusters": sorted(self.config.clusters), "auth": await self.signed_in(),
                "callbacks": {"open_streams": len(self.callbacks.tasks()), "accepted": self.callbacks.accepted,
                              "refused": self.callbacks.refused, "url": self.own_callback_url()}}

    # -- the user's Globus identity (blocking work: sources read files, the hub, Globus Auth) ----------------

    async def signed_in(self) -> dict[str, Any]:
        """Who is signed in, with which source and until when; never a token."""
        return await asyncio.to_thread(self.auth.whoami)

    async def login_start(self) -> dict[str, str]:
        return {"url": await asyncio.to_thread(self._auth_call, self.auth.login_start)}

    async def login_finish(self, code: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._auth_call, self.auth.login_finish, code)

    async def logout(self) -> dict[str, Any]:
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

    def _body_for(self, req: ParsedRequest, target: Target, ask_usage: bool) -> bytes:
        """The request as the engine must see it: the client's own bytes unless something must change."""
        upstream_name = target.backend.upstream_name(req.model)
        if upstream_name == req.model and not ask_usage:
            return req.raw
        data = dict(req.data)
        data["model"] = upstream_name
        if ask_usage:
            data["stream_options"] = {**(data.get("stream_options") or {}), "include_usage": True}
        return orjson.dumps(data)

    def record(self, req: ParsedRequest, target: Target | None, status: int, t0: float, ttft: float | None,
               prompt_tokens: int | None, completion_tokens: int | None, request_id: str,
               error: str | None) -> None:
        self.usage.record(UsageRecord(  # positional: the fields in order, cheaper than keywords per request
            time.time(), request_id, req.model, target.cluster if target else "",
            target.endpoint if target else "", req.capability.value, req.stream, status, prompt_tokens,
            completion_tokens, (time.perf_counter() - t0) * 1000, (ttft - t0) * 1000 if ttft else None, error))

    async def complete(self, req: ParsedRequest) -> Completed:
        """Serve a non-streamed request; raises ``OpenAIError`` with the status to send."""
        t0 = time.perf_counter()
        request_id = _request_id()
        tried: list[Target] = []

        async def ask(target: Target) -> Reply:
            reply = await target.backend.complete(req.model, req.capability, self._body_for(req, target, False))
            if reply.status >= 400:
                raise upstream_error(reply.status, reply.body, f"cluster '{target.cluster}' endpoint "
                                     f"'{target.endpoint}'", reply.retry_after)
            return reply

        try:
            reply = await self._first_answer(req, tried, ask)
        except OpenAIError as exc:
            self.record(req, tried[-1] if tried else None, exc.status, t0, None, None, None, request_id,
                        exc.message)
            raise
        except asyncio.CancelledError:  # the client left; the upstream request is already closed
            self.record(req, tried[-1] if tried else None, CLIENT_CLOSED, t0, None, None, None, request_id, None)
            raise
        target = tried[-1]
        self.router.ended(target)
        self.router.succeeded(target, time.perf_counter() - t0)
        body, prompt_tokens, completion_tokens = rename_model_in_body(reply.body, req.model)
        self.record(req, target, reply.status, t0, None, prompt_tokens, completion_tokens, request_id, None)
        return Completed(body, target)

    async def stream(self, req: ParsedRequest) -> GatewayStream:
        """Open a stream; errors before the first byte raise ``OpenAIError`` so a real status can be sent."""
        t0 = time.perf_counter()
        request_id = _request_id()
        tried: list[Target] = []
        options = req.data.get("stream_options")
        ask_usage = req.capability is not Capability.embeddings and not (
            isinstance(options, dict) and options.get("include_usage"))

        async def open_stream(target: Target) -> Stream:
            return await target.backend.stream(req.model, req.capability, self._body_for(req, target, ask_usage))

        try:
            upstream = await self._first_answer(req, tried, open_stream)
        except OpenAIError as exc:
            self.record(req, tried[-1] if tried else None, exc.status, t0, None, None, None, request_id,
                        exc.message)
            raise
        watch = StreamWatch(req.model, rename=True, strip_usage_event=ask_usage)
        return GatewayStream(self, req, tried[-1], upstream, watch, t0, request_id)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for backend in self.backends:
            await backend.close()
        await self.client.close()
        self.usage.close()
