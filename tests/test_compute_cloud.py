"""Contract tests for the ``globus_compute`` backend: the real globus-sdk and globus-compute-sdk, over HTTP answered
by ``globus_sdk.testing``'s documented responses through ``responses`` (nothing leaves this process)."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import globus_sdk
import pytest
import responses
from globus_compute_sdk.errors import TaskExecutionFailed
from globus_sdk.testing import get_response_set, load_response

from first_jupyter.config import parse_config
from first_jupyter.gateway.backends.compute.backend import CallWindow
from first_jupyter.gateway.backends.compute.errors import describe_failure
from first_jupyter.gateway.core import Gateway
from first_jupyter.protocol import Capability, OpenAIError, parse_request
from first_jupyter.remote.inference import call_engine
from first_jupyter.service import build_gateway
from tests.conftest import closed_port
from tests.fake_compute_service import COMPUTE, QUEUE_PREFIX, FakeComputeService
from tests.waiting import GUARD_S, eventually

TOKEN = "AT-compute-user"



@pytest.fixture
def endpoint_id(rsps: responses.RequestsMock) -> str:
    """Function registration as documented, and submission answered in the documented shape with one task id
    per submitted task (the SDK fails futures whose count does not match)."""
    load_response(globus_sdk.ComputeClientV3.register_function, requests_mock=rsps)
    documented = get_response_set(globus_sdk.ComputeClientV3.submit).lookup("default")
    endpoint = documented.metadata["endpoint_id"]

    def answer(request: Any) -> tuple[int, dict[str, str], str]:
        asked = json.loads(request.body)["tasks"]
        tasks = {fn: [str(uuid.uuid4()) for _ in batch] for fn, batch in asked.items()}
        return 200, {"Content-Type": "application/json"}, json.dumps({**documented.json, "tasks": tasks})

    rsps.add_callback(responses.POST, f"{COMPUTE}/v3/endpoints/{endpoint}/submit", callback=answer)
    return endpoint


def _config(endpoint_id: str, **endpoint: Any) -> dict[str, Any]:
    return {"clusters": {"hpc": {"backend": "globus_compute", "endpoints": [{
        "name": "sophia", "endpoint_id": endpoint_id, "models": [{"id": "llama"}], **endpoint}]}},
        "auth": {"sources": ["env"]}}


def _gateway(tmp_path: Path, endpoint_id: str, environ: dict[str, str] | None = None, **endpoint: Any) -> Gateway:
    environ = {"FIRST_GLOBUS_TOKEN": TOKEN} if environ is None else environ
    return build_gateway(parse_config(_config(endpoint_id, **endpoint), "test"), tmp_path, environ=environ)


def _chat(**extra: Any) -> Any:
    body = {"model": "llama", "messages": [{"role": "user", "content": "hi"}], **extra}
    return parse_request(Capability.chat, json.dumps(body).encode())


def _calls(rsps: responses.RequestsMock, method: str, path: str) -> list[Any]:
    return [c.request for c in rsps.calls if c.request.method == method and c.request.url.endswith(path)]


async def test_the_function_is_registered_once_and_tasks_go_to_the_endpoint_as_the_user(rsps, endpoint_id, tmp_path):
    gateway = _gateway(tmp_path, endpoint_id)
    submitter = gateway.backends[0].submitter
    try:
        task = await submitter.submit(call_engine, 8000, "chat/completions", {"model": "llama"}, 900.0)
        eventually(lambda: _calls(rsps, "POST", f"/v3/endpoints/{endpoint_id}/submit"))
        registered = _calls(rsps, "POST", "/v3/functions")
        assert len(registered) == 1
        assert json.loads(registered[0].body)["function_name"] == "call_engine"
        submitted = _calls(rsps, "POST", f"/v3/endpoints/{endpoint_id}/submit")[0]
        assert submitted.headers["Authorization"] == f"Bearer {TOKEN}"
        function_id = load_response(globus_sdk.ComputeClientV3.register_function, requests_mock=rsps) \
            .metadata["function_id"]
        assert function_id in submitted.body.decode()
        eventually(lambda: task.task_id is not None)
    finally:
        await gateway.close()

    again = _gateway(tmp_path, endpoint_id)  # a restart: the registration is remembered
    try:
        await again.backends[0].submitter.submit(call_engine, 8000, "chat/completions", {"model": "llama"}, 900.0)
        eventually(lambda: len(_calls(rsps, "POST", f"/v3/endpoints/{endpoint_id}/submit")) == 2)
        assert len(_calls(rsps, "POST", "/v3/functions")) == 1
    finally:
        await again.close()


async def test_configured_function_ids_are_used_without_registering(rsps, endpoint_id, tmp_path):
    function_id = "0c8f6a8a-7d0e-4f9b-9a55-6b0d1b6f0e11"
    gateway = _gateway(tmp_path, endpoint_id, functions={"call_engine": function_id})
    try:
        await gateway.backends[0].submitter.submit(call_engine, 8000, "chat/completions", {}, 900.0)
        eventually(lambda: _calls(rsps, "POST", f"/v3/endpoints/{endpoint_id}/submit"))
        assert _calls(rsps, "POST", "/v3/functions") == []
        assert function_id in _calls(rsps, "POST", f"/v3/endpoints/{endpoint_id}/submit")[0].body.decode()
    finally:
        await gateway.close()


@pytest.mark.parametrize(("status", "expected", "words"), [
    (401, (401, "globus_sign_in"), "`%first login`"),
    (403, (403, "endpoint_forbidden"), "ask the endpoint's administrators"),
    (413, (413, "request_too_large"), "too large"),
])
async def test_a_refused_submission_is_the_openai_error_that_says_what_to_do(rsps, endpoint_id, tmp_path, status,
                                                                           expected, words):
    rsps.replace(responses.POST, f"{COMPUTE}/v3/endpoints/{endpoint_id}/submit", status=status,
                 json={"code": "NOPE", "message": "the service said no"})
    gateway = _gateway(tmp_path, endpoint_id)
    try:
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_chat())
        assert (info.value.status, info.value.code) == expected
        assert words in info.value.message
        assert "the service said no" in info.value.message
        assert TOKEN not in info.value.message
    finally:
        await gateway.close()


async def test_a_payload_over_the_limit_is_refused_before_anything_is_sent(rsps, endpoint_id, tmp_path):
    gateway = _gateway(tmp_path, endpoint_id)
    try:
        with pytest.raises(OpenAIError, match=r"more than a Globus Compute task may carry \(10 MB\)") as info:
            await gateway.complete(_chat(prompt_padding="x" * 10_100_000))  # over 10 MB as sent
        assert info.value.status == 413
        with pytest.raises(OpenAIError, match="once serialized") as info:
            await gateway.complete(_chat(prompt_padding="é" * 3_500_000))  # 7 MB sent, over 10 MB serialized
        assert info.value.status == 413
        assert _calls(rsps, "POST", f"/v3/endpoints/{endpoint_id}/submit") == []
    finally:
        await gateway.close()


async def test_without_a_sign_in_nothing_reaches_the_service(rsps, endpoint_id, tmp_path):
    gateway = _gateway(tmp_path, endpoint_id, environ={})
    try:
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_chat())
        assert (info.value.status, info.value.code) == (401, "globus_sign_in")
        assert "`%first login`" in info.value.message
        assert len(rsps.calls) == 0
    finally:
        await gateway.close()


async def test_a_service_identity_gets_its_own_token_from_client_credentials(rsps, endpoint_id, tmp_path):
    rsps.add(responses.POST, "https://auth.globus.org/v2/oauth2/token", json={
        "access_token": "AT-service", "expires_in": 172800, "resource_server": "funcx_service",
        "scope": "https://auth.globus.org/scopes/facd7ccc-c5f4-42aa-916b-a0e270e2c2a9/all", "token_type": "Bearer",
        "other_tokens": []})
    environ = {"FIRST_COMPUTE_CLIENT_ID": "d2e0c1a1-0000-4000-8000-000000000001",
               "FIRST_COMPUTE_CLIENT_SECRET": "client-secret"}
    gateway = _gateway(tmp_path, endpoint_id, environ=environ, identity="service")
    try:
        await gateway.backends[0].submitter.submit(call_engine, 8000, "chat/completions", {}, 900.0)
        eventually(lambda: _calls(rsps, "POST", f"/v3/endpoints/{endpoint_id}/submit"))
        grant = _calls(rsps, "POST", "/v2/oauth2/token")[0]
        assert "grant_type=client_credentials" in grant.body
        assert _calls(rsps, "POST", "/v3/functions")[0].headers["Authorization"] == "Bearer AT-service"
    finally:
        await gateway.close()

    unset = _gateway(tmp_path, endpoint_id, environ={}, identity="service")
    try:
        with pytest.raises(OpenAIError, match=r"\$FIRST_COMPUTE_CLIENT_ID and \$FIRST_COMPUTE_CLIENT_SECRET") as info:
            await unset.complete(_chat())
        assert info.value.status == 401
    finally:
        await unset.close()


async def test_endpoint_status_is_read_through_the_sdk_and_reused(rsps, endpoint_id, tmp_path):
    load_response(globus_sdk.ComputeClientV2.get_endpoint_status, requests_mock=rsps)
    rsps.replace(responses.GET, f"{COMPUTE}/v2/endpoints/{endpoint_id}/status", json={
        "status": "online", "details": {"total_workers": 8, "idle_workers": 3, "pending_tasks": 0,
                                        "outstanding_tasks": 5, "managers": 2}})
    gateway = _gateway(tmp_path, endpoint_id)
    try:
        status = (await gateway.status()).json_value()
        endpoint = status["endpoints"][0]
        assert (endpoint["state"], endpoint["workers"], endpoint["idle_workers"]) == ("running", 8, 3)
        assert (endpoint["managers"], endpoint["outstanding_tasks"]) == (2, 5)
        assert status["models"][0]["state"] == "hot"
        await gateway.status()
        assert len(_calls(rsps, "GET", "/status")) == 1  # reused within status_ttl
    finally:
        await gateway.close()


async def test_status_never_asks_more_than_the_service_allows(rsps, tmp_path):
    ids = [f"00000000-0000-4000-8000-{i:012d}" for i in range(30)]
    for ep in ids:
        rsps.add(responses.GET, f"{COMPUTE}/v2/endpoints/{ep}/status", json={"status": "offline", "details": {}})
    config = {"clusters": {"hpc": {"backend": "globus_compute", "endpoints": [
        {"name": f"ep{i}", "endpoint_id": ep, "models": [{"id": "llama"}]} for i, ep in enumerate(ids)]}},
        "auth": {"sources": ["env"]}}
    gateway = build_gateway(parse_config(config, "test"), tmp_path, environ={"FIRST_GLOBUS_TOKEN": TOKEN})
    try:
        endpoints = (await gateway.status()).json_value()["endpoints"]
        assert len(rsps.calls) <= 18
        assert sum(1 for e in endpoints if e.get("stale")) == 30 - len(rsps.calls)
        assert {e["state"] for e in endpoints if not e.get("stale")} == {"offline"}
    finally:
        await gateway.close()


def test_the_call_window_admits_calls_again_as_they_age():
    window_s = 1.0  # far longer than four calls in a row take on any machine (microseconds)
    window = CallWindow(calls=3, window_s=window_s)
    before_first = time.monotonic()
    assert [window.take() for _ in range(4)] == [True, True, True, False]
    # the first call ages out of the window: waited for (the window has no clock to turn), however long it takes
    eventually(window.take)
    assert time.monotonic() - before_first >= window_s  # and not before it had aged (a lower bound holds anywhere)


def test_a_remote_failure_carries_the_remote_errors_summary():
    remote = 'Traceback (most recent call last):\n  File "inference.py", line 40\nConnectionRefusedError: [Errno 111]'
    error = describe_failure(TaskExecutionFailed(remote), "cluster 'hpc' endpoint 'sophia'")
    assert (error.status, error.code) == (502, "remote_error")
    assert error.message == "The task failed on cluster 'hpc' endpoint 'sophia': ConnectionRefusedError: [Errno 111]"


# -- end to end through the SDK: tasks run on a "node" (this process), results back over AMQP --------------------


ENDPOINT = "5f9a1c2e-8b3d-4e6f-a1b2-c3d4e5f60718"


def _node_config(port: int) -> dict[str, Any]:
    config = _config(ENDPOINT, engine_port=port)
    config["clusters"]["hpc"]["endpoints"][0]["models"] = [{"id": "llama", "upstream_name": "fake-model"}]
    return config


async def test_a_request_runs_next_to_the_engine_and_its_answer_comes_back(rsps, broker, fake_upstream, tmp_path):
    service = FakeComputeService(broker)
    service.install(rsps, ENDPOINT)
    gateway = build_gateway(parse_config(_node_config(fake_upstream.port), "test"), tmp_path,
                      environ={"FIRST_GLOBUS_TOKEN": TOKEN})
    try:
        done = await gateway.complete(_chat(max_tokens=8))
        answer = json.loads(done.body)
        assert answer["model"] == "llama"
        assert answer["choices"][0]["message"]["content"]
        assert fake_upstream.last_request_body["model"] == "fake-model"

        stream = await gateway.stream(_chat(stream=True))  # no callback URL configured: the stream comes whole
        out: list[bytes] = []
        try:
            await stream.relay(lambda chunk: out.append(chunk) or True)
        finally:
            stream.close()
        assert len(out) == 1
        assert out[0].count(b"data: {") == 9  # the fake's 8 tokens and its finishing event
        assert out[0].rstrip().endswith(b"data: [DONE]")
        assert b'"model":"llama"' in out[0]
        assert stream.error is None
        assert sorted(service.functions.values(), key=lambda f: f.__name__)[0].__name__ == "call_engine"
    finally:
        await gateway.close()
        service.join()


async def test_a_failure_on_the_node_is_answered_with_the_remote_errors_summary(rsps, broker, tmp_path):
    service = FakeComputeService(broker)
    service.install(rsps, ENDPOINT)
    gateway = build_gateway(parse_config(_node_config(closed_port()), "test"), tmp_path,
                      environ={"FIRST_GLOBUS_TOKEN": TOKEN})
    try:
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_chat())
        assert (info.value.status, info.value.code) == (502, "remote_error")
        assert info.value.message.startswith("The task failed on cluster 'hpc' endpoint 'sophia': "
                                             "ConnectionRefusedError")
        with pytest.raises(OpenAIError, match="ConnectionRefusedError") as info:
            await gateway.stream(_chat(stream=True))  # before the first byte: a real status, not an event
        assert info.value.status == 502
    finally:
        await gateway.close()
        service.join()


async def test_with_amqp_port_set_results_come_back_on_that_port_not_the_services(rsps, broker, fake_upstream,
                                                                                  tmp_path):
    """``amqp_port`` (443 where a firewall blocks 5671) replaces the port in the result-queue URL the service gives:
    here that URL names a port nothing listens on, and the answer still comes, through the broker's port."""
    refused = f"amqp://{broker.host}:{closed_port()}/"
    rsps.replace(responses.GET, f"{COMPUTE}/v2/get_amqp_result_connection_url",
                 json={"queue_prefix": QUEUE_PREFIX, "connection_url": refused})
    service = FakeComputeService(broker)
    service.install(rsps, ENDPOINT)
    config = _node_config(fake_upstream.port)
    config["clusters"]["hpc"]["endpoints"][0]["amqp_port"] = broker.port
    gateway = build_gateway(parse_config(config, "test"), tmp_path, environ={"FIRST_GLOBUS_TOKEN": TOKEN})
    try:
        done = await gateway.complete(_chat(max_tokens=8))
        assert json.loads(done.body)["choices"][0]["message"]["content"]
        broker.wait_until(lambda: len(broker.acked) == 1)  # taken from the broker, on the port amqp_port named
    finally:
        await gateway.close()
        service.join()


# -- the scheduler's view, read through the cluster's login endpoint ------------------------------------------------

LOGIN = "7c0e2a94-3f1b-4d5e-9a8b-0c1d2e3f4a5b"
DATA = Path(__file__).parent / "data" / "scheduler"


def _qstat(state: str, substate: int) -> str:
    """``qstat -f -F json`` with the endpoint's block job (as GlobusComputeEngine names it) and another user's."""
    jobs = {"3000001.pbs": {"Job_Name": "parsl.first-sophia-HighThroughputExecutor.block-0.1712345678.1234",
                            "job_state": state, "substate": substate, "queue": "prod",
                            "ctime": "Fri Apr  5 14:00:00 2024", "Resource_List": {"nodect": 1}},
            "3000002.pbs": {"Job_Name": "lammps", "job_state": "R", "substate": 42, "queue": "prod"}}
    return json.dumps({"timestamp": 1712327400, "pbs_version": "2022.1.3", "pbs_server": "pbs", "Jobs": jobs})


async def _read_again(gateway: Gateway, before: dict[str, Any]) -> dict[str, Any]:
    """``gateway.status()`` once both its readings, the endpoint's and the scheduler's, are newer than in
    ``before``: each is reused for a while (``status_ttl``, ``every``: 1 s here), so a change shows once it is read
    again, which is waited for rather than slept for."""
    def checked(status: dict[str, Any]) -> tuple[Any, Any]:
        endpoint = status["endpoints"][0]
        return endpoint["checked"], endpoint["scheduler"]["checked"]

    old_endpoint, old_scheduler = checked(before)
    deadline = time.monotonic() + GUARD_S
    while True:
        status = (await gateway.status()).json_value()
        endpoint_at, scheduler_at = checked(status)
        if endpoint_at != old_endpoint and scheduler_at != old_scheduler:
            return status
        assert time.monotonic() < deadline, f"the readings were not taken again; last: {status}"
        await asyncio.sleep(0.05)


async def test_the_scheduler_view_says_where_a_cold_endpoints_block_is(rsps, broker, tmp_path, monkeypatch):
    """Before a block's engine answers, the endpoint reports no workers; the login endpoint's qstat says the block
    is queued, then booting; once workers connect, the model is hot."""
    service = FakeComputeService(broker)
    service.install(rsps, ENDPOINT)
    service.install(rsps, LOGIN)
    service.status = {"status": "online", "details": {"total_workers": 0, "idle_workers": 0, "managers": 0}}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command, source in (("qstat", tmp_path / "qstat.json"), ("pbsnodes", DATA / "pbsnodes_a_F_json.json")):
        (bin_dir / command).write_text(f"#!/bin/sh\ncat '{source}'\n")
        (bin_dir / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    (tmp_path / "qstat.json").write_text(_qstat("Q", 10))
    config = _config(ENDPOINT, status_ttl=1)
    config["clusters"]["hpc"]["scheduler"] = {"kind": "pbs", "endpoint_id": LOGIN, "queue": "prod", "every": 1}
    gateway = build_gateway(parse_config(config, "test"), tmp_path, environ={"FIRST_GLOBUS_TOKEN": TOKEN})
    try:
        status = (await gateway.status()).json_value()
        endpoint = status["endpoints"][0]
        assert status["models"][0]["state"] == "queued"
        assert [(j["job_id"], j["state"]) for j in endpoint["scheduler"]["jobs"]] == [("3000001.pbs", "queued")]
        assert isinstance(endpoint["scheduler"]["free_nodes"], int)
        assert endpoint["scheduler"]["errors"] == []
        assert [f.__name__ for f in service.functions.values()] == ["pbs_status"]  # registered once, run there

        (tmp_path / "qstat.json").write_text(_qstat("R", 41))  # given its node, not yet running its script
        status = await _read_again(gateway, status)
        assert status["models"][0]["state"] == "starting"

        service.status = {"status": "online", "details": {"total_workers": 4, "idle_workers": 4, "managers": 1}}
        status = await _read_again(gateway, status)
        assert status["models"][0]["state"] == "hot"

        (tmp_path / "qstat.json").write_text("not json")
        service.status = {"status": "online", "details": {"total_workers": 0, "managers": 0}}
        status = await _read_again(gateway, status)
        assert status["models"][0]["state"] == "cold"  # no job that will serve: a request must start one
        assert "qstat -f -F json" in status["endpoints"][0]["scheduler"]["errors"][0]["command"]
    finally:
        await gateway.close()
        service.join()
