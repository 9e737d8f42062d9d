"""The gateway's own loop in a thread: work handed over, results and errors back, cancellation across."""

from __future__ import annotations

import asyncio
import threading

import pytest
import uvloop

from first_jupyter.transport.loop_thread import LoopThread


@pytest.fixture
def loop_thread():
    thread = LoopThread(name="test-gateway")
    yield thread
    thread.stop()


async def test_work_runs_on_the_gateway_thread_and_results_come_back(loop_thread):
    async def where() -> str:
        await asyncio.sleep(0)
        return threading.current_thread().name

    assert await loop_thread.call(where()) == "test-gateway"
    assert isinstance(loop_thread.loop, uvloop.Loop)  # installed here, so used


async def test_errors_come_back_as_raised(loop_thread):
    async def fail() -> None:
        raise ValueError("bad model")

    with pytest.raises(ValueError, match="bad model"):
        await loop_thread.call(fail())


async def test_cancelling_the_caller_cancels_the_work_at_once(loop_thread):
    cleaned = threading.Event()
    started = threading.Event()

    async def long_request() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.set()

    async def cleaned_yet() -> bool:
        return cleaned.is_set()

    caller = asyncio.ensure_future(loop_thread.call(long_request()))
    assert await asyncio.to_thread(started.wait, 10)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # "At once", as an order rather than a number of seconds: the cancel was handed to the gateway's loop before
    # the caller saw its own end, so work handed over after that finds the request already cleaned up (a cancel
    # that went over later, or only when the request ended by itself, 60 s on, would not be done yet).
    assert await loop_thread.call(cleaned_yet())


async def test_stop_cancels_what_still_runs_and_lets_it_clean_up():
    thread = LoopThread()
    cleaned = threading.Event()
    started = threading.Event()

    async def stream_nobody_ends() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.set()

    thread.submit(stream_nobody_ends())
    assert await asyncio.to_thread(started.wait, 10)  # running (a task never started would have nothing to clean)
    await asyncio.to_thread(thread.stop)
    assert cleaned.is_set()
    assert not thread.alive
    assert thread.loop.is_closed()
