"""Admission on a virtual clock: interactive requests first, the batch concurrency's AIMD (ramp-up, back-off on a
TTFT miss, recovery), users in weighted fair order, and a bounded queue that answers 429 with Retry-After."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import orjson
import pytest

from bench.fake_engine import EngineSettings, FakeEngine
from bench.fake_upstream import FakeUpstream
from first_jupyter.config import Admission as AdmissionSettings
from first_jupyter.config import ScaleOut, parse_config
from first_jupyter.gateway import admission as admission_module
from first_jupyter.gateway.admission import PERIOD_S, QUEUE_SHARE, Admission, Priority, as_batch
from first_jupyter.gateway.backends.base import Backend
from first_jupyter.gateway.caller import Caller, acting_as
from first_jupyter.gateway.router import Router, Target
from first_jupyter.protocol import Capability, OpenAIError, parse_request
from first_jupyter.service import build_gateway
from tests.waiting import eventually_async

TARGET_S = 2.0
HOLDER = (Priority.interactive, "holder")
"""The interactive requests that fill or hold slots in these tests are this user's."""
CAPACITY = 8


class _Backend:
    kind = "test"
    start_s = 600.0
    cluster = name = "alpha"

    def __init__(self, capacity: int, max_blocks: int) -> None:
        self.capacity = capacity
        self.max_blocks = max_blocks

    def supports(self, model_id: str, capability: Capability) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _setup(capacity: int = CAPACITY, max_blocks: int = 1, **settings: object) -> tuple[Admission, Target, _Clock]:
    backend = cast(Backend, _Backend(capacity, max_blocks))
    clock = _Clock()
    routes = Router([backend], {"m": ["alpha/alpha"]}, clock=clock)
    gate = Admission(routes, AdmissionSettings.model_validate(settings), TARGET_S, clock)
    return gate, routes.catalog["m"][0], clock


async def _enter(gate: Admission, target: Target, user: str = HOLDER[1], priority: Priority = Priority.interactive,
                 ) -> str:
    """One request of ``user`` taking a slot; its user, once it has one."""
    with acting_as(cast(Caller, SimpleNamespace(user=user))):
        if priority is Priority.batch:
            with as_batch():
                await gate.began(target)
        else:
            await gate.began(target)
    return user


def _start(gate: Admission, target: Target, user: str = HOLDER[1], priority: Priority = Priority.interactive,
           ) -> asyncio.Task[str]:
    return asyncio.create_task(_enter(gate, target, user, priority))


async def _next_granted(tasks: set[asyncio.Task[str]]) -> str:
    """The one request among ``tasks`` that got the slot just freed."""
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    assert len(done) == 1
    task = done.pop()
    tasks.discard(task)
    return task.result()


async def _served_in_turn(gate: Admission, target: Target, waiting: set[asyncio.Task[str]], holding: str,
                          ) -> list[str]:
    """The users of ``waiting`` in the order they get the one slot, each giving it back for the next."""
    served = []
    while waiting:
        gate.ended(target, (Priority.interactive, holding))
        holding = await _next_granted(waiting)
        served.append(holding)
    return served


async def _fill(gate: Admission, target: Target, count: int, priority: Priority) -> None:
    for _ in range(count):
        await _start(gate, target, priority=priority)


async def test_a_freed_slot_goes_to_a_waiting_interactive_request_before_any_batch_line():
    gate, target, _ = _setup()
    await _fill(gate, target, CAPACITY, Priority.batch)  # no interactive traffic yet: the batch has every slot
    assert gate.status(target.backend).in_flight_batch == CAPACITY
    line = _start(gate, target, "batch-owner", Priority.batch)
    chat = _start(gate, target, "scientist")
    await asyncio.sleep(0)
    status = gate.status(target.backend)
    assert (status.queued_batch, status.queued_interactive) == (1, 1)
    gate.ended(target, (Priority.batch, ""))
    assert await _next_granted({line, chat}) == "scientist"
    assert not line.done()
    line.cancel()
    await asyncio.gather(line, return_exceptions=True)
    assert gate.status(target.backend).queued_batch == 0


async def test_batch_lines_leave_the_recent_interactive_peak_free_until_it_ages_out():
    gate, target, clock = _setup()
    await _fill(gate, target, 3, Priority.interactive)  # a peak of 3 interactive requests at once
    for _ in range(3):
        gate.ended(target, HOLDER)
    assert gate.status(target.backend).batch_concurrency == CAPACITY - 3
    clock.now += admission_module.HEADROOM_WINDOW_S + 1
    assert gate.status(target.backend).batch_concurrency == CAPACITY


async def test_a_ttft_miss_halves_the_batch_concurrency_once_per_period_then_it_ramps_back_to_full():
    gate, target, clock = _setup()
    assert gate.status(target.backend).batch_concurrency == CAPACITY
    gate.first_token(target, TARGET_S / 2)  # within the target: nothing changes
    assert gate.status(target.backend).batch_concurrency == CAPACITY
    gate.first_token(target, TARGET_S * 2)
    assert gate.status(target.backend).batch_concurrency == CAPACITY // 2
    gate.first_token(target, TARGET_S * 2)  # within the same period: one cut
    assert gate.status(target.backend).batch_concurrency == CAPACITY // 2
    clock.now += PERIOD_S
    gate.first_token(target, TARGET_S * 2)  # still missing a period later: cut again
    assert gate.status(target.backend).batch_concurrency == CAPACITY // 4
    chosen = []
    for _ in range(8):  # no more misses: additive increase, capacity / ADD_STEPS a period, up to full
        clock.now += PERIOD_S
        chosen.append(gate.status(target.backend).batch_concurrency)
    step = CAPACITY // admission_module.ADD_STEPS
    assert chosen == [min(CAPACITY // 4 + step * (i + 1), CAPACITY) for i in range(8)]
    assert chosen[-1] == CAPACITY


async def test_the_cut_holds_batch_lines_back_while_interactive_ones_still_get_every_slot():
    gate, target, _ = _setup()
    gate.first_token(target, TARGET_S * 2)
    gate.first_token(target, TARGET_S * 2)
    await _fill(gate, target, CAPACITY // 2, Priority.batch)
    held = _start(gate, target, "owner", Priority.batch)
    await asyncio.sleep(0)
    assert gate.status(target.backend).batch_held
    assert gate.held("m")
    await _fill(gate, target, CAPACITY // 2, Priority.interactive)  # the rest of the slots, at once
    assert gate.router.health_of(target).in_flight == CAPACITY
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
    assert not gate.held("m")


async def test_an_interactive_request_that_waits_for_a_slot_counts_as_a_miss():
    gate, target, clock = _setup()
    await _fill(gate, target, CAPACITY, Priority.batch)
    chat = _start(gate, target, "scientist")
    await asyncio.sleep(0)
    clock.now += QUEUE_SHARE * TARGET_S
    gate.ended(target, (Priority.batch, ""))
    await chat
    assert gate.status(target.backend).batch_concurrency == CAPACITY // 2  # the cut (the peak of 1 leaves more)


async def test_an_engine_queue_cuts_the_batch_only_while_interactive_traffic_is_about():
    gate, target, clock = _setup()
    gate.engine_reports(target.backend, 12)
    status = gate.status(target.backend)
    assert (status.batch_concurrency, status.engine_waiting) == (CAPACITY, 12)
    await _start(gate, target)
    gate.ended(target, HOLDER)
    clock.now += PERIOD_S
    gate.engine_reports(target.backend, 12)
    assert gate.status(target.backend).batch_concurrency == CAPACITY // 2


async def test_users_are_served_in_weighted_fair_order():
    gate, target, _ = _setup(capacity=1, weights={"heavy": 2.0})
    await _start(gate, target, "holder")
    waiting = {_start(gate, target, "burst") for _ in range(5)}
    await asyncio.sleep(0)
    waiting.add(_start(gate, target, "single"))
    await asyncio.sleep(0)
    assert await _served_in_turn(gate, target, waiting, "holder") == ["burst", "single", "burst", "burst", "burst",
                                                                      "burst"]

    heavy = {_start(gate, target, "heavy") for _ in range(4)}
    await asyncio.sleep(0)
    light = {_start(gate, target, "light") for _ in range(4)}
    await asyncio.sleep(0)
    assert await _served_in_turn(gate, target, heavy | light, "burst") == ["heavy", "heavy", "light", "heavy", "heavy",
                                                                           "light", "light", "light"]


async def test_a_full_queue_answers_429_with_retry_after_and_another_user_still_queues():
    gate, target, _ = _setup(capacity=1, max_queued=3, max_queued_per_user=2)
    await _start(gate, target, "holder")
    burst = [_start(gate, target, "burst") for _ in range(3)]
    await asyncio.sleep(0)
    refused = burst[2]
    with pytest.raises(OpenAIError) as raised:
        await refused
    error = raised.value
    assert (error.status, error.code, error.type) == (429, "queue_full", "rate_limit_error")
    assert int(error.headers["Retry-After"]) >= 1
    assert "max_queued_per_user" in error.message
    assert "Retry after" in error.message
    other = _start(gate, target, "other")
    await asyncio.sleep(0)
    assert gate.status(target.backend).queued_interactive == 3
    with pytest.raises(OpenAIError) as everyone:
        await _start(gate, target, "late")
    assert "defaults.admission.max_queued)" in everyone.value.message
    for task in (*burst[:2], other):
        task.cancel()
    await asyncio.gather(*burst[:2], other, return_exceptions=True)
    assert gate.status(target.backend).queued_interactive == 0


async def test_a_request_cancelled_while_it_waits_takes_no_slot():
    gate, target, _ = _setup(capacity=1)
    await _start(gate, target, "holder")
    gone = _start(gate, target, "gone")
    stays = _start(gate, target, "stays")
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    gate.ended(target, HOLDER)
    assert await stays == "stays"
    status = gate.status(target.backend)
    assert (status.in_flight_interactive, status.queued_interactive) == (1, 0)
    assert gate.router.health_of(target).in_flight == 1


async def test_a_user_with_many_requests_leaves_a_slot_for_the_others_while_they_are_about():
    gate, target, clock = _setup()
    reserve = CAPACITY // admission_module.RESERVE_SHARE
    await _fill(gate, target, CAPACITY, Priority.interactive)  # alone: every slot
    for _ in range(CAPACITY):
        gate.ended(target, HOLDER)
    await _start(gate, target, "single")  # another user now
    gate.ended(target, (Priority.interactive, "single"))
    burst = [_start(gate, target, "burst") for _ in range(CAPACITY)]
    await asyncio.sleep(0)
    status = gate.status(target.backend)
    assert (status.in_flight_interactive, status.queued_interactive) == (CAPACITY - reserve, reserve)
    assert await _start(gate, target, "single") == "single"  # at once: the slot kept free
    clock.now += admission_module.HEADROOM_WINDOW_S + 1  # the others gone quiet: the burst may take the rest
    gate.ended(target, (Priority.interactive, "single"))
    assert await asyncio.gather(*burst) == ["burst"] * CAPACITY


async def test_an_endpoint_that_may_scale_out_is_sent_one_block_more_than_it_has_up():
    """A Globus Compute endpoint adds a block only for tasks it sees waiting: held back at the gateway, they
    would never make it grow."""
    gate, target, _ = _setup(capacity=2, max_blocks=3)
    await _fill(gate, target, 4, Priority.interactive)  # 2 for its block, 2 waiting there: it scales out for them
    fifth = _start(gate, target, "fifth")
    await asyncio.sleep(0)
    status = gate.status(target.backend)
    assert (status.capacity, status.in_flight_interactive, status.queued_interactive) == (4, 4, 1)
    gate.router.observe_blocks(target.backend, 2)  # (the catalog's order: the router, then the observers)
    gate.observe([target.backend], [])
    assert await fifth == "fifth"  # the block came: room for one block's more again, the waiting one goes
    assert gate.status(target.backend).capacity == 6
    gate.router.observe_blocks(target.backend, 3)  # every block it may have is up: no more than they serve
    assert gate.status(target.backend).capacity == 6
    await _fill(gate, target, 1, Priority.interactive)
    last = _start(gate, target, "last")
    await asyncio.sleep(0)
    assert gate.status(target.backend).queued_interactive == 1
    last.cancel()
    await asyncio.gather(last, return_exceptions=True)


@pytest.mark.parametrize("keep_hot", ["peak", "predicted"])
async def test_requests_waiting_for_a_slot_count_in_their_models_demand(keep_hot: str):
    """``keep_hot: peak`` and ``predicted`` size a model's endpoints by what it is asked: a burst held at the
    gateway for slots is demand all the same, until each request ends or gives up."""
    clock = _Clock()
    routes = Router([cast(Backend, _Backend(2, 1))], {"m": ["alpha/alpha"]}, ScaleOut(keep_hot=keep_hot),
                    clock=clock)
    gate = Admission(routes, AdmissionSettings(), TARGET_S, clock)
    target = routes.catalog["m"][0]
    asked = routes.demand_of("m") if keep_hot == "peak" else routes.forecast_of("m")
    await _fill(gate, target, 2, Priority.interactive)
    waiting = [_start(gate, target, f"user-{n}") for n in range(3)]
    await asyncio.sleep(0)
    assert (asked.in_flight, routes.health_of(target).in_flight) == (5, 2)
    waiting[0].cancel()  # gone while it waited
    await asyncio.gather(waiting[0], return_exceptions=True)
    assert asked.in_flight == 4
    gate.ended(target, HOLDER)  # one answered: its slot to the next, which is still demand
    assert await waiting[1] == "user-1"
    assert (asked.in_flight, routes.health_of(target).in_flight) == (3, 2)
    gate.ended(target, HOLDER)
    assert await waiting[2] == "user-2"
    gate.ended(target, (Priority.interactive, "user-1"))
    gate.ended(target, (Priority.interactive, "user-2"))
    assert (asked.in_flight, routes.health_of(target).in_flight) == (0, 0)


async def test_an_endpoint_that_cannot_scale_out_is_sent_what_its_blocks_serve():
    gate, target, _ = _setup(capacity=2)
    await _fill(gate, target, 2, Priority.interactive)
    third = _start(gate, target, "third")
    await asyncio.sleep(0)
    assert gate.status(target.backend).queued_interactive == 1
    gate.ended(target, HOLDER)
    assert await third == "third"


async def test_through_the_gateway_batch_lines_take_batch_slots_and_a_chat_gets_the_next_one(tmp_path: Path):
    """The wiring: a batch's lines take batch slots of the endpoint (its concurrency: 2) through the real runner, a
    chat that finds them all taken waits and gets the next slot freed before the batch's next line, and
    ``/first/api/status`` tells it all per endpoint."""
    upstream = FakeUpstream(models=["m"])
    port = await upstream.start()
    config = {"clusters": {"alpha": {"backend": "http", "endpoints": [{
        "name": "one", "base_url": f"http://127.0.0.1:{port}/v1", "concurrency": 2, "models": [{"id": "m"}]}]}},
        "auth": {"sources": ["env"]}}
    gateway = build_gateway(parse_config(config, "test"), tmp_path, environ={})
    backend = gateway.catalog.backends[0]
    try:
        upstream.hold()
        store = gateway.batches.store
        lines = b"".join(orjson.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                       "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}})
                         + b"\n" for i in range(4))
        store.path("file-in").write_bytes(lines)
        store.add_file("batch", "in.jsonl", len(lines), 4, "file-in")
        batch = await gateway.batches.create(orjson.dumps({"input_file_id": "file-in", "completion_window": "24h",
                                                           "endpoint": "/v1/chat/completions"}))
        await eventually_async(lambda: upstream.held == 2, "two batch lines at the engine")
        chat = asyncio.create_task(gateway.complete(parse_request(Capability.chat, orjson.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "hello"}]}))))
        await eventually_async(lambda: gateway.admission.status(backend).queued_interactive == 1, "the chat waits")
        assert gateway.batches.batch(batch.id).paused_for_interactive is False  # no miss yet: only waiting
        upstream.release(1)  # a batch line ends: its slot goes to the chat, the batch's next line waits
        await eventually_async(lambda: gateway.admission.status(backend).queued_batch == 1, "the next line waits")
        status = next(e for e in (await gateway.status()).endpoints if e.endpoint == "one").admission
        assert status is not None
        assert (status.capacity, status.in_flight_batch, status.in_flight_interactive, status.queued_batch,
                status.queued_interactive) == (2, 1, 1, 1, 0)
        upstream.release()
        assert (await chat).target.endpoint == "one"
        await eventually_async(lambda: gateway.batches.batch(batch.id).status == "completed", "the batch done")
        assert gateway.batches.batch(batch.id).request_counts.completed == 4
        final = gateway.admission.status(backend)
        assert (final.in_flight_batch, final.in_flight_interactive, final.queued_batch) == (0, 0, 0)
    finally:
        await gateway.close()
        await upstream.stop()


async def test_an_engine_queue_read_from_vllm_metrics_cuts_the_batch_concurrency(tmp_path: Path):
    """``engine_metrics: true``: each status reading also reads the engine's ``/metrics``; requests waiting in its
    own queue (``vllm:num_requests_waiting``) while chats are about halve the batch concurrency."""
    engine = FakeEngine("m", EngineSettings(slots=1, decode_s_per_token=3600.0))  # answers that last the test
    port = await engine.start()
    config = {"clusters": {"alpha": {"backend": "http", "endpoints": [{
        "name": "one", "base_url": f"http://127.0.0.1:{port}/v1", "concurrency": 8, "engine_metrics": True,
        "models": [{"id": "m"}]}]}}, "auth": {"sources": ["env"]}}
    gateway = build_gateway(parse_config(config, "test"), tmp_path, environ={})
    body = orjson.dumps({"model": "m", "stream": True, "messages": [{"role": "system", "content": "be brief"},
                                                                    {"role": "user", "content": "hi"}]})
    streams = []
    try:
        for _ in range(2):
            streams.append(await gateway.stream(parse_request(Capability.chat, body)))
        await eventually_async(lambda: engine.waiting == 1, "one chat waits in the engine's queue")
        admission = next(e for e in (await gateway.status()).endpoints if e.endpoint == "one").admission
        assert admission is not None
        assert (admission.engine_waiting, admission.in_flight_interactive) == (1, 2)
        assert admission.batch_concurrency == 8 // 2  # cut; the headroom alone would leave 8 - 2
    finally:
        for stream in streams:
            stream.close(client_gone=True)
        await gateway.close()
        await engine.stop()
