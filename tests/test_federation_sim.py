"""The federation simulation: a quick run's figures are complete and consistent, and the pieces that decide them
(cold starts, outages and failover, the baselines' orders, the client's limit, the trace) behave as documented."""

from __future__ import annotations

import json
import math
from collections import Counter

import pytest

from bench import federation_sim as sim
from bench.federation_sim import Call, ClusterSpec, Scenario
from first_jupyter.gateway.router import EWMA_WEIGHT, FIRST_TTFT_S, SCALE_OUT_AT, START_WEIGHT

MODEL = "m"


@pytest.fixture(autouse=True)
def _starts_succeed(monkeypatch):
    """Hand-built scenarios test one thing each: a start that fails by chance would test another."""
    monkeypatch.setattr(sim, "START_FAILURE", 0.0)


def _cluster(name: str, *, queue_s: float = 600.0) -> ClusterSpec:
    return ClusterSpec(name, nodes=8, busy=0.0, swing=0.0, queue_s=queue_s, max_blocks=1)


def _scenario(times: list[float], where: tuple[str, ...], **kwargs) -> Scenario:
    clusters = kwargs.pop("clusters", tuple(_cluster(c) for c in where))
    calls = tuple(Call(t, MODEL, prefill_s=0.3, generate_s=5.0, prefix=i) for i, t in enumerate(times))  # none shared
    return Scenario(seed=7, clusters=clusters, served={MODEL: where}, calls=calls, measured_from=0.0, **kwargs)


def _served_by(req: sim.Request) -> str:
    assert req.endpoint is not None
    return req.endpoint.name


def _ttft(req: sim.Request) -> float:
    assert req.first_token_at is not None, req.failure
    return req.first_token_at - req.call.at


def test_quick_run_figures_are_complete_and_consistent(tmp_path, monkeypatch):
    monkeypatch.undo()  # the run as shipped, starts that fail included
    out = tmp_path / "figures.json"
    rc = sim.main(["--quick", "--json", str(out)])
    result = json.loads(out.read_text())
    scenario = sim.build_scenario(1, sim.QUICK)
    measured = sum(c.at >= scenario.measured_from for c in scenario.calls)
    assert measured > 1000
    assert set(result["policies"]) == set(sim.POLICIES)
    for name, f in result["policies"].items():
        assert f["requests"] == measured, name  # the same trace for every policy
        assert f["served"] + f["failed"] == f["requests"], name
        assert 0 <= f["served_hot"] <= f["served"] / f["requests"] <= 1, name
        assert 0 < f["ttft_p50_s"] <= f["ttft_p95_s"] <= f["ttft_p99_s"], name
        assert f["ttft_p50_s"] <= f["ttft_mean_s"], name  # a long tail lifts the mean (past p99 where it is long)
        assert f["ttft_p95_with_failed_s"] >= f["ttft_p95_s"], name
        assert f["starts"] > 0, name
        assert f["node_hours"] > 0, name
        assert f["batches"] == sum(b.at >= scenario.measured_from for b in scenario.batches), name
        assert 0 < f["prefix_hit_rate"] <= 1, name
    mine = result["policies"]["router"]
    assert set(result["ratios"]) == set(sim.BASELINES)
    for name, ratio in result["ratios"].items():
        assert ratio["p95"] == pytest.approx(result["policies"][name]["ttft_p95_s"] / mine["ttft_p95_s"])
        assert ratio["mean"] == pytest.approx(result["policies"][name]["ttft_mean_s"] / mine["ttft_mean_s"])
        assert ratio["node_hours"] == pytest.approx(result["policies"][name]["node_hours"] / mine["node_hours"])
        assert ratio["prefix_hit_rate"] == pytest.approx(result["policies"][name]["prefix_hit_rate"]
                                                         / mine["prefix_hit_rate"])
    assert rc == (0 if all(r["p95"] > 1 for r in result["ratios"].values()) else 1)


def test_a_router_with_other_scale_out_settings_is_one_more_row_and_its_node_hours_are_set_against_alcfs(
        tmp_path, capsys):
    """``--scale-out``: the same settings as a listed policy give that policy's figures, under their own label."""
    out = tmp_path / "figures.json"
    sim.main(["--quick", "--json", str(out), "--scale-out", '{"keep_hot": "peak"}',
              "--scale-out", '{"keep_hot": "predicted", "burst_hours": 1}'])
    result = json.loads(out.read_text())
    assert result["policies"]["router_1"] == result["policies"]["router_peak"]
    assert result["labels"]["router_1"] == "this router (keep_hot: peak)"
    assert result["labels"]["router_2"] == "this router (keep_hot: predicted, burst_hours: 1)"
    alcf = result["policies"]["alcf_order"]["node_hours"]
    for name, share in result["node_hours_of_alcf"].items():
        assert share == pytest.approx(result["policies"][name]["node_hours"] / alcf)
    printed = capsys.readouterr().out
    assert "| this router (keep_hot: predicted, burst_hours: 1) |" in printed
    assert f"this router (keep_hot: peak) x{result['node_hours_of_alcf']['router_1']:.2f} at " in printed
    with pytest.raises(SystemExit):
        sim.main(["--quick", "--scale-out", '{"keep_hot": "sometimes"}'])
    assert "is not defaults.scale_out settings: keep_hot: Input should be 'all', 'peak' or 'predicted'" in \
        capsys.readouterr().err


ROUTERS = ("router", "router_peak")
"""The policies that keep a model's other endpoints hot for its bursts (``predicted`` does for lasting demand)."""


@pytest.mark.parametrize("policy", [*ROUTERS, "router_predicted"])
def test_every_request_ends_once_and_the_router_sees_each_try_end(policy):
    """began/ended stay paired through failovers, outages, broken streams and clients that gave up."""
    requests, world = sim.simulate(sim.build_scenario(1, sim.QUICK), policy)
    assert all((r.first_token_at is None) != (r.failure is None) for r in requests)
    assert all(h.in_flight == 0 for h in world.gateway.router.health.values())
    assert all(d.in_flight == 0 for d in world.gateway.router.demand.values())
    assert all(f.in_flight == 0 for f in world.gateway.router.forecasts.values())
    assert all(run.done_at is not None and not run.in_flight for run in world.batches)  # every batch ran out
    assert not world.gateway.sent  # every try answered
    assert not world.gateway.slots  # every slot given back
    assert not world.gateway.queued  # nothing left waiting for one
    assert all(sum(g.in_flight.values()) == 0 and not any(q.length for q in g.queues.values())
               for g in world.gateway.admission._gates.values())
    assert not world.gateway.starting  # every start answered
    assert world.clock.t > requests[-1].call.at + sim.MAX_WAIT_S  # ran until the last one could end
    assert all(c.held == 0 for c in world.clusters.values())  # every block given back


def test_each_backends_capacity_is_one_blocks_and_the_routers_follows_the_blocks_read():
    """A backend has ``SLOTS`` (the config's ``concurrency``, per block); each reading tells the router the blocks
    up (the status's managers), so its capacity is ``SLOTS`` per block up, one block's when none is."""
    cluster = ClusterSpec("a", nodes=8, busy=0.0, swing=0.0, queue_s=600.0, max_blocks=2)
    world = sim.World(_scenario([0.0] + [1200.0 + i / 100 for i in range(100)], ("a",), clusters=(cluster,)),
                      "router")
    gateway = world.gateway
    assert isinstance(gateway, sim.RouterGateway)
    (endpoint, backend), = gateway.backends.items()
    assert backend.capacity == sim.SLOTS
    health = gateway.router.health_of_backend(backend)
    seen: list[tuple[int, int]] = []
    reading = gateway.reading

    def read() -> None:
        reading()
        seen.append((len(endpoint.blocks), health.capacity))

    gateway.reading = read  # type: ignore[method-assign]
    world.run()
    assert all(capacity == sim.SLOTS * max(blocks, 1) for blocks, capacity in seen)
    assert {blocks for blocks, _ in seen} == {0, 1, 2}  # cold, then one block, then scaled out by the burst


def test_the_router_learns_a_start_from_the_start_and_answer_times_from_hot_sends_only():
    """The request that waited for the start teaches the start's length, not an answer time (``succeeded`` gets
    None); the next, sent hot, teaches its time to first token from when it was sent."""
    late = sim.SCHEDULE_S[1] + sim.LOAD_S[1] + 10
    requests, world = sim.simulate(_scenario([0.0, late], ("a",)), "router")
    cold, hot = requests
    router = world.gateway.router
    health = router.health_of(router.catalog[MODEL][0])
    start = _ttft(cold) - 0.3  # the first token came the prefill after the block loaded
    assert health.start_s == pytest.approx(sim.PRIOR_START_S + START_WEIGHT * (start - sim.PRIOR_START_S))
    assert _ttft(hot) == pytest.approx(0.3)  # an idle block: the prefill alone
    assert health.ttft_s == pytest.approx(FIRST_TTFT_S + EWMA_WEIGHT * (0.3 - FIRST_TTFT_S))


def _bursts(first: float, first_size: int, second: float = math.inf, second_size: int = 0) -> list[float]:
    """A request that starts "a", then two bursts, each within a second."""
    return [0.0] + [first + i / first_size for i in range(first_size)] + [
        second + i / second_size for i in range(second_size)]


SECOND_BURST = 1200.0 + sim.SCHEDULE_S[1] + sim.LOAD_S[1] + 60
"""After a start asked at the first burst (at 1200 s) answered, before the endpoint released its idle block."""


def _starts_asked(world: sim.World) -> list[tuple[float, str, str]]:
    """Each start the router's gateway asks, as it asks it: when, where, and the state it knew there."""
    gateway = world.gateway
    assert isinstance(gateway, sim.RouterGateway)
    starts: list[tuple[float, str, str]] = []
    asked = gateway.router.start_asked

    def start_asked(target):
        starts.append((world.clock.t, target.cluster, gateway.router.state_of(target)))
        return asked(target)

    gateway.router.start_asked = start_asked  # type: ignore[method-assign]
    return starts


def test_keep_hot_all_starts_the_models_other_endpoint_once_the_first_answers():
    """The default: the request after the first start answered starts "b", before any load asks for it, so the
    first burst finds both hot and queues nowhere."""
    late = sim.SCHEDULE_S[1] + sim.LOAD_S[1] + 10
    size = 60
    world = sim.World(_scenario([0.0, late] + [2 * late + 600 + i / size for i in range(size)], ("a", "b")),
                      "router")
    starts = _starts_asked(world)
    requests = world.run()
    assert [(c, state) for _, c, state in starts] == [("a", "cold"), ("b", "cold")]
    assert starts[1][0] == late  # asked by the second request, served hot at "a"
    assert _served_by(requests[1]) == f"a/{MODEL}"
    burst = requests[2:]
    where = Counter(_served_by(r) for r in burst)
    assert where[f"a/{MODEL}"] >= size // 4
    assert where[f"b/{MODEL}"] >= size // 4
    assert max(_ttft(r) for r in burst) < 1.0  # each engine within its slots


def test_keep_hot_peak_starts_a_second_endpoint_when_the_hot_one_is_loaded():
    size = 60
    world = sim.World(_scenario(_bursts(1200.0, size), ("a", "b")), "router_peak")
    gateway = world.gateway
    assert isinstance(gateway, sim.RouterGateway)
    starts = _starts_asked(world)
    requests = world.run()
    warmup, burst = requests[0], requests[1:]
    assert _served_by(warmup) == f"a/{MODEL}"
    assert [(c, state) for _, c, state in starts] == [("a", "cold"), ("b", "cold")]
    loaded_at = burst[math.ceil(SCALE_OUT_AT * sim.SLOTS)].call.at  # "a" had 3/4 of its capacity in flight
    assert starts[1][0] == loaded_at
    assert all(_served_by(r) == f"a/{MODEL}" for r in burst)  # nobody waited for "b": it was started ahead
    assert max(_ttft(r) for r in burst) >= 5.0  # the burst queued for "a"'s slots meanwhile
    assert world.starts == 2
    assert world.endpoints["b", MODEL].state() == "cold"  # "b" came up, idled and was released
    router = gateway.router
    assert router.health_of(router.catalog[MODEL][1]).start_s != sim.PRIOR_START_S  # its start was learned


@pytest.mark.parametrize("policy", ROUTERS)
def test_the_load_term_spreads_a_burst_across_two_hot_endpoints(policy):
    """A first burst, within "a"'s slots (no request queues), has "b" started ahead of need (at its first request
    with ``keep_hot: all``, once it loads "a" past ``SCALE_OUT_AT`` with ``peak``); the next burst, more than one
    engine's slots, is shared: no request waits for a slot."""
    size = 60
    first_size = math.ceil(SCALE_OUT_AT * sim.SLOTS) + 2
    assert first_size <= sim.SLOTS
    requests, world = sim.simulate(_scenario(_bursts(1200.0, first_size, SECOND_BURST, size), ("a", "b")), policy)
    first, burst = requests[1:1 + first_size], requests[1 + first_size:]
    assert all(_served_by(r) == f"a/{MODEL}" for r in first)
    where = Counter(_served_by(r) for r in burst)
    assert where[f"a/{MODEL}"] >= size // 4
    assert where[f"b/{MODEL}"] >= size // 4
    assert all(r.hot_at_send for r in burst)
    assert max(_ttft(r) for r in burst) < 1.0  # each engine within its slots
    assert world.starts == 2  # no start more


@pytest.mark.parametrize("policy", ROUTERS)
def test_a_burst_that_queued_does_not_keep_the_next_one_off_its_endpoint(policy):
    """Requests sent into a loaded engine teach no answer time (``succeeded`` gets None): the queue the first
    burst met at "a" stays the load term's, so "a" is not taken for slow and the next burst is shared."""
    size = 60
    requests, world = sim.simulate(_scenario(_bursts(1200.0, size, SECOND_BURST, size), ("a", "b")), policy)
    first, burst = requests[1:1 + size], requests[1 + size:]
    assert max(_ttft(r) for r in first) >= 5.0  # the first burst queued at "a" while "b" started
    router = world.gateway.router
    assert router.health_of(router.catalog[MODEL][0]).ttft_s < 1.0  # what "a" answers in, not its queue
    where = Counter(_served_by(r) for r in burst)
    assert where[f"a/{MODEL}"] >= size // 4
    assert where[f"b/{MODEL}"] >= size // 4


def test_an_endpoint_back_from_an_outage_is_started_again_and_takes_its_turns():
    """``keep_hot: all`` starts "a" again once it is back (cold) from its outage, and once that start answered "a"
    shares the load with "b" again, though the request that met its outage failed there."""
    down_at = 1501.0  # just after the reading at 1500 s, which found "a" hot
    back = down_at + 600
    steady = [back + 60 + 60 * i for i in range(60)]
    scenario = _scenario([0.0, down_at + 1, *steady], ("a", "b"), outages={("a", MODEL): ((down_at, back),)})
    world = sim.World(scenario, "router")
    starts = _starts_asked(world)
    requests = world.run()
    assert requests[1].failovers == 1  # it met the outage at "a"
    assert [(c, state) for _, c, state in starts][-1] == ("a", "cold")  # started again after the outage
    settled = starts[-1][0] + sim.SCHEDULE_S[1] + sim.LOAD_S[1]
    late = [r for r in requests if r.call.at > settled]
    assert len(late) >= 10
    where = Counter(_served_by(r) for r in late)
    assert where[f"a/{MODEL}"] >= len(late) // 3
    assert where[f"b/{MODEL}"] >= len(late) // 3


@pytest.mark.parametrize("policy", sim.POLICIES)
def test_a_cold_endpoint_first_waits_a_start_then_answers_hot(policy):
    first_token_late = sim.SCHEDULE_S[1] + sim.LOAD_S[1] + 10
    requests, world = sim.simulate(_scenario([0.0, first_token_late], ("a",)), policy)
    cold, hot = requests
    assert sim.SCHEDULE_S[0] + sim.LOAD_S[0] <= _ttft(cold) <= first_token_late  # >= 10 min: through a free node
    assert not cold.hot_at_send
    assert _ttft(hot) < 1.0
    assert hot.hot_at_send
    assert world.starts == 1
    assert world.node_seconds >= sim.IDLE_S  # the block stayed up idle before it was released


def test_a_start_stuck_in_a_busy_queue_ends_at_the_clients_limit():
    scenario = _scenario([0.0], ("a",), clusters=(_cluster("a", queue_s=1e9),), busy={"a": (1.0,)})
    requests, world = sim.simulate(scenario, "router")
    assert requests[0].failure == "no first token in time"
    assert world.clock.t >= sim.MAX_WAIT_S
    assert all(h.in_flight == 0 for h in world.gateway.router.health.values())


def test_the_router_fails_over_from_a_down_endpoint_it_still_believes_hot():
    down_at = 1501.0  # just after the reading at 1500 s, which found "a" hot
    requests, world = sim.simulate(_scenario([0.0, down_at + 1, down_at + 60], ("a", "b"),
                                             outages={("a", MODEL): ((down_at, down_at + 600),)}), "router")
    warmup, blind, informed = requests
    assert _served_by(warmup) == f"a/{MODEL}"
    assert [e.name for e in blind.plan] == [f"a/{MODEL}", f"b/{MODEL}"]
    assert blind.failovers == 1
    assert _served_by(blind) == f"b/{MODEL}"
    assert _ttft(blind) >= sim.CONNECT_TIMEOUT_S + sim.LOAD_S[0]  # the timeout, then a start at "b"
    router = world.gateway.router
    health = router.health_of(router.catalog[MODEL][0])
    assert health.last_error == "connect timeout"
    assert informed.plan[0].name == f"b/{MODEL}"  # the next reading said "a" is offline
    assert informed.failovers == 0


def test_an_outage_fails_the_requests_waiting_there_over_to_the_next():
    requests, _ = sim.simulate(_scenario([0.0], ("a", "b"), outages={("a", MODEL): ((100.0, 200.0),)}),
                               "alcf_order")
    req = requests[0]
    assert req.failovers == 1
    assert _served_by(req) == f"b/{MODEL}"
    assert _ttft(req) >= 100 + sim.LOAD_S[0]  # waited at "a" until it went down, then a start at "b"


def test_round_robin_rotates_whatever_the_state():
    requests, _ = sim.simulate(_scenario([0.0, 1.0, 2.0, 3.0, 4.0], ("a", "b", "c")), "round_robin")
    assert [r.plan[0].cluster.spec.name for r in requests] == ["a", "b", "c", "a", "b"]
    assert [[e.cluster.spec.name for e in r.plan] for r in requests[:2]] == [["a", "b", "c"], ["b", "c", "a"]]
    assert all(r.endpoint is r.plan[0] for r in requests)  # each waited for its own cold start


def test_alcf_order_ranks_running_queued_free_online_offline():
    where = ("down", "busy", "free", "queued", "hot")
    world = sim.World(_scenario([], where), "alcf_order")
    gateway = world.gateway
    assert isinstance(gateway, sim.AlcfGateway)
    endpoints = {ep.cluster.spec.name: ep for ep in world.served[MODEL]}
    gateway.states = {endpoints["down"]: "offline", endpoints["busy"]: "cold", endpoints["free"]: "cold",
                      endpoints["queued"]: "queued", endpoints["hot"]: "hot"}
    gateway.free = {"busy": False, "free": True}
    assert [e.cluster.spec.name for e in gateway.order(MODEL)] == ["hot", "queued", "free", "busy", "down"]
    gateway.states[endpoints["hot"]] = "starting"
    assert [e.cluster.spec.name for e in gateway.order(MODEL)][:2] == ["queued", "hot"]  # config order in a rank


def test_the_trace_is_diurnal_bursty_and_the_same_for_a_seed():
    scenario = sim.build_scenario(1, sim.FULL)
    assert scenario == sim.build_scenario(1, sim.FULL)
    assert scenario.calls != sim.build_scenario(2, sim.FULL).calls

    def between(first_hour: float, last_hour: float) -> int:  # hours of the measured day, which starts at 0:00
        start, end = (scenario.measured_from + h * sim.HOUR_S for h in (first_hour, last_hour))
        return sum(start <= c.at < end for c in scenario.calls)

    assert between(12, 17) > 3 * between(0, 5)
    busiest = Counter((c.model, math.floor(c.at / sim.BURST_SPREAD_S)) for c in scenario.calls).most_common(1)
    assert busiest[0][1] >= sim.BURST_SIZE[0] // 2  # a burst: many requests to one model within seconds
    assert len({c.model for c in scenario.calls}) == sim.MODELS
    assert all(2 <= len(w) <= 3 for w in scenario.served.values())


def _batch(at: float, lines: int, prefix: int = -1) -> sim.BatchJob:
    return sim.BatchJob(at, MODEL, tuple(Call(at, MODEL, prefill_s=0.3, generate_s=5.0, prefix=prefix, batch=0)
                                         for _ in range(lines)))


def test_a_batch_keeps_the_models_capacity_in_flight_and_ends_when_its_last_line_does():
    """The runner's window is the model's capacity as the gateway knows it: ``SLOTS`` per block up (one block's
    where none is), so its lines never wait at the engine; the batch is done when its last line ends."""
    lines = 3 * sim.SLOTS
    scenario = _scenario([], ("a",), batches=(_batch(0.0, lines),))
    world = sim.World(scenario, "alcf_order")
    seen: list[int] = []
    pump = world.batches[0].pump

    def watched() -> None:
        pump()
        seen.append(world.batches[0].in_flight)

    world.batches[0].pump = watched  # type: ignore[method-assign]
    world.run()
    run = world.batches[0]
    assert max(seen) == sim.SLOTS  # one block: one block's slots at a time
    assert all(line.first_token_at is not None for line in run.lines)
    assert run.done_at == max(line.ended_at for line in run.lines if line.ended_at is not None)
    assert sum(line.prefix_hit for line in run.lines) == lines - 1  # one system prompt: cached after the first


def test_this_routers_gateway_keeps_a_slot_from_a_batch_for_the_chats_it_has_seen():
    """Admission as the gateway runs it: a chat waits for the first slot a batch's line frees (every one was the
    batch's), and from then on the batch leaves one free, so the next chat has a slot at once."""
    scenario = _scenario([1200.0, 1210.0], ("a",), batches=(_batch(0.0, 60 * sim.SLOTS),))
    requests, world = sim.simulate(scenario, "router")
    first, second = requests
    assert world.batches[0].done_at is not None
    assert world.batches[0].done_at > second.call.at  # beside the batch
    busiest = 0.3 * (1 + (sim.SLOTS - 1) / sim.SLOTS)  # a prefill with every other slot in use
    assert _ttft(first) > 1.01 * busiest  # it waited for a slot
    assert _ttft(second) == pytest.approx(busiest)  # it did not
    requests, _ = sim.simulate(scenario, "alcf_order")  # without admission the batch refills every freed slot
    assert _ttft(requests[1]) > 1.01 * busiest


def test_a_blocks_prefix_cache_makes_a_repeated_prompt_cheaper_and_forgets_the_least_recent():
    block = sim.Block(active=1)
    call = Call(0.0, MODEL, prefill_s=1.0, generate_s=1.0, prefix=1)
    assert block.prefill_s(call) == pytest.approx(1.0)
    assert block.prefill_s(call) == pytest.approx(1 - sim.PREFIX_SAVES)
    for other in range(2, sim.BLOCK_PREFIXES + 2):
        block.prefill_s(Call(0.0, MODEL, prefill_s=1.0, generate_s=1.0, prefix=other))
    assert block.prefill_s(call) == pytest.approx(1.0)  # evicted by as many others as the cache holds


def test_the_router_sends_a_shared_prompt_to_the_endpoint_that_cached_it():
    """Two hot endpoints: requests with one system prompt go where the first went (its cache holds it) while it is
    not loaded; round robin halves their hits."""
    late = sim.SCHEDULE_S[1] + sim.LOAD_S[1] + 60
    warm = [Call(0.0, MODEL, 0.3, 5.0, prefix=100), Call(late, MODEL, 0.3, 5.0, prefix=101)]
    shared = [Call(2 * late + 60 * i, MODEL, 0.3, 5.0, prefix=7) for i in range(20)]
    scenario = Scenario(seed=7, clusters=(_cluster("a"), _cluster("b")), served={MODEL: ("a", "b")},
                        calls=(*warm, *shared), measured_from=2 * late)
    hits = {}
    for policy in ("router", "round_robin"):
        requests, _ = sim.simulate(scenario, policy)
        assert all(r.first_token_at is not None for r in requests)
        hits[policy] = sum(r.prefix_hit for r in requests[2:])
        if policy == "router":
            assert len({_served_by(r) for r in requests[2:]}) == 1
    assert hits["router"] == len(shared) - 1
    assert hits["round_robin"] <= len(shared) - 2
