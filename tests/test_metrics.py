"""Gateway metrics: exact values in one process, and sums over real processes in prometheus_client's multiprocess
mode (in child processes, since this one imported prometheus_client without PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from first_jupyter.gateway.usage import UsageRecord
from first_jupyter.serve.metrics import (
    _MAX_MODELS,
    ENDPOINT_STATES,
    MULTIPROC_ENV,
    REFUSAL_REASONS,
    GatewayMetrics,
    reset_multiprocess_dir,
)

_DEFAULTS = {"ts": 0.0, "request_id": "req", "model": "tiny-chat", "cluster": "local", "endpoint": "engine",
             "capability": "chat", "stream": False, "status": 200, "prompt_tokens": None, "completion_tokens": None,
             "latency_ms": 100.0, "ttft_ms": None, "error": None}


def _record(**fields: object) -> UsageRecord:
    """Fields the metrics do not read and these tests do not name (such as the user) are "" (here and in _WORKER)."""
    fields = {**_DEFAULTS, **fields}
    return UsageRecord(**{name: fields.get(name, "") for name in UsageRecord._fields})


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def _render(metrics: GatewayMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, content_type = metrics.render()
    assert content_type == CONTENT_TYPE_LATEST
    return _samples(body.decode())


def _states(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], cluster: str,
            endpoint: str) -> dict[str, float | None]:
    return {state: _value(samples, "first_endpoint_state", cluster=cluster, endpoint=endpoint, state=state)
            for state in ENDPOINT_STATES}


def test_finished_requests_are_counted_exactly() -> None:
    metrics = GatewayMetrics()
    for record in [
        _record(prompt_tokens=10, completion_tokens=5, latency_ms=200.0, ttft_ms=50.0, stream=True),
        _record(prompt_tokens=7, latency_ms=1500.0),
        _record(status=502, latency_ms=30.0),
        _record(status=499, latency_ms=4000.0, ttft_ms=120.0, stream=True),  # the client left
        _record(model="no-such-model", cluster="", endpoint="", status=404, latency_ms=1.0),
    ]:
        metrics.observe(record)
    got = _render(metrics)

    assert _value(got, "first_requests_total", model="tiny-chat", cluster="local", status="200") == 2
    assert _value(got, "first_requests_total", model="tiny-chat", cluster="local", status="502") == 1
    assert _value(got, "first_requests_total", model="tiny-chat", cluster="local", status="499") == 1
    assert _value(got, "first_request_errors_total", model="tiny-chat", cluster="local", status="502") == 1
    assert _value(got, "first_request_errors_total", model="tiny-chat", cluster="local", status="499") is None
    assert _value(got, "first_request_errors_total", model="tiny-chat", cluster="local", status="200") is None
    assert _value(got, "first_requests_total", model="no-such-model", cluster="", status="404") == 1
    assert _value(got, "first_request_errors_total", model="no-such-model", cluster="", status="404") == 1

    assert _value(got, "first_tokens_total", model="tiny-chat", kind="prompt") == 17
    assert _value(got, "first_tokens_total", model="tiny-chat", kind="completion") == 5

    assert _value(got, "first_request_latency_seconds_count", model="tiny-chat") == 4
    assert _value(got, "first_request_latency_seconds_sum", model="tiny-chat") == pytest.approx(5.73)
    assert _value(got, "first_request_latency_seconds_bucket", model="tiny-chat", le="0.05") == 1
    assert _value(got, "first_request_latency_seconds_bucket", model="tiny-chat", le="0.25") == 2
    assert _value(got, "first_request_latency_seconds_bucket", model="tiny-chat", le="5.0") == 4
    assert _value(got, "first_request_latency_seconds_bucket", model="tiny-chat", le="600.0") == 4
    assert _value(got, "first_time_to_first_token_seconds_count", model="tiny-chat") == 2
    assert _value(got, "first_time_to_first_token_seconds_sum", model="tiny-chat") == pytest.approx(0.17)


def _in_flight(metrics: GatewayMetrics) -> dict[str, float]:
    return {dict(labels)["model"]: value for (name, labels), value in _render(metrics).items()
            if name == "first_requests_in_flight"}


def test_in_flight_goes_up_and_down() -> None:
    metrics = GatewayMetrics()
    for _ in range(3):
        metrics.request_started("tiny-chat")
    metrics.request_started("big-chat")
    metrics.request_ended("tiny-chat")
    assert _in_flight(metrics) == {"tiny-chat": 2, "big-chat": 1}
    metrics.request_ended("tiny-chat")
    metrics.request_ended("tiny-chat")
    metrics.request_ended("big-chat")
    assert _in_flight(metrics) == {"tiny-chat": 0, "big-chat": 0}


def test_models_past_the_cap_share_one_label() -> None:
    """Clients name models freely (a 404 is still counted); the labels they can create are bounded."""
    metrics = GatewayMetrics()
    for i in range(_MAX_MODELS + 44):
        metrics.request_started(f"model-{i}")
    models = _in_flight(metrics)
    assert len(models) == _MAX_MODELS + 1
    assert models["(other)"] == 44


def test_endpoint_state_switches() -> None:
    metrics = GatewayMetrics()
    metrics.endpoint_states([{"cluster": "polaris", "endpoint": "vllm", "state": "starting"},
                             {"cluster": "local", "endpoint": "engine", "state": "something new"}])
    got = _render(metrics)
    assert _states(got, "polaris", "vllm") == {state: float(state == "starting") for state in ENDPOINT_STATES}
    assert _states(got, "local", "engine") == {state: float(state == "unknown") for state in ENDPOINT_STATES}

    metrics.endpoint_states([{"cluster": "polaris", "endpoint": "vllm", "state": "running"}])
    got = _render(metrics)
    assert _states(got, "polaris", "vllm") == {state: float(state == "running") for state in ENDPOINT_STATES}
    assert _states(got, "local", "engine") == {state: float(state == "unknown") for state in ENDPOINT_STATES}


def test_refusals_are_counted_by_reason() -> None:
    metrics = GatewayMetrics()
    metrics.refused("rate_limited")
    metrics.refused("rate_limited")
    metrics.refused("unauthenticated")
    got = _render(metrics)
    assert {reason: _value(got, "first_refused_total", reason=reason) for reason in REFUSAL_REASONS} == {
        "unauthenticated": 1, "forbidden": 0, "rate_limited": 2, "bad_request": 0}
    with pytest.raises(KeyError):
        metrics.refused("bored")


def test_variable_set_after_import_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This process imported prometheus_client without the variable: its values cannot reach the directory."""
    monkeypatch.setenv(MULTIPROC_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="set after prometheus_client was imported"):
        GatewayMetrics()


def test_reset_removes_only_stale_metric_files(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    reset_multiprocess_dir(directory)  # created
    (directory / "counter_123.db").write_bytes(b"old")
    (directory / "gauge_livesum_123.db").write_bytes(b"old")
    (directory / "notes.txt").write_text("not ours")
    reset_multiprocess_dir(directory)
    assert sorted(path.name for path in directory.iterdir()) == ["notes.txt"]


_WORKER = """
import json, os, sys
from first_jupyter.serve.metrics import GatewayMetrics
from first_jupyter.gateway.usage import UsageRecord
plan = json.loads(sys.argv[1])
metrics = GatewayMetrics()
for fields in plan["records"]:
    metrics.observe(UsageRecord(**{name: fields.get(name, "") for name in UsageRecord._fields}))
for _ in range(plan["in_flight"]):
    metrics.request_started("tiny-chat")
metrics.endpoint_states(plan["endpoints"])
metrics.refused("forbidden")
print(os.getpid())
"""

_RENDER = """
import json, sys
from first_jupyter.serve.metrics import GatewayMetrics, process_exited
metrics = GatewayMetrics()
before = metrics.render()[0].decode()
process_exited(int(sys.argv[1]))
print(json.dumps([before, metrics.render()[0].decode()]))
"""


def _run(env: dict[str, str], script: str, arg: object) -> str:
    done = subprocess.run([sys.executable, "-c", script, json.dumps(arg)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _worker(env: dict[str, str], records: list[dict[str, object]], in_flight: int, state: str) -> int:
    plan = {"records": [{**_DEFAULTS, **fields} for fields in records], "in_flight": in_flight,
            "endpoints": [{"cluster": "local", "endpoint": "engine", "state": state}]}
    return int(_run(env, _WORKER, plan))


def test_processes_add_up(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"
    env = {**os.environ, MULTIPROC_ENV: str(directory)}
    reset_multiprocess_dir(directory)
    _worker(env, [{"prompt_tokens": 1000}], 5, "failed")  # a previous run, which must not count
    reset_multiprocess_dir(directory)

    first = _worker(env, [{"prompt_tokens": 10, "completion_tokens": 4, "latency_ms": 200.0, "ttft_ms": 50.0},
                          {"status": 502, "latency_ms": 30.0}], 2, "starting")
    _worker(env, [{"prompt_tokens": 6, "completion_tokens": 3, "latency_ms": 1500.0, "ttft_ms": 80.0},
                  {"status": 499, "latency_ms": 4000.0}], 1, "running")  # the later report: it wins
    before, after = (_samples(text) for text in json.loads(_run(env, _RENDER, first)))

    for got in (before, after):  # counters and histograms keep a dead process's counts
        assert _value(got, "first_requests_total", model="tiny-chat", cluster="local", status="200") == 2
        assert _value(got, "first_requests_total", model="tiny-chat", cluster="local", status="502") == 1
        assert _value(got, "first_requests_total", model="tiny-chat", cluster="local", status="499") == 1
        assert _value(got, "first_request_errors_total", model="tiny-chat", cluster="local", status="502") == 1
        assert _value(got, "first_request_errors_total", model="tiny-chat", cluster="local", status="499") is None
        assert _value(got, "first_tokens_total", model="tiny-chat", kind="prompt") == 16
        assert _value(got, "first_tokens_total", model="tiny-chat", kind="completion") == 7
        assert _value(got, "first_request_latency_seconds_count", model="tiny-chat") == 4
        assert _value(got, "first_request_latency_seconds_sum", model="tiny-chat") == pytest.approx(5.73)
        assert _value(got, "first_request_latency_seconds_bucket", model="tiny-chat", le="0.25") == 2
        assert _value(got, "first_time_to_first_token_seconds_count", model="tiny-chat") == 2
        assert _value(got, "first_time_to_first_token_seconds_sum", model="tiny-chat") == pytest.approx(0.13)
        assert _value(got, "first_refused_total", reason="forbidden") == 2
        assert _value(got, "first_refused_total", reason="bad_request") == 0
        assert _states(got, "local", "engine") == {state: float(state == "running") for state in ENDPOINT_STATES}

    assert _value(before, "first_requests_in_flight", model="tiny-chat") == 3
    assert _value(after, "first_requests_in_flight", model="tiny-chat") == 1  # the first process exited


async def test_admission_is_read_at_each_scrape() -> None:
    """Each endpoint's slots per class and the batch concurrency chosen, as the admission holds them when scraped."""
    from tests.test_admission import CAPACITY, HOLDER, TARGET_S, _setup, _start

    gate, target, _ = _setup()
    metrics = GatewayMetrics()
    metrics.refreshers.append(lambda: metrics.admission(gate.report([target.backend])))
    await _start(gate, target)
    gate.first_token(target, TARGET_S * 2)
    got = _render(metrics)
    where = {"cluster": "alpha", "endpoint": "alpha"}
    assert _value(got, "first_admission_requests", **where, **{"class": "interactive", "state": "in_flight"}) == 1
    assert _value(got, "first_admission_requests", **where, **{"class": "batch", "state": "queued"}) == 0
    assert _value(got, "first_batch_concurrency", **where) == CAPACITY // 2
    gate.ended(target, HOLDER)
    assert _value(_render(metrics), "first_admission_requests", **where,
                  **{"class": "interactive", "state": "in_flight"}) == 0
