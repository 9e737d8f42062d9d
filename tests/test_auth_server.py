"""Signing in through a real Jupyter server: the routes on every door, ``%first login``, and no token anywhere
a browser, a kernel or a log could see it."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import responses
from yarl import URL

from tests.conftest import Door, fake_cluster_config, server_config
from tests.test_auth import CLIENT_ID, SECRETS, GlobusAuth, _authenticator_state, _globus_data
from tests.test_kernel_magics import run, started_kernel


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path: Path, monkeypatch):
    """A server whose environment holds tokens as a hub and a script would put them there."""
    monkeypatch.setenv("GLOBUS_DATA", _globus_data(_authenticator_state("AT-hub")))
    monkeypatch.setenv("FIRST_GLOBUS_TOKEN", "AT-env")
    config = fake_cluster_config(fake_upstream)
    config["auth"] = {"client_id": CLIENT_ID, "sources": ["native", "hub_env", "env"]}
    return server_config(write_config(config), tmp_path / "data")


@pytest.fixture
def globus_auth():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add_passthru("http://127.0.0.1")  # the test's own calls to the server are not Globus's
        yield GlobusAuth(rsps)


def _api(door: Door, path: str) -> URL:
    return URL(f"{door.url.removesuffix('/v1')}/api/{path}", encoded=True)


async def _call(door: Door, method: str, path: str, body: object = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.request(
            method, _api(door, path), data=None if body is None else json.dumps(body), headers=door.headers) as resp:
        return resp.status, await resp.text()


async def test_sign_in_through_each_door_and_no_token_is_ever_shown(door, globus_auth, caplog):
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    code, text = await _call(door, "GET", "whoami")
    seen.append(text)
    assert (code, json.loads(text)["source"]) == (200, "hub_env")  # before signing in: the hub's tokens
    code, text = await _call(door, "POST", "login", {})
    seen.append(text)
    assert json.loads(text)["url"].startswith("https://auth.globus.org/v2/oauth2/authorize?client_id=")
    code, text = await _call(door, "POST", "login/code", {"code": "good-code"})
    seen.append(text)
    who = json.loads(text)
    assert (code, who["source"], who["identity"]["preferred_username"]) == (200, "native", "ada@uni.edu")
    for method, path in (("GET", "status"), ("GET", "whoami"), ("POST", "logout")):
        seen.append((await _call(door, method, path, {} if method == "POST" else None))[1])
    assert json.loads(seen[-1])["source"] == "hub_env"  # signed out of the native login
    shown = "\n".join(seen) + caplog.text
    assert [secret for secret in (*SECRETS, "AT-env") if secret in shown] == []


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("login/code", {"code": "good-code"}, 401, "No sign-in is waiting for a code"),
    ("login/code", {"nope": 1}, 400, '{"code": "..."}'),
])
async def test_bad_sign_in_steps_say_what_to_do(key_door, path, body, status, words):
    code, text = await _call(key_door, "POST", path, body)
    assert code == status
    assert words in json.loads(text)["error"]["message"]


async def test_kernels_never_see_a_token(first_ext, jp_serverapp):
    """The server keeps the token variables for its sources and takes them out of what kernels inherit."""
    async with started_kernel(jp_serverapp) as kernel:
        messages = await run(kernel, "import os\nprint(sorted(k for k, v in os.environ.items() if 'AT-' in v))\n"
                                     "%first whoami")
    out = "".join(m["content"]["text"] for _, m in messages if m["msg_type"] == "stream")
    assert out.startswith("[]\n")
    assert "Signed in as ada@uni.edu (source: hub_env)." in out
    assert "AT-" not in out


async def test_first_login_in_a_notebook(first_ext, jp_serverapp, globus_auth):
    """``%first login`` prints the URL, reads the pasted code from the notebook's input box, and says who."""
    async with started_kernel(jp_serverapp) as kernel:
        msg_id = kernel.execute("%first login", allow_stdin=True)
        prompt = await kernel.get_stdin_msg(timeout=30)
        assert prompt["content"]["prompt"] == "Authorization code: "
        kernel.input("good-code")
        out: list[str] = []
        while True:
            msg: dict[str, Any] = await kernel.get_iopub_msg(timeout=30)
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
    text = "".join(out)
    assert "https://auth.globus.org/v2/oauth2/authorize?client_id=" in text
    assert "Signed in as ada@uni.edu (source: native)." in text
    await asyncio.sleep(0)
