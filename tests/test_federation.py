"""Federation, end to end: a real Jupyter server whose gateway routes one model across three clusters of mixed
kinds. ``alpha`` and ``beta`` are Globus Compute clusters (the real engine run in process, each block starting its
own ``transformers serve`` on the tiny model); ``gamma`` is an http upstream, the benchmark's fake server, in a
process of its own so that it can be killed.

What a user sees: requests go to the endpoint that is hot; when it dies, requests that had not started are served
elsewhere with no error; a cold endpoint is started for them and a stream tells its progress in comments; a model
can be warmed ahead of need (route, command line); the catalog and the status API say how states change.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from first_jupyter import cli
from first_jupyter.config import parse_config
from first_jupyter.gateway import router
from first_jupyter.gateway.backends import http as http_backend
from first_jupyter.protocol import Capability, OpenAIError, parse_request
from first_jupyter.service import build_gateway
from tests.conftest import Door, open_door, server_config

MESSAGES = [{"role": "user", "content": "Where does this run?"}]
ROOT = Path(__file__).resolve().parents[1]
PROGRESS_EVERY = 1.0
"""Seconds between a waiting stream's progress comments (``cold_start.progress_every``)."""
ENGINE_GUARD_S = 180.0
"""How long a test waits for an engine to start: a failure guard only, far beyond a start on a loaded machine."""


def _in_process(model_dir: Path) -> dict[str, Any]:
    return {"backend": "globus_compute", "endpoints": [{
        "name": "engine", "expected_start": 20, "models": [{"id": "tiny-chat", "path": str(model_dir)}],
        "in_process": {"engine": "transformers", "device": "cpu", "max_idletime": 600}}]}


@pytest.fixture
def gamma() -> Iterator[subprocess.Popen[str]]:
    """The fake upstream in its own process; its URL on the first line it prints."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_upstream.py"), "--models", "tiny-chat",
                             "--chunks", "4"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.startswith("READY "), line
        proc.url = line.split()[1]  # type: ignore[attr-defined]
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture
def jp_server_config(tiny_model, gamma, write_config, tmp_path: Path):
    config = {"clusters": {"alpha": _in_process(tiny_model), "beta": _in_process(tiny_model),
                           "gamma": {"backend": "http", "endpoints": [{
                               "name": "fake", "base_url": f"{gamma.url}/v1", "models": [{"id": "tiny-chat"}]}]}},
              # peak: a cold endpoint is started for the load it must take, not as soon as the model is in use (the
              # default, all), so alpha and beta stay cold while gamma serves and the failover meets a cold start
              "defaults": {"model": "tiny-chat", "cold_start": {"progress_every": PROGRESS_EVERY},
                           "scale_out": {"keep_hot": "peak"}}}
    return server_config(write_config(config), tmp_path / "data")


def _states(listing: dict[str, Any]) -> dict[str, str]:
    model = next(m for m in listing["data" if "data" in listing else "models"] if m["id"] == "tiny-chat")
    return {s["cluster"]: s["state"] for s in model["served_by"]}


async def _get(client: httpx.AsyncClient, door: Door, path: str) -> dict[str, Any]:
    response = await client.get(str(door.route(path)), headers=door.headers)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def _ask(client: openai.AsyncOpenAI) -> str:
    """A plain request; the cluster that answered it (from the response header)."""
    raw = await client.chat.completions.with_raw_response.create(model="tiny-chat", messages=MESSAGES, max_tokens=4)
    assert raw.parse().choices[0].message.content is not None
    return raw.headers["x-first-cluster"]


async def _stream_lines(http: httpx.AsyncClient, door: Door) -> tuple[str, list[str]]:
    """A streamed request read as raw SSE lines (comments included, which the openai client skips)."""
    body = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 8, "stream": True}
    async with http.stream("POST", str(door.route("chat/completions")), headers=door.headers, json=body) as reply:
        assert reply.status_code == 200
        lines = [line async for line in reply.aiter_lines() if line]
        return reply.headers["x-first-cluster"], lines


async def _until(check: Any) -> None:
    async with asyncio.timeout(ENGINE_GUARD_S):
        while not await check():
            await asyncio.sleep(0.5)


async def test_requests_follow_the_hot_endpoint_fail_over_when_it_dies_and_wait_for_a_start(
        first_ext, jp_auth_header, gamma, monkeypatch, capsys):
    # the circuit that gamma's failures open stays open until the checks below, however long alpha's start takes
    monkeypatch.setattr(router, "COOLDOWN_S", 3600.0)
    # gamma answers its status readings at once until it is killed: a loaded machine must not make one of them run
    # past the product's 5 s and mark it offline early (its requests would then never meet the failover)
    monkeypatch.setattr(http_backend, "STATUS_TIMEOUT", 60.0)
    door = open_door("jupyter-key", first_ext, jp_auth_header)
    client = openai.AsyncOpenAI(base_url=door.url, api_key=door.api_key, max_retries=0, timeout=ENGINE_GUARD_S)
    async with httpx.AsyncClient(timeout=ENGINE_GUARD_S) as http, client:
        status = await _get(http, door, "../api/status")
        assert _states(status) == {"alpha": "cold", "beta": "cold", "gamma": "hot"}
        assert _states(await _get(http, door, "models")) == {"alpha": "cold", "beta": "cold", "gamma": "hot"}

        # the hot endpoint serves; it has room for these: nothing is started
        assert await asyncio.gather(*(_ask(client) for _ in range(4))) == ["gamma"] * 4

        # gamma dies; the gateway still believes it hot, so the next requests try it first, fail before their
        # first byte, and go on to alpha, which must start the model: the stream says so while it waits
        gamma.send_signal(signal.SIGKILL)
        gamma.wait(timeout=30)
        (where, lines), *plain = await asyncio.gather(_stream_lines(http, door), *(_ask(client) for _ in range(3)))
        assert plain == ["alpha"] * 3  # no client-visible error: failed over, then waited for the start
        comments = [line for line in lines if line.startswith(":")]
        data = [line for line in lines if line.startswith("data:")]
        assert lines[0].startswith(": waiting for model 'tiny-chat' on cluster 'alpha' endpoint 'engine': starting")
        # one a second, from the first second of the wait: each says how long the wait has lasted ("N s so far", by
        # the gateway's clock), and at least half of those due by the last of them came (a ratio to the wait
        # measured here, not a count of seconds: it holds however long the start takes on this machine)
        progress = [line for line in comments if line.startswith(": waiting for model ")]
        so_far = [int(match[1]) for line in progress if (match := re.search(r", (\d+) s so far, ", line))]
        assert len(so_far) == len(progress)
        assert so_far == sorted(so_far)
        assert len(progress) >= (so_far[-1] / PROGRESS_EVERY + 1) / 2, so_far
        assert '"finish_reason":"length"' in data[-1] or data[-1] == "data: [DONE]"  # the whole answer came
        assert lines.index(data[0]) > lines.index(comments[-1])  # every comment before the answer
        assert where in ("gamma", "alpha")  # the headers name the endpoint first asked
        assert any(line == ": answered by cluster 'alpha' endpoint 'engine'" for line in comments) or \
            where == "alpha"

        status = await _get(http, door, "../api/status")
        assert _states(status) == {"alpha": "hot", "beta": "cold", "gamma": "offline"}
        endpoints = {e["cluster"]: e for e in status["endpoints"]}
        assert endpoints["gamma"]["router"]["circuit"] == "open"  # four failures in a row: kept out
        assert endpoints["alpha"]["state"] == "running"
        # the start it saw, learned: read unrounded from the router, since a start of about 20 s (the configured
        # guess) moves the figure by less than the status's rounding shows
        alpha = next(b for b in first_ext.gateway.backends if b.cluster == "alpha")

        async def learned() -> bool:
            return first_ext.gateway.router.health_of_backend(alpha).start_s != 20.0

        # the start's own task (its probe) may end after the requests it let through were answered: wait for it
        await _until(learned)

        # the hot one serves, the cold one stays cold
        assert await asyncio.gather(*(_ask(client) for _ in range(3))) == ["alpha"] * 3
        assert _states(await _get(http, door, "models"))["beta"] == "cold"

        # a warm-up ahead of need, by the route, then by the command line
        reply = await http.post(str(door.route("../api/models/tiny-chat/warm")), headers=door.headers,
                                json={"cluster": "beta"})
        assert reply.status_code == 200, reply.text
        assert {k: reply.json()[k] for k in ("cluster", "state", "started")} == {
            "cluster": "beta", "state": "starting", "started": True}
        assert _states(await _get(http, door, "models"))["beta"] == "starting"
        monkeypatch.setenv("FIRST_GATEWAY_URL", first_ext.gateway_url())
        monkeypatch.setenv("FIRST_API_KEY", first_ext.api_key)
        assert await asyncio.to_thread(cli.main, ["warm", "tiny-chat", "--cluster", "beta", "--wait"]) == 0
        assert "tiny-chat is hot on cluster 'beta' endpoint 'engine'." in capsys.readouterr().out
        assert await asyncio.to_thread(cli.main, ["status"]) == 0
        table = capsys.readouterr().out.splitlines()
        assert table[0].split() == ["model", "served", "by", "state", "there", "best", "state"]
        assert {tuple(line.split()[1:3]) for line in table[1:]} == {
            ("alpha/engine", "hot"), ("beta/engine", "hot"), ("gamma/fake", "offline")}


async def test_with_reject_configured_a_cold_model_is_answered_503_with_when_to_retry(tiny_model, tmp_path):
    config = {"clusters": {"alpha": _in_process(tiny_model)},
              "defaults": {"cold_start": {"mode": "reject"}}, "auth": {"sources": ["env"]}}
    gateway = build_gateway(parse_config(config, "test"), tmp_path, environ={})
    request = parse_request(Capability.chat, json.dumps({"model": "tiny-chat", "messages": MESSAGES,
                                                         "max_tokens": 4}).encode())
    try:
        await gateway.status()  # the reading a running gateway makes in the background
        assert (await gateway.models()).json_value()["data"][0]["state"] == "cold"
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(request)
        assert (info.value.status, info.value.code) == (503, "model_starting")
        assert info.value.headers["Retry-After"] == "20"
        assert "cluster 'alpha' endpoint 'engine' is starting it (starting), expected ready in about 20 s" in \
               info.value.message

        async def hot() -> bool:
            return (await gateway.models()).json_value()["data"][0]["state"] == "hot"

        await _until(hot)  # the start the refused request asked for went on
        assert (await gateway.complete(request)).target.cluster == "alpha"
    finally:
        await gateway.close()
    assert not list((tmp_path / "compute").glob("*/run-*"))  # its engine stopped with it, its run removed
