"""The node's stream callback behind a site's firewall: through its HTTP proxy (Debian's tinyproxy here), trusting
its CA (``trustme`` here), and never through a proxy to a loopback gateway.

Tests reach nothing but 127.0.0.1, and a loopback callback goes directly by design; so the proxied path is shown
with ``StreamCallback``'s loopback exemption turned off, and the exemption itself by a proxy that cannot be used.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
import sys
import traceback
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest

from bench.fake_upstream import FakeUpstream, serving_in_thread
from bench.site_network import Tinyproxy, TlsCerts
from first_jupyter.gateway.backends.compute.backend import remote_summary
from first_jupyter.gateway.backends.compute.callbacks import CALLBACK_PATH, CallbackHub
from first_jupyter.remote.inference import CallbackFailed, StreamCallback, stream_engine
from first_jupyter.transport.proxies import is_loopback
from tests.conftest import closed_port, serving_http
from tests.test_remote_inference import KEY, TASK
from tests.test_remote_inference import _Gateway as RemoteInferenceGateway
from tests.waiting import GUARD_S

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
PROXY_VARIABLES = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY", "no_proxy",
                   "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: the machine's own proxy or CA variables must not decide the outcome."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


class _Gateway(RemoteInferenceGateway):
    """The callback route of test_remote_inference, on HTTP/1.1 as the gateway's doors are: the node's batches
    share one connection (and one tunnel through a proxy)."""

    protocol_version = "HTTP/1.1"


@pytest.fixture
def callback() -> Iterator[str]:
    _Gateway.received, _Gateway.held, _Gateway.generating = [], None, []
    with serving_http(_Gateway) as url:
        yield f"{url}/first/api/callback"


class _TlsServer(ThreadingHTTPServer):
    """A server whose refused handshakes are expected (a client that does not trust it is what some tests are
    about): those are not printed as errors; anything else still is."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ssl.SSLError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serving_https(handler: type[BaseHTTPRequestHandler], certs: TlsCerts) -> Iterator[str]:
    """``serving_http`` with TLS: the server certificate the test CA issued for 127.0.0.1; its base URL."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certs.server_pem)
    with serving_http(handler, context=context, server_class=_TlsServer) as url:
        yield url


@pytest.fixture
def tls_callback(tls_certs: TlsCerts) -> Iterator[str]:
    """The callback route over https, with a certificate from the test CA (a site's own CA)."""
    _Gateway.received, _Gateway.held, _Gateway.generating = [], None, []
    with serving_https(_Gateway, tls_certs) as url:
        yield f"{url}/first/api/callback"


@pytest.fixture
def engine() -> Iterator[FakeUpstream]:
    with serving_in_thread(models=["fake-model"], chunks=5, pace=0.0) as upstream:
        yield upstream


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST.", True), ("gateway.localhost", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("128.0.0.1", False), ("::2", False), ("gateway.example.org", False),
    ("localhost.example.org", False), ("0.0.0.0", False),
])
def test_loopback_is_known_by_name_and_address_without_resolving(host, loopback):
    assert is_loopback(host) is loopback


def test_a_loopback_callback_goes_directly_whatever_the_proxy_variables_say(engine, callback, monkeypatch):
    """A proxy nothing listens on, for every scheme and without NO_PROXY: a batch sent through it would fail."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{closed_port()}")
    for url in (callback, callback.replace("127.0.0.1", "localhost")):
        _Gateway.received = []
        assert StreamCallback(url, TASK, KEY).proxy is None
        summary = stream_engine(engine.port, "chat/completions", CHAT, url, TASK, KEY)
        assert summary["status"] == 200
        assert _Gateway.received[-1][1] == {"done": True}


def test_a_proxy_that_cannot_be_reached_is_named_without_its_credentials(callback, monkeypatch):
    port = closed_port()
    monkeypatch.setenv("HTTP_PROXY", f"http://alice:s3cret@127.0.0.1:{port}")
    sender = StreamCallback(callback, TASK, KEY, direct_loopback=False)
    assert sender.proxy is not None
    with pytest.raises(CallbackFailed) as info:
        sender.post({"data": "x"})
    message = str(info.value)
    assert f"through the proxy http://127.0.0.1:{port}" in message
    assert "ConnectionRefusedError" in message
    assert "HTTP_PROXY" in message
    assert "s3cret" not in message
    assert "alice" not in message


def test_a_bad_proxy_setting_fails_the_stream_with_the_variable_named(engine, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "socks5://bob:hunter2@proxy.example.org:1080")
    with pytest.raises(CallbackFailed, match=r"\$HTTPS_PROXY is 'socks5://proxy.example.org:1080'") as info:
        stream_engine(engine.port, "chat/completions", CHAT, "https://gateway.example.org/first/api/callback",
                      TASK, KEY)
    assert "hunter2" not in str(info.value)


def test_the_gateway_answers_with_the_callbacks_failure_as_the_node_raised_it(engine, monkeypatch):
    """The task's traceback comes back to the gateway, which answers with its last line: the callback's failure,
    not the engine's (which was fine) and not a second failure while reporting the first."""
    port = closed_port()
    monkeypatch.setenv("HTTP_PROXY", f"http://carol:Pa55word@127.0.0.1:{port}")
    monkeypatch.setattr("first_jupyter.remote.inference.is_loopback", lambda host: False)
    with pytest.raises(CallbackFailed) as info:
        stream_engine(engine.port, "chat/completions", CHAT, f"http://127.0.0.1:{closed_port()}/cb", TASK, KEY)
    summary = remote_summary("".join(traceback.format_exception(info.value)))
    assert summary.startswith("first_jupyter.remote.inference.CallbackFailed: the stream's batch 0 could not reach "
                              "the gateway's callback http://127.0.0.1:")
    assert f"through the proxy http://127.0.0.1:{port}" in summary
    assert "carol" not in summary
    assert "Pa55word" not in summary


class _LosesAnAnswer(BaseHTTPRequestHandler):
    """The gateway's real callback hub behind a connection that is lost once after a batch was taken, before its
    answer went out (a proxy or server closing a kept-alive connection under it)."""

    protocol_version = "HTTP/1.1"
    hub: ClassVar[CallbackHub]
    lost: ClassVar[list[int]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        seq = self.headers["X-First-Seq"]
        status = self.hub.deliver(self.headers["X-First-Task"], seq, self.headers["X-First-Signature"], body)
        if seq == "1" and not self.lost:
            self.lost.append(status)
            self.close_connection = True  # taken, and the answer lost with the connection
            return
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


async def test_a_batch_whose_answer_was_lost_is_sent_again_and_taken_once():
    hub = CallbackHub()
    stream = hub.open()
    _LosesAnAnswer.hub, _LosesAnAnswer.lost = hub, []
    with serving_http(_LosesAnAnswer) as url:
        sender = StreamCallback(f"{url}{CALLBACK_PATH}", stream.task_id, stream.key)
        try:
            for message in ({"data": "a"}, {"data": "b"}, {"data": "c"}, {"done": True}):
                await asyncio.to_thread(sender.post, message)
        finally:
            sender.close()
    assert _LosesAnAnswer.lost == [204]  # batch 1 was taken the first time
    assert [chunk async for chunk in stream.chunks(GUARD_S)] == [b"a", b"b", b"c"]  # once each, in order
    assert (hub.accepted, hub.refused, sender.seq) == (4, 1, 4)  # the repeat was answered 409, and taken as sent


# -- through a real proxy (tinyproxy) and a site CA (trustme) -------------------------------------------------------


def _port(url: str) -> int:
    return int(url.split("/")[2].rsplit(":", 1)[1])


def test_a_loopback_callback_never_reaches_the_proxy(engine, callback, tinyproxy: Callable[..., Tinyproxy],
                                                     monkeypatch):
    proxy = tinyproxy()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    summary = stream_engine(engine.port, "chat/completions", CHAT, callback, TASK, KEY)
    assert summary["status"] == 200
    assert _Gateway.received[-1][1] == {"done": True}
    assert proxy.requests() == []  # each batch was answered directly: a proxied one is logged before it is sent on


def test_an_http_callback_goes_through_the_proxy_in_absolute_form_with_its_credentials(
        callback, tinyproxy: Callable[..., Tinyproxy], monkeypatch):
    proxy = tinyproxy(basic_auth=("site-user", "site-pass"))
    monkeypatch.setenv("http_proxy", proxy.authenticated_url)
    sender = StreamCallback(callback, TASK, KEY, direct_loopback=False)  # tinyproxy closes its client connection
    # after each answer, so the second batch meets a closed kept-alive connection and is sent on a new one
    try:
        sender.post({"data": "data: {}\n\n"})
        sender.post({"done": True})
    finally:
        sender.close()
    assert [seq for seq, _ in _Gateway.received] == [0, 1]  # signed and in order, through the proxy
    assert proxy.requests() == [f"POST http://127.0.0.1:{_port(callback)}/first/api/callback HTTP/1.1"] * 2


def test_an_https_callback_is_tunnelled_and_verified_with_the_sites_ca(
        tls_callback, tls_certs: TlsCerts, tinyproxy: Callable[..., Tinyproxy], monkeypatch):
    proxy = tinyproxy(basic_auth=("site-user", "site-pass"))
    monkeypatch.setenv("HTTPS_PROXY", proxy.authenticated_url)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_certs.ca))
    sender = StreamCallback(tls_callback, TASK, KEY, direct_loopback=False)
    try:
        sender.post({"data": "data: {}\n\n"})
        sender.post({"done": True})
    finally:
        sender.close()
    assert [seq for seq, _ in _Gateway.received] == [0, 1]
    assert proxy.requests() == [f"CONNECT 127.0.0.1:{_port(tls_callback)} HTTP/1.0"]  # one tunnel, kept alive


def test_no_proxy_sends_a_callback_directly_as_curl_would(callback, tinyproxy: Callable[..., Tinyproxy],
                                                          monkeypatch):
    proxy = tinyproxy()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "10.0.0.0/8, 127.0.0.0/8")
    sender = StreamCallback(callback, TASK, KEY, direct_loopback=False)
    try:
        assert sender.proxy is None
        sender.post({"done": True})
    finally:
        sender.close()
    assert _Gateway.received == [(0, {"done": True})]
    assert proxy.requests() == []


def test_a_tls_callback_trusts_the_ca_that_requests_ca_bundle_names(engine, tls_callback, tls_certs: TlsCerts,
                                                                    monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_certs.ca))
    summary = stream_engine(engine.port, "chat/completions", CHAT, tls_callback, TASK, KEY)
    assert summary["status"] == 200
    assert _Gateway.received[-1][1] == {"done": True}


def test_a_tls_callback_without_the_sites_ca_fails_saying_which_variable_to_set(engine, tls_callback,
                                                                               tls_certs: TlsCerts, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_certs.other_ca))
    with pytest.raises(CallbackFailed, match="SSLCertVerificationError") as info:
        stream_engine(engine.port, "chat/completions", CHAT, tls_callback, TASK, KEY)
    assert "set SSL_CERT_FILE or REQUESTS_CA_BUNDLE on the node" in str(info.value)
    assert _Gateway.received == []


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_that_refuses_the_callback_is_named_in_the_tasks_error(scheme, callback, tls_callback,
                                                                        tls_certs: TlsCerts,
                                                                        tinyproxy: Callable[..., Tinyproxy],
                                                                        monkeypatch):
    proxy = tinyproxy(basic_auth=("site-user", "site-pass"), refusing=True)
    monkeypatch.setenv(f"{scheme}_proxy", proxy.authenticated_url)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_certs.ca))
    url = tls_callback if scheme == "https" else callback
    sender = StreamCallback(url, TASK, KEY, direct_loopback=False)
    with pytest.raises(CallbackFailed) as info:
        sender.post({"done": True})
    sender.close()
    message = str(info.value)
    assert f"through the proxy {proxy.url} (the node's {scheme.upper()}_PROXY" in message
    if scheme == "https":
        assert "Tunnel connection failed: 403 Filtered" in message
    else:  # tinyproxy answers 403 and closes without reading the POST's body, so the node may see the reset first
        assert re.search(r"HTTP 403 from|ConnectionResetError", message), message
    assert "site-pass" not in message
    assert "site-user" not in message
    assert _Gateway.received == []
    assert len(proxy.requests()) == 1


def test_wrong_proxy_credentials_are_reported_without_them(tls_callback, tls_certs: TlsCerts,
                                                          tinyproxy: Callable[..., Tinyproxy], monkeypatch):
    proxy = tinyproxy(basic_auth=("site-user", "site-pass"))
    monkeypatch.setenv("HTTPS_PROXY", proxy.url.replace("//", "//site-user:not-the-pass@"))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_certs.ca))
    sender = StreamCallback(tls_callback, TASK, KEY, direct_loopback=False)
    with pytest.raises(CallbackFailed, match="Tunnel connection failed: 401") as info:
        sender.post({"done": True})
    sender.close()
    assert f"through the proxy {proxy.url}" in str(info.value)
    assert "not-the-pass" not in str(info.value)
    assert _Gateway.received == []
