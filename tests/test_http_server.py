"""The gateway's own HTTP server (``transport.http_server``, ``api.lean_door``), where kernels are pointed: HTTP's
rules.

Behaviour every door shares (errors, streaming, cancellation, the official client) is tested through each door
with the ``door`` fixtures elsewhere; here is what this server does itself: bodies refused before they are
read, chunked request bodies, ``Expect: 100-continue``, HTTP/1.0, pipelining, HEAD, malformed requests, idle
connections, activity, and how the extension places it (port choice, fallback, shutdown).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from jupyter_server._tz import utcnow
from yarl import URL

from first_jupyter.transport import http_server as httpd
from tests.conftest import fake_cluster_config, server_config
from tests.waiting import GUARD_S

LIMIT = 4096
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path: Path):
    return server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "data",
                         max_request_bytes=LIMIT)


async def _connect(ext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = urlsplit(ext.gateway_url())
    return await asyncio.open_connection(url.hostname, url.port)


async def _exchange(ext, request: bytes) -> bytes:
    """Send raw bytes and read everything until the server closes the connection (at most ``GUARD_S``)."""
    reader, writer = await _connect(ext)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=GUARD_S)
    finally:
        writer.close()


def _request(ext, body: bytes, *, method: str = "POST", route: str = "chat/completions", version: str = "HTTP/1.1",
             extra: str = "") -> bytes:
    path = f"{urlsplit(ext.gateway_url()).path}/{route}"
    head = (f"{method} {path} {version}\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ext.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


def _statuses(answer: bytes) -> list[bytes]:
    return re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)


def _error(answer: bytes) -> dict:
    return json.loads(answer.partition(b"\r\n\r\n")[2])["error"]


async def test_kernels_get_this_server_and_it_serves_the_routes(first_ext):
    assert first_ext.gateway_url().startswith("http://127.0.0.1:")
    assert first_ext.gateway_url() != first_ext.jupyter_gateway_url()
    headers = {"Authorization": f"Bearer {first_ext.api_key}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{first_ext.gateway_url()}/models", headers=headers) as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["fake-model", "fake-embed"]
        async with session.get(f"{first_ext.gateway_url().removesuffix('/v1')}/api/status", headers=headers) as resp:
            assert (await resp.json())["clusters"] == ["remote"]
        async with session.get(f"{first_ext.gateway_url().removesuffix('/first/v1')}/api/kernels",
                               headers=headers) as resp:
            assert resp.status == 404  # the scoped key opens the gateway's routes and nothing else


async def test_declared_oversized_body_is_refused_before_it_is_sent(first_ext):
    head = _request(first_ext, b"").replace(b"Content-Length: 0", b"Content-Length: 900000000")
    answer = await _exchange(first_ext, head)  # no body follows: only an early answer can arrive
    assert answer.startswith(b"HTTP/1.1 413 Request Entity Too Large\r\n")
    assert b"Connection: close\r\n" in answer
    error = _error(answer)
    assert "900,000,000 bytes" in error["message"]
    assert "max_request_bytes" in error["message"]


async def _chunks(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


@pytest.mark.parametrize(("size", "status"), [(LIMIT - 200, 200), (LIMIT * 3, 413)])
async def test_chunked_request_bodies_count_against_the_limit(first_ext, size, status):
    body = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * size}]}).encode()
    parts = [body[i:i + 1000] for i in range(0, len(body), 1000)]
    async with aiohttp.ClientSession() as session, session.post(
            f"{first_ext.gateway_url()}/chat/completions", data=_chunks(parts),
            headers={"Authorization": f"Bearer {first_ext.api_key}", "Content-Type": "application/json"}) as resp:
        assert resp.request_info.headers["Transfer-Encoding"] == "chunked"
        answer = await resp.json()
    assert resp.status == status
    assert (answer["model"] if status == 200 else answer["error"]["code"]) == (
        "fake-model" if status == 200 else "request_too_large")


async def test_a_refused_client_still_sending_reads_the_answer_and_is_then_closed(first_ext, monkeypatch):
    """The 413 goes out mid-body; the client's later bytes must not reset it away, nor hold the socket open."""
    monkeypatch.setattr(httpd, "LINGER_S", 0.5)
    chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"
    reader, writer = await _connect(first_ext)
    try:
        writer.write(_request(first_ext, b"").replace(b"Content-Length: 0", b"Transfer-Encoding: chunked")
                     + chunk * 8)  # twice the limit
        answer = await asyncio.wait_for(reader.read(), GUARD_S)  # to the server's FIN, sent right after the answer
        assert answer.startswith(b"HTTP/1.1 413 ")
        assert _error(answer)["code"] == "request_too_large"
        deadline = asyncio.get_running_loop().time() + GUARD_S
        with pytest.raises(ConnectionError):  # the client goes on sending; after the linger the server resets
            while asyncio.get_running_loop().time() < deadline:
                writer.write(chunk)
                await writer.drain()
                await asyncio.sleep(0.05)
    finally:
        writer.close()


async def test_expect_100_continue_is_answered_before_the_body(first_ext):
    body = json.dumps(CHAT).encode()
    reader, writer = await _connect(first_ext)
    try:
        head, _, _ = _request(first_ext, body, extra="Expect: 100-continue\r\n").partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD_S) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        assert (await asyncio.wait_for(reader.readline(), GUARD_S)).startswith(b"HTTP/1.1 200 OK")
    finally:
        writer.close()


async def test_http10_stream_is_sent_unframed_until_close(first_ext):
    body = json.dumps({**CHAT, "stream": True}).encode()
    answer = await _exchange(first_ext, _request(first_ext, body, version="HTTP/1.0"))
    head, _, events = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Transfer-Encoding" not in head
    assert events.startswith(b"data: {")  # no chunk-size line in front
    assert events.count(b"data: {") == 9  # 8 tokens and the final event
    assert events.endswith(b"data: [DONE]\n\n")


async def test_pipelined_requests_on_one_connection_are_answered_in_order(first_ext):
    first = json.dumps({**CHAT, "max_tokens": 1}).encode()
    second = json.dumps({**CHAT, "model": "no-such-model"}).encode()
    answer = await _exchange(first_ext, _request(first_ext, first) + _request(first_ext, b"", method="HEAD")
                             + _request(first_ext, second, extra="Connection: close\r\n"))
    assert _statuses(answer) == [b"200", b"405", b"404"]
    assert answer.rstrip().endswith(b'"code":"model_not_found"}}')
    assert answer.count(b'"method_not_allowed"') == 0  # HEAD: the head of the answer only


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GARBAGE\r\n\r\n", b"400"),
    (b"GET /first/v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", b"431"),
    (b"POST /first/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
    (b"POST /first/v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: ten\r\n\r\n", b"400"),
])
async def test_malformed_requests_get_an_openai_error_and_the_connection_closes(first_ext, request_bytes, status):
    answer = await _exchange(first_ext, request_bytes)
    assert _statuses(answer) == [status]
    assert set(_error(answer)) == {"message", "type", "param", "code"}


async def test_idle_connections_are_closed(first_ext, monkeypatch):
    monkeypatch.setattr(httpd, "KEEPALIVE_S", 0.2)
    reader, writer = await _connect(first_ext)
    try:
        writer.write(_request(first_ext, b"", method="GET", route="models"))
        assert await asyncio.wait_for(reader.readline(), GUARD_S) == b"HTTP/1.1 200 OK\r\n"
        await asyncio.wait_for(reader.read(), GUARD_S)  # the rest of the answer, then EOF once idle (0.2 s)
        assert reader.at_eof()
    finally:
        writer.close()


async def test_requests_count_as_server_activity(first_ext, jp_serverapp):
    before = utcnow()
    answer = await _exchange(first_ext, _request(first_ext, json.dumps(CHAT).encode(),
                                                 extra="Connection: close\r\n"))
    assert _statuses(answer) == [b"200"]
    assert jp_serverapp.web_app.settings["api_last_activity"] >= before


async def test_stopping_the_extension_ends_open_connections(first_ext):
    reader, writer = await _connect(first_ext)
    try:
        writer.write(_request(first_ext, b"", method="GET", route="models"))
        assert await asyncio.wait_for(reader.readline(), GUARD_S) == b"HTTP/1.1 200 OK\r\n"
        await first_ext.stop_extension()
        await asyncio.wait_for(reader.read(), GUARD_S)
        assert reader.at_eof()
    finally:
        writer.close()


class TestPlacement:
    @pytest.fixture
    def busy_port(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            yield sock.getsockname()[1]

    @pytest.fixture(params=["off", "taken"])
    def jp_server_config(self, request, busy_port, fake_upstream, write_config, tmp_path: Path):
        port = -1 if request.param == "off" else busy_port
        return server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "data", api_port=port)

    async def test_without_its_own_server_kernels_use_jupyters_url(self, first_ext):
        """Turned off, or its port taken (the server still starts, and logs why): Jupyter's URL for kernels."""
        assert first_ext.gateway_url() == first_ext.jupyter_gateway_url()
        async with aiohttp.ClientSession() as session, session.get(
                URL(f"{first_ext.gateway_url()}/models", encoded=True),
                headers={"Authorization": f"Bearer {first_ext.api_key}"}) as resp:
            assert resp.status == 200
