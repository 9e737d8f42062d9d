"""The gateway behind a real JupyterHub (6.1, configurable-http-proxy 5.3), reached only through the hub's public URL.

One hub serves the module (``tests/hub``): users log in through its form, their servers are spawned by
``SimpleLocalProcessSpawner`` and answer requests on ``/user/<name>/first/`` from the fake upstream, whose endpoint
asks for the user's Globus token, so every answer shows which token the gateway found.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import httpx
import pytest
import yaml

from bench.fake_upstream import FakeUpstream, serving_in_thread
from tests.conftest import fake_cluster_config
from tests.hub import RunningHub, running_hub
from tests.hub.authenticator import RESOURCE_SERVER

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
