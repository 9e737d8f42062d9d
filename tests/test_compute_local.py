"""The embedded default's path, end to end: a real Jupyter server whose ``local`` cluster is the real Globus Compute
engine run in-process (parsl's LocalProvider, a worker_init that starts ``transformers serve`` on the tiny model),
requests running there as the remote functions, streams coming back through the callback route."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import psutil
import pytest

from first_jupyter.config import parse_config
from first_jupyter.gateway.backends.compute.in_process import end_leftovers
from first_jupyter.protocol import Capability, OpenAIError, parse_request
from first_jupyter.remote.inference import engine_health
from first_jupyter.remote.launcher import free_port
from first_jupyter.service import build_gateway
from tests.conftest import jupyter_server_process, open_door, server_config
from tests.waiting import ENGINE_GUARD_S, eventually_async

MESSAGES = [{"role": "user", "content": "Tell me about the cluster."}]


def in_process_config(model_dir: Path, **settings: Any) -> dict[str, Any]:
    return {"clusters": {"local": {"backend": "globus_compute", "endpoints": [{
        "name": "engine", "in_process": {"engine": "transformers", "device": "cpu", **settings},
        "models": [{"id": "tiny-chat", "path": str(model_dir)}]}]}},
        "defaults": {"model": "tiny-chat"}}


def _processes_of(root: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid != os.getpid() and (any(str(root) in part for part in proc.cmdline())
                                            or proc.cwd().startswith(str(root))):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def _talks_to(proc: psutil.Process, port: int) -> bool:
    try:
        return any(c.raddr and c.raddr.port == port for c in proc.net_connections())
    except psutil.Error:
        return False


@pytest.fixture
def jp_server_config(tiny_model, write_config, tmp_path: Path):
    return server_config(write_config(in_process_config(tiny_model)), tmp_path / "data")


def _client(first_ext: Any, jp_auth_header: dict[str, str], door: str = "jupyter-key") -> openai.AsyncOpenAI:
    opened = open_door(door, first_ext, jp_auth_header)
    return openai.AsyncOpenAI(base_url=opened.url, api_key=opened.api_key, max_retries=0, timeout=ENGINE_GUARD_S)


def _forge(callback_url: str, task_id: str) -> int:
    request = urllib.request.Request(  # noqa: S310 (the test's loopback server)
        callback_url, data=b'{"data": "data: {}\\n\\n"}', method="POST",
        headers={"X-First-Task": task_id, "X-First-Seq": "0", "X-First-Signature": "f" * 64})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 (the test's loopback server)
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_the_openai_client_is_served_by_the_in_process_globus_compute_engine(first_ext, jp_auth_header,
                                                                                   tmp_path: Path):
    gateway, thread = first_ext.gateway, first_ext.loop_thread
    status = (await thread.call(gateway.status())).json_value()
    assert status["models"][0]["state"] == "cold"  # nothing started before the first request
    client = _client(first_ext, jp_auth_header)
    async with client:
        started = time.monotonic()
        answer = await client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8)
        cold_s = time.monotonic() - started
        assert answer.model == "tiny-chat"
        assert answer.choices[0].message.content
        assert answer.usage.completion_tokens > 0
        endpoint = (await thread.call(gateway.status())).json_value()["endpoints"][0]
        assert (endpoint["state"], endpoint["managers"]) == ("running", 1)

        # streamed: the events come back through the callback route, batch by batch, while the engine generates
        before = gateway.callbacks.accepted
        stream = await client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=400,
                                                      temperature=0, stream=True)
        arrivals: list[float] = []
        text: list[str] = []
        forged: int | None = None
        accepted_at_first: int | None = None
        async for chunk in stream:
            arrivals.append(time.monotonic())
            if chunk.choices:
                text.append(chunk.choices[0].delta.content or "")
            if forged is None:  # mid-stream: a batch without the task's key is refused, the stream goes on
                accepted_at_first = gateway.callbacks.accepted - before
                tasks = gateway.callbacks.tasks()
                forged = await asyncio.to_thread(_forge, gateway.own_callback_url(), tasks[0])
        assert forged == 403
        assert len(arrivals) > 50
        accepted = gateway.callbacks.accepted - before
        assert accepted >= 3  # several signed batches (not the whole stream at the end)
        # not buffered, as an order rather than a duration: the client had its first events while the node was
        # still sending batches (generating), not after the last of them
        assert accepted_at_first is not None
        assert accepted_at_first < accepted
        assert gateway.callbacks.refused >= 1
        assert "".join(text)
    run_dir = gateway.backends[0].submitter.run_dir
    assert _processes_of(run_dir)
    print(f"\ncold first request {cold_s:.1f} s; stream of {len(arrivals)} events over "
          f"{arrivals[-1] - arrivals[0]:.2f} s in {accepted} batches ({accepted_at_first} in at the first event)")
    await first_ext.service.stop()  # as the server does at exit: the blocks and their engine go too
    assert _processes_of(run_dir) == []
    assert not run_dir.exists()


async def test_a_node_that_dies_mid_stream_ends_the_stream_with_an_error_event(first_ext, jp_auth_header):
    gateway = first_ext.gateway
    client = _client(first_ext, jp_auth_header, door="api")
    async with client:
        await client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4)  # warm
        run_dir = gateway.backends[0].submitter.run_dir
        stream = await client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2000,
                                                      temperature=0, stream=True)
        port = gateway.backends[0].engine_port
        killed: list[psutil.Process] = []
        with pytest.raises(openai.APIError, match="failed on") as info:
            async for _ in stream:  # events have come: the task is mid-stream, its worker reading from the engine
                if not killed:
                    killed = [p for p in _processes_of(run_dir) if _talks_to(p, port)]
                    for worker in killed:
                        worker.kill()  # the worker running the task dies, as on a node that fails
        assert killed
    # the task's failure ended the stream (had it gone on to the stream's idle timeout instead, the error would
    # say the node "sent nothing" for that long, with no word of the lost worker)
    assert "WorkerLost: Task failure due to loss of worker" in str(info.value)


async def test_a_plain_request_whose_client_leaves_stops_the_engines_generation(first_ext, jp_auth_header):
    """A plain request for a million tokens: once its client leaves, the node stops reading the engine's answer,
    which ends the generation (``transformers serve`` stops a stream whose reader has gone), and the request
    counts in flight until then, not a moment less."""
    gateway, thread = first_ext.gateway, first_ext.loop_thread
    backend = gateway.backends[0]
    client = _client(first_ext, jp_auth_header, door="api")
    async with client:
        await client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4)  # warm
        run_dir, port = backend.submitter.run_dir, backend.engine_port

        def reading() -> bool:  # a task (a worker of the block) reads the engine's answer
            return any(_talks_to(p, port) for p in _processes_of(run_dir))

        def in_flight() -> int:
            return gateway.router.health_of_backend(backend).in_flight

        asking = asyncio.ensure_future(client.chat.completions.create(
            model="tiny-chat", messages=MESSAGES, max_tokens=1_000_000, temperature=0))
        await eventually_async(reading, "the node reads the engine's answer", ENGINE_GUARD_S)
        assert in_flight() == 1
        asking.cancel()  # the client leaves
        with contextlib.suppress(asyncio.CancelledError):
            await asking
        await eventually_async(lambda: not reading(), "the node goes away from the engine")
        await eventually_async(lambda: in_flight() == 0, "the request is no longer in flight")
        status = (await thread.call(gateway.status())).json_value()
        assert status["endpoints"][0]["pending_tasks"] == 0
        # the engine, which serves one request at a time, is free again: the million tokens were not generated
        answer = await client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4)
        assert answer.choices[0].message.content is not None


def test_leftovers_of_a_crashed_run_are_ended_and_a_live_runs_are_not(tmp_path: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    crashed = tmp_path / f"run-{dead.pid}"
    other_live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    live = tmp_path / f"run-{other_live.pid}"
    for run in (crashed, live):
        run.mkdir()
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=crashed,
                              start_new_session=True)  # like a block: its own group, working in the run
    kept = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], cwd=live)
    try:
        ended = end_leftovers(tmp_path)
        assert orphan.pid in ended
        orphan.wait(timeout=30)  # ended (its status was already taken by end_leftovers, which waited for it)
        assert not crashed.exists()
        assert kept.poll() is None
        assert live.exists()
    finally:
        for proc in (orphan, kept, other_live):
            proc.kill()
            proc.wait()


async def test_an_engine_that_cannot_start_fails_the_request_with_its_reason(tmp_path: Path):
    config = parse_config(in_process_config(tmp_path / "no-such-model"), "test")
    gateway = build_gateway(config, tmp_path / "data", environ={})
    body = json.dumps({"model": "tiny-chat", "messages": MESSAGES}).encode()
    try:
        with pytest.raises(OpenAIError) as info:
            await asyncio.wait_for(gateway.complete(parse_request(Capability.chat, body)), ENGINE_GUARD_S)
        assert (info.value.status, info.value.code) == (503, "engine_start_failed")
        assert "failed to start" in info.value.message
        status = (await gateway.status()).json_value()
        assert status["endpoints"][0]["state"] == "failed"
        assert status["models"][0]["state"] == "offline"
    finally:
        await gateway.close()
    assert _processes_of(tmp_path / "data") == []


# ``within``: failure guards, far past the product's own pacing. SIGTERM: the orderly stop ends everything before
# the kernel exits (at most SHUTDOWN_TIMEOUT_S, 15 s); SIGKILL: the interchange notices its parent gone (a 1 s poll,
# then 10 s grace), the blocks their heartbeats unanswered (4 x HEARTBEAT_S, 12 s), the launchers stop their engine
# (10 s grace): about 35 s at worst, on any machine, as these are timers, not work.
@pytest.mark.parametrize(("sig", "within"), [(signal.SIGTERM, 60), (signal.SIGKILL, 120)])
def test_a_kernels_gateway_takes_its_engine_blocks_along_when_it_is_ended(tiny_model, write_config, tmp_path: Path,
                                                                         sig, within):
    """A kernel's in-process gateway (no Jupyter server) started the engine. SIGTERM, which runs no ``atexit``,
    must still stop the interchange, the blocks and the engine; SIGKILL gives it no chance, so the interchange
    notices its parent is gone and ends, and the blocks and their engine follow (their heartbeats unanswered)."""
    data = tmp_path / "data"
    script = (
        "import os, time\n"
        "from first_jupyter import client\n"
        "answer = client.openai_client().chat.completions.create(model='tiny-chat', max_tokens=4,\n"
        "    messages=[{'role': 'user', 'content': 'hi'}])\n"
        "print('ANSWERED', answer.model, flush=True)\n"
        "time.sleep(300)\n")
    env = {**os.environ, "FIRST_CONFIG": str(write_config(in_process_config(tiny_model))),
           "FIRST_DATA_DIR": str(data)}
    for name in ("FIRST_GATEWAY_URL", "FIRST_API_KEY"):
        env.pop(name, None)
    kernel = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert kernel.stdout.readline().strip() == "ANSWERED tiny-chat"
        started = _processes_of(data / "compute")
        assert any("process_worker_pool" in " ".join(p.cmdline()) for p in started)
        kernel.send_signal(sig)
        assert kernel.wait(timeout=120) == -sig
        _, alive = psutil.wait_procs(started, timeout=within)
        assert alive == []
        assert _processes_of(data / "compute") == []
    finally:
        kernel.kill()
        kernel.wait()


def test_a_server_whose_whole_process_group_is_stopped_still_stops_its_blocks(tiny_model, write_config,
                                                                             tmp_path: Path):
    """A terminal's Ctrl-C, or ``timeout``, signals the server's whole process group; the interchange must not
    die first (the server's orderly stop asks it to end the blocks), and nothing may be left afterwards."""
    port = free_port()
    env = {**os.environ, "FIRST_CONFIG": str(write_config(in_process_config(tiny_model))),
           "FIRST_DATA_DIR": str(tmp_path / "data"), "JUPYTER_TOKEN": "group-test"}
    server = jupyter_server_process(port, tmp_path, env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/first/v1", api_key="group-test", max_retries=0,
                               timeout=ENGINE_GUARD_S)
        answer = client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4)
        assert answer.model == "tiny-chat"
        started = _processes_of(tmp_path / "data" / "compute")
        assert started
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=120)  # failure guards: its orderly stop takes at most SHUTDOWN_TIMEOUT_S (15 s)
        _, alive = psutil.wait_procs(started, timeout=60)
        assert alive == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


async def test_tasks_handed_over_from_many_threads_at_once_all_run(tiny_model, tmp_path: Path):
    """A request and the start probe its cold start sends reach the engine from threads of their own; its zmq
    socket is not thread-safe, and two sends at once could block one of them for good (and every later one)."""
    gateway = build_gateway(parse_config(in_process_config(tiny_model), "test"), tmp_path / "data", environ={})
    backend = gateway.backends[0]
    try:
        for _ in range(3):  # the first round starts the engine; each round hands over 48 tasks at once
            async with asyncio.timeout(ENGINE_GUARD_S):  # a deadlock shows as this guard running out
                tasks = await asyncio.gather(*(backend.submitter.submit(engine_health, backend.engine_port)
                                               for _ in range(48)))
                answers = await asyncio.gather(*(asyncio.wrap_future(t) for t in tasks))
            assert all(a["healthy"] for a in answers)
    finally:
        await gateway.close()
    assert _processes_of(tmp_path / "data") == []
