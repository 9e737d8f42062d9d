"""Routing across endpoints: the best candidate first, failover before the first byte (never after), and a
circuit breaker that keeps a failing endpoint out for a cooldown."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.fake_upstream import FakeUpstream, serving_in_thread
from first_jupyter.config import ScaleOut, parse_config
from first_jupyter.gateway import router
from first_jupyter.gateway.backends import http as http_backend
from first_jupyter.gateway.core import Gateway
from first_jupyter.gateway.forecast import HOUR_S, Forecast
from first_jupyter.gateway.router import Router, Target
from first_jupyter.protocol import Capability, OpenAIError, parse_request
from first_jupyter.service import build_gateway
from tests.conftest import closed_port
from tests.waiting import GUARD_S, eventually_async

CHAT = {"model": "shared", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(autouse=True)
def _patient_status_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A status reading that gets no answer within its timeout marks the endpoint offline, which these tests read as
    a routing decision: the engines here answer at once, so the guard's time, not the product's 5 s, is their limit
    (a loaded machine may keep an in-process engine from the CPU for a while)."""
    monkeypatch.setattr(http_backend, "STATUS_TIMEOUT", GUARD_S)


@pytest.fixture
def upstreams(request: pytest.FixtureRequest) -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    """Two engines serving the same model; the second answers after ``second_delay`` (a marker), if set."""
    marker = request.node.get_closest_marker("second_delay")
    delay = marker.args[0] if marker else 0.0
    with serving_in_thread(models=["shared"], chunks=4) as first, serving_in_thread(
            models=["shared"], chunks=4, first_byte_delay=delay) as second:
        yield first, second


def _config(first_url: str, second_url: str, **first: Any) -> dict[str, Any]:
    def cluster(name: str, url: str, **extra: Any) -> dict[str, Any]:
        return {"backend": "http", "endpoints": [{"name": name, "base_url": f"{url}/v1", "models": [{"id": "shared"}],
                                                  **extra}]}

    return {"clusters": {"alpha": cluster("one", first_url, **first), "beta": cluster("two", second_url)},
            "auth": {"sources": ["env"]}}


def _gateway(tmp_path: Path, first_url: str, second_url: str, **first: Any) -> Gateway:
    return build_gateway(parse_config(_config(first_url, second_url, **first), "test"), tmp_path, environ={})


def _request(stream: bool = False) -> Any:
    return parse_request(Capability.chat, json.dumps({**CHAT, "stream": stream}).encode())


async def _streamed(gateway: Gateway) -> tuple[Target, bytes, OpenAIError | None]:
    stream = await gateway.stream(_request(stream=True))
    out: list[bytes] = []
    try:
        await stream.relay(lambda chunk: out.append(chunk) or True)
    finally:
        stream.close()
    return stream.target, b"".join(out), stream.error


async def test_an_endpoint_failing_before_its_first_byte_hands_the_request_to_the_next(upstreams, tmp_path):
    first, second = upstreams
    first.fault = "500"
    gateway = _gateway(tmp_path, first.url, second.url)
    try:
        done = await gateway.complete(_request())
        assert (done.target.cluster, done.target.endpoint) == ("beta", "two")
        assert json.loads(done.body)["choices"][0]["message"]["content"]
        target, body, error = await _streamed(gateway)
        assert (target.cluster, error) == ("beta", None)
        assert body.rstrip().endswith(b"data: [DONE]")
        assert (first.requests, second.requests) == (1, 2)  # then beta first: it answered, alpha only failed
        gateway.usage.flush()
        rows = gateway.usage.query("SELECT cluster, status FROM usage ORDER BY ts")
        assert rows == [("beta", 200), ("beta", 200)]  # the record says where it ran
    finally:
        await gateway.close()


async def test_an_unreachable_endpoint_hands_the_request_to_the_next(upstreams, tmp_path):
    _, second = upstreams
    gateway = _gateway(tmp_path, f"http://127.0.0.1:{closed_port()}", second.url)
    try:
        assert (await gateway.complete(_request())).target.cluster == "beta"
    finally:
        await gateway.close()


async def test_a_refusal_that_is_the_requests_own_is_not_tried_elsewhere(upstreams, tmp_path):
    first, second = upstreams
    gateway = _gateway(tmp_path, first.url, second.url, globus_resource_server="rs")  # no sign-in: 401
    try:
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_request())
        assert info.value.status == 401
        assert second.requests == 0
    finally:
        await gateway.close()


async def test_when_every_endpoint_fails_the_error_says_so(upstreams, tmp_path):
    first, second = upstreams
    first.fault = second.fault = "429"
    gateway = _gateway(tmp_path, first.url, second.url)
    try:
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_request())
        assert info.value.status == 429
        assert info.value.message.startswith("Every endpoint serving 'shared' failed (2 tried); the last: "
                                             "cluster 'beta' endpoint 'two'")
    finally:
        await gateway.close()


async def test_a_cluster_that_refuses_the_user_is_left_out_and_the_model_served_elsewhere(upstreams, tmp_path):
    first, second = upstreams
    first.fault = "403"  # e.g. not in the Globus group the cluster allows
    gateway = _gateway(tmp_path, first.url, second.url)
    try:
        for _ in range(3):
            assert (await gateway.complete(_request())).target.cluster == "beta"
        assert first.requests == 1  # asked once: the refusal is remembered, not paid for on every request
        alpha = next(e for e in (await gateway.status()).json_value()["endpoints"] if e["cluster"] == "alpha")
        assert alpha["router"]["allowed"] is False
        assert "not in a group allowed" in alpha["router"]["last_error"]

        second.fault = "500"  # the one cluster left fails: its failure is the answer; the refusal stands
        asked = first.requests  # (the status reading asked for its model list)
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_request())
        assert info.value.status == 500
        assert first.requests == asked

        gateway.router.health[id(gateway.backends[1])].forbidden_until = 0.0
        gateway.router.forbid(gateway.router.catalog["shared"][1], "refused")  # both refuse the user now
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_request())  # nothing it may use: asked anyway, so the refusal says why
        assert info.value.status == 403
        assert "not in a group allowed to use this cluster" in info.value.message
    finally:
        await gateway.close()


async def test_a_stream_that_breaks_after_its_first_byte_is_not_sent_again(upstreams, tmp_path):
    first, second = upstreams
    first.fault = "drop-mid-stream"
    gateway = _gateway(tmp_path, first.url, second.url)
    try:
        target, body, error = await _streamed(gateway)
        assert target.cluster == "alpha"
        assert error is not None
        assert b'"error"' in body
        assert second.requests == 0
    finally:
        await gateway.close()


@pytest.mark.second_delay(0.8)
async def test_the_circuit_opens_after_repeated_failures_and_closes_after_its_cooldown(upstreams, tmp_path):
    """The second engine is slow (known to answer seconds later: not about as good, so it gets no share of the
    load), so the first stays the better bet until its failures open its circuit. (Its 0.8 s is a floor, whatever
    the machine: a slower one only makes it slower.)"""
    first, second = upstreams
    first.fault = "500"
    gateway = _gateway(tmp_path, first.url, second.url)
    gateway.router.health[id(gateway.backends[1])].ttft_s = 3.0
    # the router's clock, moved on by the test: the cooldown passes when the test says, not while requests run
    # (a loaded machine could otherwise see it end before the checks that the circuit is open)
    skipped = [0.0]
    gateway.router.clock = lambda: time.monotonic() + skipped[0]
    try:
        for _ in range(router.FAILURES_TO_OPEN):
            await gateway.complete(_request())
        assert first.requests == router.FAILURES_TO_OPEN
        await gateway.complete(_request())
        assert first.requests == router.FAILURES_TO_OPEN  # kept out: no more time lost on it
        status = (await gateway.status()).json_value()
        alpha = next(e for e in status["endpoints"] if e["cluster"] == "alpha")
        assert alpha["router"]["circuit"] == "open"
        assert "HTTP 500" in alpha["router"]["last_error"]

        first.fault = "none"
        skipped[0] += router.COOLDOWN_S  # the cooldown has passed
        await gateway.status()  # the status reading saw it offline (HTTP 500); now it sees it online again
        first_ms = gateway.router.health[id(gateway.backends[0])].ttft_s
        done = await gateway.complete(_request())  # tried again after the cooldown: it answers, all is forgiven
        assert done.target.cluster == "alpha"
        health = gateway.router.health[id(gateway.backends[0])]
        assert (health.failures, health.open_until, health.last_error) == (0, 0.0, None)
        assert health.ttft_s != first_ms  # its answer time now counts
    finally:
        await gateway.close()


class _Backend:
    kind = "test"
    start_s = 600.0
    capacity = 64
    max_blocks = 1

    def __init__(self, name: str) -> None:
        self.cluster, self.name = name, name

    def supports(self, model_id: str, capability: Capability) -> bool:
        return True


def test_candidates_are_ordered_by_state_then_by_answer_time_and_load():
    a, b, c = _Backend("a"), _Backend("b"), _Backend("c")
    now = [1000.0]
    routes = Router([a, b, c], {"m": ["a/a", "b/b", "c/c"]}, clock=lambda: now[0])  # type: ignore[list-item]
    names = lambda: [t.backend.name for t in routes.candidates("m", Capability.chat)]  # noqa: E731
    assert names() == ["a", "b", "c"]  # nothing known: config order
    routes.observe_state(a, "m", "cold")
    routes.observe_state(b, "m", "queued")
    now[0] += 100.0
    routes.observe_state(b, "m", "starting")  # the job got its nodes: the same start, further along
    assert names() == ["c", "b", "a"]  # hot first, then the start under way over one not begun
    assert routes.wait_of(routes.catalog["m"][1]) == 500.0
    routes.observe_state(a, "m", "hot")
    for target in routes.catalog["m"][:1]:
        for _ in range(3):
            routes.began(target)  # a is busy
    assert names() == ["c", "a", "b"]
    routes.succeeded(routes.catalog["m"][2], 20.0)  # c turns out slow
    assert names()[0] == "a"
    routes.observe_state(b, "m", "offline")
    for _ in range(router.FAILURES_TO_OPEN):
        routes.failed(routes.catalog["m"][0], "boom")
    assert "a" not in names()
    assert names()[-1] == "b"  # offline: last resort


@pytest.mark.parametrize(("fault", "state", "error"), [
    ("500", "offline", "HTTP 500"),  # its GET /models fails too
    ("bad-models", "failed", "'data' is null"),  # GET /models answers {"object": "list", "data": null}
])
async def test_states_are_read_in_the_background_and_an_offline_endpoint_less_often(upstreams, tmp_path, fault,
                                                                                    state, error):
    first, second = upstreams
    first.fault = fault
    gateway = _gateway(tmp_path, first.url, second.url)
    alpha, beta = (gateway.router.health[id(b)] for b in gateway.backends)
    reading = asyncio.ensure_future(gateway.keep_states_fresh(period=0.1))
    try:
        await eventually_async(lambda: alpha.states.get("shared") == "offline")
        assert beta.states["shared"] == "hot"
        endpoints = (await gateway.status()).json_value()["endpoints"]
        assert [e["state"] for e in endpoints] == [state, "online"]  # that endpoint only, with the reason
        assert error in endpoints[0]["error"]
        intervals = gateway.catalog.probe_intervals
        await eventually_async(lambda: intervals.get(id(gateway.backends[0]), 0) >= 0.4)  # backing off
        assert gateway.catalog.probe_intervals[id(gateway.backends[1])] == 0.1
        assert [t.cluster for t in gateway.router.candidates("shared", Capability.chat)] == ["beta", "alpha"]

        listed = (await gateway.models()).json_value()["data"][0]
        assert [(s["cluster"], s["state"]) for s in listed["served_by"]] == [("alpha", "offline"), ("beta", "hot")]
        assert listed["state"] == "hot"  # the best of its endpoints, as last read

        first.fault = "none"
        await eventually_async(lambda: alpha.states.get("shared") == "hot")  # still read: the readings went on
        assert gateway.catalog.probe_intervals[id(gateway.backends[0])] == 0.1  # back to the normal pace
    finally:
        reading.cancel()
        await gateway.close()


def test_hot_endpoints_about_as_good_share_the_load_by_what_each_serves_at_once():
    a, b = _Backend("a"), _Backend("b")
    routes = Router([a, b], {"m": ["a/a", "b/b"]})  # type: ignore[list-item]
    first, second = routes.catalog["m"]
    routes.succeeded(first, 0.1)  # a answers faster: it is the best...
    assert [t.backend.name for t in routes.candidates("m", Capability.chat)] == ["a", "b"]
    routes.began(first)  # ...but it is busier, and b is within a second of it: b takes the next
    assert [t.backend.name for t in routes.candidates("m", Capability.chat)] == ["b", "a"]
    routes.observe_blocks(a, 4)  # four blocks up at a: one request is a smaller share of what it serves
    routes.began(second)
    assert routes.health_of(first).capacity == 4 * a.capacity
    assert [t.backend.name for t in routes.candidates("m", Capability.chat)] == ["a", "b"]
    routes.succeeded(second, 3.0)  # b turns slow: no longer as good, whatever its load
    routes.ended(first)
    routes.began(first)
    routes.began(first)
    assert routes.candidates("m", Capability.chat)[0].backend.name == "a"


def test_idle_hot_endpoints_about_as_good_take_turns_so_each_stays_hot():
    a, b = _Backend("a"), _Backend("b")
    now = [0.0]
    routes = Router([a, b], {"m": ["a/a", "b/b"]}, clock=lambda: now[0])  # type: ignore[list-item]
    routes.succeeded(routes.catalog["m"][0], 0.1)  # a is faster, but both are well within a second
    chosen = []
    for _ in range(4):
        now[0] += 10.0
        target = routes.candidates("m", Capability.chat)[0]
        routes.began(target)
        routes.ended(target)  # each done before the next: no load to tell them apart
        chosen.append(target.backend.name)
    assert chosen == ["a", "b", "a", "b"]
    routes.failed(routes.catalog["m"][1], "HTTP 500")  # one that just failed is not as good
    now[0] += 10.0
    assert routes.candidates("m", Capability.chat)[0].backend.name == "a"
    now[0] += 10.0
    assert routes.candidates("m", Capability.chat)[0].backend.name == "a"


def test_a_start_that_answers_puts_an_endpoint_that_had_failed_back_into_the_turns():
    """An endpoint that failed (an outage) and was started again answers: its failures no longer keep it out of
    the load sharing. Before, only a request's success cleared them, and one it never got again could not."""
    a, b = _Backend("a"), _Backend("b")
    now = [0.0]
    routes = Router([a, b], {"m": ["a/a", "b/b"]}, clock=lambda: now[0])  # type: ignore[list-item]
    second = routes.catalog["m"][1]
    routes.failed(second, "connect timeout")
    routes.observe_state(b, "m", "cold")  # it came back from its outage cold
    whole = routes.start_asked(second)
    now[0] += 600.0
    routes.start_ended(second, 600.0, whole)
    assert routes.health_of(second).failures == 0
    chosen = []
    for _ in range(4):
        now[0] += 10.0
        target = routes.candidates("m", Capability.chat)[0]
        routes.began(target)
        routes.ended(target)
        chosen.append(target.backend.name)
    assert sorted(chosen) == ["a", "a", "b", "b"]


def test_keep_hot_peak_starts_another_endpoint_for_the_peak_seen_within_its_window():
    """``keep_hot: peak``: the most requests the model had in flight within ``peak_window`` decide, not only those
    in flight now, so a model whose bursts come back finds its second endpoint started; a peak older than the
    window no longer counts. ``keep_hot: all`` starts it whatever the load."""
    a, b = _Backend("a"), _Backend("b")
    now = [0.0]
    peak = Router([a, b], {"m": ["a/a", "b/b"]}, ScaleOut(keep_hot="peak", peak_window=3600.0),  # type: ignore[list-item]
                  clock=lambda: now[0])
    hot = peak.catalog["m"][0]
    peak.observe_state(a, "m", "hot")
    peak.observe_state(b, "m", "cold")
    names = lambda routes: [t.backend.name for t in routes.to_start(routes.candidates("m", Capability.chat))]  # noqa: E731
    assert names(peak) == []  # nothing in flight
    burst = math.ceil(router.SCALE_OUT_AT * a.capacity)
    for _ in range(burst):
        peak.began(hot)
    for _ in range(burst):
        peak.ended(hot)
    now[0] += 3000.0
    assert peak.demand_of("m").in_flight == 0
    assert names(peak) == ["b"]  # the burst is over, but within the hour: its peak is what to be ready for
    peak.observe_state(b, "m", "queued")
    assert names(peak) == []  # a start under way: no other
    peak.observe_state(b, "m", "cold")  # (its job was lost)
    now[0] += 601.0
    assert names(peak) == []  # the peak is more than an hour old
    peak.began(hot)
    assert peak.demand_of("m").peak(now[0]) == 1

    everything = Router([a, b], {"m": ["a/a", "b/b"]}, clock=lambda: now[0])  # type: ignore[list-item]
    everything.observe_state(a, "m", "hot")
    everything.observe_state(b, "m", "cold")
    assert names(everything) == ["b"]


def _burst(routes: Router, target: Target, size: int) -> None:
    """``size`` requests in flight at once at ``target``, then all answered."""
    for _ in range(size):
        routes.began(target)
    for _ in range(size):
        routes.ended(target)


def test_the_burst_forecast_takes_a_peak_that_came_back_around_this_time_of_day():
    """``Forecast.burst``: a peak seen in ``hours`` of the hours around now (the last ``BURST_SPAN_H``, and those
    ahead a day earlier) is expected; one seen once is chance; an hour 24 h old gives way to the same hour today."""
    forecast = Forecast(window_s=900.0, day_offset_s=0.0)
    for hour, size in ((9, 200), (10, 150), (11, 120)):  # a morning of bursts, from 9:00
        for _ in range(size):
            forecast.rose(hour * HOUR_S + 60)
        for _ in range(size):
            forecast.fell(hour * HOUR_S + 90)
    assert forecast.burst(12 * HOUR_S, 3) == 120  # the third highest of three hours
    assert forecast.burst(12 * HOUR_S, 2) == 150
    assert forecast.burst(12 * HOUR_S, 4) == 0  # fewer hours had any
    assert forecast.burst(20 * HOUR_S, 1) == 0  # the evening: the morning is more than 8 h ago...
    assert forecast.burst(26 * HOUR_S, 2) == 150  # ...but at 2:00 the next day, 9:00 and 10:00 are 8 h ahead, a
    assert forecast.burst(26 * HOUR_S, 3) == 0  # day earlier (11:00 not yet)
    assert forecast.burst(27 * HOUR_S, 3) == 120
    forecast.rose(34 * HOUR_S + 60)  # 10:00 the next day: one request, the day before's 10:00 given way
    forecast.fell(34 * HOUR_S + 90)
    assert forecast.burst(34 * HOUR_S + 120, 1) == 120  # 11:00 the day before is ahead (9:00 is 25 h ago)
    assert forecast.burst(34 * HOUR_S + 120, 2) == 1
    assert forecast.burst(34 * HOUR_S + 120, 3) == 0


def test_keep_hot_predicted_keeps_another_endpoint_hot_for_a_models_habitual_bursts():
    """``keep_hot: predicted``: bursts of three times an endpoint's capacity in three hours of the morning make two
    endpoints needed (``BURST_TURNS``); a single burst does not; the next morning, before the bursts come back, the
    day before's have the second one started ahead of them."""
    a, b = _Backend("a"), _Backend("b")
    now = [9 * HOUR_S]
    routes = Router([a, b], {"m": ["a/a", "b/b"]}, ScaleOut(keep_hot="predicted"), clock=lambda: now[0],  # type: ignore[list-item]
                    day_offset_s=0.0)
    hot, cold = routes.catalog["m"]
    routes.observe_state(a, "m", "hot")
    routes.observe_state(b, "m", "cold")
    to_start = lambda: routes.to_start(routes.candidates("m", Capability.chat))  # noqa: E731
    size = 2 * router.BURST_TURNS * a.capacity  # two endpoints' worth of a burst
    _burst(routes, hot, size)
    now[0] += 3000.0
    assert to_start() == []  # once: chance
    for _ in range(2):
        now[0] += HOUR_S
        _burst(routes, hot, size)
    assert routes.needed(hot, 0.0) == 2
    assert to_start() == [cold]
    now[0] = 20 * HOUR_S  # the evening: the morning's bursts are more than 8 h ago
    assert routes.needed(hot, 0.0) == 1
    assert to_start() == []
    now[0] = 32 * HOUR_S  # 8:00 the next day: yesterday's bursts are ahead
    assert to_start() == [cold]



def test_keep_hot_predicted_drains_a_burst_through_a_hot_endpoint_it_does_not_need():
    """Requests go only to the endpoints the forecast needs (the others idle out), the best first; but once those
    are loaded (``SCALE_OUT_AT``), a burst is not left queueing at them while another hot one, a little slower
    when idle, gets nothing."""
    a, b = _Backend("a"), _Backend("b")
    routes = Router([a, b], {"m": ["a/a", "b/b"]}, ScaleOut(keep_hot="predicted"), clock=lambda: 1000.0,  # type: ignore[list-item]
                    day_offset_s=0.0)
    fast, slower = routes.catalog["m"]
    for backend in (a, b):
        routes.observe_state(backend, "m", "hot")
    routes.health_of(fast).ttft_s, routes.health_of(slower).ttft_s = 0.2, 0.5  # "a" stays the best when loaded
    sent = []
    for _ in range(a.capacity):
        target = routes.candidates("m", Capability.chat)[0]
        routes.began(target)
        sent.append(target.backend.name)
    loaded = math.ceil(router.SCALE_OUT_AT * a.capacity)
    assert sent[:loaded] == ["a"] * loaded  # one needed: "b" is left to idle out
    assert "b" in sent[loaded:]  # "a" loaded: "b" drains the rest of the burst with it
