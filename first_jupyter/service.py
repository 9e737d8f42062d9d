"""The composition root: the one module that builds a running gateway from its parts.

It builds the Gateway with its Batch API (the gateway runs batches' lines but does not build their service, and
the batch runner reaches the gateway only through its public methods, so each names the other only in its
types), and runs it: its own loop thread, and its own HTTP server (the lean door) on that loop when it has a
socket. The Jupyter extension, the client's in-process gateway and ``first serve`` all start here; starting and
stopping (server, gateway, thread, in that order) is the same for each, so it lives here once.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from first_jupyter.api.lean_door import GatewayApp
from first_jupyter.batch.batches import Batches
from first_jupyter.config import (
    ComputeCluster,
    ComputeEndpoint,
    FirstConfig,
    FirstGatewayCluster,
    HttpCluster,
    Limits,
    LocalCluster,
    SchedulerView,
    callback_url_for,
)
from first_jupyter.gateway.backends.base import Backend
from first_jupyter.gateway.backends.compute.backend import ComputeBackend
from first_jupyter.gateway.backends.compute.callbacks import StreamHandOff
from first_jupyter.gateway.backends.first_gateway import FirstGatewayBackend
from first_jupyter.gateway.backends.http import HttpBackend, reach_of
from first_jupyter.gateway.backends.local import LocalBackend
from first_jupyter.gateway.bearer import BearerTokens
from first_jupyter.gateway.core import Backends, Gateway
from first_jupyter.gateway.response_ids import ResponseBook
from first_jupyter.gateway.usage import UsageLog
from first_jupyter.transport.http_server import serve
from first_jupyter.transport.loop_thread import LoopThread

if TYPE_CHECKING:
    from first_jupyter.gateway.backends.compute.cloud import Credentials
    from first_jupyter.gateway.backends.compute.scheduler_view import SchedulerReader

STOP_TIMEOUT_S = 30.0


class _BackendBuilder:
    """Each configured endpoint's backend, on the parts of the gateway that sends through them (its pooled client,
    its sign-in, its callback hub); what it built is ``Backends``."""

    def __init__(self, gateway: Gateway, environ: Mapping[str, str]) -> None:
        self.gateway, self.environ = gateway, environ
        self.built = Backends([])

    def build(self) -> Backends:
        gateway = self.gateway
        config, client, tokens = gateway.config, gateway.client, BearerTokens(gateway.auth)
        backends = self.built.backends
        for cluster_name, cluster in config.clusters.items():
            if isinstance(cluster, HttpCluster):
                backends.extend(HttpBackend(
                    cluster_name, ep.name, ep.base_url, ep.models, client, api_key_env=ep.api_key_env,
                    globus=(tokens, ep.globus_resource_server) if ep.globus_resource_server else None,
                    capacity=ep.concurrency, engine_metrics=ep.engine_metrics,
                    reach=reach_of(f"clusters.{cluster_name}.endpoints[{i}]", ep.proxy, ep.tls))
                    for i, ep in enumerate(cluster.endpoints))
            elif isinstance(cluster, LocalCluster):
                backends.extend(LocalBackend(cluster_name, ep, client, gateway.data_dir / "logs")
                                for ep in cluster.endpoints)
            elif isinstance(cluster, FirstGatewayCluster):
                backends.extend(FirstGatewayBackend(
                    cluster_name, ep, client, tokens,
                    reach_of(f"clusters.{cluster_name}.endpoints[{i}]", ep.proxy, ep.tls))
                    for i, ep in enumerate(cluster.endpoints))
            else:
                scheduler = self._scheduler_reader(cluster_name, cluster) if cluster.scheduler else None
                backends.extend(self._compute_backend(cluster_name, ep, scheduler) for ep in cluster.endpoints)
        return self.built

    def _credentials(self, endpoint: ComputeEndpoint | SchedulerView, where: str) -> Credentials:
        """Who an endpoint's Compute calls go as: its service identity; else the user, who is each request's sender
        at a shared gateway, and the user signed in here in a user's own server."""
        from first_jupyter.gateway.backends.compute.cloud import Credentials, UserTokenAuthorizer, service_authorizer

        if endpoint.identity == "service":
            environ = self.environ
            return Credentials(lambda: service_authorizer(endpoint, dict(environ)), "service", where)
        if self.gateway.shared:
            self.built.compute_as_callers = True
            return Credentials.of_callers(where)
        auth = self.gateway.auth
        return Credentials(lambda: UserTokenAuthorizer(auth), "user", where)

    def _scheduler_reader(self, cluster_name: str, cluster: ComputeCluster) -> SchedulerReader:
        """The cluster's scheduler view, read through its login endpoint; shared by the cluster's endpoints."""
        from first_jupyter.gateway.backends.compute.cloud import CloudSubmitter
        from first_jupyter.gateway.backends.compute.scheduler_view import SchedulerReader, job_label

        view = cluster.scheduler
        assert view is not None
        where = f"cluster '{cluster_name}'"
        login = f"{where} login endpoint"
        submitter = CloudSubmitter(view, self._credentials(view, login), self.gateway.preferences,
                                   self.gateway.compute_window, login)
        labels = {job_label(ep.name): [m.id for m in ep.models] for ep in cluster.endpoints}
        reader = SchedulerReader(view, submitter, labels, where)
        self.built.scheduler_readers.append(reader)
        return reader

    def _compute_backend(self, cluster: str, endpoint: ComputeEndpoint,
                         scheduler: SchedulerReader | None = None) -> Backend:
        """A Globus Compute endpoint's backend. The SDK and the engine are imported only by gateways that have one
        (they are slow to import, and a Jupyter server's start should not wait for them)."""
        gateway = self.gateway
        where = f"cluster '{cluster}' endpoint '{endpoint.name}'"
        idle = gateway.config.defaults.timeouts.idle
        if endpoint.in_process is not None:
            from first_jupyter.gateway.backends.compute.in_process import InProcessSubmitter

            local = InProcessSubmitter(endpoint, gateway.data_dir / "compute" / f"{cluster}-{endpoint.name}",
                                       gateway.data_dir / "logs" / f"engine-{cluster}-{endpoint.name}.log", where)
            return ComputeBackend(cluster, endpoint, local, gateway.callbacks, idle, gateway.own_callback_url,
                                  engine_port=local.port, upstream_name=local.served_name, engine=local.engine)

        from first_jupyter.gateway.backends.compute.cloud import CloudSubmitter

        submitter = CloudSubmitter(endpoint, self._credentials(endpoint, where), gateway.preferences,
                                   gateway.compute_window, where, endpoint.status_ttl, endpoint.user_sessions)
        callback = callback_url_for(endpoint.callback_url, self.environ, where)
        return ComputeBackend(cluster, endpoint, submitter, gateway.callbacks, idle, lambda: callback,
                              scheduler=scheduler)


def _backends(gateway: Gateway, environ: Mapping[str, str]) -> Backends:
    return _BackendBuilder(gateway, environ).build()


def build_gateway(config: FirstConfig, data_dir: Path, environ: Mapping[str, str] | None = None, *,
                  shared: bool = False, usage: UsageLog | None = None, responses: ResponseBook | None = None,
                  stream_hand_off: StreamHandOff | None = None) -> Gateway:
    """A gateway on ``config`` with its state under ``data_dir`` (``Gateway`` says what ``environ``, ``shared``,
    ``usage``, ``responses`` and ``stream_hand_off`` mean), its batches and files under ``data_dir/batches``."""
    return Gateway(config, data_dir, environ, backends=_backends, shared=shared, usage=usage, responses=responses,
                   stream_hand_off=stream_hand_off,
                   batches=lambda gateway: Batches(gateway, data_dir / "batches", config.defaults.batch))



class GatewayService:
    def __init__(self, gateway: Gateway | None, app: GatewayApp, sock: socket.socket | None,
                 name: str = "first-gateway") -> None:
        """``gateway`` None: the configuration was invalid, and the server only says so (``app`` answers 503)."""
        self.gateway = gateway
        if gateway is not None and sock is not None:
            gateway.own_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = LoopThread(name)
        limits = gateway.config.defaults.limits if gateway is not None else Limits()
        self._server = (self.thread.submit(serve(app, sock, limits.max_client_connections)) if sock is not None
                        else None)
        self._states = self.thread.submit(gateway.keep_states_fresh()) if gateway is not None else None
        self._batches = self.thread.submit(gateway.batches.keep_running()) if gateway is not None else None

    async def _stop(self) -> None:
        """On the gateway's loop: stop reading states, stop listening, end open connections, close the gateway."""
        for background in (self._states, self._batches):
            if background is not None:
                background.cancel()
        if self._server is not None:
            (await asyncio.wrap_future(self._server)).close()
        if self.gateway is not None:
            await self.gateway.close()

    async def stop(self) -> None:
        """From another loop (the Jupyter server's); a second call does nothing."""
        if self.thread.alive:
            await self.thread.call(self._stop())
            self.thread.stop()

    def stop_now(self) -> None:
        """From plain code (``atexit``)."""
        if self.thread.alive:
            self.thread.submit(self._stop()).result(STOP_TIMEOUT_S)
            self.thread.stop()
