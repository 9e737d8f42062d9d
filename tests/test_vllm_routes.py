"""vLLM's routes beyond OpenAI's (tokenize, detokenize, rerank, score, pooling, classify), each model's
capabilities, and ``GET /v1/models/{id}``: through every door, against fake upstreams that answer as vLLM does,
and on a Globus Compute node.

Two upstreams: one serves a generative model (chat, completions, tokenize, detokenize), the other a pooling model
(rerank, score, pooling, classify, embeddings) whose id holds a slash, so that every request is seen to reach the
engine of the model it names."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import aiohttp
import httpx
import openai
import orjson
import pytest
from yarl import URL

from bench.fake_upstream import FakeUpstream, serving_in_thread
from first_jupyter.config import ComputeEndpoint, ModelConfig
from first_jupyter.gateway.backends.compute.backend import ComputeBackend
from first_jupyter.gateway.backends.compute.callbacks import CallbackHub
from first_jupyter.protocol import Capability, OpenAIError
from first_jupyter.remote.inference import call_engine
from tests.conftest import Door, server_config

CHAT_MODEL = "fake-model"
POOL_MODEL = "acme/fake-pool"
GENERATIVE = [Capability.chat, Capability.completions, Capability.tokenize, Capability.detokenize]
POOLING = [Capability.rerank, Capability.score, Capability.pooling, Capability.classify, Capability.embeddings]
ASKED: dict[Capability, tuple[str, bytes]] = {
    # (model, body): each body spaced and ordered as a client might, so that bytes passed through show as such
    Capability.tokenize: (CHAT_MODEL, b'{"model": "fake-model",  "prompt": "how many tokens here", '
                                      b'"add_special_tokens": false}'),
    Capability.detokenize: (CHAT_MODEL, b'{"tokens": [1, 2, 3], "model": "fake-model"}'),
    Capability.rerank: (POOL_MODEL, b'{"model": "acme/fake-pool", "query": "good red apples", "documents": '
                                    b'["red cars", "good red apples here", "blue sky"], "top_n": 2}'),
    Capability.score: (POOL_MODEL, b'{"model": "acme/fake-pool", "text_1": "good apples", "text_2": '
                                   b'["good apples", "bad pears"], "use_activation": true}'),
    Capability.pooling: (POOL_MODEL, b'{"model": "acme/fake-pool", "input": ["one", "two"], "task": "embed"}'),
    Capability.classify: (POOL_MODEL, b'{"model":"acme/fake-pool","input":["a good day","a bad day"]}'),
}
VLLM_OWN = list(ASKED)


@pytest.fixture
def pool_upstream() -> Iterator[FakeUpstream]:
    with serving_in_thread(models=[POOL_MODEL]) as upstream:
        yield upstream


def two_engines(generative: FakeUpstream, pooling: FakeUpstream) -> dict[str, Any]:
    return {"clusters": {"remote": {"backend": "http", "endpoints": [
        {"name": "gen", "base_url": f"{generative.url}/v1",
         "models": [{"id": CHAT_MODEL, "capabilities": [c.value for c in GENERATIVE]}]},
        {"name": "pool", "base_url": f"{pooling.url}/v1",
         "models": [{"id": POOL_MODEL, "capabilities": [c.value for c in POOLING]}]}]}},
        "defaults": {"model": CHAT_MODEL}}


@pytest.fixture
def jp_server_config(fake_upstream, pool_upstream, write_config, tmp_path):
    return server_config(write_config(two_engines(fake_upstream, pool_upstream)), tmp_path / "data")


def _url(door: Door, capability: Capability) -> URL:
    """The capability's public path at ``door`` (whose URL ends in /first/v1), kept percent-encoded."""
    return URL(door.url.removesuffix("/first/v1") + capability.public_path, encoded=True)


async def _post(door: Door, capability: Capability, body: bytes) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(
            _url(door, capability), data=body, headers={**door.headers, "Content-Type": "application/json"}) as r:
        return r.status, await r.read()


@pytest.mark.parametrize("capability", VLLM_OWN, ids=str)
async def test_vllms_own_routes_pass_through_byte_for_byte_to_the_models_engine(
        door, fake_upstream, pool_upstream, capability):
    model, body = ASKED[capability]
    engine, other = (fake_upstream, pool_upstream) if model == CHAT_MODEL else (pool_upstream, fake_upstream)
    status, answer = await _post(door, capability, body)
    assert status == 200, answer
    assert engine.by_route[capability.path] == 1  # the engine of the model named, at vLLM's own path
    assert other.by_route[capability.path] == 0
    assert engine.last_request_bytes == body  # the request as the client sent it
    own = await asyncio.to_thread(httpx.post, engine.url + capability.path, content=body, timeout=30)
    assert answer == own.content  # the engine's answer as it gave it


async def test_a_vllm_client_whose_base_is_first_reaches_the_root_routes(key_door, fake_upstream):
    """vLLM's clients put ``/tokenize`` under the server's root: with ``{server}/first`` as their base, the
    official client's generic ``post`` reaches it, routed by the body's model."""
    client = openai.AsyncOpenAI(base_url=key_door.url.removesuffix("/v1"), api_key=key_door.api_key, max_retries=0)
    answer = await client.post("/tokenize", body={"model": CHAT_MODEL, "prompt": "four words right here"},
                               cast_to=httpx.Response)
    assert answer.json() == {"count": 4, "max_model_len": 4096, "tokens": [1, 2, 3, 4], "token_strs": None}
    text = await client.post("/detokenize", body={"model": CHAT_MODEL, "tokens": [7, 8]}, cast_to=httpx.Response)
    assert text.json() == {"prompt": "tok7 tok8"}


@pytest.mark.parametrize(("capability", "model", "serves"), [
    (Capability.tokenize, POOL_MODEL, POOLING), (Capability.rerank, CHAT_MODEL, GENERATIVE)],
    ids=["tokenize", "rerank"])
async def test_a_route_the_model_cannot_serve_is_404_naming_what_it_can(door, fake_upstream, pool_upstream,
                                                                           capability, model, serves):
    status, answer = await _post(door, capability, orjson.dumps({"model": model, "input": "x", "prompt": "x"}))
    error = orjson.loads(answer)["error"]
    assert status == 404
    assert error["code"] == "unsupported_route"
    assert error["param"] == "model"
    for kind in serves:
        assert f"{kind.value} ({kind.public_path})" in error["message"]
    other = CHAT_MODEL if model == POOL_MODEL else POOL_MODEL
    assert f"Models that can serve {capability.route}: {other}." in error["message"]
    # nothing was sent to an engine (a status reading's GET /v1/models may come at any moment)
    assert [u.requests - u.by_route["/v1/models"] for u in (fake_upstream, pool_upstream)] == [0, 0]


@pytest.mark.parametrize("capability", VLLM_OWN, ids=str)
async def test_a_route_that_does_not_stream_refuses_stream_true(door, capability):
    model, _ = ASKED[capability]
    status, answer = await _post(door, capability, orjson.dumps({"model": model, "input": "x", "stream": True}))
    error = orjson.loads(answer)["error"]
    assert (status, error["param"], error["code"]) == (400, "stream", "invalid_value")
    assert f"{capability.route} answers are not streamed" in error["message"]


async def test_the_openai_client_retrieves_a_model_and_lists_its_capabilities(door):
    client = openai.AsyncOpenAI(base_url=door.url, api_key=door.api_key, max_retries=0)
    model = await client.models.retrieve(POOL_MODEL)  # an id with a slash: the rest of the path
    assert (model.id, model.object, model.owned_by) == (POOL_MODEL, "model", "first")
    capabilities = {"schema_version": 1, "api_protocols": [c.value for c in Capability if c in POOLING],
                    "streaming": False}
    assert model.model_extra is not None
    assert model.model_extra["capabilities"] == capabilities
    listed = {m.id: m for m in (await client.models.list()).data}
    assert listed[POOL_MODEL] == model  # the same object as in the listing
    assert listed[CHAT_MODEL].model_extra is not None
    assert listed[CHAT_MODEL].model_extra["capabilities"] == {"schema_version": 1, "streaming": True,
                                                              "api_protocols": [c.value for c in GENERATIVE]}
    with pytest.raises(openai.NotFoundError) as missing:
        await client.models.retrieve("acme/nothing-here")
    assert missing.value.code == "model_not_found"
    assert POOL_MODEL in missing.value.message


# -- on a Globus Compute node ------------------------------------------------------------------------------------


class NodeHere:
    """A ``Submitter`` whose tasks run the node's functions on threads of this process, against an engine on
    loopback: Globus Compute's part (carrying the task) cannot run here; what the node does is the real code."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(2)

    async def submit(self, function: Callable[..., Any], *args: Any) -> Future[Any]:
        return self.pool.submit(function, *args)

    async def status(self) -> dict[str, Any]:
        return {"state": "online"}

    def describe(self, exc: BaseException) -> OpenAIError:
        return OpenAIError(502, f"{type(exc).__name__}: {exc}", type="api_error")

    async def close(self) -> None:
        self.pool.shutdown()


@pytest.mark.parametrize("capability", VLLM_OWN, ids=str)
async def test_a_compute_node_calls_the_engines_path_for_any_route(pool_upstream, capability):
    model, body = ASKED[capability]
    endpoint = ComputeEndpoint(name="node", endpoint_id="00000000-0000-4000-8000-000000000000",
                               engine_port=pool_upstream.port,
                               models=[ModelConfig(id=model, capabilities=[capability])])
    backend = ComputeBackend("hpc", endpoint, NodeHere(), CallbackHub(), 30.0, lambda: None)
    try:
        assert backend.supports(model, capability)
        reply = await backend.complete(model, capability, body)
    finally:
        await backend.close()
    assert pool_upstream.by_route[capability.path] == 1
    own = await asyncio.to_thread(httpx.post, pool_upstream.url + capability.path, content=body, timeout=30)
    assert (reply.status, orjson.loads(reply.body)) == (200, own.json())


async def test_a_compute_node_reaches_a_response_its_engine_keeps(pool_upstream):
    """Retrieve, input_items and delete of a kept response go as tasks to the node, whose engine created it."""
    endpoint = ComputeEndpoint(name="node", endpoint_id="00000000-0000-4000-8000-000000000000",
                               engine_port=pool_upstream.port,
                               models=[ModelConfig(id=POOL_MODEL, capabilities=[Capability.responses])])
    backend = ComputeBackend("hpc", endpoint, NodeHere(), CallbackHub(), 30.0, lambda: None)
    try:
        created = await backend.complete(POOL_MODEL, Capability.responses,
                                         orjson.dumps({"model": POOL_MODEL, "input": "hi", "stream": False}))
        response_id = orjson.loads(created.body)["id"]
        kept = await backend.call("GET", f"responses/{response_id}", "", None)
        items = await backend.call("GET", f"responses/{response_id}/input_items", "limit=1", None)
        deleted = await backend.call("DELETE", f"responses/{response_id}", "", None)
        gone = await backend.call("GET", f"responses/{response_id}", "", None)
    finally:
        await backend.close()
    assert (kept.status, orjson.loads(kept.body)["id"]) == (200, response_id)
    assert (items.status, len(orjson.loads(items.body)["data"])) == (200, 1)
    assert (deleted.status, orjson.loads(deleted.body)["deleted"]) == (200, True)
    assert gone.status == 404


def test_a_node_takes_a_route_relative_to_v1_from_an_older_gateway(pool_upstream):
    """Gateways before the root routes sent ``chat/completions``; a node with a newer install still takes it."""
    result = call_engine(pool_upstream.port, "embeddings", {"model": POOL_MODEL, "input": "x"})
    assert result["status"] == 200
    assert pool_upstream.by_route["/v1/embeddings"] == 1


@pytest.mark.parametrize(("engine", "serves"), [
    ("transformers", [Capability.chat, Capability.completions, Capability.responses, Capability.transcriptions]),
    ("vllm", list(Capability))])
async def test_a_model_serves_what_its_config_says_and_its_engine_has_routes_for(engine, serves):
    """The embedded default's endpoint knows its engine: ``transformers serve`` has a few routes, vLLM all."""
    endpoint = ComputeEndpoint(name="node", endpoint_id="00000000-0000-4000-8000-000000000000",
                               models=[ModelConfig(id="m", capabilities=list(Capability))])
    backend = ComputeBackend("local", endpoint, NodeHere(), CallbackHub(), 30.0, lambda: None, engine=engine)
    try:
        assert [c for c in Capability if backend.supports("m", c)] == serves
    finally:
        await backend.close()
