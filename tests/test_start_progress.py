"""A call that waits for a model's start shows how it goes: in the gateway's answers (progress comments, for a
plain request too when it asks with ``X-First-Progress``), in ``first_jupyter.chat(on_progress=...)``, and in a
``%%first`` cell of a real kernel, whose status line updates until the answer replaces it.

The cluster is a FIRST gateway (the stand-in of ``tests/fake_first_gateway``) whose job for the model is queued:
it holds each request for the model, as FIRST does while the job starts, until the test lets them go; so the
test sets how long the start lasts, by the events it sees, never by the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import struct
import termios
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from first_jupyter.api import door_kit
from first_jupyter.config import parse_config
from first_jupyter.gateway.answers import Completed, WaitingAnswer
from first_jupyter.protocol import PROGRESS_MARKER, Capability, Progress
from first_jupyter.service import build_gateway
from tests.conftest import server_config
from tests.fake_first_gateway import TOKEN, FakeFirstGateway, job, jobs, serving_first_gateway
from tests.test_kernel_magics import run, started_kernel

COLD, HOT = "Qwen/QwQ-32B", "meta-llama/Llama-3.3-70B-Instruct"
RESOURCE_SERVER = "681c10cc-f684-4540-bcd7-0b4df3bc26ef"
PROGRESS_EVERY = 0.1
"""Seconds between progress comments: short, since the test lets the start end only after it saw some."""


@pytest.fixture
def remote() -> Iterator[FakeFirstGateway]:
    """FIRST with HOT running and COLD's job queued: COLD's requests wait until ``held[COLD]`` is set."""
    state = FakeFirstGateway(served={"sophia": {"vllm": [HOT, COLD]}},
                             jobs={"sophia": jobs([job("sophia", "vllm", HOT)], queued=[job("sophia", "vllm", COLD)])},
                             held={COLD: threading.Event()})
    with serving_first_gateway(state) as running:
        try:
            yield running
        finally:
            state.held[COLD].set()  # nothing stays held past the test


def _config(remote: FakeFirstGateway) -> dict[str, Any]:
    return {"clusters": {"alcf": {"backend": "first", "endpoints": [{
        "name": "gateway", "base_url": remote.url, "globus_resource_server": RESOURCE_SERVER,
        "globus_scope": f"https://auth.globus.org/scopes/{RESOURCE_SERVER}/action_all"}]}},
        "auth": {"sources": ["env"]}, "defaults": {"model": COLD, "cold_start": {"progress_every": PROGRESS_EVERY}}}


def _body(model: str, **extra: Any) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}).encode()


def _progress(chunks: list[bytes]) -> list[Progress]:
    return [p for chunk in chunks for line in chunk.split(b"\n") if (p := Progress.from_comment(line)) is not None]


async def test_a_plain_request_that_asks_hears_the_start_and_then_gets_the_whole_answer(remote, tmp_path: Path):
    gateway = build_gateway(parse_config(_config(remote), "test"), tmp_path, environ={"FIRST_GLOBUS_TOKEN": TOKEN})
    try:
        await gateway.status()  # a status reading: COLD's job is queued
        hot = await door_kit.start(gateway, Capability.chat, _body(HOT), 1 << 20, progress=True)
        assert isinstance(hot, Completed)  # nothing to wait for: the plain answer, with its real status
        waiting = await door_kit.start(gateway, Capability.chat, _body(COLD), 1 << 20, progress=True)
        assert isinstance(waiting, WaitingAnswer)
        chunks: list[bytes] = []

        def write(chunk: bytes) -> bool:
            chunks.append(chunk)
            if len(_progress(chunks)) == 2:
                remote.held[COLD].set()  # the job has started: FIRST answers
            return True

        try:
            await waiting.relay(write)
        finally:
            waiting.close()
    finally:
        await gateway.close()
    told = _progress(chunks)
    assert len(told) >= 2
    assert {(p.model, p.cluster, p.endpoint) for p in told} == {(COLD, "alcf", "gateway")}
    assert told[0].state == "starting"  # the gateway asked for the start of the queued job
    assert [p.elapsed_s for p in told] == sorted(p.elapsed_s for p in told)
    assert all(c.startswith(b": waiting for model 'Qwen/QwQ-32B' on cluster 'alcf'") for c in chunks[:-1])
    assert chunks[-1].startswith(b"data: ")
    assert chunks[-1].endswith(b"\n\n")
    answer = json.loads(chunks[-1][len(b"data: "):])
    assert answer["choices"][0]["message"]["content"] == "from sophia/vllm"
    assert waiting.target.cluster == "alcf"


async def test_a_plain_request_whose_start_fails_ends_with_the_error_event(remote, tmp_path: Path):
    remote.faults[COLD] = "maintenance"
    gateway = build_gateway(parse_config(_config(remote), "test"), tmp_path, environ={"FIRST_GLOBUS_TOKEN": TOKEN})
    try:
        await gateway.status()
        waiting = await door_kit.start(gateway, Capability.chat, _body(COLD), 1 << 20, progress=True)
        chunks: list[bytes] = []
        try:
            await waiting.relay(lambda chunk: chunks.append(chunk) or True)
        finally:
            waiting.close()
    finally:
        await gateway.close()
    assert isinstance(waiting, WaitingAnswer)
    error = json.loads(chunks[-1].removeprefix(b"data: "))["error"]
    assert "maintenance" in error["message"]
    assert waiting.error is not None


@pytest.fixture
def jp_server_config(remote, write_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FIRST_GLOBUS_TOKEN", TOKEN)
    return server_config(write_config(_config(remote)), tmp_path / "data")


async def _read_states(ext: Any) -> None:
    """A status reading on the server's gateway, so that it knows COLD's job is queued (as its periodic reading
    would)."""
    await ext.loop_thread.call(ext.gateway.status())


@pytest.fixture
def kernel_client(first_ext: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``first_jupyter.client`` as in a kernel of the server: its gateway and key from the environment."""
    from first_jupyter import client

    monkeypatch.setenv(client.GATEWAY_URL_ENV, first_ext.gateway_url())
    monkeypatch.setenv(client.API_KEY_ENV, first_ext.api_key)
    client.disconnect()
    yield client
    client.disconnect()


async def test_on_progress_gets_typed_events_and_a_warm_wait_is_told_too(first_ext, remote, kernel_client):
    client = kernel_client
    await _read_states(first_ext)
    told: list[Progress] = []

    def on_progress(progress: Progress) -> None:
        told.append(progress)
        if len(told) == 2:
            remote.held[COLD].set()

    result = await asyncio.to_thread(client.chat, "hi", model=COLD, on_progress=on_progress)
    warmed = await asyncio.to_thread(client.warm, HOT, wait=True, on_progress=on_progress)
    assert result.text == "from sophia/vllm"
    assert (result.cluster, result.endpoint) == ("alcf", "gateway")
    assert len(told) >= 2
    assert all(isinstance(p, Progress) for p in told)
    assert told[0].model == COLD
    assert warmed["state"] == "hot"  # hot already: answered at once, with nothing to tell


async def test_first_warm_wait_draws_the_start_on_a_terminal(first_ext, remote, kernel_client):
    """``first warm MODEL --wait`` with stderr on a terminal: a bar naming where the model starts, its state and
    time so far, redrawn with each report of the gateway's, and the model's state once it answers."""
    from first_jupyter import cli_progress

    await _read_states(first_ext)
    reader, writer = pty.openpty()
    fcntl.ioctl(writer, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 160, 0, 0))  # a terminal 160 columns wide
    os.set_blocking(reader, False)
    drawn = bytearray()

    def read_terminal() -> None:
        with contextlib.suppress(BlockingIOError):
            drawn.extend(os.read(reader, 65536))
        if drawn.count(b"s so far") >= 2:
            remote.held[COLD].set()  # the job has started: FIRST answers the start's probe

    loop = asyncio.get_running_loop()
    loop.add_reader(reader, read_terminal)
    try:
        with os.fdopen(writer, "w") as terminal:
            answer = await asyncio.to_thread(cli_progress.warm_and_wait, COLD, None, terminal)
    finally:
        loop.remove_reader(reader)
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(reader, 65536):
            drawn.extend(chunk)
    os.close(reader)
    assert answer["state"] == "hot"
    frames = [frame for frame in drawn.decode().split("\r") if frame.strip()]
    told = [frame for frame in frames if "s so far" in frame]
    assert len(told) >= 2
    assert all(re.search(rf"{COLD} on alcf/gateway \((queued|starting), \d+ s so far, about .* to go\): +\d+%\|", frame)
               for frame in told), told
    assert re.search(rf"{COLD} on alcf/gateway \(hot\): 100%\|█+\|", frames[-1]), frames[-1]


async def test_the_pickers_warm_button_shows_the_start_on_its_bar(first_ext, remote, kernel_client):
    """ModelPicker's Warm: the start's progress on the bar under the dropdown (words and estimate), gone once the
    model answers; ChatWidget shows a wait on the same bar."""
    from first_jupyter.widgets import ModelPicker

    await _read_states(first_ext)
    picker = await asyncio.to_thread(ModelPicker)
    picker.value = COLD
    shown: list[str] = []

    def seen(change: dict[str, Any]) -> None:
        if change["new"]:
            shown.append(change["new"])
            if len(shown) == 2:
                remote.held[COLD].set()

    picker.start_bar.label.observe(seen, names="value")
    thread = picker.warm()
    assert thread is not None
    await asyncio.to_thread(thread.join)
    assert len(shown) >= 2
    assert all(f"Waiting for model '{COLD}' on cluster 'alcf' endpoint 'gateway'" in line for line in shown)
    assert picker.start_bar.widget.layout.display == "none"  # the start is over
    assert picker.error_line.value == ""
    assert not picker.warm_button.disabled


def _status_lines(messages: list[tuple[float, dict[str, Any]]]) -> list[str]:
    return [m["content"]["data"]["text/plain"] for _, m in messages
            if m["msg_type"] in ("display_data", "update_display_data")
            and m["content"]["data"].get("text/plain", "").startswith("⏳ Waiting for model")]


async def test_a_cell_shows_the_start_then_the_answer_replaces_it(first_ext, jp_serverapp, remote):
    await _read_states(first_ext)
    shown: list[str] = []

    async def let_go_after_two(_: float, msg: dict[str, Any]) -> None:
        shown.extend(_status_lines([(0.0, msg)]))
        if len(shown) == 2:
            remote.held[COLD].set()

    async with started_kernel(jp_serverapp) as kernel:
        messages = await run(kernel, "%%first chat -f text\nSay hello", during=let_go_after_two)
    lines = _status_lines(messages)
    assert len(lines) >= 2
    assert "cluster 'alcf' endpoint 'gateway'" in lines[0]
    assert "s so far" in lines[0]
    kinds = [m["msg_type"] for _, m in messages]
    first_status = kinds.index("display_data")
    (final,) = [m for _, m in messages if m["msg_type"] == "display_data" and "first" in m["content"]["metadata"]]
    assert final["content"]["data"]["text/plain"] == "from sophia/vllm"
    emptied = [i for i, (_, m) in enumerate(messages) if m["msg_type"] == "update_display_data"
               and m["content"]["data"] == {"text/plain": ""}]
    status_id = messages[first_status][1]["content"]["transient"]["display_id"]
    assert any(messages[i][1]["content"]["transient"]["display_id"] == status_id for i in emptied)  # then gone
    assert not [m for _, m in messages if m["msg_type"] == "error"]


async def test_an_interrupt_during_the_wait_cancels_the_request_upstream(first_ext, jp_serverapp, remote):
    await _read_states(first_ext)
    interrupted = False

    async def interrupt_on_status(_: float, msg: dict[str, Any]) -> None:
        nonlocal interrupted
        if _status_lines([(0.0, msg)]) and not interrupted:
            interrupted = True
            await jp_serverapp.kernel_manager.interrupt_kernel(kernel.kernel_id)  # as the stop button does

    async with started_kernel(jp_serverapp) as kernel:
        messages = await run(kernel, "%%first chat --no-stream\nTell a long story", during=interrupt_on_status)
    assert interrupted
    stderr = "".join(m["content"]["text"] for _, m in messages if m["msg_type"] == "stream")
    assert "Stopped. The request was cancelled." in stderr
    assert not [m for _, m in messages if m["msg_type"] == "error"]  # no traceback
    async with asyncio.timeout(60):  # a guard only: the gateway closes its upstream request as the client leaves
        while COLD not in remote.abandoned:
            await asyncio.sleep(0.05)


def test_progress_comments_carry_what_the_client_reads():
    progress = Progress("m", "c", "e", "starting", 3.0, 540.0)
    human, machine, *_ = progress.comment().split(b"\n")
    assert human == b": waiting for model 'm' on cluster 'c' endpoint 'e': starting, 3 s so far, about 9 min to go"
    assert machine.startswith(PROGRESS_MARKER)
    assert Progress.from_comment(machine) == progress
    assert Progress.from_comment(human) is None
    assert Progress.from_comment(PROGRESS_MARKER + b'{"model": 1}') is None  # a shape it cannot read: skipped
    assert progress.fraction == pytest.approx(3 / 543)
    assert Progress("m", "c", "e", "queued", 3.0, None).fraction is None
