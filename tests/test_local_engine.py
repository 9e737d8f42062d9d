"""The local engine: started on first use, stopped when idle, its failures reported with its own log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anthropic
import openai
import pytest

from first_jupyter.protocol import Capability, parse_request
from first_jupyter.remote import launcher
from first_jupyter.remote.tiny_model import TINY_MODEL_MARKER
from tests.conftest import local_cluster_config, server_config

MESSAGES = [{"role": "user", "content": "hi"}]
GUARD_S = 60.0
"""How long a test waits for an engine process to stop, or to be seen stopped: a failure guard only (the product's
own timers take at most about 10 s), generous so that a slow or busy machine never reaches it."""


def _client(ext) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=ext.gateway_url(), api_key=ext.api_key, max_retries=0)


async def _status(ext) -> dict:
    return (await ext.loop_thread.call(ext.gateway.status())).json_value()["endpoints"][0]


async def _status_once(ext, reached: Callable[[dict], bool]) -> dict:
    """The endpoint's status once ``reached`` holds for it (polled: what it waits for is the engine's process)."""
    deadline = time.monotonic() + GUARD_S
    while not reached(endpoint := await _status(ext)):
        assert time.monotonic() < deadline, f"not reached within {GUARD_S} s: {endpoint}"
        await asyncio.sleep(0.1)
    return endpoint


class TestLifecycle:
    @pytest.fixture
    def jp_server_config(self, tiny_model, write_config, tmp_path: Path):
        return server_config(write_config(local_cluster_config(tiny_model, idle_timeout=1.5)), tmp_path / "data")

    async def test_cold_start_idle_stop_and_restart(self, first_ext):
        assert (await _status(first_ext))["state"] == "stopped"
        gateway = first_ext.gateway
        body = json.dumps({"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 2, "stream": True}).encode()

        async def first_request() -> tuple[dict, bytes]:
            """The first request (a cold start), its status read once it is answered but before it is closed: the
            engine cannot be idle while a request is open, however long the reading takes on this machine
            (idle_timeout is 1.5 s here, to keep the test short)."""
            stream = await gateway.stream(parse_request(Capability.chat, body))
            out: list[bytes] = []
            try:
                await stream.relay(lambda chunk: out.append(chunk) or True)
                return (await gateway.status()).json_value()["endpoints"][0], b"".join(out)
            finally:
                stream.close()

        running, answer = await first_ext.loop_thread.call(first_request())
        assert b'"model":"tiny-chat"' in answer
        assert b'"completion_tokens":2' in answer  # answered whole
        assert (running["state"], running["starts"], running["in_flight"]) == ("running", 1, 1)
        pid = running["pid"]
        await _status_once(first_ext, lambda endpoint: endpoint["state"] == "stopped")  # idle: stopped
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        client = _client(first_ext)
        again = await client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2)
        assert again.choices[0].finish_reason == "length"
        assert (await _status(first_ext))["starts"] == 2


class TestStartFailure:
    @pytest.fixture
    def broken_model(self, tmp_path: Path) -> Path:
        model = tmp_path / "broken-model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
        return model

    @pytest.fixture
    def jp_server_config(self, broken_model, write_config, tmp_path: Path):
        return server_config(write_config(local_cluster_config(broken_model)), tmp_path / "data")

    async def test_failed_start_quotes_the_engine_log(self, first_ext):
        with pytest.raises(openai.InternalServerError) as info:
            await _client(first_ext).chat.completions.create(model="tiny-chat", messages=MESSAGES)
        assert info.value.status_code == 503
        message = info.value.body["message"]
        assert "failed to start" in message
        assert "exited with code" in message
        log = Path((await _status(first_ext))["log"])
        last_line = log.read_text().strip().splitlines()[-1]
        assert "Error" in last_line
        assert "broken-model" in last_line
        assert last_line in message
        status = await _status(first_ext)
        assert status["state"] == "failed"
        assert last_line in status["error"]


class TestEmbeddedDefault:
    @pytest.fixture
    def jp_server_config(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
        monkeypatch.delenv("FIRST_CONFIG", raising=False)
        monkeypatch.delenv("FIRST_LOCAL_MODEL", raising=False)
        return {"ServerApp": {"jpserver_extensions": {"first_jupyter": True},
                              "allow_unauthenticated_access": False, "terminals_enabled": False},
                "FirstExtension": {"data_dir": str(tmp_path / "data")}}

    async def test_builds_the_tiny_model_and_serves_it(self, first_ext, tmp_path: Path):
        models = (await first_ext.gateway.models()).json_value()["data"]
        assert [m["id"] for m in models] == ["tiny-chat"]
        assert [[(s["cluster"], s["endpoint"]) for s in m["served_by"]] for m in models] == [[("local", "engine")]]
        stream = await _client(first_ext).chat.completions.create(model="tiny-chat", messages=MESSAGES,
                                                                  max_tokens=3, stream=True)
        chunks = [c async for c in stream]
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 3
        assert (tmp_path / "data" / "models" / "tiny-chat" / TINY_MODEL_MARKER).is_file()
        # the other APIs a client speaks, on the same engine: Responses as the engine serves it, and Anthropic's
        # Messages translated to chat (transformers serve has no /v1/messages)
        response = await _client(first_ext).responses.create(model="tiny-chat", input="hi", max_output_tokens=3)
        assert (response.model, response.status) == ("tiny-chat", "completed")
        kept = await _client(first_ext).responses.retrieve(response.id)  # the gateway's copy: the engine keeps none
        assert (kept.id, kept.output_text) == (response.id, response.output_text)
        # a next turn goes with the conversation so far, which this engine would not recall by id
        follow = await _client(first_ext).responses.create(model="tiny-chat", input="and?", max_output_tokens=2,
                                                           previous_response_id=response.id)
        alone = await _client(first_ext).responses.create(model="tiny-chat", input="and?", max_output_tokens=2)
        assert follow.usage.input_tokens > alone.usage.input_tokens
        events = [e.type async for e in await _client(first_ext).responses.create(
            model="tiny-chat", input="hi", max_output_tokens=3, stream=True)]
        assert events[0] == "response.created"
        assert events[-1] == "response.completed"
        messages = anthropic.AsyncAnthropic(base_url=first_ext.gateway_url().removesuffix("/v1"),
                                            api_key=first_ext.api_key, max_retries=0)
        message = await messages.messages.create(model="tiny-chat", max_tokens=3, messages=MESSAGES)
        assert (message.model, message.usage.output_tokens) == ("tiny-chat", 3)

    async def test_an_engine_that_dies_reads_as_stopped_and_the_next_request_starts_it_again(self, first_ext):
        """A killed engine (OOM, a crash) under a block that lives on: the model is no longer shown hot, and the
        next requests start block and engine afresh, once, instead of failing on the dead one."""
        client = _client(first_ext)
        await client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2)
        endpoint = await _status(first_ext)
        assert endpoint["state"] == "running"
        pid = json.loads((Path(endpoint["run_dir"]) / "engine.ready").read_text())["pid"]
        os.kill(pid, signal.SIGKILL)
        endpoint = await _status_once(first_ext, lambda endpoint: endpoint["state"] != "running")
        assert endpoint["state"] == "stopped"
        assert f"The engine (pid {pid}) exited; the next request starts it again" in endpoint["error"]
        (model,) = (await first_ext.loop_thread.call(first_ext.gateway.status())).json_value()["models"]
        assert model["state"] == "cold"
        # several at once (each cold start also sends its probe): one restart, and every request answered
        answers = await asyncio.wait_for(asyncio.gather(*(
            client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=2) for _ in range(3))),
            timeout=600)  # a failure guard: the endpoint's own start_timeout
        assert [a.usage.completion_tokens for a in answers] == [2, 2, 2]
        endpoint = await _status(first_ext)
        assert endpoint["state"] == "running"
        assert json.loads((Path(endpoint["run_dir"]) / "engine.ready").read_text())["pid"] != pid


def test_launcher_command_reports_a_failed_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    missing = tmp_path / "not-a-model"
    missing.mkdir()
    code = launcher.main(["--model", str(missing), "--engine", "transformers", "--log", str(tmp_path / "e.log"),
                          "--timeout", "600"])  # far past the failing engine's own exit: it must say why
    assert code == 1
    err = capsys.readouterr().err
    assert "exited with code" in err
    assert str(tmp_path / "e.log") in err


def test_launcher_picks_transformers_without_a_gpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launcher.choose_engine("auto") == "transformers"
    spec = launcher.EngineSpec(model="/m", served_name="m", log_path=Path("x.log"))
    assert launcher.build_command(spec, "vllm", 8000)[1:5] == ["-m", "vllm.entrypoints.openai.api_server",
                                                                "--model", "/m"]
    assert launcher.served_name(spec, "vllm") == "m"
    assert launcher.served_name(spec, "transformers") == "/m"


def test_an_owned_engine_dies_with_the_process_that_started_it(tiny_model: Path, tmp_path: Path):
    """A kernel or server killed outright (SIGKILL) cannot stop its engine; the engine must go with it anyway.
    The engine has a model it can serve, so it would not end by itself: its end is the parent's death's doing."""
    parent_code = (
        "import sys, time; from pathlib import Path\n"
        "from first_jupyter.remote.launcher import EngineSpec, start_engine\n"
        f"p = start_engine(EngineSpec(model={str(tiny_model)!r}, engine='transformers', device='cpu', "
        f"log_path=Path({str(tmp_path / 'engine.log')!r})), owned=True)\n"
        "print(p.pid, flush=True); time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True)
    try:
        engine_pid = int(parent.stdout.readline())
        assert _running(engine_pid)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + GUARD_S
    while _running(engine_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _running(engine_pid):
        os.kill(engine_pid, signal.SIGKILL)
        pytest.fail("the engine outlived the process that owned it")


def test_a_blocks_launcher_stops_its_engine_when_the_block_is_killed(tiny_model: Path, tmp_path: Path):
    """On a node, the launcher runs in the block's shell; the shell killed outright (the block cancelled, the
    job ended) must take the launcher and its engine along, through the launcher's own SIGTERM handling."""
    command = (f"{sys.executable} -m first_jupyter.remote.launcher --model {tiny_model} --engine transformers "
               f"--device cpu --log {tmp_path / 'engine.log'} --foreground & wait")
    block = subprocess.Popen(["/bin/bash", "-c", command], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        served = json.loads(block.stdout.readline())
        launcher_pid = next(int(p) for p in os.listdir("/proc") if p.isdigit() and _is_child(int(p), block.pid))
        assert _running(served["pid"])
        os.kill(block.pid, signal.SIGKILL)
        deadline = time.monotonic() + GUARD_S  # (the launcher gives its engine 10 s before SIGKILL)
        while (_running(served["pid"]) or _running(launcher_pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running(served["pid"]), "the engine outlived its block"
        assert not _running(launcher_pid), "the launcher outlived its block"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(block.pid, signal.SIGKILL)
        block.wait()


def _is_child(pid: int, parent: int) -> bool:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == parent
    except (FileNotFoundError, IndexError, ValueError):
        return False


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited child of init waits a moment to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
