"""Anthropic's Messages API translated to and from chat completions (first_jupyter.gateway.messages).

The translation is pure, so most of it is tested on dicts and bytes. The proof that its shapes are Anthropic's is
the official ``anthropic`` client, unchanged, against a loopback door that translates with these modules: to the
fake upstream (bench/fake_upstream.py, a streaming OpenAI-compatible engine) and to a stand-in engine that
answers canned chat completions (tool calls, errors, ``/tokenize``) and records what it was sent.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from bench.fake_upstream import PROMPT_TOKENS, FakeUpstream
from first_jupyter.gateway.messages import count_tokens
from first_jupyter.gateway.messages.errors import (
    error_event,
    error_type,
    from_openai_error,
    stream_error_event,
)
from first_jupyter.gateway.messages.request import ChatTranslation, decode, to_chat
from first_jupyter.gateway.messages.response import message_from_chat, stop_reason
from first_jupyter.gateway.messages.stream import MAX_EVENT, ChatChunkReader, StreamTranslator
from first_jupyter.gateway.upstream import upstream_error
from first_jupyter.protocol import OpenAIError
from tests.conftest import send_json, serving_http

PNG = "iVBORw0KGgo="
WEATHER_TOOL = {"name": "get_weather", "description": "The weather in a city now.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}], **fields}


def _events(blobs: list[bytes]) -> list[dict[str, Any]]:
    """Anthropic SSE events back as their data, checking each is one event whose name is its data's type."""
    events = []
    for blob in blobs:
        head, data, end = blob.split(b"\n", 2)
        assert head.startswith(b"event: ")
        assert data.startswith(b"data: ")
        assert end == b"\n"
        event = orjson.loads(data[6:])
        assert event["type"] == head[7:].decode()
        events.append(event)
    return events


# ---- the request ----

def test_system_and_text_blocks_become_strings_and_hints_are_dropped():
    translated = to_chat(_body(
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Answer in French."}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "Bonjour"},
                                               {"type": "text", "text": "ça va ?"}]},
                  {"role": "assistant", "content": "Oui."},
                  {"role": "user", "content": "Et toi ?"}]))
    assert translated.chat["messages"] == [
        {"role": "system", "content": "You are terse.\nAnswer in French."},
        {"role": "user", "content": "Bonjour\nça va ?"},
        {"role": "assistant", "content": "Oui."},
        {"role": "user", "content": "Et toi ?"},
    ]
    assert to_chat(_body(system="Be brief.")).chat["messages"][0] == {"role": "system", "content": "Be brief."}


def test_images_become_image_url_parts_in_order():
    translated = to_chat(_body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.org/cat.jpg"}},
    ]}]))
    assert translated.chat["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.org/cat.jpg"}},
    ]}]


def test_tools_become_function_tools():
    bare = {"name": "now", "input_schema": {"type": "object", "properties": {}}, "type": "custom"}
    translated = to_chat(_body(tools=[WEATHER_TOOL, bare]))
    assert translated.chat["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now.",
                                          "parameters": WEATHER_TOOL["input_schema"]}},
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
    ]
    assert "tool_choice" not in translated.chat  # the engine's default (auto with tools) stands


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, {"tool_choice": "auto"}),
    ({"type": "any"}, {"tool_choice": "required"}),
    ({"type": "none"}, {"tool_choice": "none"}),
    ({"type": "tool", "name": "get_weather"},
     {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
    ({"type": "auto", "disable_parallel_tool_use": True}, {"tool_choice": "auto", "parallel_tool_calls": False}),
    ({"type": "any", "disable_parallel_tool_use": False}, {"tool_choice": "required"}),
])
def test_tool_choice(choice, expected):
    chat = to_chat(_body(tools=[WEATHER_TOOL], tool_choice=choice)).chat
    assert {key: chat[key] for key in ("tool_choice", "parallel_tool_calls") if key in chat} == expected


def test_tool_use_and_tool_results_keep_their_order():
    messages = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two tools.", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": "18 C"},
            {"type": "tool_result", "tool_use_id": "toolu_b", "is_error": True, "content": [
                {"type": "text", "text": "clock"}, {"type": "text", "text": "unavailable"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
            {"type": "text", "text": "Summarise."},
        ]},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_c", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_c"}]},
    ]
    assert to_chat(_body(messages=messages)).chat["messages"] == [
        {"role": "user", "content": "Weather and time in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "toolu_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
        ]},
        {"role": "tool", "tool_call_id": "toolu_a", "content": "18 C"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "clock\nunavailable"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                                     {"type": "text", "text": "Summarise."}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_c", "content": ""},
    ]


def test_sampling_fields_stream_and_pass_through():
    body = _body(max_tokens=300, temperature=0.2, top_p=0.9, top_k=40, stop_sequences=["\n\nHuman:", "END"],
                 metadata={"user_id": "u-42"}, stream=True, service_tier="auto", cache_control={"type": "ephemeral"},
                 inference_geo="us", speed="fast", chat_template_kwargs={"enable_thinking": False},
                 output_config={"effort": "high", "format": {"type": "json_schema", "schema": {"type": "object"}}})
    translated = to_chat(body)
    assert translated == ChatTranslation(
        chat={"model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 300, "temperature": 0.2,
              "top_p": 0.9, "top_k": 40, "stop": ["\n\nHuman:", "END"], "user": "u-42", "stream": True,
              "stream_options": {"include_usage": True}, "chat_template_kwargs": {"enable_thinking": False},
              "reasoning_effort": "high", "response_format": {
                  "type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}}}},
        model="m", stream=True, stop_sequences=("\n\nHuman:", "END"))
    without_top_k = to_chat(body, engine_takes_top_k=False).chat
    assert "top_k" not in without_top_k
    assert without_top_k["top_p"] == 0.9
    assert to_chat(_body(stream=False)).chat["stream"] is False
    assert to_chat(_body(stream=False)).stream is False


@pytest.mark.parametrize(("change", "param", "words"), [
    ({"model": None}, "model", "Missing 'model'"),
    ({"messages": None}, "messages", "Missing 'messages'"),
    ({"max_tokens": None}, "max_tokens", "Missing 'max_tokens'"),
    ({"model": ""}, "model", "non-empty string"),
    ({"messages": []}, "messages", "non-empty list"),
    ({"max_tokens": 0}, "max_tokens", "at least 1"),
    ({"max_tokens": True}, "max_tokens", "at least 1"),
    ({"system": 3}, "system", "string or a list of text blocks"),
    ({"system": [{"type": "image"}]}, "system[0].type", "must be 'text'"),
    ({"metadata": "u"}, "metadata", "must be an object"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", "top-level 'system'"),
    ({"messages": [{"role": "user", "content": []}]}, "messages[0].content", "non-empty list"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages[0].content[0]", '"type"'),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text", "missing"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "messages[0].content[0].type",
     "'document' block cannot be translated"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]}]},
     "messages[0].content[0].type", "text, tool_use and thinking"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "file_id": "f"}}]}]},
     "messages[0].content[0].source.type", "Files API"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "data": PNG}}]}]},
     "messages[0].content[0].source.media_type", "missing"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": "x"}]}]},
     "messages[0].content[0].input", "arguments"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [
        {"type": "document"}]}]}]}, "messages[0].content[0].content[0].type", "text and image"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type", "server tools"),
    ({"tools": [{"name": "f"}]}, "tools[0].input_schema", "JSON schema"),
    ({"tools": [{"input_schema": {}}]}, "tools[0].name", "missing"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice.name", "missing"),
    ({"tool_choice": {"type": "some"}}, "tool_choice.type", "'auto', 'any', 'tool' or 'none'"),
    ({"output_config": "json"}, "output_config", "must be an object"),
    ({"output_config": {"format": {"type": "text"}}}, "output_config.format", "json_schema"),
    ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema", "JSON schema object"),
])
def test_invalid_requests_name_the_field(change, param, words):
    body = {key: value for key, value in {**_body(), **change}.items() if value is not None}
    with pytest.raises(OpenAIError) as caught:
        to_chat(body)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert f"'{param}'" in caught.value.message
    assert words in caught.value.message
    assert orjson.loads(from_openai_error(caught.value)) == {
        "type": "error", "error": {"type": "invalid_request_error", "message": caught.value.message}}


@pytest.mark.parametrize(("raw", "words"), [(b"{", "not valid JSON"), (b"[1]", "must be a JSON object")])
def test_a_body_that_is_no_json_object(raw, words):
    with pytest.raises(OpenAIError) as caught:
        decode(raw)
    assert caught.value.status == 400
    assert words in caught.value.message
    assert decode(orjson.dumps(_body())) == _body()


# ---- the answer ----

def _translation(**fields: Any) -> ChatTranslation:
    return to_chat(_body(**fields))


def test_a_text_answer_becomes_a_message():
    answer = {"id": "chatcmpl-123", "object": "chat.completion", "model": "engine/name", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}
    assert message_from_chat(answer, _translation()) == {
        "id": "msg_123", "type": "message", "role": "assistant", "model": "m",
        "content": [{"type": "text", "text": "Hello!"}], "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 11, "output_tokens": 3}}


def test_tool_calls_become_tool_use_blocks():
    answer = {"id": "chatcmpl-9", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}}]}}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 9}}
    message = message_from_chat(answer, _translation(tools=[WEATHER_TOOL]))
    assert message["content"] == [
        {"type": "text", "text": "Let me look."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Oslo"}},
        {"type": "tool_use", "id": "call_2", "name": "now", "input": {}},
    ]
    assert message["stop_reason"] == "tool_use"


@pytest.mark.parametrize(("finish", "matched", "used_tools", "expected"), [
    ("stop", None, False, ("end_turn", None)),
    ("stop", "END", False, ("stop_sequence", "END")),
    ("stop", "NOT-ASKED", False, ("end_turn", None)),
    ("stop", 128001, False, ("end_turn", None)),  # vLLM: a stop token id, not a sequence the client sent
    ("stop", None, True, ("tool_use", None)),
    ("length", None, False, ("max_tokens", None)),
    ("tool_calls", None, True, ("tool_use", None)),
    ("content_filter", None, False, ("refusal", None)),
])
def test_stop_reasons(finish, matched, used_tools, expected):
    assert stop_reason(finish, matched, _translation(stop_sequences=["END"]), used_tools=used_tools) == expected


@pytest.mark.parametrize(("answer", "words"), [
    ({"choices": []}, "holds no choices"),
    ({"choices": [{"message": {"tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}}]}, "not JSON"),
    ({"choices": [{"message": {"tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}}]}, "no JSON object"),
    ({"choices": [{"message": {"tool_calls": ["f()"]}}]}, "not OpenAI's shape"),
])
def test_an_answer_that_cannot_be_a_message_is_a_502(answer, words):
    with pytest.raises(OpenAIError) as caught:
        message_from_chat(answer, _translation())
    assert caught.value.status == 502
    assert words in caught.value.message
    assert orjson.loads(from_openai_error(caught.value))["error"]["type"] == "api_error"


# ---- the stream ----

TEXT_CHUNKS = [
    {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "model": "engine",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
    {"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": None}]},
    {"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
    {"id": "chatcmpl-s1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "END"}]},
    {"id": "chatcmpl-s1", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}},
]
TOOL_CHUNKS = [
    {"id": "chatcmpl-t1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Let me check."}}]},
    {"id": "chatcmpl-t1", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]},
    {"id": "chatcmpl-t1", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": '{"city": '}}]}}]},
    {"id": "chatcmpl-t1", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 0, "function": {"arguments": '"Paris"}'}}]}}]},
    {"id": "chatcmpl-t1", "choices": [{"index": 0, "delta": {"tool_calls": [
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}}]},
    {"id": "chatcmpl-t1", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    {"id": "chatcmpl-t1", "choices": [], "usage": {"prompt_tokens": 31, "completion_tokens": 12}},
]


def _translate_stream(chunks: list[dict[str, Any]], translation: ChatTranslation) -> list[dict[str, Any]]:
    translator = StreamTranslator(translation)
    blobs = [blob for chunk in chunks for blob in translator.feed(chunk)]
    return _events(blobs + translator.finish())


def test_a_text_stream_becomes_anthropic_events():
    events = _translate_stream(TEXT_CHUNKS, _translation(stream=True, stop_sequences=["END"]))
    assert events == [
        {"type": "message_start", "message": {
            "id": "msg_s1", "type": "message", "role": "assistant", "model": "m", "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}},
        {"type": "ping"},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"},
         "usage": {"input_tokens": 7, "output_tokens": 2}},
        {"type": "message_stop"},
    ]


def test_tool_calls_stream_as_one_block_each_with_json_pieces():
    events = _translate_stream(TOOL_CHUNKS, _translation(stream=True, tools=[WEATHER_TOOL]))
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None), ("ping", None),
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None),
    ]
    assert events[5]["content_block"] == {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}}
    assert [e["delta"] for e in events[6:8]] == [{"type": "input_json_delta", "partial_json": '{"city": '},
                                                 {"type": "input_json_delta", "partial_json": '"Paris"}'}]
    assert events[9]["content_block"] == {"type": "tool_use", "id": "call_b", "name": "get_time", "input": {}}
    assert events[12] == {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                          "usage": {"input_tokens": 31, "output_tokens": 12}}


def test_text_after_a_tool_call_opens_a_new_block():
    more_text = {"id": "chatcmpl-t1", "choices": [{"index": 0, "delta": {"content": "Done."}}]}
    events = _translate_stream([*TOOL_CHUNKS[:4], more_text, *TOOL_CHUNKS[5:]], _translation(stream=True))
    assert [(e["type"], e.get("index")) for e in events[8:]] == [
        ("content_block_stop", 1), ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2),
        ("message_delta", None), ("message_stop", None)]
    assert events[9]["content_block"] == {"type": "text", "text": ""}
    assert events[10]["delta"] == {"type": "text_delta", "text": "Done."}


def test_usage_in_the_first_chunk_goes_into_message_start():
    first = {**TEXT_CHUNKS[1], "usage": {"prompt_tokens": 7, "completion_tokens": 1}}  # vLLM's continuous usage
    events = _translate_stream([first, *TEXT_CHUNKS[2:]], _translation(stream=True))
    assert events[0]["message"]["usage"] == {"input_tokens": 7, "output_tokens": 0}
    assert events[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}  # END was not asked for


@pytest.mark.parametrize(("payload", "kind", "message"), [
    ({"error": {"message": "KV cache full", "type": "server_error", "param": None, "code": None}}, "api_error",
     "KV cache full"),
    ({"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}, "rate_limit_error",
     "slow down"),
    ({"object": "error", "message": "bad schema", "type": "BadRequestError", "code": 400}, "invalid_request_error",
     "bad schema"),
    ({"error": {"message": "busy", "type": "InternalServerError", "code": 503}}, "overloaded_error", "busy"),
    ({"error": "it broke"}, "api_error", "The engine's stream failed"),
])
def test_an_error_in_the_engines_stream_becomes_an_error_event(payload, kind, message):
    translator = StreamTranslator(_translation(stream=True))
    started = _events(translator.feed(TEXT_CHUNKS[1]))
    assert [e["type"] for e in started] == ["message_start", "ping", "content_block_start", "content_block_delta"]
    [error] = _events(translator.feed(payload))
    assert error["error"]["type"] == kind
    assert message in error["error"]["message"]
    assert translator.feed(TEXT_CHUNKS[2]) == []
    assert translator.finish() == []


def test_a_stream_cut_short_ends_with_an_error_event():
    translator = StreamTranslator(_translation(stream=True))
    translator.feed(TEXT_CHUNKS[1])
    [error] = _events(translator.finish())
    assert error == {"type": "error", "error": {"type": "api_error", "message":
                     "The engine ended the stream without saying why it stopped, so the answer may be cut short. "
                     "Retry."}}
    assert translator.finish() == []
    [empty] = _events(StreamTranslator(_translation(stream=True)).finish())
    assert "before it sent anything" in empty["error"]["message"]
    failed = StreamTranslator(_translation(stream=True))
    [timeout] = _events(failed.fail(OpenAIError(504, "node01 sent nothing for 60 s")))
    assert timeout["error"] == {"type": "timeout_error", "message": "node01 sent nothing for 60 s"}
    assert failed.feed(TEXT_CHUNKS[1]) == []


def _sse_bytes(chunks: list[dict[str, Any]], newline: bytes = b"\n") -> bytes:
    events = [b"data: " + orjson.dumps(chunk) + newline + newline for chunk in chunks]
    return b": keep-alive" + newline + newline + b"".join(events) + b"data: [DONE]" + newline + newline


@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_the_chunk_reader_takes_bytes_cut_anywhere(newline):
    raw = _sse_bytes(TOOL_CHUNKS, newline)
    for cut in range(len(raw) + 1):
        reader = ChatChunkReader()
        chunks = reader.feed(raw[:cut]) + reader.feed(raw[cut:])
        assert chunks == TOOL_CHUNKS
        assert reader.done
    by_byte = ChatChunkReader()
    assert [chunk for i in range(len(raw)) for chunk in by_byte.feed(raw[i:i + 1])] == TOOL_CHUNKS


def test_the_chunk_reader_refuses_what_is_no_chunk():
    reader = ChatChunkReader()
    assert reader.feed(b'event: x\nid: 3\ndata: {"a":\ndata: 1}\n\n') == [{"a": 1}]  # data lines join
    assert not reader.done
    with pytest.raises(OpenAIError, match="no JSON object") as caught:
        reader.feed(b"data: [1, 2]\n\n")
    assert caught.value.status == 502
    with pytest.raises(OpenAIError, match="over 1,048,576 bytes"):
        ChatChunkReader().feed(b"data: " + b"x" * MAX_EVENT)


# ---- errors ----

@pytest.mark.parametrize(("status", "kind"), [
    (400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
    (404, "not_found_error"), (405, "invalid_request_error"), (413, "request_too_large"),
    (422, "invalid_request_error"),
    (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"), (503, "overloaded_error"),
    (504, "timeout_error"), (529, "overloaded_error"),
])
def test_error_types_by_status(status, kind):
    assert error_type(status) == kind


def test_error_events():
    assert error_event(429, "slow down") == (b'event: error\ndata: {"type":"error","error":'
                                             b'{"type":"rate_limit_error","message":"slow down"}}\n\n')
    assert stream_error_event({"error": {"message": "x", "code": 413}}) == error_event(413, "x")


# ---- count_tokens ----

def test_count_tokens_bodies_for_the_engine():
    body = {"model": "m", "system": "Be brief.", "messages": [{"role": "user", "content": "Hi"}],
            "tools": [WEATHER_TOOL], "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}
    prompt = {"model": "m", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
              "tools": to_chat(_body(tools=[WEATHER_TOOL])).chat["tools"]}
    assert count_tokens.tokenize_body(body) == {**prompt, "add_generation_prompt": True}
    assert count_tokens.probe_body(body) == {**prompt, "max_tokens": 1, "stream": False}
    with pytest.raises(OpenAIError, match="Missing 'messages'"):
        count_tokens.probe_body({"model": "m"})


def test_count_tokens_answers():
    assert count_tokens.from_tokenize({"count": 17, "max_model_len": 4096, "tokens": [1] * 17}) == {"input_tokens": 17}
    assert count_tokens.from_chat({"usage": {"prompt_tokens": 12, "completion_tokens": 1}}) == {"input_tokens": 12}
    for broken, call in [({"tokens": []}, count_tokens.from_tokenize), ({"choices": []}, count_tokens.from_chat),
                         ({"usage": {"prompt_tokens": -1}}, count_tokens.from_chat)]:
        with pytest.raises(OpenAIError, match="could not count the tokens") as caught:
            call(broken)
        assert caught.value.status == 502


# ---- the official client, through a loopback door that translates ----

class CannedEngine:
    """A stand-in engine answering each request with the next canned answer: a dict (JSON), a list of chunks
    (SSE), or ``(status, dict)``; it records each (path, body) it was sent."""

    def __init__(self) -> None:
        self.answers: list[Any] = []
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def handler(self) -> type[BaseHTTPRequestHandler]:
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                engine.requests.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
                answer = engine.answers.pop(0)
                if isinstance(answer, list):
                    body = _sse_bytes(answer)
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif isinstance(answer, tuple):
                    send_json(self, answer[1], answer[0])
                else:
                    send_json(self, answer)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler


def door_handler(engine_url: str, *, tokenize: bool) -> type[BaseHTTPRequestHandler]:
    """A door for /v1/messages that translates with the modules under test, as the gateway will: to the chat
    route of ``engine_url``, streams relayed chunk by chunk; ``count_tokens`` by ``/tokenize`` or by a probe; the
    engine's errors made into ``OpenAIError`` as the gateway makes them (``upstream_error``), then Anthropic's."""

    class Door(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            fault = {"x-fake-fault": self.headers["x-fake-fault"]} if self.headers["x-fake-fault"] else {}
            try:
                if self.path == "/v1/messages/count_tokens":
                    self._count(decode(raw))
                else:
                    self._messages(to_chat(decode(raw)), fault)
            except OpenAIError as exc:
                self._send(exc.status, from_openai_error(exc))

        def _messages(self, translation: ChatTranslation, fault: dict[str, str]) -> None:
            with httpx.stream("POST", f"{engine_url}/v1/chat/completions", json=translation.chat, headers=fault,
                              timeout=30) as answer:
                if answer.status_code >= 400:
                    raise upstream_error(answer.status_code, answer.read(), "the test engine")
                elif not translation.stream:
                    self._send(200, orjson.dumps(message_from_chat(orjson.loads(answer.read()), translation)))
                else:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()  # (HTTP/1.0: the stream ends when the door closes the connection)
                    reader, translator = ChatChunkReader(), StreamTranslator(translation)
                    for data in answer.iter_raw():
                        for chunk in reader.feed(data):
                            for event in translator.feed(chunk):
                                self.wfile.write(event)
                                self.wfile.flush()
                    self.wfile.write(b"".join(translator.finish()))

        def _count(self, body: dict[str, Any]) -> None:
            path, payload, read = (("/tokenize", count_tokens.tokenize_body(body), count_tokens.from_tokenize)
                                   if tokenize else
                                   ("/v1/chat/completions", count_tokens.probe_body(body), count_tokens.from_chat))
            answer = httpx.post(f"{engine_url}{path}", json=payload, timeout=30)
            if answer.status_code >= 400:
                raise upstream_error(answer.status_code, answer.content, "the test engine")
            self._send(200, orjson.dumps(read(answer.json())))

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Door


@pytest.fixture
def door_to(fake_upstream: FakeUpstream) -> Iterator[Callable[[str, bool], anthropic.Anthropic]]:
    """Opens a door to an engine URL (the fake upstream's by default) and gives the client for it."""
    with contextlib.ExitStack() as stack:
        def client(engine_url: str = fake_upstream.url, tokenize: bool = False) -> anthropic.Anthropic:
            url = stack.enter_context(serving_http(door_handler(engine_url, tokenize=tokenize)))
            return stack.enter_context(anthropic.Anthropic(base_url=url, api_key="not-checked", max_retries=0))
        yield client


@pytest.fixture
def canned() -> Iterator[tuple[CannedEngine, str]]:
    engine = CannedEngine()
    with serving_http(engine.handler()) as url:
        yield engine, url
    assert engine.answers == [], "an answer the test queued was never asked for"


def test_sdk_create_through_the_fake_upstream(door_to, fake_upstream: FakeUpstream):
    message = door_to().messages.create(model="fake-model", max_tokens=50, system="Be brief.", stop_sequences=["END"],
                                        messages=[{"role": "user", "content": "Hello"}], metadata={"user_id": "u-1"},
                                        service_tier="standard_only", extra_body={"temperature": 0.3, "top_k": 5})
    assert isinstance(message, anthropic.types.Message)
    assert message.model == "fake-model"
    assert message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "".join(f"tok{i} " for i in range(fake_upstream.chunks))
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == PROMPT_TOKENS
    assert message.usage.output_tokens == fake_upstream.chunks
    assert fake_upstream.last_request_body == {
        "model": "fake-model", "max_tokens": 50, "temperature": 0.3, "top_k": 5, "stop": ["END"], "user": "u-1",
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]}


def test_sdk_stream_through_the_fake_upstream(door_to, fake_upstream: FakeUpstream):
    with door_to().messages.stream(model="fake-model", max_tokens=50,
                                   messages=[{"role": "user", "content": "Hello"}]) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == [f"tok{i} " for i in range(fake_upstream.chunks)]
    assert final.content[0].type == "text"
    assert final.content[0].text == "".join(pieces)
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, fake_upstream.chunks)
    assert fake_upstream.last_request_body["stream_options"] == {"include_usage": True}


def test_sdk_tool_use_round_trip(door_to, canned):
    engine, url = canned
    client = door_to(url)
    engine.answers = [
        {"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [{"id": "call_w", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]}}],
         "usage": {"prompt_tokens": 40, "completion_tokens": 10}},
        {"id": "chatcmpl-2", "choices": [{"index": 0, "finish_reason": "stop", "message": {
            "role": "assistant", "content": "It is 18 C in Paris."}}],
         "usage": {"prompt_tokens": 60, "completion_tokens": 8}},
    ]
    question = {"role": "user", "content": "What is the weather in Paris?"}
    first = client.messages.create(model="m", max_tokens=100, tools=[WEATHER_TOOL], tool_choice={"type": "auto"},
                                   messages=[question])
    assert first.stop_reason == "tool_use"
    [call] = first.content
    assert isinstance(call, anthropic.types.ToolUseBlock)
    assert (call.id, call.name, call.input) == ("call_w", "get_weather", {"city": "Paris"})
    answer = client.messages.create(model="m", max_tokens=100, tools=[WEATHER_TOOL], messages=[
        question, {"role": "assistant", "content": first.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C"}]}])
    assert answer.content[0].text == "It is 18 C in Paris."
    assert answer.stop_reason == "end_turn"
    path, second_request = engine.requests[1]
    assert path == "/v1/chat/completions"
    assert second_request["messages"] == [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_w", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_w", "content": "18 C"},
    ]
    assert engine.requests[0][1]["tool_choice"] == "auto"


def test_sdk_streamed_tool_use(door_to, canned):
    engine, url = canned
    engine.answers = [TOOL_CHUNKS]
    seen_json: list[str] = []
    with door_to(url).messages.stream(model="m", max_tokens=100, tools=[WEATHER_TOOL],
                                      messages=[{"role": "user", "content": "Weather and time?"}]) as stream:
        for event in stream:
            if event.type == "input_json":
                seen_json.append(event.partial_json)
        final = stream.get_final_message()
    assert seen_json == ['{"city": ', '"Paris"}', "{}"]
    assert [block.type for block in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[0].text == "Let me check."
    assert [(b.id, b.name, b.input) for b in final.content[1:]] == [("call_a", "get_weather", {"city": "Paris"}),
                                                                    ("call_b", "get_time", {})]
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (31, 12)


def test_sdk_count_tokens_by_probe_and_by_tokenize(door_to, canned, fake_upstream: FakeUpstream):
    counted = door_to().messages.count_tokens(model="fake-model", messages=[{"role": "user", "content": "Hello"}])
    assert counted.input_tokens == PROMPT_TOKENS
    assert fake_upstream.last_request_body["max_tokens"] == 1
    engine, url = canned
    engine.answers = [{"count": 17, "max_model_len": 4096, "tokens": list(range(17))}]
    counted = door_to(url, tokenize=True).messages.count_tokens(
        model="m", system="Be brief.", messages=[{"role": "user", "content": "Hello"}])
    assert counted.input_tokens == 17
    assert engine.requests == [("/tokenize", {"model": "m", "add_generation_prompt": True, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]})]


def test_sdk_sees_anthropic_errors(door_to, canned):
    client = door_to()
    with pytest.raises(anthropic.RateLimitError) as limited:
        client.messages.create(model="fake-model", max_tokens=5, messages=[{"role": "user", "content": "Hi"}],
                               extra_headers={"x-fake-fault": "429"})
    assert limited.value.body["error"] == {"type": "rate_limit_error", "message": (
        "the test engine answered HTTP 429: Rate limit reached (fake fault). The engine is busy; retry after a short "
        "wait.")}
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(model="fake-model", max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "file", "file_id": "file_1"}}]}])
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert "messages[0].content[0].source.type" in refused.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as missing:  # (create() itself insists on max_tokens)
        client.post("/v1/messages", cast_to=anthropic.types.Message,
                    body={"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]})
    assert missing.value.status_code == 400
    assert missing.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": (
        "Missing 'max_tokens': the Messages API requires it. Add the most tokens to generate, e.g. "
        '"max_tokens": 1024, and send the request again.')}}
    engine, url = canned
    engine.answers = [(422, {"detail": "Unexpected fields in the request: {'thinking'}"})]
    with pytest.raises(anthropic.BadRequestError) as judged:  # transformers serve judging a field it does not know
        door_to(url).messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "Hi"}],
                                     thinking={"type": "enabled", "budget_tokens": 1024})
    assert judged.value.body["error"]["type"] == "invalid_request_error"
    assert "Unexpected fields in the request: {'thinking'}" in judged.value.body["error"]["message"]
    assert engine.requests[-1][1]["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    engine.answers = [[TEXT_CHUNKS[1], {"error": {"message": "The engine ran out of memory", "type": "server_error",
                                                  "code": None}}]]
    with pytest.raises(anthropic.APIStatusError) as broken, door_to(url).messages.stream(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]) as stream:
        list(stream.text_stream)
    assert broken.value.body == {"type": "error", "error": {"type": "api_error",
                                                            "message": "The engine ran out of memory"}}
