"""The site-network stand-ins other tests and the bench build on (bench/site_network.py): tinyproxy as a real
forward proxy to loopback servers (plain requests, CONNECT tunnels, streams, Basic authentication, refusals), and
the test CA's files."""

from __future__ import annotations

import base64
import http.client
import json
import ssl

import pytest

from bench.fake_upstream import FakeUpstream
from bench.site_network import Tinyproxy, TlsCerts

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def through(proxy: Tinyproxy, method: str, target: str, body: dict | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One absolute-form request to ``proxy`` (how clients send plain http through a forward proxy)."""
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        connection.request(method, target, body=None if body is None else json.dumps(body),
                           headers={"Content-Type": "application/json", **(headers or {})})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def tunnel(proxy: Tinyproxy, upstream: FakeUpstream, certs: TlsCerts, headers: dict[str, str] | None = None,
           client_cert: bool = False) -> http.client.HTTPSConnection:
    """An https connection to ``upstream`` through a CONNECT tunnel of ``proxy``, trusting the test CA, presenting
    the test client certificate when ``client_cert``."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    if client_cert:
        context.load_cert_chain(certs.client_pem)
    connection = http.client.HTTPSConnection("127.0.0.1", proxy.port, timeout=30, context=context)
    connection.set_tunnel("127.0.0.1", upstream.port, headers=headers)
    return connection


def basic(user: str, password: str) -> dict[str, str]:
    return {"Proxy-Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_plain_requests_pass_through_and_each_is_logged(tinyproxy, fake_upstream):
    proxy = tinyproxy()
    target = f"{fake_upstream.url}/v1/chat/completions"
    status, body = through(proxy, "POST", target, CHAT)
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    assert proxy.requests() == [f"POST {target} HTTP/1.1"]
    assert "via" not in fake_upstream.last_request_headers  # the proxy adds nothing an upstream could trip on


def test_a_stream_arrives_whole_through_the_proxy(tinyproxy, fake_upstream):
    proxy = tinyproxy()
    status, body = through(proxy, "POST", f"{fake_upstream.url}/v1/chat/completions", {**CHAT, "stream": True})
    assert status == 200
    events = [line for line in body.decode().split("\n") if line.startswith("data: ")]
    assert len(events) == 10  # eight pieces, the finish with usage, [DONE]
    assert events[-1] == "data: [DONE]"


def test_connect_tunnels_reach_any_loopback_port(tinyproxy, tls_upstream, tls_certs):
    proxy = tinyproxy()
    upstream = tls_upstream()
    connection = tunnel(proxy, upstream, tls_certs)
    try:
        connection.request("GET", "/v1/models")
        answer = connection.getresponse()
        assert answer.status == 200
        assert [m["id"] for m in json.loads(answer.read())["data"]] == ["fake-model", "fake-embed"]
    finally:
        connection.close()
    assert proxy.requests() == [f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.0"]  # (as http.client sends it)


def test_a_tunnel_carries_a_client_certificate_to_an_upstream_that_requires_one(tinyproxy, tls_upstream, tls_certs):
    proxy = tinyproxy()
    upstream = tls_upstream(client_cert=True)
    anonymous = tunnel(proxy, upstream, tls_certs)
    with pytest.raises((ssl.SSLError, ConnectionError)):  # the handshake, or the first read after it, is refused
        anonymous.request("GET", "/v1/models")
        anonymous.getresponse()
    anonymous.close()
    connection = tunnel(proxy, upstream, tls_certs, client_cert=True)
    try:
        connection.request("GET", "/v1/models")
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    assert upstream.requests == 1


def test_basic_auth_asks_for_credentials_and_lets_the_right_ones_through(tinyproxy, fake_upstream, tls_upstream,
                                                                         tls_certs):
    proxy = tinyproxy(basic_auth=("ada", "s3cret"))
    assert proxy.authenticated_url == f"http://ada:s3cret@127.0.0.1:{proxy.port}"
    models = f"{fake_upstream.url}/v1/models"
    assert through(proxy, "GET", models)[0] == 407
    assert through(proxy, "GET", models, headers=basic("ada", "wrong"))[0] == 401  # tinyproxy's answer to these
    assert through(proxy, "GET", models, headers=basic("ada", "s3cret"))[0] == 200

    upstream = tls_upstream()
    refused = tunnel(proxy, upstream, tls_certs)
    with pytest.raises(OSError, match="407"):
        refused.connect()
    refused.close()
    admitted = tunnel(proxy, upstream, tls_certs, headers=basic("ada", "s3cret"))
    try:
        admitted.request("GET", "/v1/models")
        assert admitted.getresponse().status == 200
    finally:
        admitted.close()
    assert fake_upstream.by_route["/v1/models"] == 1  # only the request with the right credentials reached it


def test_a_refusing_proxy_answers_403_to_plain_requests_and_tunnels_and_logs_both(tinyproxy, fake_upstream,
                                                                                  tls_upstream, tls_certs):
    proxy = tinyproxy(refusing=True)
    target = f"{fake_upstream.url}/v1/models"
    status, body = through(proxy, "GET", target)
    assert status == 403
    assert b"Filtered" in body
    upstream = tls_upstream()
    refused = tunnel(proxy, upstream, tls_certs)
    with pytest.raises(OSError, match="403"):
        refused.connect()
    refused.close()
    assert proxy.requests() == [f"GET {target} HTTP/1.1", f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.0"]
    assert fake_upstream.requests == 0
    assert upstream.requests == 0


def test_stop_ends_the_proxy(tinyproxy):
    proxy = tinyproxy()
    pid = proxy.pid
    assert pid is not None
    proxy.stop()
    assert proxy.pid is None
    with pytest.raises(ConnectionRefusedError):
        http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30).connect()


def test_the_certificate_files_load_as_servers_and_clients_take_them(tls_certs):
    trusting = ssl.create_default_context(cafile=str(tls_certs.ca))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tls_certs.server_chain, tls_certs.server_key)
    server.load_cert_chain(tls_certs.server_pem)
    trusting.load_cert_chain(tls_certs.client_chain, tls_certs.client_key)
    trusting.load_cert_chain(tls_certs.client_pem)
    assert tls_certs.ca.read_text() != tls_certs.other_ca.read_text()
