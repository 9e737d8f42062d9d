"""Bad input and bad credentials get the right status and an OpenAI-shaped error that names the fix."""

from __future__ import annotations

import asyncio
import gc
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from bench.fake_upstream import ENGINE_REFUSAL
from first_jupyter.api.door_kit import is_loopback_host
from first_jupyter.gateway.streamed import GatewayStream
from first_jupyter.protocol import MAX_MODEL_NAME, MAX_NESTING
from first_jupyter.server_ext.handlers import TableRoute
from tests.big_body import BIG, Answer, chunked, fixed, request_head, send_until_answered
from tests.conftest import Door, fake_cluster_config, open_door, scoped_headers, server_config, without_cycle_collection
from tests.waiting import eventually_async

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
CHAT_ROUTE = "/v1/chat/completions"


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path: Path):
    return server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "data",
                         max_request_bytes=4096)


async def _post(door: Door, path: str, body: bytes | str, headers: dict[str, str] | None = None,
                ) -> tuple[int, dict]:
    """POST through ``door`` with its credentials, or with ``headers`` instead of them."""
    async with aiohttp.ClientSession() as session, session.post(
            door.route(path), data=body, headers=door.headers if headers is None else headers) as resp:
        return resp.status, json.loads(await resp.read())


def _assert_openai_error(body: dict, *, param: str | None = None) -> str:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    return body["error"]["message"]


async def test_malformed_json_is_400(door):
    code, body = await _post(door, "chat/completions", b'{"model": "fake-model", "messages": [')
    assert code == 400
    assert "not valid JSON" in _assert_openai_error(body)


async def test_non_object_json_is_400(door):
    code, body = await _post(door, "chat/completions", b'["a", "list"]')
    assert code == 400
    assert "JSON object" in _assert_openai_error(body)


@pytest.mark.parametrize("model", [None, "no-such-model"])
async def test_missing_or_unknown_model_is_404_listing_ids(door, model):
    request = dict(CHAT)
    if model is None:
        del request["model"]
    else:
        request["model"] = model
    code, body = await _post(door, "chat/completions", json.dumps(request))
    assert code == 404
    message = _assert_openai_error(body, param="model")
    assert "fake-model" in message
    assert "fake-embed" in message
    assert body["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"model": 42}, "model"),
        ({"model": "m" * (MAX_MODEL_NAME + 1)}, "model"),
        ({"stream": "yes please"}, "stream"),
        ({"stream": "false"}, "stream"),  # a string: neither false nor a stream
        ({"stream": 1}, "stream"),
        ({"stream": True, "stream_options": "x"}, "stream_options"),
        ({"stream": True, "stream_options": ["include_usage"]}, "stream_options"),
        ({"stream": True, "stream_options": 3}, "stream_options"),
    ],
)
async def test_what_the_gateway_reads_is_checked_with_a_400_naming_the_field(door, fake_upstream, patch, field):
    code, body = await _post(door, "chat/completions", json.dumps({**CHAT, **patch}))
    assert code == 400
    message = _assert_openai_error(body, param=field)
    assert f"'{field}'" in message
    assert fake_upstream.by_route[CHAT_ROUTE] == 0  # refused before any engine


async def test_embeddings_are_not_streamed(door, fake_upstream):
    code, body = await _post(door, "embeddings", json.dumps({"model": "fake-embed", "input": "hi", "stream": True}))
    assert code == 400
    assert "not streamed" in _assert_openai_error(body, param="stream")
    assert fake_upstream.by_route["/v1/embeddings"] == 0


@pytest.mark.parametrize("depth", [MAX_NESTING, 300, 1100])  # 1100: deeper than orjson reads
async def test_a_body_nested_deeper_than_the_gateway_writes_is_a_400_naming_the_limit(door, fake_upstream, depth):
    tools = "[" * (depth - 1) + "]" * (depth - 1)  # inside the body's own object: ``depth`` levels in all
    body = f'{{"model": "fake-model", "stream": true, "messages": [{{"role": "user", "content": "hi"}}], ' \
           f'"tools": {tools}}}'
    async with aiohttp.ClientSession() as session, session.post(door.route("chat/completions"), data=body,
                                                                headers=door.headers) as resp:
        code, answer = resp.status, await resp.read()
    if depth == MAX_NESTING:  # taken, and written again (the gateway adds stream_options)
        assert code == 200
        assert fake_upstream.last_request_body["stream_options"] == {"include_usage": True}
        return
    assert code == 400
    error = json.loads(answer)
    assert str(MAX_NESTING) in _assert_openai_error(error)
    assert error["error"]["code"] == "nesting_too_deep"
    assert fake_upstream.by_route[CHAT_ROUTE] == 0


ENGINE_JUDGES = [
    ("chat/completions", {**CHAT, "temperature": 2.5}),
    ("chat/completions", {**CHAT, "max_tokens": 0}),
    ("chat/completions", {**CHAT, "stream": None}),
    ("chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "https://example.org/v.mp4"}},
        {"type": "audio_url", "audio_url": {"url": "https://example.org/a.wav"}},
        {"type": "image_embeds", "image_embeds": "AAAA"},
        {"type": "input_text", "text": "hi"}]}]}),
    ("chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": 42}]}),
    ("chat/completions", {**CHAT, "messages": []}),
    ("completions", {"model": "fake-model", "prompt_embeds": "AAAA"}),
    ("completions", {"model": "fake-model", "prompt": {"a": 1}}),
]


async def test_what_the_engine_judges_goes_to_it_as_sent(door, fake_upstream):
    for path, request in ENGINE_JUDGES:
        code, body = await _post(door, path, json.dumps(request))
        assert code == 200, (request, body)
        assert fake_upstream.last_request_body == request


@pytest.mark.parametrize("stream", [False, True])
async def test_an_engines_own_400_reaches_the_client_as_the_engine_said_it(door, fake_upstream, stream):
    fake_upstream.fault = "400"
    code, body = await _post(door, "chat/completions", json.dumps({**CHAT, "temperature": 2.5, "stream": stream}))
    assert code == 400
    refusal = ENGINE_REFUSAL["error"]
    assert refusal["message"] in _assert_openai_error(body, param=refusal["param"])
    assert body["error"]["code"] == refusal["code"]
    assert body["error"]["type"] == "invalid_request_error"


async def test_body_over_limit_is_413(door):
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    code, body = await _post(door, "chat/completions", json.dumps(big))
    assert code == 413
    message = _assert_openai_error(body)
    assert "4,096" in message
    assert "max_request_bytes" in message


async def _send_big(door: Door, headers: dict[str, str], body: str) -> Answer:
    """POST chat/completions through ``door`` announcing (``fixed``) or streaming (``chunked``) a 150 MB body,
    stopping at the answer (on a thread: the server answers on this test's loop)."""
    url = URL(f"{door.url}/chat/completions", encoded=True)
    framing = {"Content-Length": str(BIG)} if body == "fixed" else {"Transfer-Encoding": "chunked"}
    head = request_head("POST", url.raw_path, {**headers, **framing})
    assert url.port is not None
    return await asyncio.to_thread(send_until_answered, url.port, head, fixed(BIG) if body == "fixed" else
                                   chunked(BIG))


@pytest.mark.parametrize("body", ["fixed", "chunked"])
async def test_a_body_over_the_limit_is_refused_at_the_limit_not_read_to_its_end(door, body):
    answer = await _send_big(door, door.headers, body)
    assert answer.status == 413
    assert "4,096" in _assert_openai_error(json.loads(answer.body))
    assert answer.sent < BIG
    assert answer.headers["connection"] == "close"


@pytest.fixture(params=["jupyter-token", "jupyter-key"])
def jupyter_door(request: pytest.FixtureRequest, first_ext: Any, jp_auth_header: dict[str, str]) -> Door:
    """The Jupyter server's door (the gateway's own server, for the kernels' key, is another)."""
    return open_door(request.param, first_ext, jp_auth_header)


async def test_an_unauthenticated_body_is_refused_from_the_head_before_it_is_read(jupyter_door):
    answer = await _send_big(jupyter_door, {}, "fixed")
    assert answer.status == 401
    assert "FIRST_API_KEY" in _assert_openai_error(json.loads(answer.body))
    assert answer.sent < BIG  # answered while the client was still sending
    assert answer.headers["connection"] == "close"


async def test_no_auth_is_401(door):
    code, body = await _post(door, "chat/completions", json.dumps(CHAT), headers={})
    assert code == 401
    assert "FIRST_API_KEY" in _assert_openai_error(body)
    assert body["error"]["type"] == "authentication_error"


async def test_wrong_bearer_key_is_401(door):
    code, body = await _post(door, "chat/completions", json.dumps(CHAT),
                             headers={"Authorization": "Bearer first-not-the-key"})
    assert code == 401
    assert body["error"]["type"] == "authentication_error"


async def test_cookie_without_xsrf_is_403(jp_fetch):
    login = await jp_fetch("api", "me", method="GET")
    cookies = [c.split(";")[0] for c in login.headers.get_list("Set-Cookie")]
    assert cookies, "the token login should set Jupyter's cookies"
    # jp_fetch, because Jupyter's cookie names carry the host the client used
    response = await jp_fetch("first", "v1", "chat", "completions", method="POST", body=json.dumps(CHAT),
                              headers={"Authorization": "", "Cookie": "; ".join(cookies)}, raise_error=False)
    assert response.code == 403
    assert "X-XSRFToken" in _assert_openai_error(json.loads(response.body))


@pytest.mark.parametrize("path", ["v1/assistants", "v1/chat/completions/x", "api/nope", "v1", "nope"])
@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
async def test_unknown_route_is_openai_404(door, path, method):
    url = URL(f"{door.url.removesuffix('/v1')}/{path}", encoded=True)  # anywhere under /first
    async with aiohttp.ClientSession() as session, session.request(method, url, headers=door.headers) as resp:
        assert resp.status == 404
        assert "chat/completions" in _assert_openai_error(json.loads(await resp.read()))


async def test_wrong_method_is_405(door):
    async with aiohttp.ClientSession() as session, session.get(door.route("chat/completions"),
                                                               headers=door.headers) as resp:
        assert resp.status == 405
        assert json.loads(await resp.read())["error"]["code"] == "method_not_allowed"


async def test_scoped_key_opens_first_routes_only(jp_fetch, jp_serverapp):
    headers = scoped_headers(jp_serverapp)
    models = await jp_fetch("first", "v1", "models", method="GET", headers=headers)
    assert [m["id"] for m in json.loads(models.body)["data"]] == ["fake-model", "fake-embed"]
    for path in (("api", "contents"), ("api", "kernels"), ("api", "me")):
        response = await jp_fetch(*path, method="GET", headers=headers, raise_error=False)
        assert response.code == 403, path


async def test_embeddings_404_where_the_engine_cannot_embed(door):
    code, body = await _post(door, "embeddings", json.dumps({"model": "fake-model", "input": "hi"}))
    assert code == 404
    message = _assert_openai_error(body, param="model")
    assert "cannot serve embeddings" in message
    assert "fake-embed" in message


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1:8888", True), ("localhost", True), ("[::1]:8888", True), ("[::ffff:127.0.0.1]", True),
    ("127.0.0.1:evil.com", False), ("[::1", False), ("[::1]evil.com", False), ("::1", False), ("evil.com:80", False),
    ("", False)])
def test_the_gateways_host_guard_takes_only_a_well_formed_loopback_host(host, loopback):
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize("host", ["attacker.example", "127.0.0.1:evil.com", "[::1", "[::1]evil.com", "::1"])
async def test_scoped_key_from_a_foreign_host_is_403(key_door, host):
    async with aiohttp.ClientSession() as session, session.get(
            key_door.route("models"), headers={**key_door.headers, "Host": host}) as resp:
        assert resp.status == 403
        assert json.loads(await resp.read())["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "v1/batches", {"input_file_id": "x" * 3000}, 400),
    ("PUT", "api/default_model", {"model": "x" * 3000}, 400),
    ("POST", "api/models/fake-model/warm", {"cluster": "x" * 3000}, 404)])
async def test_an_error_quotes_a_long_field_in_a_few_words(door, method, path, body, status):
    """Found by fuzzing: these errors quoted the field whole, answering a 10 MB field with a 10 MB error."""
    url = URL(f"{door.url.removesuffix('/v1')}/{path}", encoded=True)  # under /first
    async with aiohttp.ClientSession() as session, session.request(method, url, json=body,
                                                                   headers=door.headers) as resp:
        assert resp.status == status
        message = _assert_openai_error(json.loads(await resp.read()), param=next(iter(body)))
    assert len(message) < 500


def _alive(kind: type) -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, kind))


async def _answered(door: Door, body: dict[str, Any]) -> int:
    async with aiohttp.ClientSession() as session, session.post(door.route("chat/completions"), json=body,
                                                                headers=door.headers) as resp:
        await resp.read()
        return resp.status


async def test_an_inference_handler_and_its_body_go_when_it_has_answered(jupyter_door):
    """Found by fuzzing (the server's memory did not come back): the handler kept its task, whose context
    (Jupyter's CallContext) holds the handler, so each handler and the body it read lived on until a full collection,
    tens of MB after a few 10 MB bodies in a server that then stood idle."""
    with without_cycle_collection():
        assert [await _answered(jupyter_door, body) for body in (CHAT, {**CHAT, "model": 42})] == [200, 400]
        await eventually_async(lambda: _alive(TableRoute) == 0, "the handlers freed without a collection")


async def test_a_relayed_stream_goes_when_it_has_ended(door):
    """Found by fuzzing (the server's memory did not come back): the upstream response kept the sink it piped into,
    which holds the stream that holds the response, so every streamed request (its body, and at Jupyter's door its
    handler) lived on until a full collection."""
    with without_cycle_collection():
        assert await _answered(door, {**CHAT, "stream": True}) == 200
        await eventually_async(lambda: _alive(GatewayStream) == 0, "the stream freed without a collection")
