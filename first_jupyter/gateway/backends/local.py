"""Backend for an engine this gateway starts itself: lazily on first use, stopped after an idle window.

Starting an engine takes seconds (tiny model) to minutes (a real one), so it is done on the first request
(a cold start) and kept hot while requests keep coming; after ``idle_timeout`` seconds with nothing in
flight the process is stopped to give the memory back. Process work (spawning, health polling, killing)
runs in threads so the event loop keeps serving other requests meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from first_jupyter.config import LocalEndpoint, ModelConfig
from first_jupyter.gateway.backends.base import RequestBody
from first_jupyter.gateway.backends.http import HttpBackend
from first_jupyter.gateway.upstream import Reply, UpstreamClient, UpstreamStream
from first_jupyter.protocol import Capability, OpenAIError
from first_jupyter.remote.launcher import (
    EngineProcess,
    EngineSpec,
    EngineStartError,
    choose_engine,
    engine_keeps_responses,
    engine_serves,
    ensure_tiny_model,
    log_tail,
    served_name,
    start_engine,
)

if TYPE_CHECKING:
    from first_jupyter.api_types import PublishedDetails

EngineState = Literal["stopped", "starting", "running", "failed"]


class LocalBackend:
    kind = "local"
    max_blocks = 1

    def __init__(self, cluster: str, endpoint: LocalEndpoint, client: UpstreamClient, log_dir: Path) -> None:
        self.cluster = cluster
        self.name = endpoint.name
        self.endpoint = endpoint
        self.start_s = endpoint.expected_start
        self.capacity = endpoint.concurrency
        self.model: ModelConfig = endpoint.models[0]
        self.engine = choose_engine(endpoint.engine)
        self.keeps_responses = engine_keeps_responses(self.engine)
        self.spec = EngineSpec(model=self.model.path or self.model.id, served_name=self.model.id,
                               engine=self.engine, device=endpoint.device, extra_args=tuple(endpoint.extra_args),
                               log_path=log_dir / f"engine-{cluster}-{endpoint.name}.log")
        self._client = client
        self._proc: EngineProcess | None = None
        self._http: HttpBackend | None = None
        self._starting: asyncio.Task[None] | None = None
        """The start under way (or the last one): every request that comes meanwhile joins it."""
        self._idle_timer: asyncio.TimerHandle | None = None
        self.state: EngineState = "stopped"
        self.last_error: str | None = None
        self.in_flight = 0
        self.last_used = 0.0
        self.starts = 0

    def upstream_name(self, model_id: str) -> str:
        return served_name(self.spec, self.engine)

    def model_details(self, model_id: str) -> PublishedDetails | None:
        return None

    def supports(self, model_id: str, capability: Capability) -> bool:
        return engine_serves(self.engine, capability) and capability in self.model.capabilities

    async def _ensure_running(self) -> HttpBackend:
        """The running engine; started if it is not, or the start under way joined (a warm-up's, another
        request's): a failed start fails all who waited for it, and only a later request tries again."""
        if self._http is not None and self._proc is not None and self._proc.alive():
            return self._http
        if self._starting is None or self._starting.done():
            if self._proc is not None and not self._proc.alive():
                self.last_error = (f"the engine exited with code {self._proc.popen.returncode}; last lines of "
                                   f"{self.spec.log_path}:\n{log_tail(self.spec.log_path)}")
                self._proc, self._http, self.state = None, None, "stopped"
            self._starting = asyncio.get_running_loop().create_task(self._start())
        await asyncio.shield(self._starting)  # a request that leaves does not stop the start for the others
        assert self._http is not None
        return self._http

    async def warm(self, model_id: str) -> None:
        await self._ensure_running()
        self.last_used = time.monotonic()  # the hot window starts now, not at the last request

    async def _start(self) -> None:
        self.state = "starting"
        try:
            await asyncio.to_thread(self._build_model_if_asked)
            proc = await asyncio.to_thread(start_engine, self.spec, owned=True)
            try:
                await asyncio.to_thread(proc.wait_healthy, self.endpoint.start_timeout)
            except BaseException:
                await asyncio.to_thread(proc.stop)
                raise
        except (EngineStartError, OSError, subprocess.SubprocessError) as exc:
            self.state, self.last_error = "failed", str(exc)
            raise OpenAIError(503, f"The local engine for model '{self.model.id}' failed to start. Fix the cause "
                                   f"below, then send the request again.\n{exc}", type="api_error",
                              code="engine_start_failed") from None
        self._proc = proc
        self._http = HttpBackend(self.cluster, self.name, proc.base_url,
                                 [ModelConfig(id=self.model.id, upstream_name=proc.model_name,
                                              capabilities=self.model.capabilities)], self._client)
        self.state, self.last_error, self.starts = "running", None, self.starts + 1
        self.last_used = time.monotonic()
        self._arm_idle_timer(self.endpoint.idle_timeout)

    def _build_model_if_asked(self) -> None:
        if self.model.build_tiny:
            ensure_tiny_model(Path(self.spec.model), self.spec.log_path)

    def _arm_idle_timer(self, delay: float) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(delay, self._on_idle_timer)

    def _on_idle_timer(self) -> None:
        self._idle_timer = None
        if self.state != "running":
            return
        left = self.last_used + self.endpoint.idle_timeout - time.monotonic()
        if self.in_flight or left > 0:
            self._arm_idle_timer(max(left, 1.0))
            return
        asyncio.get_running_loop().create_task(self.stop())

    def _begin(self) -> None:
        self.in_flight += 1

    def _end(self) -> None:
        self.in_flight -= 1
        self.last_used = time.monotonic()

    async def complete(self, model_id: str, capability: Capability, body: RequestBody) -> Reply:
        http = await self._ensure_running()
        self._begin()
        try:
            return await http.complete(model_id, capability, body)
        finally:
            self._end()

    async def stream(self, model_id: str, capability: Capability, body: RequestBody) -> UpstreamStream:
        http = await self._ensure_running()
        self._begin()
        try:
            stream = await http.stream(model_id, capability, body)
        except BaseException:
            self._end()
            raise
        stream.on_close = self._end
        return stream

    async def call(self, method: str, path: str, query: str, body: bytes | None) -> Reply:
        """Only while its engine runs: an engine keeps its responses in memory, so a stopped one holds none, and
        starting it again would only hear it say so."""
        http = self._http
        if http is None or self._proc is None or not self._proc.alive():
            raise OpenAIError(404, f"The engine of cluster '{self.cluster}' endpoint '{self.name}' has stopped since "
                                   f"it answered, and what it kept stopped with it: /{path} is gone. Create the "
                                   "response again.", code="response_not_found")
        self._begin()
        try:
            return await http.call(method, path, query, body)
        finally:
            self._end()

    async def stop(self) -> None:
        """Stop the engine now; the next request starts it again."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        proc, self._proc, self._http = self._proc, None, None
        if proc is not None:
            await asyncio.to_thread(proc.stop)
        if self.state != "failed":
            self.state = "stopped"

    async def status(self) -> dict[str, Any]:
        proc = self._proc
        if self.state == "running" and proc is not None and not proc.alive():
            self.state, self.last_error = "failed", f"the engine exited with code {proc.popen.returncode}"
        return {
            "cluster": self.cluster, "endpoint": self.name, "kind": self.kind, "engine": self.engine,
            "state": self.state, "models": [self.model.id], "model_path": self.spec.model,
            "base_url": proc.base_url if proc else None, "pid": proc.pid if proc else None,
            "in_flight": self.in_flight, "starts": self.starts, "idle_timeout": self.endpoint.idle_timeout,
            "idle_for": round(time.monotonic() - self.last_used, 1) if self.last_used and proc else None,
            "log": str(self.spec.log_path), "error": self.last_error,
        }

    async def close(self) -> None:
        starting = self._starting
        if starting is not None and not starting.done():
            starting.cancel()  # a start cancelled while it waits for health stops its engine
            with contextlib.suppress(BaseException):
                await starting
        await self.stop()
