"""A shared gateway's rules for each request (``first serve``): who sent it, what they may use, how much, and the
accounting that follows.

The token says who (``auth.resource_server``); Globus groups say which clusters and models (per cluster and per
model in the config); the quota store says how much (shared by every process of the gateway); and once a request
has ended its record feeds the quotas' token count, the metrics and the JSON access log. The access log holds no
prompt, answer or error text (an engine's error may quote the prompt): who, what, where, how much, how fast.

The Gateway sees only a ``SharedCaller`` (its ``Caller`` protocol); the tornado door builds one per request.
Batches are kept per user: each user's files and batches live in a store of their own, so no user can list or
read another's, and their runs are accounted to their owner. Replicas on several hosts keep them under
``serve.state.files_dir`` with their records in the shared database: each replica's resumer takes up the batches
whose runner's lease lapsed (its replica died), whoever's they are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from first_jupyter.auth.resource_server import Identity, TokenIntrospector, group_links, may_use
from first_jupyter.batch.batches import RESUME_EVERY_S, Batches
from first_jupyter.config import ServeConfig
from first_jupyter.gateway.usage import UsageRecord
from first_jupyter.protocol import OpenAIError, ParsedRequest
from first_jupyter.serve.metrics import GatewayMetrics
from first_jupyter.serve.state import SharedState

if TYPE_CHECKING:
    from first_jupyter.gateway.core import Gateway

ACCESS_LOG = logging.getLogger("first_jupyter.access")
OWNER_FILE = "owner.json"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts % 1 * 1000):03d}Z"


def _write_owner(root: Path, identity: Identity) -> None:
    """Whom a user's batch store belongs to, and their groups, for runs resumed after a restart."""
    (root / OWNER_FILE).write_bytes(orjson.dumps({"id": identity.id, "username": identity.username,
                                                  "groups": sorted(identity.groups)}))


class SharedPolicy:
    """The rules of one shared gateway process; its state that must be shared (quotas, usage, batches) is on disk,
    or, for replicas on several hosts, the quotas and token verdicts in Redis and usage in PostgreSQL
    (``shared_state``)."""

    def __init__(self, serve: ServeConfig, state_dir: Path, state: SharedState, secret: str,
                 metrics: GatewayMetrics, *, compute_as_callers: bool) -> None:
        """``state``: ``shared_state.open_state``'s (opened first: the gateway takes its usage store).
        ``compute_as_callers``: some Globus Compute endpoint (or login endpoint) runs tasks as each request's
        sender, so their Compute tokens are got at introspection."""
        self.serve = serve
        self.state_dir = state_dir
        want_groups = bool(serve.auth.groups or serve.clusters or serve.models)
        self.state = state
        self.introspector = TokenIntrospector(serve.auth, secret, want_groups=want_groups,
                                              want_compute=compute_as_callers, shared=self.state.verdicts)
        self.quotas = self.state.quotas
        self.metrics = metrics
        self._admins = set(serve.auth.admins)
        self._batches: dict[str, Batches] = {}
        self._runs: list[asyncio.Task[None]] = []
        self._home = Path(serve.state.files_dir) if serve.state.files_dir is not None else state_dir
        """Where each user's batch store is: the state dir, or the files dir every replica mounts."""

    async def caller(self, authorization: str | None) -> SharedCaller:
        try:
            identity = await self.introspector.identify(authorization)
        except OpenAIError as exc:
            if exc.status in (401, 403):
                self.metrics.refused("unauthenticated" if exc.status == 401 else "forbidden")
            raise
        held = self._batches.get(identity.username)
        if held is not None:  # any request of the owner's keeps their runs' groups and token current
            self._keep_owner(held, identity)
        return SharedCaller(self, identity)

    def is_admin(self, identity: Identity) -> bool:
        return identity.service or bool({identity.id, identity.username} & self._admins)

    def model_groups(self, model: str) -> list[str]:
        access = self.serve.models.get(model)
        return access.groups if access is not None else []

    def cluster_groups(self, cluster: str) -> list[str]:
        access = self.serve.clusters.get(cluster)
        return access.groups if access is not None else []

    def recorded(self, record: UsageRecord) -> None:
        """A request ended: its tokens count against the quotas, then metrics and the access log."""
        tokens = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
        if tokens and self.quotas.limited:
            self.quotas.spend(record.user, record.model, tokens)
        self._observed(record)

    def recorded_all(self, records: Sequence[UsageRecord]) -> None:
        """Requests that ended together (an offloaded chunk's lines): one spend per user and model."""
        spent: dict[tuple[str, str], int] = {}
        for record in records:
            key = (record.user, record.model)
            spent[key] = spent.get(key, 0) + (record.prompt_tokens or 0) + (record.completion_tokens or 0)
            self._observed(record)
        for (user, model), tokens in spent.items():
            if tokens and self.quotas.limited:
                self.quotas.spend(user, model, tokens)

    def _observed(self, record: UsageRecord) -> None:
        """A request's metrics and its access-log line."""
        self.metrics.observe(record)
        self.access(ts=record.ts, request_id=record.request_id, user=record.user, model=record.model,
                    cluster=record.cluster, endpoint=record.endpoint, route=record.capability, stream=record.stream,
                    status=record.status, prompt_tokens=record.prompt_tokens,
                    completion_tokens=record.completion_tokens, latency_ms=round(record.latency_ms, 2),
                    ttft_ms=round(record.ttft_ms, 2) if record.ttft_ms is not None else None)

    @staticmethod
    def access(**fields: Any) -> None:
        """One JSON line per request; ``ts`` as ISO 8601 UTC."""
        if ACCESS_LOG.isEnabledFor(logging.INFO):
            ACCESS_LOG.info(orjson.dumps({**fields, "ts": _iso(fields["ts"])}).decode())

    # -- batches, per user -------------------------------------------------------------------------------------

    def batches_for(self, gateway: Gateway, identity: Identity) -> Batches:
        """The user's own batch store (made on first use), whose runs are accounted to them. The owner's groups
        and Globus Compute token follow their latest request (runs read them from the same caller); the groups are
        written down when they change, for runs resumed after a restart (tokens never leave the process)."""
        found = self._batches.get(identity.username)
        if found is None:  # (an open store's owner is kept current by ``caller``)
            root = self._root_of(identity.username)
            root.mkdir(parents=True, exist_ok=True)
            _write_owner(root, identity)
            found = self._open_batches(gateway, root, identity)
        return found

    @staticmethod
    def _keep_owner(batches: Batches, identity: Identity) -> None:
        """The owner as of ``identity``, keeping the live dependent tokens it lacks (a user may send tokens of
        several sign-ins, not all of them consented to Globus Compute)."""
        owner = batches.caller
        assert isinstance(owner, SharedCaller)  # made by _open_batches
        if owner.identity.groups != identity.groups:
            _write_owner(batches.root, identity)
        kept = {rs: held for rs, held in owner.identity.dependent.items()
                if rs not in identity.dependent and owner.identity.token_for(rs) is not None}
        owner.identity = dataclasses.replace(identity, dependent={**kept, **identity.dependent}) if kept else identity

    @property
    def _users(self) -> Path:
        return self._home / "batches" / "users"

    def _root_of(self, username: str) -> Path:
        return self._users / hashlib.sha256(username.encode()).hexdigest()[:24]

    def resume_batches(self, gateway: Gateway) -> None:
        """At start: every user's unfinished batches run again (as their owner, with the groups last seen); with
        replicas on several hosts, from then on too, whenever a batch's runner's lease lapses."""
        for owner in sorted(self._users.glob(f"*/{OWNER_FILE}")) if self._users.is_dir() else []:
            self._open_owner(gateway, owner.parent)
        shared = self.state.batches
        if shared is not None:
            async def adopt() -> float:
                for username in await asyncio.to_thread(shared.orphaned_owners):
                    if username not in self._batches:
                        self._open_owner(gateway, self._root_of(username))
                return shared.lease_s

            self._runs.append(asyncio.get_running_loop().create_task(
                gateway.supervisor.repeat("batch adopter", adopt, shared.lease_s)))

    def _open_owner(self, gateway: Gateway, root: Path) -> None:
        """The batch store at ``root``, as its owner last seen (``OWNER_FILE``), unless it is open already."""
        data = orjson.loads((root / OWNER_FILE).read_bytes())
        identity = Identity(data["id"], data["username"], False, math.inf, frozenset(data["groups"]))
        if identity.username not in self._batches:
            self._open_batches(gateway, root, identity)

    def _open_batches(self, gateway: Gateway, root: Path, identity: Identity) -> Batches:
        shared = self.state.batches
        batches = self._batches[identity.username] = Batches(gateway, root, gateway.config.defaults.batch,
                                                             caller=SharedCaller(self, identity), shared=shared)
        every = RESUME_EVERY_S if shared is None else min(RESUME_EVERY_S, shared.lease_s)
        self._runs.append(asyncio.get_running_loop().create_task(batches.keep_running(every)))
        return batches

    async def close(self) -> None:
        for task in self._runs:
            task.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)
        for batches in self._batches.values():
            await batches.close()
        await self.state.close()


class SharedCaller:
    """One request's sender (or a batch's owner), as the Gateway's ``Caller``."""

    __slots__ = ("_in_flight", "headers", "identity", "policy", "record")

    def __init__(self, policy: SharedPolicy, identity: Identity) -> None:
        self.policy = policy
        self.identity = identity
        self.headers: dict[str, str] = {}
        """The sender's remaining allowance, for the answer's headers."""
        self.record: UsageRecord | None = None
        self._in_flight: str | None = None

    @property
    def user(self) -> str:
        return self.identity.username

    async def admit(self, req: ParsedRequest) -> None:
        policy = self.policy
        groups = policy.model_groups(req.model)
        if not may_use(self.identity, groups):
            policy.metrics.refused("forbidden")
            raise OpenAIError(403, f"{self.user} may not use model '{req.model}': it is open to members of its "
                                   f"Globus groups only. Ask to join one: {group_links(groups)}",
                              type="permission_error", param="model", code="model_not_allowed")
        if policy.quotas.limited:
            allowance = await policy.quotas.admit(self.user, req.model)
            self.headers = allowance.headers
            if not allowance.allowed:
                policy.metrics.refused("rate_limited")
                raise OpenAIError(429, f"{allowance.reason}. Retry after {allowance.headers['Retry-After']} s; the "
                                       "x-ratelimit-* headers say what is left.", type="rate_limit_error",
                                  code="rate_limit_exceeded", headers=allowance.headers)
        self._in_flight = req.model
        policy.metrics.request_started(req.model)

    async def wait_s(self, model: str) -> float:
        quotas = self.policy.quotas
        if not quotas.limited:
            return 0.0
        try:
            return (await quotas.admit(self.user, model)).retry_after_s
        except OpenAIError as exc:  # the quotas cannot be reached: a batch waits as it is told, rather than failing
            return float(exc.headers.get("Retry-After", 1))

    def may_use(self, model: str, cluster: str) -> bool:
        return may_use(self.identity, self.policy.model_groups(model)) and may_use(
            self.identity, self.policy.cluster_groups(cluster))

    def token_for(self, resource_server: str) -> str | None:
        return self.identity.token_for(resource_server)

    def recorded(self, record: UsageRecord) -> None:
        self.record = record
        self.ended()
        self.policy.recorded(record)

    def recorded_all(self, records: Sequence[UsageRecord]) -> None:
        self.policy.recorded_all(records)

    def ended(self) -> None:
        """The request is over (recorded, or its handler finished without a record): no longer in flight."""
        if self._in_flight is not None:
            self.policy.metrics.request_ended(self._in_flight)
            self._in_flight = None
