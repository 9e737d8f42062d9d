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


async def test_first_tokens_are_shown_long_before_the_answer_ends(first_ext, jp_serverapp):
    async with started_kernel(jp_serverapp) as kernel:
        messages = await run(kernel, "%%first chat -f text\nSay hello")
    updates = [(t, m["content"]["data"]["text/plain"]) for t, m in messages
               if m["msg_type"] == "update_display_data" and m["content"]["data"]["text/plain"]]
    (final_at, final), = [(t, m) for t, m in messages
                          if m["msg_type"] == "display_data" and "first" in m["content"]["metadata"]]
    assert final["content"]["data"]["text/plain"] == "".join(f"tok{i} " for i in range(TOKENS))
    assert final["content"]["metadata"]["first"]["cluster"] == "remote"
    first_at, first_text = updates[0]
    assert first_text.startswith("tok0 ")
    assert final_at - first_at > TOKENS * PACE / 2  # shown while most of the answer was still being generated
    assert len(updates) >= 5


async def test_interrupting_a_stream_stops_it_and_cancels_it_upstream(first_ext, jp_serverapp, paced_upstream):
    paced_upstream.pace = 0.2  # 8 s in all: far longer than the test waits
    interrupted: list[float] = []

    async def interrupt_on_first_piece(_: float, msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "update_display_data" and not interrupted:
            interrupted.append(time.monotonic())
            await jp_serverapp.kernel_manager.interrupt_kernel(kernel.kernel_id)  # as the stop button does

    async with started_kernel(jp_serverapp) as kernel:
        messages = await run(kernel, "%%first chat\nTell a long story", during=interrupt_on_first_piece)
        after = await run(kernel, "print(1 + 1)")
    stderr = "".join(m["content"]["text"] for _, m in messages if m["msg_type"] == "stream")
    assert "Stopped. The request was cancelled." in stderr
    assert not [m for _, m in messages if m["msg_type"] == "error"]  # no traceback
    deadline = time.monotonic() + 3
    while not paced_upstream.disconnects and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert paced_upstream.disconnects, "the upstream request was never cancelled"
    assert paced_upstream.disconnects[-1] - interrupted[0] < 1.0
    assert any(m["msg_type"] == "stream" and m["content"]["text"] == "2\n" for _, m in after)
