"""The gateway on a facility's network: a real forward proxy (Debian's tinyproxy) and real TLS (a trustme CA).

Each test builds a gateway on a config as a site would write it, sends a request through it to the fake upstream
(over https where TLS is tested), and checks both the answer and what the proxy's own log says went through it.
Failures must be 502s in the OpenAI shape that name the cluster, the endpoint and the setting that fixes them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.fake_upstream import serving_in_thread
from bench.site_network import Tinyproxy, TlsCerts
from first_jupyter.api.lean_door import GatewayApp
from first_jupyter.config import ConfigError, parse_config
from first_jupyter.gateway.core import Gateway
from first_jupyter.protocol import Capability, OpenAIError, parse_request
from first_jupyter.service import build_gateway
from first_jupyter.transport.http_server import listening_socket, serve
from first_jupyter.transport.tls import TRUST_VARIABLES
from tests.conftest import serving_http
from tests.waiting import GUARD_S

CHAT = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]})
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
WHERE = "cluster 'site' endpoint 'engine'"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy or trust variable from the machine running the tests: each test sets what it means."""
    for name in (*PROXY_VARIABLES, *TRUST_VARIABLES):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def build(tmp_path: Path, base_url: str, *, limits: dict[str, Any] | None = None, **endpoint: Any) -> Gateway:
    """A gateway with one http endpoint, as a site's config file would give it."""
    config = {"clusters": {"site": {"backend": "http", "endpoints": [{
        "name": "engine", "base_url": base_url, "models": [{"id": "fake-model"}], **endpoint}]}},
        "defaults": {"model": "fake-model", "limits": limits or {}}}
    return build_gateway(parse_config(config, "site.yaml"), tmp_path / "data", environ={})


@asynccontextmanager
async def site(tmp_path: Path, base_url: str, **settings: Any) -> AsyncIterator[Gateway]:
    gateway = build(tmp_path, base_url, **settings)
    try:
        yield gateway
    finally:
        await gateway.close()


async def ask(tmp_path: Path, base_url: str, **settings: Any) -> dict[str, Any]:
    """The answer of a gateway built with these settings to one chat request."""
    async with site(tmp_path, base_url, **settings) as gateway:
        completed = await gateway.complete(parse_request(Capability.chat, CHAT))
    answer: dict[str, Any] = orjson.loads(completed.body)
    return answer


async def refused(tmp_path: Path, base_url: str, **settings: Any) -> OpenAIError:
    """The error a gateway built with these settings answers one chat request with."""
    async with site(tmp_path, base_url, **settings) as gateway:
        with pytest.raises(OpenAIError) as raised:
            await gateway.complete(parse_request(Capability.chat, CHAT))
    return raised.value


def dead_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- TLS ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "tls.ca_bundle"])
async def test_a_site_ca_is_trusted_from_each_source(source, tls_certs: TlsCerts, tls_upstream, tmp_path,
                                                     monkeypatch):
    upstream = tls_upstream()
    assert upstream.url.startswith("https://127.0.0.1:")
    settings: dict[str, Any] = {}
    if source == "tls.ca_bundle":
        settings["tls"] = {"ca_bundle": str(tls_certs.ca)}
    else:
        monkeypatch.setenv(source, str(tls_certs.ca))
    assert (await ask(tmp_path, f"{upstream.url}/v1", **settings))["object"] == "chat.completion"


@pytest.mark.parametrize("trusted", [None, "other"])
async def test_a_certificate_from_an_unknown_ca_is_a_502_naming_the_settings(trusted, tls_certs, tls_upstream,
                                                                             tmp_path):
    upstream = tls_upstream()
    tls = {"ca_bundle": str(tls_certs.other_ca)} if trusted else {}
    error = await refused(tmp_path, f"{upstream.url}/v1", tls=tls)
    assert error.status == 502
    assert error.code == "upstream_tls_failed"
    assert WHERE in error.message
    assert "tls.ca_bundle" in error.message
    assert "REQUESTS_CA_BUNDLE" in error.message
    assert "certificate" in error.message


async def test_verify_false_is_allowed_but_warned_at_start_and_shown_in_status(tls_upstream, tmp_path, caplog):
    upstream = tls_upstream()
    with caplog.at_level(logging.WARNING):
        async with site(tmp_path, f"{upstream.url}/v1", tls={"verify": False}) as gateway:
            completed = await gateway.complete(parse_request(Capability.chat, CHAT))
            (endpoint,) = (await gateway.status()).json_value()["endpoints"]
    assert any("not verified" in r.getMessage() and "tls.verify" in r.getMessage() for r in caplog.records)
    assert orjson.loads(completed.body)["object"] == "chat.completion"
    assert endpoint["tls_verify"] is False


async def test_a_verified_endpoint_shows_no_tls_flag(tls_certs, tls_upstream, tmp_path):
    async with site(tmp_path, f"{tls_upstream().url}/v1", tls={"ca_bundle": str(tls_certs.ca)}) as gateway:
        (endpoint,) = (await gateway.status()).json_value()["endpoints"]
    assert "tls_verify" not in endpoint
    assert endpoint["state"] == "online"


async def test_a_client_certificate_is_sent_where_the_upstream_demands_one(tls_certs, tls_upstream, tmp_path):
    upstream = tls_upstream(client_cert=True)
    without = await refused(tmp_path, f"{upstream.url}/v1", tls={"ca_bundle": str(tls_certs.ca)})
    assert without.status == 502
    assert "tls.client_cert" in without.message
    assert WHERE in without.message
    answer = await ask(tmp_path, f"{upstream.url}/v1", tls={"ca_bundle": str(tls_certs.ca),
                                                            "client_cert": str(tls_certs.client_chain),
                                                            "client_key": str(tls_certs.client_key)})
    assert answer["object"] == "chat.completion"


async def test_equal_tls_settings_share_one_context(tls_certs, tls_upstream, tmp_path):
    upstream = tls_upstream()
    settings = {"ca_bundle": str(tls_certs.ca)}
    gateways = [build(tmp_path / "a", f"{upstream.url}/v1", tls=settings),
                build(tmp_path / "b", f"{upstream.url}/v1", tls=settings),
                build(tmp_path / "c", f"{upstream.url}/v1", tls={"verify": False})]
    contexts = [g.backends[0].url(upstream.url).origin.ssl for g in gateways]
    for gateway in gateways:
        await gateway.close()
    assert contexts[0] is contexts[1]
    assert contexts[0] is not contexts[2]


def test_an_unreadable_ca_bundle_stops_the_gateway_with_the_key_path(tmp_path):
    with pytest.raises(ConfigError, match=r"clusters\.site\.endpoints\[0\]\.tls\.ca_bundle"):
        build(tmp_path, "https://127.0.0.1:1/v1", tls={"ca_bundle": str(tmp_path / "missing.pem")})


# -- proxies -----------------------------------------------------------------------------------------------

async def test_https_goes_through_the_proxy_in_a_connect_tunnel(tinyproxy, tls_certs, tls_upstream, tmp_path,
                                                                monkeypatch):
    proxy: Tinyproxy = tinyproxy()
    upstream = tls_upstream()
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    async with site(tmp_path, f"{upstream.url}/v1", tls={"ca_bundle": str(tls_certs.ca)}) as gateway:
        completed = await gateway.complete(parse_request(Capability.chat, CHAT))
        (endpoint,) = (await gateway.status()).json_value()["endpoints"]
    assert orjson.loads(completed.body)["object"] == "chat.completion"
    port = upstream.url.rsplit(":", 1)[1]
    assert set(proxy.requests()) == {f"CONNECT 127.0.0.1:{port} HTTP/1.1"}  # the status reading tunnels too
    assert endpoint["proxy"] == proxy.url


async def test_http_goes_through_the_proxy_in_absolute_form(tinyproxy, fake_upstream, tmp_path, monkeypatch):
    proxy = tinyproxy()
    monkeypatch.setenv("http_proxy", proxy.url)
    assert (await ask(tmp_path, f"{fake_upstream.url}/v1"))["object"] == "chat.completion"
    assert proxy.requests() == [f"POST {fake_upstream.url}/v1/chat/completions HTTP/1.1"]


async def test_no_proxy_and_the_endpoint_setting_keep_a_call_direct(tinyproxy, fake_upstream, tmp_path,
                                                                    monkeypatch):
    proxy = tinyproxy()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.0/8")
    assert (await ask(tmp_path / "a", f"{fake_upstream.url}/v1"))["object"] == "chat.completion"
    monkeypatch.setenv("NO_PROXY", "localhost")  # loopback by name only: 127.0.0.1 is not exempt
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead_port()}")
    assert (await ask(tmp_path / "b", f"{fake_upstream.url}/v1", proxy="none"))["object"] == "chat.completion"
    monkeypatch.delenv("HTTP_PROXY")
    assert proxy.requests() == []
    assert (await ask(tmp_path / "c", f"{fake_upstream.url}/v1", proxy=proxy.url))["object"] == "chat.completion"
    assert len(proxy.requests()) == 1


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_proxy_credentials_come_from_its_url(scheme, tinyproxy, tls_certs, fake_upstream, tls_upstream,
                                                   tmp_path):
    proxy = tinyproxy(basic_auth=("ada", "s3cret"))
    upstream = tls_upstream() if scheme == "https" else fake_upstream
    tls = {"ca_bundle": str(tls_certs.ca)}
    with_credentials = proxy.url.replace("http://", "http://ada:s3cret@")
    answer = await ask(tmp_path / "a", f"{upstream.url}/v1", proxy=with_credentials, tls=tls)
    assert answer["object"] == "chat.completion"
    error = await refused(tmp_path / "b", f"{upstream.url}/v1", proxy=proxy.url, tls=tls)
    assert error.status == 502
    assert error.code == "proxy_failed"
    assert "wants credentials" in error.message
    assert proxy.url in error.message
    assert WHERE in error.message


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_proxy_that_is_down_is_named_without_its_credentials(scheme, tls_certs, fake_upstream, tls_upstream,
                                                                      tmp_path):
    upstream = tls_upstream() if scheme == "https" else fake_upstream
    port = dead_port()
    error = await refused(tmp_path, f"{upstream.url}/v1", proxy=f"http://ada:s3cret@127.0.0.1:{port}",
                          tls={"ca_bundle": str(tls_certs.ca)})
    assert error.status == 502
    assert error.code == "proxy_failed"
    assert f"http://127.0.0.1:{port}" in error.message
    assert "s3cret" not in error.message
    assert WHERE in error.message


@pytest.mark.parametrize("scheme", ["http", "https"])
async def test_a_proxy_that_refuses_is_named(scheme, tinyproxy, tls_certs, fake_upstream, tls_upstream, tmp_path):
    proxy = tinyproxy(refusing=True)
    upstream = tls_upstream() if scheme == "https" else fake_upstream
    error = await refused(tmp_path, f"{upstream.url}/v1", proxy=proxy.url, tls={"ca_bundle": str(tls_certs.ca)})
    assert proxy.url in error.message
    assert WHERE in error.message
    if scheme == "https":
        assert error.status == 502
        assert "refused to tunnel" in error.message
    else:  # a plain request's refusal is an HTTP answer like any other: it is passed on, naming the proxy
        assert error.status == 403
        assert "may have refused" in error.message


# -- what is not the engine's answer -----------------------------------------------------------------------

class Moved(BaseHTTPRequestHandler):
    def _moved(self) -> None:
        self.send_response(307)
        self.send_header("Location", "https://new.example.org/v1/chat/completions")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _moved

    def log_message(self, *args: object) -> None:
        pass


async def test_a_redirect_is_a_502_that_names_the_location_and_base_url(tmp_path):
    with serving_http(Moved) as url:
        async with site(tmp_path, f"{url}/v1") as gateway:
            with pytest.raises(OpenAIError) as raised:
                await gateway.complete(parse_request(Capability.chat, CHAT))
            (endpoint,) = (await gateway.status()).json_value()["endpoints"]
    error = raised.value
    assert error.status == 502
    assert error.code == "upstream_redirect"
    assert "HTTP 307" in error.message
    assert "https://new.example.org/v1/chat/completions" in error.message
    assert "base_url" in error.message
    assert endpoint["state"] == "offline"
    assert "307" in endpoint["error"]


async def test_a_non_streamed_answer_over_the_limit_is_a_502(fake_upstream, tmp_path):
    error = await refused(tmp_path, f"{fake_upstream.url}/v1", limits={"max_response_bytes": 64})
    assert error.status == 502
    assert error.code == "upstream_response_too_large"
    assert "max_response_bytes" in error.message


async def test_a_demanded_client_certificate_is_named_through_a_proxy_too(tinyproxy, tls_certs, tls_upstream,
                                                                          tmp_path):
    """Through a tunnel the origin's refusal must not read as the proxy's fault: the proxy opened the tunnel."""
    proxy = tinyproxy()
    upstream = tls_upstream(client_cert=True)
    error = await refused(tmp_path / "a", f"{upstream.url}/v1", proxy=proxy.url, tls={"ca_bundle": str(tls_certs.ca)})
    assert error.status == 502
    assert "tls.client_cert" in error.message
    assert error.code != "proxy_failed"
    answer = await ask(tmp_path / "b", f"{upstream.url}/v1", proxy=proxy.url,
                       tls={"ca_bundle": str(tls_certs.ca), "client_cert": str(tls_certs.client_chain),
                            "client_key": str(tls_certs.client_key)})
    assert answer["object"] == "chat.completion"


async def test_a_bare_lf_in_an_upstream_header_cannot_inject_a_header_through_the_lean_door(tmp_path):
    """The regression of issue 21: a hostile upstream's ``Retry-After: 1\\nX-Injected: yes`` was relayed whole and
    became a header of the door's own answer. Now the upstream's response is refused where it is parsed."""
    with serving_in_thread(models=["fake-model"], fault="bare-lf-header") as hostile:
        async with site(tmp_path, f"{hostile.url}/v1") as gateway:
            app = GatewayApp(gateway, key="door-key")
            door = await serve(app, listening_socket("127.0.0.1", 0))
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
                writer.write(b"POST /first/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Authorization: Bearer door-key\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(CHAT), CHAT))
                answer = await asyncio.wait_for(reader.read(), GUARD_S)
                writer.close()
            finally:
                door.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 ")
    assert b"x-injected" not in head.lower()
    assert b"malformed response" in body
