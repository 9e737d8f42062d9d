"""The official `openai` package, unchanged, against a real Jupyter server and a real engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from tests.conftest import Door, engine_cluster_config, server_config

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture
def jp_server_config(tiny_engine, write_config, tmp_path: Path):
    return server_config(write_config(engine_cluster_config(tiny_engine)), tmp_path / "data")


def _clients(door: Door) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    """Clients of both kinds through ``door``: {server}/first/v1 (Jupyter's) or the gateway's own server."""
    return (openai.OpenAI(base_url=door.url, api_key=door.api_key, max_retries=0),
            openai.AsyncOpenAI(base_url=door.url, api_key=door.api_key, max_retries=0))


async def test_sync_client_chat_stream_and_not(first_ext, key_door):
    sync, _ = _clients(key_door)

    def run() -> tuple[openai.types.chat.ChatCompletion, list[str], list[int]]:
        done = sync.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6)
        pieces, usage = [], []
        for chunk in sync.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6,
                                                  stream=True):
            pieces.extend(c.delta.content or "" for c in chunk.choices)
            if chunk.usage:
                usage.append(chunk.usage.completion_tokens)
        return done, pieces, usage

    done, pieces, usage = await asyncio.to_thread(run)
    assert done.model == "tiny-chat"
    assert done.choices[0].message.role == "assistant"
    assert done.usage is not None
    assert done.usage.completion_tokens == 6
    assert len("".join(pieces)) > 0
    assert usage == [6]
    models = await asyncio.to_thread(sync.models.list)
    assert [m.id for m in models.data] == ["tiny-chat"]


async def test_async_client_chat_completions_and_stream(first_ext, key_door):
    _, client = _clients(key_door)
    done = await client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4,
                                                temperature=0.5, top_p=0.9, seed=3)
    assert done.choices[0].finish_reason == "length"
    stream = await client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=5,
                                                  stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.model == "tiny-chat" for c in chunks)
    text = await client.completions.create(model="tiny-chat", prompt="Hello", max_tokens=3)
    assert text.object == "text_completion"
    assert text.usage.completion_tokens == 3
    pieces = [c async for c in await client.completions.create(model="tiny-chat", prompt="Hello",
                                                                 max_tokens=3, stream=True)]
    assert len(pieces) >= 3


async def test_usage_is_recorded(first_ext, key_door):
    _, client = _clients(key_door)
    await client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=3)
    stream = await client.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=4,
                                                  stream=True)
    async for _ in stream:
        pass
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="missing", messages=MESSAGES)
    gateway = first_ext.gateway
    await asyncio.to_thread(gateway.usage.flush, 30)  # a failure guard: the commit takes milliseconds
    rows = gateway.usage.query("SELECT model, cluster, endpoint, stream, status, prompt_tokens, "
                               "completion_tokens, ttft_ms FROM usage ORDER BY id")
    assert rows[0][:7] == ("tiny-chat", "hpc", "node01", 0, 200, rows[0][5], 3)
    assert rows[0][5] > 0
    assert rows[1][3:5] == (1, 200)
    assert rows[1][6] == 4
    assert rows[1][7] > 0
    assert len(rows) == 2  # a model served nowhere leaves no row (its name is whatever the client sent)


async def test_extra_sampling_fields_reach_the_engine(first_ext, key_door):
    """Fields outside the OpenAI schema (vLLM's) pass through untouched; the engine decides on them."""
    _, client = _clients(key_door)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="tiny-chat", messages=MESSAGES,
                                             extra_body={"top_k": 5, "min_p": 0.1})
    # transformers serve refuses vLLM-only fields: the refusal proves they arrived, named as sent
    assert "top_k" in str(info.value)
    assert "min_p" in str(info.value)
