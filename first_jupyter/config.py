"""One typed configuration model for the gateway, and its loader.

Configuration comes from a YAML file (``c.FirstExtension.config_file`` or ``$FIRST_CONFIG``) or, with neither,
from the embedded default: one cluster named ``local`` whose endpoint starts an engine on this machine. A bad
file must fail loudly at start with the file, the key path and what was expected, because a gateway that
starts with half a config fails later on a user's request, far from the mistake.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from first_jupyter.embedded_model import TINY_MODEL_ID, choose_default_model
from first_jupyter.protocol import Capability
from first_jupyter.transport.proxies import NO_PROXY_SETTING, ProxyError, parse_proxy

LOCAL_MODEL_ENV = "FIRST_LOCAL_MODEL"
CONFIG_ENV = "FIRST_CONFIG"


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""Cluster and endpoint names: they go into response headers, URLs and log lines, so plain ASCII words only."""
Name = Annotated[str, Field(pattern=NAME_PATTERN)]


class ConfigError(Exception):
    """A configuration problem, worded as: where (file and key path), what was expected, what was found."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """A model served by an endpoint, under the public ``id`` users put in requests."""

    id: str = Field(min_length=1)
    upstream_name: str | None = Field(
        default=None, description="name the engine knows the model by, when it differs from id"
    )
    path: str | None = Field(
        default=None, description="local engines: a directory or hub id to load; defaults to id"
    )
    capabilities: list[Capability] = Field(
        default=[Capability.chat, Capability.completions],
        description="what the engine serves for this model, each an API route: chat, completions, embeddings, and "
                    "messages where the engine serves Anthropic's /v1/messages itself (vLLM does; it implies "
                    "count_tokens, /v1/messages/count_tokens, which vLLM serves with it). A model with chat and "
                    "without messages still answers /v1/messages: the gateway translates it to chat")

    @field_validator("capabilities")
    @classmethod
    def _messages_count_tokens(cls, capabilities: list[Capability]) -> list[Capability]:
        """An engine that serves Anthropic's Messages API serves its token count with it (vLLM does)."""
        if Capability.messages in capabilities and Capability.count_tokens not in capabilities:
            return [*capabilities, Capability.count_tokens]
        return capabilities
    max_tokens: int | None = Field(
        default=None, ge=1, description="the most tokens a request may ask for (max_tokens, max_completion_tokens): "
                                        "more is refused with a 400 before any work; default: the engine's own "
                                        "limit where it reports one (vLLM's max_model_len)")
    build_tiny: bool = Field(
        default=False, description="local engines: if path holds no model, build the tiny offline model there"
    )
    download: str | None = Field(
        default=None, description="in-process engines: a Hugging Face hub repository downloaded into path once, "
                                  "before the engine first starts (the embedded default's real model)")
    note: str | None = Field(
        default=None, description="what the gateway says of this model at start and in /first/api/status (why "
                                  "the embedded default serves it)")


class Timeouts(_Strict):
    """Idle timeouts, in seconds: a long generation that keeps streaming is never cut off."""

    connect: float = Field(default=10.0, gt=0)
    first_byte: float = Field(default=300.0, gt=0, description="no response headers within this: fail")
    idle: float = Field(default=120.0, gt=0, description="no chunk within this after the first: fail")


class Limits(_Strict):
    max_request_bytes: int = Field(default=8 * 1024 * 1024, gt=0)
    max_response_bytes: int = Field(default=64 * 1024 * 1024, gt=0,
                                    description="largest non-streamed upstream answer taken (streams are relayed "
                                                "as they come, so they have no such limit)")
    max_audio_bytes: int = Field(default=25 * 1024 * 1024, gt=0,
                                 description="largest audio file taken by /v1/audio/transcriptions and translations "
                                             "(OpenAI's and vLLM's limit); it is spooled to disk, never held in "
                                             "memory")
    max_connections: int = Field(default=512, gt=0, description="pooled upstream connections in all")
    max_connections_per_host: int = Field(default=128, gt=0)
    max_client_connections: int = Field(default=1024, gt=0,
                                        description="open client connections to the gateway's own door; past it a "
                                                    "new one is answered 503 and closed, so idle sockets cannot use "
                                                    "up the Jupyter server's file descriptors")


class ColdStart(_Strict):
    """What a request does when nothing serving its model is hot, once the best endpoint was asked to start it."""

    mode: Literal["wait", "reject"] = Field(
        default="wait", description="wait: a stream gets SSE comments with progress, a plain request waits up to "
                                    "max_wait; reject: 503 with Retry-After at once (the start goes on)")
    max_wait: float = Field(default=600.0, gt=0, description="seconds a plain request waits for a start")
    progress_every: float = Field(default=5.0, gt=0, description="seconds between a stream's progress comments")


class ScaleOut(_Strict):
    """How many of a model's endpoints the router keeps hot, beyond the one that answers: a burst of requests
    drains through every hot engine at once, while a cold one takes a queue wait and minutes of loading to help."""

    keep_hot: Literal["all", "peak", "predicted"] = Field(
        default="all", description="all: every endpoint serving a model in use is kept hot (one that is cold is "
                                   "started, one at a time), so a burst finds them all ready; peak: only as many as "
                                   "the most requests the model had in flight within peak_window need (fewer "
                                   "node-hours, slower bursts); predicted: as many as its forecast demand needs "
                                   "(the requests in flight averaged over demand_window, or the same hours a day "
                                   "earlier), the others left to idle out")
    peak_window: float = Field(default=86400.0, gt=0,
                               description="seconds over which 'peak' remembers a model's most requests in flight")
    demand_window: float = Field(default=900.0, gt=0,
                                 description="seconds over which 'predicted' averages a model's requests in flight")
    burst_hours: int = Field(default=3, ge=1,
                             description="'predicted' also keeps hot what a model's burst needs once its hourly peak "
                                         "of requests in flight came back in this many of the hours around now (the "
                                         "last 8, and the 8 ahead a day earlier); fewer: more node-hours, faster "
                                         "bursts")


class PrefixRouting(_Strict):
    """Where a request's opening was sent before: an engine's prefix cache holds it there, and its first token
    comes sooner (a long system prompt, a conversation's earlier turns, a batch's shared instructions)."""

    enabled: bool = Field(default=True, description="among hot endpoints about as fast as the best, send a request "
                                                     "where the longest part of its opening (system prompt, first "
                                                     "messages) was last sent; and send a batch's lines that share "
                                                     "an opening together")
    tolerance: float = Field(default=1.0, ge=0, description="seconds of expected time to first token within which "
                                                            "hot endpoints are as good: the one holding the "
                                                            "request's prefix is taken, else the least loaded")


class BatchDefaults(_Strict):
    """Batches: how large an input may be, and how hard a run presses the endpoints."""

    max_file_bytes: int = Field(default=200 * 1024 * 1024, gt=0, description="largest batch input file taken")
    max_file_lines: int = Field(default=50_000, gt=0, description="most lines (requests) in a batch input file")
    max_in_flight: int = Field(default=1024, gt=0, description="most requests one batch keeps in flight per model; "
                                                                "below that, what the model's endpoints serve at "
                                                                "once (their concurrency times the blocks up)")
    max_attempts: int = Field(default=5, ge=1, description="tries of a request that fails transiently (429, "
                                                           "5xx, a timeout), with backoff, before its error is "
                                                           "its result")
    interactive_ttft_target: float = Field(
        default=2.0, gt=0, description="seconds: the time to first token interactive requests should keep while "
                                       "batches run. An endpoint's batch concurrency is halved when an interactive "
                                       "request misses it (or waits a quarter of it for a slot, or the engine "
                                       "reports requests waiting), and grows back step by step while none does")


class Admission(_Strict):
    """Who gets an endpoint's slots (its concurrency times the blocks up): interactive requests first, batches
    (their lines and offloaded chunks) in what is left, and within each class the users in weighted fair order;
    a request that finds no slot waits in its endpoint's queue, which is bounded."""

    max_queued: int = Field(default=5000, gt=0, description="requests of one class waiting for one endpoint's "
                                                            "slots; past it a 429 with Retry-After")
    max_queued_per_user: int = Field(default=1000, gt=0, description="requests of one user and class waiting for "
                                                                     "one endpoint's slots; past it a 429 with "
                                                                     "Retry-After, so one user's burst cannot "
                                                                     "fill the queue for the others")
    weights: dict[str, float] = Field(
        default={}, description="user name -> weight (default 1): within a class, a user of weight 2 is served "
                                "twice as often as one of weight 1 while both have requests waiting")

    @field_validator("weights")
    @classmethod
    def _positive(cls, weights: dict[str, float]) -> dict[str, float]:
        bad = sorted(user for user, weight in weights.items() if not weight > 0)
        if bad:
            raise ValueError(f"weights must be > 0 (the users {', '.join(bad)} are not)")
        return weights


class Defaults(_Strict):
    model: str | None = None
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    cold_start: ColdStart = ColdStart()
    scale_out: ScaleOut = ScaleOut()
    batch: BatchDefaults = BatchDefaults()
    admission: Admission = Admission()
    max_response_ids: int = Field(
        default=100_000, gt=0, description="response ids remembered with the endpoint that created each (for "
                                           "GET/DELETE /v1/responses/{id} and previous_response_id); the oldest "
                                           "are forgotten beyond it")
    prefix_routing: PrefixRouting = PrefixRouting()

    @model_validator(mode="before")
    @classmethod
    def _replaced(cls, data: Any) -> Any:
        """A config written for an earlier version names what replaced its setting, rather than only "extra"."""
        if isinstance(data, dict) and "sticky_conversations" in data:
            raise ValueError("defaults.sticky_conversations was replaced by defaults.prefix_routing (a conversation "
                             "sticking to its endpoint is one case of routing by a request's opening): write "
                             "'prefix_routing: {enabled: false}' to turn it off, or remove the key")
        return data


CONCURRENCY_DESCRIPTION = "requests one engine serves at once before answers slow down (about vLLM's " \
                          "max_num_seqs for short prompts): the router spreads load past it"
START_S_DESCRIPTION = "seconds a cold start is expected to take (a block through the queue, then the engine " \
                      "loading); the router learns the real figure from the starts it sees"


class _Credentials(_Strict):
    """How an HTTP upstream is authorized: an API key from the environment, or the user's Globus token."""

    api_key_env: str | None = Field(default=None, description="environment variable that holds the API key")
    globus_resource_server: str | None = Field(
        default=None, description="send the user's Globus access token for this resource server (a FIRST "
                                  "gateway's client id, for instance) instead of an API key")
    globus_scope: str | None = Field(default=None, description="the scope `first login` asks for, for that server")

    @model_validator(mode="after")
    def _one_credential(self) -> _Credentials:
        if self.api_key_env and self.globus_resource_server:
            raise ValueError("give api_key_env or globus_resource_server, not both")
        if self.globus_scope and not self.globus_resource_server:
            raise ValueError("globus_scope needs globus_resource_server")
        return self


class TlsConfig(_Strict):
    """How an https upstream's certificate is checked, and the client certificate a site gateway may demand.
    Trust is the system store plus ``SSL_CERT_FILE``, ``SSL_CERT_DIR`` and ``REQUESTS_CA_BUNDLE``, plus this."""

    ca_bundle: str | None = Field(default=None, description="a PEM file (or a directory) of CA certificates trusted "
                                                            "for this endpoint, in addition")
    verify: bool = Field(default=True, description="false: accept any certificate (logged as a warning at start "
                                                   "and shown in /first/api/status); for tests, never production")
    client_cert: str | None = Field(default=None, description="PEM client certificate, for mutual TLS")
    client_key: str | None = Field(default=None, description="its unencrypted PEM key (default: in client_cert)")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TlsConfig:
        if self.client_key and not self.client_cert:
            raise ValueError("client_key needs client_cert")
        return self


class _Upstream(_Credentials):
    """An endpoint reached over HTTP: through the site's proxy (or not), with TLS as the site needs it."""

    proxy: str | None = Field(default=None, description="an http:// forward proxy URL (credentials allowed) or "
                                                        "'none' to connect directly; default: HTTPS_PROXY / "
                                                        "HTTP_PROXY / ALL_PROXY and NO_PROXY, read as curl does")
    tls: TlsConfig = TlsConfig()

    @field_validator("proxy")
    @classmethod
    def _proxy_usable(cls, value: str | None) -> str | None:
        if value is not None and value.strip().lower() != NO_PROXY_SETTING:
            try:
                parse_proxy(value, "proxy")
            except ProxyError as exc:
                raise ValueError(str(exc)) from None
        return value


class HttpEndpoint(_Upstream):
    """Any OpenAI-compatible upstream: vLLM serving directly, a hosted API, a LiteLLM proxy."""

    name: Name
    base_url: str = Field(pattern=r"^https?://", description="ends with the API root, e.g. http://host:8000/v1")
    concurrency: int = Field(default=64, ge=1, description=CONCURRENCY_DESCRIPTION)
    models: list[ModelConfig] = Field(min_length=1)
    engine_metrics: bool = Field(
        default=False, description="a vLLM engine: read its /metrics (beside the API root) with each status "
                                   "reading; requests waiting in its own queue (vllm:num_requests_waiting) then cut "
                                   "the batch concurrency while interactive traffic is about")


class FirstGatewayEndpoint(_Upstream):
    """An existing FIRST inference gateway (ALCF's, for instance), used as a whole: its models are discovered
    from its ``list-endpoints`` route and their states read from its ``{cluster}/jobs`` route, so the config
    never lists what the facility serves today."""

    name: Name
    base_url: str = Field(pattern=r"^https?://", description="the gateway's resource server root, e.g. "
                                                              "https://inference-api.alcf.anl.gov/resource_server")
    clusters: list[str] | None = Field(default=None, min_length=1,
                                       description="the gateway's clusters to use (default: all it lists)")
    refresh: float = Field(default=60.0, gt=0, description="seconds a discovered model list is reused")
    expected_start: float = Field(default=600.0, gt=0, description=START_S_DESCRIPTION)
    concurrency: int = Field(default=64, ge=1, description=CONCURRENCY_DESCRIPTION)
    first_byte: float | None = Field(default=None, gt=0, description=(
        "seconds a request waits for the gateway's answer to begin; default: defaults.timeouts.first_byte, but "
        "at least 330, since a FIRST gateway itself waits 300 s for its cluster before answering 408, and that "
        "answer must come through for the request to fail over"))


class LocalEndpoint(_Strict):
    """An engine this gateway starts as a child process and stops when idle."""

    name: Name
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    device: str = "auto"
    idle_timeout: float = Field(default=900.0, gt=0, description="seconds without requests before stopping")
    start_timeout: float = Field(default=600.0, gt=0)
    expected_start: float = Field(default=60.0, gt=0, description=START_S_DESCRIPTION)
    concurrency: int = Field(default=64, ge=1, description=CONCURRENCY_DESCRIPTION)
    extra_args: list[str] = []
    models: list[ModelConfig] = Field(min_length=1, max_length=1)


AmqpPort = Annotated[int, Field(ge=1, le=65535)]
AMQP_PORT_DESCRIPTION = ("the port task results come back on from Globus Compute's AMQPS service (its host is the "
                         "service's to name; the service takes 443, 5671 and 5672): 443 where a firewall blocks "
                         "5671; default: the service's choice")
CALLBACK_PLACEHOLDERS = {"username": "JUPYTERHUB_USER", "base_url": "JUPYTERHUB_SERVICE_PREFIX",
                         "server_name": "JUPYTERHUB_SERVER_NAME"}
"""What a callback URL may name, and the variable JupyterHub sets for it in each user's server."""
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def callback_url_for(template: str | None, environ: Mapping[str, str], where: str) -> str | None:
    """A callback URL with its placeholders filled from this server's hub environment; a ConfigError naming the
    missing variable where one is not set (a hub-wide config read outside a hub's server)."""
    if template is None:
        return None

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        variable = CALLBACK_PLACEHOLDERS[name]
        value = environ.get(variable)
        if value is None:
            raise ConfigError(f"{where}: callback_url names {{{name}}}, but ${variable} is not set; such a "
                              "callback_url is for servers a JupyterHub spawns (or set the variable)")
        return value if name == "base_url" else quote(value, safe="")
    return _PLACEHOLDER.sub(fill, template)


UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
RemoteFunction = Literal["call_engine", "stream_engine", "engine_health"]


class InProcessEngine(_Strict):
    """The real Globus Compute engine run inside this process, configured as an HPC endpoint is: blocks of
    workers from parsl's ``LocalProvider`` whose ``worker_init`` starts the model's engine with the launcher."""

    engine: Literal["auto", "vllm", "transformers"] = "auto"
    device: str = "auto"
    min_blocks: int = Field(default=0, ge=0, description="blocks kept even when idle (hot nodes)")
    max_blocks: int = Field(default=1, ge=1)
    max_idletime: float = Field(default=900.0, gt=0, description="seconds idle before a block (and its engine) "
                                                                 "is stopped: the hot window")
    start_timeout: float = Field(default=600.0, gt=0, description="seconds the engine may take to serve")
    extra_args: list[str] = Field(default=[], description="passed to the engine's command line")

    @model_validator(mode="after")
    def _blocks(self) -> InProcessEngine:
        if self.min_blocks > self.max_blocks:
            raise ValueError(f"min_blocks ({self.min_blocks}) is above max_blocks ({self.max_blocks})")
        return self


VLLM_RUN_BATCH = ["vllm", "run-batch", "-i", "{input}", "-o", "{output}", "--model", "{model}",
                  "--served-model-name", "{served_name}"]


class BatchOffload(_Strict):
    """Batches of this endpoint's models run on its nodes as ``vllm run-batch``, one Globus Compute task per chunk
    of lines, through a directory that this gateway and the nodes both see: the chunk's input goes there, its
    output comes back there, and the results go into the batch's own output and error files."""

    shared_path: str = Field(min_length=1, description="a directory on the cluster's shared filesystem that this "
                                                       "gateway sees under the same path (a facility's JupyterHub "
                                                       "mounts it)")
    command: list[str] = Field(
        default=VLLM_RUN_BATCH, min_length=1,
        description="the command a task runs for a chunk, with {input} and {output} (the chunk's files), {model} "
                    "(the model's path, else its engine name), {served_name}, {port} (the engine's port) and "
                    "{python} (the node's Python); `{python} -m first_jupyter.remote.run_batch -i {input} -o "
                    "{output} --port {port}` sends the lines to the engine already serving on the node instead")
    chunk_lines: int = Field(default=10_000, ge=1, description="requests per chunk: what a lost node redoes")
    min_lines: int = Field(default=1_000, ge=1, description="smaller batches go to the engines request by request "
                                                            "(a run-batch task loads the model, which a few lines "
                                                            "do not repay)")
    parallel: int = Field(default=4, ge=1, description="chunks running at once (a task, and a worker, each)")
    chunk_timeout: float = Field(default=6 * 3600.0, gt=0, description="seconds a chunk may take, queue included, "
                                                                       "before it counts as lost and is run again")

    @model_validator(mode="after")
    def _files_named(self) -> BatchOffload:
        joined = " ".join(self.command)
        missing = [p for p in ("{input}", "{output}") if p not in joined]
        if missing:
            raise ValueError(f"command must name the chunk's files: {' and '.join(missing)} missing")
        return self


class ComputeEndpoint(_Strict):
    """A Globus Compute endpoint on an HPC cluster, whose nodes serve the models with an engine (vLLM) on
    ``127.0.0.1:{engine_port}``; requests run there as the functions of ``first_jupyter.remote.inference``.
    With ``in_process`` instead of ``endpoint_id``, the endpoint is the Globus Compute engine run here."""

    name: Name
    endpoint_id: str | None = Field(default=None, pattern=UUID_PATTERN)
    in_process: InProcessEngine | None = None
    engine_port: int = Field(default=8000, ge=1, le=65535, description="the engine's port on the node (an "
                                                                        "in-process endpoint picks a free one)")
    functions: dict[RemoteFunction, Annotated[str, Field(pattern=UUID_PATTERN)]] = Field(
        default={}, description="registered function ids (an endpoint that allows only listed functions needs "
                                "them); those not given are registered on first use and remembered")
    identity: Literal["user", "service"] = Field(
        default="user", description="user: the user's Globus Compute token (at a shared gateway, each request's "
                                    "sender's, got from their token as a dependent token); service: a client id "
                                    "and secret from the environment variables below")
    service_client_id_env: str = "FIRST_COMPUTE_CLIENT_ID"
    service_client_secret_env: str = "FIRST_COMPUTE_CLIENT_SECRET"  # noqa: S105 (a variable name)
    user_sessions: int = Field(
        default=64, ge=1, description="at a shared gateway with identity: user, how many users' connections to "
                                      "Globus Compute (a client, an executor and its result stream each) stay "
                                      "open; the least recent is closed once its tasks are done")
    amqp_port: AmqpPort | None = Field(default=None, description=AMQP_PORT_DESCRIPTION)
    callback_url: str | None = Field(
        default=None, pattern=r"^https?://",
        description="this gateway's callback route as the nodes reach it (…/first/api/callback); without one a "
                    "stream comes back whole when it ends. A hub-wide config gives each user's server its own with "
                    "{username}, {base_url} (the server's, e.g. /user/ada/) and {server_name}, from the hub's "
                    "environment: https://hub.example.org{base_url}first/api/callback")

    @field_validator("callback_url")
    @classmethod
    def _known_placeholders(cls, value: str | None) -> str | None:
        unknown = sorted(set(_PLACEHOLDER.findall(value or "")) - set(CALLBACK_PLACEHOLDERS))
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}}; use {', '.join(CALLBACK_PLACEHOLDERS)}")
        return value
    timeout: float = Field(default=900.0, gt=0, description="seconds a request may wait for its task (queue "
                                                            "and cold start included) before it fails")
    status_ttl: float = Field(default=30.0, ge=1, description="seconds an endpoint status is reused")
    expected_start: float | None = Field(default=None, gt=0, description=START_S_DESCRIPTION + " (default: 600 "
                                                                          "for a cluster's, 60 in process)")
    concurrency: int = Field(default=64, ge=1, description=CONCURRENCY_DESCRIPTION + " (per block)")
    max_blocks: int | None = Field(
        default=None, ge=1, description="the blocks the endpoint's own config lets it scale out to (its "
                                        "max_blocks; default 1). The endpoint adds a block only for requests it sees "
                                        "waiting, so while it has fewer up, one block's concurrency more is sent to it "
                                        "than its blocks up serve. An in_process endpoint has its own max_blocks")
    batch: BatchOffload | None = Field(default=None, description="run large batches of these models on the nodes "
                                                                 "as run-batch tasks, a chunk each")
    models: list[ModelConfig] = Field(min_length=1)

    @property
    def start_s(self) -> float:
        if self.expected_start is not None:
            return self.expected_start
        return 60.0 if self.in_process is not None else 600.0

    @property
    def scale_out_blocks(self) -> int:
        """The blocks the endpoint may scale out to: its in-process engine's, else as configured (1 unsaid)."""
        if self.in_process is not None:
            return self.in_process.max_blocks
        return self.max_blocks or 1

    @model_validator(mode="after")
    def _one_endpoint(self) -> ComputeEndpoint:
        if (self.endpoint_id is None) == (self.in_process is None):
            raise ValueError("give endpoint_id (a Globus Compute endpoint) or in_process (the engine run here), "
                             "one of them")
        if self.in_process is not None and len(self.models) != 1:
            raise ValueError("an in_process endpoint serves one model (its engine is started for it)")
        if self.in_process is not None and self.max_blocks is not None:
            raise ValueError(f"max_blocks is for an endpoint_id's endpoint; an in_process endpoint scales by its own: "
                             f"move it to in_process.max_blocks ({self.max_blocks})")
        return self


class SchedulerView(_Strict):
    """The batch scheduler's view of a cluster's model jobs, read by a status function (``qstat``/``pbsnodes`` or
    ``squeue``/``sinfo``) run on the cluster's login endpoint: a Globus Compute endpoint on a login node. It says
    which endpoints' blocks are queued or booting before any engine answers, and how many nodes are free."""

    kind: Literal["pbs", "slurm"]
    endpoint_id: str = Field(pattern=UUID_PATTERN, description="the login endpoint's id")
    queue: str | None = Field(default=None, description="PBS queue or Slurm partition whose free nodes to count")
    every: float = Field(default=60.0, ge=1, description="seconds a reading is reused (the queue moves slowly)")
    timeout: float = Field(default=120.0, gt=0, description="seconds a reading may take before it counts as failed")
    identity: Literal["user", "service"] = "user"
    service_client_id_env: str = "FIRST_COMPUTE_CLIENT_ID"
    service_client_secret_env: str = "FIRST_COMPUTE_CLIENT_SECRET"  # noqa: S105 (a variable name)
    functions: dict[Literal["pbs_status", "slurm_status"], Annotated[str, Field(pattern=UUID_PATTERN)]] = Field(
        default={}, description="registered function ids, for a login endpoint that allows only listed functions")
    amqp_port: AmqpPort | None = Field(default=None, description=AMQP_PORT_DESCRIPTION)

    @property
    def name(self) -> str:
        return "login"


class ComputeCluster(_Strict):
    backend: Literal["globus_compute"]
    endpoints: list[ComputeEndpoint] = Field(min_length=1)
    scheduler: SchedulerView | None = Field(
        default=None, description="read the scheduler's view of the endpoints' jobs through a login endpoint")


class HttpCluster(_Strict):
    backend: Literal["http"]
    endpoints: list[HttpEndpoint] = Field(min_length=1)


class LocalCluster(_Strict):
    backend: Literal["local"]
    endpoints: list[LocalEndpoint] = Field(min_length=1)


class FirstGatewayCluster(_Strict):
    backend: Literal["first"]
    endpoints: list[FirstGatewayEndpoint] = Field(min_length=1)


Cluster = Annotated[HttpCluster | LocalCluster | FirstGatewayCluster | ComputeCluster,
                    Field(discriminator="backend")]


COMPUTE_RESOURCE_SERVER = "funcx_service"
COMPUTE_SCOPE = "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all"
TokenSourceName = Literal["env", "hub_api", "hub_env", "native", "compute"]


class AuthConfig(_Strict):
    """Where the user's Globus tokens come from, tried in ``sources`` order; resolved in the server only."""

    sources: list[TokenSourceName] = Field(
        default=["env", "hub_api", "hub_env", "native", "compute"], min_length=1,
        description="env: $FIRST_GLOBUS_TOKEN; hub_api: the JupyterHub API's auth_state; hub_env: $GLOBUS_DATA; "
                    "native: `first login`; compute: an existing globus-compute login")
    client_id: str | None = Field(
        default=None, description="Globus native app client id for `first login` (register one at "
                                  "app.globus.org/settings/developers)")
    scopes: dict[str, list[str]] = Field(
        default={COMPUTE_RESOURCE_SERVER: [COMPUTE_SCOPE], "auth.globus.org": ["openid", "profile", "email"]},
        description="scopes to request at login, by resource server (add a FIRST gateway's action_all scope)")
    token_env: str = Field(default="FIRST_GLOBUS_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


GROUP_DESCRIPTION = "Globus group ids; a user must be an active member of at least one (empty: no group needed)"


class ResourceServer(_Strict):
    """The shared gateway as a Globus Auth resource server: how bearer tokens are introspected and checked."""

    client_id: str = Field(pattern=UUID_PATTERN, description="the gateway's confidential client (its tokens' audience)")
    client_secret_env: str = Field(default="FIRST_GATEWAY_CLIENT_SECRET", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
                                   description="environment variable holding the client's secret (never the file)")
    scope: str | None = Field(default=None, description="scope a token must carry (default: the client's "
                                                        "https://auth.globus.org/scopes/{client_id}/action_all)")
    allowed_domains: list[str] = Field(default=[], description="identity provider domains a session must have "
                                                               "authenticated with (empty: any)")
    policies: list[Annotated[str, Field(pattern=UUID_PATTERN)]] = Field(
        default=[], description="Globus authentication policies (high assurance) every token's session must meet")
    groups: list[Annotated[str, Field(pattern=UUID_PATTERN)]] = Field(default=[], description=GROUP_DESCRIPTION)
    service_identities: list[str] = Field(default=[], description="identity ids (or usernames) of services that "
                                                                  "skip the session checks: domains, policies, groups")
    admins: list[str] = Field(default=[], description="identity ids or usernames that may read every user's usage")
    cache_s: float = Field(default=600.0, gt=0, le=600.0, description="seconds an accepted token's introspection is "
                                                                      "reused (never past the token's expiry)")
    failure_cache_s: float = Field(default=10.0, ge=0, le=300.0, description="seconds a refused token stays refused "
                                                                             "without asking Globus again")

    @property
    def required_scope(self) -> str:
        return self.scope or f"https://auth.globus.org/scopes/{self.client_id}/action_all"


class Access(_Strict):
    """Who may use a cluster or a model: Globus groups."""

    groups: list[Annotated[str, Field(pattern=UUID_PATTERN)]] = Field(min_length=1, description=GROUP_DESCRIPTION)


class Quota(_Strict):
    """Allowances of one kind of subject (a user, or a model for all its users); none: unlimited."""

    requests_per_s: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1, description="requests taken at once before requests_per_s paces "
                                                              "them (default: one second's worth, at least 1)")
    tokens_per_min: int | None = Field(default=None, gt=0, description="prompt and completion tokens")


class Quotas(_Strict):
    per_user: Quota = Field(default=Quota(), description="each user, all models together")
    per_model: Quota = Field(default=Quota(), description="each model, all users together")
    models: dict[str, Quota] = Field(default={}, description="per_model, for the models named")


class Listen(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


REDIS_PASSWORD_ENV = "FIRST_REDIS_PASSWORD"  # noqa: S105 (the variable's name)


class SharedStateConfig(_Strict):
    """Where the replicas of a shared gateway on several hosts keep what they must agree on. Unset: everything is
    in SQLite under ``state_dir``, which holds for the processes of one host only."""

    redis: str | None = Field(default=None, description="redis://host:port/db (or rediss://, unix://): quotas and "
                                                        "the token introspection cache, shared by every replica; "
                                                        f"its password from ${REDIS_PASSWORD_ENV}, never the file")
    database: str | None = Field(default=None, description="postgresql://user@host:port/db: usage records, and "
                                                           "the files' and batches' records, shared by every "
                                                           "replica; its password from the libpq variables "
                                                           "($PGPASSWORD, ~/.pgpass), never the file")
    files_dir: str | None = Field(default=None, description="a directory on storage every replica mounts: the "
                                                            "uploaded and produced batch files (with database)")
    batch_lease_s: float = Field(default=30.0, gt=0, le=3600, description="how long a replica's hold on a batch it "
                                                                          "runs lasts unrenewed: another replica "
                                                                          "resumes the batch once it lapses")

    @field_validator("redis")
    @classmethod
    def _check_redis(cls, url: str | None) -> str | None:
        return _state_url(url, ("redis", "rediss", "unix"), "redis://host:port/db, rediss:// (TLS) or unix:///path",
                          f"${REDIS_PASSWORD_ENV}")

    @field_validator("database")
    @classmethod
    def _check_database(cls, url: str | None) -> str | None:
        return _state_url(url, ("postgresql", "postgres"), "postgresql://user@host:port/database",
                          "$PGPASSWORD (or a ~/.pgpass file)")

    @model_validator(mode="after")
    def _files_with_their_records(self) -> SharedStateConfig:
        """Files and their records go together: records shared with each replica's files on its own disk (or the
        reverse) would answer for files a replica cannot read."""
        if self.database is not None and self.files_dir is None:
            raise ValueError("serve.state.database shares the files' and batches' records, so their contents must be "
                             "shared too: add serve.state.files_dir, a directory every replica mounts")
        if self.files_dir is not None and self.database is None:
            raise ValueError("serve.state.files_dir needs the files' and batches' records shared too: add "
                             "serve.state.database (postgresql://user@host:port/database)")
        return self


def _state_url(url: str | None, schemes: tuple[str, ...], expected: str, password_from: str) -> str | None:
    """``url`` if it is one of ``schemes`` and holds no password (a config file is read by more people than a
    secret should be: the password comes from the gateway's environment, ``password_from``)."""
    if url is None:
        return None
    parsed = urlsplit(url)
    if parsed.scheme not in schemes:
        raise ValueError(f"expected {expected}, got '{url}'")
    if parsed.password is not None:
        raise ValueError(f"the URL holds a password; remove it and set {password_from} in the gateway's "
                         "environment instead (a config file is read by more people than a secret should be)")
    return url


class ServeConfig(_Strict):
    """``first serve``: one gateway for a whole facility, its users reaching it with Globus access tokens."""

    listen: Listen = Listen()
    processes: int = Field(default=1, ge=1, le=64, description="processes sharing the port (and the state dir)")
    state_dir: str | None = Field(default=None, description="usage, quotas, batches, metrics (default: the data "
                                                            "dir); every process of the gateway uses the same one")
    auth: ResourceServer
    clusters: dict[Name, Access] = Field(default={}, description="groups allowed per cluster (unlisted: anyone)")
    models: dict[str, Access] = Field(default={}, description="groups allowed per model (unlisted: anyone)")
    quotas: Quotas = Quotas()
    state: SharedStateConfig = Field(default=SharedStateConfig(), description="shared state for replicas on "
                                                                              "several hosts (default: state_dir)")
    access_log: str = Field(default="-", description="file for the JSON access log, one line per request; '-' is "
                                                     "standard output")


class FirstConfig(_Strict):
    clusters: dict[Name, Cluster] = Field(min_length=1)
    defaults: Defaults = Defaults()
    auth: AuthConfig = AuthConfig()
    serve: ServeConfig | None = Field(default=None, description="the shared gateway (`first serve`)")

    @model_validator(mode="after")
    def _check_catalog(self) -> FirstConfig:
        listed = [c for c in self.clusters.values() if not isinstance(c, FirstGatewayCluster)]
        ids = {m.id for cluster in listed for ep in cluster.endpoints for m in ep.models}
        discovered = len(listed) < len(self.clusters)  # a FIRST gateway's models are known only once asked
        if self.defaults.model is not None and self.defaults.model not in ids and not discovered:
            raise ValueError(f"defaults.model '{self.defaults.model}' is served by no endpoint; "
                             f"use one of {sorted(ids)}")
        for name, cluster in self.clusters.items():
            names = [ep.name for ep in cluster.endpoints]
            if len(set(names)) != len(names):
                raise ValueError(f"clusters.{name}: endpoint names must be unique, got {names}")
        unknown = sorted(set(self.serve.clusters) - set(self.clusters)) if self.serve else []
        if unknown:
            raise ValueError(f"serve.clusters names {unknown}, which are not under clusters")
        return self


def embedded_default(data_dir: Path) -> FirstConfig:
    """The zero-configuration gateway: one cluster, ``local``, whose endpoint is the Globus Compute engine run in
    this process, serving a small model: the same path (tasks, remote functions, callback) as an HPC cluster.

    ``$FIRST_LOCAL_MODEL`` names a real model (a directory or a hub id already cached), whatever else holds;
    without it, a small real model from the Hugging Face hub where the hub can be reached (downloaded once into the
    data dir), else the tiny offline model built there on first use, whose answers are random
    (``embedded_model.choose_default_model``). It is asked what a generative model's engine serves; the endpoint
    keeps what its engine has routes for (``engine_serves``).
    """
    source = os.environ.get(LOCAL_MODEL_ENV)
    if source:
        identity: dict[str, Any] = {"id": Path(source).name, "path": source}
    else:
        chosen = choose_default_model(data_dir)
        identity = {"id": chosen.id, "path": str(chosen.path), "build_tiny": chosen.id == TINY_MODEL_ID,
                    "download": chosen.download, "note": chosen.note}
    model = ModelConfig(
        **identity,
        capabilities=[Capability.chat, Capability.completions, Capability.responses, Capability.tokenize,
                      Capability.detokenize],
    )
    endpoint = ComputeEndpoint(name="engine", in_process=InProcessEngine(), models=[model])
    return FirstConfig(clusters={"local": ComputeCluster(backend="globus_compute", endpoints=[endpoint])},
                       defaults=Defaults(model=model.id))


_BACKEND_TAGS = {"http", "local", "first", "globus_compute"}


_USERINFO = re.compile(r"://[^/@\s'\"]*@")


def _describe(value: Any) -> str:
    """The value found, short, and with any credentials in a URL (a proxy's password) masked."""
    text = _USERINFO.sub("://***@", repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _key_path(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part in _BACKEND_TAGS and parts and not parts[-1].startswith("["):
            continue  # discriminator tag pydantic inserts; not a key in the user's file
        elif part == "[key]":
            parts.append(" (the name itself)")  # a mapping's key failed, not its value
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "(top level)"


def parse_config(data: Any, source: str) -> FirstConfig:
    """Validate a decoded config, turning the first problem into a ConfigError naming file and key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'clusters' key at the top level, "
                          f"found {_describe(data)}")
    try:
        return FirstConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_url=False):
            found = "nothing" if err["type"] == "missing" else _describe(err.get("input"))
            problems.append(f"{source}: at {_key_path(tuple(err['loc']))}: {err['msg']} (found {found})")
        raise ConfigError("\n".join(problems)) from None


def load_config(path: str | Path | None, data_dir: Path) -> FirstConfig:
    """Load the YAML file named by ``path`` or ``$FIRST_CONFIG``; with neither, the embedded default."""
    chosen = path or os.environ.get(CONFIG_ENV)
    if not chosen:
        return embedded_default(data_dir)
    file = Path(chosen).expanduser()
    try:
        text = file.read_text()
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read the FIRST config file ({exc.strerror}); fix the path in "
                          f"c.FirstExtension.config_file or ${CONFIG_ENV}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    return parse_config(data, str(file))
