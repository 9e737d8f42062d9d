"""The functions that run on an endpoint's node, against an OpenAI-compatible engine there (the fake upstream),
with the gateway's callback route played by a loopback server that checks every signature."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import pytest

from bench.fake_upstream import FakeUpstream, serving_in_thread
from first_jupyter.remote.inference import call_engine, engine_health, sign, stream_engine
from tests.conftest import closed_port, serving_http

KEY = "per-task-key"
TASK = "task-1"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
PACE = 0.02
SLOW_PACE = 1.0
"""A pace that holds an answer after its first event: 20 s for the rest, at most a second to wait once let go."""


@pytest.fixture
def engine() -> Iterator[FakeUpstream]:
    with serving_in_thread(models=["fake-model"], chunks=20, pace=PACE) as upstream:
        yield upstream


class _Gateway(BaseHTTPRequestHandler):
    """The callback route: each POST's signature checked, then kept with its sequence number.

    With ``held`` set to an engine holding its answer, the first batch notes whether that engine was still
    generating when the batch came (``generating``), then lets it go on at ``PACE``.
    """

    received: ClassVar[list[tuple[int, dict[str, Any]]]] = []
    held: ClassVar[FakeUpstream | None] = None
    generating: ClassVar[list[bool]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        seq = int(self.headers["X-First-Seq"])
        good = (self.headers["X-First-Task"] == TASK
                and self.headers["X-First-Signature"] == sign(KEY, TASK, seq, body))
        if good:
            held = type(self).held
            if held is not None and not type(self).received:
                type(self).generating.append(held.active == 1)
                held.pace = PACE
            type(self).received.append((seq, json.loads(body)))
        self.send_response(204 if good else 403)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def callback() -> Iterator[str]:
    _Gateway.received, _Gateway.held, _Gateway.generating = [], None, []
    with serving_http(_Gateway) as url:
        yield f"{url}/first/api/callback"


def test_a_request_returns_the_engines_answer_and_timing(engine):
    result = call_engine(engine.port, "chat/completions", CHAT)
    assert result["status"] == 200
    assert json.loads(result["body"])["choices"][0]["message"]["content"].startswith("tok0 tok1")
    assert result["elapsed_s"] > 0
    engine.fault = "500"
    assert call_engine(engine.port, "chat/completions", CHAT)["status"] == 500


def test_health_says_whether_the_engine_answers(engine):
    health = engine_health(engine.port)
    assert (health["healthy"], health["status"], health["models"]) == (True, 200, ["fake-model"])
    down = engine_health(closed_port())
    assert (down["healthy"], down["status"]) == (False, None)
    assert "ConnectionRefusedError" in down["error"]


def test_a_stream_comes_back_in_signed_batches_while_it_is_generated(engine, callback):
    engine.pace = SLOW_PACE  # after its first event the engine holds the rest (20 s) until the first batch is in
    _Gateway.held = engine
    summary = stream_engine(engine.port, "chat/completions", CHAT, callback, TASK, KEY, batch_s=0.05)
    received = _Gateway.received
    assert [seq for seq, _ in received] == list(range(len(received)))
    assert received[-1][1] == {"done": True}
    batches = [message["data"] for _, message in received[:-1]]
    assert _Gateway.generating == [True]  # the first batch came while the engine was still generating
    assert batches[0].count("data: {") == 1  # the first event went at once, on its own: time to first token
    assert len(batches) >= 2
    assert all(batch.endswith("\n\n") for batch in batches)  # never an event cut in two
    whole = "".join(batches)
    assert whole.count("data: {") == 21  # 20 tokens and the finish event
    assert whole.rstrip().endswith("data: [DONE]")
    assert summary["batches"] == len(received)
    assert summary["bytes"] == len(whole.encode())


def test_without_a_callback_the_stream_comes_back_whole(engine):
    summary = stream_engine(engine.port, "chat/completions", CHAT, None, TASK, KEY)
    assert summary["body"].count("data: {") == 21
    assert summary["batches"] == 0


def test_an_engine_error_comes_back_as_its_status(engine, callback):
    engine.fault = "500"
    summary = stream_engine(engine.port, "chat/completions", CHAT, callback, TASK, KEY)
    assert summary["status"] == 500
    assert _Gateway.received == []


def test_a_stream_that_breaks_off_on_the_node_is_reported_to_the_gateway(engine, callback):
    engine.fault = "drop-mid-stream"
    with pytest.raises((OSError, ValueError)):
        stream_engine(engine.port, "chat/completions", CHAT, callback, TASK, KEY)
    last = _Gateway.received[-1][1]
    assert "the engine's stream broke off on the node" in last["error"]


def test_a_refused_batch_stops_the_stream_on_the_node(engine, callback):
    with pytest.raises(RuntimeError, match="refused the stream's batch 0: HTTP 403"):
        stream_engine(engine.port, "chat/completions", CHAT, callback, TASK, "someone-elses-key")
