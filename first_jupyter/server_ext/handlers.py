"""Jupyter's door to the gateway: the tornado door's routes (``api.tornado_door``) under ``{base_url}/first/``, on
Jupyter's handler base.

Two ways in: Jupyter's own auth (cookie + XSRF from the browser, or a Jupyter token), and the scoped key the
extension gives the kernels it starts (``Authorization: Bearer $FIRST_API_KEY``), which opens these routes
and nothing else of the server. Kernels are pointed at the gateway's own lean server (``api.lean_door``) rather
than here; this door answers the same routes alike for browsers, Jupyter tokens and anyone using this URL.
Then Jupyter's authorizer decides, about the resource ``first``, as Jupyter's own services do.
"""

from __future__ import annotations

from asyncio import Future
from typing import TYPE_CHECKING, Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.auth.identity import User
from jupyter_server.auth.utils import HTTP_METHOD_TO_AUTH_ACTION
from jupyter_server.base.handlers import APIHandler
from jupyter_server.prometheus.log_functions import prometheus_log_method
from tornado import web

from first_jupyter.api import door_kit
from first_jupyter.api.tornado_door import GatewayDoor, NotFoundRoute, OpenTableRoute, Routes, TableRoute, door_routes
from first_jupyter.protocol import OpenAIError
from first_jupyter.transport.proxies import is_loopback

if TYPE_CHECKING:
    pass

AUTH_RESOURCE = "first"
"""What Jupyter's authorizer is asked about for every route of this door: reading it (GET, HEAD) or writing it
(POST, PUT, PATCH, DELETE), as Jupyter's own services ask about ``sessions`` or ``kernels``."""
SCOPED_USER = User(username="first-scoped-key", name="FIRST kernel key", display_name="FIRST kernel key")
_AUTH_HELP = ("Authenticate with 'Authorization: Bearer $FIRST_API_KEY' (set in kernels the Jupyter server "
              "starts) or with a Jupyter token ('Authorization: token ...'); Anthropic's clients send either as "
              "'x-api-key'.")


class FirstHandler(GatewayDoor, APIHandler):  # type: ignore[misc]  # prepare: tornado calls the door's, no arguments
    """Jupyter's door: Jupyter's own auth, or the scoped key of the kernels the server starts; then Jupyter's
    authorizer, about the resource ``first`` (``authorize``)."""

    auth_resource = AUTH_RESOURCE
    _scoped = False

    def finish(self, *args: Any, **kwargs: Any) -> Future[None]:
        """Jupyter's API handlers make every answer JSON as they finish it; here it keeps its own type."""
        kwargs.setdefault("set_content_type", self.content_type)
        return super().finish(*args, **kwargs)

    def check_host(self) -> bool:
        """Jupyter's DNS-rebinding guard, remembered per Host header: Jupyter parses it on every request."""
        hosts: door_kit.HostVerdicts = self.settings["first_host_verdicts"]
        return hosts.allowed(self.request.host, self._jupyter_host_verdict)

    def _jupyter_host_verdict(self, _host: str) -> bool:
        return super().check_host()  # reads the same Host header from the request

    def _log(self) -> None:
        """Successful answers are accounted in the usage store; keep the metric, skip the access-log line."""
        if self.get_status() < 400:
            prometheus_log_method(self)
        else:
            super()._log()

    async def authenticate(self) -> None:
        headers = self.request.headers
        if door_kit.key_matches(headers.get, self.settings["first_api_key"].encode(),
                           self.settings.get("first_lasting_key")):
            if self.settings.get("first_behind_hub") and not self._from_this_host():
                raise OpenAIError(403, "FIRST_API_KEY is honoured here only from this server's own kernels: behind "
                                       "JupyterHub this URL is public, and the key opens the owner's Globus "
                                       "identity. From elsewhere, authenticate as yourself (a JupyterHub token: "
                                       "'Authorization: token ...').", type="permission_error",
                                  code="scoped_key_not_here")
            if not self.check_host():
                raise OpenAIError(403, f"Requests for host '{self.request.host}' are refused (DNS-rebinding "
                                       "guard). Use 127.0.0.1 or localhost, or set "
                                       "ServerApp.allow_remote_access.", type="permission_error",
                                  code="host_not_allowed")
            self._scoped = True
            self.current_user = self._jupyter_current_user = SCOPED_USER
            return  # a bearer key is not a cookie: no XSRF check applies
        if "Authorization" not in headers and headers.get("X-Api-Key"):  # Anthropic's clients' way to send a token
            headers["Authorization"] = f"token {headers['X-Api-Key']}"
        await APIHandler.prepare(self)  # Jupyter's auth: token, cookie (with its XSRF check), the hub's

    async def authorize(self) -> None:
        """Jupyter's authorizer decides whether the user may read or write ``first``: inference spends the server
        owner's Globus identity, and a custom authorizer (JupyterHub's sharing, a read-only collaborator in
        real-time collaboration) must be able to say who may. Asked in ``prepare``, from the head, so that a
        refused request's body is never read (``GatewayDoor``), and refused in the route's own error shape.

        The scoped key (and the lasting key, which opens what it opens) is not put to the authorizer, as before:
        it is held by the server's own kernels and by tools of the server's owner, not by a Jupyter user. Running
        code in a kernel is itself what the authorizer governs (``kernels``, ``terminals``), so whoever holds the
        key has already been let in as the owner; and an authorizer has no user to judge for it (JupyterHub's
        reads the hub user off the ``User`` it is given, which the key's ``SCOPED_USER`` is not)."""
        if self._scoped:
            return
        action = HTTP_METHOD_TO_AUTH_ACTION.get(self.request.method or "", "write")
        try:
            await (self._may_read() if action == "read" else self._may_write())
        except web.HTTPError:
            who = self.current_user.username if isinstance(self.current_user, User) else "this user"
            raise OpenAIError(403, f"Jupyter's authorizer does not let {who} {action} '{AUTH_RESOURCE}' (the FIRST "
                                   "gateway) on this server. Ask the server's owner for access, or use your own "
                                   "server.", type="permission_error", code="not_authorized") from None

    # One decorated method per action: ``@authorized`` keeps the action it derives from the first request's
    # method in its closure, so a single one shared by every HTTP method would judge later ones by the first's.
    @authorized("read")  # type: ignore[misc]  # jupyter_server types authorized(action) as a method, not a decorator
    async def _may_read(self) -> None:
        """Returns when the authorizer lets the user read ``first`` (``@authorized`` raises a 403 otherwise)."""

    @authorized("write")  # type: ignore[misc]  # as above
    async def _may_write(self) -> None:
        """Returns when the authorizer lets the user write ``first`` (``@authorized`` raises a 403 otherwise)."""

    def _from_this_host(self) -> bool:
        """A request from this machine's own processes (the server's kernels), not one the hub's proxy passed on:
        it comes from loopback and carries no forwarding header (configurable-http-proxy adds X-Forwarded-For)."""
        headers = self.request.headers
        if "X-Forwarded-For" in headers or "Forwarded" in headers or "X-Real-Ip" in headers:
            return False
        return is_loopback(self.request.remote_ip or "")

    def check_xsrf_cookie(self) -> None:
        if not self._scoped:
            super().check_xsrf_cookie()

    def hub_refusal(self) -> str | None:
        """Behind JupyterHub, why the hub refused a token it knows whose owner may not use this server (another
        user's): the hub's identity provider then leaves no user and replaces this handler's ``redirect`` with one
        raising a 403 that names the user. Jupyter raises its own bare 403 before any redirect, which would read as
        "not authenticated"; the hub's reason is asked for here instead. None when the hub refused nothing."""
        refuse = vars(self).get("redirect")
        if refuse is None or self.current_user:
            return None
        try:
            refuse("")
        except web.HTTPError as exc:
            return exc.log_message or "this user is not allowed"
        return None

    def _xsrf_refusal(self) -> str | None:
        """Why a request that changes something and carries cookies failed the XSRF check, if it did. JupyterHub's
        identity provider ignores a login cookie without its XSRF token and leaves no user, which would read as
        "not authenticated" when the sender is signed in and only the token is missing."""
        if "Cookie" not in self.request.headers or self.request.method in ("GET", "HEAD", "OPTIONS"):
            return None
        try:
            self.check_xsrf_cookie()
        except web.HTTPError as exc:
            return exc.log_message or "cross-site request refused"
        return None

    def error_for(self, status_code: int, reason: str | None) -> OpenAIError:
        """Jupyter's refusals (auth, XSRF) in words too."""
        refused = self.hub_refusal() if status_code == 403 else None
        if refused is not None:
            return OpenAIError(403, f"JupyterHub refused this request: {refused.rstrip('.')}. The token "
                                    "is valid, but for a user who may not use this server (it is its owner's; "
                                    "a hub admin can grant access:servers!server=<owner>/ in a role). "
                                    "Send a token of this server's owner.", type="permission_error",
                               code="not_your_server")
        if status_code == 403 and self.current_user is None:
            reason = self._xsrf_refusal()
            if reason is None:
                return OpenAIError(401, f"Not authenticated. {_AUTH_HELP}", type="authentication_error",
                                   code="invalid_api_key")
        if status_code == 403:
            return OpenAIError(403, f"Forbidden: {reason or 'cross-site request refused'}. Browser requests need "
                                    "the '_xsrf' cookie echoed in an 'X-XSRFToken' header; scripts should send "
                                    "a bearer key instead.", type="permission_error", code="forbidden")
        return super().error_for(status_code, reason)


class FirstTableHandler(TableRoute, FirstHandler):  # type: ignore[misc]  # as FirstHandler
    """The route table's paths on Jupyter's door."""


class FirstOpenTableHandler(OpenTableRoute, FirstHandler):  # type: ignore[misc]  # as FirstHandler
    """The paths with an open route (the callback) on Jupyter's door."""


class FirstNotFoundHandler(NotFoundRoute, FirstHandler):  # type: ignore[misc]  # as FirstHandler
    """Unknown paths under /first/ on Jupyter's door."""


def jupyter_routes() -> Routes:
    """Jupyter's door."""
    return door_routes(FirstTableHandler, FirstOpenTableHandler, FirstNotFoundHandler)
