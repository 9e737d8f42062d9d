"""A gateway running: its own loop thread, and its own HTTP server on that loop when it has a socket.

The Jupyter extension and the client's in-process gateway both run one; starting and stopping it (server,
gateway, thread, in that order) is the same for both, so it lives here once.
"""

from __future__ import annotations

import asyncio
import socket

from first_jupyter.config import Limits
from first_jupyter.gateway.core import Gateway
from first_jupyter.gateway.lean_door import GatewayApp
from first_jupyter.transport.http_server import serve
from first_jupyter.transport.loop_thread import LoopThread

STOP_TIMEOUT_S = 30.0


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
