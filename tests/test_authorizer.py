"""Jupyter's authorizer on Jupyter's door: a server whose Authorizer denies the resource ``first`` refuses every
route of the table (the node's callback, which checks its own signatures, aside) while Jupyter's own API answers;
one that denies only ``write`` lets reading through. The kernels' scoped key is not put to the authorizer."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from jupyter_server.auth.authorizer import Authorizer
from yarl import URL

from first_jupyter.api.route_table import ROUTES, Route
from first_jupyter.protocol import OpenAIError
from tests.big_body import BIG, fixed, request_head, send_until_answered
from tests.conftest import Door, example_path, fake_cluster_config, open_door, server_config

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


class DenyFirst(Authorizer):
    """Everything of Jupyter's, nothing of FIRST's."""

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        return resource != "first"


class DenyWrite(Authorizer):
    """A read-only collaborator: reading anything, writing nothing."""

    def is_authorized(self, handler: Any, user: Any, action: str, resource: str) -> bool:
        return action == "read"


def _config(fake_upstream: Any, write_config: Any, tmp_path: Path, authorizer: type[Authorizer]) -> dict[str, Any]:
    config = server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "data")
    config["ServerApp"]["authorizer_class"] = authorizer
    return config


def _assert_refused(route: Route, status: int, headers: Any, body: bytes) -> None:
    """A 403 from the authorizer in the route's error shape (Anthropic's on the Messages routes), closing."""
    assert status == 403, (route.method, route.pattern, status, body)
    error = json.loads(body)["error"]
    assert error["type"] == "permission_error"
    assert "Jupyter's authorizer" in error["message"]
    if route.error_body is OpenAIError.to_bytes:
        assert error["code"] == "not_authorized"
    else:
        assert json.loads(body)["type"] == "error"  # Anthropic's shape
    assert headers["Connection"] == "close"


def _jupyter_door(first_ext: Any, jp_auth_header: dict[str, str]) -> Door:
    return open_door("jupyter-token", first_ext, jp_auth_header)


class TestDenyingFirst:
    @pytest.fixture
    def jp_server_config(self, fake_upstream, write_config, tmp_path: Path):
        return _config(fake_upstream, write_config, tmp_path, DenyFirst)

    async def test_every_route_is_refused_while_jupyters_api_answers(self, first_ext, jp_auth_header, jp_fetch):
        door = _jupyter_door(first_ext, jp_auth_header)
        checked = 0
        async with aiohttp.ClientSession() as session:
            for route in ROUTES:
                if route.open:
                    continue
                async with session.request(route.method, door.at(example_path(route)), data=b"{}",
                                           headers=door.headers) as resp:
                    _assert_refused(route, resp.status, resp.headers, await resp.read())
                checked += 1
            async with session.get(door.at("/first/v1/nothing-here"), headers=door.headers) as resp:
                assert resp.status == 403  # a path outside the table says nothing to a caller refused
        assert checked == len(ROUTES) - 1
        status = await jp_fetch("api", "status", method="GET")
        assert status.code == 200

    async def test_the_official_clients_read_the_refusal(self, first_ext, jp_auth_header):
        door = _jupyter_door(first_ext, jp_auth_header)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await openai.AsyncOpenAI(base_url=door.url, api_key=door.api_key, max_retries=0).models.list()
        assert refused.value.code == "not_authorized"
        with pytest.raises(anthropic.PermissionDeniedError) as denied:
            await anthropic.AsyncAnthropic(base_url=door.url.removesuffix("/v1"), api_key=door.api_key,
                                           max_retries=0).messages.create(
                model="fake-model", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        assert "Jupyter's authorizer" in str(denied.value)

    async def test_a_refused_body_is_not_read(self, first_ext, jp_auth_header):
        door = _jupyter_door(first_ext, jp_auth_header)
        url = URL(f"{door.url}/chat/completions", encoded=True)
        head = request_head("POST", url.raw_path, {**door.headers, "Content-Length": str(BIG)})
        assert url.port is not None
        answer = await asyncio.to_thread(send_until_answered, url.port, head, fixed(BIG))
        assert answer.status == 403
        assert answer.error()["code"] == "not_authorized"
        assert answer.sent < BIG  # answered while the client was still sending
        assert answer.headers["connection"] == "close"

    async def test_the_kernels_key_is_not_put_to_the_authorizer(self, first_ext, jp_auth_header):
        door = open_door("jupyter-key", first_ext, jp_auth_header)
        client = openai.AsyncOpenAI(base_url=door.url, api_key=door.api_key, max_retries=0)
        done = await client.chat.completions.create(**CHAT)
        assert done.choices[0].message.role == "assistant"
        assert "fake-model" in [m.id for m in (await client.models.list()).data]


class TestDenyingWrite:
    @pytest.fixture
    def jp_server_config(self, fake_upstream, write_config, tmp_path: Path):
        return _config(fake_upstream, write_config, tmp_path, DenyWrite)

    async def test_reading_passes_and_writing_is_refused(self, first_ext, jp_auth_header):
        """Read, write, read: each request is judged by its own method's action."""
        door = _jupyter_door(first_ext, jp_auth_header)
        client = openai.AsyncOpenAI(base_url=door.url, api_key=door.api_key, max_retries=0)
        assert "fake-model" in [m.id for m in (await client.models.list()).data]
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(**CHAT)
        assert refused.value.code == "not_authorized"
        assert "write" in refused.value.message
        assert (await client.models.retrieve("fake-model")).id == "fake-model"
