"""A batch never loses a line: the server killed with SIGKILL mid-run resumes the batch when it starts again, and
its output and error files together hold every custom_id exactly once; a line torn by the kill is sent again."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import openai

from bench.overhead import free_port
from first_jupyter.config import parse_config
from first_jupyter.service import build_gateway
from tests.conftest import fake_cluster_config, gate, held, jupyter_server_process

LINES = 400
CHAT = "/v1/chat/completions"
BEFORE_THE_KILL = 60


def _batch_file(path: Path, count: int) -> Path:
    path.write_bytes(b"".join(json.dumps({
        "custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "fake-model", "messages": [{"role": "user", "content": f"question {i}"}]}}).encode() + b"\n"
        for i in range(count)))
    return path


def _config(upstream, concurrency: int) -> dict:
    config = fake_cluster_config(upstream)
    config["clusters"]["remote"]["endpoints"][0]["concurrency"] = concurrency
    return config


def _every_id_once(client: openai.OpenAI, batch: openai.types.Batch, count: int) -> None:
    ids = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id is not None:
            ids += [json.loads(line)["custom_id"] for line in client.files.content(file_id).text.splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(count))


def test_a_batch_resumes_after_the_server_is_killed_and_holds_every_line_once(fake_upstream, write_config, tmp_path):
    gate(fake_upstream, hold=True)  # the first 60 are answered, the rest wait: the kill comes mid-run on any machine
    gate(fake_upstream, release=BEFORE_THE_KILL)
    env = {"FIRST_CONFIG": str(write_config(_config(fake_upstream, 8))), "FIRST_DATA_DIR": str(tmp_path / "data"),
           "JUPYTER_TOKEN": "batch-test"}
    port = free_port()
    server = jupyter_server_process(port, tmp_path, env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/first/v1", api_key="batch-test", max_retries=2)
        uploaded = client.files.create(file=_batch_file(tmp_path / "in.jsonl", LINES).open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 120  # only a guard: the gate decides when the run stands still
        while client.batches.retrieve(batch.id).request_counts.completed < BEFORE_THE_KILL or not held(fake_upstream):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    sent_before = fake_upstream.by_route[CHAT]
    assert BEFORE_THE_KILL < sent_before <= BEFORE_THE_KILL + 8  # killed mid-run: 60 answered, the window waiting
    gate(fake_upstream, open=True)

    port = free_port()
    server = jupyter_server_process(port, tmp_path, env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/first/v1", api_key="batch-test", max_retries=2)
        deadline = time.monotonic() + 120  # only a guard against a run that never ends
        while (done := client.batches.retrieve(batch.id)).status != "completed":
            assert done.status in ("in_progress", "finalizing"), done
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (
            LINES, LINES, 0)
        _every_id_once(client, done, LINES)
        assert fake_upstream.by_route[CHAT] <= LINES + 8  # only what was in flight at the kill was sent again
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


async def test_a_gateway_stopped_mid_batch_leaves_it_to_the_next_which_cuts_a_torn_line(fake_upstream, tmp_path):
    """The same in one process: the first gateway stops mid-run (its run cancelled, as at shutdown); a line torn
    in its output (as by a kill mid-write) is cut, and the next gateway on the data dir sends the rest."""
    gate(fake_upstream, hold=True)  # 20 are answered, the rest wait: the stop comes mid-run on any machine
    gate(fake_upstream, release=20)
    config = parse_config({**_config(fake_upstream, 4), "auth": {"sources": ["env"]}}, "test")
    first = build_gateway(config, tmp_path / "data", environ={})
    upload = first.batches.upload("multipart/form-data; boundary=b")
    upload.feed(b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b\r\n'
                b'Content-Disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n' +
                _batch_file(tmp_path / "in.jsonl", 100).read_bytes() + b"\r\n--b--\r\n")
    source = first.batches.add_file(upload)
    batch = (await first.batches.create(json.dumps({"input_file_id": source["id"],
                                                    "endpoint": "/v1/chat/completions"}).encode())).json_value()
    async with asyncio.timeout(60):  # only a guard: the gate decides when the run stands still
        while first.batches.batch(batch["id"]).request_counts.completed < 20 or not held(fake_upstream):
            await asyncio.sleep(0.01)
    output_id, _ = first.batches.store.result_ids(batch["id"])
    await first.close()
    output = first.batches.store.path(output_id)
    whole = output.read_bytes().count(b"\n")
    with output.open("ab") as f:
        f.write(b'{"id":"batch_req_torn","custom_id":"q99","respo')  # cut short mid-line

    gate(fake_upstream, open=True)
    second = build_gateway(config, tmp_path / "data", environ={})
    resuming = asyncio.ensure_future(second.batches.keep_running(every=0.1))
    try:
        async with asyncio.timeout(60):  # only a guard against a run that never ends
            while (done := second.batches.batch(batch["id"]).json_value())["status"] != "completed":
                await asyncio.sleep(0.02)
    finally:
        resuming.cancel()
        await second.close()
    lines = output.read_bytes().splitlines()
    ids = [json.loads(line)["custom_id"] for line in lines]
    assert sorted(ids) == sorted(f"q{i}" for i in range(100))
    assert done["request_counts"] == {"total": 100, "completed": 100, "failed": 0}
    assert whole == 20  # what was answered before the stop, and no more
