"""Cache-aware routing: a request goes, among hot endpoints about as fast as the best, where the longest part of its
opening was last sent (its engine's prefix cache holds it); a loaded or much slower holder is passed over. The
router's unit behaviour on fake backends, then through a gateway over two fake upstreams. ``keep_hot: predicted``'s
forecast and choices on a virtual clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.fake_upstream import FakeUpstream, serving_in_thread
from first_jupyter.config import PrefixRouting, ScaleOut, parse_config
from first_jupyter.gateway import router as router_module
from first_jupyter.gateway.core import Gateway
from first_jupyter.gateway.forecast import HOUR_S, Forecast
from first_jupyter.gateway.router import PREFIX_BLOCK_BYTES, PREFIX_BLOCKS, SCALE_OUT_AT, Router, prefix_of
from first_jupyter.protocol import Capability, parse_request
from first_jupyter.service import build_gateway
from tests.test_router import _Backend as RouterTestBackend

SYSTEM = {"role": "system", "content": "You answer questions about the ALCF queues, briefly."}


def _chat(*contents: str, system: dict[str, str] = SYSTEM) -> dict[str, Any]:
    return {"model": "m", "messages": [system, *({"role": "user", "content": c} for c in contents)]}


class _Backend(RouterTestBackend):
    capacity = 8  # loaded at six in flight


def _router(names: str = "ab", **kwargs: Any) -> tuple[Router, dict[str, _Backend], list[float]]:
    backends = {n: _Backend(n) for n in names}
    now = [1000.0]
    routes = Router(list(backends.values()), {"m": [f"{n}/{n}" for n in names]},  # type: ignore[arg-type]
                    clock=lambda: now[0], **kwargs)
    return routes, backends, now


def _first(routes: Router, body: dict[str, Any]) -> str:
    return routes.candidates("m", Capability.chat, prefix_of("m", body))[0].endpoint


def test_the_opening_is_hashed_in_chained_bounded_blocks():
    one, other = prefix_of("m", _chat("Which queue?")), prefix_of("m", _chat("And the walltime?"))
    assert one is not None
    assert other is not None
    assert one[0] == other[0]
    assert one[1] != other[1]
    later = prefix_of("m", {"model": "m", "messages": [*_chat("Which queue?")["messages"],
                                                       {"role": "assistant", "content": "debug"}]})
    assert later is not None
    assert later[:len(one)] == one
    assert prefix_of("other", _chat("Which queue?")) != one  # another model's cache is another
    long = "x" * (PREFIX_BLOCK_BYTES * 3)
    assert len(prefix_of("m", _chat(long)) or ()) == 1 + 4  # a message past a block is cut: 3 blocks and its end
    assert len(prefix_of("m", _chat(*[long] * 10)) or ()) == PREFIX_BLOCKS  # bounded, whatever the prompt
    assert prefix_of("m", {"model": "m", "prompt": "Once upon"}) == prefix_of("m", {"model": "m", "input": "Once upon"})
    assert prefix_of("m", {"model": "m", "instructions": "Be brief", "input": [{"role": "user", "content": "hi"}]})
    assert prefix_of("m", {"model": "m", "input": {"odd": 1}}) is None


def test_a_shared_prefix_goes_where_it_was_sent_and_the_longest_match_wins():
    routes, _, _ = _router("abc")
    assert _first(routes, _chat("Which queue?")) == "a"  # nothing known: the least loaded, in config order
    routes.candidates("m", Capability.chat)  # no opening: takes turns (b, then c)
    routes.health_of(routes.catalog["m"][0]).last_sent = routes.clock()
    assert _first(routes, _chat("Another question")) == "a"  # the system prompt was sent to "a"
    routes.began(routes.catalog["m"][0])  # "a" busier now, though far from loaded
    conversation = {"model": "m", "messages": [SYSTEM, {"role": "user", "content": "Which queue?"},
                                               {"role": "assistant", "content": "debug"}]}
    prefix = prefix_of("m", conversation)
    assert prefix is not None
    routes._routed(prefix, routes.catalog["m"][2], hit=False)  # its earlier turns went to "c"
    next_turn = {"model": "m", "messages": [*conversation["messages"], {"role": "user", "content": "Walltime?"}]}
    assert _first(routes, next_turn) == "c"  # four blocks held at "c" beat the system prompt's one at "a"
    health = {t.endpoint: routes.health_of(t) for t in routes.catalog["m"]}
    assert (health["a"].prefix_routed, health["a"].prefix_hits) == (2, 1)
    assert (health["c"].prefix_routed, health["c"].prefix_hits) == (2, 1)


def test_a_loaded_or_much_slower_holder_is_passed_over_and_a_spilled_prefix_is_held_by_both():
    routes, _, _ = _router(prefix_routing=PrefixRouting(tolerance=0.5))
    a, b = routes.catalog["m"]
    assert _first(routes, _chat("q0")) == "a"
    for _ in range(int(SCALE_OUT_AT * a.backend.capacity)):
        routes.began(a)  # "a" at 75% of its capacity: loaded, though within the tolerance
    assert _first(routes, _chat("q1")) == "b"  # spilled to the least loaded...
    for _ in range(int(SCALE_OUT_AT * a.backend.capacity)):
        routes.ended(a)
    routes.began(a)
    routes.began(b)
    routes.began(b)
    assert _first(routes, _chat("q2")) == "a"  # ...and held by both now: the lighter one
    routes.health_of(a).ttft_s, routes.health_of(b).ttft_s = 2.0, 0.2
    assert _first(routes, _chat("q3")) == "b"  # "a" is expected later than the tolerance allows
    routes.health_of(a).ttft_s, routes.health_of(b).ttft_s = 0.2, 0.2
    routes.failed(a, "502")
    assert _first(routes, _chat("q4")) == "b"  # a failing holder is no holder


def test_the_remembered_blocks_are_bounded(monkeypatch):
    monkeypatch.setattr(router_module, "PREFIX_MOST", 10)
    routes, _, _ = _router()
    for i in range(20):
        _first(routes, _chat(f"question {i}", system={"role": "system", "content": f"prompt {i}"}))
    assert len(routes._holders) == 10


def test_the_forecast_follows_sustained_load_not_a_burst_and_remembers_the_day_before():
    forecast = Forecast(window_s=900.0, day_offset_s=0.0)
    for i in range(100):  # a burst: 100 requests for ten seconds
        forecast.rose(float(i) / 10)
    for _ in range(100):
        forecast.fell(10.0)
    assert forecast.predicted(60.0, 0.0) < 2
    for _ in range(40):  # a batch: 40 in flight for an hour, from 10:00
        forecast.rose(10 * HOUR_S)
    assert forecast.predicted(10.75 * HOUR_S, 0.0) > 35  # (the router asks at every request)
    for _ in range(40):
        forecast.fell(11 * HOUR_S)
    assert forecast.predicted(12 * HOUR_S, 0.0) < 1  # fallen back
    assert forecast.predicted(33 * HOUR_S + 1, 0.0) < 1  # 9:00 the next day saw nothing the day before...
    assert forecast.predicted(33 * HOUR_S + 1, HOUR_S) > 35  # ...but the hour ahead did: plan for it
    assert forecast.predicted(34 * HOUR_S + 1, 0.0) > 35


def test_keep_hot_predicted_starts_another_endpoint_for_sustained_load_and_lets_the_rest_idle():
    routes, backends, now = _router("abc", scale_out=ScaleOut(keep_hot="predicted", demand_window=60.0),
                                    day_offset_s=0.0)
    a, b, c = routes.catalog["m"]
    for backend in backends.values():
        routes.observe_state(backend, "m", "hot")
    routes.observe_state(backends["c"], "m", "cold")
    assert routes.to_start(routes.candidates("m", Capability.chat)) == []  # no demand: one hot is enough
    for _ in range(3):  # at idle, requests take turns only within what the forecast needs: one endpoint
        target = routes.candidates("m", Capability.chat)[0]
        assert target == a
        routes.began(target)
        routes.ended(target)
        now[0] += 1
    for _ in range(2 * a.backend.capacity):  # sustained: twice one block's capacity in flight
        routes.began(a)
    now[0] += 600.0
    assert routes.needed(a, 0.0) == 3
    assert routes.to_start(routes.candidates("m", Capability.chat)) == [c]  # fewer up than needed: start one
    routes.start_asked(c)
    assert routes.to_start(routes.candidates("m", Capability.chat)) == []  # one start at a time
    assert b in routes.candidates("m", Capability.chat)[:2]


@pytest.fixture
def fast_pair() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with serving_in_thread(models=["shared"]) as first, serving_in_thread(models=["shared"]) as second:
        yield first, second


@pytest.fixture
def slow_and_fast() -> Iterator[tuple[FakeUpstream, FakeUpstream]]:
    with serving_in_thread(models=["shared"], first_byte_delay=0.4) as slow, \
            serving_in_thread(models=["shared"]) as fast:
        yield slow, fast


def _gateway(tmp_path: Path, alpha: FakeUpstream, beta: FakeUpstream) -> Gateway:
    clusters = {name: {"backend": "http", "endpoints": [{"name": "engine", "base_url": f"{up.url}/v1",
                                                         "models": [{"id": "shared"}]}]}
                for name, up in (("alpha", alpha), ("beta", beta))}
    config = {"clusters": clusters, "auth": {"sources": ["env"]},
              "defaults": {"prefix_routing": {"tolerance": 0.1}}}
    return build_gateway(parse_config(config, "test"), tmp_path, environ={})


async def _ask(gateway: Gateway, system: str, question: str) -> str:
    body = {"model": "shared", "messages": [{"role": "system", "content": system},
                                            {"role": "user", "content": question}]}
    done = await gateway.complete(parse_request(Capability.chat, orjson.dumps(body)))
    return done.target.cluster


async def test_requests_sharing_a_system_prompt_go_to_one_endpoint_while_the_others_spread(fast_pair, tmp_path):
    gateway = _gateway(tmp_path, *fast_pair)
    try:
        shared, others = [], []
        for i in range(6):
            shared.append(await _ask(gateway, "You are the ALCF helpdesk.", f"question {i}"))
            others += [await _ask(gateway, f"notebook {i}'s own prompt", "hi"),
                       await _ask(gateway, f"script {i}'s own prompt", "hi")]
        assert len(set(shared)) == 1  # its prefix is cached there
        assert set(others) == {"alpha", "beta"}  # requests with nothing in common take turns
        status = {e.cluster: e.router for e in await gateway.catalog.endpoint_statuses()}
        holder = status[shared[0]]
        assert holder is not None
        assert holder.prefix_hits == 5
        assert sum(s.prefix_routed for s in status.values() if s is not None) == 18
    finally:
        await gateway.close()


async def test_a_shared_prompt_leaves_its_endpoint_once_that_is_much_slower(slow_and_fast, tmp_path):
    gateway = _gateway(tmp_path, *slow_and_fast)
    try:
        assert await _ask(gateway, "You are the ALCF helpdesk.", "first") == "alpha"  # the slow one, not yet known
        for i in range(6):  # other requests take turns and teach the router each one's speed
            await _ask(gateway, f"notebook {i}'s own prompt", "hi")
        assert await _ask(gateway, "You are the ALCF helpdesk.", "second") == "beta"  # alpha: 0.4 s slower
        assert await _ask(gateway, "You are the ALCF helpdesk.", "third") == "beta"  # and now held there
    finally:
        await gateway.close()
