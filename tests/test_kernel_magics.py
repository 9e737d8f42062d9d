"""``%%first chat`` in a real kernel that the Jupyter server started: streaming, and interrupting a stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.fake_upstream import FakeUpstream, serving_in_thread
from tests.conftest import fake_cluster_config, server_config

TOKENS = 40
PACE = 0.05  # the whole answer takes 2 s
SLOW_PACE = 1.0
"""A pace that holds a stream after its first piece: 39 s for the rest, far longer than its first piece takes to
show, and at most a second to wait once the test lets it go on at ``PACE``."""


@pytest.fixture
def paced_upstream() -> Iterator[FakeUpstream]:
    with serving_in_thread(models=["fake-model", "fake-embed"], chunks=TOKENS, pace=PACE) as upstream:
        yield upstream


@pytest.fixture
def jp_server_config(paced_upstream, write_config, tmp_path: Path):
    return server_config(write_config(fake_cluster_config(paced_upstream)), tmp_path / "data")


@contextlib.asynccontextmanager
async def started_kernel(jp_serverapp: Any) -> AsyncIterator[Any]:
    """A kernel started by the server (so with FIRST_GATEWAY_URL and FIRST_API_KEY), with the magics loaded.

    A context manager, not a fixture: pytest-jupyter runs async tests but not async fixtures.
    """
    manager = jp_serverapp.kernel_manager
    kernel_id = await manager.start_kernel(kernel_name="python3")
    client = manager.get_kernel(kernel_id).client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        messages = await run(client, "%load_ext first_jupyter")
        assert not [m for _, m in messages if m["msg_type"] == "error"]
        client.kernel_id = kernel_id
        yield client
    finally:
        client.stop_channels()
        await manager.shutdown_kernel(kernel_id, now=True)


async def run(client: Any, code: str, during: Any = None) -> list[tuple[float, dict[str, Any]]]:
    """Execute ``code``; every iopub message of it with its arrival time, until the kernel is idle again.

    ``during(time, message)`` is awaited on each message, to act while the cell runs.
    """
    msg_id = client.execute(code)
    seen: list[tuple[float, dict[str, Any]]] = []
    while True:
        msg = await client.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        seen.append((time.monotonic(), msg))
        if during is not None:
            await during(seen[-1][0], msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return seen


async def test_first_tokens_are_shown_long_before_the_answer_ends(first_ext, jp_serverapp, paced_upstream):
    paced_upstream.pace = SLOW_PACE  # holds the answer after its first piece until the test lets it go on
    generating: list[bool] = []

    async def let_go_once_shown(_: float, msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "update_display_data" and msg["content"]["data"]["text/plain"] and not generating:
            generating.append(paced_upstream.active == 1)  # the upstream had the rest of the answer still to send
            paced_upstream.pace = PACE

    async with started_kernel(jp_serverapp) as kernel:
        messages = await run(kernel, "%%first chat -f text\nSay hello", during=let_go_once_shown)
    updates = [m["content"]["data"]["text/plain"] for _, m in messages
               if m["msg_type"] == "update_display_data" and m["content"]["data"]["text/plain"]]
    (final,) = [m for _, m in messages if m["msg_type"] == "display_data" and "first" in m["content"]["metadata"]]
    answer = "".join(f"tok{i} " for i in range(TOKENS))
    assert final["content"]["data"]["text/plain"] == answer
    assert final["content"]["metadata"]["first"]["cluster"] == "remote"
    assert generating == [True]  # the first piece was shown while the answer was still being generated
    assert updates[0] == "tok0 "
    assert all(answer.startswith(text) for text in updates)  # each update shows the answer so far
    assert [len(text) for text in updates] == sorted(len(text) for text in updates)


async def test_interrupting_a_stream_stops_it_and_cancels_it_upstream(first_ext, jp_serverapp, paced_upstream):
    paced_upstream.pace = 3600.0  # after its first piece the upstream holds the rest: only the interrupt ends it
    interrupted = False

    async def interrupt_on_first_piece(_: float, msg: dict[str, Any]) -> None:
        nonlocal interrupted
        if msg["msg_type"] == "update_display_data" and not interrupted:
            interrupted = True
            await jp_serverapp.kernel_manager.interrupt_kernel(kernel.kernel_id)  # as the stop button does

    async with started_kernel(jp_serverapp) as kernel:
        messages = await run(kernel, "%%first chat\nTell a long story", during=interrupt_on_first_piece)
        after = await run(kernel, "print(1 + 1)")
    assert interrupted
    stderr = "".join(m["content"]["text"] for _, m in messages if m["msg_type"] == "stream")
    assert "Stopped. The request was cancelled." in stderr
    assert not [m for _, m in messages if m["msg_type"] == "error"]  # no traceback
    # the upstream would have held its response for an hour: a disconnect is the gateway cancelling it
    deadline = time.monotonic() + 30
    while not paced_upstream.disconnects and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert paced_upstream.disconnects, "the upstream request was never cancelled"
    assert any(m["msg_type"] == "stream" and m["content"]["text"] == "2\n" for _, m in after)
