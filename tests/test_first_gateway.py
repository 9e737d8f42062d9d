"""An existing FIRST gateway as one cluster (``backend: first``): its models discovered from ``list-endpoints``,
their states from ``{cluster}/jobs``, requests sent to the model's own route with the user's Globus token."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from first_jupyter.config import ConfigError, parse_config
from first_jupyter.gateway.backends import first_gateway
from first_jupyter.gateway.backends.first_gateway import FIRST_WAIT_S, parse_catalog, parse_jobs
from first_jupyter.gateway.bearer import BearerTokens
from first_jupyter.gateway.core import Gateway
from first_jupyter.protocol import Capability, OpenAIError, parse_request
from first_jupyter.service import build_gateway
from tests.conftest import server_config
from tests.fake_first_gateway import (
    EXPIRED,
    GROUP_DENIAL,
    OPENAI_ENDPOINTS,
    TOKEN,
    FakeFirstGateway,
    job,
    jobs,
    serving_first_gateway,
)

LLAMA, QWEN, EMBED = "meta-llama/Llama-3.3-70B-Instruct", "Qwen/QwQ-32B", "nvidia/NV-Embed-v2"
RESOURCE_SERVER = "681c10cc-f684-4540-bcd7-0b4df3bc26ef"
FIRST_KINDS = [cap.value for cap in Capability if cap.path in OPENAI_ENDPOINTS]
"""What a model of the FIRST gateway stand-in can be asked: each route it lists that is a capability of ours."""


@pytest.fixture
def remote() -> Iterator[FakeFirstGateway]:
    state = FakeFirstGateway(served={"sophia": {"vllm": [LLAMA, QWEN]},
                                     "polaris": {"vllm": [LLAMA], "infinity": [EMBED]}})
    with serving_first_gateway(state) as running:
        yield running


def _config(remote: FakeFirstGateway, **endpoint: Any) -> dict[str, Any]:
    return {"clusters": {"alcf": {"backend": "first", "endpoints": [{
        "name": "gateway", "base_url": remote.url, "globus_resource_server": RESOURCE_SERVER,
        "globus_scope": f"https://auth.globus.org/scopes/{RESOURCE_SERVER}/action_all", **endpoint}]}},
        "auth": {"sources": ["env"]}}


def _gateway(remote: FakeFirstGateway, tmp_path: Path, token: str | None = TOKEN, **endpoint: Any) -> Gateway:
    environ = {"FIRST_GLOBUS_TOKEN": token} if token else {}
    return build_gateway(parse_config(_config(remote, **endpoint), "test"), tmp_path, environ=environ)


def _chat(model: str, **extra: Any) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return parse_request(Capability.chat, json.dumps(body).encode())


async def _streamed(gateway: Gateway, model: str) -> bytes:
    stream = await gateway.stream(_chat(model, stream=True))
    out: list[bytes] = []
    try:
        await stream.relay(lambda chunk: out.append(chunk) or True)
    finally:
        stream.close()
    return b"".join(out)


async def test_the_models_are_discovered_from_list_endpoints(remote, tmp_path):
    gateway = _gateway(remote, tmp_path)
    try:
        listed = {m["id"]: m for m in (await gateway.models()).json_value()["data"]}
        assert sorted(listed) == sorted([LLAMA, QWEN, EMBED])
        assert listed[QWEN]["served_by"] == [{"cluster": "alcf", "endpoint": "gateway", "state": "unknown"}]
        assert listed[QWEN]["state"] == "unknown"  # listed, not yet read (no status reading on this path)
        assert listed[EMBED]["capabilities"] == {"schema_version": 1, "streaming": True,
                                                 "api_protocols": FIRST_KINDS}
        assert remote.calls[0] == ("GET", "/resource_server/list-endpoints", f"Bearer {TOKEN}")
    finally:
        await gateway.close()


async def test_a_request_goes_to_the_models_own_route_with_the_users_token(remote, tmp_path):
    gateway = _gateway(remote, tmp_path)
    try:
        done = await gateway.complete(_chat(QWEN))
        answer = json.loads(done.body)
        assert answer["choices"][0]["message"]["content"] == "from sophia/vllm"
        assert (done.target.cluster, done.target.endpoint) == ("alcf", "gateway")
        assert remote.paths("POST") == ["/resource_server/sophia/vllm/v1/chat/completions"]
        assert {auth for _, _, auth in remote.calls} == {f"Bearer {TOKEN}"}

        streamed = await _streamed(gateway, QWEN)
        assert b'"content": "from"' in streamed
        assert b'" sophia/vllm"' in streamed
        assert streamed.rstrip().endswith(b"data: [DONE]")
    finally:
        await gateway.close()


async def test_status_reads_each_clusters_jobs_and_requests_go_where_the_model_runs(remote, tmp_path):
    remote.jobs = {"polaris": jobs([job("polaris", "vllm", f"{LLAMA},other/model")],
                                  cluster_status={"free_nodes": 12, "queued_jobs": 3})}
    remote.down = {"sophia"}
    gateway = _gateway(remote, tmp_path)
    try:
        status = (await gateway.status()).json_value()
        states = {m["id"]: m["state"] for m in status["models"]}
        assert states[LLAMA] == "hot"  # running on polaris
        assert states[EMBED] == "cold"  # served by polaris, no job
        assert states[QWEN] == "hot"  # sophia's jobs route failed: the gateway's own word (online) stands
        endpoint = status["endpoints"][0]
        assert endpoint["remote_clusters"]["polaris"] == {"models": [LLAMA, EMBED], "jobs": "read",
                                                          "maintenance": False,
                                                          "scheduler": {"free_nodes": 12, "queued_jobs": 3}}
        assert endpoint["remote_clusters"]["sophia"]["models"] == [QWEN, LLAMA]
        assert "qstat failed on the login node" in endpoint["remote_clusters"]["sophia"]["jobs"]
        assert endpoint["remote_clusters"]["sophia"]["maintenance"] is True  # from GET /status

        await gateway.complete(_chat(LLAMA))  # listed on sophia first, but running on polaris
        assert remote.paths("POST")[-1] == "/resource_server/polaris/vllm/v1/chat/completions"

        remote.jobs["sophia"] = jobs([job("sophia", "vllm", LLAMA, "starting")],
                                     [job("sophia", "vllm", QWEN, "queued")])
        states = {m["id"]: m["state"] for m in (await gateway.status()).json_value()["models"]}
        assert (states[LLAMA], states[QWEN]) == ("hot", "queued")
        remote.jobs["polaris"] = jobs(stopped=[job("polaris", "vllm", LLAMA, "stopped")])  # maintenance
        states = {m["id"]: m["state"] for m in (await gateway.status()).json_value()["models"]}
        assert (states[LLAMA], states[EMBED]) == ("starting", "cold")
    finally:
        await gateway.close()


async def test_the_catalog_follows_what_the_gateway_serves(remote, tmp_path, monkeypatch):
    monkeypatch.setattr(first_gateway, "RETRY_S", 0.0)
    gateway = _gateway(remote, tmp_path, refresh=3600)
    try:
        await gateway.models()
        remote.served["sophia"]["vllm"].append("new/model")
        done = await gateway.complete(_chat("new/model"))  # unknown here yet: the catalog is read again at once
        assert json.loads(done.body)["model"] == "new/model"

        remote.served["sophia"]["vllm"].remove(QWEN)
        assert QWEN in {m["id"] for m in (await gateway.models()).json_value()["data"]}  # within the refresh window
        gateway.catalog.discovering[0].discovered_at -= 3600
        assert QWEN not in {m["id"] for m in (await gateway.models()).json_value()["data"]}
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_chat(QWEN))
        assert info.value.status == 404
        assert "new/model" in info.value.message  # the 404 names what is served
    finally:
        await gateway.close()


async def test_without_a_sign_in_the_error_says_how_and_nothing_is_sent(remote, tmp_path):
    gateway = _gateway(remote, tmp_path, token=None)
    try:
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_chat(LLAMA))
        assert (info.value.status, info.value.code) == (401, "globus_sign_in")
        assert "`%first login`" in info.value.message
        assert remote.calls == []
        status = (await gateway.status()).json_value()
        assert status["endpoints"][0]["state"] == "offline"
        assert status["models"] == []
    finally:
        await gateway.close()


async def test_a_refused_token_is_reported_and_the_request_is_not_guessed(remote, tmp_path, monkeypatch):
    monkeypatch.setattr(first_gateway, "RETRY_S", 0.0)
    gateway = _gateway(remote, tmp_path, token="AT-expired")
    try:
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_chat(LLAMA))
        assert info.value.status == 401
        assert EXPIRED in info.value.message
        assert "`%first login`" in info.value.message
        assert remote.paths("POST") == []
        assert "HTTP 401" in (await gateway.status()).json_value()["endpoints"][0]["error"]
    finally:
        await gateway.close()


def test_jobs_say_running_starting_disconnected_or_queued_per_framework_and_model():
    data = jobs([job("sophia", "vllm", "a, b"), job("sophia", "vllm", "c", "starting"),
                 job("sophia", "vllm", "f", "disconnected"), job("polaris", "vllm", "d")],
                [job("sophia", "vllm", "a"), job("sophia", "sglang", "e", "queued")],
                [job("sophia", "vllm", "g", "stopped")])
    assert parse_jobs(data, "sophia") == {("vllm", "a"): "running", ("vllm", "b"): "running",
                                          ("vllm", "c"): "starting", ("vllm", "f"): "disconnected",
                                          ("sglang", "e"): "queued"}
    older = {"running": [{"Framework": "vllm", "Models Served": "a", "Model Status": "running"}]}  # before JobInfo
    assert parse_jobs(older, "sophia") == {("vllm", "a"): "running"}
    with pytest.raises(ValueError, match="valid dictionary"):  # an unknown shape is said, never read as "none"
        parse_jobs(["not", "a", "mapping"], "sophia")


@pytest.mark.parametrize(("capability", "stream"), [
    (cap, stream) for cap in map(Capability, FIRST_KINDS) for stream in (False, True) if cap.streams or not stream])
async def test_every_route_first_lists_is_sent_to_the_framework(remote, tmp_path, capability, stream):
    """Each kind of request FIRST serves (its views: chat, completions, embeddings, responses, messages) goes to
    ``{cluster}/{framework}`` plus its path, streamed where it streams, with the user's token."""
    body = {"model": QWEN, "messages": [{"role": "user", "content": "hi"}], "input": "hi", "prompt": "hi",
            "max_tokens": 4, "stream": stream}
    gateway = _gateway(remote, tmp_path)
    try:
        req = parse_request(capability, json.dumps(body).encode())
        if stream:
            answer = await gateway.stream(req)
            chunks: list[bytes] = []
            try:
                await answer.relay(lambda chunk: chunks.append(chunk) or True)
            finally:
                answer.close()
            assert b'"content": "from"' in b"".join(chunks)
            assert b"[DONE]" in b"".join(chunks)
        else:
            assert b"from sophia/vllm" in (await gateway.complete(req)).body
    finally:
        await gateway.close()
    assert remote.calls[-1] == ("POST", f"/resource_server/sophia/vllm{capability.path}", f"Bearer {TOKEN}")


def test_list_endpoints_paths_are_under_the_framework_and_an_older_mapping_still_reads():
    listed = [*OPENAI_ENDPOINTS, "/v1/something-new"]
    today = {"clusters": {"sophia": {"base_url": "/resource_server/sophia", "frameworks": {"vllm": {
        "models": ["m"], "endpoints": listed}}}}}
    [place] = parse_catalog(today, "https://gw", "/resource_server", None)["m"]
    # each listed path that is a capability's, under the framework; a path no capability has is left out
    assert {cap: url.text for cap, url in place.urls.items()} == {
        cap: f"https://gw/resource_server/sophia/vllm{cap.path}" for cap in Capability if cap.path in listed}
    assert place.urls[Capability.chat].text == "https://gw/resource_server/sophia/vllm/v1/chat/completions"
    assert place.urls[Capability.embeddings].text == "https://gw/resource_server/sophia/vllm/v1/embeddings"
    older = {"clusters": {"sophia": {"frameworks": {"vllm": {
        "models": ["m"], "endpoints": {"chat": "vllm/v1/chat/completions/"}}}}}}
    [place] = parse_catalog(older, "https://gw", "/resource_server", None)["m"]
    assert place.urls[Capability.chat].text == "https://gw/resource_server/sophia/vllm/v1/chat/completions/"


async def test_an_answer_in_an_unknown_shape_is_a_502_that_names_the_route(remote, tmp_path, monkeypatch):
    monkeypatch.setattr(first_gateway, "RETRY_S", 0.0)
    remote.answers["list-endpoints"] = {"clusters": {"sophia": {"frameworks": {"vllm": {"models": "m"}}}}}
    remote.jobs = {"sophia": {"running": "none"}}
    gateway = _gateway(remote, tmp_path)
    try:
        with pytest.raises(OpenAIError) as info:
            await gateway.catalog.discovering[0].discover()
        assert info.value.status == 502
        assert "GET /resource_server/list-endpoints" in info.value.message
        assert "clusters.sophia.frameworks.vllm.models" in info.value.message
        assert (await gateway.models()).json_value()["data"] == []  # said in the status, never a 500

        del remote.answers["list-endpoints"]
        status = (await gateway.status()).json_value()
        jobs_read = status["endpoints"][0]["remote_clusters"]["sophia"]["jobs"]
        assert "GET /resource_server/sophia/jobs" in jobs_read
        assert "running" in jobs_read
    finally:
        await gateway.close()


async def test_a_disconnected_model_reads_offline_and_a_stopped_one_cold(remote, tmp_path):
    remote.jobs = {"sophia": jobs([job("sophia", "vllm", QWEN, "disconnected")]),
                   "polaris": jobs(stopped=[job("polaris", "vllm", LLAMA, "stopped")])}
    gateway = _gateway(remote, tmp_path)
    try:
        states = {m["id"]: m["state"] for m in (await gateway.status()).json_value()["models"]}
        assert (states[QWEN], states[LLAMA]) == ("offline", "cold")
    finally:
        await gateway.close()


@pytest.fixture
def second() -> Iterator[FakeFirstGateway]:
    """Another FIRST gateway serving the same models, to fail over to."""
    state = FakeFirstGateway(served={"aurora": {"vllm": [LLAMA, QWEN]}})
    with serving_first_gateway(state) as running:
        yield running


def _two(remote: FakeFirstGateway, second: FakeFirstGateway, tmp_path: Path) -> Gateway:
    """A gateway with ``remote`` (tried first: config order) and ``second`` as clusters ``alcf`` and ``other``."""
    config = _config(remote)
    config["clusters"]["other"] = _config(second)["clusters"]["alcf"]
    return build_gateway(parse_config(config, "test"), tmp_path, environ={"FIRST_GLOBUS_TOKEN": TOKEN})


@pytest.fixture
def forgotten(monkeypatch) -> list[str]:
    """The resource servers whose token was forgotten."""
    seen: list[str] = []
    forget = BearerTokens.forget

    def recording(tokens: BearerTokens, resource_server: str) -> None:
        seen.append(resource_server)
        forget(tokens, resource_server)

    monkeypatch.setattr(BearerTokens, "forget", recording)
    return seen


async def test_an_account_refused_with_a_401_fails_over_and_keeps_the_token(remote, second, tmp_path, forgotten):
    gateway = _two(remote, second, tmp_path)
    try:
        await gateway.models()
        remote.denial = GROUP_DENIAL
        done = await gateway.complete(_chat(QWEN))
        assert json.loads(done.body)["choices"][0]["message"]["content"] == "from aurora/vllm"
        assert remote.paths("POST")
        assert second.paths("POST")
        streamed = await _streamed(gateway, LLAMA)
        assert b" aurora/vllm" in streamed
        assert forgotten == []

        second.denial = GROUP_DENIAL  # nowhere left: the answer says it is the account, not the sign-in
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_chat(QWEN))
        assert (info.value.status, info.value.code) == (403, "permission_denied")
        assert GROUP_DENIAL in info.value.message
        assert "`%first login`" not in info.value.message
        assert forgotten == []
    finally:
        await gateway.close()


async def test_an_expired_token_asks_for_sign_in_and_is_forgotten(remote, tmp_path, forgotten):
    gateway = _gateway(remote, tmp_path)
    try:
        await gateway.models()
        gateway.catalog.discovering[0]._globus[0]._lines[RESOURCE_SERVER] = (  # a kept line the gateway now refuses
            float("inf"), b"Authorization: Bearer AT-expired\r\n")
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_chat(QWEN))
        assert info.value.status == 401
        assert EXPIRED in info.value.message
        assert "`%first login`" in info.value.message
        assert forgotten == [RESOURCE_SERVER]
    finally:
        await gateway.close()


@pytest.mark.parametrize("fault", ["in-band", "timeout", "maintenance", "nginx-429"])
async def test_failures_before_the_first_byte_fail_over(remote, second, tmp_path, fault):
    remote.faults[QWEN] = fault
    gateway = _two(remote, second, tmp_path)
    try:
        await gateway.models()
        streamed = await _streamed(gateway, QWEN)
        assert b" aurora/vllm" in streamed
        assert b'"object": "error"' not in streamed
        assert remote.paths("POST") == ["/resource_server/sophia/vllm/v1/chat/completions"]
    finally:
        await gateway.close()


async def test_a_failure_in_the_stream_or_a_408_alone_is_an_error_status(remote, tmp_path):
    gateway = _gateway(remote, tmp_path)
    try:
        await gateway.models()
        remote.faults[QWEN] = "in-band"
        with pytest.raises(OpenAIError) as info:
            await _streamed(gateway, QWEN)
        assert info.value.status == 504
        assert "No data received from compute endpoint" in info.value.message
        remote.faults[LLAMA] = "in-band-400"  # the engine refused the request itself: no failover, a 400
        with pytest.raises(OpenAIError) as info:
            await _streamed(gateway, LLAMA)
        assert info.value.status == 400
        assert "max_tokens must be at least 1" in info.value.message
        remote.faults[LLAMA] = "timeout"
        with pytest.raises(OpenAIError) as info:
            await gateway.complete(_chat(LLAMA))
        assert (info.value.status, info.value.code) == (504, "upstream_timeout")
    finally:
        await gateway.close()


async def test_the_first_byte_wait_outlasts_firsts_own(remote, tmp_path):
    for setting, wait in (({}, FIRST_WAIT_S), ({"first_byte": 30}, 30)):
        gateway = _gateway(remote, tmp_path, **setting)
        try:
            assert gateway.catalog.discovering[0].first_byte == wait
        finally:
            await gateway.close()
    assert FIRST_WAIT_S > 300  # FIRST's own wait, after which it answers 408


def test_a_first_cluster_needs_a_gateway_url():
    with pytest.raises(ConfigError, match=r"clusters\.alcf\.endpoints\[0\]\.base_url"):
        parse_config({"clusters": {"alcf": {"backend": "first", "endpoints": [{"name": "gw"}]}}}, "f.yaml")
    config = parse_config({"clusters": {"alcf": {"backend": "first", "endpoints": [
        {"name": "gw", "base_url": "https://example.org/resource_server"}]}}, "defaults": {"model": "any/model"}},
        "f.yaml")  # a default model need not be listed: the catalog is read at run time
    assert config.defaults.model == "any/model"


@pytest.fixture
def jp_server_config(remote, write_config, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FIRST_GLOBUS_TOKEN", TOKEN)
    return server_config(write_config(_config(remote)), tmp_path / "data")


async def test_the_openai_client_sees_the_remote_gateways_models_through_jupyter(key_door):
    client = openai.AsyncOpenAI(base_url=str(key_door.route("")).rstrip("/"),
                                api_key=key_door.headers["Authorization"].split()[-1], max_retries=0)
    async with client:
        assert {m.id for m in (await client.models.list()).data} == {LLAMA, QWEN, EMBED}
        stream = await client.chat.completions.create(model=QWEN, messages=[{"role": "user", "content": "hi"}],
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "from sophia/vllm"


async def test_what_first_publishes_of_a_model_shows_in_the_model_list(remote, tmp_path):
    """``GET /{cluster}/models`` (FIRST's model details: display name, capabilities, token limits) joins the
    entries of ``/v1/models``; a cluster that does not answer it takes nothing away from the catalog."""
    capabilities = {"schema_version": 1, "api_protocols": ["chat_completions", "responses"], "streaming": True,
                    "context_window_tokens": 131072, "tool_calling": {"supported": True}}
    remote.details[LLAMA] = {"display_name": "Llama 3.3 70B", "capabilities": capabilities,
                             "rate_limit_token_per_minute": 200000, "api_url": "https://private.example/v1"}
    remote.answers["polaris/models"] = {"not": "a list"}  # an answer in another shape: ignored, logged
    gateway = _gateway(remote, tmp_path)
    try:
        listed = {m["id"]: m for m in (await gateway.models()).json_value()["data"]}
    finally:
        await gateway.close()
    assert listed[LLAMA]["details"] == {"display_name": "Llama 3.3 70B", "capabilities": capabilities,
                                        "rate_limit_token_per_minute": 200000}  # public keys only
    assert "details" not in listed[QWEN]  # published nothing
    # the capabilities object: the routes the gateway sends the model to, and what FIRST published besides
    assert listed[LLAMA]["capabilities"] == {"schema_version": 1, "api_protocols": FIRST_KINDS, "streaming": True,
                                             "context_window_tokens": 131072, "tool_calling": {"supported": True}}
    assert sorted(listed) == sorted([LLAMA, QWEN, EMBED])
