"""Kernels on a node behind a site proxy reach the gateway directly.

On a facility, ``HTTP_PROXY``/``HTTPS_PROXY`` name the site's forward proxy and ``NO_PROXY`` often lists only
``localhost``; httpx (so the official ``openai`` client) would send FIRST_GATEWAY_URL, ``http://127.0.0.1:PORT``,
to the proxy, which cannot reach the node's loopback. So the server adds the loopback names to the ``NO_PROXY`` its
kernels inherit, keeping what the user listed. Here a real Jupyter server starts real kernels with Debian's
tinyproxy named as the site proxy; its log shows every request that went through it.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.site_network import Tinyproxy
from first_jupyter.server_ext.app import LOOPBACK_NAMES, loopback_exempt
from tests.conftest import fake_cluster_config, server_config
from tests.waiting import ENGINE_GUARD_S, eventually

PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy")
LOOPBACK = "127.0.0.1,localhost,::1"

# -- the pure function ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, (LOOPBACK, LOOPBACK)),
    ({"NO_PROXY": "localhost"}, ("localhost,127.0.0.1,::1",) * 2),
    ({"no_proxy": ".cluster.example"}, (".cluster.example," + LOOPBACK,) * 2),
    ({"NO_PROXY": "", "no_proxy": "10.0.0.0/8"}, ("10.0.0.0/8," + LOOPBACK,) * 2),
    ({"NO_PROXY": "a.example", "no_proxy": "b.example,localhost"},
     ("a.example," + LOOPBACK, "b.example,localhost,127.0.0.1,::1")),
    ({"NO_PROXY": " ::1 , LOCALHOST,127.0.0.1 "}, ("::1 , LOCALHOST,127.0.0.1",) * 2),
    ({"NO_PROXY": "127.0.0.1:8888"}, ("127.0.0.1:8888," + LOOPBACK,) * 2),  # one port only: not all of loopback
])
def test_loopback_joins_the_users_no_proxy_in_both_spellings(environ, expected):
    before = dict(environ)
    assert loopback_exempt(environ) == dict(zip(("NO_PROXY", "no_proxy"), expected, strict=True))
    assert environ == before  # a pure function: the caller applies it


entry = st.one_of(st.sampled_from([*LOOPBACK_NAMES, "LOCALHOST", ".example.org", "10.0.0.0/8", "*", ""]),
                  st.from_regex(r"[a-z0-9.:-]{1,12}", fullmatch=True))
no_proxy = st.lists(entry, max_size=6).map(",".join)


@given(upper=st.one_of(st.none(), no_proxy), lower=st.one_of(st.none(), no_proxy))
def test_the_users_entries_stay_first_and_each_loopback_name_is_listed_once_more_at_most(upper, lower):
    environ = {name: value for name, value in (("NO_PROXY", upper), ("no_proxy", lower)) if value is not None}
    exempt = loopback_exempt(environ)
    for name, value in exempt.items():
        user = (environ.get(name) or upper or lower or "").strip()
        assert value.startswith(user)
        entries = [e.strip().lower() for e in value.split(",")]
        user_entries = [e.strip().lower() for e in user.split(",")] if user else []
        assert entries[:len(user_entries)] == user_entries
        for host in LOOPBACK_NAMES:
            assert entries.count(host) == max(1, user_entries.count(host))
    assert loopback_exempt({**environ, **exempt}) == exempt  # the server exports twice: the second adds nothing


# -- real kernels of a real server behind tinyproxy -------------------------------------------------------------


@pytest.fixture
def user_no_proxy() -> str:
    """The user's NO_PROXY (a test parametrizes it): what a site's login scripts commonly set."""
    return "localhost"


@pytest.fixture
def site_proxy(tinyproxy, monkeypatch, user_no_proxy: str) -> Tinyproxy:
    """tinyproxy, named in the server's environment as the site's proxy, with the user's NO_PROXY in one spelling.
    monkeypatch restores every variable afterwards, the ones the server changes included."""
    proxy = tinyproxy()
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, proxy.url)
    for name in ("ALL_PROXY", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", user_no_proxy)
    return proxy


@pytest.fixture
def jp_server_config(site_proxy, fake_upstream, write_config, tmp_path: Path):
    return server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "data")


@contextlib.asynccontextmanager
async def started_kernel(jp_serverapp: Any) -> AsyncIterator[Any]:
    """A kernel the server started, so with the server's environment as the extension left it; its client."""
    manager = jp_serverapp.kernel_manager
    kernel_id = await manager.start_kernel(kernel_name="python3")
    client = manager.get_kernel(kernel_id).client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=ENGINE_GUARD_S)
        yield client
    finally:
        client.stop_channels()
        await manager.shutdown_kernel(kernel_id, now=True)


async def printed(client: Any, code: str) -> str:
    """Run ``code`` in the kernel; what it printed. An exception in the kernel fails the test with its traceback."""
    msg_id = client.execute(code)
    out: list[str] = []
    while True:
        msg = await client.get_iopub_msg(timeout=ENGINE_GUARD_S)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "error":
            raise AssertionError("\n".join(content["traceback"]))
        if kind == "stream" and content["name"] == "stdout":
            out.append(content["text"])
        if kind == "status" and content["execution_state"] == "idle":
            return "".join(out)


CHAT = """
import os, openai
answer = openai.OpenAI(base_url=os.environ["FIRST_GATEWAY_URL"], api_key=os.environ["FIRST_API_KEY"],
                       max_retries=0).chat.completions.create(model="fake-model",
                                                              messages=[{"role": "user", "content": "hi"}])
print(answer.choices[0].message.content)
"""


async def test_the_openai_client_in_a_kernel_reaches_the_gateway_without_the_proxy(first_ext, jp_serverapp,
                                                                                   site_proxy):
    gateway = first_ext.gateway_url()
    assert gateway.startswith("http://127.0.0.1:")
    through_proxy = f"POST {gateway}/chat/completions HTTP/1.1"
    async with started_kernel(jp_serverapp) as kernel:
        environ = json.loads(await printed(kernel, "import os, json; print(json.dumps(dict(os.environ)))"))
        assert [environ[name] for name in PROXY_VARIABLES] == [site_proxy.url] * 4  # the proxy is the kernel's too
        assert await printed(kernel, CHAT) == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 \n"
        gateway_address = gateway.split("/")[2]  # 127.0.0.1:PORT, in a plain request's URL or a CONNECT alike
        assert not [line for line in site_proxy.requests() if gateway_address in line]

        # the same call with the user's NO_PROXY alone: httpx sends it to the proxy (which here can reach loopback)
        await printed(kernel, "os.environ['NO_PROXY'] = os.environ['no_proxy'] = 'localhost'\n" + CHAT)
        eventually(lambda: through_proxy in site_proxy.requests(), "the control call logged by the proxy")


@pytest.mark.parametrize("user_no_proxy", ["localhost,.cluster.example,10.0.0.0/8"])
async def test_a_kernel_keeps_the_users_no_proxy_entries(first_ext, jp_serverapp, site_proxy, user_no_proxy):
    async with started_kernel(jp_serverapp) as kernel:
        code = "import os, json; print(json.dumps([os.environ['NO_PROXY'], os.environ['no_proxy']]))"
        environ = json.loads(await printed(kernel, code))
    assert environ == [f"{user_no_proxy},127.0.0.1,::1"] * 2
