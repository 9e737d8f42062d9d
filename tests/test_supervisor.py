"""The supervisor of background tasks: a failure is logged with its traceback and counted, and the task goes on."""

from __future__ import annotations

import asyncio
import logging

import pytest

from first_jupyter.gateway.supervisor import Supervisor
from tests.waiting import eventually_async


async def test_a_repeated_task_that_fails_is_logged_counted_and_runs_again(caplog: pytest.LogCaptureFixture):
    supervisor = Supervisor()
    rounds: list[int] = []

    async def step() -> float:
        rounds.append(len(rounds))
        if len(rounds) == 2:
            raise TypeError("'NoneType' object is not iterable")
        return 0.0

    running = asyncio.ensure_future(supervisor.repeat("status readings", step, retry_s=0.0))
    try:
        await eventually_async(lambda: len(rounds) >= 4, "rounds after the failing one")
    finally:
        running.cancel()
    status = supervisor.status()
    assert status["failures"] == 1
    assert status["tasks"]["status readings"]["last_error"] == "TypeError: 'NoneType' object is not iterable"
    (logged,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "status readings" in logged.getMessage()
    assert isinstance(logged.exc_info[1], TypeError)  # with its traceback


async def test_a_spawned_task_that_fails_is_counted_and_a_cancelled_one_is_not():
    supervisor = Supervisor()

    async def fails() -> None:
        raise RuntimeError("boom")

    failing = supervisor.spawn("model starts", fails(), "tiny on local/engine")
    waiting = supervisor.spawn("catalog readings", asyncio.Event().wait())
    await asyncio.gather(failing, return_exceptions=True)
    supervisor.cancel_all()
    await asyncio.gather(waiting, return_exceptions=True)
    assert waiting.cancelled()
    status = supervisor.status()
    assert (status["failures"], list(status["tasks"])) == (1, ["model starts"])
    assert status["tasks"]["model starts"]["last_error"] == "tiny on local/engine: RuntimeError: boom"
