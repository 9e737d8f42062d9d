"""The Batch API through the Jupyter server, with the official ``openai`` client unchanged: files, batches,
validation before work, cancel, expiry, and results that hold every request once."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.conftest import Door, fake_cluster_config, gate, held, server_config
from tests.waiting import GUARD_S, eventually_async

FINAL = ("completed", "failed", "expired", "cancelled")
CHAT = "/v1/chat/completions"


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path: Path, request: pytest.FixtureRequest):
    marker = request.node.get_closest_marker("batch")
    batch = marker.kwargs if marker else {}
    config = fake_cluster_config(fake_upstream, batch=batch)
    marker = request.node.get_closest_marker("concurrency")
    if marker:
        config["clusters"]["remote"]["endpoints"][0]["concurrency"] = marker.args[0]
    return server_config(write_config(config), tmp_path / "data")


def _line(i: int, **changes: Any) -> dict[str, Any]:
    line = {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "fake-model", "messages": [{"role": "user", "content": f"question {i}"}]}}
    line.update(changes)
    return line


def _jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def _client(door: Door) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=door.url, api_key=door.api_key, max_retries=0, timeout=60)


async def _finished(client: openai.AsyncOpenAI, batch_id: str, within: float = 60) -> Any:
    async with asyncio.timeout(within):
        while (batch := await client.batches.retrieve(batch_id)).status not in FINAL:
            await asyncio.sleep(0.05)
    return batch


async def _results(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in (await client.files.content(file_id)).text.splitlines()]


async def _batch(door: Door, lines: int, window: str = "24h") -> tuple[openai.AsyncOpenAI, Any, Any]:
    """A batch of ``lines``; a test that acts on it mid-run holds the upstream's gate first (``gate``), so that it
    is still under way when the test acts, on any machine."""
    client = _client(door)
    uploaded = await client.files.create(file=("batch.jsonl", _jsonl([_line(i) for i in range(lines)])),
                                         purpose="batch")
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window=window)
    return client, uploaded, batch


async def _standing(client: openai.AsyncOpenAI, batch_id: str, upstream: Any, completed: int, waiting: int) -> None:
    """Until the batch has ``completed`` answers and ``waiting`` requests held at the upstream's gate: its window
    full, it can go no further until the gate opens. The timeout only guards against a run that never gets there."""
    async with asyncio.timeout(60):
        while ((await client.batches.retrieve(batch_id)).request_counts.completed < completed
               or held(upstream) < waiting):
            await asyncio.sleep(0.05)


async def test_the_openai_client_uploads_runs_lists_and_reads_a_batch(key_door, fake_upstream, tmp_path):
    client = _client(key_door)
    source = tmp_path / "questions.jsonl"
    source.write_bytes(_jsonl([_line(i) for i in range(40)]))
    uploaded = await client.files.create(file=source.open("rb"), purpose="batch")
    assert (uploaded.bytes, uploaded.purpose, uploaded.filename) == (source.stat().st_size, "batch",
                                                                      "questions.jsonl")
    assert uploaded.id in [f.id for f in (await client.files.list(purpose="batch")).data]
    assert (await client.files.retrieve(uploaded.id)).bytes == uploaded.bytes

    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h", metadata={"project": "tests"})
    assert (batch.status, batch.metadata) == ("validating", {"project": "tests"})
    assert batch.expires_at == batch.created_at + 24 * 3600
    done = await _finished(client, batch.id)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (40, 40, 0)
    assert done.created_at <= done.in_progress_at <= done.finalizing_at <= done.completed_at
    assert done.error_file_id is None  # nothing failed
    results = await _results(client, done.output_file_id)
    assert sorted(r["custom_id"] for r in results) == sorted(f"req-{i}" for i in range(40))
    for result in results:
        assert result["error"] is None
        assert result["response"]["status_code"] == 200
        assert result["response"]["body"]["choices"][0]["message"]["content"]
        assert result["id"].startswith("batch_req_")
    assert fake_upstream.by_route[CHAT] == 40  # each request once

    listed = await client.batches.list(limit=1)
    assert [b.id for b in listed.data] == [batch.id]
    output = await client.files.retrieve(done.output_file_id)
    assert output.purpose == "batch_output"
    assert output.bytes == len((await client.files.content(done.output_file_id)).content)


async def test_a_file_with_bad_lines_fails_the_batch_with_each_line_and_runs_nothing(door, fake_upstream):
    client = _client(door)
    lines = [_line(0), _line(1, method="GET"), _line(2, url="/v1/embeddings"), _line(0),
             _line(4, body={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}),
             _line(5, body={"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "x"}]}),
             _line(6, body={"model": "fake-model", "stream": "false", "messages": [{"role": "user", "content": "x"}]}),
             {"method": "POST"}]
    body = _jsonl(lines) + b"{not json\n"
    uploaded = await client.files.create(file=("bad.jsonl", body), purpose="batch")
    before = fake_upstream.by_route[CHAT]
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    done = await _finished(client, batch.id)
    assert done.status == "failed"
    assert done.failed_at is not None
    assert done.in_progress_at is None
    errors = {(e.line, e.code, e.param) for e in done.errors.data}
    assert errors == {(2, "invalid_method", "method"), (3, "mismatched_url", "url"),
                      (4, "duplicate_custom_id", "custom_id"), (5, "model_not_found", "body.model"),
                      (6, "stream_not_allowed", "body.stream"), (7, "invalid_request", "body.stream"),
                      (8, "missing_custom_id", "custom_id"), (9, "invalid_json", None)}
    messages = {e.line: e.message for e in done.errors.data}
    assert "also on line 1" in messages[4]
    assert "Models: fake-model." in messages[5]  # fake-embed serves no chat
    assert fake_upstream.by_route[CHAT] == before  # nothing sent
    assert done.output_file_id is None
    assert done.error_file_id is None


@pytest.mark.concurrency(2)
async def test_cancel_stops_new_work_lets_in_flight_finish_and_keeps_what_was_done(key_door, fake_upstream):
    gate(fake_upstream, hold=True)
    gate(fake_upstream, release=4)  # 4 answered, then the next two (the window) wait in flight
    client, _, batch = await _batch(key_door, 60)
    await _standing(client, batch.id, fake_upstream, completed=4, waiting=2)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling"
    gate(fake_upstream, open=True)  # what was in flight at the cancel finishes
    done = await _finished(client, batch.id)
    assert done.status == "cancelled"
    assert done.cancelling_at <= done.cancelled_at
    answered = await _results(client, done.output_file_id)
    refused = await _results(client, done.error_file_id)
    assert len(answered) == 4 + 2  # done before the cancel, and in flight at it
    ids = [r["custom_id"] for r in answered + refused]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(60))  # every request once, in one file or the other
    assert {r["error"]["code"] for r in refused} == {"batch_cancelled"}
    assert (done.request_counts.completed, done.request_counts.failed) == (len(answered), len(refused))
    assert fake_upstream.by_route[CHAT] == len(answered)  # after the cancel, only what was in flight: it finished
    again = await client.batches.cancel(batch.id)
    assert again.status == "cancelled"


@pytest.mark.concurrency(2)
async def test_a_batch_past_its_completion_window_expires_with_what_it_did(key_door, fake_upstream, first_ext):
    # The window is wall-clock time by nature: it is sized from a batch of 4 timed here, so that 4 lines are done
    # well within it on a machine of any speed; the gate then holds the rest until the window has passed.
    client = _client(key_door)
    started = time.monotonic()
    await _finished(client, (await _batch(key_door, 4))[2].id)
    window_s = math.ceil(10 * (time.monotonic() - started)) + 1  # + 1: expires_at counts from a whole second
    gate(fake_upstream, hold=True)
    gate(fake_upstream, release=4)
    client, _, batch = await _batch(key_door, 60, window=f"{window_s}s")
    await _standing(client, batch.id, fake_upstream, completed=4, waiting=2)
    run = first_ext.gateway.batches.runs[batch.id]
    # the run itself says the window has closed (its expiry fires on the gateway's loop, however late that runs)
    await eventually_async(lambda: run.stop == "expired", "the window closed", within=window_s + GUARD_S)
    gate(fake_upstream, open=True)  # what was in flight when the window closed finishes
    done = await _finished(client, batch.id)
    assert done.status == "expired"
    assert done.expired_at >= batch.expires_at
    answered = await _results(client, done.output_file_id)
    refused = await _results(client, done.error_file_id)
    assert len(answered) == 4 + 2  # done within the window, and in flight when it closed
    assert sorted(r["custom_id"] for r in answered + refused) == sorted(f"req-{i}" for i in range(60))
    assert {r["error"]["code"] for r in refused} == {"batch_expired"}


async def test_transient_failures_are_retried_and_lasting_ones_become_the_lines_result(key_door, fake_upstream):
    client = _client(key_door)
    fake_upstream.fault = "500"
    gate(fake_upstream, hold=True)
    gate(fake_upstream, release=3)  # each line's first try fails; the tries after it wait at the gate
    uploaded = await client.files.create(file=("few.jsonl", _jsonl([_line(i) for i in range(3)])), purpose="batch")
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    async with asyncio.timeout(60):  # only a guard: each line tried, then tried again (held, so no third try yet)
        while fake_upstream.by_route[CHAT] < 6 or held(fake_upstream) < 3:
            await asyncio.sleep(0.02)
    fake_upstream.fault = "none"  # the engine recovers: the retries succeed
    gate(fake_upstream, open=True)
    done = await _finished(client, batch.id)
    assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 3, 0)

    refused_line = _line(9, body={"model": "fake-model", "messages": [{"role": "user", "content": "x"}]})
    uploaded = await client.files.create(file=("one.jsonl", _jsonl([refused_line])), purpose="batch")
    fake_upstream.fault = "403"  # not transient: no retry, the refusal is the result
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    done = await _finished(client, batch.id)
    assert (done.status, done.request_counts.failed) == ("completed", 1)
    (result,) = await _results(client, done.error_file_id)
    assert result["response"]["status_code"] == 403
    assert result["response"]["body"]["error"]["message"]


@pytest.mark.batch(max_file_lines=5, max_file_bytes=2000)
async def test_files_over_the_limits_or_for_other_purposes_are_refused_and_leave_nothing(door, tmp_path):
    client = _client(door)
    with pytest.raises(openai.APIStatusError) as info:
        await client.files.create(file=("six.jsonl", _jsonl([_line(i) for i in range(6)])), purpose="batch")
    assert info.value.status_code == 413
    assert "more than 5 lines" in info.value.message
    assert "max_file_lines" in info.value.message
    for size in (3000, 100_000):  # over the file's limit; then over the body's (the file's and the form's)
        with pytest.raises(openai.APIStatusError) as info:
            await client.files.create(file=("big.jsonl", b"x" * size), purpose="batch")
        assert info.value.status_code == 413
        assert info.value.body["code"] == "file_too_large"
        assert "max_file_bytes" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        await client.files.create(file=("tune.jsonl", _jsonl([_line(0)])), purpose="fine-tune")
    assert "purpose=batch" in info.value.message
    assert (await client.files.list()).data == []
    files_dir = tmp_path / "data" / "batches" / "files"
    assert list(files_dir.iterdir()) == []  # no partial upload left behind


async def test_file_and_batch_routes_answer_errors_that_say_what_to_do(door):
    client = _client(door)
    with pytest.raises(openai.NotFoundError) as info:
        await client.files.retrieve("file-nope")
    assert "GET /first/v1/files" in info.value.message
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError) as info:
        await client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions",
                                    completion_window="24h")
    uploaded = await client.files.create(file=("one.jsonl", _jsonl([_line(0)])), purpose="batch")
    for bad, param in (({"endpoint": "/v1/moderations"}, "endpoint"), ({"completion_window": "1 week"},
                                                                    "completion_window")):
        asked = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                 **bad}
        with pytest.raises(openai.BadRequestError) as info:
            await client.batches.create(**asked)
        assert info.value.body["param"] == param
    async with aiohttp.ClientSession() as session, session.put(door.route("batches"), headers=door.headers) as r:
        assert r.status == 405
        assert r.headers["Allow"] == "GET, POST"
    deleted = await client.files.delete(uploaded.id)
    assert deleted.deleted
    assert (await client.files.list()).data == []


@pytest.mark.parametrize("endpoint", [[], {}, ["/v1/chat/completions"], 7, None])
async def test_an_endpoint_that_is_no_string_is_400_naming_it(door, endpoint):
    """Found by fuzzing: a list or an object was looked up among the endpoints, and the lookup's TypeError was a 500."""
    uploaded = await _client(door).files.create(file=("one.jsonl", _jsonl([_line(0)])), purpose="batch")
    asked = {"input_file_id": uploaded.id, "endpoint": endpoint, "completion_window": "24h"}
    async with aiohttp.ClientSession() as session, session.post(door.route("batches"), json=asked,
                                                                headers=door.headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "endpoint"


@pytest.mark.parametrize(("query", "param"), [
    ("limit=%C2%B2", "limit"), ("limit=%C2%B9", "limit"), ("limit=%C2%B3", "limit"), ("limit=%FF", "limit"),
    ("order=%FF", "order"), ("after=%FF", "after")])
@pytest.mark.parametrize("route", ["files", "batches"])
async def test_a_query_value_no_number_or_text_is_400_naming_it(door, route, query, param):
    async with aiohttp.ClientSession() as session, session.get(door.route(f"{route}?{query}"),
                                                               headers=door.headers) as answer:
        assert answer.status == 400
        error = (await answer.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param


@pytest.mark.parametrize(("path", "code"), [
    ("files/a/b", "unknown_route"), ("files//content", "unknown_route"), ("batches/x/y", "unknown_route"),
    ("files/a/cancel", "unknown_route"), ("files/..%2F..%2Fetc%2Fpasswd/content", "file_not_found")])
async def test_paths_beside_the_batch_routes_are_404(door, path, code):
    async with aiohttp.ClientSession() as session, session.get(door.route(path), headers=door.headers) as answer:
        assert answer.status == 404
        error = (await answer.json())["error"]
    assert (error["code"], error["type"]) == (code, "invalid_request_error")  # an id is matched as sent


@pytest.mark.concurrency(1)
async def test_the_input_of_an_unfinished_batch_cannot_be_deleted(key_door, fake_upstream):
    gate(fake_upstream, hold=True)  # nothing is answered: the batch is unfinished until the gate opens
    client, uploaded, batch = await _batch(key_door, 20)
    with pytest.raises(openai.ConflictError) as info:
        await client.files.delete(uploaded.id)
    assert batch.id in info.value.message
    await client.batches.cancel(batch.id)
    gate(fake_upstream, open=True)
    await _finished(client, batch.id)
    assert (await client.files.delete(uploaded.id)).deleted
