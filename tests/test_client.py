"""``first_jupyter.client``: finding the gateway (the server's, or one started in-process) and the calls on it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator

import pytest

import first_jupyter
from first_jupyter import client
from first_jupyter.client import Conversation, GatewayError
from tests.conftest import (
    closed_port,
    fake_cluster_config,
    server_config,
    server_process,
)
from tests.waiting import eventually

HELD = 3600.0
"""A pace or first-byte delay of the fake upstream that no test outlasts: the upstream holds its answer until the
client goes away, so what ends the call is known whatever the machine's speed."""


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path):
    return server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "server-data")


def test_without_a_server_an_in_process_gateway_serves_the_official_client(in_process):
    conn = client.connection()
    assert conn.source == "in-process"
    assert conn.url.startswith("http://127.0.0.1:")
    openai_client = first_jupyter.openai_client()
    assert sorted(m.id for m in openai_client.models.list()) == ["fake-embed", "fake-model"]
    answer = openai_client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "


def test_disconnect_stops_the_in_process_gateway(in_process):
    port = int(client.connection().url.split(":")[2].split("/")[0])
    client.disconnect()
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", port))


def test_chat_streams_pieces_and_says_where_it_ran(in_process):
    pieces: list[str] = []
    result = first_jupyter.chat("hi", stream=True, on_text=pieces.append)
    assert len(pieces) == 8
    assert result.text == "".join(pieces)
    assert (result.model, result.cluster, result.endpoint) == ("fake-model", "remote", "fake")
    assert (result.prompt_tokens, result.completion_tokens, result.finish_reason) == (8, 8, "stop")
    assert 0 < result.ttft_s <= result.latency_s
    assert not result.stopped


def test_a_conversation_sends_its_last_turns(in_process):
    conversation = Conversation(max_turns=1)
    first_jupyter.chat("first question", conversation=conversation)
    first_jupyter.chat("second question", conversation=conversation, system="be brief")
    assert [m["content"] for m in in_process.last_request_body["messages"]] == [
        "be brief", "first question", "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 ", "second question"]
    first_jupyter.chat("third question", conversation=conversation)
    sent = [m["content"] for m in in_process.last_request_body["messages"]]
    assert sent[0] == "second question"  # only the last turn is kept
    assert len(conversation.turns) == 3


def test_extra_fields_reach_the_engine(in_process):
    first_jupyter.chat("hi", temperature=0.5, max_tokens=3, top_k=7)
    body = in_process.last_request_body
    assert (body["temperature"], body["max_tokens"], body["top_k"]) == (0.5, 3, 7)


def test_setting_stop_ends_the_stream_and_the_upstream_request(in_process):
    in_process.pace = HELD  # after its first piece the upstream holds the rest: the stream can only end by stop
    stop = threading.Event()
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        stop.set()

    result = first_jupyter.chat("hi", stream=True, on_text=on_text, stop=stop)
    assert result.stopped
    assert result.text == "tok0 "
    # held for an hour, the stream can only have ended upstream by the gateway leaving it
    eventually(lambda: in_process.active == 0, "the upstream request cancelled")
    assert in_process.disconnects


def test_the_default_model_is_used_when_none_is_named(in_process):
    assert first_jupyter.default_model() == "fake-model"
    assert first_jupyter.set_default_model("fake-embed") == "fake-embed"
    assert first_jupyter.embed(["a", "bb"]) == first_jupyter.embed(["a", "bb"], model="fake-embed")
    assert len(first_jupyter.embed("one")) == 1


def test_completions_and_usage(in_process):
    result = first_jupyter.complete("Once upon a time", max_tokens=4)
    assert result.text
    assert result.cluster == "remote"
    first_jupyter.chat("hi")
    by_model = {row["model"]: row for row in first_jupyter.usage()}
    assert by_model["fake-model"]["requests"] == 2


def test_models_carry_their_state(in_process):
    assert {(m["id"], m["state"]) for m in first_jupyter.models()} == {("fake-model", "hot"), ("fake-embed", "hot")}


@pytest.mark.parametrize(("call", "words"), [
    (lambda: first_jupyter.chat("hi", model="gpt-9"), "Available models: fake-embed, fake-model"),
    (lambda: first_jupyter.set_default_model("gpt-9"), "Available models: fake-embed, fake-model"),
    (lambda: first_jupyter.embed("x", model="fake-model"), "cannot serve embeddings"),
])
def test_gateway_errors_carry_its_message(in_process, call, words):
    with pytest.raises(GatewayError, match=words) as info:
        call()
    assert info.value.status == 404


def test_an_unreachable_gateway_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(client.GATEWAY_URL_ENV, f"http://127.0.0.1:{closed_port()}/first/v1")
    monkeypatch.setenv(client.API_KEY_ENV, "first-key")
    client.disconnect()
    try:
        with pytest.raises(GatewayError, match="not reachable"):
            first_jupyter.models()
        with pytest.raises(GatewayError, match="not reachable"):
            first_jupyter.chat("hi", model="fake-model")
    finally:
        client.disconnect()


async def test_a_kernel_of_the_server_uses_the_servers_gateway(first_ext, monkeypatch):
    """The variables the extension exports to its kernels point the client at the server's gateway."""
    monkeypatch.setenv(client.GATEWAY_URL_ENV, first_ext.gateway_url())
    monkeypatch.setenv(client.API_KEY_ENV, first_ext.api_key)
    client.disconnect()
    try:
        conn = await asyncio.to_thread(client.connection)
        assert (conn.source, conn.url) == ("server", first_ext.gateway_url())
        result = await asyncio.to_thread(first_jupyter.chat, "hi", model="fake-model")
        assert result.cluster == "remote"
    finally:
        client.disconnect()


def test_stop_works_before_the_first_token(in_process):
    """A cold start or a queued job can keep the answer's head back for minutes: stop must not wait for it."""
    client.connection()  # the gateway starts and reads its endpoint's state at once: let that answer come first
    eventually(lambda: in_process.by_route["/v1/models"] >= 1 and in_process.active == 0, "the start-up reading")
    in_process.first_byte_delay = HELD  # no head within the test: only stop can end the call
    stop = threading.Event()
    outcome: list[client.Result | BaseException] = []

    def call() -> None:
        try:
            outcome.append(first_jupyter.chat("hi", stream=True, stop=stop))
        except BaseException as exc:  # reported by the assertions below, in the test's thread
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)  # daemon: a call stop failed to end cannot hang the run
    caller.start()
    # stop once the request waits upstream for its head (earlier, it would not even be sent)
    eventually(lambda: in_process.by_route["/v1/chat/completions"] == 1, "the chat request upstream")
    stop.set()
    caller.join(30)
    assert not caller.is_alive(), "stop did not end a call still waiting for its first byte"
    (result,) = outcome
    assert isinstance(result, client.Result), result
    assert result.stopped
    assert result.text == ""
    # held for an hour, the request can only have ended upstream by the gateway leaving it
    eventually(lambda: in_process.active == 0, "the upstream request cancelled")
    assert in_process.disconnects


@pytest.fixture
def https_server(fake_upstream, write_config, tls_certs, tmp_path) -> Iterator[dict[str, str]]:
    """A Jupyter server serving https with the test CA's certificate and no loopback server of the gateway's own
    (``api_port = -1``), in a process of its own: what its kernels are given (the runtime file's ``url``, which
    is FIRST_GATEWAY_URL, and ``api_key``)."""
    config_dir, runtime_dir = tmp_path / "config", tmp_path / "runtime"
    config_dir.mkdir()
    (config_dir / "jupyter_server_config.json").write_text(json.dumps({
        "ServerApp": {"certfile": str(tls_certs.server_chain), "keyfile": str(tls_certs.server_key)},
        "FirstExtension": {"api_port": -1},
    }))
    env = {"FIRST_CONFIG": str(write_config(fake_cluster_config(fake_upstream))),
           "FIRST_DATA_DIR": str(tmp_path / "data"), "JUPYTER_TOKEN": "https-test",
           "JUPYTER_CONFIG_DIR": str(config_dir), "JUPYTER_RUNTIME_DIR": str(runtime_dir)}
    with server_process(tmp_path, env) as info:
        yield info


def test_a_kernel_of_an_https_server_verifies_it_with_the_sites_ca(https_server, tls_certs, monkeypatch):
    """A Jupyter server with a certfile hands its kernels its own https URL; the client speaks TLS to it and trusts
    the CA the site names, in either variable, on top of the system's store."""
    url = https_server["url"]
    assert url.startswith("https://")
    monkeypatch.setenv(client.GATEWAY_URL_ENV, url)
    monkeypatch.setenv(client.API_KEY_ENV, https_server["api_key"])
    for name in ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    client.disconnect()
    try:
        with pytest.raises(GatewayError, match="does not trust") as untrusted:
            first_jupyter.models()
        assert "SSL_CERT_FILE or REQUESTS_CA_BUNDLE" in str(untrusted.value)

        monkeypatch.setenv("SSL_CERT_FILE", str(tls_certs.ca))
        assert {m["id"] for m in first_jupyter.models()} == {"fake-model", "fake-embed"}
        pieces: list[str] = []
        result = first_jupyter.chat("hi", model="fake-model", stream=True, on_text=pieces.append)
        assert (result.cluster, len(pieces)) == ("remote", 8)

        monkeypatch.delenv("SSL_CERT_FILE")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_certs.ca))
        assert first_jupyter.chat("hi", model="fake-model").text == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "

        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_certs.other_ca))  # another CA's: refused again
        with pytest.raises(GatewayError, match="does not trust"):
            first_jupyter.chat("hi", model="fake-model")
    finally:
        client.disconnect()


def test_the_in_process_gateway_is_reached_directly_behind_a_site_proxy(in_process, tinyproxy, monkeypatch):
    """``HTTP_PROXY`` set and ``NO_PROXY`` naming only ``localhost``: the official client still reaches the
    in-process gateway on 127.0.0.1 directly (a proxy cannot reach this machine's loopback), while the gateway's
    own call to the upstream follows the environment, through the proxy, as curl would."""
    proxy = tinyproxy()
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost")
    monkeypatch.setenv("no_proxy", "localhost")
    gateway = client.connection().url
    answer = first_jupyter.openai_client().chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    gateway_address = gateway.split("/")[2]
    assert not [line for line in proxy.requests() if gateway_address in line]
    assert f"POST {in_process.url}/v1/chat/completions HTTP/1.1" in proxy.requests()
    assert all(f" {in_process.url}/v1/" in line for line in proxy.requests())  # its status readings too
