"""The catalog: which models are served where, and in what state.

Each model is served from the endpoints listed in config, or discovered from FIRST gateways; the router
(``router``) orders a request's candidates by their states, which are read here in the background (and on every
status request), with discovered catalogs read again when due. The model list and each model's entry are built
from it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import JsonValue

from first_jupyter.api_types import (
    EndpointStatus,
    ModelCapabilities,
    ModelEntry,
    ModelList,
    PublishedDetails,
    RouterHealth,
    ServedBy,
)
from first_jupyter.config import FirstConfig, FirstGatewayCluster
from first_jupyter.gateway.backends.base import Backend
from first_jupyter.gateway.backends.first_gateway import FirstGatewayBackend
from first_jupyter.gateway.caller import current
from first_jupyter.gateway.router import Prefix, Router, Target
from first_jupyter.gateway.supervisor import Supervisor
from first_jupyter.protocol import Capability, OpenAIError, check_model_name

MODEL_STATES = ("hot", "starting", "queued", "cold", "offline")
_MODEL_STATE = {"running": "hot", "online": "hot", "starting": "starting", "queued": "queued", "stopped": "cold",
                "cold": "cold"}
STATUS_PERIOD_S = 30.0
STATUS_MAX_INTERVAL_S = 300.0


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


class Catalog:
    """The endpoints, the models each serves, their states as last read, and the router that orders them."""

    def __init__(self, config: FirstConfig, backends: Sequence[Backend], supervisor: Supervisor) -> None:
        self.backends = list(backends)
        self.supervisor = supervisor
        self.configured: dict[str, list[str]] = {}
        """Each model listed in config → its ``cluster/endpoint`` places (discovered ones come later)."""
        for cluster_name, cluster in config.clusters.items():
            if isinstance(cluster, FirstGatewayCluster):
                continue  # known once discovered
            for ep in cluster.endpoints:
                for model in ep.models:
                    self.configured.setdefault(model.id, []).append(f"{cluster_name}/{ep.name}")
        self.router = Router(self.backends, self.configured, config.defaults.scale_out,
                             prefix_routing=config.defaults.prefix_routing)
        self.discovering = [b for b in self.backends if isinstance(b, FirstGatewayBackend)]
        self._discovery: asyncio.Lock | None = None
        self.probe_intervals: dict[int, float] = {}
        """Backend id → seconds between its background status readings (longer while it is offline)."""
        self.state_observers: list[Callable[[list[dict[str, Any]]], None]] = []
        """Called with every endpoint status reading (token ceilings, a shared gateway's metrics)."""
        self._created = int(time.time())

    def observe(self, endpoints: list[dict[str, Any]]) -> None:
        """Give the router each model's state at each endpoint just read (it orders candidates by them) and the
        blocks up, then the observers each reading (they see the router's view of it)."""
        by_name = {(e["cluster"], e["endpoint"]): e for e in endpoints}
        for model, targets in self.router.catalog.items():
            for target in targets:
                endpoint = by_name.get((target.cluster, target.endpoint))
                if endpoint is not None:
                    self.router.observe_state(target.backend, model, _model_state(endpoint, model))
        for backend in self.backends:
            blocks = by_name.get((backend.cluster, backend.name), {}).get("managers")
            if isinstance(blocks, int):  # blocks connected, each with its engine
                self.router.observe_blocks(backend, blocks)
        for observer in self.state_observers:
            observer(endpoints)

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
                await self.refresh()
                endpoints = await self.readings(probe)
                self.observe(endpoints)
                for backend, endpoint in zip(probe, endpoints, strict=True):
                    offline = endpoint.get("state") in ("offline", "failed")
                    interval[id(backend)] = min(interval[id(backend)] * 2, STATUS_MAX_INTERVAL_S) if offline \
                        else period
                    due[id(backend)] = time.monotonic() + interval[id(backend)]
            return max(min(due.values(), default=now + period) - time.monotonic(), 0.05)

        await self.supervisor.repeat("status readings", read_due, period)

    async def readings(self, backends: Sequence[Backend]) -> list[dict[str, Any]]:
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

    async def refresh(self, *, eager: bool = False) -> None:
        """Read the catalogs of FIRST gateways whose last reading is due (one reading at a time)."""
        if not any(b.due(eager=eager) for b in self.discovering):
            return
        if self._discovery is None:
            self._discovery = asyncio.Lock()
        async with self._discovery:
            due = [b for b in self.discovering if b.due(eager=eager)]
            found = await asyncio.gather(*(b.discover() for b in due), return_exceptions=True)
            for backend, models in zip(due, found, strict=True):
                if isinstance(models, list):
                    self.router.serve(backend, models)
                elif not isinstance(models, OpenAIError):  # a bug, not an unreachable gateway: say so
                    self.supervisor.failed("catalog readings", models, backend.where)

    def refresh_in_background(self) -> None:
        if any(b.due() for b in self.discovering):
            self.supervisor.spawn("catalog readings", self.refresh())

    async def candidates(self, model: str, capability: Capability, prefix: Prefix | None = None) -> list[Target]:
        """The router's candidates on the clusters the caller may use, reading discovered catalogs first when the
        model is not (yet) in them."""
        return self.allowed(model, await self.routed(model, capability, prefix))

    @staticmethod
    def allowed(model: str, targets: list[Target]) -> list[Target]:
        """``targets`` on the clusters the caller (``caller.current``) may use (all of them for no caller); 403
        when none is."""
        caller = current()
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
        await self.refresh()
        return {model for model, targets in self.router.catalog.items()
                if any(t.backend.supports(model, capability) for t in targets)}

    def capacity(self, model: str) -> int:
        """How many requests for ``model`` its endpoints take at once (0 where it is served nowhere)."""
        return sum(self.router.health_of(t).capacity for t in self.router.catalog.get(model, ()))

    def prefix_counts(self) -> list[tuple[str, str, int, int]]:
        """Each endpoint's (cluster, endpoint, requests routed by their opening, prefix hits), for ``/metrics``."""
        health = self.router.health_of_backend
        return [(b.cluster, b.name, health(b).prefix_routed, health(b).prefix_hits) for b in self.backends]

    def backends_serving(self) -> list[Backend]:
        """Each endpoint that serves some model now, once."""
        return list({id(t.backend): t.backend for targets in self.router.catalog.values() for t in targets}.values())

    async def where_served(self, model: str) -> list[Target]:
        """Where ``model`` is served, discovered catalogs read first when it is not in them; the 404 that lists
        what is served when nowhere (a shared gateway asks before charging a quota: a name made up by a client
        must not leave rows in the quota store)."""
        if model not in self.router.catalog:
            await self.refresh(eager=True)
        return self.router.targets(model)

    async def routed(self, model: str, capability: Capability, prefix: Prefix | None) -> list[Target]:
        if self.discovering:
            if model in self.router.catalog:
                self.refresh_in_background()  # a known model is served now; the reading can follow
            else:
                await self.refresh(eager=True)
                failures = [b.failure for b in self.discovering if b.failure]
                if failures and model not in self.router.catalog:
                    signin = [f for f in failures if f.status == 401]
                    if signin:
                        raise signin[0]  # it says how to sign in
                    raise OpenAIError(404, f"The model '{model}' is not in the catalog here, and reading a FIRST "
                                           f"gateway's catalog failed: {'; '.join(f.message for f in failures)}",
                                      param="model", code="model_not_found")
        return self.router.candidates(model, capability, prefix)

    async def models(self) -> ModelList:
        """The OpenAI model list, each model once, with where it is served."""
        await self.refresh()
        return self.listing()

    def listing(self) -> ModelList:
        """Each model once, where it is served and its state there as last read (``unknown`` before the first
        reading): no endpoint is probed on this path, which clients call before every prompt."""
        return ModelList(object="list", data=[self.model_entry(model_id, targets)
                                              for model_id, targets in self.router.catalog.items()])

    def model_entry(self, model_id: str, targets: list[Target]) -> ModelEntry:
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
        await self.refresh(eager=model_id not in self.router.catalog)
        return self.model_entry(model_id, self.router.targets(model_id))

    def backend_of(self, cluster: str, endpoint: str) -> Backend | None:
        return next((b for b in self.backends if (b.cluster, b.name) == (cluster, endpoint)), None)


    async def endpoint_statuses(self) -> list[EndpointStatus]:
        """Every endpoint's live state, read now, with the router's view of it (``/first/api/status``)."""
        await self.refresh()
        readings = await self.readings(self.backends)
        self.observe(readings)
        endpoints = []
        for backend, endpoint in zip(self.backends, readings, strict=True):
            health = self.router.health_of_backend(backend)
            endpoints.append(EndpointStatus.model_validate({**endpoint, "router": RouterHealth(
                in_flight=health.in_flight, ttft_ms=round(health.ttft_s * 1000, 1), failures=health.failures,
                last_error=health.last_error, allowed=health.forbidden_until <= self.router.clock(),
                circuit="open" if health.open_until > self.router.clock() else "closed",
                expected_start_s=round(health.start_s, 1), prefix_routed=health.prefix_routed,
                prefix_hits=health.prefix_hits)}))
        return endpoints
