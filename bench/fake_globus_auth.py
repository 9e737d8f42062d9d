"""A loopback stand-in for Globus Auth's token introspection, for tests and benchmarks that run ``first serve`` as
separate processes (where ``responses`` cannot reach). The gateway's real globus-sdk is pointed here with
``GLOBUS_SDK_SERVICE_URL_AUTH``.

A token ``AT-<name>`` introspects as an active token of ``<name>@uni.edu`` for the gateway's client and scope;
``AT-inactive-...`` as inactive. Every introspection is counted, so callers can check the gateway's cache.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

AUTH_URL_ENV = "GLOBUS_SDK_SERVICE_URL_AUTH"


class FakeGlobusAuth(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, client_id: str) -> None:
        super().__init__(("127.0.0.1", 0), _Introspect)
        self.client_id = client_id
        self.introspections = 0
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def answer(self, token: str) -> dict[str, object]:
        with self._lock:
            self.introspections += 1
        if not token.startswith("AT-") or token.startswith("AT-inactive"):
            return {"active": False}
        name = token.removeprefix("AT-")
        sub = str(uuid.uuid5(uuid.NAMESPACE_URL, name))
        now = int(time.time())
        return {"active": True, "sub": sub, "username": f"{name}@uni.edu", "aud": [self.client_id],
                "scope": f"https://auth.globus.org/scopes/{self.client_id}/action_all", "exp": now + 3600, "iat": now,
                "client_id": str(uuid.uuid5(uuid.NAMESPACE_URL, "app")),
                "session_info": {"authentications": {sub: {"idp": "uni"}}},
                "identity_set_detail": [{"id": sub, "username": f"{name}@uni.edu"}]}


class _Introspect(BaseHTTPRequestHandler):
    server: FakeGlobusAuth

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        if self.path.rstrip("/") != "/v2/oauth2/token/introspect":
            self.send_error(404)
            return
        token = dict(urllib.parse.parse_qsl(body)).get("token", "")
        payload = json.dumps(self.server.answer(token)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *_args: object) -> None:
        """Quiet: benchmarks print their own figures."""


@contextmanager
def fake_globus_auth(client_id: str) -> Iterator[FakeGlobusAuth]:
    server = FakeGlobusAuth(client_id)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
