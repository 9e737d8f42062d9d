"""A shared gateway's Globus Compute endpoints that run as the user (``identity: user``): each request's tasks go
out with its sender's own Compute token (the dependent token of the token they sent), never with the gateway's own
sign-in; a connection per user, the least recent closed once its tasks are done; a user's refusal by an endpoint is
theirs alone; a batch whose owner has no Compute token waits for it, losing nothing; and a batch is offloaded only
to a cluster its owner may use.

Everything real but the services: the gateway is ``first serve``'s tornado app, in process. Globus Auth and Globus
Compute answer the real globus-sdk and globus-compute-sdk over HTTP (``responses``, in the shapes ``globus_sdk.testing``
documents); results come back over AMQP from the loopback broker stub; the "node" runs each task in a thread of this
process, next to the fake engine.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import responses
import yaml
from tornado.httpserver import HTTPServer

from first_jupyter.batch import runner
from first_jupyter.batch.offload import plan
from first_jupyter.config import COMPUTE_RESOURCE_SERVER, COMPUTE_SCOPE, load_config, parse_config
from first_jupyter.gateway.core import Gateway
from first_jupyter.serve.app import stop
from first_jupyter.serve.policy import SharedPolicy
from first_jupyter.service import build_gateway
from first_jupyter.transport.loop_thread import LoopThread
from tests.conftest import gate, held
from tests.fake_amqp import FakeAmqpBroker
from tests.fake_compute_service import COMPUTE, FakeComputeService
from tests.test_resource_server import introspection
from tests.test_shared_gateway import JSON, Shared, error_of, serve_section, serving
from tests.waiting import GUARD_S, eventually

SOPHIA = "5f9a1c2e-8b3d-4e6f-a1b2-c3d4e5f60718"
POLARIS = "6a0b2d3f-9c4e-4f70-b2c3-d4e5f6071829"
BOB = "b0b00000-0000-4000-8000-000000000000"
CAROL = "c4401000-0000-4000-8000-000000000000"
CHAT = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
OPERATOR_TOKEN = "AT-operator-signed-in-on-the-gateway-host"


def _user(sub: str, username: str) -> dict[str, Any]:
    return introspection(sub=sub, username=username, session_info={"authentications": {sub: {}}},
                         identity_set_detail=[{"id": sub, "username": username}])


class FakeGlobusAuth:
    """Introspection and the dependent-token grant, per access token. ``compute`` says which access tokens have a
    Globus Compute dependent token (and which); tests change it to take a user's away or give it back."""

    def __init__(self, rsps: responses.RequestsMock) -> None:
        ada = introspection()
        self.users = {"AT-ada": ada, "AT-ada-later": ada, "AT-bob": _user(BOB, "bob@uni.edu"),
                      "AT-carol": _user(CAROL, "carol@uni.edu")}
        self.compute = {"AT-ada": "CT-ada", "AT-ada-later": "CT-ada-later", "AT-bob": "CT-bob"}
        rsps.add_callback(responses.POST, "https://auth.globus.org/v2/oauth2/token/introspect",
                          callback=self._introspect)
        rsps.add_callback(responses.POST, "https://auth.globus.org/v2/oauth2/token", callback=self._dependent)

    def _introspect(self, request: Any) -> tuple[int, dict[str, str], str]:
        token = dict(urllib.parse.parse_qsl(request.body))["token"]
        return 200, JSON, json.dumps(self.users.get(token, {"active": False}))

    def _dependent(self, request: Any) -> tuple[int, dict[str, str], str]:
        form = dict(urllib.parse.parse_qsl(request.body))
        assert form["grant_type"] == "urn:globus:auth:grant_type:dependent_token"
        held = self.compute.get(form["token"])
        tokens = [] if held is None else [{"access_token": held, "resource_server": COMPUTE_RESOURCE_SERVER,
                                           "scope": COMPUTE_SCOPE, "expires_in": 172800, "token_type": "bearer"}]
        return 200, JSON, json.dumps(tokens)


@dataclass
class ComputeGateway:
    shared: Shared
    auth: FakeGlobusAuth
    service: FakeComputeService
    rsps: responses.RequestsMock

    def compute_calls(self, method: str, path_end: str) -> list[Any]:
        return [c.request for c in self.rsps.calls if c.request.url.startswith(COMPUTE)
                and c.request.method == method and c.request.url.endswith(path_end)]

    def task_groups(self, endpoint_id: str) -> list[str]:
        """Each submission's task group as the service answered it (a session's executor keeps its group)."""
        return [c.response.json()["task_group_id"] for c in self.rsps.calls if c.request.method == "POST"
                and c.request.url == f"{COMPUTE}/v3/endpoints/{endpoint_id}/submit"]

    def bearers(self, method: str, path_end: str) -> list[str]:
        return [r.headers["Authorization"].removeprefix("Bearer ") for r in self.compute_calls(method, path_end)]


def _result_watchers() -> int:
    return sum(1 for t in threading.enumerate() if type(t).__name__ == "_ResultWatcher")


@pytest.fixture
def serve_compute(tmp_path: Path, fake_upstream: Any, broker: FakeAmqpBroker,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ComputeGateway]]:
    """``first serve`` in process, its one cluster's endpoints running tasks as each user; the gateway's host has
    a sign-in of its own (``FIRST_GLOBUS_TOKEN``), which must never be used for them."""
    monkeypatch.setenv("FIRST_GLOBUS_TOKEN", OPERATOR_TOKEN)
    thread = LoopThread("compute-callers-test")
    running: list[tuple[HTTPServer, Gateway, SharedPolicy, FakeComputeService]] = []
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:

        def start(*endpoint_ids: str, **endpoint: Any) -> ComputeGateway:
            data = {"clusters": {"hpc": {"backend": "globus_compute", "endpoints": [
                {"name": f"ep-{ep[:4]}", "endpoint_id": ep, "engine_port": fake_upstream.port,
                 "models": [{"id": "llama", "upstream_name": "fake-model"}], **endpoint}
                for ep in endpoint_ids or (SOPHIA,)]}}, "auth": {"sources": ["env"]},
                "serve": serve_section(tmp_path / "state")}
            path = tmp_path / "first.yaml"
            path.write_text(yaml.safe_dump(data))
            config = load_config(path, tmp_path)
            assert config.serve is not None
            auth = FakeGlobusAuth(rsps)
            service = FakeComputeService(broker)
            service.install(rsps, *(endpoint_ids or (SOPHIA,)))
            FakeComputeService.amqp_url(rsps, broker)
            server, gateway, policy, port = thread.submit(serving(config, tmp_path / "state")).result(30)
            running.append((server, gateway, policy, service))
            return ComputeGateway(Shared(f"http://127.0.0.1:{port}", policy, gateway), auth, service, rsps)

        try:
            yield start
        finally:
            for server, gateway, policy, service in running:
                thread.submit(stop(server, gateway, policy, [])).result(30)
                service.join()
            thread.stop()
            eventually(lambda: _result_watchers() == 0)  # every session's result thread stopped
        assert OPERATOR_TOKEN not in {r.request.headers.get("Authorization", "").removeprefix("Bearer ")
                                      for r in rsps.calls if r.request.url.startswith(COMPUTE)}


def test_each_users_tasks_go_with_their_own_compute_token(serve_compute):
    gw = serve_compute()
    before = gw.shared.get("/first/api/status").json()["endpoints"][0]
    assert before["state"] == "unknown"  # read as the users, of whom none has come: not called offline
    assert gw.compute_calls("GET", "/status") == []

    for token in ("AT-ada", "AT-bob", "AT-ada"):
        answer = gw.shared.post("/first/v1/chat/completions", CHAT, token=token)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]

    assert gw.bearers("POST", f"/v3/endpoints/{SOPHIA}/submit") == ["CT-ada", "CT-bob", "CT-ada"]
    assert gw.bearers("POST", "/v3/functions") == ["CT-ada", "CT-bob"]  # each user's registration is theirs
    groups = gw.task_groups(SOPHIA)
    assert groups[0] == groups[2] != groups[1]  # a session (executor, result stream) per user, kept

    after = gw.shared.get("/first/api/status").json()["endpoints"][0]
    assert after["state"] == "running"
    assert gw.bearers("GET", f"/v2/endpoints/{SOPHIA}/status") == ["CT-ada"]  # as the newest user

    warmed = gw.shared.post("/first/api/models/llama/warm", {}, token="AT-bob")
    assert warmed.status_code == 200, warmed.text  # hot: nothing to start, nothing sent
    assert len(gw.compute_calls("POST", f"/v3/endpoints/{SOPHIA}/submit")) == 3


def test_a_start_asked_by_a_user_runs_as_that_user(serve_compute):
    gw = serve_compute()
    gw.service.status = {"status": "online", "details": {"total_workers": 0, "managers": 0}}  # cold
    assert gw.shared.post("/first/v1/chat/completions", CHAT, token="AT-ada").status_code == 200  # a session
    assert gw.shared.get("/first/api/status").json()["models"][0]["state"] == "cold"
    warmed = gw.shared.post("/first/api/models/llama/warm", {"wait": True}, token="AT-bob")
    assert warmed.status_code == 200, warmed.text
    assert warmed.json()["started"] is True
    submitted = gw.compute_calls("POST", f"/v3/endpoints/{SOPHIA}/submit")
    assert [r.headers["Authorization"] for r in submitted] == ["Bearer CT-ada", "Bearer CT-bob"]
    assert gw.bearers("POST", "/v3/functions")[-1] == "CT-bob"  # bob's own engine_health registration


def test_a_user_without_a_compute_token_is_told_why_and_nothing_is_sent_as_them(serve_compute):
    gw = serve_compute()
    refused = gw.shared.post("/first/v1/chat/completions", CHAT, token="AT-carol")
    assert refused.status_code == 401
    error = error_of(refused)
    assert error["code"] == "compute_token_missing"
    assert "carol@uni.edu" in error["message"]
    assert "dependent scope" in error["message"]
    assert gw.compute_calls("POST", "/v3/functions") == []
    assert gw.compute_calls("POST", f"/v3/endpoints/{SOPHIA}/submit") == []


def test_the_least_recent_users_connection_closes_once_its_task_is_answered(serve_compute, fake_upstream):
    gw = serve_compute(user_sessions=1)
    answers: dict[str, httpx.Response] = {}

    def ask(token: str) -> None:
        answers[token] = gw.shared.post("/first/v1/chat/completions", CHAT, token=token)

    ada = threading.Thread(target=ask, args=("AT-ada",))
    bob = threading.Thread(target=ask, args=("AT-bob",))
    gate(fake_upstream, hold=True)  # the engine answers nothing until told: ada's task is held on the node
    try:
        ada.start()
        eventually(lambda: held(fake_upstream) == 1)  # ada's task runs on the node
        bob.start()  # takes the one session's place
        eventually(lambda: held(fake_upstream) == 2)  # bob's task runs too, ada's not answered
        eventually(lambda: _result_watchers() == 2)  # ada's session is put aside, not closed: her task is out
    finally:
        gate(fake_upstream, open=True)
        ada.join(GUARD_S)
        bob.join(GUARD_S)
    assert answers["AT-bob"].status_code == 200
    assert answers["AT-ada"].status_code == 200  # put aside, ada's session still brought her answer back
    eventually(lambda: _result_watchers() == 1)  # and then closed: only bob's result stream is left

    assert gw.shared.post("/first/v1/chat/completions", CHAT).status_code == 200
    assert len(set(gw.task_groups(SOPHIA))) == 3  # ada came back to a new session


def test_one_users_refusal_by_an_endpoint_does_not_keep_others_from_it(serve_compute):
    gw = serve_compute(POLARIS, SOPHIA)
    gw.service.refused.add((POLARIS, "CT-bob"))
    bob = gw.shared.post("/first/v1/chat/completions", CHAT, token="AT-bob")
    assert bob.status_code == 200, bob.text
    assert bob.headers["X-First-Endpoint"] == f"ep-{SOPHIA[:4]}"  # refused by polaris, served by sophia
    endpoints = {gw.shared.post("/first/v1/chat/completions", CHAT).headers["X-First-Endpoint"] for _ in range(4)}
    assert f"ep-{POLARIS[:4]}" in endpoints  # ada still gets polaris: bob's refusal was his alone


def test_a_batch_waits_for_its_owners_compute_token_and_then_runs_every_line(serve_compute, monkeypatch):
    monkeypatch.setattr(runner, "OWNER_POLL_S", 0.1)
    gw = serve_compute()
    del gw.auth.compute["AT-ada"]  # ada's token brings no Compute token (as after a restart, or once it lapsed)
    lines = b"".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": CHAT}).encode() + b"\n" for i in range(3))
    uploaded = gw.shared.post("/first/v1/files", files={"file": ("in.jsonl", lines)}, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    created = gw.shared.post("/first/v1/batches", {"input_file_id": uploaded.json()["id"],
                                                   "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert created.status_code == 200, created.text
    batch_id = created.json()["id"]
    eventually(lambda: gw.shared.get(f"/first/v1/batches/{batch_id}").json()["status"] == "in_progress")
    # Every line has been sent to the gateway and refused for want of ada's Compute token (each refusal is in the
    # usage log): past that, a line only waits for the token, so whatever the batch would wrongly do without it
    # (submit as someone else, count a line failed) would have been done by now.
    eventually(lambda: gw.shared.gateway.usage.query(
        "SELECT COUNT(*) FROM usage WHERE status = 401 AND error LIKE '%holds no Globus Compute token%'")[0][0] == 3)
    waiting = gw.shared.get(f"/first/v1/batches/{batch_id}").json()
    assert waiting["status"] == "in_progress"
    assert (waiting["request_counts"]["completed"], waiting["request_counts"]["failed"]) == (0, 0)
    assert gw.compute_calls("POST", f"/v3/endpoints/{SOPHIA}/submit") == []

    back = gw.shared.get(f"/first/v1/batches/{batch_id}", token="AT-ada-later")  # any request of ada's
    assert back.status_code == 200
    eventually(lambda: gw.shared.get(f"/first/v1/batches/{batch_id}").json()["status"] == "completed")
    done = gw.shared.get(f"/first/v1/batches/{batch_id}").json()
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    assert set(gw.bearers("POST", f"/v3/endpoints/{SOPHIA}/submit")) == {"CT-ada-later"}
    output = gw.shared.get(f"/first/v1/files/{done['output_file_id']}/content").text.splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in output) == ["q0", "q1", "q2"]


class _Member:
    """A batch owner in the groups of ``cluster`` only."""

    user = "ada@uni.edu"

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster

    def may_use(self, model: str, cluster: str) -> bool:
        return cluster == self.cluster


async def test_a_batch_is_offloaded_only_to_a_cluster_its_owner_may_use(tmp_path):
    def cluster(endpoint_id: str) -> dict[str, Any]:
        return {"backend": "globus_compute", "endpoints": [{
            "name": "nodes", "endpoint_id": endpoint_id, "models": [{"id": "llama"}],
            "batch": {"shared_path": str(tmp_path / "shared"), "min_lines": 2,
                      "command": ["vllm", "run-batch", "-i", "{input}", "-o", "{output}"]}}]}

    config = {"clusters": {"closed": cluster(POLARIS), "open": cluster(SOPHIA)}, "auth": {"sources": ["env"]}}
    gateway = build_gateway(parse_config(config, "test"), tmp_path / "data", environ={}, shared=True)
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                            "body": CHAT}).encode() + b"\n" for i in range(3)))
    try:
        def run_of(owner: _Member | None) -> Any:
            return SimpleNamespace(batch={"request_counts": {"total": 3}, "input_file_id": "file-in"},
                                   gateway=gateway, store=SimpleNamespace(path=lambda _: source), caller=owner)

        assert (await plan(run_of(None))).backend.cluster == "closed"  # a user's own server: the first
        assert (await plan(run_of(_Member("open")))).backend.cluster == "open"
        assert await plan(run_of(_Member("elsewhere"))) is None  # request by request: each is refused with why
    finally:
        await gateway.close()
