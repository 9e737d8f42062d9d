"""Batches offloaded to an endpoint's nodes: a Globus Compute task per chunk running the endpoint's run-batch
command, through a shared directory, with results back in the batch's own files.

The endpoint is the real Globus Compute engine run in-process (the local engine path: parsl's LocalProvider, a
worker_init that starts ``transformers serve`` on the tiny model). ``vllm run-batch`` cannot run here, so the
command is ``first_jupyter.remote.run_batch``, which does its job against the engine serving on the node, behind
a wrapper that logs each run and, once, kills the worker running it (a node lost mid-chunk).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from first_jupyter.batch.batches import Batches
from first_jupyter.config import ConfigError, parse_config
from first_jupyter.gateway.usage import UsageRecord
from first_jupyter.protocol import ParsedRequest
from first_jupyter.remote import run_batch
from first_jupyter.service import build_gateway
from tests.test_compute_local import _processes_of, in_process_config
from tests.waiting import ENGINE_GUARD_S

WRAPPER = """
import os, pathlib, signal, subprocess, sys, time
name = pathlib.Path(sys.argv[sys.argv.index("-i") + 1]).name
with open({log!r}, "a") as log:
    log.write(name + "\\n")
if name.startswith("chunk-00001.") and pathlib.Path({hold!r}).exists():
    worker = os.getppid()  # held: this run never answers, and ends once its worker is gone
    while os.getppid() == worker:
        time.sleep(0.05)
    sys.exit(1)
lose = pathlib.Path({lose!r})
if name.startswith("chunk-00001.") and not lose.exists():
    lose.touch()
    os.kill(os.getppid(), signal.SIGKILL)  # the worker running this chunk's task dies: a lost node
    sys.exit(1)
sys.exit(subprocess.call([sys.executable, "-m", "first_jupyter.remote.run_batch", *sys.argv[1:]]))
"""


def _lines(count: int, prefix: str = "q") -> bytes:
    return b"".join(json.dumps({"custom_id": f"{prefix}{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "tiny-chat", "max_tokens": 4,
                                         "messages": [{"role": "user", "content": f"question {i}"}]}}).encode()
                    + b"\n" for i in range(count))


def _config(model_dir: Path, tmp_path: Path, **batch: Any) -> dict[str, Any]:
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(log=str(tmp_path / "runs.log"), lose=str(tmp_path / "lost-once"),
                                      hold=str(tmp_path / "hold-chunk-1")))
    config = in_process_config(model_dir)
    config["clusters"]["local"]["endpoints"][0]["batch"] = {
        "shared_path": str(tmp_path / "shared"), "chunk_lines": 4, "min_lines": 5,
        "command": ["{python}", str(wrapper), "-i", "{input}", "-o", "{output}", "--port", "{port}"], **batch}
    return {**config, "auth": {"sources": ["env"]}}


async def _submit(batches: Batches, content: bytes) -> dict[str, Any]:
    upload = batches.upload("multipart/form-data; boundary=b")
    upload.feed(b'--b\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--b\r\n'
                b'Content-Disposition: form-data; name="file"; filename="in.jsonl"\r\n\r\n' + content
                + b"\r\n--b--\r\n")
    source = batches.add_file(upload)
    return (await batches.create(json.dumps({"input_file_id": source["id"],
                                             "endpoint": "/v1/chat/completions"}).encode())).json_value()


async def _ended(batches: Batches, batch_id: str) -> dict[str, Any]:
    async with asyncio.timeout(ENGINE_GUARD_S):
        while (batch := batches.batch(batch_id).json_value())["status"] not in ("completed", "failed", "cancelled"):
            await asyncio.sleep(0.1)
    return batch


def _results(batches: Batches, batch: dict[str, Any]) -> list[dict[str, Any]]:
    lines = []
    for key in ("output_file_id", "error_file_id"):
        if batch[key]:
            lines += [json.loads(x) for x in batches.store.path(batch[key]).read_bytes().splitlines()]
    return lines


def _runs(tmp_path: Path) -> list[str]:
    log = tmp_path / "runs.log"
    return sorted(log.read_text().split()) if log.exists() else []


@pytest.mark.timeout(2 * ENGINE_GUARD_S)
async def test_a_large_batch_runs_as_a_task_per_chunk_and_a_lost_node_redoes_only_its_chunk(tiny_model, tmp_path):
    gateway = build_gateway(parse_config(_config(tiny_model, tmp_path), "test"), tmp_path / "data", environ={})
    try:
        small = await _ended(gateway.batches, (await _submit(gateway.batches, _lines(3, "s")))["id"])  # under min_lines
        assert small["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
        assert _runs(tmp_path) == []  # request by request: no run-batch task

        batch = await _ended(gateway.batches, (await _submit(gateway.batches, _lines(10)))["id"])
        assert batch["status"] == "completed"
        assert batch["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
        results = _results(gateway.batches, batch)
        assert sorted(r["custom_id"] for r in results) == sorted(f"q{i}" for i in range(10))
        assert {r["response"]["status_code"] for r in results} == {200}
        assert {r["response"]["body"]["usage"]["completion_tokens"] for r in results} <= {1, 2, 3, 4}
        # three chunks of 4, 4 and 2 lines; the one whose worker was killed ran again, the others once
        assert _runs(tmp_path) == ["chunk-00000.input.jsonl", "chunk-00001.input.jsonl", "chunk-00001.input.jsonl",
                                   "chunk-00002.input.jsonl"]
        assert not (tmp_path / "shared" / batch["id"]).exists()  # the chunks' files go once the results are in

        # each offloaded line is accounted as a request the gateway sent (the lost attempt answered none)
        rows = gateway.usage.query("SELECT request_id, status, completion_tokens, latency_ms FROM usage "
                                   "WHERE request_id LIKE ?", (f"{batch['id']}/%",))
        tokens = {r["custom_id"]: r["response"]["body"]["usage"]["completion_tokens"] for r in results}
        assert sorted((rid.split("/")[1], status, done) for rid, status, done, _ in rows) == sorted(
            (custom_id, 200, done) for custom_id, done in tokens.items())
        assert all(took > 0 for *_, took in rows)
        by_model = {row["model"]: row for row in (await gateway.usage_summary()).json_value()["data"]}
        assert by_model["tiny-chat"]["requests"] == 13  # 3 lines sent one by one, 10 offloaded
    finally:
        await gateway.close()
    assert _processes_of(tmp_path / "data") == []


class _Owner:
    """A batch's owner at a shared gateway, as its run sees them: every other ask for a quota turn is told to wait
    a little (the quotas are tested with the shared gateway); the records handed back are kept."""

    user = "ada"

    def __init__(self) -> None:
        self.asks = 0
        self.records: list[UsageRecord] = []

    async def admit(self, req: ParsedRequest) -> None:
        pass

    async def wait_s(self, model: str) -> float:
        self.asks += 1
        return 0.2 if self.asks % 2 else 0.0

    def may_use(self, model: str, cluster: str) -> bool:
        return True

    def recorded(self, record: UsageRecord) -> None:
        self.records.append(record)

    def recorded_all(self, records: Sequence[UsageRecord]) -> None:
        self.records += records

    def token_for(self, resource_server: str) -> str | None:
        return None


@pytest.mark.timeout(2 * ENGINE_GUARD_S)
async def test_an_offloaded_batch_waits_its_owners_quota_turns_and_is_accounted_to_them(tiny_model, tmp_path):
    (tmp_path / "lost-once").touch()  # no lost node in this test
    gateway = build_gateway(parse_config(_config(tiny_model, tmp_path, parallel=1), "test"), tmp_path / "data",
                            environ={})
    owner = _Owner()
    batches = Batches(gateway, tmp_path / "ada", gateway.config.defaults.batch, caller=owner)
    try:
        batch = await _ended(batches, (await _submit(batches, _lines(10)))["id"])
        assert batch["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
        assert _runs(tmp_path) == ["chunk-00000.input.jsonl", "chunk-00001.input.jsonl", "chunk-00002.input.jsonl"]
        assert owner.asks == 6  # each chunk asked twice: told to wait, then let go
        tokens = {r["custom_id"]: r["response"]["body"]["usage"] for r in _results(batches, batch)}
        assert sorted((r.request_id, r.user, r.model, r.cluster, r.endpoint, r.capability, r.status,
                       r.prompt_tokens, r.completion_tokens) for r in owner.records) == sorted(
            (f"{batch['id']}/{custom_id}", "ada", "tiny-chat", "local", "engine", "chat", 200,
             usage["prompt_tokens"], usage["completion_tokens"]) for custom_id, usage in tokens.items())
        mine = (await gateway.usage_summary("ada")).json_value()["data"]
        assert [(m["model"], m["requests"], m["completion_tokens"]) for m in mine] == [
            ("tiny-chat", 10, sum(u["completion_tokens"] for u in tokens.values()))]
    finally:
        await gateway.close()
    assert _processes_of(tmp_path / "data") == []


@pytest.mark.timeout(2 * ENGINE_GUARD_S)
async def test_a_restarted_gateway_runs_only_the_chunks_not_done(tiny_model, tmp_path):
    (tmp_path / "lost-once").touch()  # no lost node in this test
    hold = tmp_path / "hold-chunk-1"
    hold.touch()  # the second chunk's run waits until its gateway stops: the stop comes mid-batch on any machine
    config = parse_config(_config(tiny_model, tmp_path, parallel=1), "test")
    first = build_gateway(config, tmp_path / "data", environ={})
    try:
        batch = await _submit(first.batches, _lines(10))
        async with asyncio.timeout(ENGINE_GUARD_S):  # only a guard: the hold decides where the batch stands still
            while (first.batches.batch(batch["id"]).request_counts.completed < 4
                   or "chunk-00001.input.jsonl" not in _runs(tmp_path)):
                await asyncio.sleep(0.05)
    finally:
        await first.close()  # mid-batch: the first chunk's results are in, the second under way, the third not begun
    assert _runs(tmp_path) == ["chunk-00000.input.jsonl", "chunk-00001.input.jsonl"]
    async with asyncio.timeout(60):  # only a guard: the held run ends with its worker, which the stop ended
        while _processes_of(tmp_path / "shared"):
            await asyncio.sleep(0.05)
    hold.unlink()

    second = build_gateway(config, tmp_path / "data", environ={})
    resuming = asyncio.ensure_future(second.batches.keep_running(every=0.1))
    try:
        done = await _ended(second.batches, batch["id"])
    finally:
        resuming.cancel()
        await second.close()
    assert done["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
    assert sorted(r["custom_id"] for r in _results(second.batches, done)) == sorted(f"q{i}" for i in range(10))
    # the first chunk's checkpoint held (not run again); the one cut short ran again; the third ran once
    assert _runs(tmp_path) == ["chunk-00000.input.jsonl", "chunk-00001.input.jsonl", "chunk-00001.input.jsonl",
                               "chunk-00002.input.jsonl"]
    assert _processes_of(tmp_path / "data") == []


# -- the pieces ---------------------------------------------------------------------------------------------------


def test_the_run_batch_command_does_vllm_run_batchs_job_against_the_engine(fake_upstream, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(_lines(5).replace(b'"tiny-chat"', b'"fake-model"'))
    out = tmp_path / "out.jsonl"
    assert run_batch.main(["-i", str(source), "-o", str(out), "--port", str(fake_upstream.port)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(x["custom_id"] for x in lines) == [f"q{i}" for i in range(5)]
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in lines)
    assert lines[0]["response"]["body"]["choices"][0]["message"]["content"].startswith("tok0")
    assert fake_upstream.by_route["/v1/chat/completions"] == 5


def test_a_chunk_is_whole_or_absent_and_one_already_done_is_not_run_again(tmp_path):
    script = tmp_path / "job.py"
    script.write_text("import sys; open(sys.argv[1], 'w').write('{\"custom_id\": \"a\"}\\n')")
    output = tmp_path / "chunk.output.jsonl"
    done = run_batch.run_chunk(["{python}", str(script), "{output}"], {}, str(output), 60)
    assert (done["lines"], done["reused"]) == (1, False)
    again = run_batch.run_chunk(["false"], {}, str(output), 60)  # would fail: never run
    assert again == {"lines": 1, "elapsed_s": 0.0, "reused": True}

    failing = tmp_path / "fail.py"
    failing.write_text("import sys; open(sys.argv[1], 'w').write('half'); sys.exit('out of GPU memory')")
    lost = tmp_path / "lost.output.jsonl"
    with pytest.raises(RuntimeError, match=r"exited with status 1 and an output: out of GPU memory"):
        run_batch.run_chunk([sys.executable, str(failing), "{output}"], {}, str(lost), 60)
    assert list(tmp_path.glob("lost.*")) == []  # no partial output left to be taken for a whole one


def test_an_offload_command_must_name_the_chunks_files(tmp_path):
    config = _config(tmp_path / "model", tmp_path, command=["vllm", "run-batch", "-i", "{input}"])
    with pytest.raises(ConfigError, match=r"command must name the chunk's files: \{output\} missing"):
        parse_config(config, "first.yaml")
