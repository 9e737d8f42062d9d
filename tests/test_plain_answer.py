"""A plain answer put together on the node from the engine's stream: what the engine would have answered plainly,
tool calls, several choices, log-probabilities and the engine's own fields included; an error the engine reports
in the stream is the plain answer's error, with its status."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any, ClassVar
from unittest.mock import ANY

import pytest

from first_jupyter.remote.inference import call_engine
from first_jupyter.remote.plain_answer import PlainAnswer
from tests.conftest import serving_http

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 7, "model": "m", "usage": None}


def _chunk(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {**BASE, "choices": list(choices), **top}


def test_tool_calls_told_in_pieces_become_whole_calls():
    """As vLLM streams them: the call's id, type and name first, its arguments in pieces after."""
    answer = PlainAnswer(chat=True)
    for event in (
        _chunk({"index": 0, "delta": {"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ""}}]},
            "logprobs": None, "finish_reason": None}),
        _chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}}),
        _chunk({"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}),
        _chunk({"index": 0, "delta": {"tool_calls": [
            {"index": 1, "id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}}]}}),
        _chunk({"index": 0, "delta": {}, "finish_reason": "tool_calls", "stop_reason": None}),
        _chunk(usage={"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}),
    ):
        answer.add(event)
    body = answer.body()
    assert body["object"] == "chat.completion"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert calls == [{"id": "call_a", "type": "function", "function": {"name": "weather", "arguments": ANY}},
                     {"id": "call_b", "type": "function", "function": {"name": "time", "arguments": "{}"}}]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}  # (no index: a plain call has none)
    assert answer.finished()


def test_choices_log_probabilities_and_the_engines_own_fields_are_kept():
    answer = PlainAnswer(chat=True)
    token = {"token": "x", "logprob": -0.5, "bytes": [120], "top_logprobs": []}
    for event in (
        _chunk({"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "logprobs": {"content": [token]}},
               {"index": 1, "delta": {"role": "assistant", "content": "Bon"}, "logprobs": {"content": [token]}}),
        _chunk({"index": 1, "delta": {"content": "jour"}, "logprobs": {"content": [token]}}),
        _chunk({"index": 0, "delta": {"content": "lo", "reasoning_content": "greet"},
                "logprobs": {"content": [token]}}),
        _chunk({"index": 1, "delta": {}, "finish_reason": "stop", "stop_reason": 128001}),
    ):
        answer.add(event)
    assert not answer.finished()  # choice 0 has not ended: a stream cut short
    answer.add(_chunk({"index": 0, "delta": {}, "finish_reason": "length", "stop_reason": None},
                      system_fingerprint="fp-1"))
    assert answer.finished()
    first, second = answer.body()["choices"]
    assert first["message"] == {"role": "assistant", "content": "Hello", "reasoning_content": "greet"}
    assert (first["finish_reason"], first["logprobs"]["content"]) == ("length", [token, token])
    assert second["message"] == {"role": "assistant", "content": "Bonjour"}
    assert (second["finish_reason"], second["stop_reason"]) == ("stop", 128001)
    assert answer.body()["system_fingerprint"] == "fp-1"


def test_a_completions_text_and_its_log_probabilities_follow_each_other():
    answer = PlainAnswer(chat=False)
    answer.add({"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [
        {"index": 0, "text": "a", "logprobs": {"tokens": ["a"], "token_logprobs": [-1.0], "text_offset": [0]}}]})
    answer.add({"id": "cmpl-1", "object": "text_completion", "model": "m", "choices": [
        {"index": 0, "text": "b", "logprobs": {"tokens": ["b"], "token_logprobs": [-2.0], "text_offset": [1]},
         "finish_reason": "length"}]})
    (choice,) = answer.body()["choices"]
    assert choice["text"] == "ab"
    assert choice["logprobs"] == {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0], "text_offset": [0, 1]}
    assert answer.body()["object"] == "text_completion"


class _Engine(BaseHTTPRequestHandler):
    """An engine that breaks off its stream with an error event, shaped as ``events`` says."""

    events: ClassVar[list[bytes]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for event in self.events:
            self.wfile.write(event)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def engine_port() -> Iterator[int]:
    with serving_http(_Engine) as url:
        yield int(url.rsplit(":", 1)[1])


@pytest.mark.parametrize(("error", "status", "message"), [
    ('"CUDA out of memory"', 500, "CUDA out of memory"),  # transformers serve: a message
    ('{"object": "error", "message": "too long", "type": "BadRequestError", "code": 400}', 400, "too long"),  # vLLM
])
def test_an_error_the_engine_reports_in_its_stream_is_the_plain_answers_error(engine_port, error, status, message):
    first = json.dumps(_chunk({"index": 0, "delta": {"role": "assistant", "content": "a"}})).encode()
    _Engine.events = [b"data: " + first + b"\n\n", b'data: {"error": ' + error.encode() + b"}\n\n"]
    result = call_engine(engine_port, "chat/completions", {"model": "m", "messages": []})
    assert result["status"] == status
    assert json.loads(result["body"])["error"]["message"] == message
