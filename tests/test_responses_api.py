"""The Responses API through every door, with the official ``openai`` client unchanged: created by the real engine
(``transformers serve``), streamed and not; passed through byte for byte from an engine that keeps responses (the
fake upstream, as vLLM does); a kept response reached again (retrieve, input items, cancel, delete) and continued
(``previous_response_id``) at the endpoint that created it, of two; unknown ids refused 404; a batch over
``/v1/responses``. Then the parts: the id store (bounded, persisted, per caller) and the stream watch."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from bench.fake_upstream import FakeUpstream, serving_in_thread
from first_jupyter.gateway import response_ids
from first_jupyter.gateway.caller import acting_as
from first_jupyter.gateway.response_ids import ResponseIds
from first_jupyter.gateway.stream_watch import StreamWatch
from first_jupyter.gateway.supervisor import Supervisor
from first_jupyter.protocol import OpenAIError
from tests.conftest import Door, server_config
from tests.test_batch_api import FINAL

RESPONSES = ["chat", "completions", "responses"]
ID = re.compile(rb"resp_[0-9a-f]{24}")


@pytest.fixture
def second_upstream() -> Iterator[FakeUpstream]:
    with serving_in_thread(models=["fake-model"], chunks=8) as upstream:
        yield upstream


@pytest.fixture
def jp_server_config(tiny_engine, fake_upstream, second_upstream, write_config, tmp_path: Path):
    """The real engine on cluster hpc; two engines that keep responses on cluster remote, both serving fake-model
    (endpoint a also as fake-alias, a public name the engine does not know)."""
    config = {"clusters": {
        "hpc": {"backend": "http", "endpoints": [{"name": "node01", "base_url": tiny_engine.base_url, "models": [
            {"id": "tiny-chat", "upstream_name": tiny_engine.model_name, "capabilities": RESPONSES}]}]},
        "remote": {"backend": "http", "endpoints": [
            {"name": "a", "base_url": f"{fake_upstream.url}/v1", "models": [
                {"id": "fake-model", "capabilities": RESPONSES},
                {"id": "fake-alias", "upstream_name": "fake-model", "capabilities": RESPONSES}]},
            {"name": "b", "base_url": f"{second_upstream.url}/v1", "models": [
                {"id": "fake-model", "capabilities": RESPONSES}]}]}},
        "defaults": {"model": "tiny-chat"}}
    return server_config(write_config(config), tmp_path / "data")


def _client(door: Door) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=door.url, api_key=door.api_key, max_retries=0, timeout=120)


def _usage_rows(first_ext: Any) -> list[tuple[Any, ...]]:
    usage = first_ext.gateway.usage
    usage.flush(30)  # a failure guard: the commit takes milliseconds
    return usage.query("SELECT model, stream, status, prompt_tokens, completion_tokens FROM usage "
                       "WHERE capability = 'responses' ORDER BY id")


async def test_the_engine_creates_responses_streamed_and_not(first_ext, key_door):
    """``transformers serve`` streams a request that leaves ``stream`` out: the gateway tells it not to, as the
    client meant (the openai client sends no ``stream`` for a plain create)."""
    client = _client(key_door)
    done = await client.responses.create(model="tiny-chat", input="Say hello.", max_output_tokens=4)
    assert (done.object, done.status, done.model) == ("response", "completed", "tiny-chat")
    assert done.usage is not None
    assert done.usage.output_tokens == 4
    events = [event async for event in await client.responses.create(model="tiny-chat", input="Say hello.",
                                                                       max_output_tokens=3, stream=True)]
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    assert events[-1].response.model == "tiny-chat"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-1].response.output_text
    rows = await asyncio.to_thread(_usage_rows, first_ext)
    assert [row[:3] + row[4:] for row in rows] == [("tiny-chat", 0, 200, 4), ("tiny-chat", 1, 200, 3)]
    assert all(row[3] > 0 for row in rows)


async def test_an_engine_that_keeps_no_responses_is_answered_from_the_gateways_copy(first_ext, door):
    """``transformers serve`` keeps nothing it creates (it has no GET /v1/responses/{id}): a response it created,
    streamed or not, is retrieved, listed and deleted from the copy the gateway kept, as OpenAI's API answers; one
    asked with ``store: false`` is kept nowhere."""
    client = _client(door)
    done = await client.responses.create(model="tiny-chat", input="Say hello.", max_output_tokens=3)
    kept = await client.responses.retrieve(done.id)
    assert (kept.id, kept.model, kept.status, kept.output_text) == (done.id, "tiny-chat", "completed", done.output_text)
    items = await client.responses.input_items.list(done.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "Say hello.")]
    events = [e async for e in await client.responses.create(
        model="tiny-chat", input=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
        max_output_tokens=3, stream=True)]
    streamed = events[-1].response
    assert (await client.responses.retrieve(streamed.id)).output_text == streamed.output_text
    listed = await client.responses.input_items.list(streamed.id, order="asc", limit=1)
    assert ([i.content[0].text for i in listed.data], listed.has_more) == (["one"], True)
    rest = await client.responses.input_items.list(streamed.id, order="asc", after=listed.last_id)
    assert ([i.content[0].text for i in rest.data], rest.has_more) == (["two"], False)
    with pytest.raises(openai.BadRequestError, match="background=true"):
        await client.responses.cancel(done.id)
    deleted = await client.responses.delete(done.id)
    assert deleted is None  # the SDK reads no body from a delete; the next retrieve shows it is gone
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(done.id)
    unstored = await client.responses.create(model="tiny-chat", input="Say hello.", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)


async def _raw(door: Door, body: dict[str, Any], url: str | None = None) -> tuple[bytes, dict[str, str]]:
    async with aiohttp.ClientSession() as session, session.post(
            url or door.route("responses"), json=body, headers=door.headers if url is None else {}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read(), dict(resp.headers)


def _events(stream: bytes) -> list[bytes]:
    return [event + b"\n\n" for event in stream.split(b"\n\n") if event]


async def test_an_engines_event_stream_passes_through_as_it_came(first_ext, key_door, fake_upstream):
    """Byte for byte but the response id (each its own); under a public name the engine does not know, only the
    events that carry the response change, and only in their model."""
    body = {"model": "fake-model", "input": "hi", "stream": True}
    direct, _ = await _raw(key_door, body, f"{fake_upstream.url}/v1/responses")
    relayed, headers = await _raw(key_door, body)
    assert headers["Content-Type"] == "text/event-stream"
    assert ID.sub(b"ID", relayed) == ID.sub(b"ID", direct)
    renamed, _ = await _raw(key_door, {**body, "model": "fake-alias"})
    pairs = list(zip(_events(ID.sub(b"ID", direct)), _events(ID.sub(b"ID", renamed)), strict=True))
    assert len(pairs) == 8 + 8  # a delta per token, and the events around them
    for sent, got in pairs:
        if b'"response":' not in sent:
            assert got == sent
            continue
        kind, data = got.split(b"\n", 1)
        assert kind == sent.split(b"\n", 1)[0]
        expected = orjson.loads(sent.split(b"data: ", 1)[1])
        expected["response"]["model"] = "fake-alias"
        assert orjson.loads(data.removeprefix(b"data: ")) == expected
    rows = await asyncio.to_thread(_usage_rows, first_ext)
    assert [row[:5] for row in rows] == [("fake-model", 1, 200, 8, 8), ("fake-alias", 1, 200, 8, 8)]


async def test_a_kept_response_is_reached_again_where_it_was_created(first_ext, door, fake_upstream,
                                                                      second_upstream):
    client = _client(door)
    raw = await client.responses.with_raw_response.create(model="fake-model", input=[
        {"role": "user", "content": [{"type": "input_text", "text": text}]} for text in ("first", "second")])
    created, endpoint = raw.parse(), raw.headers["X-First-Endpoint"]
    fakes = {"a": fake_upstream, "b": second_upstream}
    other = fakes["b" if endpoint == "a" else "a"]
    asked_elsewhere = other.by_route["/v1/responses"]
    kept = await client.responses.retrieve(created.id)
    assert (kept.id, kept.model, kept.output_text) == (created.id, "fake-model", created.output_text)
    items = await client.responses.input_items.list(created.id, limit=1, order="asc")
    assert [item.content[0].text for item in items.data] == ["first"]  # the query reached the engine
    assert items.has_more
    for stream in (False, True, False):  # each follow-up where the first was created, streamed or not
        follow = await client.responses.with_raw_response.create(model="fake-model", input="and?", stream=stream,
                                                                 previous_response_id=created.id)
        assert follow.headers["X-First-Endpoint"] == endpoint
        if stream:
            async for _ in follow.parse():
                pass
    assert other.by_route["/v1/responses"] == asked_elsewhere
    queued = await client.responses.create(model="fake-model", input="later", background=True)
    assert (await client.responses.cancel(queued.id)).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="background=true"):  # the engine's own refusal, as it said it
        await client.responses.cancel(created.id)
    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError) as gone:
        await client.responses.retrieve(created.id)
    assert gone.value.code == "response_not_found"


async def test_an_unknown_id_or_a_gone_endpoint_is_404_saying_so(first_ext, key_door):
    client = _client(key_door)
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.responses.retrieve("resp_never_made")
    assert unknown.value.code == "response_not_found"
    assert "resp_never_made" in unknown.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        await client.responses.create(model="fake-model", input="hi", previous_response_id="resp_never_made")
    assert unknown.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as wrong:
        await client.responses.create(model="fake-model", input="hi", extra_body={"previous_response_id": 7})
    assert wrong.value.param == "previous_response_id"
    # another process of the gateway, before a configuration change, created one on an endpoint now gone
    path = first_ext.gateway.responses.path
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO responses (response_id, cluster, endpoint, model, user, ts) VALUES "
                     "('resp_retired', 'remote', 'retired', 'fake-model', '', ?)", (time.time(),))
    with pytest.raises(openai.NotFoundError) as gone:
        await client.responses.delete("resp_retired")
    assert gone.value.code == "response_endpoint_gone"
    assert "endpoint 'retired'" in gone.value.message


async def test_a_batch_over_responses_answers_each_line_and_keeps_its_responses(first_ext, key_door):
    client = _client(key_door)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/responses",
              "body": {"model": "fake-model", "input": f"question {i}"}} for i in range(3)]
    uploaded = await client.files.create(file=("in.jsonl", b"".join(json.dumps(line).encode() + b"\n"
                                                                    for line in lines)), purpose="batch")
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/responses",
                                        completion_window="24h")
    async with asyncio.timeout(60):  # a guard only: the batch takes milliseconds
        while (batch := await client.batches.retrieve(batch.id)).status not in FINAL:
            await asyncio.sleep(0.05)
    assert batch.status == "completed"
    assert batch.output_file_id is not None
    results = [json.loads(line) for line in (await client.files.content(batch.output_file_id)).text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["r0", "r1", "r2"]
    answers = [r["response"]["body"] for r in results]
    assert {(a["object"], a["model"], a["usage"]["output_tokens"]) for a in answers} == {
        ("response", "fake-model", 8)}
    kept = await client.responses.retrieve(answers[0]["id"])
    assert kept.id == answers[0]["id"]


# -- the parts ---------------------------------------------------------------------------------------------------


class _Target:
    def __init__(self, cluster: str, endpoint: str) -> None:
        self.cluster, self.endpoint = cluster, endpoint


class _Caller:
    def __init__(self, user: str) -> None:
        self.user = user


@pytest.mark.parametrize("json_functions", [True, False], ids=["json-batches", "row-by-row"])
async def test_the_id_store_is_bounded_persisted_and_each_callers_own(tmp_path: Path, json_functions: bool,
                                                                      monkeypatch: pytest.MonkeyPatch):
    """Whether or not this SQLite has its JSON functions (one statement per batch, else row by row)."""
    monkeypatch.setattr(response_ids, "json_available", lambda conn: json_functions)
    path = tmp_path / "responses.sqlite3"
    ids = ResponseIds(path, 3, Supervisor())
    for i in range(5):
        with acting_as(_Caller("ada") if i else None):  # type: ignore[arg-type]
            ids.remember(f"resp_{i}", _Target("c", f"e{i}"), "m")  # type: ignore[arg-type]
    ids.forget("resp_3")
    ids.close()
    again = ResponseIds(path, 3, Supervisor())  # a restart, or another process
    try:
        assert (await again.home("resp_4")).endpoint == "e4"
        with acting_as(_Caller("ada")):  # type: ignore[arg-type]
            assert (await again.home("resp_4")).user == "ada"
        for refused, caller in (("resp_4", _Caller("bob")), ("resp_3", None), ("resp_1", None)):
            with pytest.raises(OpenAIError) as unknown, acting_as(caller):  # type: ignore[arg-type]
                await again.home(refused)
            assert unknown.value.status == 404
        assert (await again.home("resp_2")).endpoint == "e2"  # the newest 3, less the one deleted
    finally:
        again.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT response_id FROM responses ORDER BY seq").fetchall() == [("resp_2",), ("resp_4",)]


def _sse(kind: str, data: dict[str, Any], *, named: bool) -> bytes:
    """One event as OpenAI and vLLM write it (an ``event:`` line first), or as ``transformers serve`` does."""
    line = b"data: " + json.dumps(data).encode() + b"\n\n"
    return (f"event: {kind}\n".encode() + line) if named else line


@pytest.mark.parametrize("named", [True, False], ids=["event-lines", "data-only"])
def test_the_watch_learns_the_id_counts_the_usage_and_renames_only_what_carries_the_response(named: bool):
    response = {"id": "resp_1", "object": "response", "model": "engine-name", "output": [], "usage": None}
    done = {**response, "usage": {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0},
                                  "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0}}}
    delta = _sse("response.output_text.delta", {"type": "response.output_text.delta", "delta": "engine-name"},
                 named=named)
    stream = [_sse("response.created", {"type": "response.created", "response": response}, named=named), delta,
              delta, _sse("response.completed", {"type": "response.completed", "response": done}, named=named)]
    for public in ("engine-name", "public"):
        seen: list[str] = []
        watch = StreamWatch(public, rename=True, strip_usage_event=False)
        watch.on_response_id = seen.append
        out = [watch.feed(chunk) for chunk in stream]
        assert seen == ["resp_1"]
        assert (watch.prompt_tokens, watch.completion_tokens) == (5, 2)
        assert out[1:3] == [delta, delta]  # a delta goes on as it came, whatever its text
        if public == "engine-name":
            assert out == stream
        else:
            assert [orjson.loads(o.split(b"data: ", 1)[1])["response"]["model"] for o in (out[0], out[3])] == [
                "public", "public"]


def test_a_next_turn_for_an_engine_that_keeps_nothing_carries_the_conversation():
    earlier = response_ids.KeptCopy("resp_1", orjson.dumps({"id": "resp_1", "output": [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "id": "msg_1", "role": "assistant",
         "content": [{"type": "output_text", "text": "Hello, "}, {"type": "output_text", "text": "Ada."}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}"}]}),
        orjson.dumps("I am Ada."))
    assert response_ids.continued_input(earlier, [{"type": "function_call_output", "call_id": "call_1",
                                                   "output": "42"}]) == [
        {"role": "user", "content": "I am Ada."},
        {"role": "assistant", "content": "Hello, Ada."},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "42"}]
    assert response_ids.continued_input(earlier._replace(input=b"null"), "and?")[-1] == {"role": "user",
                                                                                       "content": "and?"}

