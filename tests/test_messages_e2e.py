"""Anthropic's Messages API through both doors, with the official `anthropic` package unchanged (base_url
``{server}/first``): translated to chat for `transformers serve` (the embedded default's engine) and for an engine
without the route, passed through byte for byte to an engine that serves it (the fake upstream, as vLLM does);
errors in Anthropic's shape at every door; ``x-api-key`` taken as the key."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from bench.fake_upstream import MESSAGES_REFUSAL, PROMPT_TOKENS, FakeUpstream, serving_in_thread
from tests.conftest import Door, engine_cluster_config, server_config

LIMIT = 64 * 1024
"""The gateway's request body limit here: a larger body is its 413."""
ASK = [{"role": "user", "content": "Say hello."}]
WEATHER = {"name": "get_weather", "description": "The weather in a city now.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.fixture
def upstreams() -> Iterator[dict[str, FakeUpstream]]:
    """Engines as vLLM (the Messages API served), as one without it (that calls tools), and as one refusing."""
    with contextlib.ExitStack() as stack:
        yield {"native": stack.enter_context(serving_in_thread(models=["native-model"], chunks=8)),
               "chat-only": stack.enter_context(serving_in_thread(models=["tool-model", "no-route-model"], chunks=8,
                                                                  messages=False, calls_tools=True)),
               "refusing": stack.enter_context(serving_in_thread(models=["refusing-model"], fault="400")),
               "dropping": stack.enter_context(serving_in_thread(models=["dropping-model", "dropping-chat"],
                                                                 fault="drop-mid-stream"))}


@pytest.fixture
def jp_server_config(tiny_engine, upstreams, write_config, tmp_path: Path):
    config = engine_cluster_config(tiny_engine)

    def endpoint(name: str, models: list[dict[str, Any]]) -> dict[str, Any]:
        return {"name": name, "base_url": f"{upstreams[name].url}/v1", "models": models}

    messages = ["chat", "messages"]  # the engine serves /v1/messages itself
    config["clusters"]["vllm"] = {"backend": "http", "endpoints": [
        endpoint("native", [{"id": "native-model", "capabilities": messages}]),
        endpoint("chat-only", [{"id": "tool-model"}, {"id": "no-route-model", "capabilities": messages}]),
        endpoint("refusing", [{"id": "refusing-model", "capabilities": messages}]),
        endpoint("dropping", [{"id": "dropping-model", "capabilities": messages}, {"id": "dropping-chat"}])]}
    return server_config(write_config(config), tmp_path / "data", max_request_bytes=LIMIT)


def _base(door: Door) -> str:
    """What an Anthropic client is given as ``base_url``: the door's ``/first`` (it calls ``{base}/v1/messages``)."""
    return door.url.removesuffix("/v1")


def _client(door: Door, api_key: str | None = None) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=_base(door), api_key=api_key or door.api_key, max_retries=0)


def _usage_rows(ext: Any, model: str) -> list[tuple[Any, ...]]:
    ext.gateway.usage.flush(30)  # a failure guard: the commit takes milliseconds
    return ext.gateway.usage.query("SELECT capability, stream, status, prompt_tokens, completion_tokens FROM usage "
                                   "WHERE model = ? ORDER BY id", (model,))


async def test_create_stream_and_count_tokens_translated_for_transformers_serve(first_ext, key_door):
    client = _client(key_door)
    message = await client.messages.create(model="tiny-chat", max_tokens=6, system="Be brief.", messages=ASK)
    assert (message.type, message.role, message.model) == ("message", "assistant", "tiny-chat")
    assert message.id.startswith("msg_")
    assert [block.type for block in message.content] == ["text"]
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 6)
    assert message.usage.input_tokens > 0
    async with client.messages.stream(model="tiny-chat", max_tokens=5, system="Be brief.", messages=ASK) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert (final.stop_reason, final.usage.output_tokens, final.model) == ("max_tokens", 5, "tiny-chat")
    assert "".join(pieces) == final.content[0].text
    assert final.usage.input_tokens == message.usage.input_tokens  # the same prompt
    counted = await client.messages.count_tokens(model="tiny-chat", system="Be brief.", messages=ASK)
    assert counted.input_tokens == message.usage.input_tokens  # by the engine's tokenizer and chat template
    rows = await asyncio.to_thread(_usage_rows, first_ext, "tiny-chat")
    assert rows == [("messages", 0, 200, message.usage.input_tokens, 6),
                    ("messages", 1, 200, message.usage.input_tokens, 5),
                    ("count_tokens", 0, 200, message.usage.input_tokens, 1)]


async def test_a_tool_use_round_trip_through_the_translation(first_ext, key_door, upstreams):
    """The engine without the Messages API answers a chat tool call: the client sees a tool_use block, sends a
    tool_result back, and the engine sees the assistant's tool call and the tool's message."""
    client, engine = _client(key_door), upstreams["chat-only"]
    asked = await client.messages.create(model="tool-model", max_tokens=50, tools=[WEATHER],
                                         messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert asked.stop_reason == "tool_use"
    call = asked.content[-1]
    assert (call.type, call.name, call.input, call.id) == ("tool_use", "get_weather", {"city": "fake"}, "call_fake")
    sent = engine.last_request_body
    assert sent["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": WEATHER["description"], "parameters": WEATHER["input_schema"]}}]
    answered = await client.messages.create(model="tool-model", max_tokens=50, tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": asked.content},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18 C, sunny"}]}])
    assert (answered.stop_reason, answered.content[0].type) == ("end_turn", "text")
    assert answered.content[0].text.startswith("tok0 ")
    assert engine.last_request_body["messages"][1:] == [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_fake", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city":"fake"}'}}]},
        {"role": "tool", "tool_call_id": "call_fake", "content": "18 C, sunny"}]
    async with client.messages.stream(model="tool-model", max_tokens=50, tools=[WEATHER],
                                      messages=[{"role": "user", "content": "Weather in Paris?"}]) as stream:
        streamed = await stream.get_final_message()
    assert streamed.stop_reason == "tool_use"
    assert [(b.type, b.name, b.input) for b in streamed.content] == [("tool_use", "get_weather", {"city": "fake"})]


async def test_an_engine_that_serves_messages_gets_them_as_sent_and_answers_byte_for_byte(first_ext, key_door,
                                                                                        upstreams):
    engine = upstreams["native"]
    body = {"model": "native-model", "max_tokens": 16, "messages": ASK, "top_k": 3, "thinking": {"type": "disabled"}}
    headers = {"x-api-key": key_door.api_key, "content-type": "application/json", "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(timeout=60) as http:
        for stream in (False, True):
            raw = orjson.dumps({**body, "stream": stream})
            through = await http.post(f"{_base(key_door)}/v1/messages", content=raw, headers=headers)
            assert engine.last_request_body == orjson.loads(raw)  # the request as sent: nothing translated
            direct = await http.post(f"{engine.url}/v1/messages", content=raw)
            assert through.status_code == 200, through.text
            assert through.content == direct.content
            assert through.headers["x-first-endpoint"] == "native"
        counted = await http.post(f"{_base(key_door)}/v1/messages/count_tokens", headers=headers,
                                  content=orjson.dumps({"model": "native-model", "messages": ASK}))
    assert counted.json() == {"input_tokens": PROMPT_TOKENS}
    assert engine.by_route["/v1/messages/count_tokens"] == 1
    client = _client(key_door)
    message = await client.messages.create(model="native-model", max_tokens=16, messages=ASK)
    assert message.content[0].text == "".join(f"tok{i} " for i in range(8))
    async with client.messages.stream(model="native-model", max_tokens=16, messages=ASK) as events:
        assert [text async for text in events.text_stream] == [f"tok{i} " for i in range(8)]
    assert engine.by_route["/v1/chat/completions"] == 0
    rows = await asyncio.to_thread(_usage_rows, first_ext, "native-model")
    assert rows == [("messages", 0, 200, PROMPT_TOKENS, 8), ("messages", 1, 200, PROMPT_TOKENS, 8),
                    ("count_tokens", 0, 200, None, None), ("messages", 0, 200, PROMPT_TOKENS, 8),
                    ("messages", 1, 200, PROMPT_TOKENS, 8)]


def _anthropic_error(error: anthropic.APIStatusError, kind: str) -> str:
    """The error's message, once its body is seen to be Anthropic's shape with ``kind`` as its type."""
    body = error.response.json()
    assert set(body) == {"type", "error"}
    assert (body["type"], body["error"]["type"], set(body["error"])) == ("error", kind, {"type", "message"})
    return str(body["error"]["message"])


async def test_errors_take_anthropics_shape_and_an_engines_own_comes_as_it_was(first_ext, key_door, upstreams):
    client = _client(key_door)
    with pytest.raises(anthropic.NotFoundError) as unknown:
        await client.messages.create(model="made-up-model", max_tokens=5, messages=ASK)
    assert "made-up-model" in _anthropic_error(unknown.value, "not_found_error")
    with pytest.raises(anthropic.BadRequestError) as refused:
        await client.messages.create(model="refusing-model", max_tokens=5, messages=ASK)
    assert refused.value.response.content == orjson.dumps(MESSAGES_REFUSAL)  # vLLM's own, as the engine wrote it
    with pytest.raises(anthropic.NotFoundError) as no_route:  # configured native, but the engine lacks the route
        await client.messages.create(model="no-route-model", max_tokens=5, messages=ASK)
    assert "Invalid URL" in _anthropic_error(no_route.value, "not_found_error")  # the engine's, OpenAI-shaped
    with pytest.raises(anthropic.BadRequestError) as bad:  # the translation's own check, as Anthropic says it
        await client.messages.create(model="tiny-chat", max_tokens=5, messages=[])
    assert "messages" in _anthropic_error(bad.value, "invalid_request_error")
    with pytest.raises(anthropic.APIStatusError) as too_large:
        await client.messages.create(model="tiny-chat", max_tokens=5,
                                     messages=[{"role": "user", "content": "x" * LIMIT}])
    assert too_large.value.status_code == 413
    assert "max_request_bytes" in _anthropic_error(too_large.value, "request_too_large")
    with pytest.raises(anthropic.AuthenticationError) as wrong_key:
        await _client(key_door, api_key="not-the-key").messages.create(model="tiny-chat", max_tokens=5,
                                                                        messages=ASK)
    assert "x-api-key" in _anthropic_error(wrong_key.value, "authentication_error")
    async with httpx.AsyncClient(timeout=60) as http:  # a DNS-rebinding page: the right key, a foreign Host
        foreign = await http.post(f"{_base(key_door)}/v1/messages", json={"model": "tiny-chat"},
                                  headers={"x-api-key": key_door.api_key, "Host": "evil.example"})
    assert foreign.status_code == 403
    assert foreign.json()["error"]["type"] == "permission_error"


@pytest.mark.parametrize("model", ["dropping-model", "dropping-chat"])
async def test_an_engine_breaking_off_a_stream_ends_it_with_anthropics_error_event(first_ext, key_door, model):
    """Native (the engine's events, then the gateway's) or translated: Anthropic's client reads ``event: error``
    only (an OpenAI-shaped ``data: {"error": ...}`` it would skip as an unnamed event, and end without a word)."""
    async with _client(key_door).messages.stream(model=model, max_tokens=16, messages=ASK) as stream:
        with pytest.raises(anthropic.APIStatusError) as broken:
            async for _ in stream:
                pass
    assert broken.value.body["type"] == "error"
    assert broken.value.body["error"]["type"] == "api_error"
    assert "broke off" in broken.value.body["error"]["message"]


async def test_x_api_key_opens_every_door_as_its_key_does(first_ext, door):
    """The scoped key, and at Jupyter's door a Jupyter token too, sent as ``x-api-key`` (Anthropic's clients'
    header) are taken by the same rules as in ``Authorization``; the OpenAI routes take it alike."""
    client = _client(door)
    counted = await client.messages.count_tokens(model="native-model", messages=ASK)
    assert counted.input_tokens == PROMPT_TOKENS
    async with httpx.AsyncClient(timeout=60) as http:
        models = await http.get(f"{door.url}/models", headers={"x-api-key": door.api_key})
    assert models.status_code == 200, models.text
    async with httpx.AsyncClient(timeout=60) as http:  # (a new client: Jupyter's login cookie would let it in)
        refused = await http.get(f"{door.url}/models", headers={"x-api-key": "not-the-key"})
    assert refused.status_code == 401
    assert refused.json()["error"]["type"] == "authentication_error"  # OpenAI's shape on OpenAI's routes
