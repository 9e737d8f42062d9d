"""Cold starts through the gateway: a model nothing hot serves is started where it is best served, and the request
either waits (a stream tells its progress in SSE comments) or is answered 503 with Retry-After; models are started
ahead of need on request (warm) and ahead of a burst (scale-out); a conversation stays where its last turn ran.

The engines are fake upstreams whose answers wait (held at the fake's gate until the test lets them go, or late
by far longer than any bound the test sets), standing in for the wait; the endpoints' states are set as a status
reading would set them. The real starts (Globus Compute blocks starting engines) are in
``test_federation``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.fake_upstream import FakeUpstream, serving_in_thread
from first_jupyter.config import parse_config
from first_jupyter.gateway.core import Gateway
from first_jupyter.gateway.router import Target
from first_jupyter.protocol import Capability, OpenAIError, parse_request
from first_jupyter.service import build_gateway
from tests.conftest import closed_port, gate
from tests.waiting import GUARD_S

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def held() -> Iterator[FakeUpstream]:
    """An engine that answers no request until the test opens its gate (its model list answers at once)."""
    with serving_in_thread(models=["shared"], chunks=3) as upstream:
        gate(upstream, hold=True)
        yield upstream


@pytest.fixture
def stalled() -> Iterator[FakeUpstream]:
    """An engine whose every answer, its model list (the start) included, would begin only after a minute: a start
    that outlasts any wait the test sets (its stop aborts what is still waiting)."""
    with serving_in_thread(models=["shared"], chunks=3, first_byte_delay=60.0) as upstream:
        yield upstream


@pytest.fixture
def quick() -> Iterator[FakeUpstream]:
    with serving_in_thread(models=["shared"], chunks=3) as upstream:
        yield upstream


def _gateway(tmp_path: Path, urls: dict[str, str], concurrency: int = 64, keep_hot: str = "all",
             **cold_start: Any) -> Gateway:
    clusters = {name: {"backend": "http", "endpoints": [{"name": "engine", "base_url": f"{url}/v1",
                                                         "concurrency": concurrency, "models": [{"id": "shared"}]}]}
                for name, url in urls.items()}
    config = {"clusters": clusters, "auth": {"sources": ["env"]},
              "defaults": {"cold_start": {"progress_every": 0.2, **cold_start}, "scale_out": {"keep_hot": keep_hot}}}
    return build_gateway(parse_config(config, "test"), tmp_path, environ={})


def _target(gateway: Gateway, cluster: str) -> Target:
    return next(t for t in gateway.router.catalog["shared"] if t.cluster == cluster)


def _request(stream: bool = False, messages: list[dict[str, str]] | None = None) -> Any:
    body = {"model": "shared", "messages": messages or MESSAGES, "stream": stream}
    return parse_request(Capability.chat, json.dumps(body).encode())


async def _streamed(gateway: Gateway, seen: Callable[[list[bytes]], None] = lambda _: None,
                    **request: Any) -> tuple[Target, list[bytes], OpenAIError | None]:
    """Relay a stream to its end; ``seen`` is told what has come so far after each chunk."""
    stream = await gateway.stream(_request(stream=True, **request))
    out: list[bytes] = []

    def write(chunk: bytes) -> bool:
        out.append(chunk)
        seen(out)
        return True

    try:
        await stream.relay(write)
    finally:
        stream.close()
    return stream.target, out, stream.error


async def test_a_stream_for_a_cold_model_tells_its_progress_then_gives_the_answer(held, tmp_path):
    gateway = _gateway(tmp_path, {"alpha": held.url})
    alpha = _target(gateway, "alpha")
    gateway.router.observe_state(alpha.backend, "shared", "cold")
    three_comments = asyncio.Event()

    def seen(out: list[bytes]) -> None:
        if sum(c.startswith(b": ") for c in out) >= 3:
            three_comments.set()

    async def answer_after_three_comments() -> None:
        """The engine answers once the stream has told its progress three times (every 0.2 s while it waits),
        however long that takes here; opened anyway after the guard, so that the test fails rather than hangs."""
        try:
            await asyncio.wait_for(three_comments.wait(), GUARD_S)
        finally:
            await asyncio.to_thread(gate, held, open=True)

    engine = asyncio.create_task(answer_after_three_comments())
    try:
        target, chunks, error = await _streamed(gateway, seen)
        await engine  # (raises if three comments never came)
        assert (target.cluster, error) == ("alpha", None)
        comments = [c for c in chunks if c.startswith(b": ")]
        assert len(comments) >= 3  # repeated while the answer did not come
        assert chunks[0] == comments[0]  # the status line went out with the first comment, at once
        assert comments[0].startswith(b": waiting for model 'shared' on cluster 'alpha' endpoint 'engine': ")
        body = b"".join(chunks)
        assert body.index(b"data: {") > body.rindex(b"\n: ")  # the comments come before the answer
        assert body.rstrip().endswith(b"data: [DONE]")
        assert gateway.router.state_of(alpha) == "hot"  # the start asked of it answered
    finally:
        await gateway.close()


async def test_with_reject_a_cold_model_is_answered_503_with_retry_after_and_started(quick, tmp_path):
    gateway = _gateway(tmp_path, {"alpha": quick.url}, mode="reject")
    alpha = _target(gateway, "alpha")
    gateway.router.observe_state(alpha.backend, "shared", "cold")
    gateway.router.health_of(alpha).start_s = 90.0
    try:
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_request())
        error = info.value
        assert (error.status, error.code) == (503, "model_starting")
        assert error.headers["Retry-After"] == "90"
        assert "cluster 'alpha' endpoint 'engine' is starting it (starting), expected ready in about 90 s" in \
               error.message
        assert quick.requests == 0  # nothing was sent for the request itself
        await gateway.starts.running[(id(alpha.backend), "shared")]  # the start goes on without the request
        assert gateway.router.state_of(alpha) == "hot"
        assert (await gateway.complete(_request())).target.cluster == "alpha"  # the retry finds it hot
    finally:
        await gateway.close()


async def test_a_plain_request_waits_for_a_start_up_to_max_wait_then_says_when_to_retry(stalled, tmp_path):
    gateway = _gateway(tmp_path, {"alpha": stalled.url}, max_wait=0.3)  # the start takes 60 s: max_wait ends it
    alpha = _target(gateway, "alpha")
    gateway.router.observe_state(alpha.backend, "shared", "cold")
    try:
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_request())
        assert (info.value.status, info.value.code) == (503, "model_starting")
        assert "this request waited 0.3 s (defaults.cold_start.max_wait)" in info.value.message
        assert int(info.value.headers["Retry-After"]) >= 1
        gateway.usage.flush()
        assert gateway.usage.query("SELECT cluster, status FROM usage") == [("alpha", 503)]
    finally:
        await gateway.close()


async def test_a_request_failed_over_to_a_cold_endpoint_starts_it_there(quick, tmp_path):
    gateway = _gateway(tmp_path, {"alpha": f"http://127.0.0.1:{closed_port()}", "beta": quick.url})
    beta = _target(gateway, "beta")
    gateway.router.observe_state(beta.backend, "shared", "cold")  # alpha still believed hot: it is tried first
    try:
        target, chunks, error = await _streamed(gateway)
        assert (target.cluster, error) == ("beta", None)
        assert b"".join(chunks).rstrip().endswith(b"data: [DONE]")
        assert gateway.router.state_of(beta) == "hot"
        assert gateway.router.health_of(_target(gateway, "alpha")).failures == 1
    finally:
        await gateway.close()


async def test_warm_starts_a_model_ahead_of_need_where_it_would_be_served(quick, tmp_path):
    gateway = _gateway(tmp_path, {"alpha": quick.url, "beta": quick.url})
    alpha, beta = _target(gateway, "alpha"), _target(gateway, "beta")
    for target in (alpha, beta):
        gateway.router.observe_state(target.backend, "shared", "cold")
        gateway.router.health_of(target).start_s = 60.0
    try:
        answer = (await gateway.warm("shared", cluster="beta")).json_value()
        assert answer == {"model": "shared", "cluster": "beta", "endpoint": "engine", "state": "starting",
                          "started": True, "expected_s": 60.0}
        answer = (await gateway.warm("shared", wait=True)).json_value()
        assert (answer["cluster"], answer["state"]) == ("beta", "hot")  # the start under way beats a new one
        assert gateway.router.state_of(alpha) == "cold"
        answer = (await gateway.warm("shared", cluster="alpha", wait=True)).json_value()
        assert (answer["cluster"], answer["state"], answer["started"]) == ("alpha", "hot", True)
        again = (await gateway.warm("shared")).json_value()
        assert (again["state"], again["started"]) == ("hot", False)  # hot already: nothing to start
        assert quick.requests == 2  # one model-list read per start: an upstream cannot be started

        with pytest.raises(OpenAIError) as info:
            await gateway.warm("shared", cluster="gamma")
        assert info.value.status == 404
        assert "it is on alpha, beta" in info.value.message
        with pytest.raises(OpenAIError) as info:
            await gateway.warm("nope")
        assert info.value.code == "model_not_found"
    finally:
        await gateway.close()


async def test_warm_of_an_upstream_that_is_down_says_it_cannot_be_started_here(tmp_path):
    gateway = _gateway(tmp_path, {"alpha": f"http://127.0.0.1:{closed_port()}"})
    gateway.router.observe_state(_target(gateway, "alpha").backend, "shared", "cold")
    try:
        with pytest.raises(OpenAIError) as info:
            await gateway.warm("shared", wait=True)
        assert (info.value.status, info.value.code) == (503, "engine_start_failed")
        assert "this gateway cannot start it" in info.value.message
        assert gateway.router.state_of(_target(gateway, "alpha")) == "offline"
    finally:
        await gateway.close()


async def test_a_model_in_use_gets_its_other_endpoints_started_one_at_a_time(quick, tmp_path):
    """``keep_hot: all`` (the default): a request served hot starts the best cold endpoint of its model, so the
    next burst finds it ready too; not while a start is under way, and not an offline one."""
    gateway = _gateway(tmp_path, {"alpha": quick.url, "beta": quick.url, "gamma": quick.url, "delta": quick.url})
    alpha, beta, gamma, delta = (_target(gateway, c) for c in ("alpha", "beta", "gamma", "delta"))
    gateway.router.observe_state(alpha.backend, "shared", "hot")
    gateway.router.observe_state(beta.backend, "shared", "offline")
    gateway.router.observe_state(gamma.backend, "shared", "queued")
    gateway.router.observe_state(delta.backend, "shared", "cold")
    try:
        done = await gateway.complete(_request())
        assert done.target.cluster == "alpha"
        assert gateway.router.state_of(delta) == "cold"  # gamma's start is under way: one at a time
        gateway.router.observe_state(gamma.backend, "shared", "hot")  # a reading: gamma's block is up
        done = await gateway.complete(_request())
        assert done.target.cluster in ("alpha", "gamma")  # served where it is hot...
        assert gateway.router.state_of(delta) in ("starting", "hot")  # ...while delta starts for what follows
        assert gateway.router.state_of(beta) == "offline"  # nothing to start there
    finally:
        await gateway.close()


async def test_with_keep_hot_peak_a_loaded_hot_endpoint_gets_a_second_one_started_ahead_of_the_burst(quick,
                                                                                                     tmp_path):
    gateway = _gateway(tmp_path, {"alpha": quick.url, "beta": quick.url}, concurrency=4, keep_hot="peak")
    alpha, beta = _target(gateway, "alpha"), _target(gateway, "beta")
    gateway.router.observe_state(alpha.backend, "shared", "hot")
    gateway.router.observe_state(beta.backend, "shared", "cold")
    gateway.router.health_of(beta).start_s = 60.0
    try:
        await gateway.complete(_request())
        assert gateway.router.state_of(beta) == "cold"  # one request in flight of four: no need
        for _ in range(3):
            gateway.router.began(alpha)  # three more in flight: at 75% of what alpha serves at once
        done = await gateway.complete(_request())
        assert done.target.cluster == "alpha"  # served where it is hot...
        assert gateway.router.state_of(beta) in ("starting", "hot")  # ...while beta starts for what follows
    finally:
        await gateway.close()


async def test_a_conversation_stays_on_the_endpoint_of_its_last_turn_while_that_is_about_as_good(quick, tmp_path):
    gateway = _gateway(tmp_path, {"alpha": quick.url, "beta": quick.url})
    alpha, beta = _target(gateway, "alpha"), _target(gateway, "beta")
    turns = [{"role": "user", "content": "Which queue?"}, {"role": "assistant", "content": "debug"},
             {"role": "user", "content": "And the walltime?"}]
    try:
        gateway.router.health_of(alpha).ttft_s, gateway.router.health_of(beta).ttft_s = 0.2, 0.3
        first = await gateway.complete(_request(messages=turns))
        assert first.target.cluster == "alpha"
        gateway.router.health_of(alpha).ttft_s, gateway.router.health_of(beta).ttft_s = 0.4, 0.2
        later = await gateway.complete(_request(messages=[*turns, {"role": "assistant", "content": "1h"},
                                                          {"role": "user", "content": "Thanks"}]))
        assert later.target.cluster == "alpha"  # its conversation is there, and alpha is within a second
        other = await gateway.complete(_request(messages=[{"role": "user", "content": "Another topic"},
                                                          {"role": "assistant", "content": "Yes?"}]))
        assert other.target.cluster == "beta"  # another conversation goes to the best
        gateway.router.health_of(alpha).ttft_s = 5.0
        assert (await gateway.complete(_request(messages=turns))).target.cluster == "beta"  # too slow to stay
    finally:
        await gateway.close()
