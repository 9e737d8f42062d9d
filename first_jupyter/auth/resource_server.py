"""The shared gateway as a Globus Auth resource server: who sent a bearer token, and may they use the gateway.

A facility's gateway (``first serve``) is reached with Globus access tokens issued for its own client. Each token
is introspected once with the gateway's confidential client, and the verdict is reused by the token's hash: for at
most ``cache_s`` (ten minutes) and never past the token's expiry when accepted, for ``failure_cache_s`` when
refused (a client retrying a bad token in a loop must not turn into a loop of calls to Globus). Requests that
arrive together with the same new token share one introspection. Replicas on several hosts share the verdicts too
(``serve.redis_verdicts``, in Redis), so a token introspected by one is not introspected again by another.

The checks, in the order a user would fix them: the token is active and unexpired (401), meant for this gateway
(audience 401, scope 403), then the session checks (403): an identity from an allowed domain, the configured
authentication policies met, membership in a gateway-wide group. Service identities listed in the config skip
the session checks: a portal or a workflow engine has no browser session to satisfy them. Group membership is read
through the Groups API with a dependent token; cluster and model groups are checked per request (``may_use``)
from the same membership.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import globus_sdk

from first_jupyter.config import COMPUTE_RESOURCE_SERVER, ResourceServer
from first_jupyter.protocol import OpenAIError, bearer_token

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
INCLUDE = "session_info,identity_set_detail"
OUTAGE_RETRY_S = 5


@dataclass(frozen=True)
class Identity:
    """A caller the gateway accepted. ``dependent`` holds access tokens this gateway got on the caller's behalf
    (resource server → (token, expiry)), for calls made as the user (Globus Compute); they never leave the
    process."""

    id: str
    username: str
    service: bool
    expires_at: float
    groups: frozenset[str] = frozenset()
    dependent: Mapping[str, tuple[str, float]] = field(default_factory=dict, repr=False)

    def token_for(self, resource_server: str) -> str | None:
        held = self.dependent.get(resource_server)
        return held[0] if held is not None and held[1] > time.time() else None


Verdict = Identity | OpenAIError
"""What an introspection concluded: the caller, or the 401/403 that refused them."""


class SharedVerdicts(Protocol):
    """Verdicts kept where every replica of the gateway finds them. Best effort: an outage of the store answers
    None and keeps nothing, and the token is introspected as if it were not shared."""

    async def get(self, key: bytes, token: str) -> tuple[float, Verdict] | None:
        """The verdict kept for the token whose hash is ``key``, and until when it holds; None if none."""
        ...

    async def put(self, key: bytes, token: str, until: float, verdict: Verdict) -> None: ...


def may_use(identity: Identity, groups: Iterable[str]) -> bool:
    """Whether ``identity`` is in one of ``groups``; an empty list admits everyone, a service identity too."""
    wanted = set(groups)
    return not wanted or identity.service or not wanted.isdisjoint(identity.groups)


def group_links(groups: Iterable[str]) -> str:
    return ", ".join(f"https://app.globus.org/groups/{g}" for g in groups)


def _token_of(authorization: str | None) -> str:
    token = bearer_token(authorization)
    if token is None:
        raise _unauthorized("Send a Globus access token for this gateway as 'Authorization: Bearer <token>' (or "
                            "'x-api-key: <token>', as Anthropic's clients send it).",
                            "missing_token")
    return token


def _unauthorized(message: str, code: str) -> OpenAIError:
    return OpenAIError(401, message, type="authentication_error", code=code,
                       headers={"WWW-Authenticate": f'Bearer realm="first", error="invalid_token", '
                                                   f'error_description="{code}"'})


def _forbidden(message: str, code: str) -> OpenAIError:
    return OpenAIError(403, message, type="permission_error", code=code)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _retrieve(task: asyncio.Task[Identity]) -> None:
    """Every waiter may have left; the outcome is still taken, so asyncio logs no unretrieved exception."""
    if not task.cancelled():
        task.exception()


def _domain(username: str) -> str:
    return username.rpartition("@")[2].lower()


class TokenIntrospector:
    """Introspects and checks bearer tokens; blocking Globus calls run in threads, verdicts are cached."""

    def __init__(self, settings: ResourceServer, secret: str, *, want_groups: bool, want_compute: bool,
                 clock: Callable[[], float] = time.time, most_cached: int = 100_000,
                 shared: SharedVerdicts | None = None) -> None:
        """``want_groups``: some group is configured anywhere (gateway, cluster or model), so membership is read;
        ``want_compute``: some cluster calls Globus Compute as the user, so its dependent token is kept;
        ``shared``: the verdicts of the other replicas, looked up before Globus is asked."""
        self.settings = settings
        self._client = globus_sdk.ConfidentialAppAuthClient(settings.client_id, secret)
        self._want_groups = want_groups
        self._want_compute = want_compute
        self._clock = clock
        self._most = most_cached
        self._shared = shared
        self._verdicts: dict[bytes, tuple[float, Verdict]] = {}
        self._pending: dict[bytes, asyncio.Task[Identity]] = {}
        self.introspections = 0
        """How many times Globus was asked (the cache's hit rate shows in it)."""

    async def identify(self, authorization: str | None) -> Identity:
        """The caller behind an ``Authorization`` header, or the 401/403/503 that says what is wrong."""
        token = _token_of(authorization)
        key = hashlib.sha256(token.encode()).digest()
        kept = self._verdicts.get(key)
        if kept is not None and kept[0] > self._clock():
            if isinstance(kept[1], OpenAIError):  # each raise with a fresh traceback: none piles up on the kept one
                raise kept[1].with_traceback(None)
            return kept[1]
        task = self._pending.get(key)
        if task is None:  # the first request with this token asks; those arriving meanwhile wait for its answer
            task = self._pending[key] = asyncio.get_running_loop().create_task(self._resolve(key, token))
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)  # a request that leaves does not cancel the others' answer

    async def _resolve(self, key: bytes, token: str) -> Identity:
        try:
            kept = await self._shared.get(key, token) if self._shared is not None else None
            until, verdict = kept if kept is not None and kept[0] > self._clock() else await self._ask(key, token)
        finally:
            del self._pending[key]
        self._keep(key, until, verdict)
        if isinstance(verdict, OpenAIError):
            raise verdict.with_traceback(None)
        return verdict

    async def _ask(self, key: bytes, token: str) -> tuple[float, Verdict]:
        """Globus's verdict and until when it holds, kept for the other replicas too; an outage (503) is not a
        verdict, so it is raised and kept nowhere."""
        verdict: Verdict
        try:
            verdict = await asyncio.to_thread(self._verdict, token)
            until = min(self._clock() + self.settings.cache_s, verdict.expires_at)
        except OpenAIError as exc:
            if exc.status not in (401, 403):
                raise
            verdict, until = exc, self._clock() + self.settings.failure_cache_s
        if self._shared is not None:
            await self._shared.put(key, token, until, verdict)
        return until, verdict

    def _keep(self, key: bytes, until: float, verdict: Verdict) -> None:
        if len(self._verdicts) >= self._most:  # bounded: anyone can send made-up tokens
            now = self._clock()
            self._verdicts = {k: v for k, v in self._verdicts.items() if v[0] > now}
            if len(self._verdicts) >= self._most:
                self._verdicts.clear()
        self._verdicts[key] = (until, verdict)

    # -- in a thread ---------------------------------------------------------------------------------------

    def _verdict(self, token: str) -> Identity:
        data = self._introspect(token)
        identity = self._check(data)
        if identity.service or not (self._want_groups or self._want_compute):
            return identity
        dependent = self._dependent_tokens(token)
        groups = self._groups(dependent) if self._want_groups else frozenset()
        if self.settings.groups and groups.isdisjoint(self.settings.groups):
            raise _forbidden(f"{identity.username} is not a member of the Globus groups that may use this gateway. "
                             f"Ask to join one: {group_links(self.settings.groups)}", "not_in_group")
        compute = dependent.get(COMPUTE_RESOURCE_SERVER) if self._want_compute else None
        return replace(identity, groups=groups,
                       dependent={COMPUTE_RESOURCE_SERVER: compute} if compute else {})

    def _globus(self, call: Callable[[], Any], what: str) -> Any:
        """A call to Globus; its failure is the gateway's (503), said so, never the user's token's."""
        try:
            return call()
        except globus_sdk.GlobusAPIError as exc:
            if exc.http_status in (401, 403) and what == "introspect":
                detail = "it refused this gateway's own client credentials; the operator must fix the client " \
                         "id or secret"
            else:
                detail = f"it answered {exc.http_status}"
            raise OpenAIError(503, f"Could not check the token with Globus Auth ({what}): {detail}. Retry in a "
                                   "moment.", type="api_error", code="auth_unavailable",
                              headers={"Retry-After": str(OUTAGE_RETRY_S)}) from None
        except globus_sdk.NetworkError as exc:
            raise OpenAIError(503, f"Could not reach Globus ({what}: {type(exc).__name__}). Retry in a moment.",
                              type="api_error", code="auth_unavailable",
                              headers={"Retry-After": str(OUTAGE_RETRY_S)}) from None

    def _introspect(self, token: str) -> dict[str, Any]:
        self.introspections += 1
        body: dict[str, Any] = {"token": token, "include": INCLUDE}
        if self.settings.policies:
            body["authentication_policies"] = ",".join(self.settings.policies)
        response = self._globus(lambda: self._client.post("/v2/oauth2/token/introspect", data=body,
                                                          encoding="form"), "introspect")
        return dict(response.data)

    def _check(self, data: dict[str, Any]) -> Identity:
        scope = self.settings.required_scope
        how = f"Get a token for scope {scope} (`first login` with that scope, or your Globus app's login)."
        if not data.get("active"):
            raise _unauthorized(f"The token is not active: it expired, was revoked, or is not a Globus token. {how}",
                                "inactive_token")
        exp = float(data.get("exp") or 0)
        if exp <= self._clock():
            raise _unauthorized(f"The token expired at {_when(exp)}. {how}", "expired_token")
        audience = data.get("aud") or []
        if self.settings.client_id not in audience:
            raise _unauthorized(f"The token was issued for another service ({', '.join(audience) or 'no audience'}), "
                                f"not this gateway ({self.settings.client_id}). {how}", "wrong_audience")
        if scope not in str(data.get("scope", "")).split():
            raise _forbidden(f"The token does not carry this gateway's scope. {how}", "insufficient_scope")
        sub, username = str(data.get("sub", "")), str(data.get("username", ""))
        service = bool({sub, username} & set(self.settings.service_identities))
        identity = Identity(sub, username or sub, service, exp)
        if not service:
            self._check_session(data, username)
        return identity

    def _check_session(self, data: dict[str, Any], username: str) -> None:
        allowed = [d.lower() for d in self.settings.allowed_domains]
        if allowed:
            names = {d.get("id"): d.get("username", "") for d in data.get("identity_set_detail") or []}
            session = ((data.get("session_info") or {}).get("authentications") or {})
            used = [names.get(i) or i for i in session]
            if not any(_domain(u) == d or _domain(u).endswith("." + d) for u in used for d in allowed):
                shown = ", ".join(used) or "no identity"
                raise _forbidden(f"This gateway accepts identities from {', '.join(allowed)}; your session signed "
                                 f"in with {shown}. Sign in again with your institution's identity (for "
                                 f"{username}'s account, link one at https://app.globus.org/account/identities).",
                                 "identity_domain_not_allowed")
        evaluations = data.get("policy_evaluations") or {}
        failed = [p for p in self.settings.policies if not (evaluations.get(p) or {}).get("evaluation")]
        if failed:
            raise _forbidden(f"Your session does not meet this gateway's authentication policy {', '.join(failed)} "
                             "(a high-assurance sign-in, recent enough, with an allowed identity). Sign out of "
                             "Globus, sign in again with your institution's identity, and get a new token.",
                             "policy_not_met")

    def _dependent_tokens(self, token: str) -> dict[str, tuple[str, float]]:
        response = self._globus(lambda: self._client.oauth2_get_dependent_tokens(token), "dependent tokens")
        return {rs: (t["access_token"], float(t.get("expires_at_seconds") or math.inf))
                for rs, t in response.by_resource_server.items()}

    def _groups(self, dependent: dict[str, tuple[str, float]]) -> frozenset[str]:
        held = dependent.get(GROUPS_RESOURCE_SERVER)
        if held is None:
            raise OpenAIError(503, "Globus Auth gave this gateway no Groups token for the user: the gateway's client "
                                   "lacks the Groups scope as a dependency. The operator must add it.",
                              type="api_error", code="auth_unavailable")
        groups = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(held[0]))
        mine = self._globus(groups.get_my_groups, "groups")
        return frozenset(g["id"] for g in mine if any(m.get("status") == "active"
                                                       for m in g.get("my_memberships") or [{"status": "active"}]))
