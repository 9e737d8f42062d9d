"""The embedded default's endpoint: the real Globus Compute engine, run inside this process.

``GlobusComputeEngine`` with parsl's ``LocalProvider`` is what a Globus Compute endpoint runs on a cluster's login
node; here it runs offline (no service, no AMQP), started with an endpoint id and a run directory, and fed packed
tasks directly. It is configured as an HPC endpoint is: blocks of workers scale from ``min_blocks`` to
``max_blocks`` and back after ``max_idletime``, and each block's ``worker_init`` runs the launcher, which starts the
model's engine and waits for it before the workers take tasks; scaling a block in stops its engine. So the local
model is reached by exactly the path of a cluster's: a task running ``remote.inference`` next to the engine.

A crashed gateway cannot stop what it started: the interchange and the blocks outlive it. Each run has its own
directory, named after the gateway's process; at start, the processes of runs whose gateway is gone are found
(by that directory in their command line, working directory or open files) and ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil

from first_jupyter.config import ComputeEndpoint, InProcessEngine
from first_jupyter.gateway.backends.compute.backend import SUBMIT_LIMIT_BYTES, too_large
from first_jupyter.gateway.backends.compute.endpoint_config import FAILED, READY, block_worker_init
from first_jupyter.model_download import ModelDownloader
from first_jupyter.protocol import OpenAIError
from first_jupyter.remote.launcher import EngineSpec, choose_engine, free_port, log_tail, served_name

STRATEGY_PERIOD_S = 1.0
"""How often the engine's scaling strategy looks at the queue: a first request waits at most this long for its
block to be asked for (the endpoint default, 5 s, is meant for batch queues)."""
HEARTBEAT_S = 3
"""A block that stops answering is given up after four missed heartbeats (the endpoint default waits 120 s; a
node here is this machine, and a request waiting on a dead one should learn so in seconds)."""
WATCH_PERIOD_S = 0.5
SHUTDOWN_TIMEOUT_S = 15.0
"""An orderly shutdown takes well under a second; past this, what is left is ended by its run directory."""

logger = logging.getLogger(__name__)


def _run_pid(run_dir: Path) -> int | None:
    try:
        return int(run_dir.name.removeprefix("run-"))
    except ValueError:
        return None


def _uses(proc: psutil.Process, run_dir: str) -> bool:
    """Whether a process belongs to a run: its command line, working directory or an open file is in it."""
    try:
        if any(run_dir in part for part in proc.cmdline()):
            return True
        if proc.cwd().startswith(run_dir):
            return True
        return any(f.path.startswith(run_dir) for f in proc.open_files())
    except (psutil.Error, OSError):
        return False


def end_leftovers(root: Path) -> list[int]:
    """End the processes of earlier runs under ``root`` whose gateway process is gone, and remove their
    directories; the pids ended. Process groups go first: a block's engine and workers share its group."""
    ended: list[int] = []
    own_group = os.getpgid(0)
    for run_dir in sorted(root.glob("run-*")) if root.is_dir() else []:
        pid = _run_pid(run_dir)
        if pid is not None and pid != os.getpid() and psutil.pid_exists(pid):
            continue  # a live gateway's run (another server on the same data dir)
        found = [p for p in psutil.process_iter() if p.pid != os.getpid() and _uses(p, str(run_dir))]
        for group in {pgid for p in found if (pgid := _group(p)) is not None} - {own_group}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGTERM)
        for proc in found:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(found, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        ended.extend(p.pid for p in found)
        shutil.rmtree(run_dir, ignore_errors=True)
    return ended


def _group(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except ProcessLookupError:
        return None


def worker_init(settings: InProcessEngine, model: str, served_name: str, build_tiny: bool, port: int,
                run_dir: Path, log: Path) -> str:
    """The block's first lines: start the engine with the launcher and wait until it serves (or write why not
    and end the block), by the same protocol as a cluster's endpoint config (``compute.endpoint_config``)."""
    command = [sys.executable, "-m", "first_jupyter.remote.launcher", "--model", model, "--served-name",
               served_name, "--engine", settings.engine, "--port", str(port), "--device", settings.device,
               "--log", str(log), "--timeout", str(settings.start_timeout), "--foreground"]
    if build_tiny:
        command.append("--build-tiny")
    if settings.extra_args:
        command += ["--", *settings.extra_args]
    return block_worker_init(command, shlex.quote(str(run_dir)))  # in the run: its processes are found by it


class InProcessSubmitter:
    """Tasks for the Globus Compute engine run in this process; it starts on the first task."""

    def __init__(self, endpoint: ComputeEndpoint, root: Path, log: Path, where: str) -> None:
        assert endpoint.in_process is not None
        self.settings = endpoint.in_process
        self.model = endpoint.models[0]
        path = self.model.path or self.model.id
        self.engine = choose_engine(self.settings.engine)
        """Which engine its blocks start (it decides which routes the model has)."""
        self.served_name = served_name(EngineSpec(model=path, served_name=self.model.id, log_path=log),
                                       self.engine)
        """The name requests carry to the engine (transformers serve knows a model by its path)."""
        self.port = free_port()
        self.root = root
        self.run_dir = root / f"run-{os.getpid()}"
        self.log = log
        self.where = where
        self.started_at: float | None = None
        self._engine: Any = None
        self._start_lock = threading.Lock()
        self._send_lock = threading.Lock()
        """Held while a task is handed to the engine: its zmq socket is not thread-safe, and two sends at once
        (a request and the start probe its cold start sends, each from a thread of its own) can leave a send
        blocked for good, and every later request with it."""
        self._start_failed = False
        self._engine_exited = False
        """Set by a state reading that found the engine dead under a connected block; the next submit restarts
        (a flag, so that no request reads files or processes)."""
        self._pending: set[Future[Any]] = set()
        self._watch: asyncio.Task[None] | None = None
        self.leftovers_ended: list[int] = []
        if self.model.note:
            logger.warning("FIRST %s: %s", where, self.model.note)
        self.download = ModelDownloader(self.model.download, Path(path), where) if self.model.download else None
        """The model's files from the hub, fetched from now on (not at the first request: a new user's first
        prompt should find them there), resumed by a request after a failure."""
        if self.download is not None:
            self.download.start()

    # -- the engine ------------------------------------------------------------------------------------------
    # The Globus Compute packages are imported on first use, not with this module: they take about 0.4 s, which
    # a Jupyter server's start (it builds the gateway) should not pay for an endpoint nobody has asked yet.

    @functools.cached_property
    def _serializer(self) -> Any:
        from globus_compute_sdk.serialize import ComputeSerializer

        return ComputeSerializer()

    def _start(self) -> Any:
        """Start the engine (in a thread: it launches the interchange and waits for it), once."""
        with self._start_lock:
            if self._engine is not None:
                return self._engine
            try:
                from globus_compute_endpoint.engines import GlobusComputeEngine
                from parsl.providers import LocalProvider
            except ImportError as exc:
                raise RuntimeError(f"{exc.name} is not installed; the in-process endpoint needs the extra "
                                   "`pip install 'first-jupyter[local]'`") from None

            self.leftovers_ended = end_leftovers(self.root)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.log.parent.mkdir(parents=True, exist_ok=True)
            settings = self.settings
            init = worker_init(settings, self.model.path or self.model.id, self.model.id, self.model.build_tiny,
                               self.port, self.run_dir, self.log)
            provider = LocalProvider(init_blocks=0, min_blocks=settings.min_blocks, max_blocks=settings.max_blocks,
                                     worker_init=init)
            engine = GlobusComputeEngine(
                label="first-local", provider=provider, address="127.0.0.1", max_workers_per_node=8,
                heartbeat_period=HEARTBEAT_S, heartbeat_threshold=4 * HEARTBEAT_S,
                job_status_kwargs={"max_idletime": settings.max_idletime, "strategy_period": STRATEGY_PERIOD_S})
            # the interchange and the workers with this interpreter (the endpoint's CLI may not be on PATH); the
            # interchange ends when this process does, however it ends
            python = shlex.quote(sys.executable)
            engine.executor.interchange_launch_cmd = [sys.executable, "-m", "first_jupyter.remote.parent_bound",
                                                      "parsl.executors.high_throughput.interchange"]
            engine.executor.launch_cmd = engine.executor.launch_cmd.replace(
                "globus-compute-endpoint python-exec", f"{python} -m")
            engine.start(endpoint_id=uuid.uuid4(), run_dir=str(self.run_dir))
            self._engine = engine
            self.started_at = time.time()
            return engine

    def _submit(self, function: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Task
        from globus_compute_endpoint.engines.base import GCFuture

        buffer = self._serializer.pack_buffers([self._serializer.serialize(function),
                                                self._serializer.serialize(args), self._serializer.serialize({})])
        if len(buffer) > SUBMIT_LIMIT_BYTES:
            raise too_large(len(buffer))
        if self.download is not None:  # before the start lock: a shutdown must not wait for a download
            self.download.wait()
        self._restart_if_exited()
        engine = self._start()
        if self._start_failed:  # a new try after a failed start: its reason must not fail this request too
            (self.run_dir / FAILED).unlink(missing_ok=True)
            self._start_failed = False
        task_id = uuid.uuid4()
        packed = GCFuture(task_id)
        answer: Future[Any] = Future()
        packed.add_done_callback(lambda done: self._unpack(done, answer))
        with self._send_lock:
            engine.submit(packed, messagepack.pack(Task(task_id=task_id, task_buffer=buffer)),
                          resource_specification={})
        return answer

    def _unpack(self, done: Future[Any], answer: Future[Any]) -> None:
        """The packed ``Result`` as the function's value, or the ``TaskExecutionFailed`` the service would give."""
        from globus_compute_common import messagepack
        from globus_compute_common.messagepack.message_types import Result
        from globus_compute_sdk.errors import TaskExecutionFailed

        if answer.done():
            return
        try:
            result = messagepack.unpack(done.result())
            assert isinstance(result, Result)
            if result.is_error:
                answer.set_exception(TaskExecutionFailed(result.data, str(time.time())))
            else:
                answer.set_result(self._serializer.deserialize(result.data))
        except Exception as exc:
            answer.set_exception(exc)

    async def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        try:
            answer = await asyncio.to_thread(self._submit, function, args)
        except OpenAIError:
            raise
        except Exception as exc:
            raise OpenAIError(503, f"The Globus Compute engine for {self.where} could not start: "
                                   f"{type(exc).__name__}: {exc}", type="api_error",
                              code="engine_start_failed") from None
        self._pending.add(answer)
        answer.add_done_callback(self._pending.discard)
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watch_start())
        return answer

    async def _watch_start(self) -> None:
        """While tasks wait, watch for the engine failing to start, and fail them with its log's words (the
        block ends and parsl would start another, failing the same way, until the tasks time out)."""
        failed = self.run_dir / FAILED
        while self._pending:
            if failed.is_file():
                self._start_failed = True
                reason = self._failure()
                for answer in list(self._pending):
                    if not answer.done():
                        answer.set_exception(OpenAIError(
                            503, f"The engine for model '{self.model.id}' failed to start on {self.where}. Fix the "
                                 f"cause below, then send the request again.\n{reason}", type="api_error",
                            code="engine_start_failed"))
                return
            await asyncio.sleep(WATCH_PERIOD_S)

    def _failure(self) -> str:
        said = (self.run_dir / FAILED).read_text(errors="replace").strip() if (self.run_dir / FAILED).is_file() else ""
        return said or f"The engine exited. Last lines of {self.log}:\n{log_tail(self.log)}"

    def describe(self, exc: BaseException) -> OpenAIError:
        from first_jupyter.gateway.backends.compute.errors import describe_failure

        return describe_failure(exc, self.where)

    # -- state -----------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        engine = self._engine
        info: dict[str, Any] = {"engine": "GlobusComputeEngine (in process)", "run_dir": str(self.run_dir),
                                "engine_port": self.port, "log": str(self.log),
                                "min_blocks": self.settings.min_blocks, "max_blocks": self.settings.max_blocks,
                                "max_idletime": self.settings.max_idletime, "pending_tasks": len(self._pending),
                                "started": self.started_at, "leftovers_ended": len(self.leftovers_ended)}
        if self.model.note:
            info["note"] = self.model.note
        if self.download is not None:
            info["download"] = self.download.status()
            if self.download.state == "failed":  # cold, not offline: the next request resumes it
                return {**info, "state": "stopped", "error": self.download.failure()}
            if self.download.state != "done":
                return {**info, "state": "starting"}
        if (self.run_dir / FAILED).is_file():
            return {**info, "state": "failed", "error": self._failure()}
        if engine is None:
            return {**info, "state": "stopped"}
        managers = engine.get_connected_managers()
        workers = sum(int(m.get("worker_count", 0)) for m in managers)
        ready = (self.run_dir / READY).is_file()
        if managers and ready and (exited := self._engine_exit()) is not None:
            self._engine_exited = True  # a block that idled out has no managers left: that is no death
            return {**info, "state": "stopped", "error": exited}
        blocks = engine.executor.blocks_to_job_id
        state = "running" if managers and ready else "starting" if self._pending or blocks else "stopped"
        return {**info, "state": state, "managers": len(managers), "workers": workers,
                "blocks": len(blocks)}

    def _engine_exit(self) -> str | None:
        """Why the engine a block started is gone (killed, crashed, out of memory), or None while it runs.

        Its block lives on without it, with workers whose tasks could only fail: so the endpoint reads as
        stopped, and the next request starts block and engine again (``_restart_if_exited``). The gateway reads
        states every few seconds, so a death is seen without any cost to requests.
        """
        try:
            pid = int(json.loads((self.run_dir / READY).read_text())["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None  # not started yet, or a ready line from a launcher that names no pid
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return None
        return (f"The engine (pid {pid}) exited; the next request starts it again. Last lines of {self.log}:\n"
                f"{log_tail(self.log)}")

    async def status(self) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(self._state)
        except Exception as exc:
            return {"state": "offline", "error": f"{type(exc).__name__}: {exc}"}

    async def close(self) -> None:
        """Stop the engine: its blocks (their engines with them), then the interchange; remove the run.

        Blocking, on purpose: this also runs from ``atexit``, when no thread pool takes work any more, and a stop
        that could not happen would leave the blocks running.
        """
        if self._watch is not None:
            self._watch.cancel()
        with self._start_lock:
            self._shutdown(f"{self.where} was shut down.", "endpoint_stopped")

    def _restart_if_exited(self) -> None:
        """If the engine died under a block that lives on, stop both, so that ``_start`` starts them afresh.

        Checked and done under the start lock: a cold start submits its request and its probe at once, and the
        second must not stop the engine the first has just started.
        """
        if not self._engine_exited:
            return
        with self._start_lock:
            if self._engine is not None and self._engine_exited:
                self._shutdown(f"The engine for model '{self.model.id}' on {self.where} exited while this request "
                               f"waited; send it again.\n{self._failure()}", "engine_exited")

    def _shutdown(self, reason: str, code: str) -> None:
        """The engine's blocks (their engines with them), then the interchange, then whatever is left of the run;
        its tasks still waiting fail with ``reason`` (they would never be answered). The start lock is held."""
        engine, self._engine = self._engine, None
        self._engine_exited = False
        if engine is not None:  # in a thread only to bound it: it asks the interchange, which may be gone
            stopping = threading.Thread(target=engine.shutdown, name="first-engine-shutdown", daemon=True)
            stopping.start()
            stopping.join(SHUTDOWN_TIMEOUT_S)
        for answer in list(self._pending):
            if not answer.done():
                answer.set_exception(OpenAIError(503, reason, type="api_error", code=code))
        end_leftovers(self.root)  # what the shutdown left (everything, if it timed out), and the run directory
