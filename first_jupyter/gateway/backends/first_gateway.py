"""Backend for an existing FIRST inference gateway (ALCF's, for instance), used as one cluster of ours.

Such a gateway serves ``{root}/{cluster}/{framework}/v1/...`` and has no ``/v1/models``: what it serves is read
from its ``list-endpoints`` route, and which models are running, starting or queued from ``{cluster}/jobs``.
The facility changes both without telling anyone, so both are read live (and reused for ``refresh`` seconds),
never written into our config. Requests carry the user's Globus token, like every call to that gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from first_jupyter.config import FirstGatewayEndpoint, ModelConfig
from first_jupyter.gateway.backends.http import STATUS_TIMEOUT, HttpBackend
from first_jupyter.gateway.bearer import BearerTokens
from first_jupyter.gateway.upstream import UpstreamClient, upstream_error
from first_jupyter.protocol import Capability, OpenAIError
from first_jupyter.transport.http_client import Reach, Url

_CAPABILITIES = {"chat": Capability.chat, "completion": Capability.completions,
                 "completions": Capability.completions, "embedding": Capability.embeddings,
                 "embeddings": Capability.embeddings}
"""The route names a FIRST gateway's ``list-endpoints`` uses, as our capabilities."""
_JOB_STATES = {"starting": "starting", "loading": "starting", "pending": "starting"}
"""A running job's ``Model Status`` that does not mean it answers yet; any other value means it does."""
_STATE_ORDER = ("running", "starting", "queued", "stopped")
RETRY_S = 5.0
"""After a failed discovery (the user not signed in yet, say), how soon asking again is worth it."""


@dataclass(frozen=True, slots=True)
class Place:
    """Where one model is served on the remote gateway: its cluster, its framework and the route per capability."""

    cluster: str
    framework: str
    urls: dict[Capability, Url]


def parse_catalog(data: Any, origin: str, root: str, wanted: list[str] | None,
                  make_url: Callable[[str], Url] = Url.parse) -> dict[str, list[Place]]:
    """The models a ``list-endpoints`` answer names, each with its places; ``wanted`` keeps only those clusters.

    A cluster's ``base_url`` is a path on the gateway's host (``/resource_server/sophia``); without one the
    cluster sits under the configured root.
    """
    if not isinstance(data, dict) or not isinstance(data.get("clusters"), dict):
        raise ValueError("the answer has no 'clusters' mapping")
    catalog: dict[str, list[Place]] = {}
    for cluster, info in data["clusters"].items():
        if (wanted is not None and cluster not in wanted) or not isinstance(info, dict):
            continue
        base = str(info.get("base_url") or f"{root}/{cluster}").rstrip("/")
        for framework, entry in (info.get("frameworks") or {}).items():
            if not isinstance(entry, dict):
                continue
            routes = entry.get("endpoints") or {}
            urls = {_CAPABILITIES[name]: make_url(f"{origin}{base}/{str(path).lstrip('/')}")
                    for name, path in routes.items() if name in _CAPABILITIES}
            for model in entry.get("models") or []:
                if isinstance(model, str) and model and urls:
                    catalog.setdefault(model, []).append(Place(cluster, framework, urls))
    return catalog


def parse_jobs(data: Any, cluster: str) -> dict[tuple[str, str], str]:
    """Each (framework, model) the cluster's jobs list, as ``running``, ``starting`` or ``queued``."""
    states: dict[tuple[str, str], str] = {}
    if not isinstance(data, dict):
        return states
    for listed, default in (("queued", "queued"), ("running", "running")):  # running wins over queued
        for job in data.get(listed) or []:
            if not isinstance(job, dict) or job.get("Cluster", cluster) != cluster:
                continue
            state = default if listed == "queued" else _JOB_STATES.get(
                str(job.get("Model Status", "")).strip().lower(), "running")
            for model in str(job.get("Models Served", "")).split(","):
                if model.strip():
                    key = (str(job.get("Framework", "")), model.strip())
                    if _STATE_ORDER.index(state) < _STATE_ORDER.index(states.get(key, "stopped")):
                        states[key] = state
    return states


class FirstGatewayBackend(HttpBackend):
    kind = "first"

    def __init__(self, cluster: str, endpoint: FirstGatewayEndpoint, client: UpstreamClient,
                 tokens: BearerTokens, reach: Reach | None = None) -> None:
        super().__init__(cluster, endpoint.name, endpoint.base_url, [], client, api_key_env=endpoint.api_key_env,
                         globus=(tokens, endpoint.globus_resource_server) if endpoint.globus_resource_server
                         else None, capacity=endpoint.concurrency, reach=reach)
        parts = urlsplit(self.base_url)
        self._origin = f"{parts.scheme}://{parts.netloc}"
        self._root = parts.path
        self._wanted = endpoint.clusters
        self.start_s = endpoint.expected_start
        self._refresh = endpoint.refresh
        self._list_url = self.url(f"{self.base_url}/list-endpoints")
        self.catalog: dict[str, list[Place]] = {}
        self.discovered_at = self.failed_at = -RETRY_S - endpoint.refresh
        self.failure: OpenAIError | None = None
        """Why the last discovery failed; None after a success."""
        self._states: dict[tuple[str, str, str], str] = {}
        """(cluster, framework, model) → job state, from the last status read."""

    def due(self, *, eager: bool = False) -> bool:
        """Time to read the catalog again: the last reading is old (``eager``: a few seconds old, for a model
        not in it), and no failure was seen just now."""
        now = time.monotonic()
        return (now - self.discovered_at >= (RETRY_S if eager else self._refresh)
                and now - self.failed_at >= RETRY_S)

    def supports(self, model_id: str, capability: Capability) -> bool:
        return any(capability in place.urls for place in self.catalog.get(model_id, ()))

    def _best_place(self, model_id: str, capability: Capability) -> Place:
        able = [p for p in self.catalog.get(model_id, ()) if capability in p.urls]
        if not able:
            raise OpenAIError(404, f"{self.where} no longer lists model '{model_id}' for {capability.route}. "
                                   "GET /first/v1/models lists what is served now.", code="model_not_found")
        return min(able, key=lambda p: _STATE_ORDER.index(
            self._states.get((p.cluster, p.framework, model_id), "stopped")))

    def _url(self, model_id: str, capability: Capability) -> Url:
        return self._best_place(model_id, capability).urls[capability]

    async def _get_json(self, url: Url, what: str) -> Any:
        reply = await self._client.request("GET", url, await self._head(), None, self.where,
                                           first_byte=STATUS_TIMEOUT)
        self._refused(reply.status)
        if reply.status != 200:
            error = upstream_error(reply.status, reply.body, f"{self.where} ({what})", via=reply.via)
            if reply.status in (401, 403) and self._globus is not None:
                error.message += (" The gateway refused your Globus sign-in: run `%first login` (or `first login` "
                                  "in a terminal) to sign in again, or ask its operators for access.")
            raise error
        try:
            return orjson.loads(reply.body)
        except orjson.JSONDecodeError:
            raise OpenAIError(502, f"{self.where} answered {what} with something that is not JSON; check "
                                   f"that base_url ({self.base_url}) is the gateway's resource_server root.",
                              type="api_error", code="upstream_error") from None

    async def discover(self) -> list[str]:
        """Read what the gateway serves now; the model ids, for the router's catalog."""
        try:
            data = await self._get_json(self._list_url, "list-endpoints")
            try:
                catalog = parse_catalog(data, self._origin, self._root, self._wanted, self.url)
            except ValueError as exc:
                raise OpenAIError(502, f"{self.where} answered list-endpoints in an unknown shape ({exc}); is "
                                       f"base_url ({self.base_url}) a FIRST gateway?", type="api_error",
                                  code="upstream_error") from None
        except OpenAIError as exc:
            self.failure, self.failed_at = exc, time.monotonic()
            raise
        self.catalog, self.failure = catalog, None
        self._models = {m: ModelConfig(id=m) for m in catalog}
        self.discovered_at = time.monotonic()
        return sorted(catalog)

    async def warm(self, model_id: str) -> None:
        """A FIRST gateway starts a model for its first request, so warming is one request of one token."""
        capability = next(c for c in (Capability.chat, Capability.completions, Capability.embeddings)
                          if self.supports(model_id, c))
        body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1} \
            if capability is Capability.chat else {"model": model_id, "input": "hi"} \
            if capability is Capability.embeddings else {"model": model_id, "prompt": "hi", "max_tokens": 1}
        reply = await self.complete(model_id, capability, orjson.dumps(body))
        if reply.status >= 400:
            raise upstream_error(reply.status, reply.body, self.where, reply.retry_after, reply.via)

    async def _jobs(self, cluster: str) -> tuple[str, dict[tuple[str, str], str] | str]:
        """One remote cluster's job states, or why they could not be read."""
        try:
            data = await self._get_json(self.url(f"{self.base_url}/{cluster}/jobs"), f"{cluster}/jobs")
        except OpenAIError as exc:
            return cluster, exc.message
        return cluster, parse_jobs(data, cluster)

    async def status(self) -> dict[str, Any]:
        started = time.perf_counter()
        info: dict[str, Any] = {"cluster": self.cluster, "endpoint": self.name, "kind": self.kind,
                                "base_url": self.base_url}
        if self.failure is not None:  # the gateway refreshed the catalog just before asking
            return {**info, "state": "offline", "models": sorted(self.catalog), "error": self.failure.message}
        clusters = sorted({p.cluster for places in self.catalog.values() for p in places})
        jobs = dict(await asyncio.gather(*(self._jobs(c) for c in clusters)))
        states: dict[tuple[str, str, str], str] = {}
        model_states: dict[str, str] = {}
        for model, places in self.catalog.items():
            found = []
            for place in places:
                read = jobs.get(place.cluster)
                state = read.get((place.framework, model), "stopped") if isinstance(read, dict) else None
                if state is not None:
                    states[(place.cluster, place.framework, model)] = state
                    found.append(state)
            if found:  # a cluster whose jobs could not be read says nothing about the model's state
                model_states[model] = min(found, key=_STATE_ORDER.index)
        self._states = states
        return {**info, "state": "online", "models": sorted(self.catalog), "model_states": model_states,
                "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                "remote_clusters": {c: {"jobs": "read" if isinstance(jobs[c], dict) else jobs[c]}
                                    for c in clusters}}
