"""Backend for an existing FIRST inference gateway (ALCF's, for instance), used as one cluster of ours.

Such a gateway serves ``{root}/{cluster}/{framework}/v1/...`` and has no ``/v1/models``: what it serves is read
from its ``list-endpoints`` route, and which models are running, starting or queued from ``{cluster}/jobs``.
The facility changes both without telling anyone, so both are read live (and reused for ``refresh`` seconds),
never written into our config. Requests carry the user's Globus token, like every call to that gateway.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from first_jupyter.api_types import PublishedDetails
from first_jupyter.config import FirstGatewayEndpoint, ModelConfig
from first_jupyter.gateway.backends.base import RequestBody
from first_jupyter.gateway.backends.http import STATUS_TIMEOUT, HttpBackend
from first_jupyter.gateway.bearer import BearerTokens
from first_jupyter.gateway.upstream import Reply, UpstreamClient, UpstreamStream, upstream_error
from first_jupyter.protocol import Capability, OpenAIError
from first_jupyter.transport.http_client import Reach, Url

_CAPABILITIES = {"chat": Capability.chat, "completion": Capability.completions,
                 "completions": Capability.completions, "embedding": Capability.embeddings,
                 "embeddings": Capability.embeddings}
"""The route names an older FIRST gateway's ``list-endpoints`` used, as our capabilities."""
_CAPABILITY_OF_PATH = {cap.path.strip("/"): cap for cap in Capability if cap.path.startswith("/v1/")}
"""The paths today's ``list-endpoints`` names per framework (``/v1/{e}`` for each of the cluster's
``openai_endpoints``: chat/completions, completions, embeddings, responses, messages at FIRST 329c0cd), as our
capabilities: each is sent to ``{cluster}/{framework}`` plus that path. A path FIRST lists that no capability
of ours has is left out; FIRST serves nothing at an engine's root (tokenize, pooling...)."""
_JOB_STATES = {"starting": "starting", "loading": "starting", "pending": "starting",
               "disconnected": "disconnected"}
"""A running job's ``Model Status`` that does not mean it answers: FIRST's ``clusters/globus_compute.py`` says
``starting``, or ``disconnected`` when the job's Globus Compute managers are lost; any other value means it does."""
_STATE_ORDER = ("running", "starting", "queued", "stopped", "disconnected")
"""Job states, best first: a disconnected job answers nothing, and a stopped model at least can be started."""
_T = TypeVar("_T")
log = logging.getLogger(__name__)
RETRY_S = 5.0
"""After a failed discovery (the user not signed in yet, say), how soon asking again is worth it."""
FIRST_WAIT_S = 330.0
"""The least first-byte wait for a FIRST gateway: it waits up to 300 s for its own endpoint before answering 408,
and that answer must reach us to count as the failure it is (not as our own timeout with nothing learnt)."""


class _Framework(BaseModel):
    """One framework of a cluster, as FIRST's ``FrameworkSummary`` (resource_server_async/schemas/endpoints.py):
    ``endpoints`` is a list of OpenAI paths without the framework (``/v1/chat/completions``); an older gateway's
    mapping of route name to path (framework included) is read too."""

    model_config = ConfigDict(extra="allow")
    models: list[str] = []
    endpoints: list[str] | dict[str, str] = []


class _Cluster(BaseModel):
    """FIRST's ``ClusterSummary``: ``base_url`` is a path on the gateway's host (``/resource_server/sophia``)."""

    model_config = ConfigDict(extra="allow")
    base_url: str | None = None
    frameworks: dict[str, _Framework] = {}


class _Catalog(BaseModel):
    """FIRST's ``ListEndpointsResponse``, the answer of ``GET /list-endpoints``."""

    model_config = ConfigDict(extra="allow")
    clusters: dict[str, _Cluster]


class _Job(BaseModel):
    """One job of ``GET /{cluster}/jobs``, as FIRST's ``JobInfo`` (resource_server_async/schemas/clusters.py):
    ``Models`` is comma-separated (an older gateway said ``Models Served``), and a running job has a
    ``Model Status``."""

    model_config = ConfigDict(extra="allow")
    models: str = Field(validation_alias=AliasChoices("Models", "Models Served"))
    framework: str = Field(validation_alias="Framework")
    cluster: str | None = Field(default=None, validation_alias="Cluster")
    model_status: str = Field(default="", validation_alias="Model Status")


class _Jobs(BaseModel):
    """FIRST's ``JobsByStatus``; its ``stopped`` list (every model, under maintenance) says what no job says, and
    ``cluster_status`` what the scheduler says of the cluster (free nodes, for instance), as the cluster's adapter
    fills it (clusters/*.py)."""

    model_config = ConfigDict(extra="allow")
    running: list[_Job] = []
    queued: list[_Job] = []
    cluster_status: dict[str, Any] = {}


_UP: TypeAdapter[dict[str, bool]] = TypeAdapter(dict[str, bool])
"""``GET /status`` (views/core.py ``status_check``, no authentication): public cluster → up (False: under
maintenance)."""


class _ModelDetails(PublishedDetails):
    """One entry of ``GET /{cluster}/models``: FIRST's ``BaseEndpoint.build_model_details``
    (resource_server_async/endpoints/endpoint.py, with ``MODEL_DETAILS_KEYS``; views/core.py ``get_models``):
    the id, then what the facility published of the model. Only these public keys are kept."""

    model_config = ConfigDict(extra="ignore")
    id: str


_DETAILS: TypeAdapter[list[_ModelDetails]] = TypeAdapter(list[_ModelDetails])


def parse_details(data: Any) -> dict[str, PublishedDetails]:
    """Model id → its published details (only the keys it has). Raises ``ValidationError`` for another shape."""
    return {entry.id: PublishedDetails.model_validate(entry.model_dump(exclude={"id"}, exclude_none=True))
            for entry in _DETAILS.validate_python(data)}


def in_band_error(event: bytes, where: str) -> OpenAIError | None:
    """The failure a FIRST gateway reports inside a 200 stream, in place of its first event: ``data:
    {"object": "error", "message", "code"}`` then ``[DONE]`` (resource_server_async/streaming.py, and
    endpoints/globus_compute.py for its 30 s wait for the first data). None when the event is content.

    Its ``code`` is the status: a 4xx is the request's own fault (the engine's 400, passed through); a 5xx, a 408
    (judged as the timeout it is) or anything else is a failure before the first byte, which fails over. Its 401
    is FIRST's own internal secret failing, not the user's token, so it is a 502 too."""
    for line in event.splitlines():
        if not line.startswith(b"data:"):
            continue
        try:
            data = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict) or data.get("object") != "error":
            return None
        code = data.get("code")
        status = code if isinstance(code, int) and 400 <= code < 600 and code != 401 else 502
        return OpenAIError(status, f"{where} reported in its stream, before any content: {data.get('message')} "
                                   f"(code {code}).", type="invalid_request_error" if status in (400, 404, 422)
                           else "api_error", code="upstream_error")
    return None


def shape_of(exc: ValidationError) -> str:
    """The first thing wrong with an answer, short enough for an error message (where, then what)."""
    first = exc.errors(include_url=False)[0]
    return f"{'.'.join(str(part) for part in first['loc']) or 'the answer'}: {first['msg']}"


@dataclass(frozen=True, slots=True)
class Place:
    """Where one model is served on the remote gateway: its cluster, its framework and the route per capability."""

    cluster: str
    framework: str
    urls: dict[Capability, Url]


def _routes(framework: str, entry: _Framework) -> dict[Capability, str]:
    """A framework's paths under its cluster's ``base_url``, per capability."""
    if isinstance(entry.endpoints, dict):  # an older gateway: route name → path with the framework
        return {_CAPABILITIES[name]: path for name, path in entry.endpoints.items() if name in _CAPABILITIES}
    return {_CAPABILITY_OF_PATH[key]: f"{framework}/{key}" for path in entry.endpoints
            if (key := path.strip("/")) in _CAPABILITY_OF_PATH}


def parse_catalog(data: Any, origin: str, root: str, wanted: list[str] | None,
                  make_url: Callable[[str], Url] = Url.parse) -> dict[str, list[Place]]:
    """The models a ``list-endpoints`` answer names, each with its places; ``wanted`` keeps only those clusters.
    Raises ``ValidationError`` (a ``ValueError``) for an answer in another shape.

    A cluster's ``base_url`` is a path on the gateway's host (``/resource_server/sophia``); without one the
    cluster sits under the configured root.
    """
    catalog: dict[str, list[Place]] = {}
    for cluster, info in _Catalog.model_validate(data).clusters.items():
        if wanted is not None and cluster not in wanted:
            continue
        base = (info.base_url or f"{root}/{cluster}").rstrip("/")
        for framework, entry in info.frameworks.items():
            urls = {cap: make_url(f"{origin}{base}/{path.lstrip('/')}")
                    for cap, path in _routes(framework, entry).items()}
            for model in entry.models:
                if model and urls:
                    catalog.setdefault(model, []).append(Place(cluster, framework, urls))
    return catalog


def parse_jobs(data: Any, cluster: str) -> dict[tuple[str, str], str]:
    """Each (framework, model) the cluster's jobs list, as ``running``, ``starting``, ``disconnected`` or
    ``queued``. Raises ``ValidationError`` (a ``ValueError``) for an answer in another shape."""
    return read_jobs(data, cluster)[0]


def read_jobs(data: Any, cluster: str) -> tuple[dict[tuple[str, str], str], dict[str, Any]]:
    """``parse_jobs``'s states, and the cluster's ``cluster_status`` (what its scheduler says: free nodes...)."""
    jobs = _Jobs.model_validate(data)
    states: dict[tuple[str, str], str] = {}
    for listed, default in ((jobs.queued, "queued"), (jobs.running, "running")):  # running wins over queued
        for job in listed:
            if (job.cluster or cluster) != cluster:
                continue
            state = default if default == "queued" else _JOB_STATES.get(job.model_status.strip().lower(),
                                                                          "running")
            for model in job.models.split(","):
                if model.strip():
                    key = (job.framework, model.strip())
                    if key not in states or _STATE_ORDER.index(state) < _STATE_ORDER.index(states[key]):
                        states[key] = state
    return states, jobs.cluster_status


class FirstGatewayBackend(HttpBackend):
    kind = "first"
    first_event_limit = 64 * 1024
    """The most bytes read ahead to see a stream's first event before handing the stream on."""

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
        self.first_byte = endpoint.first_byte or max(client.timeouts.first_byte, FIRST_WAIT_S)
        self._refresh = endpoint.refresh
        self._list_url = self.url(f"{self.base_url}/list-endpoints")
        self.catalog: dict[str, list[Place]] = {}
        self.discovered_at = self.failed_at = -RETRY_S - endpoint.refresh
        self.failure: OpenAIError | None = None
        """Why the last discovery failed; None after a success."""
        self._states: dict[tuple[str, str, str], str] = {}
        """(cluster, framework, model) → job state, from the last status read."""
        self._details: dict[str, PublishedDetails] = {}
        """Model id → what ``{cluster}/models`` publishes of it (kept from the last reading that worked)."""

    async def call(self, method: str, path: str, query: str, body: bytes | None) -> Reply:
        """A FIRST gateway routes by the model in a body: a call on a response it created has none, so the response
        cannot be found again through it."""
        raise OpenAIError(501, f"{self.where} is a FIRST gateway, through which this gateway cannot reach a response "
                               f"again (/{path}): retrieve, delete, cancel and input_items need a direct (http) "
                               "endpoint to the engine that created it. Keep what responses.create answered instead.",
                          type="api_error", code="not_implemented")

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

    async def _read(self, what: str, parse: Callable[[Any], _T]) -> _T:
        """``GET {base_url}/{what}``, read by ``parse``. A refusal is judged as any other (a token's 401 says how
        to sign in); an answer that is not JSON, or JSON in a shape ``parse`` does not know (FIRST changed it),
        is a 502 that names the route, so the next change upstream is found from the message."""
        route = f"GET {self._root}/{what}"
        reply = await self._client.request("GET", self.url(f"{self.base_url}/{what}"), await self._head(), None,
                                           self.where, first_byte=STATUS_TIMEOUT)
        if reply.status != 200:
            error = upstream_error(reply.status, reply.body, f"{self.where} ({route})", via=reply.via)
            judged = self._judged(error)
            if judged is None and reply.status == 403 and self._globus is not None:
                error.message += " Ask the gateway's operators for access."
            raise judged or error
        try:
            return parse(orjson.loads(reply.body))
        except orjson.JSONDecodeError:
            raise OpenAIError(502, f"{self.where} answered {route} with something that is not JSON; check "
                                   f"that base_url ({self.base_url}) is the gateway's resource_server root.",
                              type="api_error", code="upstream_error") from None
        except ValidationError as exc:
            raise OpenAIError(502, f"{self.where} answered {route} in a shape this gateway does not read "
                                   f"({shape_of(exc)}): the FIRST gateway may have changed it. Check that base_url "
                                   f"({self.base_url}) is a FIRST gateway's resource_server root, and report it.",
                              type="api_error", code="upstream_error") from None

    async def discover(self) -> list[str]:
        """Read what the gateway serves now; the model ids, for the router's catalog."""
        try:
            catalog = await self._read("list-endpoints", lambda data: parse_catalog(
                data, self._origin, self._root, self._wanted, self.url))
        except OpenAIError as exc:
            self.failure, self.failed_at = exc, time.monotonic()
            raise
        clusters = sorted({p.cluster for places in catalog.values() for p in places})
        for details in await asyncio.gather(*(self._cluster_details(c) for c in clusters)):
            self._details.update(details)
        # only now, with no await left: a reader who finds this reading fresh (not ``due``) finds it whole
        self.catalog, self.failure = catalog, None
        self._models = {m: ModelConfig(id=m) for m in catalog}
        self.discovered_at = time.monotonic()
        return sorted(catalog)

    async def _cluster_details(self, cluster: str) -> dict[str, PublishedDetails]:
        """What one remote cluster publishes of its models; nothing when it cannot be read (an older gateway
        without the route, say): the details add to the catalog, and never hold it back."""
        try:
            return await self._read(f"{cluster}/models", parse_details)
        except OpenAIError as exc:
            log.info("%s: no model details from %s/models (%s)", self.where, cluster, exc.message)
            return {}

    def model_details(self, model_id: str) -> PublishedDetails | None:
        found = self._details.get(model_id)
        return found if found is not None and found.model_fields_set else None  # (published nothing)

    def _judged(self, error: OpenAIError) -> OpenAIError | None:
        """As any endpoint's, and FIRST's 408 (``request_timeout``, after its own 300 s wait for the model) is a
        504: a failure before the first byte, which fails over like any timeout (a 408 would blame the client)."""
        if error.status == 408:
            return OpenAIError(504, f"{error.message} The FIRST gateway gave up waiting for the model, which may "
                                    "still be starting: retry shortly, or check GET /first/api/status.",
                               type="api_error", code="upstream_timeout")
        return super()._judged(error)

    async def stream(self, model_id: str, capability: Capability, body: RequestBody) -> UpstreamStream:
        """Open the stream and read its first event before handing it on: a FIRST gateway reports some failures
        inside its 200 stream (``in_band_error``), and those must fail before the first byte as an error status
        would, so that the request fails over, or waits for a start, instead of relaying the error as an answer."""
        stream = await super().stream(model_id, capability, body)
        try:
            error = in_band_error(await stream.first_event(self.first_event_limit), self.where)
        except BaseException:
            stream.close()
            raise
        if error is not None:
            stream.close()
            raise self._judged(error) or error
        return stream

    async def warm(self, model_id: str) -> None:
        """A FIRST gateway starts a model for its first request, so warming is one request of one token."""
        capability = next(c for c in (Capability.chat, Capability.completions, Capability.embeddings)
                          if self.supports(model_id, c))
        body: dict[str, object]  # the three shapes below, one type
        body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1} \
            if capability is Capability.chat else {"model": model_id, "input": "hi"} \
            if capability is Capability.embeddings else {"model": model_id, "prompt": "hi", "max_tokens": 1}
        reply = await self.complete(model_id, capability, orjson.dumps(body))
        if reply.status >= 400:
            raise upstream_error(reply.status, reply.body, self.where, reply.retry_after, reply.via)

    async def _jobs(self, cluster: str) -> tuple[str, tuple[dict[tuple[str, str], str], dict[str, Any]] | str]:
        """One remote cluster's job states and scheduler status, or why they could not be read."""
        try:
            return cluster, await self._read(f"{cluster}/jobs", lambda data: read_jobs(data, cluster))
        except OpenAIError as exc:
            return cluster, exc.message

    async def _up(self) -> dict[str, bool]:
        """Which public clusters are up (not under maintenance); nothing when ``/status`` cannot be read."""
        try:
            return await self._read("status", _UP.validate_python)
        except OpenAIError as exc:
            log.info("%s: no maintenance status (%s)", self.where, exc.message)
            return {}

    async def status(self) -> dict[str, Any]:
        started = time.perf_counter()
        info: dict[str, Any] = {"cluster": self.cluster, "endpoint": self.name, "kind": self.kind,
                                "base_url": self.base_url}
        if self.failure is not None:  # the gateway refreshed the catalog just before asking
            return {**info, "state": "offline", "models": sorted(self.catalog), "error": self.failure.message}
        clusters = sorted({p.cluster for places in self.catalog.values() for p in places})
        up, *read_jobs_of = await asyncio.gather(self._up(), *(self._jobs(c) for c in clusters))
        jobs = dict(read_jobs_of)
        states: dict[tuple[str, str, str], str] = {}
        model_states: dict[str, str] = {}
        for model, places in self.catalog.items():
            found = []
            for place in places:
                read = jobs.get(place.cluster)
                state = read[0].get((place.framework, model), "stopped") if isinstance(read, tuple) else None
                if state is not None:
                    states[(place.cluster, place.framework, model)] = state
                    found.append(state)
            if found:  # a cluster whose jobs could not be read says nothing about the model's state
                model_states[model] = min(found, key=_STATE_ORDER.index)
        self._states = states
        return {**info, "state": "online", "models": sorted(self.catalog), "model_states": model_states,
                "latency_ms": round((time.perf_counter() - started) * 1000, 2),
                "remote_clusters": {c: self._remote_cluster(c, jobs[c], up.get(c)) for c in clusters}}

    def _remote_cluster(self, cluster: str, jobs: tuple[dict[tuple[str, str], str], dict[str, Any]] | str,
                        up: bool | None) -> dict[str, Any]:
        """What the status API says of one remote cluster: the models it serves (so that the sidebar shows a
        model's maintenance and free nodes where it runs), its jobs read (or why not), its maintenance (when its
        ``/status`` says), and what its scheduler says (``cluster_status``: free nodes, for a wait estimate)."""
        models = sorted(m for m, places in self.catalog.items() if any(p.cluster == cluster for p in places))
        info: dict[str, Any] = {"models": models, "jobs": "read" if isinstance(jobs, tuple) else jobs}
        if up is not None:
            info["maintenance"] = not up
        if isinstance(jobs, tuple) and jobs[1]:
            info["scheduler"] = jobs[1]
        return info
