"""A stand-in for an existing FIRST inference gateway (ALCF's shape) on loopback, for the ``first`` backend's tests.

It answers what that gateway answers: ``{root}/list-endpoints`` (clusters, frameworks, models, routes),
``{root}/{cluster}/jobs`` (running and queued jobs with the models they serve) and the OpenAI routes under
``{root}/{cluster}/{framework}/v1/...`` with their trailing slash, each only with the expected bearer token.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.conftest import send_json, serving_http

ROOT = "/resource_server"
TOKEN = "AT-first-gateway"
ROUTES = {"chat": "/{framework}/v1/chat/completions/", "completion": "/{framework}/v1/completions/",
          "embedding": "/{framework}/v1/embeddings/"}


@dataclass
class FakeFirstGateway:
    """What the fake serves, changeable while it runs, and what it was asked."""

    served: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """cluster → framework → models."""
    jobs: dict[str, dict[str, list[dict[str, str]]]] = field(default_factory=dict)
    """cluster → ``{"running": [...], "queued": [...]}``; a cluster missing here answers its jobs route 500."""
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, path, Authorization header) of every request."""
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def catalog(self) -> dict[str, Any]:
        return {"clusters": {cluster: {
            "base_url": f"{ROOT}/{cluster}",
            "frameworks": {fw: {"models": models, "endpoints": {k: v.format(framework=fw) for k, v in ROUTES.items()}}
                           for fw, models in frameworks.items()}} for cluster, frameworks in self.served.items()}}

    def paths(self, method: str) -> list[str]:
        with self.lock:
            return [path for m, path, _ in self.calls if m == method]


def job(cluster: str, framework: str, models: str, status: str = "running") -> dict[str, str]:
    """A job entry as the gateway's jobs route lists it (PBS job id, comma-separated models)."""
    return {"Job ID": "4242.sophia-pbs-01", "Cluster": cluster, "Framework": framework, "Models Served": models,
            "Model Status": status, "Nodes Reserved": "1", "Host Name": "sophia-gpu-07"}


def _handler(state: FakeFirstGateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, data: Any) -> None:
            send_json(self, data, status)

        def _authorized(self, method: str) -> bool:
            auth = self.headers.get("Authorization")
            with state.lock:
                state.calls.append((method, self.path, auth))
            if auth != f"Bearer {TOKEN}":
                self._send(401, {"error": "Unauthorized: invalid or expired Globus token"})
                return False
            return True

        def do_GET(self) -> None:
            if not self._authorized("GET"):
                return
            parts = self.path.removeprefix(ROOT).strip("/").split("/")
            if parts == ["list-endpoints"]:
                self._send(200, state.catalog())
            elif len(parts) == 2 and parts[1] == "jobs" and parts[0] in state.jobs:
                self._send(200, state.jobs[parts[0]])
            else:
                self._send(500, {"error": "qstat failed on the login node"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self._authorized("POST"):
                return
            cluster, framework = self.path.removeprefix(ROOT).strip("/").split("/")[:2]
            if body.get("model") not in state.served.get(cluster, {}).get(framework, []):
                self._send(404, {"error": f"model {body.get('model')} is not served on {cluster}/{framework}"})
                return
            text = f"from {cluster}/{framework}"
            if not body.get("stream"):
                self._send(200, {"id": "c1", "object": "chat.completion", "model": body["model"], "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for word, finish in ((text.split()[0], None), (" " + text.split()[1], "stop")):
                event = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.close_connection = True

    return Handler


@contextmanager
def serving_first_gateway(state: FakeFirstGateway) -> Iterator[FakeFirstGateway]:
    with serving_http(_handler(state)) as url:
        state.url = url + ROOT
        yield state
