"""The benches: the overhead bench's targets judge what they say, and a tiny run of each goes end to end (figures
not judged, but for what must hold on any machine: the replica bench loses and doubles no batch line)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from bench import batch, mixed_load, overhead, replicas
from bench.overhead import Settings, Tally, plain_row, stream_figures, targets

SETTINGS = Settings(requests=100, streams=4, rounds=1, chunks=4, pace=0.0, service=0.02)


def _tally(seconds: float, cpu_ms: float, count: int = 100, events: int = 0) -> Tally:
    samples = [overhead.Sample(seconds, events, True) for _ in range(count)]
    return Tally(samples, wall_s=count * seconds / 32, cpu_s={"server": cpu_ms * count / 1000, "upstream": 0.0})


def _figures(*, service_added_ms: float, saturated_req_per_s: float) -> dict[str, Any]:
    """Figures of a run where everything passes but the two c=32 rows, which the caller sets."""
    low = plain_row({"direct": _tally(0.001, 0.0), "gateway": _tally(0.0012, 0.2)})
    top = plain_row({"direct": _tally(0.005, 0.0), "gateway": _tally(0.008, 0.2)})
    top["gateway"]["req_per_s"] = saturated_req_per_s
    service = plain_row({"direct": _tally(0.025, 0.0), "gateway": _tally(0.025 + service_added_ms / 1000, 0.2)})
    stream = {side: stream_figures(_tally(0.001, 0.1, count=4, events=SETTINGS.events_per_stream))
              for side in ("direct", "gateway")}
    responses = {side: stream_figures(_tally(0.001, 0.1, count=4, events=SETTINGS.events_per_response))
                 for side in ("direct", "gateway")}
    return {"plain": {"1": low, "32": top}, "plain_service": {"32": service},
            "stream": {"1": stream, "32": stream}, "responses_stream": {"32": responses}}


def _verdicts(figures: dict[str, Any]) -> dict[str, bool]:
    return {t["name"]: t["pass"] for t in targets(figures, SETTINGS)}


def test_every_target_passes_on_figures_within_the_limits():
    assert all(_verdicts(_figures(service_added_ms=2.0, saturated_req_per_s=3000)).values())


def test_added_p99_against_the_engine_like_upstream_is_held_to_5_ms():
    verdicts = _verdicts(_figures(service_added_ms=6.0, saturated_req_per_s=3000))
    assert [name for name, ok in verdicts.items() if not ok] == ["added latency p99, c=32, 20 ms upstream"]


def test_a_saturated_gateway_must_sustain_what_the_engine_like_loop_asks():
    """32 requests in flight against a 20 ms engine ask 1,600 req/s: a gateway slower than that fails."""
    verdicts = _verdicts(_figures(service_added_ms=2.0, saturated_req_per_s=1500))
    assert [name for name, ok in verdicts.items() if not ok] == ["gateway req/s, c=32, zero-latency (saturated)"]


@pytest.mark.timeout(600)  # only a guard against a hang: the run takes ~25 s here, and a machine may be 10x slower
def test_a_tiny_run_measures_every_scenario_and_stops_its_processes(tmp_path: Path):
    out = tmp_path / "figures.json"
    status = overhead.main(["--requests", "64", "--streams", "4", "--rounds", "2", "--chunks", "4", "--json",
                            str(out)])
    figures = json.loads(out.read_text())
    assert status == (0 if all(t["pass"] for t in figures["targets"]) else 1)
    assert {t["name"] for t in figures["targets"]} == {t["name"] for t in targets(figures, SETTINGS)}
    for level in ("1", "32"):
        assert set(figures["plain"][level]) >= {"direct", "gateway", "jupyter", "added"}
        assert figures["stream"][level]["gateway"]["complete"] == figures["stream"][level]["gateway"]["streams"]
    responses = figures["responses_stream"]["32"]["gateway"]
    assert responses["complete"] == responses["streams"] > 0
    assert figures["plain_service"]["32"]["gateway"]["requests"] >= 64


def test_a_tiny_batch_bench_runs_both_ways_and_its_figures_add_up(tmp_path: Path):
    out = tmp_path / "batch.json"
    rc = batch.main(["--lines", "600", "--small", "200", "--concurrency", "8", "--json", str(out)])
    figures = json.loads(out.read_text())
    assert (figures["batch"]["lines"], figures["small_batch"]["lines"]) == (600, 200)
    assert figures["direct_requests_per_s"] > 0
    assert figures["batch"]["requests_per_s"] == pytest.approx(600 / figures["batch"]["seconds"])
    assert figures["ratio"] == pytest.approx(figures["batch"]["requests_per_s"] / figures["direct_requests_per_s"])
    assert figures["rss_growth_mb"] == pytest.approx(figures["batch"]["peak_rss_mb"] -
                                                      figures["small_batch"]["peak_rss_mb"])
    assert figures["small_batch"]["peak_rss_mb"] > 50  # a Jupyter server's, read from the kernel
    assert rc == (0 if figures["ratio"] >= batch.MIN_RATIO and figures["rss_growth_mb"] < batch.MAX_RSS_GROWTH_MB
                  else 1)


def test_a_tiny_mixed_load_run_goes_through_every_phase_and_its_verdict_is_its_goals(tmp_path: Path):
    """The mixed-load bench on virtual time (``--quick``): every phase measured from one run, each figure from
    requests that went through the gateway to the fake engines, and the exit status the goals' verdict."""
    out = tmp_path / "mixed.json"
    rc = mixed_load.main(["--quick", "--json", str(out)])
    written = json.loads(out.read_text())
    figures, settings = written["figures"], written["settings"]
    assert figures["no_batch"]["n"] > 0
    assert figures["with_batch"]["n"] > 0
    assert figures["single_unloaded"]["n"] == figures["single_during_burst"]["n"] == settings["singles"]
    assert figures["batch_alone"]["lines_per_s"] > 0
    assert figures["with_batch"]["batch_lines_per_s"] > 0
    assert 0 < figures["no_batch"]["prefix_hit_rate"] <= 1
    assert set(figures["affinity"]) == {"default", "affinity_off"}
    assert [a["capacity"] for a in figures["batch_admission"]] == [settings["slots"]] * settings["engines"]
    assert written["goals"] == mixed_load.goals(figures)
    assert rc == (0 if all(g["pass"] for g in written["goals"]) else 1)


def _mixed(*, p95_ms: float, lines_per_s: float, burst_p95_ms: float) -> dict[str, Any]:
    """Figures of a mixed-load run: 100 ms p95 and 100 lines/s without interference, the rest as given."""
    return {"no_batch": {"p50_ms": 80.0, "p95_ms": 100.0}, "batch_alone": {"lines_per_s": 100.0},
            "with_batch": {"p50_ms": 80.0, "p95_ms": p95_ms, "batch_lines_per_s": lines_per_s},
            "single_unloaded": {"p50_ms": 100.0}, "single_during_burst": {"p95_ms": burst_p95_ms}}


def test_the_mixed_load_goals_judge_what_they_say():
    verdicts = lambda figures: [g["pass"] for g in mixed_load.goals(figures)]  # noqa: E731
    assert verdicts(_mixed(p95_ms=125.0, lines_per_s=80.0, burst_p95_ms=150.0)) == [True, True, True]
    assert verdicts(_mixed(p95_ms=126.0, lines_per_s=80.0, burst_p95_ms=150.0)) == [False, True, True]
    assert verdicts(_mixed(p95_ms=100.0, lines_per_s=79.0, burst_p95_ms=150.0)) == [True, False, True]
    assert verdicts(_mixed(p95_ms=100.0, lines_per_s=100.0, burst_p95_ms=151.0)) == [True, True, False]


@pytest.mark.timeout(600)  # only a guard against a hang: the quick run takes about a minute here
def test_a_quick_replica_bench_kills_a_replica_and_loses_or_doubles_no_batch_line(capsys: pytest.CaptureFixture[str]):
    """Two replicas, Redis, PostgreSQL and nginx for real, a handful of streams and a 10-line batch across the kill:
    the printed figures parse, the killed replica's streams (and only they) fail, the batch is whole."""
    rc = replicas.main(["--quick"])
    out = capsys.readouterr().out
    figures = {m["name"]: m["value"] for m in re.finditer(r"^(?P<name>[^:\n]+): (?P<value>.*)$", out, re.MULTILINE)}
    assert figures["batch lines lost"] == "0"
    assert figures["batch lines doubled"] == "0"
    streams = replicas.QUICK.streams
    open_at_kill = re.fullmatch(r"(\d+) of (\d+) \((\d+) on the killed replica, (\d+) on the survivor\)",
                                figures["streams open at the kill"])
    assert open_at_kill is not None
    opened, total, on_killed, on_survivor = map(int, open_at_kill.groups())
    assert (opened, total, on_killed + on_survivor) == (streams, streams, streams)
    assert on_killed > 0
    assert figures["streams completed on the survivor"] == f"{on_survivor} of {on_survivor}"
    assert figures["streams failed"] == f"{on_killed} ({on_killed} on the killed replica, 0 on the survivor)"
    assert figures["streams after the kill"] == f"{streams // 2} of {streams // 2} completed"
    for phase in ("before", "after"):
        assert re.fullmatch(r"p50 \d+\.\d ms, p99 \d+\.\d ms", figures[f"time to first token {phase} the kill"])
    for backend in ("Redis round trips per request", "PostgreSQL statements per request"):
        assert re.match(r"-?\d+\.\d\d \(", figures[backend])
    assert float(figures["Redis round trips per request"].split()[0]) > 0  # the quota buckets are in Redis
    assert out.rstrip().endswith("PASS")
    assert rc == 0
