"""A request for more tokens than its model allows is refused with a 400 that names the ceiling, before any work:
the ceiling configured for the model, else what its engine reports (vLLM's ``max_model_len`` in ``/v1/models``,
played by the fake upstream), read by the gateway's status readings, through an http endpoint or a Globus Compute
task on the engine's node."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.fake_upstream import FakeUpstream, serving_in_thread
from first_jupyter.config import parse_config
from first_jupyter.gateway.core import Gateway
from first_jupyter.protocol import Capability, OpenAIError, parse_request
from first_jupyter.service import build_gateway
from tests.conftest import fake_cluster_config
from tests.fake_compute_service import FakeComputeService
from tests.test_compute_cloud import ENDPOINT, TOKEN, _node_config

REPORTED = 4096


@pytest.fixture
def vllm_like() -> Iterator[FakeUpstream]:
    """An engine that lists its models' context length, as vLLM does."""
    with serving_in_thread(models=["fake-model"], chunks=3, max_model_len=REPORTED) as upstream:
        yield upstream


def _chat(stream: bool = False, **asked: Any) -> Any:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": stream, **asked}
    return parse_request(Capability.chat, json.dumps(body).encode())


def _answer_events(out: list[bytes]) -> int:
    return b"".join(out).count(b"data: {")


async def _refused(gateway: Gateway, request: Any) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        if request.stream:
            await gateway.stream(request)
        else:
            await gateway.complete(request)
    return info.value


@pytest.mark.parametrize("stream", [False, True])
async def test_a_configured_ceiling_refuses_more_and_serves_up_to_it(vllm_like, tmp_path: Path, stream):
    config = fake_cluster_config(vllm_like)
    config["clusters"]["remote"]["endpoints"][0]["models"][0]["max_tokens"] = 100
    gateway = build_gateway(parse_config(config, "test"), tmp_path, environ={})
    try:
        await gateway.status()  # the engine's own report (4096) is read, and the configured ceiling still rules
        for field in ("max_tokens", "max_completion_tokens"):
            refused = await _refused(gateway, _chat(stream, **{field: 101}))
            assert (refused.status, refused.param, refused.code) == (400, field, "max_tokens_too_large")
            assert "at most 100 tokens (clusters.remote.endpoints[0].models[0].max_tokens)" in refused.message
        assert vllm_like.by_route["/v1/chat/completions"] == 0  # refused before any work
        if stream:
            answer = await gateway.stream(_chat(stream, max_tokens=100))
            out: list[bytes] = []
            try:
                await answer.relay(lambda chunk: out.append(chunk) or True)
            finally:
                answer.close()
            assert _answer_events(out) == 4
        else:
            assert json.loads((await gateway.complete(_chat(max_tokens=100))).body)["choices"]
        statuses = [row[0] for row in gateway.usage.query("SELECT status FROM usage ORDER BY rowid")]
        assert statuses == [400, 400, 200]
    finally:
        await gateway.close()


async def test_the_engines_reported_limit_is_the_ceiling_once_a_status_reading_has_seen_it(vllm_like,
                                                                                        tmp_path: Path):
    gateway = build_gateway(parse_config(fake_cluster_config(vllm_like), "test"), tmp_path, environ={})
    try:
        assert json.loads((await gateway.complete(_chat(max_tokens=10**9))).body)["choices"]  # not read yet: none
        await gateway.status()
        refused = await _refused(gateway, _chat(max_tokens=REPORTED + 1))
        assert f"at most {REPORTED} tokens (the max_model_len its engine on cluster 'remote' endpoint 'fake' " \
               "reports)" in refused.message
        assert json.loads((await gateway.complete(_chat(max_tokens=REPORTED))).body)["choices"]
    finally:
        await gateway.close()


async def test_a_compute_endpoints_engine_reports_its_limit_when_it_is_started(rsps, broker, vllm_like,
                                                                              tmp_path: Path):
    service = FakeComputeService(broker)
    service.install(rsps, ENDPOINT)
    config = _node_config(vllm_like.port)
    config["clusters"]["hpc"]["endpoints"][0]["models"] = [{"id": "fake-model"}]
    gateway = build_gateway(parse_config(config, "test"), tmp_path, environ={"FIRST_GLOBUS_TOKEN": TOKEN})
    try:
        await gateway.warm("fake-model", wait=True)  # the start's health probe reads the engine's model list
        await gateway.status()
        refused = await _refused(gateway, _chat(max_completion_tokens=REPORTED + 1))
        assert "cluster 'hpc' endpoint 'sophia'" in refused.message
        assert vllm_like.by_route["/v1/chat/completions"] == 0
    finally:
        await gateway.close()
        service.join()


async def test_without_a_ceiling_anywhere_nothing_is_refused(fake_upstream, tmp_path: Path):
    gateway = build_gateway(parse_config(fake_cluster_config(fake_upstream), "test"), tmp_path, environ={})
    try:
        await gateway.status()  # an engine that reports no limit (transformers serve)
        assert gateway.ceilings.ceiling("fake-model") is None
        assert json.loads((await gateway.complete(_chat(max_tokens=10**9))).body)["choices"]
    finally:
        await gateway.close()
