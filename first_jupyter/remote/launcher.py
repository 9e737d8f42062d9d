"""Start an OpenAI-compatible engine as a child process and wait until it serves.

The same code runs in two places: inside the Jupyter server for the embedded ``local`` cluster, and on an
HPC node from a Globus Compute endpoint's ``worker_init`` (``python -m first_jupyter.remote.launcher``).
So it uses the standard library only, picks vLLM when it can run (importable and a GPU is visible) and
``transformers serve`` otherwise, and on a failed start quotes the engine's own log, which is the only place
the real reason (a CUDA error, a missing weight file) is written.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

EngineKind = Literal["vllm", "transformers"]
LOG_TAIL_LINES = 25

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
"""The health check's opener, which never uses a proxy: the engine listens on this node, and a site proxy named in
``HTTP_PROXY`` (which urllib's default opener obeys) cannot reach the node's loopback, so the engine would never
show healthy. Built once: an opener is built from every handler class urllib has."""


class EngineStartError(RuntimeError):
    """The engine did not become healthy; the message ends with the last lines of its log."""


@dataclass(frozen=True)
class EngineSpec:
    """What to serve and how; ``served_name`` is the model name requests must carry."""

    model: str
    log_path: Path
    engine: Literal["auto", "vllm", "transformers"] = "auto"
    served_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    device: str = "auto"
    extra_args: tuple[str, ...] = ()


def gpu_visible() -> bool:
    """True when an NVIDIA GPU is usable by a child process (no torch import: it costs seconds)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def choose_engine(requested: str) -> EngineKind:
    if requested == "vllm":
        return "vllm"
    if requested == "transformers":
        return "transformers"
    return "vllm" if importlib.util.find_spec("vllm") is not None and gpu_visible() else "transformers"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


TRANSFORMERS_SERVES = frozenset({"chat", "completions", "responses", "transcriptions"})
"""The kinds of request (``protocol.Capability`` values) ``transformers serve`` has a route for (its
``cli/serving/server.py``: /v1/chat/completions, /v1/completions, /v1/responses, /v1/audio/transcriptions)."""


def engine_serves(engine: EngineKind, capability: str) -> bool:
    """Whether the engine has a route for a kind of request (a ``protocol.Capability`` value): vLLM has every
    route (what its model's task allows is the config's to say), ``transformers serve`` only a few."""
    return engine == "vllm" or capability in TRANSFORMERS_SERVES


def engine_keeps_responses(engine: EngineKind | None) -> bool:
    """Whether the engine keeps the responses it creates, so that a next turn can name one
    (``previous_response_id``): ``transformers serve`` keeps none; vLLM may (``VLLM_ENABLE_RESPONSES_API_STORE``),
    and an engine not known here is taken at its word."""
    return engine != "transformers"


def served_name(spec: EngineSpec, engine: EngineKind) -> str:
    """The model name the engine answers to: vLLM takes any name; transformers serve pins the load path."""
    if engine == "vllm":
        return spec.served_name or spec.model
    return spec.model


def build_command(spec: EngineSpec, engine: EngineKind, port: int) -> list[str]:
    if engine == "vllm":
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", spec.model,
                "--served-model-name", served_name(spec, engine), "--host", spec.host, "--port", str(port),
                *spec.extra_args]
    return [sys.executable, "-m", "transformers.cli.transformers", "serve", spec.model, "--host", spec.host,
            "--port", str(port), "--device", spec.device, "--log-level", "info", *spec.extra_args]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open(errors="replace") as fh:
            return "".join(deque(fh, maxlen=lines)).rstrip()
    except OSError:
        return "(no log was written)"


@dataclass
class EngineProcess:
    """A started engine; owns its process group so that workers it forks die with it."""

    spec: EngineSpec
    engine: EngineKind
    port: int
    popen: subprocess.Popen[bytes]
    started_at: float = field(default_factory=time.monotonic)

    @property
    def base_url(self) -> str:
        return f"http://{self.spec.host}:{self.port}/v1"

    @property
    def model_name(self) -> str:
        return served_name(self.spec, self.engine)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def healthy(self, timeout: float = 2.0) -> bool:
        """Whether the engine answers ``/health`` with 200, asked directly (never through a proxy)."""
        url = f"http://{self.spec.host}:{self.port}/health"
        try:
            with _DIRECT.open(url, timeout=timeout) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout: float, poll: float = 0.25) -> None:
        """Block until /health answers 200; on exit or timeout stop the engine and raise with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise EngineStartError(
                    f"The {self.engine} engine for '{self.spec.model}' exited with code {self.popen.returncode} "
                    f"before serving. Last lines of {self.spec.log_path}:\n{log_tail(self.spec.log_path)}")
            if self.healthy():
                return
            time.sleep(poll)
        self.stop()
        raise EngineStartError(
            f"The {self.engine} engine for '{self.spec.model}' was not healthy after {timeout:.0f} s; raise the "
            f"endpoint's start_timeout if the model is large. Last lines of {self.spec.log_path}:\n"
            f"{log_tail(self.spec.log_path)}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after ``grace`` seconds."""
        if self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            self.popen.wait(timeout=grace)


def _parent_death_signal() -> Callable[[], None] | None:
    """On Linux, a function that makes the calling (child) process get SIGTERM when its parent dies.

    An engine the gateway owns must not outlive it, even when the gateway's process is killed outright (a kernel
    killed by its notebook server, a Jupyter server hit by SIGKILL) and has no chance to stop it. The C function
    is looked up here, in the parent: the child, between fork and exec, only calls it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return set_signal


def start_engine(spec: EngineSpec, *, owned: bool = False) -> EngineProcess:
    """Spawn the engine in its own session with output to ``spec.log_path``; does not wait for health.

    ``owned``: the engine belongs to the calling process and stops when it dies (Linux); the launcher command,
    whose engine must keep running after it exits, leaves it False.
    """
    engine = choose_engine(spec.engine)
    port = spec.port or free_port(spec.host)
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if Path(spec.model).is_dir():
        env.setdefault("HF_HUB_OFFLINE", "1")  # a local checkpoint needs no hub; don't wait on a dead network
    command = build_command(spec, engine, port)
    with spec.log_path.open("ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, start_new_session=True,
                                 preexec_fn=_parent_death_signal() if owned else None)
    return EngineProcess(spec=spec, engine=engine, port=port, popen=popen)


def ensure_tiny_model(model_dir: Path, log_path: Path) -> None:
    """Build the tiny offline model (random weights) in ``model_dir`` unless it holds one already; in a child
    process, since building imports torch and transformers (seconds, and memory the caller keeps otherwise)."""
    from first_jupyter.remote.tiny_model import TINY_MODEL_MARKER

    if (model_dir / TINY_MODEL_MARKER).is_file():
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        log.write(f"building the tiny offline model in {model_dir} (random weights)\n".encode())
        log.flush()
        done = subprocess.run([sys.executable, "-m", "first_jupyter.remote.tiny_model", str(model_dir)],
                              stdout=log, stderr=subprocess.STDOUT, check=False, timeout=600)
    if done.returncode != 0:
        raise EngineStartError(f"Building the tiny model failed. Last lines of {log_path}:\n{log_tail(log_path)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Start vLLM (GPU) or transformers serve (CPU) for one model and wait until it is healthy. "
                    "Prints one JSON line with base_url, model, pid and log once it serves.")
    parser.add_argument("--model", required=True, help="model directory or hub id")
    parser.add_argument("--served-name", help="model name requests will use (vLLM only)")
    parser.add_argument("--engine", choices=["auto", "vllm", "transformers"], default="auto")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--log", type=Path, default=Path("engine.log"))
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for health")
    parser.add_argument("--foreground", action="store_true",
                        help="stay attached, stop the engine on SIGTERM/SIGINT and exit with it (the engine "
                             "also stops if this process is killed outright)")
    parser.add_argument("--build-tiny", action="store_true",
                        help="if --model holds no model, build the tiny offline one there first (tests, demos)")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --, arguments for the engine itself")
    args = parser.parse_args(argv)
    extra = tuple(a for a in args.extra if a != "--")
    spec = EngineSpec(model=args.model, served_name=args.served_name, engine=args.engine, host=args.host,
                      port=args.port, device=args.device, log_path=args.log, extra_args=extra)
    parent = os.getppid()
    if args.foreground and (bind := _parent_death_signal()) is not None:
        bind()  # a block's launcher ends with its block, even one whose shell was killed outright
        if os.getppid() != parent:
            return 1  # the parent died before the binding: nobody is left to serve
    try:
        if args.build_tiny:
            ensure_tiny_model(Path(args.model), args.log)
        proc = start_engine(spec, owned=args.foreground)
        proc.wait_healthy(args.timeout)
    except EngineStartError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps({"base_url": proc.base_url, "model": proc.model_name, "engine": proc.engine,
                      "pid": proc.pid, "log": str(spec.log_path)}), flush=True)
    if not args.foreground:
        return 0

    return _serve_until_stopped(proc)


def _serve_until_stopped(proc: EngineProcess, grace: float = 10.0) -> int:
    """Wait on the engine; SIGTERM or SIGINT stops it (SIGKILL after ``grace`` seconds) and ends with 128+signal.

    The handler only signals the engine: a handler that waited on it itself would wait inside the interrupted
    ``wait``, on the lock that one holds, for ever.
    """
    asked: list[tuple[int, float]] = []

    def _stop(signum: int, _frame: object) -> None:
        asked.append((signum, time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    while True:
        try:
            code = proc.popen.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if asked and time.monotonic() - asked[0][1] > grace:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.popen.pid, signal.SIGKILL)
            continue
        return 128 + asked[0][0] if asked else code


if __name__ == "__main__":
    sys.exit(main())
