"""The shared gateway's door (``first serve``): the same route handlers as Jupyter's, on plain tornado, for
callers with Globus access tokens.

Each request's bearer token is introspected (cached) into an identity, which becomes the request's
``SharedCaller``: inference goes through its groups and quotas, usage answers are the caller's own (operators may
ask for anyone's), batches live in the caller's own store, and the default model is the operators' to set. Every
request leaves one JSON access-log line: inference requests through their usage record, the others from here.
"""

from __future__ import annotations

import time

import orjson
from tornado import web

from first_jupyter.api.tornado_door import GatewayDoor, NotFoundRoute, OpenTableRoute, Routes, TableRoute, door_routes
from first_jupyter.api_types import SignIn
from first_jupyter.batch.batches import Batches
from first_jupyter.protocol import OpenAIError, presented_token
from first_jupyter.serve.policy import SharedCaller, SharedPolicy
from first_jupyter.serve.state import HEALTH_RETRY_AFTER_S


class SharedHandler(GatewayDoor):
    """Globus bearer tokens instead of Jupyter's auth; errors in the OpenAI shape whatever raised them."""

    _caller: SharedCaller | None = None
    _t0 = 0.0

    @property
    def policy(self) -> SharedPolicy:
        policy: SharedPolicy = self.settings["first_shared"]
        return policy

    async def prepare(self) -> None:
        self._t0 = time.perf_counter()
        await super().prepare()

    async def authenticate(self) -> None:
        """The bearer token (or ``x-api-key``, Anthropic's clients' header: the same token, the same rules), from
        the head: a missing or refused one is answered before any body is read."""
        if self.open_route:
            return
        headers = self.request.headers
        token = presented_token(headers.get("Authorization"), headers.get("X-Api-Key"))
        self._caller = await self.policy.caller(f"Bearer {token}" if token else headers.get("Authorization"))
        self.current_user = self._caller.identity

    def on_finish(self) -> None:
        """The access-log line of a request the gateway did not record (all but inference that was admitted)."""
        caller = self._caller
        if caller is not None:
            caller.ended()
            if caller.record is not None:
                return
        self.policy.access(ts=time.time(), user=caller.user if caller is not None else None,
                           route=f"{self.request.method} {self.request.path}", status=self.get_status(),
                           latency_ms=round((time.perf_counter() - self._t0) * 1000, 2))

    def _identity_admin(self) -> bool:
        return self._caller is not None and self.policy.is_admin(self._caller.identity)

    # -- GatewayDoor's hooks -----------------------------------------------------------------------------------

    def caller(self) -> SharedCaller | None:
        return self._caller

    def usage_user(self) -> str | None:
        """The caller's own usage; an operator may ask for anyone's with ``?user=``."""
        assert self._caller is not None  # every route but the callback is authenticated
        asked = self.get_query_argument("user", None)
        if asked is not None and asked != self._caller.user and not self._identity_admin():
            raise OpenAIError(403, "Only the gateway's operators (serve.auth.admins) may read another user's usage.",
                              type="permission_error", code="not_an_admin")
        return asked or self._caller.user

    def batches(self) -> Batches:
        assert self._caller is not None
        return self.policy.batches_for(self.gateway, self._caller.identity)

    def check_default_change(self) -> None:
        if not self._identity_admin():
            raise OpenAIError(403, "The default model is chosen by the gateway's operators (serve.auth.admins) for "
                                   "every user; name the model in your requests instead.",
                              type="permission_error", code="not_an_admin")

    async def whoami(self) -> SignIn:
        assert self._caller is not None
        who = self._caller.identity
        return SignIn.model_validate({"signed_in": True, "username": who.username, "id": who.id,
                                      "service": who.service, "groups": len(who.groups),
                                      "admin": self.policy.is_admin(who), "expires_at": who.expires_at})

    def signs_in(self) -> bool:
        """Callers sign in with Globus on their side and bring their tokens."""
        return False


class UsersUsageHandler(SharedHandler):
    """GET /first/api/usage/users: requests and tokens per user and model, for operators."""

    @web.authenticated
    async def get(self) -> None:
        if not self._identity_admin():
            raise OpenAIError(403, "Only the gateway's operators (serve.auth.admins) may read every user's usage.",
                              type="permission_error", code="not_an_admin")
        self.write_json(await self.gateway.usage_by_user())


class MetricsHandler(SharedHandler):
    """GET /metrics for Prometheus: labels are models, clusters and statuses, never users, so it is open."""

    open_route = True

    def get(self) -> None:
        body, content_type = self.policy.metrics.render()
        self.set_header("Content-Type", content_type)
        self.finish(body)


class HealthHandler(SharedHandler):
    """GET /healthz for load balancers and monitors: this process answers, with each state backend it uses; 503
    with ``Retry-After`` while Redis or the database cannot be reached, naming which."""

    open_route = True

    async def get(self) -> None:
        health = await self.policy.state.health()
        if not health.ok:
            self.set_status(503)
            self.set_header("Retry-After", str(HEALTH_RETRY_AFTER_S))
        usage = {} if health.usage_records is None else {"usage_records": health.usage_records}
        self.finish(orjson.dumps({"ok": health.ok, "state": health.backends, **usage}))


class SharedTableHandler(TableRoute, SharedHandler):
    """The route table's paths at the shared gateway."""


class SharedOpenTableHandler(OpenTableRoute, SharedHandler):
    """The paths with an open route (the callback) at the shared gateway."""


class SharedNotFoundHandler(NotFoundRoute, SharedHandler):
    """Every unknown path at the shared gateway."""


def shared_routes() -> Routes:
    return [("/metrics", MetricsHandler, {}), ("/healthz", HealthHandler, {}),
            ("/first/api/usage/users", UsersUsageHandler, {}),
            *door_routes(SharedTableHandler, SharedOpenTableHandler, SharedNotFoundHandler, everything_else="/.*")]
