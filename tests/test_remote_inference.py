"""The functions that run on an endpoint's node, against an OpenAI-compatible engine there (the fake upstream),
with the gateway's callback route played by a loopback server that checks every signature."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar

import pytest

from bench.fake_upstream import FakeUpstream, serving_in_thread
from first_jupyter.gateway.backends.compute.callbacks import ALIVE
from first_jupyter.remote.inference import (
    CallbackFailed,
    call_engine,
    engine_health,
    plain_request,
    sign,
    stream_engine,
)
from tests.conftest import closed_port, gate, held, serving_http
from tests.waiting import eventually

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
    """The callback route: each POST's signature checked, then kept with its sequence number; the node's word that
    it still works (``{"alive": true}``) is counted in ``words`` instead. With ``closed`` set, everything about the
    task is refused, as the gateway refuses a task it has closed.

    With ``held`` set to an engine holding its answer, the first batch notes whether that engine was still
    generating when the batch came (``generating``), then lets it go on at ``PACE``.
    """

    received: ClassVar[list[tuple[int, dict[str, Any]]]] = []
    held: ClassVar[FakeUpstream | None] = None
    generating: ClassVar[list[bool]] = []
    words: ClassVar[int] = 0
    closed: ClassVar[bool] = False

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        seq = int(self.headers["X-First-Seq"])
        good = (self.headers["X-First-Task"] == TASK and not type(self).closed
                and self.headers["X-First-Signature"] == sign(KEY, TASK, seq, body))
        if good and json.loads(body) == ALIVE:
            type(self).words += 1
        elif good:
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
    _Gateway.received, _Gateway.held, _Gateway.generating, _Gateway.words, _Gateway.closed = [], None, [], 0, False
    with serving_http(_Gateway) as url:
        yield f"{url}/first/api/callback"
    _Gateway.closed = False  # (the class is test_callback_proxy's route too)


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


# -- a plain request: streamed from the engine, and stopped when nobody wants its answer ---------------------------

WORD_S = 0.05
"""How often the node asks whether its answer is still wanted, in these tests (a second in production)."""


@pytest.mark.parametrize(("route", "body"), [
    ("chat/completions", CHAT), ("completions", {"model": "fake-model", "prompt": "hi", "max_tokens": 20})])
def test_a_plain_answer_put_together_from_the_engines_stream_is_the_engines_own(engine, callback, route, body):
    """The node asks the engine for a stream (only a stream's end stops every engine's generation), and
    answers with what the engine would have answered plainly."""
    assembled = call_engine(engine.port, route, body, 30, callback, TASK, KEY, None, WORD_S)
    own = plain_request(engine.port, route, body)
    assert (assembled["status"], own["status"]) == (200, 200)
    assert json.loads(assembled["body"]) == json.loads(own["body"])
    assert engine.by_route[f"/v1/{route}"] == 2
    assert _Gateway.words >= 1  # asked before the engine was, and while it generated
    assert _Gateway.received == []  # a plain answer comes back as the task's result, not through the route


def test_a_plain_request_the_gateway_withdraws_stops_the_engines_work(engine, callback):
    gate(engine, hold=True)  # the engine is at work on it (its answer held) until the node goes away
    node = _in_thread(call_engine, engine.port, "chat/completions", CHAT, 30, callback, TASK, KEY, None, WORD_S)
    eventually(lambda: held(engine) == 1, "the engine holds the request")
    _Gateway.closed = True  # the client left: the gateway refuses the task's next word
    result = node.result(timeout=30)
    assert result["status"] == 499
    assert json.loads(result["body"])["error"]["code"] == "request_withdrawn"
    eventually(lambda: len(engine.disconnects) == 1, "the engine sees its client gone")  # the node went away
    assert (engine.requests, engine.active) == (1, 0)


def test_a_task_withdrawn_before_it_ran_never_reaches_the_engine(engine, callback):
    _Gateway.closed = True  # its client left while it waited in the endpoint's queue
    result = call_engine(engine.port, "chat/completions", CHAT, 30, callback, TASK, KEY, None, WORD_S)
    assert result["status"] == 499
    assert engine.requests == 0


@pytest.mark.parametrize("with_callback", [True, False])
def test_a_plain_request_past_its_deadline_stops_the_engines_work(engine, callback, with_callback):
    """The node keeps the deadline itself, whether it can reach the gateway or not: here a task that began past
    it (it waited in the queue), whose request the engine holds (at work) when the node looks."""
    gate(engine, hold=True)
    result = call_engine(engine.port, "chat/completions", CHAT, 30, callback if with_callback else None, TASK, KEY,
                         time.time(), WORD_S)
    assert result["status"] == 504
    assert "deadline" in json.loads(result["body"])["error"]["message"]
    eventually(lambda: len(engine.disconnects) == 1, "the engine sees its client gone")
    assert (engine.requests, engine.active) == (1, 0)


def test_an_error_event_from_the_engine_is_a_plain_answers_error(engine, callback):
    engine.fault = "drop-mid-stream"  # the stream breaks off: no answer to put together
    with pytest.raises(ConnectionError, match="closed the stream before its last event"):
        call_engine(engine.port, "chat/completions", CHAT, 30, callback, TASK, KEY, None, WORD_S)


def test_a_silent_stream_the_gateway_withdraws_stops_the_engines_work(engine, callback):
    """Before its first token the engine says nothing for a while (a long prompt, a full batch): the node asks
    whether it is still wanted, and stops when the gateway says no."""
    gate(engine, hold=True)
    node = _in_thread(stream_engine, engine.port, "chat/completions", CHAT, callback, TASK, KEY, 16384, 0.05, 30,
                      None, WORD_S)
    eventually(lambda: held(engine) == 1 and _Gateway.words > 0, "the engine holds the request, the node asks")
    _Gateway.closed = True
    with pytest.raises(CallbackFailed, match="no longer wants the stream"):
        node.result(timeout=30)
    eventually(lambda: len(engine.disconnects) == 1, "the engine sees its client gone")
    assert (engine.requests, engine.active) == (1, 0)
    assert _Gateway.received == []


def test_a_whole_stream_past_its_deadline_stops_the_engines_work(engine):
    gate(engine, hold=True)
    summary = stream_engine(engine.port, "chat/completions", CHAT, None, TASK, KEY, 16384, 0.05, 30, time.time())
    assert summary["status"] == 504
    eventually(lambda: len(engine.disconnects) == 1, "the engine sees its client gone")
    assert (engine.requests, engine.active) == (1, 0)


def _in_thread(function: Any, *args: Any) -> Future[Any]:
    """``function(*args)`` in a thread, as a node runs it, while the test moves the engine and the gateway."""
    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(function, *args)
    finally:
        pool.shutdown(wait=False)
