"""Batch lines sharing an opening are issued together, within a bounded look-ahead (``batch.grouping``), so the
router keeps each group on the endpoint whose prefix cache holds it; whatever order they went in, a run resumed
after a stop sends exactly the lines its result files lack. The grouping alone, then a batch through a gateway
over two fake upstreams on the test's loop (what each was sent, recorded as it arrives), then an offloaded chunk's
input."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson

from bench.fake_upstream import FakeUpstream
from first_jupyter.batch.grouping import alone, grouped, opening
from first_jupyter.batch.offload import _split
from first_jupyter.config import parse_config
from first_jupyter.gateway.core import Gateway
from first_jupyter.service import build_gateway

CHAT = "/v1/chat/completions"
LINES = 24
WINDOW = 4
"""``defaults.batch.max_in_flight``: the endpoints' concurrency (8 each, loaded at 6) is more, so neither is loaded
by the batch alone and the window is the batch's."""
PROMPTS = ("You summarize ALCF job logs, one line per job.", "You translate error messages into plain English.")


def test_equal_keys_come_together_each_item_once_within_a_bounded_look_ahead():
    items = [(i, "PQ"[i % 2]) for i in range(40)]
    read = 0

    def source() -> Iterator[tuple[int, str]]:
        nonlocal read
        for item in items:
            read += 1
            yield item

    out = []
    for item in grouped(source(), lambda item: item[1], depth=8):
        assert read - len(out) <= 8  # never more than the look-ahead held ahead of what was issued
        out.append(item)
    assert sorted(out) == items
    keys = "".join(key for _, key in out)
    assert keys.startswith("PPPP")  # the oldest line's group first, while its lines are held
    assert keys.count("PQ") + keys.count("QP") < 10  # runs of a group, not the file's alternation
    assert max(at - i for at, (i, _) in enumerate(out)) < 2 * 8  # no line waits behind much more than that


def test_a_large_group_does_not_starve_the_rest_and_distinct_keys_keep_file_order():
    items = [(i, "Q" if i == 1 else "P") for i in range(100)]
    out = [i for i, _ in grouped(items, lambda item: item[1], depth=8)]
    assert sorted(out) == list(range(100))
    assert out.index(1) < 2 * 8  # the one Q line is not held behind the 98 P lines that follow it
    assert list(grouped(range(30), lambda item: item, depth=8)) == list(range(30))


def _line(i: int) -> dict[str, Any]:
    return {"custom_id": f"line-{i}", "method": "POST", "url": CHAT, "body": {
        "model": "shared", "max_tokens": 8, "messages": [{"role": "system", "content": PROMPTS[i % 2]},
                                                         {"role": "user", "content": f"line-{i}"}]}}


class Engines:
    """Two fake upstreams on the test's loop, and what each was sent (the line each chat request came from)."""

    def __init__(self) -> None:
        self.alpha, self.beta = FakeUpstream(models=["shared"]), FakeUpstream(models=["shared"])
        self.sent: dict[str, list[str]] = {"alpha": [], "beta": []}
        self.arrived = 0
        self._awaited: tuple[int, asyncio.Event] | None = None
        for name, upstream in (("alpha", self.alpha), ("beta", self.beta)):
            upstream.on_request = lambda path, body, name=name: self._arrived(name, path, body)

    def _arrived(self, name: str, path: str, body: bytes) -> None:
        if path != CHAT:
            return
        self.sent[name].append(orjson.loads(body)["messages"][1]["content"])
        self.arrived += 1
        if self._awaited is not None and self.arrived >= self._awaited[0]:
            self._awaited[1].set()

    async def until_arrived(self, count: int) -> None:
        """Until ``count`` chat requests reached the engines, together."""
        event = asyncio.Event()
        self._awaited = (count, event)
        if self.arrived < count:
            await event.wait()

    def config(self) -> dict[str, Any]:
        clusters = {name: {"backend": "http", "endpoints": [{"name": "engine", "base_url": f"{up.url}/v1",
                                                             "concurrency": 8, "models": [{"id": "shared"}]}]}
                    for name, up in (("alpha", self.alpha), ("beta", self.beta))}
        return {"clusters": clusters, "auth": {"sources": ["env"]},
                "defaults": {"batch": {"max_in_flight": WINDOW}}}

    def gate(self, passes: int | None) -> None:
        """Hold both gates, letting ``passes`` requests through each; None opens them."""
        for upstream in (self.alpha, self.beta):
            if passes is None:
                upstream.release()
            else:
                upstream.hold()
                upstream.release(passes)


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[Engines]:
    """Two fake upstreams on this test's loop."""
    pair = Engines()
    await pair.alpha.start()
    await pair.beta.start()
    try:
        yield pair
    finally:
        await pair.alpha.stop()
        await pair.beta.stop()


def _gateway(engines: Engines, data: Path) -> Gateway:
    return build_gateway(parse_config(engines.config(), "test"), data, environ={})


async def _start(gateway: Gateway) -> str:
    store = gateway.batches.store
    path = store.path("file-interleaved")
    path.write_bytes(b"".join(orjson.dumps(_line(i)) + b"\n" for i in range(LINES)))
    store.add_file("batch", "interleaved.jsonl", path.stat().st_size, LINES, "file-interleaved")
    created = await gateway.batches.create(orjson.dumps({"input_file_id": "file-interleaved", "endpoint": CHAT,
                                                         "completion_window": "24h"}))
    return created.id


def _results(gateway: Gateway, batch_id: str) -> dict[str, list[str]]:
    """custom_ids per result file (output, error), as the files hold them now: mid-run or after."""
    store = gateway.batches.store
    ids: dict[str, list[str]] = {}
    for name, file_id in zip(("output", "error"), store.result_ids(batch_id), strict=True):
        path = store.path(file_id)
        ids[name] = [orjson.loads(raw)["custom_id"] for raw in path.read_bytes().splitlines()] if path.exists() else []
    return ids


async def test_lines_sharing_a_system_prompt_are_issued_together_and_each_prompt_stays_on_one_engine(tmp_path):
    async with serving() as engines:
        await _issued_together(engines, tmp_path)


async def _issued_together(engines: Engines, tmp_path: Path) -> None:
    engines.gate(0)
    gateway = _gateway(engines, tmp_path)
    try:
        batch_id = await _start(gateway)
        await engines.until_arrived(WINDOW)
        first = engines.sent["alpha"] + engines.sent["beta"]
        assert len(first) == WINDOW
        assert {int(line.split("-")[1]) % 2 for line in first} == {0}  # the window: one prompt's lines, not P,Q,P,Q
        assert engines.sent["beta"] == []  # all on the engine the prompt went to first (its cache holds it)
        engines.gate(None)
        await gateway.batches.ended(batch_id)
        assert sorted(_results(gateway, batch_id)["output"]) == sorted(f"line-{i}" for i in range(LINES))
        for name in ("alpha", "beta"):  # each engine was sent one prompt's lines: neither was loaded
            assert len({int(line.split("-")[1]) % 2 for line in engines.sent[name]}) == 1, engines.sent
        assert engines.arrived == LINES  # each line once
    finally:
        await gateway.close()


async def test_a_run_resumed_after_a_stop_sends_exactly_the_lines_not_answered(tmp_path):
    async with serving() as engines:
        await _resumed(engines, tmp_path)


async def _resumed(engines: Engines, tmp_path: Path) -> None:
    engines.gate(3)  # the first prompt's lines go to one engine: 3 answered, then the window waits there
    gateway = _gateway(engines, tmp_path)
    try:
        batch_id = await _start(gateway)
        await engines.until_arrived(3 + WINDOW)
    finally:
        await gateway.close()  # the gateway stops: what was in flight is dropped
    sent_before = engines.arrived
    engines.sent = {"alpha": [], "beta": []}
    engines.gate(None)
    resumed = _gateway(engines, tmp_path)
    try:
        answered = set(_results(resumed, batch_id)["output"])
        assert len(answered) == 3
        assert {int(line.split("-")[1]) % 2 for line in answered} == {0}  # of the first prompt's group
        resumed.batches.resume()
        await resumed.batches.ended(batch_id)
        results = _results(resumed, batch_id)
        assert results["error"] == []
        assert sorted(results["output"]) == sorted(f"line-{i}" for i in range(LINES))  # each custom_id once
        sent_after = engines.sent["alpha"] + engines.sent["beta"]
        assert sorted(sent_after) == sorted({f"line-{i}" for i in range(LINES)} - answered)  # the rest, once each
        assert sent_before == 3 + WINDOW
    finally:
        await resumed.close()


def test_an_offloaded_chunk_holds_the_same_lines_a_prompt_after_the_other(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(orjson.dumps(_line(i)) + b"\n" for i in range(LINES)))
    done = {hash("line-2")}  # answered before a restart: not in its chunk's input again
    chunks = _split(source, tmp_path, 10, done, {"shared": "engine-name"}, opening)
    assert [chunk.index for chunk in chunks] == [0, 1, 2]
    assert chunks[0].pending == {f"line-{i}" for i in range(10)} - {"line-2"}  # a chunk's lines: k*10 onwards
    written = [orjson.loads(raw) for raw in chunks[0].input.read_bytes().splitlines()]
    assert [line["custom_id"] for line in written] == ["line-0", "line-4", "line-6", "line-8", "line-1", "line-3",
                                                       "line-5", "line-7", "line-9"]
    assert {line["body"]["model"] for line in written} == {"engine-name"}
    (tmp_path / "plain").mkdir()
    in_file_order = _split(source, tmp_path / "plain", 10, set(), {"shared": "engine-name"}, alone)
    assert [orjson.loads(raw)["custom_id"] for raw in in_file_order[2].input.read_bytes().splitlines()] == [
        f"line-{i}" for i in range(20, LINES)]
