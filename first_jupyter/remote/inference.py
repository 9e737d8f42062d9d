"""Functions that run on an endpoint's node, next to its engine: a request, a health probe, a relayed stream.

They travel to the node through Globus Compute (the SDK pickles them by reference, so the node imports this module
from its own first-jupyter) and import nothing but the standard library and first-jupyter's own stdlib-only
modules, so the node needs no more than first-jupyter itself. Each returns plain data (dicts of str, int, float)
so that the result serializes anywhere. Streams come back to the gateway as signed batches POSTed to its callback
route: one per ``batch_bytes`` of events or ``batch_s`` of time, whichever comes first, so a fast engine does not
make one HTTP request per token and a slow one still shows its first token at once.

Compute nodes often reach the gateway only through the site's HTTP proxy and trust the site's own CA, so the
callback honours ``HTTP(S)_PROXY``/``NO_PROXY`` as curl reads them and the node's trust variables
(``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``...), except that a loopback callback (the in-process endpoint's, to a
gateway on the same host) always goes directly.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import re
import ssl
import time
import urllib.parse
from typing import Any

from first_jupyter.transport.proxies import Proxy, ProxyError, from_environment, is_loopback
from first_jupyter.transport.tls import client_context

ENGINE_HOST = "127.0.0.1"
REQUEST_TIMEOUT_S = 600.0
HEALTH_TIMEOUT_S = 5.0
CALLBACK_TIMEOUT_S = 30.0
RESULT_LIMIT_BYTES = 10 * 1024 * 1024 - 64 * 1024
"""Globus Compute refuses a task result over 10 MiB; this leaves room for the result's own envelope."""
_FINISHED = re.compile(rb'"finish_reason":\s*"')
"""An event that ends a choice: a stream without one (or ``[DONE]``) was cut short."""


def sign(key: str, task_id: str, seq: int, body: bytes) -> str:
    """The signature of one callback POST: HMAC-SHA256 under the task's own key (no secret shared across tasks),
    over the task, the batch's place in the stream and its bytes, so a batch cannot be replayed or reordered."""
    message = f"{task_id}\n{seq}\n".encode() + body
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def _too_large(size: int) -> dict[str, Any]:
    """The answer to send instead of a result Globus Compute would refuse (an OpenAI error, status 413)."""
    message = (f"The answer is {size / 2**20:.1f} MiB, more than a Globus Compute task may return "
               f"({RESULT_LIMIT_BYTES / 2**20:.1f} MiB). Ask for fewer tokens or inputs, or stream it.")
    return {"status": 413, "body": json.dumps({"error": {"message": message, "type": "invalid_request_error",
                                                         "param": None, "code": "result_too_large"}})}


def call_engine(port: int, route: str, body: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """POST an OpenAI request to the engine on this node; its status, answer (text) and how long it took."""
    started = time.time()
    conn = http.client.HTTPConnection(ENGINE_HOST, port, timeout=timeout)
    try:
        conn.request("POST", f"/v1/{route}", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        if len(raw) > RESULT_LIMIT_BYTES:
            return {**_too_large(len(raw)), "started": started, "elapsed_s": time.time() - started}
        return {"status": response.status, "body": raw.decode("utf-8", "replace"), "started": started,
                "elapsed_s": time.time() - started}
    finally:
        conn.close()


def _get(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(ENGINE_HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def engine_health(port: int, timeout: float = HEALTH_TIMEOUT_S) -> dict[str, Any]:
    """Whether the engine answers (``/health``, which vLLM and ``transformers serve`` both have), and the models
    it lists when its ``/v1/models`` answers (``transformers serve`` fails that route offline)."""
    started = time.time()
    try:
        status, _ = _get(port, "/health", timeout)
    except OSError as exc:
        return {"healthy": False, "status": None, "models": [], "error": f"{type(exc).__name__}: {exc}",
                "elapsed_s": time.time() - started}
    models: list[str] = []
    try:
        listed_status, body = _get(port, "/v1/models", timeout)
        data = json.loads(body) if listed_status == 200 else {}
        models = [m.get("id") for m in data.get("data", [])] if isinstance(data, dict) else []
    except (OSError, ValueError):
        pass  # the list is a detail; health is the answer
    return {"healthy": status == 200, "status": status, "models": models, "elapsed_s": time.time() - started}


class _ResultTooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


STALE_CONNECTION = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)
"""How a kept-alive connection that the other end closed fails when it is next used (``http.client``'s
``RemoteDisconnected``, a closed connection without an answer, is a ``ConnectionResetError``)."""
ALREADY_TAKEN = 409
"""The gateway's answer to a batch whose sequence number it has already taken."""


class CallbackFailed(RuntimeError):
    """The gateway's callback route could not be reached, or refused a batch. The stream cannot go on and there is
    no other way to tell the gateway, so the task fails with this; its message is the last line of the task's
    traceback, which is what the gateway answers its client with, so it names the callback and any proxy (never
    the proxy's credentials) and says what to check."""


class StreamCallback:
    """Signed batches POSTed to the gateway's callback URL, in order, on one keep-alive connection: direct, or
    through the node's HTTP proxy (a CONNECT tunnel for https, an absolute-form request for http), with TLS that
    trusts the system store plus the node's ``SSL_CERT_FILE``/``SSL_CERT_DIR``/``REQUESTS_CA_BUNDLE``."""

    def __init__(self, url: str, task_id: str, key: str, *, direct_loopback: bool = True) -> None:
        """``direct_loopback``: a loopback callback goes directly (always, in production); off, the environment's
        proxy applies to it too, which only tests need: they reach nothing but loopback, and must see the proxy."""
        parts = urllib.parse.urlsplit(url)
        https = parts.scheme == "https"
        host = parts.hostname or ENGINE_HOST
        port = parts.port or (443 if https else 80)
        netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._scheme = parts.scheme
        self.where = f"{parts.scheme}://{netloc}{parts.path}"
        """The callback as errors name it: without any credentials the URL might carry."""
        try:
            self.proxy: Proxy | None = None if direct_loopback and is_loopback(host) else from_environment(
                parts.scheme, host, port)
        except ProxyError as exc:
            raise CallbackFailed(f"the stream's callback to {self.where} cannot use the node's proxy setting: "
                                 f"{exc}") from None
        self._headers: dict[str, str] = {}
        self._target = path
        context = client_context() if https else None
        if self.proxy is None:
            self._conn: http.client.HTTPConnection = (
                http.client.HTTPSConnection(host, port, timeout=CALLBACK_TIMEOUT_S, context=context) if https
                else http.client.HTTPConnection(host, port, timeout=CALLBACK_TIMEOUT_S))
        elif https:  # TLS end to end with the gateway, inside a tunnel the proxy opens with CONNECT
            self._conn = http.client.HTTPSConnection(self.proxy.host, self.proxy.port, timeout=CALLBACK_TIMEOUT_S,
                                                     context=context)
            tunnel = {"Proxy-Authorization": self.proxy.authorization} if self.proxy.authorization else None
            self._conn.set_tunnel(host, port, headers=tunnel)
        else:  # plain http: the proxy forwards each request, named by its absolute URL
            self._conn = http.client.HTTPConnection(self.proxy.host, self.proxy.port, timeout=CALLBACK_TIMEOUT_S)
            self._target = f"http://{netloc}{path}"
            if self.proxy.authorization:
                self._headers["Proxy-Authorization"] = self.proxy.authorization
        self._task_id = task_id
        self._key = key
        self.seq = 0

    def _via(self) -> str:
        """Which proxy the batch went through, and where that came from, for the error (without credentials)."""
        if self.proxy is None:
            return ""
        return (f" through the proxy {self.proxy.display} (the node's {self._scheme.upper()}_PROXY or ALL_PROXY; "
                f"list the gateway's host in NO_PROXY to go directly)")

    def post(self, message: dict[str, Any]) -> None:
        """Send one batch. A kept-alive connection that the other end has closed meanwhile (proxies close theirs
        after each request, servers after an idle while) is met only when it is used, so a batch that finds it
        closed is sent once more on a new one. That cannot deliver it twice: the gateway takes each sequence
        number once and answers a repeat 409, which on the second try means the first got through."""
        body = json.dumps(message).encode()
        headers = {**self._headers, "Content-Type": "application/json", "X-First-Task": self._task_id,
                   "X-First-Seq": str(self.seq), "X-First-Signature": sign(self._key, self._task_id, self.seq, body)}
        again = False
        while True:
            reused = self._conn.sock is not None
            try:
                self._conn.request("POST", self._target, body=body, headers=headers)
                response = self._conn.getresponse()
                response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                self._conn.close()
                if reused and not again and isinstance(exc, STALE_CONNECTION):
                    again = True
                    continue
                hint = (" (set SSL_CERT_FILE or REQUESTS_CA_BUNDLE on the node to the CA that signed the gateway's "
                        "certificate)" if isinstance(exc, ssl.SSLCertVerificationError) else "")
                raise CallbackFailed(f"the stream's batch {self.seq} could not reach the gateway's callback "
                                     f"{self.where}{self._via()}: {type(exc).__name__}: {exc}{hint}") from exc
        if response.status >= 400 and not (again and response.status == ALREADY_TAKEN):
            raise CallbackFailed(f"the gateway refused the stream's batch {self.seq}: HTTP {response.status} from "
                                 f"{self.where}{self._via()}")
        self.seq += 1

    def close(self) -> None:
        self._conn.close()


def stream_engine(port: int, route: str, body: dict[str, Any], callback_url: str | None, task_id: str, key: str,
                  batch_bytes: int = 16384, batch_s: float = 0.05,
                  timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """Stream from the engine and send the events back in signed batches; a summary of what was sent.

    Without a callback URL (a cluster the gateway cannot be reached from) the whole stream comes back in the
    result instead, as one final chunk. A failure after the first byte is sent as an ``error`` message, so the
    gateway ends its client's stream with an error event rather than waiting for an idle timeout.
    """
    started = time.time()
    engine = http.client.HTTPConnection(ENGINE_HOST, port, timeout=timeout)
    callback = StreamCallback(callback_url, task_id, key) if callback_url else None
    pending: list[bytes] = []
    kept: list[bytes] = []
    size = sent = 0
    flushed = time.monotonic() - batch_s  # the first event goes at once: the time to first token is what users see

    def flush() -> None:
        nonlocal size, sent, flushed
        if pending:
            data = b"".join(pending)
            if callback is not None:
                callback.post({"data": data.decode("utf-8", "replace")})
            elif sent + len(data) > RESULT_LIMIT_BYTES:  # the whole stream would come back as one result
                raise _ResultTooLarge(sent + len(data))
            else:
                kept.append(data)
            sent += len(data)
            pending.clear()
            size = 0
        flushed = time.monotonic()

    try:
        engine.request("POST", f"/v1/{route}", body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        response = engine.getresponse()
        if response.status >= 400:
            return {"status": response.status, "body": response.read().decode("utf-8", "replace"),
                    "elapsed_s": time.time() - started}
        finished = False
        while line := response.readline():
            pending.append(line)
            size += len(line)
            finished = finished or line.startswith(b"data: [DONE]") or _FINISHED.search(line) is not None
            if line == b"\n" and (size >= batch_bytes or time.monotonic() - flushed >= batch_s):
                flush()  # only at an event's end: a batch never cuts an event in two
        flush()
        if not finished:  # the connection ended (http.client reads that as a clean end) before the answer did
            raise ConnectionError("the engine closed the stream before its last event")
        if callback is not None:
            callback.post({"done": True})
        return {"status": response.status, "bytes": sent, "batches": callback.seq if callback else 0,
                "body": b"".join(kept).decode("utf-8", "replace") if callback is None else None,
                "elapsed_s": time.time() - started}
    except _ResultTooLarge as exc:
        return {**_too_large(exc.size), "elapsed_s": time.time() - started}
    except (OSError, http.client.HTTPException) as exc:
        if callback is not None:
            callback.post({"error": f"the engine's stream broke off on the node: {type(exc).__name__}: {exc}"})
        raise
    finally:
        engine.close()
        if callback is not None:
            callback.close()
