"""The JSON answers of the gateway's own routes, typed: status, models, usage, warm, whoami and batches.

Each answer is built once as one of these models where the gateway makes it, and serialized once by the door
(``ApiObject.to_json``). Their JSON Schema is the source of the sidebar's TypeScript types
(``labextension/src/api-types.generated.ts``, written by ``scripts/gen-types.py``), so the panel and the gateway
cannot drift apart unnoticed: ``tests/test_generated_types.py`` fails when the generated file is stale.

A key that an answer may leave out is a field with a default that the builder does not set: it is left out of
the JSON as before (``exclude_unset``), rather than sent as ``null``. Where a shape is the facility's (what a FIRST
gateway publishes of a model, what a scheduler says, an engine's own facts), what is known is typed and the rest
is passed on as it came (``extra="allow"``).
"""

from __future__ import annotations

from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, JsonValue


class ApiObject(BaseModel):
    """An answer of the gateway's own routes."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)  # (the docstrings: the schema's)

    def to_json(self) -> bytes:
        """The answer as the door sends it; keys the builder left out stay out."""
        return self.__pydantic_serializer__.to_json(self, exclude_unset=True)

    def json_value(self) -> dict[str, JsonValue]:
        """The answer as its JSON reads, for a caller in this process that reads it as a client would."""
        return self.model_dump(mode="json", exclude_unset=True)


def json_body(answer: ApiObject | dict[str, Any] | list[Any]) -> bytes:
    """A route's JSON answer as the door sends it: a typed answer serialized once, or a plain JSON value (an
    OpenAI file object, a deletion's acknowledgement) as it is."""
    return answer.to_json() if isinstance(answer, ApiObject) else orjson.dumps(answer)


class OpenObject(ApiObject):
    """An object whose other keys are the facility's or an engine's own, passed on as they came."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)


# -- models -----------------------------------------------------------------------------------------------------


class ServedBy(ApiObject):
    """One endpoint serving a model, and the model's state there as last read."""

    cluster: str
    endpoint: str
    state: str


class ModelCapabilities(OpenObject):
    """What the gateway routes to a model, in the shape a FIRST gateway publishes (its ``capabilities``);
    the model's FIRST gateway's own keys (``context_window_tokens``, ``input_modalities``, ``tool_calling``...) are
    kept as it says them."""

    schema_version: int
    api_protocols: list[str]
    """The kinds of request routed to the model (``chat``, ``completions``...: ``protocol.Capability``)."""
    streaming: JsonValue
    """Whether one of them streams, or the FIRST gateway's own word on it."""


class PublishedDetails(ApiObject):
    """What a FIRST gateway publishes of a model (``GET /{cluster}/models``: FIRST's ``build_model_details``), its
    public keys only; a key it did not publish is left out."""

    display_name: str | None = None
    description: str | None = None
    capabilities: dict[str, JsonValue] | None = None
    """``api_protocols``, ``streaming``, ``tool_calling``, ``context_window_tokens``, ``input_modalities``..."""
    rate_limit_token_per_minute: int | None = None
    rate_limit_token_per_minute_per_user: int | None = None


class ModelEntry(ApiObject):
    """One model of the list (``GET /v1/models``): an OpenAI Model object with its capabilities, state and
    places."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    capabilities: ModelCapabilities
    state: str
    """The best state among its endpoints (``hot``, ``starting``, ``queued``, ``cold``, ``offline``; ``unknown``
    before the first reading)."""
    served_by: list[ServedBy]
    details: PublishedDetails | None = None
    """What its FIRST gateway publishes of it, when one does."""


class ModelList(ApiObject):
    object: Literal["list"]
    data: list[ModelEntry]


# -- status -----------------------------------------------------------------------------------------------------


class RouterHealth(ApiObject):
    """What the router knows of an endpoint: its load, speed, failures and whether it takes requests now."""

    in_flight: int
    ttft_ms: float
    failures: int
    last_error: str | None
    allowed: bool
    """False while the endpoint refuses this gateway (403), until it is tried again."""
    circuit: Literal["open", "closed"]
    expected_start_s: float
    prefix_routed: int
    """Requests with an opening (system prompt, first messages) routed here while the model had a choice."""
    prefix_hits: int
    """Of those, the ones sent here because it was last sent part of their opening (its prefix cache holds it)."""


class AdmissionStatus(ApiObject):
    """An endpoint's slots: who holds them, who waits for them, and the batch concurrency the controller chose."""

    capacity: int
    in_flight_interactive: int
    in_flight_batch: int
    queued_interactive: int
    queued_batch: int
    batch_concurrency: int
    """The batch lines it may have in flight now: the AIMD window, less the slots kept for interactive traffic."""
    batch_held: bool
    """Batch lines wait because interactive requests missed their target and the controller cut the batch
    concurrency (the sidebar shows the batch as paused for interactive traffic)."""
    engine_waiting: int | None = None
    """Requests waiting in the engine's own queue, where it reports it (vLLM's ``vllm:num_requests_waiting``)."""


class RemoteCluster(OpenObject):
    """One cluster of a FIRST gateway, as our endpoint in front of it reads it."""

    models: list[str] = []
    jobs: str
    """``read``, or why its jobs could not be read."""
    maintenance: bool = False
    """Whether FIRST's ``GET /status`` says it is under maintenance; absent when that could not be read."""
    scheduler: dict[str, JsonValue] = {}
    """What its scheduler says (FIRST's ``cluster_status``: free nodes, queued jobs...), as the facility fills it."""


class ModelDownload(OpenObject):
    """The embedded default's model being fetched from the hub (``model_download``)."""

    repo: str
    state: Literal["waiting", "downloading", "done", "failed"]
    done_bytes: int
    total_bytes: int
    error: str | None = None


class EndpointStatus(OpenObject):
    """One endpoint's status reading: its state, and what its kind of backend tells besides."""

    cluster: str
    endpoint: str
    kind: str | None = None
    state: str
    """The endpoint's own word (``running``, ``stopped``, ``offline``...), not a model state."""
    error: str | None = None
    router: RouterHealth | None = None
    admission: AdmissionStatus | None = None
    """Its slots per class (``gateway.admission``)."""
    remote_clusters: dict[str, RemoteCluster] = {}
    """For an endpoint in front of a FIRST gateway (``kind: first``): that gateway's clusters."""
    download: ModelDownload | None = None
    note: str | None = None
    """What the gateway says of the endpoint's model (the tiny offline model served, and why)."""


class TokenInfo(ApiObject):
    expires_at: float | None
    expired: bool
    refreshable: bool


class SignIn(OpenObject):
    """Who is signed in, through what and until when (``/first/api/whoami``); never a token. A shared gateway
    answers with its caller's identity instead (``username``, ``groups``, ``admin``...)."""

    signed_in: bool
    source: str | None = None
    identity: dict[str, str] | None = None
    tokens: dict[str, TokenInfo] = {}
    help: str | None = None


class CallbackCounts(ApiObject):
    """Remote streams' batches from nodes (``gateway.backends.compute.callbacks``)."""

    open_streams: int
    accepted: int
    refused: int
    url: str | None


class TaskFailures(OpenObject):
    failures: int


class BackgroundFailures(ApiObject):
    """The gateway's background tasks' failures (``supervisor``)."""

    failures: int
    tasks: dict[str, TaskFailures]


class StatusReply(ApiObject):
    """``GET /first/api/status``: clusters, endpoints with their live state, and each model's best state."""

    default_model: str | None
    models: list[ModelEntry]
    endpoints: list[EndpointStatus]
    clusters: list[str]
    auth: SignIn
    callbacks: CallbackCounts
    background: BackgroundFailures


# -- usage, warm ------------------------------------------------------------------------------------------------


class UsageRow(ApiObject):
    """One model's requests, tokens and latency."""

    model: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    mean_latency_ms: float | None
    mean_ttft_ms: float | None
    last_used: float | None
    last_latency_ms: float | None


class UsageSummary(ApiObject):
    """``GET /first/api/usage``; ``user``: whose requests, where a shared gateway answers for one user."""

    object: Literal["list"]
    data: list[UsageRow]
    user: str | None = None


class WarmReply(ApiObject):
    """``POST /first/api/models/{id}/warm``: where the model starts (or runs), its state and the expected wait."""

    model: str
    cluster: str
    endpoint: str
    state: str
    started: bool
    expected_s: float


# -- batches ----------------------------------------------------------------------------------------------------


class RequestCounts(ApiObject):
    total: int
    completed: int
    failed: int


class BatchReply(OpenObject):
    """One batch (``/first/v1/batches/{id}``): OpenAI's Batch object."""

    id: str
    object: Literal["batch"]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str
    output_file_id: str | None
    error_file_id: str | None
    errors: dict[str, JsonValue] | None
    created_at: int
    expires_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    paused_for_interactive: bool | None = None
    """While it runs here: its lines wait because interactive traffic holds its model's batch concurrency down."""


class BatchPage(ApiObject):
    """A page of batches (``GET /first/v1/batches``), newest first."""

    object: Literal["list"]
    data: list[BatchReply]
    first_id: str | None
    last_id: str | None
    has_more: bool


SCHEMA_ROOTS: tuple[type[ApiObject], ...] = (StatusReply, ModelList, UsageSummary, WarmReply, SignIn, BatchReply,
                                         BatchPage)
"""The answers whose types the sidebar uses (``scripts/gen-types.py``)."""
