"""The Jupyter server extension: builds the Gateway from config and serves it under ``/first/``."""

from __future__ import annotations

import gc
import json
import os
import secrets
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from jupyter_core.paths import jupyter_runtime_dir
from jupyter_server._tz import utcnow
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.utils import url_path_join
from traitlets import Bool, Integer, Unicode

from first_jupyter.api.door_kit import HostVerdicts
from first_jupyter.api.lean_door import GatewayApp
from first_jupyter.config import ConfigError, load_config
from first_jupyter.gateway.core import Gateway
from first_jupyter.lasting_key import LastingKey, ensure, key_path
from first_jupyter.paths import default_data_dir
from first_jupyter.server_ext.handlers import jupyter_routes
from first_jupyter.service import GatewayService, build_gateway
from first_jupyter.transport.http_server import listening_socket

GATEWAY_URL_ENV = "FIRST_GATEWAY_URL"
API_KEY_ENV = "FIRST_API_KEY"
NO_PROXY_ENV: Final = ("NO_PROXY", "no_proxy")
"""Both spellings: tools differ in which they read first (curl and Python's urllib, so httpx, the lower case)."""
LOOPBACK_NAMES: Final = ("127.0.0.1", "localhost", "::1")
"""What kernels must reach without a proxy: FIRST_GATEWAY_URL names 127.0.0.1, a Jupyter server's URL localhost."""


def loopback_exempt(environ: Mapping[str, str]) -> dict[str, str]:
    """``NO_PROXY`` and ``no_proxy`` as kernels must get them: the user's value with the loopback names added.

    On a site whose nodes reach the outside through ``HTTP(S)_PROXY``, ``NO_PROXY`` often lists only
    ``localhost``; httpx (so the ``openai`` client) then sends ``http://127.0.0.1:PORT``, the gateway, to the
    proxy, which cannot reach this node's loopback. So the loopback names are appended to what the user set, never
    replacing it and never twice; a value set in one spelling only is used for both, so that every tool reads
    the same list whichever spelling it prefers.
    """
    values = {name: environ.get(name, "").strip() for name in NO_PROXY_ENV}
    only = [value for value in values.values() if value]
    exempt: dict[str, str] = {}
    for name, value in values.items():
        user = value or (only[0] if only else "")
        listed = {entry.strip().lower() for entry in user.split(",")}
        missing = [host for host in LOOPBACK_NAMES if host not in listed]
        exempt[name] = ",".join([user, *missing] if user else missing)
    return exempt


HUB_TOKENS_ENV = "GLOBUS_DATA"
HUB_PREFIX_ENV = "JUPYTERHUB_SERVICE_PREFIX"
"""Set in every server a JupyterHub spawns: this server is reached from the hub's public URL too."""


def _take_token_variables(token_env: str) -> dict[str, str]:
    """The environment as the token sources need it, with the variables that hold Globus tokens removed from
    this process's own environment: kernels and terminals inherit it, and tokens must never reach them."""
    environ = dict(os.environ)
    for name in (token_env, HUB_TOKENS_ENV):
        os.environ.pop(name, None)
    return environ


class FirstExtension(ExtensionApp):
    """FIRST inference gateway inside the Jupyter server."""

    name = "first_jupyter"

    config_file = Unicode(
        "", config=True,
        help="YAML file describing clusters, endpoints and models. Empty: $FIRST_CONFIG, else the embedded "
             "default (one local engine serving a small model).")
    data_dir = Unicode(
        "", config=True, help="Where usage, engine logs and built models live. Empty: $FIRST_DATA_DIR, else "
                              "first_jupyter under the Jupyter data dir.")
    max_request_bytes = Integer(
        0, config=True, help="Largest request body accepted (413 above it). 0: the config file's "
                             "defaults.limits.max_request_bytes (8 MiB unless set).")
    freeze_gc = Bool(
        True, config=True,
        help="Once the server has started, move the objects it has built so far (JupyterLab's and every "
             "extension's, a few hundred thousand) out of the cyclic garbage collector's reach with gc.freeze(). "
             "Without this each full collection walks them all and stalls every request for ~100 ms.")
    api_port = Integer(
        0, config=True,
        help="Loopback port of the gateway's own HTTP server, which kernels reach through FIRST_GATEWAY_URL "
             "(the same routes as {base_url}first/, for the scoped key, at a third of the CPU per request). "
             "0: a free port chosen at start. -1: no own server; kernels use the Jupyter server's URL.")
    export_kernel_env = Bool(
        True, config=True, help="Put FIRST_GATEWAY_URL and a scoped FIRST_API_KEY into the environment of "
                                "kernels and terminals this server starts, so notebook code reaches the gateway.")
    lasting_key = Bool(
        False, config=True,
        help="Also honour a scoped key that lasts across restarts, for tools outside kernels (editor plugins, "
             "agents, jupyter-ai, scripts) configured once: kept in <data dir>/lasting-api-key, readable by its "
             "owner only, made at the first start. It opens what FIRST_API_KEY opens and no more. `first env` "
             "prints it as shell exports; `first key rotate` replaces it, refused at once by a running server.")

    def initialize_settings(self) -> None:
        data_dir = Path(self.data_dir).expanduser() if self.data_dir else default_data_dir()
        gateway: Gateway | None = None
        error: str | None = None
        try:
            config = load_config(self.config_file or None, data_dir)
            gateway = build_gateway(config, data_dir, environ=_take_token_variables(config.auth.token_env))
        except ConfigError as exc:
            error = str(exc)
            self.log.error("FIRST gateway disabled, its configuration is invalid:\n%s", error)
        self.gateway = gateway
        self.api_key = "first-" + secrets.token_urlsafe(32)
        self.kept_key = self._kept_key(data_dir)
        self._activity_marked = -1.0
        self._api_socket = self._bind_api_socket()
        app = GatewayApp(gateway, key=self.api_key, max_request_bytes=self.max_request_bytes,
                         config_error_text=error, on_activity=self._mark_activity, log=self.log,
                         lasting=self.kept_key)
        self.service = GatewayService(gateway, app, self._api_socket)
        self.loop_thread = self.service.thread
        self.settings.update(first_gateway=gateway, first_config_error=error, first_api_key=self.api_key,
                             first_lasting_key=self.kept_key, first_max_request_bytes=self.max_request_bytes,
                             first_host_verdicts=HostVerdicts(), first_loop=self.loop_thread,
                             first_behind_hub=bool(os.environ.get(HUB_PREFIX_ENV)))
        self._export_kernel_env()

    def _kept_key(self, data_dir: Path) -> LastingKey | None:
        """The lasting key, when turned on: made at the first start, then the same at every start."""
        if not self.lasting_key:
            return None
        path = key_path(data_dir)
        if ensure(path) is None:
            self.log.error("FIRST: the lasting key in %s is not honoured: others can read it. `first key rotate` "
                           "writes a new one, readable by you only.", path)
        return LastingKey(path)

    def initialize_handlers(self) -> None:
        self.handlers.extend(jupyter_routes())

    def _bind_api_socket(self) -> socket.socket | None:
        if self.api_port < 0:
            return None
        try:
            return listening_socket("127.0.0.1", self.api_port)
        except OSError as exc:
            self.log.error("FIRST: cannot listen on 127.0.0.1:%s (%s); kernels will use the Jupyter server's URL. "
                           "Set c.FirstExtension.api_port to a free port, or 0 for any.", self.api_port, exc)
            return None

    def _mark_activity(self) -> None:
        """Kernel traffic is activity: an idle-culling hub must not stop a server whose notebooks use it.

        Culling works in minutes, so the timestamp is refreshed at most once a second, not per request. Called
        on the gateway's thread: one dict item set, which needs no lock.
        """
        now = time.monotonic()
        if now - self._activity_marked >= 1.0:
            self._activity_marked = now
            assert self.serverapp is not None  # requests come only to a server this extension was loaded into
            self.serverapp.web_app.settings["api_last_activity"] = utcnow()

    def jupyter_gateway_url(self) -> str:
        """The routes on the Jupyter server itself (for browsers, Jupyter tokens, and the scoped key too)."""
        assert self.serverapp is not None  # asked once the extension is loaded into its server
        return url_path_join(self.serverapp.connection_url, "first/v1")

    def gateway_url(self) -> str:
        """What programs should use: the gateway's own server when it listens, else the Jupyter server."""
        if self._api_socket is None:
            return self.jupyter_gateway_url()
        return f"http://127.0.0.1:{self._api_socket.getsockname()[1]}/first/v1"

    def _export_kernel_env(self) -> None:
        """Kernels inherit the server's environment; the URL is re-exported once the port is final. Loopback joins
        ``NO_PROXY`` there too, or a kernel's HTTP clients would send the gateway's loopback URL to the site's
        proxy (``loopback_exempt``; idempotent, so exporting twice adds nothing)."""
        if self.export_kernel_env:
            os.environ[GATEWAY_URL_ENV] = self.gateway_url()
            os.environ[API_KEY_ENV] = self.api_key
            os.environ.update(loopback_exempt(os.environ))

    @property
    def runtime_file(self) -> Path:
        return Path(jupyter_runtime_dir()) / f"first-gateway-{os.getpid()}.json"

    def _write_runtime_file(self) -> None:
        """Let processes of the same user outside the server's children (a shell, a script) find the gateway.

        Written like Jupyter's own jpserver-PID.json: in the runtime dir, readable by the owner only.
        """
        path = self.runtime_file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump({"url": self.gateway_url(), "jupyter_url": self.jupyter_gateway_url(), "api_key": self.api_key,
                       "lasting_key_file": str(self.kept_key.path) if self.kept_key else None,
                       "pid": os.getpid()}, fh)

    async def _start_jupyter_server_extension(self, serverapp: object) -> None:
        self._export_kernel_env()
        self._write_runtime_file()
        if self.freeze_gc:
            gc.collect()
            gc.freeze()

    async def stop_extension(self) -> None:
        self.runtime_file.unlink(missing_ok=True)
        await self.service.stop()
