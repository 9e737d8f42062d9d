"""``first serve --config FILE``: the gateway as a standalone tornado service for a whole facility.

One process, or ``serve.processes`` of them forked after the port is bound, so the kernel spreads connections
over them. Each process has its own Gateway on tornado's loop; what they must agree on is on disk in the state
dir: quotas (``quotas.sqlite3``), usage, batches (each run held by a file lock), and the metrics' files, which
any process merges when scraped. The parent only watches: it restarts a worker that dies and passes SIGTERM and
SIGINT on, so stopping the parent stops the service and every process it started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application

from first_jupyter.config import ConfigError, FirstConfig, ServeConfig, load_config
from first_jupyter.paths import default_data_dir

if TYPE_CHECKING:
    from first_jupyter.gateway.core import Gateway
    from first_jupyter.serve.policy import SharedPolicy

log = logging.getLogger("first_jupyter.serve")
CLOSE_TIMEOUT_S = 10.0
RESTART_PAUSE_S = 1.0
LISTEN_BACKLOG = 4096
"""Connections the kernel queues for the gateway before it accepts them (capped by ``net.core.somaxconn``). A load
balancer opens hundreds at once when many streams start together; at tornado's default of 128 the rest overflow
the queue and their connections wait for a SYN retried a second later (``bench/replicas.py`` saw p99 time to
first token go past 1 s that way)."""


def prepare(path: str) -> tuple[FirstConfig, ServeConfig, Path, str]:
    """The config, its ``serve`` section, the state dir and the client secret, or a ConfigError saying what to fix."""
    if not path:
        raise ConfigError("first serve needs --config FILE: a config with clusters and a 'serve' section.")
    state_default = default_data_dir()
    config = load_config(path, state_default)
    serve = config.serve
    if serve is None:
        raise ConfigError(f"{path}: no 'serve' section. Add one with at least serve.auth.client_id (the gateway's "
                          "Globus confidential client); see the README's shared gateway section.")
    secret = os.environ.get(serve.auth.client_secret_env)
    if not secret:
        raise ConfigError(f"${serve.auth.client_secret_env} is not set: it holds the secret of the gateway's Globus "
                          f"client {serve.auth.client_id} (serve.auth.client_secret_env names the variable).")
    state_dir = Path(serve.state_dir).expanduser() if serve.state_dir else state_default
    state_dir.mkdir(parents=True, exist_ok=True)
    return config, serve, state_dir, secret


def _logging(serve: ServeConfig) -> None:
    """Diagnostics to stderr; the access log, one JSON object per line and nothing else, where configured."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"[%(asctime)s %(levelname)s pid {os.getpid()}] %(name)s: %(message)s")
    access = logging.getLogger("first_jupyter.access")
    access.propagate = False
    access.setLevel(logging.INFO)
    if serve.access_log == "-":
        handler: logging.Handler = logging.StreamHandler(sys.stdout)
    else:
        from logging.handlers import WatchedFileHandler  # reopened after logrotate moves it

        handler = WatchedFileHandler(serve.access_log)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.handlers[:] = [handler]


def serve(path: str) -> int:
    """Run until SIGTERM or SIGINT; the exit status."""
    config, settings, state_dir, secret = prepare(path)
    _logging(settings)
    sockets = bind_sockets(settings.listen.port, settings.listen.host, backlog=LISTEN_BACKLOG)
    if settings.processes > 1:
        from first_jupyter.serve.metrics import share_across_processes

        share_across_processes(state_dir / "metrics")
        if _supervise(settings.processes, sockets):
            return 0
    asyncio.run(_serve(config, settings, state_dir, secret, sockets))
    return 0


def _supervise(workers: int, sockets: list[socket.socket]) -> bool:
    """Fork the workers and watch them; True in the parent once all have stopped, False in a worker."""
    from first_jupyter.serve.metrics import process_exited

    children: dict[int, int] = {}
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            os.kill(pid, signum)

    def spawn(slot: int) -> bool:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            return False
        children[pid] = slot
        return True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for slot in range(workers):
        if not spawn(slot):
            return False
    for sock in sockets:
        sock.close()  # the workers hold them
    while children:
        pid, status = os.wait()
        slot = children.pop(pid)
        process_exited(pid)
        if not stopping:
            log.error("worker %s (pid %s) exited with status %s; starting another", slot, pid, status)
            time.sleep(RESTART_PAUSE_S)
            if not stopping and not spawn(slot):
                return False
    return True


def build(config: FirstConfig, settings: ServeConfig, state_dir: Path, secret: str) -> tuple[Application, Gateway,
                                                                                        SharedPolicy]:
    """The tornado application of one process, its Gateway and its rules; on the running loop."""
    from first_jupyter.api.tornado_door import SameLoop
    from first_jupyter.serve.door import shared_routes
    from first_jupyter.serve.metrics import GatewayMetrics
    from first_jupyter.serve.policy import SharedPolicy
    from first_jupyter.serve.state import open_state
    from first_jupyter.service import build_gateway

    state = open_state(settings, state_dir)
    responses = None
    if settings.state.database is not None:  # response ids where every replica finds them
        from first_jupyter.serve.pg_responses import PgResponseIds

        responses = PgResponseIds(settings.state.database, config.defaults.max_response_ids)
    gateway = build_gateway(config, state_dir, shared=True, usage=state.usage, responses=responses,
                            stream_hand_off=state.callbacks)
    metrics = GatewayMetrics()
    gateway.catalog.state_observers.append(metrics.endpoint_states)
    gateway.catalog.state_observers.append(lambda _readings: metrics.prefix_routing(gateway.catalog.prefix_counts()))
    metrics.refreshers.append(lambda: metrics.admission(gateway.admission.report(gateway.catalog.backends)))
    policy = SharedPolicy(settings, state_dir, state, secret, metrics, compute_as_callers=gateway.compute_as_callers)
    app = Application(shared_routes(), first_gateway=gateway, first_loop=SameLoop(), first_max_request_bytes=0,
                      first_shared=policy, log_function=lambda _handler: None)  # the access log replaces tornado's
    policy.resume_batches(gateway)
    return app, gateway, policy


def http_server(app: Application, config: FirstConfig) -> HTTPServer:
    """Bodies up to the request limit. Each route sets its own once the caller is known from the head, before
    the body is read (``server_ext.handlers.GatewayDoor``): only the file upload takes the larger file limit."""
    return HTTPServer(app, xheaders=True, max_body_size=config.defaults.limits.max_request_bytes)


async def _serve(config: FirstConfig, settings: ServeConfig, state_dir: Path, secret: str,
                 sockets: list[socket.socket]) -> None:
    app, gateway, policy = build(config, settings, state_dir, secret)
    server = http_server(app, config)
    server.add_sockets(sockets)
    background = [asyncio.create_task(gateway.keep_states_fresh())]
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopped.set)
    host, port = sockets[0].getsockname()[:2]
    log.info("FIRST shared gateway listening on http://%s:%s (state in %s)", host, port, state_dir)
    await stopped.wait()
    await stop(server, gateway, policy, background)


async def stop(server: HTTPServer, gateway: Gateway, policy: SharedPolicy,
                background: list[asyncio.Task[None]]) -> None:
    server.stop()
    try:
        await asyncio.wait_for(server.close_all_connections(), CLOSE_TIMEOUT_S)
    except TimeoutError:
        log.warning("connections still open after %s s; closing anyway", CLOSE_TIMEOUT_S)
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await policy.close()
    await gateway.close()
