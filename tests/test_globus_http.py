"""An ``http`` endpoint that takes the user's Globus token (a FIRST gateway): the token goes with each request,
and without a sign-in the request is refused with the way to sign in, before anything is sent upstream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from first_jupyter.auth.manager import TokenManager
from first_jupyter.config import AuthConfig, parse_config
from first_jupyter.gateway.bearer import BearerTokens
from first_jupyter.protocol import Capability, OpenAIError, parse_request
from first_jupyter.service import build_gateway
from tests.conftest import fake_cluster_config, server_config

RESOURCE_SERVER = "681c10cc-f684-4540-bcd7-0b4df3bc26ef"
SCOPE = f"https://auth.globus.org/scopes/{RESOURCE_SERVER}/action_all"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def _gateway_config(upstream: Any) -> dict[str, Any]:
    config = fake_cluster_config(upstream)
    config["clusters"]["remote"]["endpoints"][0].update(globus_resource_server=RESOURCE_SERVER, globus_scope=SCOPE)
    config["auth"] = {"sources": ["env"]}
    return config


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FIRST_GLOBUS_TOKEN", "AT-env")
    return server_config(write_config(_gateway_config(fake_upstream)), tmp_path / "data")


async def test_the_users_token_goes_with_each_request(key_door, fake_upstream):
    async with aiohttp.ClientSession() as session, session.post(
            key_door.route("chat/completions"), json=CHAT, headers=key_door.headers) as resp:
        assert resp.status == 200
        await resp.read()
    assert fake_upstream.last_request_headers["authorization"] == "Bearer AT-env"


async def test_without_a_sign_in_nothing_is_sent_upstream(fake_upstream, tmp_path):
    gateway = build_gateway(parse_config(_gateway_config(fake_upstream), "test"), tmp_path, environ={})
    try:
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(parse_request(Capability.chat, json.dumps(CHAT).encode()))
        assert (info.value.status, info.value.code) == (401, "globus_sign_in")
        assert "`%first login`" in info.value.message
        assert fake_upstream.requests == 0
    finally:
        await gateway.close()


def test_sign_in_asks_for_the_endpoints_scope(fake_upstream, tmp_path):
    gateway = build_gateway(parse_config(_gateway_config(fake_upstream), "test"), tmp_path, environ={})
    assert gateway.auth.native.scopes[RESOURCE_SERVER] == [SCOPE]
    gateway.usage.close()


async def test_a_refused_token_is_fetched_again(tmp_path):
    environ = {"FIRST_GLOBUS_TOKEN": "AT-first"}
    tokens = BearerTokens(TokenManager(AuthConfig(sources=["env"]), tmp_path, environ))
    assert await tokens.header("rs") == b"Authorization: Bearer AT-first\r\n"
    environ["FIRST_GLOBUS_TOKEN"] = "AT-second"
    assert await tokens.header("rs") == b"Authorization: Bearer AT-first\r\n"  # reused within the minute
    tokens.forget("rs")
    assert await tokens.header("rs") == b"Authorization: Bearer AT-second\r\n"
