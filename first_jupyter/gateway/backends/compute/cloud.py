"""Tasks through the Globus Compute service: an Executor per endpoint and identity, which is the user who signed
the Jupyter server in, a service identity, or at a shared gateway each request's sender (with the Compute token
the gateway got on their behalf).

Everything here goes through globus-compute-sdk: its ``Client`` for registration and status, its ``Executor`` for
submissions (batched by its own thread) and results. The SDK blocks, so calls that reach the service run in
threads; the futures it returns are awaited with ``asyncio.wrap_future``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import globus_sdk
from globus_compute_sdk import Client, Executor
from globus_compute_sdk.sdk import executor as executor_module
from globus_compute_sdk.serialize import ComputeSerializer

import first_jupyter
from first_jupyter.auth.manager import TokenManager
from first_jupyter.auth.tokens import AuthError
from first_jupyter.config import COMPUTE_RESOURCE_SERVER, COMPUTE_SCOPE, ComputeEndpoint, SchedulerView
from first_jupyter.gateway.backends.compute.backend import SUBMIT_LIMIT_BYTES, CallWindow, too_large
from first_jupyter.gateway.backends.compute.errors import describe_failure
from first_jupyter.gateway.caller import CALLER_TOKEN_MISSING
from first_jupyter.gateway.caller import current as current_caller
from first_jupyter.gateway.preferences import Preferences
from first_jupyter.protocol import OpenAIError


class UserTokenAuthorizer(globus_sdk.authorizers.GlobusAuthorizer):
    """The user's Globus Compute token, asked of the token manager for each call: sources refresh it, and a
    user who signs in while the gateway runs is used from the next call on."""

    def __init__(self, tokens: TokenManager) -> None:
        self._tokens = tokens

    def get_authorization_header(self) -> str:
        return f"Bearer {self._tokens.token_for(COMPUTE_RESOURCE_SERVER)}"

    def handle_missing_authorization(self) -> bool:
        return False


def service_authorizer(endpoint: ComputeEndpoint | SchedulerView,
                       environ: dict[str, str]) -> globus_sdk.authorizers.GlobusAuthorizer:
    """A shared deployment's own identity: client credentials from the environment variables the config names."""
    client_id = environ.get(endpoint.service_client_id_env)
    secret = environ.get(endpoint.service_client_secret_env)
    if not client_id or not secret:
        raise AuthError(f"endpoint '{endpoint.name}' runs as a service identity, but ${endpoint.service_client_id_env} "
                        f"and ${endpoint.service_client_secret_env} are not both set in the Jupyter server's "
                        f"environment. Set them (a Globus confidential client) and restart the server.")
    auth = globus_sdk.ConfidentialAppAuthClient(client_id, secret)
    return globus_sdk.ClientCredentialsAuthorizer(auth, COMPUTE_SCOPE)


class HeldTokenAuthorizer(globus_sdk.authorizers.GlobusAuthorizer):
    """A caller's Globus Compute token as a shared gateway holds it: replaced by the newer one each request brings
    (a dependent token got anew at each introspection), so the session's threads send the latest."""

    def __init__(self, token: str) -> None:
        self.token = token

    def get_authorization_header(self) -> str:
        return f"Bearer {self.token}"

    def handle_missing_authorization(self) -> bool:
        return False


class NoCallerYet(Exception):
    """A shared gateway's background reading, before any user has sent a request to act as."""


class Credentials:
    """Who one endpoint's calls go out as: one identity for all (the user who signed this Jupyter server in, or a
    service identity), or, at a shared gateway, each request's own sender (``gateway.caller.current``)."""

    def __init__(self, fixed: Callable[[], globus_sdk.authorizers.GlobusAuthorizer] | None, key: str,
                 where: str) -> None:
        """``fixed``: the one identity's authorizer, made on first use (a service identity's variables are read
        then, so a missing one is a request's clear error, not a failed start); None: each caller's own token.
        ``key``: the fixed identity's name in the function registry."""
        self.fixed = fixed
        self.key = key
        self._where = where

    @classmethod
    def of_callers(cls, where: str) -> Credentials:
        return cls(None, "", where)

    def current(self) -> tuple[str, str | None]:
        """The identity to act as now, and its token when it is a caller's; ``NoCallerYet`` when the code runs
        for no one (background work at a shared gateway: the newest session is used then); a 401 ``OpenAIError``
        when the caller's token is missing."""
        if self.fixed is not None:
            return self.key, None
        caller = current_caller()
        if caller is None:
            raise NoCallerYet
        token = caller.token_for(COMPUTE_RESOURCE_SERVER)
        if token is None:
            raise OpenAIError(401, f"The gateway holds no Globus Compute token for {caller.user}, and {self._where} "
                                   "runs each user's tasks as that user. Send a request with a current Globus token "
                                   "(a batch waits for one); if this goes on, the gateway's Globus client lacks "
                                   "Globus Compute's scope as a dependent scope: tell its operator.",
                              type="authentication_error", code=CALLER_TOKEN_MISSING)
        return f"user:{caller.user}", token


class _Session:
    """One identity's connection to the service: its client and its executor (whose submission thread, result
    thread and AMQP connection are that identity's)."""

    __slots__ = ("client", "executor", "held")

    def __init__(self, client: Client, executor: Executor, held: HeldTokenAuthorizer | None) -> None:
        self.client = client
        self.executor = executor
        self.held = held

    def close(self, *, cancel: bool) -> None:
        """Stop submitting, and stop the SDK's result thread too: ``Executor.shutdown`` leaves it connected (and
        retrying for tens of seconds) until the interpreter exits. ``cancel``: drop tasks still unsent and results
        still awaited (the gateway is stopping); else both finish first (a session put aside)."""
        self.executor.shutdown(wait=False, cancel_futures=cancel)
        watcher = getattr(executor_module, "_RESULT_WATCHERS", {}).get(self.executor.task_group_id)
        if watcher is not None:
            watcher.shutdown(wait=False, cancel_futures=cancel)


class CloudSubmitter:
    """One endpoint's tasks through the Globus Compute service, as one identity or as each caller (a session
    per caller, the most recent ``max_sessions`` kept)."""

    def __init__(self, endpoint: ComputeEndpoint | SchedulerView, credentials: Credentials, registry: Preferences,
                 window: CallWindow, where: str, status_ttl: float = 30.0, max_sessions: int = 1) -> None:
        """``endpoint``: a model endpoint, or a cluster's login endpoint (for its scheduler view);
        ``registry``: where registered function ids are kept (per identity: a user's registration is theirs)."""
        self._endpoint = endpoint
        self._status_ttl = status_ttl
        self._credentials = credentials
        self._registry = registry
        self._window = window
        self._where = where
        self._max_sessions = max_sessions
        self._lock = threading.Lock()
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._ids: dict[tuple[str, str], str] = {}
        self._serializer = ComputeSerializer()
        self._status: dict[str, Any] = {"state": "unknown", "checked": None}
        self._status_at = -math.inf

    def _connected(self, *, anyone: bool = False) -> tuple[str, _Session]:
        """The session of the identity to act as now (made on first use); for no caller, or for a reading about
        the endpoint rather than anyone's work (``anyone``), the newest caller's."""
        try:
            if anyone and self._credentials.fixed is None:
                raise NoCallerYet
            key, token = self._credentials.current()
        except NoCallerYet:
            with self._lock:
                if not self._sessions:
                    raise
                key = next(reversed(self._sessions))
                return key, self._sessions[key]
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = self._open(token)
                while len(self._sessions) > self._max_sessions:
                    _, oldest = self._sessions.popitem(last=False)
                    threading.Thread(target=oldest.close, kwargs={"cancel": False}, daemon=True,
                                     name="first-compute-session-close").start()  # its shutdown waits for sends
            else:
                self._sessions.move_to_end(key)
                if token is not None and session.held is not None:
                    session.held.token = token
            return key, session

    def _open(self, token: str | None) -> _Session:
        """A new session. Its executor starts without a task group, so that the service gives it one of its own:
        the SDK hands a new Executor the process's last task group, which may be another identity's (and with it
        that identity's result stream)."""
        held = HeldTokenAuthorizer(token) if token is not None else None
        fixed = self._credentials.fixed
        authorizer = held if fixed is None else fixed()
        client = Client(authorizer=authorizer, do_version_check=False)
        executor = Executor(endpoint_id=self._endpoint.endpoint_id, client=client, amqp_port=self._amqp_port())
        executor.task_group_id = None
        return _Session(client, executor, held)

    def _amqp_port(self) -> int | None:
        """The port results come back on, when the endpoint sets one: where a site's firewall blocks AMQPS's 5671,
        the service also takes 443. The SDK puts it in place of the port in the URL the service gives for its
        result queue; None keeps the service's."""
        return self._endpoint.amqp_port

    def _registry_key(self, identity: str, name: str) -> str:
        """Per endpoint, identity and version: a new release's functions are registered anew."""
        return f"compute_function:{self._endpoint.endpoint_id}:{identity}:{name}:{first_jupyter.__version__}"

    def _function_id(self, function: Callable[..., Any], identity: str, session: _Session) -> str:
        """The function's registered id: from config, from the identity's earlier registration, or registered
        now as that identity."""
        name = function.__name__
        # functions is keyed by the Literal names config allows; any other str reads as absent (None)
        configured = self._endpoint.functions.get(name)  # type: ignore[call-overload]  # a str key: see the line above
        found = configured or self._ids.get((identity, name)) or self._registry.get(
            self._registry_key(identity, name))
        if found is None:
            found = session.client.register_function(function, description=f"first-jupyter "
                                                                           f"{first_jupyter.__version__}: {name}")
            self._registry.set(self._registry_key(identity, name), found)
        self._ids[(identity, name)] = found
        return found

    def _submit(self, function: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        size = len(self._serializer.pack_buffers([self._serializer.serialize(args), self._serializer.serialize({})]))
        if size > SUBMIT_LIMIT_BYTES:
            raise too_large(size)
        identity, session = self._connected()
        function_id = self._function_id(function, identity, session)
        future: Future[Any] = session.executor.submit_to_registered_function(function_id, args=args)  # SDK: untyped
        return future

    async def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        try:
            return await asyncio.to_thread(self._submit, function, args)  # (the thread keeps the caller)
        except NoCallerYet:
            raise OpenAIError(503, f"{self._where} runs tasks as each user, and no user has sent a request to this "
                                   "gateway process yet.", type="api_error", code="no_caller_yet") from None
        except Exception as exc:
            raise describe_failure(exc, self._where) from None

    def describe(self, exc: BaseException) -> OpenAIError:
        return describe_failure(exc, self._where)

    def _read_status(self) -> dict[str, Any]:
        _, session = self._connected(anyone=True)
        data = session.client.get_endpoint_status(self._endpoint.endpoint_id)
        details = data.get("details") or {}
        online = data.get("status") == "online"
        workers = int(details.get("total_workers") or 0)
        return {"state": ("running" if workers else "stopped") if online else "offline",
                "endpoint_status": data.get("status"), "managers": details.get("managers"),
                "workers": workers, "idle_workers": details.get("idle_workers"),
                "outstanding_tasks": details.get("outstanding_tasks"), "checked": time.time()}

    async def status(self) -> dict[str, Any]:
        """The endpoint's state, reused for ``status_ttl`` seconds and never asked past the service's limit
        (then the last reading is given, marked stale)."""
        now = time.monotonic()
        if now - self._status_at < self._status_ttl:
            return self._status
        if not self._window.take():
            return {**self._status, "stale": True}
        self._status_at = now
        try:
            self._status = await asyncio.to_thread(self._read_status)
        except NoCallerYet:  # read as the users, of whom none has come yet (so read again at once when one has);
            self._status_at = -math.inf  # routing takes "unknown" as may-answer
            self._status = {"state": "unknown", "checked": None, "note": "read as this gateway's users: after the "
                                                                          "first request"}
        except Exception as exc:
            self._status = {"state": "offline", "error": describe_failure(exc, self._where).message,
                            "checked": time.time()}
        return self._status

    async def close(self) -> None:
        """Every session's, dropping what is unsent or unanswered: the gateway is stopping. Blocking, as it may
        run from ``atexit``."""
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), OrderedDict()
        for session in sessions:
            session.close(cancel=True)
