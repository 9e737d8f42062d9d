"""A client that leaves while Jupyter's door is still authenticating its request (``prepare``, which may ask a hub
over HTTP) starts no work: its request never reaches the gateway, let alone an engine.

A real Jupyter server whose identity provider takes its time (the test lets each sign-in go on), and the fake
upstream, its answers held at its gate, which counts every request that reaches it.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
from jupyter_server.auth.identity import IdentityProvider, User
from tornado import web

from bench.fake_upstream import FakeUpstream
from tests.conftest import fake_cluster_config, gate, server_config
from tests.waiting import eventually_async


class SlowSignIn(IdentityProvider):
    """Jupyter's own identity provider, which waits in ``get_user`` (listing the handler) until ``go_on`` is set."""

    signing_in: ClassVar[list[web.RequestHandler]] = []
    go_on: ClassVar[asyncio.Event]

    async def get_user(self, handler: web.RequestHandler) -> User | None:  # type: ignore[override]
        type(self).signing_in.append(handler)
        await type(self).go_on.wait()
        user = super().get_user(handler)
        return await user if inspect.isawaitable(user) else user


@pytest.fixture
def jp_server_config(fake_upstream, write_config, tmp_path: Path):
    gate(fake_upstream, hold=True)
    config = server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "data")
    config["ServerApp"]["identity_provider_class"] = SlowSignIn
    return config


def _asked(upstream: FakeUpstream) -> int:
    """Requests for an answer that reached the engine (the gateway reads its model list meanwhile)."""
    return upstream.by_route["/v1/chat/completions"]


async def test_a_client_that_leaves_while_it_is_signed_in_starts_no_work(first_ext, jp_auth_header, fake_upstream):
    SlowSignIn.signing_in, SlowSignIn.go_on = [], asyncio.Event()
    port = first_ext.serverapp.port
    path = f"{first_ext.serverapp.base_url}first/v1/chat/completions"
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}).encode()
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: "
                 f"{jp_auth_header['Authorization']}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    await eventually_async(lambda: len(SlowSignIn.signing_in) == 1, "the request is being signed in")
    handler: Any = SlowSignIn.signing_in[0]
    writer.close()  # the client leaves
    await eventually_async(handler.client_left, "the server can see it gone")
    SlowSignIn.go_on.set()
    # the handler is done with it: finished (a request that went on would wait for the held engine), abandoned by
    # the door, or never given its body by tornado (which then never runs the method: the body future failed)
    body = handler.request._body_future
    await eventually_async(lambda: handler._finished or handler.abandoned or _asked(fake_upstream) or (
        body.done() and body.exception() is not None), "the handler is done with the request")
    assert _asked(fake_upstream) == 0
    assert handler.current_user is not None  # signed in all the same: the request was refused for no lack of it
    assert first_ext.gateway.usage.query("SELECT COUNT(*) FROM usage") == [(0,)]
