"""The fake upstream's gate, which lets a test set the pace of the work it watches instead of hoping the machine is
slow enough to catch it under way (the sidebar's batch-progress test, for one): a closed gate holds inference
requests, a release lets exactly that many through in arrival order, and the model list is never held. And its https,
for tests of the gateway's TLS: a real handshake with the test CA's certificate, client certificates required when
asked."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bench.fake_upstream import FakeUpstream
from bench.overhead import FAKE_UPSTREAM
from bench.site_network import TlsCerts
from tests.waiting import eventually_async

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@contextlib.asynccontextmanager
async def serving() -> AsyncIterator[tuple[FakeUpstream, aiohttp.ClientSession]]:
    """A fake upstream on this test's loop, and a client session for it."""
    server = FakeUpstream(chunks=2)
    await server.start()
    try:
        async with aiohttp.ClientSession(server.url) as http:
            yield server, http
    finally:
        await server.stop()


async def test_a_closed_gate_holds_requests_until_each_is_released() -> None:
    async with serving() as (upstream, http):
        gate = await http.post("/gate", json={"hold": True})
        assert await gate.json() == {"held": 0, "passes": 0}

        async def chat(i: int) -> int:
            async with http.post("/v1/chat/completions", json=CHAT) as answer:
                await answer.read()
                answered.append(i)
                return answer.status

        answered: list[int] = []
        calls = []
        for i in range(5):
            calls.append(asyncio.ensure_future(chat(i)))
            # one at a time, so that the arrival order is known
            await eventually_async(lambda n=i: upstream.held == n + 1, f"request {i} held")
        models = await http.get("/v1/models")  # the gateway's status readings never wait at the gate
        assert models.status == 200
        assert answered == []

        released = await (await http.post("/gate", json={"release": 2})).json()
        assert released == {"held": 3, "passes": 0}
        await eventually_async(lambda: len(answered) == 2, "two answered")
        assert sorted(answered) == [0, 1]
        assert upstream.held == 3

        stats = await (await http.get("/stats")).json()
        assert (stats["held"], stats["active"]) == (3, 3)

        opened = await http.post("/gate", json={"open": True})
        assert await opened.json() == {"held": 0, "passes": None}
        assert await asyncio.gather(*calls) == [200] * 5
        late = await http.post("/v1/chat/completions", json=CHAT)  # an open gate holds nothing
        assert late.status == 200


async def test_passes_given_ahead_go_to_the_next_requests_and_a_client_that_leaves_takes_none() -> None:
    async with serving() as (upstream, http):
        await http.post("/gate", json={"hold": True})
        await http.post("/gate", json={"release": 1})
        first = await http.post("/v1/chat/completions", json=CHAT)  # the pass was waiting for it
        assert first.status == 200

        leaving = asyncio.ensure_future(http.post("/v1/chat/completions", json=CHAT))
        await eventually_async(lambda: upstream.held == 1, "held")
        leaving.cancel()
        await eventually_async(lambda: upstream.held == 0, "its client gone")
        await http.post("/gate", json={"release": 1})
        kept = await http.post("/v1/chat/completions", json=CHAT)  # the pass the leaver did not take
        assert kept.status == 200


async def test_a_gate_command_it_cannot_read_is_a_400_that_says_what_to_send() -> None:
    async with serving() as (_, http):
        for body in ({"release": -1}, {"release": True}, {"close": 1}, "hold"):
            answer = await http.post("/gate", json=body)
            assert answer.status == 400
            assert '{"release": N}' in (await answer.json())["error"]["message"]
        wrong = await http.get("/gate")
        assert wrong.status == 405
        assert (await http.post("/v1/chat/completions", json=CHAT)).status == 200  # still open


# -- https: the fake as an engine behind a site's TLS, with and without client certificates --------------------


def _trusting(certs: TlsCerts, ca: Path | None = None, client: bool = False) -> ssl.SSLContext:
    """A client context that trusts ``ca`` (the test CA unless given), presenting the test client certificate
    when ``client``."""
    context = ssl.create_default_context(cafile=str(ca or certs.ca))
    if client:
        context.load_cert_chain(certs.client_chain, certs.client_key)
    return context


async def test_https_answers_a_client_that_trusts_its_ca_and_no_other(tls_certs) -> None:
    upstream = FakeUpstream(chunks=2, certfile=tls_certs.server_chain, keyfile=tls_certs.server_key)
    await upstream.start()
    try:
        assert upstream.url == f"https://127.0.0.1:{upstream.port}"
        async with aiohttp.ClientSession(upstream.url) as http:
            answer = await http.post("/v1/chat/completions", json=CHAT, ssl=_trusting(tls_certs))
            assert answer.status == 200
            assert (await answer.json())["choices"][0]["message"]["content"] == "tok0 tok1 "
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await http.get("/v1/models", ssl=_trusting(tls_certs, tls_certs.other_ca))
        assert upstream.requests == 1
    finally:
        await upstream.stop()


async def test_with_a_client_ca_only_a_client_certificate_from_it_is_answered(tls_certs) -> None:
    upstream = FakeUpstream(chunks=2, certfile=tls_certs.server_pem, client_ca=tls_certs.ca)
    await upstream.start()
    try:
        async with aiohttp.ClientSession(upstream.url) as http:
            with pytest.raises(aiohttp.ClientError):  # the handshake, or the first read after it, is refused
                await (await http.get("/v1/models", ssl=_trusting(tls_certs))).read()
            answer = await http.get("/v1/models", ssl=_trusting(tls_certs, client=True))
            assert answer.status == 200
            assert [m["id"] for m in (await answer.json())["data"]] == ["fake-model"]
        assert upstream.requests == 1
    finally:
        await upstream.stop()


def test_tls_options_without_a_certificate_are_refused() -> None:
    with pytest.raises(ValueError, match="need a certfile"):
        FakeUpstream(client_ca="ca.pem")


def test_the_command_serves_https_and_asks_for_client_certificates(tls_certs) -> None:
    """``python bench/fake_upstream.py --certfile ... --client-ca ...``, as benchmarks and separate processes start
    it: the READY line names the https URL."""
    fake = subprocess.Popen([sys.executable, str(FAKE_UPSTREAM), "--port", "0", "--certfile",
                             str(tls_certs.server_chain), "--keyfile", str(tls_certs.server_key), "--client-ca",
                             str(tls_certs.ca)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        ready = fake.stdout.readline()  # blocks until the fake has bound its port (or exits: then '')
        assert ready.startswith("READY https://127.0.0.1:"), fake.stderr.read() if fake.stderr else ready
        port = int(ready.rsplit(":", 1)[1])
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=30,
                                                 context=_trusting(tls_certs, client=True))
        try:
            connection.request("GET", "/health")
            assert connection.getresponse().status == 200
        finally:
            connection.close()
    finally:
        fake.terminate()
        fake.wait(timeout=30)
    refused = subprocess.run([sys.executable, str(FAKE_UPSTREAM), "--client-ca", str(tls_certs.ca)],
                             capture_output=True, text=True, check=False)
    assert refused.returncode == 2
    assert "need a certfile" in refused.stderr
