"""A stand-in for an existing FIRST inference gateway on loopback, for the ``first`` backend's tests.

It follows ALCF's gateway as of argonne-lcf/FIRST commit 329c0cd (2026-08-21); each shape names the file of
``resource_server_async/`` it follows, so the next change upstream is easy to find. It answers
``{root}/list-endpoints``, ``{root}/{cluster}/jobs`` and the OpenAI routes ``{root}/{cluster}/{framework}/v1/...``
(``views/openai.py``), each only with the expected bearer token, and can be told to fail as FIRST does: an
account refused with a 401, a 408 after its own wait, a cluster under maintenance, nginx's 429, a failure
inside a 200 stream, or an answer in a shape nobody knows.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from tests.conftest import send_json, serving_http

ROOT = "/resource_server"
TOKEN = "AT-first-gateway"
OPENAI_ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages"]
"""What ``services.get_list_endpoints_data`` lists per framework: ``/v1/{e}`` for the cluster's openai_endpoints,
without the framework; here every route FIRST has a view for (``views/openai.py``, ``views/anthropic.py``)."""
GROUP_DENIAL = "Permission denied due to Globus Group restrictions."
"""``auth.check_permission``'s message, sent with a 401 (``errors.Unauthorized``) though the token is good."""
EXPIRED = "Access token expired."
"""``auth.validate_access_token``'s message for an expired token, with a 401."""
FAULTS = ("timeout", "in-band", "in-band-400", "maintenance", "nginx-429")
"""What a model can be told to do instead of answering (``FakeFirstGateway.faults``)."""


def app_error(code: str, message: str) -> dict[str, Any]:
    """An application error as FIRST's ``api.handle_app_error`` sends it (codes from ``errors.py``)."""
    return {"error": {"code": code, "message": message, "info": {}}}


def in_band_error(message: str, code: int) -> dict[str, Any]:
    """A failure reported inside a 200 stream, as ``endpoints/globus_compute.py`` (no data after 30 s: code 504)
    and ``streaming.py`` (the engine's own error, passed through) send it, before ``data: [DONE]``."""
    return {"object": "error", "message": message, "type": "StreamingTimeoutError", "param": None, "code": code}


def job(cluster: str, framework: str, models: str, status: str = "running") -> dict[str, str]:
    """A job entry as ``clusters/globus_compute.py`` lists it (``schemas/clusters.py`` JobInfo: ``Models`` is
    comma-separated; a running job's ``Model Status`` is running, starting or disconnected)."""
    return {"Job ID": "4242.sophia-pbs-01", "Cluster": cluster, "Framework": framework, "Models": models,
            "Model Status": status, "Nodes Reserved": "1", "Host Name": "sophia-gpu-07"}


def jobs(running: list[dict[str, str]] | None = None, queued: list[dict[str, str]] | None = None,
         stopped: list[dict[str, str]] | None = None, cluster_status: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``GET /{cluster}/jobs`` answer (``schemas/clusters.py`` JobsByStatus; ``cluster_status`` as a cluster's
    adapter in ``clusters/*.py`` fills it)."""
    return {"running": running or [], "queued": queued or [], "stopped": stopped or [], "others": [],
            "private_batch_running": [], "private_batch_queued": [], "cluster_status": cluster_status or {}}


@dataclass
class FakeFirstGateway:
    """What the fake serves, changeable while it runs, and what it was asked."""

    served: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    """cluster → framework → models."""
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    """cluster → its ``jobs(...)`` answer; a cluster missing here answers its jobs route 500
    (``errors.GetJobsError``)."""
    down: set[str] = field(default_factory=set)
    """Clusters under maintenance, as ``GET /status`` reports them."""
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    """model → what its endpoint's config publishes (``display_name``, ``description``, ``capabilities``, ...)."""
    answers: dict[str, Any] = field(default_factory=dict)
    """GET route under the root (``list-endpoints``) → a body served in place of the real one (a changed shape)."""
    faults: dict[str, str] = field(default_factory=dict)
    """model → one of ``FAULTS``, answered to every request for it."""
    texts: dict[str, str] = field(default_factory=dict)
    """model → its answer, streamed a word at a time (default: ``from {cluster}/{framework}``)."""
    token: str | None = TOKEN
    """The access token it accepts (a hub user's, for the sidebar behind a real hub: tests/hub/serve_for_ui.py);
    None: it asks for none, for the browser's notebook tests (tests/ui/first_stand_in.py), where a cell's display
    is tested and no Globus sign-in is at hand."""
    denial: str | None = None
    """A 401 message refusing the account (``GROUP_DENIAL``) for every request with the right token."""
    calls: list[tuple[str, str, str | None]] = field(default_factory=list)
    """(method, path, Authorization header) of every request."""
    held: dict[str, threading.Event] = field(default_factory=dict)
    """model → what its requests wait for before they are answered, as FIRST holds a request while the model's job
    queues and starts; set it to let them go."""
    abandoned: list[str] = field(default_factory=list)
    """The models of held requests whose client (the gateway) closed the connection while they waited."""
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def catalog(self) -> dict[str, Any]:
        """``GET /list-endpoints``: ``schemas/endpoints.py`` ListEndpointsResponse, built as ``services.py`` does."""
        return {"clusters": {cluster: {
            "base_url": f"{ROOT}/{cluster}",
            "frameworks": {fw: {"models": sorted(models), "endpoints": OPENAI_ENDPOINTS}
                           for fw, models in frameworks.items()}} for cluster, frameworks in self.served.items()}}

    def models(self, cluster: str) -> list[dict[str, Any]]:
        """``GET /{cluster}/models``: ``views/core.py`` get_models, each entry as ``endpoints/endpoint.py``
        build_model_details makes it (the public keys of the endpoint's config), sorted by model."""
        return [{"id": model, "object": "model", "cluster": cluster, "framework": fw, **self.details.get(model, {})}
                for fw, models in self.served.get(cluster, {}).items() for model in sorted(models, key=str.lower)]

    def paths(self, method: str) -> list[str]:
        with self.lock:
            return [path for m, path, _ in self.calls if m == method]


def _handler(state: FakeFirstGateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, data: Any) -> None:
            send_json(self, data, status)

        def _authorized(self, method: str) -> bool:
            """``api.GlobalAuth`` and ``auth.validate_access_token``: no header is django-ninja's own
            ``{"detail"}``; a bad token, or an account refused, is an ``unauthorized`` app error, both 401."""
            auth = self.headers.get("Authorization")
            with state.lock:
                state.calls.append((method, self.path, auth))
            if state.token is None:
                return True
            if auth is None:
                self._send(401, {"detail": "Unauthorized"})
            elif auth != f"Bearer {state.token}":
                self._send(401, app_error("unauthorized", EXPIRED))
            elif state.denial is not None:
                self._send(401, app_error("unauthorized", state.denial))
            else:
                return True
            return False

        def do_GET(self) -> None:
            if self.path == f"{ROOT}/status":  # views/core.py status_check: public, no authentication
                with state.lock:
                    state.calls.append(("GET", self.path, self.headers.get("Authorization")))
                self._send(200, {cluster: cluster not in state.down for cluster in state.served})
                return
            if not self._authorized("GET"):
                return
            route = self.path.removeprefix(ROOT).strip("/")
            parts = route.split("/")
            if route in state.answers:
                self._send(200, state.answers[route])
            elif parts == ["list-endpoints"]:
                self._send(200, state.catalog())
            elif len(parts) == 2 and parts[1] == "jobs" and parts[0] in state.jobs:
                self._send(200, state.jobs[parts[0]])
            elif len(parts) == 2 and parts[1] == "models" and parts[0] in state.served:
                self._send(200, state.models(parts[0]))
            else:
                self._send(500, app_error("failed_to_get_cluster_jobs", "qstat failed on the login node"))

        def _fault(self, fault: str) -> None:
            """A request for a model told to fail, answered as FIRST would."""
            if fault == "timeout":  # errors.RequestTimeout, after FIRST's own 300 s wait
                self._send(408, app_error("request_timeout", "Request timed out after 300 seconds."))
            elif fault == "maintenance":  # errors.ClusterUnderMaintenance
                self._send(503, app_error("cluster_under_maintenance", "Sophia is under maintenance."))
            elif fault == "nginx-429":  # nginx's limit_req in front of the gateway, not the app
                self._send(429, {"error": "Too Many Requests", "message": "Rate limit exceeded; slow down."})
            else:
                error = in_band_error("Streaming task timed out: No data received from compute endpoint after "
                                      "30 seconds.", 504) if fault == "in-band" else \
                    {**in_band_error("max_tokens must be at least 1", 400), "type": "BadRequestError"}
                self._events([error, "[DONE]"])

        def _released(self, release: threading.Event) -> bool:
            """Hold the request until ``release`` is set (True), or until its client closes the connection
            (False): a closed socket reads as readable and empty."""
            while not release.wait(0.05):
                readable, _, _ = select.select([self.connection], [], [], 0)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    return False
            return True

        def _events(self, events: list[Any]) -> None:
            """A 200 stream of server-sent events, closed at the end (``StreamingHttpResponse``)."""
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            for event in events:
                self.wfile.write(f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode())
            self.close_connection = True

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if not self._authorized("POST"):
                return
            cluster, framework = self.path.removeprefix(ROOT).strip("/").split("/")[:2]
            model = body.get("model")
            if model not in state.served.get(cluster, {}).get(framework, []):
                self._send(404, app_error("endpoint_not_found", f"{model} is not served on {cluster}/{framework}"))
                return
            if model in state.faults:
                self._fault(state.faults[model])
                return
            release = state.held.get(model)
            if release is not None and not self._released(release):
                with state.lock:
                    state.abandoned.append(model)
                return
            text = state.texts.get(model, f"from {cluster}/{framework}")
            if not body.get("stream"):
                self._send(200, {"id": "c1", "object": "chat.completion", "model": model, "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
                return
            words = re.findall(r"\s*\S+", text)  # each with the space before it: joined, the text again
            self._events([{"id": "c1", "object": "chat.completion.chunk", "model": model,
                           "choices": [{"index": 0, "delta": {"content": word},
                                        "finish_reason": "stop" if i == len(words) - 1 else None}]}
                          for i, word in enumerate(words)] + ["[DONE]"])

    return Handler


@contextmanager
def serving_first_gateway(state: FakeFirstGateway) -> Iterator[FakeFirstGateway]:
    with serving_http(_handler(state)) as url:
        state.url = url + ROOT
        yield state
