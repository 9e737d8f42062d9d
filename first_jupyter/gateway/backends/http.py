"""Backend for any OpenAI-compatible base URL: vLLM serving directly, another gateway, a hosted API."""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

import orjson

from first_jupyter.config import ConfigError, ModelConfig, TlsConfig
from first_jupyter.gateway.admission import ENGINE_WAITING_KEY
from first_jupyter.gateway.audio import FormBody
from first_jupyter.gateway.backends.base import RequestBody
from first_jupyter.gateway.bearer import BearerTokens
from first_jupyter.gateway.ceilings import LIMITS_KEY, reported_limits
from first_jupyter.gateway.upstream import Reply, UpstreamClient, UpstreamStream, upstream_error
from first_jupyter.protocol import Capability, OpenAIError, json_kind
from first_jupyter.transport.http_client import Reach, Url
from first_jupyter.transport.proxies import ProxyError
from first_jupyter.transport.tls import TlsSettingError, TlsSettings

if TYPE_CHECKING:
    from first_jupyter.api_types import PublishedDetails

STATUS_TIMEOUT = 5.0
SIGN_IN_AGAIN = (" The gateway refused your Globus sign-in: run `%first login` (or `first login` in a terminal) to "
                 "sign in again.")
ACCOUNT_REFUSALS = ("permission denied", "not a member of", "not part of", "could not extract domain")
"""Words of a FIRST gateway's 401s that refuse the user's account (a Globus group, identity-provider domain or
policy rule: ``check_permission`` and the group checks in its resource_server_async/auth.py), not the token.
Signing in again does not help there, and another endpoint may take the account."""
WAITING_METRIC = "vllm:num_requests_waiting"
"""vLLM's gauge of the requests its scheduler holds back (the engine's own queue)."""

log = logging.getLogger(__name__)
_JSON = b"Content-Type: application/json\r\n"


def reach_of(key_path: str, proxy: str | None, tls: TlsConfig) -> Reach:
    """How an endpoint configured at ``key_path`` (``clusters.alcf.endpoints[0]``) is reached."""
    return Reach(proxy, TlsSettings(tls.ca_bundle, tls.verify, tls.client_cert, tls.client_key,
                                    source=f"{key_path}.tls"), source=f"{key_path}.proxy")


def engine_url(base_url: str, capability: Capability) -> str:
    """Where an engine whose API root is ``base_url`` (``http://host:8000/v1``) serves ``capability``: the OpenAI
    routes under that root, and vLLM's own (``/tokenize``, ``/pooling``...) at its server's root, which is the API
    root less its ``/v1`` (or the API root itself, for one that does not end in ``/v1``)."""
    if capability.path.startswith("/v1/"):
        return base_url + capability.path.removeprefix("/v1")
    return base_url.removesuffix("/v1") + capability.path


def listed_models(body: bytes) -> list[str]:
    """The model ids of a ``GET /models`` answer; ``ValueError`` naming what it holds instead."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValueError(f"{len(body)} bytes that are not JSON") from None
    if not isinstance(answer, dict):
        raise ValueError(f"{json_kind(answer)} where an object belongs")
    if "data" not in answer:
        raise ValueError("an object without 'data'")
    entries = answer["data"]
    if not isinstance(entries, list):
        raise ValueError(f"an object whose 'data' is {json_kind(entries)}")
    ids = [model_id for entry in entries if isinstance(entry, dict) and isinstance(model_id := entry.get("id"), str)]
    if len(ids) != len(entries):
        raise ValueError("a 'data' list with entries that have no string 'id'")
    return ids


class HttpBackend:
    kind = "http"
    start_s = 0.0
    keeps_responses = True
    """An engine elsewhere is taken at its word (vLLM, OpenAI's API keep them)."""
    max_blocks = 1
    first_byte: float | None = None
    """How long a request waits for the answer's head; None: ``defaults.timeouts.first_byte``."""

    def __init__(self, cluster: str, name: str, base_url: str, models: list[ModelConfig], client: UpstreamClient,
                 *, api_key_env: str | None = None, globus: tuple[BearerTokens, str] | None = None,
                 capacity: int = 64, reach: Reach | None = None, engine_metrics: bool = False) -> None:
        """``globus``: send the user's token for this resource server (from these bearer tokens) with each
        request, as a FIRST gateway wants it. ``reach``: the endpoint's proxy and TLS settings; None for an
        engine of this gateway's own on loopback, which is always reached directly. ``engine_metrics``: read the
        engine's queue from vLLM's ``/metrics`` with each status reading."""
        self.cluster = cluster
        self.name = name
        self.capacity = capacity
        self.base_url = base_url.rstrip("/")
        self.where = f"cluster '{cluster}' endpoint '{name}'"
        self._client = client
        self._models = {m.id: m for m in models}
        self.reach = reach
        try:
            self._urls = {cap: self.url(engine_url(self.base_url, cap)) for cap in Capability}
        except (ProxyError, TlsSettingError) as exc:
            raise ConfigError(f"{self.where}: {exc}") from None
        self._models_url = self.url(f"{self.base_url}/models")
        self._metrics_url = self.url(f"{self.base_url.removesuffix('/v1')}/metrics") if engine_metrics else None
        if reach is not None and not reach.tls.verify:
            log.warning("%s: TLS certificates are not verified (%s.verify is false): anyone on the path can read "
                        "and change its traffic", self.where, reach.tls.source)
        self._api_key_env = api_key_env
        key = os.environ.get(api_key_env) if api_key_env else None
        self._has_key = bool(key)
        self._head_lines = _JSON + self._other_lines(key)
        self._form_lines = self._other_lines(key)
        """A form's head lines, less its Content-Type (each form has its own boundary)."""
        self._globus = globus

    def url(self, text: str) -> Url:
        """A URL of this endpoint's, reached through its proxy and with its TLS settings."""
        return Url.parse(text) if self.reach is None else self.reach.url(text)

    def _transport_status(self) -> dict[str, Any]:
        """How the endpoint is reached, for /first/api/status: the proxy (never its credentials), unverified TLS."""
        url = self._models_url
        info: dict[str, Any] = {}
        if url.origin.proxy is not None:
            info["proxy"] = url.origin.proxy.display
        if url.origin.tls and self.reach is not None and not self.reach.tls.verify:
            info["tls_verify"] = False
        return info

    def upstream_name(self, model_id: str) -> str:
        model = self._models[model_id]
        return model.upstream_name or model.id

    def model_details(self, model_id: str) -> PublishedDetails | None:
        return None

    def supports(self, model_id: str, capability: Capability) -> bool:
        return capability in self._models[model_id].capabilities

    def _check_key(self) -> None:
        if self._api_key_env and not self._has_key:
            raise OpenAIError(503, f"{self.where} needs an API key in the environment variable "
                                   f"{self._api_key_env}, which is not set in the Jupyter server's environment. "
                                   f"Set it and restart the server.", type="api_error", code="missing_api_key")

    @staticmethod
    def _other_lines(key: str | None) -> bytes:
        return b"Accept: */*\r\n" + (f"Authorization: Bearer {key}\r\n".encode("latin-1") if key else b"")

    async def _head(self, body: RequestBody | None = None) -> bytes:
        """The request's header lines for ``body``, with the user's Globus token when this endpoint takes one."""
        self._check_key()
        lines = self._form_lines + b"Content-Type: %b\r\n" % body.content_type.encode("latin-1") \
            if isinstance(body, FormBody) else self._head_lines
        if self._globus is None:
            return lines
        tokens, resource_server = self._globus
        return lines + await tokens.header(resource_server)

    def _judged(self, error: OpenAIError) -> OpenAIError | None:
        """An upstream refusal as this gateway must act on it, or None to pass it on as it is.

        With the user's Globus token, a FIRST gateway answers 401 both for the token (expired, invalid: it is
        forgotten, and the message says how to sign in again) and for the account (a group, domain or policy
        rule: the token stays, and as a 403 the request moves on to an endpoint that may take the account)."""
        if error.status != 401 or self._globus is None:
            return None
        if any(words in error.message.lower() for words in ACCOUNT_REFUSALS):
            return OpenAIError(403, f"{error.message} This refuses your account, not your sign-in: it is not in "
                                    f"the Globus group (or identity provider) that {self.where} allows. Ask its "
                                    f"operators to add you, or use another cluster.",
                               type="permission_error", code="permission_denied")
        self._globus[0].forget(self._globus[1])
        return OpenAIError(401, error.message + SIGN_IN_AGAIN, type="authentication_error", code=error.code)

    def _url(self, model_id: str, capability: Capability) -> Url:
        """Where a request goes: one API root for every model here."""
        return self._urls[capability]

    async def complete(self, model_id: str, capability: Capability, body: RequestBody) -> Reply:
        reply = await self._client.request("POST", self._url(model_id, capability), await self._head(body), body,
                                           self.where, first_byte=self.first_byte)
        if reply.status >= 400 and (judged := self._judged(upstream_error(
                reply.status, reply.body, self.where, reply.retry_after, reply.via))) is not None:
            raise judged
        return reply

    async def stream(self, model_id: str, capability: Capability, body: RequestBody) -> UpstreamStream:
        try:
            return await self._client.stream(self._url(model_id, capability), await self._head(body), body,
                                             self.where, first_byte=self.first_byte)
        except OpenAIError as exc:
            raise self._judged(exc) or exc from None

    async def call(self, method: str, path: str, query: str, body: bytes | None) -> Reply:
        url = self.url(f"{self.base_url}/{path}" + (f"?{query}" if query else ""))
        reply = await self._client.request(method, url, await self._head(), body, self.where,
                                           first_byte=self.first_byte)
        if reply.status >= 400 and (judged := self._judged(upstream_error(
                reply.status, reply.body, self.where, reply.retry_after, reply.via))) is not None:
            raise judged
        return reply

    async def status(self) -> dict[str, Any]:
        started = time.perf_counter()
        info: dict[str, Any] = {"cluster": self.cluster, "endpoint": self.name, "kind": self.kind,
                                "base_url": self.base_url, "models": sorted(self._models),
                                **self._transport_status()}
        try:
            reply = await self._client.request("GET", self._models_url, await self._head(), None, self.where,
                                               first_byte=STATUS_TIMEOUT)
        except OpenAIError as exc:
            return {**info, "state": "offline", "error": exc.message}
        info["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        if reply.status != 200:
            return {**info, "state": "offline", "error": f"GET /models answered HTTP {reply.status}"}
        try:
            listed = listed_models(reply.body)
        except ValueError as exc:
            return {**info, "state": "failed", "error": f"GET /models answered {exc}, not an OpenAI model list "
                                                       '({"object": "list", "data": [{"id": ...}, ...]}): is '
                                                       "base_url the engine's API root?"}
        public = {self.upstream_name(model_id): model_id for model_id in self._models}
        if self._metrics_url is not None:
            info[ENGINE_WAITING_KEY] = await self._engine_waiting(self._metrics_url)
        return {**info, "state": "online", "upstream_models": listed,
                LIMITS_KEY: reported_limits(orjson.loads(reply.body), public)}

    async def _engine_waiting(self, url: Url) -> int | None:
        """Requests waiting in the engine's own queue, from its Prometheus text (vLLM's
        ``vllm:num_requests_waiting``, summed over its models); None when it does not say."""
        try:
            reply = await self._client.request("GET", url, await self._head(), None, self.where,
                                               first_byte=STATUS_TIMEOUT)
        except OpenAIError:
            return None
        if reply.status != 200:
            return None
        values = [line.rsplit(" ", 1)[-1] for line in reply.body.decode("utf-8", "replace").splitlines()
                  if line.startswith(WAITING_METRIC)]
        try:
            return round(sum(float(value) for value in values)) if values else None
        except ValueError:
            return None

    async def warm(self, model_id: str) -> None:
        """An upstream is started by whoever runs it: warming it only checks that it answers."""
        status = await self.status()
        if status["state"] != "online":
            raise OpenAIError(503, f"{self.where} is offline ({status.get('error')}), and this gateway cannot "
                                   "start it: it runs elsewhere. Ask whoever runs it, or use another endpoint.",
                              type="api_error", code="endpoint_offline")

    async def close(self) -> None:
        """The pooled client belongs to the gateway, which closes it."""
