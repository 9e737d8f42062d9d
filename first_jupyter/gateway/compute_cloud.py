"""Tasks through the Globus Compute service: an Executor per endpoint, as the user or as a service identity.

Everything here goes through globus-compute-sdk: its ``Client`` for registration and status, its ``Executor`` for
submissions (batched by its own thread) and results. The SDK blocks, so calls that reach the service run in
threads; the futures it returns are awaited with ``asyncio.wrap_future``.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
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
from first_jupyter.gateway.backends.compute import SUBMIT_LIMIT_BYTES, CallWindow, too_large
from first_jupyter.gateway.compute_errors import describe_failure
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


class CloudSubmitter:
    """One endpoint's tasks through the Globus Compute service."""

    def __init__(self, endpoint: ComputeEndpoint | SchedulerView,
                 authorizer: Callable[[], globus_sdk.authorizers.GlobusAuthorizer], registry: Preferences,
                 window: CallWindow, where: str, status_ttl: float = 30.0) -> None:
        """``endpoint``: a model endpoint, or a cluster's login endpoint (for its scheduler view); ``authorizer``:
        made on first use (a service identity's variables are read then, so a missing one is a request's clear
        error, not a failed start); ``registry``: where registered function ids are kept."""
        self._endpoint = endpoint
        self._status_ttl = status_ttl
        self._authorizer = authorizer
        self._registry = registry
        self._window = window
        self._where = where
        self._lock = threading.Lock()
        self._client: Client | None = None
        self._executor: Executor | None = None
        self._ids: dict[str, str] = dict(endpoint.functions)
        self._serializer = ComputeSerializer()
        self._status: dict[str, Any] = {"state": "unknown", "checked": None}
        self._status_at = -math.inf

    def _connected(self) -> tuple[Client, Executor]:
        with self._lock:
            if self._client is None or self._executor is None:
                self._client = Client(authorizer=self._authorizer(), do_version_check=False)
                self._executor = Executor(endpoint_id=self._endpoint.endpoint_id, client=self._client)
            return self._client, self._executor

    def _registry_key(self, name: str) -> str:
        """Per endpoint, identity and version: a new release's functions are registered anew."""
        ep = self._endpoint
        return f"compute_function:{ep.endpoint_id}:{ep.identity}:{name}:{first_jupyter.__version__}"

    def _function_id(self, function: Callable[..., Any]) -> str:
        """The function's registered id: from config, from an earlier registration, or registered now."""
        name = function.__name__
        found = self._ids.get(name) or self._registry.get(self._registry_key(name))
        if found is None:
            client, _ = self._connected()
            found = client.register_function(function, description=f"first-jupyter {first_jupyter.__version__}: "
                                                                    f"{name}")
            self._registry.set(self._registry_key(name), found)
        self._ids[name] = found
        return found

    def _submit(self, function: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        size = len(self._serializer.pack_buffers([self._serializer.serialize(args), self._serializer.serialize({})]))
        if size > SUBMIT_LIMIT_BYTES:
            raise too_large(size)
        function_id = self._function_id(function)
        _, executor = self._connected()
        return executor.submit_to_registered_function(function_id, args=args)

    async def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        try:
            return await asyncio.to_thread(self._submit, function, args)
        except Exception as exc:
            raise describe_failure(exc, self._where) from None

    def describe(self, exc: BaseException) -> OpenAIError:
        return describe_failure(exc, self._where)

    def _read_status(self) -> dict[str, Any]:
        client, _ = self._connected()
        data = client.get_endpoint_status(self._endpoint.endpoint_id)
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
        except Exception as exc:
            self._status = {"state": "offline", "error": describe_failure(exc, self._where).message,
                            "checked": time.time()}
        return self._status

    async def close(self) -> None:
        """Stop submitting, and stop the SDK's result thread too: ``Executor.shutdown`` leaves it connected (and
        retrying for tens of seconds) until the interpreter exits. Blocking, as it may run from ``atexit``."""
        executor, self._executor = self._executor, None
        if executor is None:
            return
        executor.shutdown(wait=False, cancel_futures=True)
        watcher = getattr(executor_module, "_RESULT_WATCHERS", {}).get(executor.task_group_id)
        if watcher is not None:
            watcher.shutdown(wait=False, cancel_futures=True)
