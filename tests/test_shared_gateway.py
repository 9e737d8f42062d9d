"""The shared gateway (``first serve``) over HTTP: tokens, groups, quotas, per-user usage and batches, the access
log and metrics; and two gateway processes enforcing one user's limit together.

In process, Globus Auth and Groups answer through the real globus-sdk with ``globus_sdk.testing``'s registered
responses (``responses``); the client is httpx, which ``responses`` does not intercept. Across processes, the
gateways' globus-sdk is pointed at a loopback introspection stand-in (``bench.fake_globus_auth``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import psutil
import pytest
import responses
import yaml
from globus_sdk.testing import load_response
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

from bench.fake_globus_auth import AUTH_URL_ENV, fake_globus_auth
from bench.overhead import free_port
from bench.serve_processes import SECRET_ENV, serve_processes, start_serving, wait_ready
from first_jupyter.config import FirstConfig, load_config
from first_jupyter.gateway.core import Gateway
from first_jupyter.gateway.usage import UsageRecord
from first_jupyter.serve.app import build, http_server, stop
from first_jupyter.serve.policy import SharedPolicy
from first_jupyter.transport.loop_thread import LoopThread
from tests.big_body import BIG, ask, chunked, connect, fixed, request_head, send_until_answered
from tests.conftest import fake_cluster_config
from tests.test_audio import AUDIO, WHISPER
from tests.test_resource_server import ADA_GMAIL, GATEWAY, MISSING_GROUP, MY_GROUPS, SERVICE, introspection
from tests.waiting import eventually

MARKER = "zebra-quokka-secret-prompt"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": MARKER}]}
JSON = {"Content-Type": "application/json"}


def serve_section(state_dir: Path, **changes: Any) -> dict[str, Any]:
    return {"state_dir": str(state_dir), "auth": {"client_id": GATEWAY, "allowed_domains": ["uni.edu"],
                                                   "service_identities": [SERVICE], "admins": ["root@uni.edu"]},
            **changes}


@dataclass
class Shared:
    url: str
    policy: SharedPolicy
    gateway: Gateway

    def get(self, path: str, token: str | None = "AT-ada", **kw: Any) -> httpx.Response:  # noqa: S107 (a fake)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(self.url + path, headers=headers, timeout=30, **kw)

    def post(self, path: str, body: Any = None, token: str | None = "AT-ada",  # noqa: S107 (a fake)
             **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if body is not None:
            kw["json"] = body
        return httpx.post(self.url + path, headers=headers, timeout=30, **kw)


def _globus(rsps: responses.RequestsMock) -> None:
    """Introspection by token: ada (uni.edu), ada signed in with gmail, root, a service, an inactive one."""
    now = int(time.time())
    answers = {
        "AT-ada": introspection(),
        "AT-bob": introspection(sub="b0b00000-0000-4000-8000-000000000000", username="bob@uni.edu",
                                session_info={"authentications": {"b0b00000-0000-4000-8000-000000000000": {}}},
                                identity_set_detail=[{"id": "b0b00000-0000-4000-8000-000000000000",
                                                      "username": "bob@uni.edu"}]),
        "AT-root": introspection(username="root@uni.edu"),
        "AT-gmail": introspection(session_info={"authentications": {ADA_GMAIL: {"idp": "google"}}}),
        "AT-service": introspection(sub=SERVICE, username=f"{SERVICE}@clients.auth.globus.org", session_info={},
                                    identity_set_detail=[]),
        "AT-old": {"active": False},
        "AT-expired": introspection(exp=now - 5),
    }

    def introspect(request: Any) -> tuple[int, dict[str, str], str]:
        token = dict(urllib.parse.parse_qsl(request.body))["token"]
        return 200, JSON, json.dumps(answers.get(token, {"active": False}))

    rsps.add_callback(responses.POST, "https://auth.globus.org/v2/oauth2/token/introspect", callback=introspect)
    load_response("auth.oauth2_get_dependent_tokens", case="groups", requests_mock=rsps)
    load_response("groups.get_my_groups", requests_mock=rsps)


async def serving(config: FirstConfig, state_dir: Path) -> tuple[HTTPServer, Gateway, SharedPolicy, int]:
    """``first serve``'s application listening on a free loopback port (on the running loop), and the port."""
    assert config.serve is not None
    app, gateway, policy = build(config, config.serve, state_dir, "gateway-secret")
    server = http_server(app, config)
    sockets = bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    return server, gateway, policy, sockets[0].getsockname()[1]


@pytest.fixture
def shared(tmp_path: Path, fake_upstream: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Shared]:
    data = fake_cluster_config(fake_upstream)
    data["clusters"]["remote"]["endpoints"][0]["models"].append(WHISPER)
    data["serve"] = serve_section(tmp_path / "state", clusters={"remote": {"groups": [MY_GROUPS[0]]}},
                                  models={"fake-embed": {"groups": [MISSING_GROUP]}},
                                  quotas={"per_user": {"requests_per_s": 0.001, "burst": 4},
                                          "per_model": {"requests_per_s": 1000, "burst": 1000}})
    path = tmp_path / "first.yaml"
    path.write_text(yaml.safe_dump(data))
    config = load_config(path, tmp_path)
    assert config.serve is not None
    thread = LoopThread("shared-test")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        _globus(rsps)
        server, gateway, policy, port = thread.submit(serving(config, tmp_path / "state")).result(30)
        try:
            yield Shared(f"http://127.0.0.1:{port}", policy, gateway)
        finally:
            thread.submit(stop(server, gateway, policy, [])).result(30)
            thread.stop()


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


def test_tokens_are_refused_with_the_right_status_and_reason(shared):
    cases = {None: (401, "missing_token"), "AT-old": (401, "inactive_token"), "AT-expired": (401, "expired_token"),
             "AT-gmail": (403, "identity_domain_not_allowed")}
    for token, (status, code) in cases.items():
        answer = shared.post("/first/v1/chat/completions", CHAT, token=token)
        assert (answer.status_code, error_of(answer)["code"]) == (status, code), token
    assert "ada@gmail.com" in error_of(shared.post("/first/v1/chat/completions", CHAT, token="AT-gmail"))["message"]
    assert shared.get("/first/v1/models", token="AT-old").status_code == 401  # every route, not only inference


def test_a_refused_request_says_it_closes_and_the_clients_next_request_is_served(shared):
    """A refusal from the head leaves the body unread, so the connection cannot go on: the answer says so, and a
    client (httpx, keeping connections alive) sends its next request on a new one instead of failing."""
    port = int(shared.url.rsplit(":", 1)[1])
    with httpx.Client(base_url=shared.url, timeout=30) as client:
        for path in ("/first/v1/models", "/first/v1/files"):
            with connect(port) as sock:
                refused = ask(sock, request_head("GET", path, {"Authorization": "Bearer AT-old"}))
            assert (refused.status, refused.error()["code"]) == (401, "inactive_token")
            assert refused.headers["connection"] == "close"
            assert client.get(path, headers={"Authorization": "Bearer AT-old"}).status_code == 401
            served = client.get(path, headers={"Authorization": "Bearer AT-ada"})
            assert served.status_code == 200, served.text
        assert client.post("/first/v1/chat/completions", json=CHAT).status_code == 401
        served = client.post("/first/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer AT-ada"})
        assert served.status_code == 200, served.text


@pytest.mark.parametrize(("path", "status", "param"), [
    ("/first/v1/files?limit=%C2%B2", 400, "limit"), ("/first/v1/batches?limit=%C2%B9", 400, "limit"),
    ("/first/v1/files?after=%FF", 400, "after"), ("/first/v1/files/a/b", 404, None),
    ("/first/v1/files/..%2F..%2Fetc%2Fpasswd/content", 404, "file_id"), ("/first/api/nope", 404, None),
    ("/v1/chat/completions", 404, None)])
def test_bad_paths_and_queries_are_client_errors_in_the_openai_shape(shared, path, status, param):
    answer = shared.get(path)
    assert answer.status_code == status, answer.text
    assert set(error_of(answer)) == {"message", "type", "param", "code"}
    assert error_of(answer)["param"] == param


def test_a_member_is_served_with_the_allowance_in_the_headers_and_a_model_of_another_group_is_403(shared):
    answer = shared.post("/first/v1/chat/completions", CHAT)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-first-cluster"] == "remote"
    assert answer.headers["x-ratelimit-limit-requests"] == "4"
    assert answer.headers["x-ratelimit-remaining-requests"] == "3"
    refused = shared.post("/first/v1/embeddings", {"model": "fake-embed", "input": "x"})
    assert (refused.status_code, error_of(refused)["code"]) == (403, "model_not_allowed")
    assert f"https://app.globus.org/groups/{MISSING_GROUP}" in error_of(refused)["message"]
    unknown = shared.post("/first/v1/chat/completions", {**CHAT, "model": "made-up-model"})
    assert (unknown.status_code, error_of(unknown)["code"]) == (404, "model_not_found")
    with sqlite3.connect(shared.policy.state_dir / "quotas.sqlite3") as db:
        keys = {key for (key,) in db.execute("SELECT key FROM buckets")}
    assert not any("made-up-model" in key for key in keys)  # no quota row for a name served nowhere
    assert any("fake-model" in key for key in keys)
    not_warmed = shared.post("/first/api/models/fake-embed/warm", {})
    assert (not_warmed.status_code, error_of(not_warmed)["code"]) == (403, "cluster_not_allowed")
    service = shared.post("/first/v1/embeddings", {"model": "fake-embed", "input": "x"}, token="AT-service")
    assert service.status_code == 200  # a service identity skips the group checks


def test_a_user_over_the_limit_gets_429_with_retry_after_and_others_are_still_served(shared, caplog):
    caplog.set_level(logging.INFO, logger="first_jupyter.access")
    statuses = [shared.post("/first/v1/chat/completions", {**CHAT, "stream": i % 2 == 0}).status_code
                for i in range(6)]
    assert statuses == [200, 200, 200, 200, 429, 429]
    refused = shared.post("/first/v1/chat/completions", CHAT)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert "4 requests" in error_of(refused)["message"] or "limit" in error_of(refused)["message"]
    assert shared.post("/first/v1/chat/completions", CHAT, token="AT-bob").status_code == 200

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "first_jupyter.access"]
    served = [line for line in lines if line.get("model") == "fake-model"]
    assert [line["user"] for line in served] == ["ada@uni.edu"] * 4 + ["bob@uni.edu"]
    assert all(line["completion_tokens"] == 8 and line["cluster"] == "remote" for line in served)
    assert all(MARKER not in r.getMessage() for r in caplog.records)  # no prompt in any log line
    refusals = [line for line in lines if line.get("status") == 429]
    assert len(refusals) == 3
    assert refusals[0]["user"] == "ada@uni.edu"


def test_anthropics_client_signs_in_with_its_x_api_key_and_is_held_to_the_same_rules(shared):
    """The Globus token as ``x-api-key`` (what ``anthropic.Anthropic(api_key=...)`` sends): the same checks, the
    same quota, and every refusal in Anthropic's shape on the Messages routes."""
    def client(token: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(base_url=f"{shared.url}/first", api_key=token, max_retries=0)

    ask = {"model": "fake-model", "max_tokens": 16, "messages": [{"role": "user", "content": MARKER}]}
    message = client("AT-ada").messages.create(**ask)
    assert (message.model, message.content[0].text) == ("fake-model", "".join(f"tok{i} " for i in range(8)))
    assert client("AT-ada").messages.count_tokens(model="fake-model", messages=ask["messages"]).input_tokens == 8
    for token, refusal, kind in (("AT-old", anthropic.AuthenticationError, "authentication_error"),
                                 ("AT-gmail", anthropic.PermissionDeniedError, "permission_error")):
        with pytest.raises(refusal) as refused:
            client(token).messages.create(**ask)
        assert refused.value.response.json()["error"]["type"] == kind
    with pytest.raises(anthropic.RateLimitError) as limited:  # ada's burst of 4: 2 spent above, 2 more, then refused
        for _ in range(3):
            client("AT-ada").messages.create(**ask)
    assert limited.value.response.json()["error"]["type"] == "rate_limit_error"
    assert int(limited.value.response.headers["Retry-After"]) >= 1
    usage = shared.get("/first/api/usage").json()["data"]  # three Messages, a count (a chat probe)
    assert [(row["model"], row["requests"], row["prompt_tokens"]) for row in usage] == [("fake-model", 4, 4 * 8)]


def test_an_audio_form_is_served_to_a_member_within_the_allowance(shared, fake_upstream):
    client = openai.OpenAI(base_url=f"{shared.url}/first/v1", api_key="AT-ada", max_retries=0)  # a fake token
    raw = client.audio.transcriptions.with_raw_response.create(model="whisper", file=("talk.wav", AUDIO))
    assert raw.parse().text == f"{len(AUDIO)} bytes, sha256 {hashlib.sha256(AUDIO).hexdigest()}"
    assert raw.headers["x-ratelimit-remaining-requests"] == "3"
    assert fake_upstream.last_request_body["fields"]["model"] == WHISPER["upstream_name"]


def test_usage_is_per_user_and_operators_see_everyones(shared):
    for token in ("AT-ada", "AT-ada", "AT-bob"):
        assert shared.post("/first/v1/chat/completions", CHAT, token=token).status_code == 200
    mine = shared.get("/first/api/usage").json()
    assert mine["user"] == "ada@uni.edu"
    assert [(row["model"], row["requests"]) for row in mine["data"]] == [("fake-model", 2)]
    assert shared.get("/first/api/usage?user=bob@uni.edu").status_code == 403
    assert shared.get("/first/api/usage?user=bob@uni.edu", token="AT-root").json()["data"][0]["requests"] == 1
    everyone = shared.get("/first/api/usage/users", token="AT-root").json()["data"]
    assert {(row["user"], row["requests"]) for row in everyone} == {("ada@uni.edu", 2), ("bob@uni.edu", 1)}
    assert shared.get("/first/api/usage/users").status_code == 403
    headers = {"Authorization": "Bearer AT-ada"}
    assert httpx.put(shared.url + "/first/api/default_model", json={"model": "fake-model"}, headers=headers,
                     timeout=10).status_code == 403
    headers = {"Authorization": "Bearer AT-root"}
    assert httpx.put(shared.url + "/first/api/default_model", json={"model": "fake-model"}, headers=headers,
                     timeout=10).json() == {"default_model": "fake-model"}
    assert shared.get("/first/api/whoami").json()["username"] == "ada@uni.edu"


def test_responses_are_each_callers_own(shared):
    """A response kept by an engine is reached again only by whoever created it: to another caller its id is
    unknown, as any id that is not theirs."""
    created = shared.post("/first/v1/responses", {"model": "fake-model", "input": MARKER})
    assert created.status_code == 200, created.text
    path = f"/first/v1/responses/{created.json()['id']}"
    assert shared.get(path).json()["id"] == created.json()["id"]
    for refused in (shared.get(path, token="AT-bob"), shared.get(path + "/input_items", token="AT-bob"),
                    shared.post(path + "/cancel", token="AT-bob"),
                    httpx.delete(shared.url + path, headers={"Authorization": "Bearer AT-bob"}, timeout=30),
                    shared.post("/first/v1/responses", {"model": "fake-model", "input": "and?",
                                                        "previous_response_id": created.json()["id"]},
                                token="AT-bob")):
        assert refused.status_code == 404
        assert error_of(refused)["code"] == "response_not_found"
    assert shared.get(path).status_code == 200  # still there for its owner


def test_batches_and_files_are_each_users_own(shared):
    lines = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "fake-model"}}\n'
    uploaded = shared.post("/first/v1/files", files={"file": ("in.jsonl", lines)}, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    file_id = uploaded.json()["id"]
    assert [f["id"] for f in shared.get("/first/v1/files").json()["data"]] == [file_id]
    assert shared.get("/first/v1/files", token="AT-bob").json()["data"] == []
    assert shared.get(f"/first/v1/files/{file_id}/content", token="AT-bob").status_code == 404
    owners = [json.loads(p.read_bytes()) for p in (shared.policy.state_dir / "batches" / "users").glob("*/owner.json")]
    assert sorted((o["username"], set(o["groups"])) for o in owners) == [  # whose store, for resuming its runs
        ("ada@uni.edu", set(MY_GROUPS)), ("bob@uni.edu", set(MY_GROUPS))]


def test_a_batch_goes_only_as_its_owners_quota_allows_and_waits_its_turn(shared, monkeypatch):
    told_to_wait = threading.Event()  # the quota store refused one of the batch's lines: it waits its turn
    real_admit = shared.policy.quotas.admit

    async def admit(user: str, model: str) -> Any:
        allowance = await real_admit(user, model)
        if not allowance.allowed:
            told_to_wait.set()
        return allowance

    monkeypatch.setattr(shared.policy.quotas, "admit", admit)
    lines = b"".join(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": CHAT}).encode() + b"\n" for i in range(6))
    uploaded = shared.post("/first/v1/files", files={"file": ("in.jsonl", lines)}, data={"purpose": "batch"})
    created = shared.post("/first/v1/batches", {"input_file_id": uploaded.json()["id"],
                                                "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    assert created.status_code == 200, created.text
    batch = f"/first/v1/batches/{created.json()['id']}"
    eventually(lambda: shared.get(batch).json()["request_counts"]["completed"] >= 4, "4 lines answered", within=60)
    assert told_to_wait.wait(60)  # the 5th asked and was told to wait (the allowance comes back in 1000 s)
    waiting = shared.get(batch).json()
    assert waiting["status"] == "in_progress"
    assert waiting["request_counts"] == {"total": 6, "completed": 4, "failed": 0}  # ada's burst of 4, then waits
    assert shared.post("/first/v1/chat/completions", CHAT).status_code == 429  # the batch used ada's allowance
    assert shared.post("/first/v1/chat/completions", CHAT, token="AT-bob").status_code == 200  # not bob's

    assert shared.post(f"{batch}/cancel").status_code == 200
    eventually(lambda: shared.get(batch).json()["status"] == "cancelled", "the batch cancelled", within=60)
    ended = shared.get(batch).json()
    assert ended["request_counts"] == {"total": 6, "completed": 4, "failed": 2}
    errors = shared.get(f"/first/v1/files/{ended['error_file_id']}/content").text.splitlines()
    assert {json.loads(line)["error"]["code"] for line in errors} == {"batch_cancelled"}


def test_metrics_count_requests_tokens_refusals_and_endpoint_states(shared):
    shared.post("/first/v1/chat/completions", CHAT)
    shared.post("/first/v1/chat/completions", CHAT, token="AT-old")
    status = shared.get("/first/api/status")  # a status reading feeds the endpoint states
    assert status.status_code == 200
    text = httpx.get(shared.url + "/metrics", timeout=10).text  # open: no user in any label
    assert 'first_requests_total{cluster="remote",model="fake-model",status="200"} 1.0' in text
    assert 'first_tokens_total{kind="completion",model="fake-model"} 8.0' in text
    assert 'first_refused_total{reason="unauthenticated"} 1.0' in text
    assert 'first_endpoint_state{cluster="remote",endpoint="fake",state="online"} 1.0' in text
    assert 'first_endpoint_state{cluster="remote",endpoint="fake",state="offline"} 0.0' in text
    assert "first_request_latency_seconds_bucket" in text
    assert "ada" not in text


def test_healthz_is_open_and_names_the_one_host_state(shared):
    health = httpx.get(shared.url + "/healthz", timeout=10)
    assert health.status_code == 200
    assert health.json() == {"ok": True, "state": {"sqlite": "ok"}}


# -- gateway processes ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gateway_processes(tmp_path: Path, fake_upstream: Any, auth_url: str,
                      serve: Callable[[int], dict[str, Any]], count: int = 2,
                      procs: list[subprocess.Popen[bytes]] | None = None) -> Iterator[list[str]]:
    """``serve_processes`` in front of the fake upstream, the serve section of the n-th from ``serve(n)``, any
    identity domain allowed (the stand-in's users are all at uni.edu)."""
    def config(n: int) -> dict[str, Any]:
        data = fake_cluster_config(fake_upstream)
        data["serve"] = serve(n)
        data["serve"]["auth"]["allowed_domains"] = []
        return data

    with serve_processes(tmp_path, config, auth_url, count, procs) as urls:
        yield urls


@pytest.fixture
def two_gateways(tmp_path: Path, fake_upstream: Any) -> Iterator[tuple[list[str], list[Path]]]:
    """Two services on two ports, one state dir: quotas, usage."""
    def serve(_n: int) -> dict[str, Any]:
        return serve_section(tmp_path / "state", quotas={"per_user": {"requests_per_s": 0.001, "burst": 5}})

    with fake_globus_auth(GATEWAY) as auth, gateway_processes(tmp_path, fake_upstream, auth.url, serve) as urls:
        yield urls, [tmp_path / "access-0.log", tmp_path / "access-1.log"]


@pytest.fixture
def one_gateway(tmp_path: Path, fake_upstream: Any) -> Iterator[tuple[int, psutil.Process]]:
    """One ``first serve`` process, Globus Auth's introspection stood in on loopback: its port and its process."""
    port = free_port()
    with fake_globus_auth(GATEWAY) as auth:
        data = fake_cluster_config(fake_upstream)
        data["serve"] = {**serve_section(tmp_path / "state"), "listen": {"host": "127.0.0.1", "port": port}}
        config, log = tmp_path / "first.yaml", tmp_path / "serve.log"
        config.write_text(yaml.safe_dump(data))
        proc = start_serving(config, {**os.environ, SECRET_ENV: "gateway-secret", AUTH_URL_ENV: auth.url}, log)
        try:
            wait_ready(f"http://127.0.0.1:{port}", proc, log)
            yield port, psutil.Process(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0


def test_a_body_is_refused_from_the_head_before_it_is_read_and_costs_no_memory(one_gateway):
    """An unauthenticated client announcing 150 MB gets its 401 while it is still sending, and the gateway's memory
    does not grow by what it sent; nor by a member's body over the request limit (only an upload takes more)."""
    port, process = one_gateway
    chat = "/first/v1/chat/completions"
    first = send_until_answered(port, request_head("POST", chat, {"Content-Length": "2"}), fixed(2))
    assert first.status == 401  # the first request's own costs (imports, buffers) are paid before measuring
    before = process.memory_info().rss
    for token, code in ((None, "missing_token"), ("AT-inactive-eve", "inactive_token")):
        headers = {"Content-Length": str(BIG), **({"Authorization": f"Bearer {token}"} if token else {})}
        refused = send_until_answered(port, request_head("POST", chat, headers), fixed(BIG))
        assert (refused.status, refused.error()["code"]) == (401, code)
        assert refused.sent < BIG  # answered while the client was still sending: the body was never read
        assert refused.headers["connection"] == "close"
    member = {"Authorization": "Bearer AT-ada"}
    too_big = send_until_answered(port, request_head("POST", chat, {**member, "Content-Length": str(BIG)}),
                                  fixed(BIG))
    assert (too_big.status, too_big.error()["code"]) == (413, "request_too_large")
    assert too_big.sent < BIG
    grown = process.memory_info().rss - before
    assert grown < 10 * 1024 * 1024, f"the gateway grew by {grown:,} bytes"
    unannounced = send_until_answered(port, request_head("POST", chat, {**member, "Transfer-Encoding": "chunked"}),
                                      chunked(BIG))
    assert (unannounced.status, unannounced.error()["code"]) == (413, "request_too_large")  # at the limit's byte
    assert unannounced.sent < BIG


def test_two_gateway_processes_enforce_one_users_limit_together(two_gateways):
    urls, access_logs = two_gateways
    headers = {"Authorization": "Bearer AT-ada"}
    statuses = [httpx.post(urls[i % 2] + "/first/v1/chat/completions", json=CHAT, headers=headers, timeout=30)
                for i in range(10)]
    assert [r.status_code for r in statuses] == [200] * 5 + [429] * 5  # the burst of 5, across both processes
    assert {r.headers.get("x-ratelimit-remaining-requests") for r in statuses[5:]} == {"0"}
    bob = httpx.post(urls[1] + "/first/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer AT-bob"},
                     timeout=30)
    assert bob.status_code == 200
    served = [json.loads(line) for log in access_logs for line in log.read_text().splitlines()]
    assert sorted(line["status"] for line in served if line.get("user") == "ada@uni.edu") == [200] * 5 + [429] * 5
    assert {line["user"] for line in served if line.get("model") == "fake-model"} == {"ada@uni.edu", "bob@uni.edu"}


def test_lines_accounted_together_take_their_tokens_once_per_user_and_model(shared, monkeypatch):
    """An offloaded chunk's lines: each is counted, and their tokens are one write to the quota store per user
    and model, not one per line."""
    spent: list[tuple[str, str, int]] = []
    real_spend = shared.policy.quotas.spend

    def spend(user: str, model: str, tokens: int) -> None:
        spent.append((user, model, tokens))
        real_spend(user, model, tokens)

    monkeypatch.setattr(shared.policy.quotas, "spend", spend)

    def line(user: str, prompt: int, completion: int | None) -> UsageRecord:
        return UsageRecord(time.time(), f"batch_1/{user}-{prompt}", "fake-model", "remote", "fake", "chat", False,
                           200, prompt, completion, 5.0, None, None, user)

    shared.policy.recorded_all([line("ada", 10, 5), line("bob", 7, None), line("ada", 20, 5)])
    assert spent == [("ada", "fake-model", 40), ("bob", "fake-model", 7)]
