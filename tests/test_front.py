"""The keyed front: the scoped key on the hot routes bypasses Jupyter's handlers but keeps HTTP's rules.

Behaviour both doors share (errors, streaming, cancellation) is tested through both with the ``door`` fixture
elsewhere; here is what only the front does itself: choosing which door a request takes, refusing an oversized
body before reading it, request bodies in chunks, HTTP/1.0 and pipelined keep-alive, and marking activity.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from jupyter_server._tz import utcnow
from yarl import URL

from tests.conftest import fake_cluster_config, server_config

LIMIT = 4096
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path: Path):
    return server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "data",
                         max_request_bytes=LIMIT)


def _chat_url(ext) -> URL:
    return URL(f"{ext.gateway_url()}/chat/completions", encoded=True)


async def _raw_exchange(ext, request: bytes, *, until_closed: bool = True) -> bytes:
    """Send raw bytes to the server and read what comes back until it closes the connection (or 5 s pass)."""
    url = urlsplit(ext.gateway_url())
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        writer.write(request)
        await writer.drain()
        if until_closed:
            return await asyncio.wait_for(reader.read(), timeout=5)
        return await asyncio.wait_for(reader.read(65536), timeout=5)
    finally:
        writer.close()


def _request(ext, body: bytes, *, version: str = "HTTP/1.1", extra: str = "") -> bytes:
    path = urlsplit(ext.gateway_url()).path + "/chat/completions"
    head = (f"POST {path} {version}\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ext.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n")
    return head.encode() + body


async def test_the_scoped_key_takes_the_front_and_a_token_takes_jupyters_door(first_ext, jp_auth_header):
    """Jupyter's handlers add their Content-Security-Policy header to every answer; the front does not."""
    async with aiohttp.ClientSession() as session:
        for headers, jupyter in (({"Authorization": f"Bearer {first_ext.api_key}"}, False), (jp_auth_header, True)):
            async with session.post(_chat_url(first_ext), json=CHAT, headers=headers) as resp:
                answer = await resp.json()
                assert resp.status == 200
                assert answer["model"] == "fake-model"
                assert resp.headers["X-First-Endpoint"] == "fake"
                assert ("Content-Security-Policy" in resp.headers) is jupyter


async def test_declared_oversized_body_is_refused_before_it_is_sent(first_ext):
    head = _request(first_ext, b"").replace(b"Content-Length: 0", b"Content-Length: 900000000")
    answer = await _raw_exchange(first_ext, head)  # no body follows: only an early answer can arrive
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Request Entity Too Large"
    error = json.loads(rest.partition(b"\r\n\r\n")[2])["error"]
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
            _chat_url(first_ext), data=_chunks(parts),
            headers={"Authorization": f"Bearer {first_ext.api_key}", "Content-Type": "application/json"}) as resp:
        assert resp.request_info.headers["Transfer-Encoding"] == "chunked"
        answer = await resp.json()
    assert resp.status == status
    if status == 413:
        assert answer["error"]["code"] == "request_too_large"


async def test_http10_stream_is_sent_unframed_until_close(first_ext):
    body = json.dumps({**CHAT, "stream": True}).encode()
    answer = await _raw_exchange(first_ext, _request(first_ext, body, version="HTTP/1.0"))
    head, _, events = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"Transfer-Encoding" not in head
    assert events.startswith(b"data: {")  # no chunk-size line in front
    assert events.count(b"data: {") == 9  # 8 tokens and the final event
    assert events.endswith(b"data: [DONE]\n\n")


async def test_pipelined_requests_on_one_connection_are_answered_in_order(first_ext):
    first = json.dumps({**CHAT, "max_tokens": 1}).encode()
    second = json.dumps({**CHAT, "model": "no-such-model"}).encode()
    answer = await _raw_exchange(first_ext, _request(first_ext, first)
                                 + _request(first_ext, second, extra="Connection: close\r\n"))
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"404"]  # bodies carry no CRLF of their own
    assert answer.rstrip().endswith(b'"code":"model_not_found"}}')


async def test_front_requests_count_as_server_activity(first_ext, jp_serverapp):
    settings = jp_serverapp.web_app.settings
    before = utcnow()
    async with aiohttp.ClientSession() as session, session.post(
            _chat_url(first_ext), json=CHAT, headers={"Authorization": f"Bearer {first_ext.api_key}"}) as resp:
        assert resp.status == 200
        assert "Content-Security-Policy" not in resp.headers  # the front answered
    assert settings["api_last_activity"] >= before
