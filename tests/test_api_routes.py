"""The gateway's own API beside the OpenAI routes: the default model and the usage summary, through every door."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from first_jupyter.config import load_config
from first_jupyter.gateway.usage import UsageRecord, UsageStore
from first_jupyter.protocol import OpenAIError
from first_jupyter.service import build_gateway
from tests.conftest import Door, fake_cluster_config, server_config
from tests.waiting import eventually_async

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path: Path):
    return server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "data")


def _api(door: Door, path: str) -> URL:
    """``/first/api/...`` beside the door's ``/first/v1`` (kept percent-encoded, as ``Door.route`` does)."""
    return URL(f"{door.url.removesuffix('/v1')}/api/{path}", encoded=True)


async def _call(door: Door, method: str, url: URL, body: object = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session, session.request(
            method, url, data=None if body is None else json.dumps(body), headers=door.headers) as resp:
        return resp.status, json.loads(await resp.read())


async def test_setting_the_default_model_shows_in_status(door):
    code, body = await _call(door, "PUT", _api(door, "default_model"), {"model": "fake-embed"})
    assert (code, body) == (200, {"default_model": "fake-embed"})
    code, status = await _call(door, "GET", _api(door, "status"))
    assert status["default_model"] == "fake-embed"
    assert await _call(door, "GET", _api(door, "default_model")) == (200, {"default_model": "fake-embed"})


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"model": "gpt-9"}, 404, "Available models: fake-embed, fake-model"),
    ({"modle": "fake-model"}, 400, '{"model": "<id>"}'),
    ("fake-model", 400, '{"model": "<id>"}'),
])
async def test_a_bad_default_model_is_refused_and_says_what_to_send(door, body, status, words):
    code, answer = await _call(door, "PUT", _api(door, "default_model"), body)
    assert code == status
    assert words in answer["error"]["message"]
    _, current = await _call(door, "GET", _api(door, "status"))
    assert current["default_model"] == "fake-model"  # unchanged


async def test_usage_summary_counts_requests_tokens_and_errors_per_model(door):
    async with aiohttp.ClientSession() as session:
        for body in (CHAT, CHAT, {**CHAT, "stream": "yes"}):  # the last is refused (400) before any upstream
            async with session.post(door.route("chat/completions"), json=body, headers=door.headers) as resp:
                await resp.read()
    code, usage = await _call(door, "GET", _api(door, "usage"))
    assert code == 200
    (row,) = usage["data"]
    assert (row["model"], row["requests"], row["errors"]) == ("fake-model", 2, 0)
    assert row["completion_tokens"] == 2 * 8  # the fake answers 8 tokens
    assert row["mean_latency_ms"] > 0


async def test_a_model_served_nowhere_leaves_no_usage_row(door):
    """Unknown names are refused before anything is recorded: the store would keep and show whatever was sent."""
    async with aiohttp.ClientSession() as session:
        for model, status in (("made-up-model", 404), ("x" * 1_000_000, 400), ("fake-model", 200)):
            async with session.post(door.route("chat/completions"), json={**CHAT, "model": model},
                                    headers=door.headers) as resp:
                assert resp.status == status
    code, usage = await _call(door, "GET", _api(door, "usage"))
    assert code == 200
    assert [row["model"] for row in usage["data"]] == ["fake-model"]


async def test_a_malformed_model_list_marks_only_that_endpoint_failed_and_status_still_answers(door,
                                                                                              fake_upstream):
    fake_upstream.fault = "bad-models"  # GET /v1/models answers {"object": "list", "data": null}
    code, status = await _call(door, "GET", _api(door, "status"))
    assert code == 200
    (endpoint,) = status["endpoints"]
    assert endpoint["state"] == "failed"
    assert "'data' is null" in endpoint["error"]
    assert status["background"]["failures"] == 0  # an answer the check foresaw: no task failed on it
    async with aiohttp.ClientSession() as session, session.post(door.route("chat/completions"), json=CHAT,
                                                                headers=door.headers) as resp:
        assert resp.status == 200  # its engine still answers requests
    fake_upstream.fault = "none"
    code, status = await _call(door, "GET", _api(door, "status"))
    assert status["endpoints"][0]["state"] == "online"


async def test_a_failing_background_task_is_logged_counted_in_status_and_goes_on(door, first_ext, caplog):
    """The usage writer meets a store whose table is gone: the failure is logged with its traceback and counted,
    and the writer goes on with the next records once the table is back."""
    path = first_ext.gateway.usage.path
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE usage")
    async with aiohttp.ClientSession() as session:
        async with session.post(door.route("chat/completions"), json=CHAT, headers=door.headers) as resp:
            assert resp.status == 200
        supervisor = first_ext.gateway.supervisor
        await eventually_async(lambda: supervisor.status()["failures"], "the usage writer's failure counted")
        async with session.get(_api(door, "status"), headers=door.headers) as resp:
            background = json.loads(await resp.read())["background"]
        assert background["failures"] == 1
        assert "no such table: usage" in background["tasks"]["usage writer"]["last_error"]
        (logged,) = [r for r in caplog.records if "usage writer" in r.getMessage()]
        assert logged.exc_info is not None  # with its traceback
        assert "no such table: usage" in str(logged.exc_info[1])

        UsageStore(path).close()  # the store, opened again, makes its table again
        async with session.post(door.route("chat/completions"), json=CHAT, headers=door.headers) as resp:
            assert resp.status == 200
    code, usage = await _call(door, "GET", _api(door, "usage"))
    assert code == 200
    assert [(row["model"], row["requests"]) for row in usage["data"]] == [("fake-model", 1)]  # the lost one is not


async def test_usage_summary_gives_each_models_last_latency(fake_upstream, write_config, tmp_path):
    """The sidebar's "last latency": the newest request's, not the slowest or the first (times may repeat)."""
    data = tmp_path / "data"
    gateway = build_gateway(load_config(write_config(fake_cluster_config(fake_upstream)), data), data)
    rows = [("fake-model", 900.0), ("fake-embed", 15.0), ("fake-model", 120.0), ("fake-model", 340.0),
            ("fake-embed", 25.0)]
    for model, latency in rows:  # same time stamp for all: the order of arrival decides
        gateway.usage.record(UsageRecord(1.0, "r", model, "remote", "e", "chat", False, 200, 1, 2, latency, None,
                                         None, ""))
    summary = {row["model"]: row for row in (await gateway.usage_summary()).json_value()["data"]}
    gateway.usage.close()
    assert {m: (r["requests"], r["last_latency_ms"], r["mean_latency_ms"]) for m, r in summary.items()} == {
        "fake-embed": (2, 25.0, 20.0), "fake-model": (3, 340.0, 1360.0 / 3)}


async def test_the_default_model_survives_a_restart_while_it_is_still_served(fake_upstream, write_config,
                                                                              tmp_path):
    config_file = write_config(fake_cluster_config(fake_upstream))
    data = tmp_path / "data"
    first = build_gateway(load_config(config_file, data), data)
    assert first.default_model == "fake-model"
    await first.set_default_model("fake-embed")
    with pytest.raises(OpenAIError, match="does not exist here"):
        await first.set_default_model("gone-model")
    await first.close()
    second = build_gateway(load_config(config_file, data), data)
    await second.close()
    assert second.default_model == "fake-embed"

    only_chat = fake_cluster_config(fake_upstream)
    only_chat["clusters"]["remote"]["endpoints"][0]["models"] = [{"id": "fake-model"}]
    third = build_gateway(load_config(write_config(only_chat), data), data)
    await third.close()
    assert third.default_model == "fake-model"
