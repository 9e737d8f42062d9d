"""The gateway behind a real JupyterHub (6.1, configurable-http-proxy 5.3), reached only through the hub's public URL.

One hub serves the module (``tests/hub``): users log in through its form, their servers are spawned by
``SimpleLocalProcessSpawner`` and answer requests on ``/user/<name>/first/`` from the fake upstream, whose endpoint
asks for the user's Globus token, so every answer shows which token the gateway found.
"""

from __future__ import annotations

import asyncio
import copy
import json
import uuid
from collections.abc import Iterator

import httpx
import pytest
import yaml
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from bench.fake_upstream import FakeUpstream, serving_in_thread
from tests.conftest import fake_cluster_config
from tests.hub import RunningHub, running_hub
from tests.hub.authenticator import RESOURCE_SERVER, auth_state
from tests.waiting import ENGINE_GUARD_S, eventually

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    """The fake upstream for the module's hub (``fake_upstream``'s, lasting as long as the hub)."""
    with serving_in_thread(models=["fake-model", "fake-embed"], chunks=8) as running:
        yield running


@pytest.fixture(scope="module")
def hub(upstream: FakeUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningHub]:
    """A hub whose users' servers send the fake endpoint each request with the user's Globus token."""
    config = copy.deepcopy(fake_cluster_config(upstream))
    config["clusters"]["remote"]["endpoints"][0]["globus_resource_server"] = RESOURCE_SERVER
    directory = tmp_path_factory.mktemp("hub")
    first_config = directory / "first.yaml"
    first_config.write_text(yaml.safe_dump(config))
    with running_hub(directory, first_config) as running:
        yield running


@pytest.fixture(scope="module")
def ada(hub: RunningHub) -> str:
    """A user logged in, with a running server; their hub API token is ``hub.tokens["ada"]``."""
    hub.log_in("ada")
    hub.start_server("ada")
    return "ada"


def first(hub: RunningHub, name: str, path: str) -> str:
    return f"{hub.url}/user/{name}/first/{path}"


def as_user(hub: RunningHub, name: str) -> dict[str, str]:
    return {"Authorization": f"token {hub.tokens[name]}"}


def test_models_chat_and_a_stream_through_the_hubs_proxy(hub, ada, upstream):
    headers = as_user(hub, ada)
    models = httpx.get(first(hub, ada, "v1/models"), headers=headers, timeout=60)
    assert models.status_code == 200, models.text
    assert {m["id"] for m in models.json()["data"]} >= {"fake-model", "fake-embed"}

    chat = httpx.post(first(hub, ada, "v1/chat/completions"), headers=headers, json=CHAT, timeout=60)
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"]
    assert chat.headers["X-First-Cluster"] == "remote"
    # the user's Globus token, from the hub's auth state, went out with the request
    assert upstream.last_request_headers["authorization"] == "Bearer AT-ada-1"

    with httpx.stream("POST", first(hub, ada, "v1/chat/completions"), headers=headers,
                      json={**CHAT, "stream": True}, timeout=60) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [line for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) > 2


def test_whoami_reads_the_hubs_auth_state_with_the_granted_scope(hub, ada):
    who = httpx.get(first(hub, ada, "api/whoami"), headers=as_user(hub, ada), timeout=60)
    assert who.status_code == 200, who.text
    body = who.json()
    # hub_api, not the spawn-time copy in $GLOBUS_DATA: the server's token holds admin:auth_state!user
    assert (body["source"], body["identity"]["preferred_username"]) == ("hub_api", "ada@uni.edu")
    assert body["tokens"][RESOURCE_SERVER]["expired"] is False
    assert body["tokens"][RESOURCE_SERVER]["refreshable"] is True
    assert "AT-ada" not in who.text


def test_a_token_the_hub_renews_is_used_without_a_server_restart(hub, upstream):
    hub.log_in("rita")
    # rita's tokens expire while Globus Auth is out of the hub's reach: the hub keeps them, and spawns with them
    hub.hold_renewals("rita", True)
    expired = auth_state("rita", 1, expires_at=1.0)
    assert hub.admin("PATCH", "users/rita", json={"auth_state": expired}).status_code == 200
    hub.start_server("rita")
    started = hub.user("rita")["servers"][""]["started"]

    refused = httpx.post(first(hub, "rita", "v1/chat/completions"), headers=as_user(hub, "rita"), json=CHAT,
                         timeout=60)
    assert refused.status_code == 401, refused.text
    assert "have expired" in refused.json()["error"]["message"]
    assert not any(line.startswith("renewed rita") for line in hub.events())

    # Globus Auth is back: the hub's next refresh of rita (on a request of hers) renews the tokens
    hub.hold_renewals("rita", False)

    def renewed() -> bool:
        httpx.get(f"{hub.url}/hub/api/user", headers=as_user(hub, "rita"), timeout=60).raise_for_status()
        return "renewed rita 2" in hub.events()

    eventually(renewed, "the hub renews rita's tokens", within=ENGINE_GUARD_S)

    # the running server's gateway finds its copy expired, asks the hub again and gets the renewed token
    chat = httpx.post(first(hub, "rita", "v1/chat/completions"), headers=as_user(hub, "rita"), json=CHAT, timeout=60)
    assert chat.status_code == 200, chat.text
    assert upstream.last_request_headers["authorization"] == "Bearer AT-rita-2"
    assert hub.user("rita")["servers"][""]["started"] == started  # the same server, never restarted
    who = httpx.get(first(hub, "rita", "api/whoami"), headers=as_user(hub, "rita"), timeout=60).json()
    assert (who["source"], who["tokens"][RESOURCE_SERVER]["expired"]) == ("hub_api", False)


def test_another_users_hub_token_is_refused_with_the_reason(hub, ada):
    hub.log_in("bob")
    answer = httpx.get(first(hub, ada, "v1/models"), headers=as_user(hub, "bob"), timeout=60)
    assert answer.status_code == 403, answer.text
    error = answer.json()["error"]
    # the hub's reason, not "Not authenticated": bob is known to the hub, and this is not his server
    assert (error["code"], error["type"]) == ("not_your_server", "permission_error")
    assert "user bob is not allowed" in error["message"]
    # the same for a route that changes something (Jupyter raises its 403 before any redirect there)
    posted = httpx.post(first(hub, ada, "v1/chat/completions"), headers=as_user(hub, "bob"), json=CHAT, timeout=60)
    assert (posted.status_code, posted.json()["error"]["code"]) == (403, "not_your_server"), posted.text


def test_a_browser_post_without_its_xsrf_token_is_refused_403_saying_so(hub, ada):
    with hub.browser(ada) as browser:
        # the server's page sends the browser through the hub's OAuth: it comes back with the server's cookies
        page = browser.get(f"/user/{ada}/lab", follow_redirects=True)
        assert page.status_code == 200, page.text
        xsrf = browser.cookies.get("_xsrf", path=f"/user/{ada}/")
        assert xsrf
        refused = browser.post(f"/user/{ada}/first/v1/chat/completions", json=CHAT)
        assert refused.status_code == 403, refused.text
        error = refused.json()["error"]
        # the real reason, not "Not authenticated": the hub ignored a valid cookie because its XSRF token is missing
        assert (error["type"], error["code"]) == ("permission_error", "forbidden")
        assert "'_xsrf' argument missing from POST" in error["message"]
        assert "X-XSRFToken" in error["message"]
        served = browser.post(f"/user/{ada}/first/v1/chat/completions", json=CHAT, headers={"X-XSRFToken": xsrf})
        assert served.status_code == 200, served.text


def scoped_key(hub: RunningHub, name: str) -> str:
    """The key the server gives its kernels, from its runtime file (what the user's other processes read)."""
    runtime = hub.home(name) / ".local" / "share" / "jupyter" / "runtime"
    (path,) = runtime.glob("first-gateway-*.json")
    key: str = json.loads(path.read_text())["api_key"]
    return key


def test_the_scoped_key_is_refused_from_the_public_url(hub, ada):
    answer = httpx.get(first(hub, ada, "v1/models"), headers={"Authorization": f"Bearer {scoped_key(hub, ada)}"},
                       timeout=60)
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["code"] == "scoped_key_not_here"


KERNEL_CODE = """
import json, os, urllib.request
request = urllib.request.Request(os.environ["FIRST_GATEWAY_URL"] + "/models",
                                 headers={"Authorization": "Bearer " + os.environ["FIRST_API_KEY"]})
with urllib.request.urlopen(request, timeout=60) as answer:
    models = [m["id"] for m in json.load(answer)["data"]]
print(json.dumps({"gateway": os.environ["FIRST_GATEWAY_URL"], "models": models,
                  "globus_data": "GLOBUS_DATA" in os.environ}))
"""


async def run_in_kernel(url: str, headers: dict[str, str], code: str) -> str:
    """Run ``code`` in a kernel over its websocket (Jupyter's JSON messages), and return what it printed."""
    connection = await websocket_connect(HTTPRequest(url, headers=headers))
    msg_id, printed = uuid.uuid4().hex, []
    connection.write_message(json.dumps({
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": "test", "session": uuid.uuid4().hex,
                   "version": "5.3", "date": ""},
        "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
        "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                    "allow_stdin": False, "stop_on_error": True}}))
    try:
        while True:
            raw = await connection.read_message()
            assert raw is not None, "the kernel's websocket closed"
            message = json.loads(raw)
            if message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            assert kind != "error", content
            if kind == "stream":
                printed.append(content["text"])
            if kind == "status" and content["execution_state"] == "idle":
                return "".join(printed)
    finally:
        connection.close()


def test_a_kernel_behind_the_hub_reaches_the_gateway_with_its_key(hub, ada):
    headers = as_user(hub, ada)
    kernels = f"{hub.url}/user/{ada}/api/kernels"
    started = httpx.post(kernels, headers=headers, json={"name": "python3"}, timeout=ENGINE_GUARD_S)
    assert started.status_code == 201, started.text
    kernel = started.json()["id"]
    try:
        url = f"{kernels.replace('http://', 'ws://')}/{kernel}/channels"
        printed = asyncio.run(asyncio.wait_for(run_in_kernel(url, headers, KERNEL_CODE), ENGINE_GUARD_S))
    finally:
        assert httpx.delete(f"{kernels}/{kernel}", headers=headers, timeout=60).status_code == 204
    seen = json.loads(printed)
    # the key opens the gateway from the server's own machine, and the spawn-time auth state is not passed on
    assert seen["gateway"].startswith("http://127.0.0.1:")
    assert "fake-model" in seen["models"]
    assert seen["globus_data"] is False
