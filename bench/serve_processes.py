"""``first serve`` replicas as real processes on loopback, for the tests and the replica bench alike.

Each replica is its own ``python -m first_jupyter.cli serve`` on a free 127.0.0.1 port, with a config file, an
access log and an output log of its own in one directory; Globus Auth's introspection is stood in for through the
environment (``AUTH_URL_ENV``). Both the tests (``tests/test_shared_gateway.py``, ``tests/test_replicas.py``) and
``bench/replicas.py`` start them here, so a replica is started one way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import httpx
import psycopg
import yaml

from bench.fake_globus_auth import AUTH_URL_ENV
from bench.overhead import free_port

SECRET_ENV: Final = "FIRST_GATEWAY_CLIENT_SECRET"
READY_GUARD_S: Final = 180.0
"""How long a replica may take to answer ``/healthz``: only a guard, a loaded machine can take a while."""


def start_serving(config: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``first serve --config config`` in the background, its output in ``log``."""
    return subprocess.Popen([sys.executable, "-m", "first_jupyter.cli", "serve", "--config", str(config)], env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Return once ``url``'s ``/healthz`` answers 200; fail with the replica's output if it exits or never does."""
    deadline = time.monotonic() + READY_GUARD_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"first serve exited: {log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=10).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"first serve did not answer: {log.read_text()}")


def batch_holder(database: str, procs: list[subprocess.Popen[bytes]], batch_id: str) -> int | None:
    """Which of ``procs`` holds the batch's lease now, as the shared ``database`` says (a holder is ``host:pid``);
    None: no run does."""
    with psycopg.connect(database) as conn:
        row = conn.execute("SELECT holder FROM batches WHERE id = %s AND lease_until > now()", (batch_id,)).fetchone()
    pids = [proc.pid for proc in procs]
    return None if row is None else pids.index(int(row[0].split(":")[1]))


@contextlib.contextmanager
def serve_processes(directory: Path, config: Callable[[int], dict[str, Any]], auth_url: str, count: int = 2,
                    procs: list[subprocess.Popen[bytes]] | None = None) -> Iterator[list[str]]:
    """``count`` ``first serve`` processes on free loopback ports, the n-th configured by ``config(n)`` (its
    ``serve.listen`` and ``serve.access_log``, ``access-n.log``, are set here), Globus Auth's introspection stood in
    at ``auth_url``; their URLs once every one answers. They are stopped with SIGTERM and must exit cleanly, but for
    those the caller already waited for (``procs``, when given, is filled with them: a caller that kills one waits
    for it)."""
    env = {**os.environ, SECRET_ENV: "gateway-secret", AUTH_URL_ENV: auth_url}
    procs = [] if procs is None else procs
    urls, logs = [], []
    try:
        for n in range(count):
            port = free_port()
            data = config(n)
            data["serve"] = {**data["serve"], "listen": {"host": "127.0.0.1", "port": port},
                             "access_log": str(directory / f"access-{n}.log")}
            path = directory / f"first-{n}.yaml"
            path.write_text(yaml.safe_dump(data))
            logs.append(directory / f"serve-{n}.log")
            procs.append(start_serving(path, env, logs[-1]))
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc, log in zip(urls, procs, logs, strict=True):
            wait_ready(url, proc, log)
        yield urls
    finally:
        running = [proc for proc in procs if proc.returncode is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        for proc in running:
            assert proc.wait(60) == 0
