"""Functions that run on an endpoint's node, next to its engine: a request, a health probe, a relayed stream.

They travel to the node through Globus Compute (the SDK pickles them by reference, so the node imports this module
from its own first-jupyter) and import nothing but the standard library and first-jupyter's own stdlib-only
modules, so the node needs no more than first-jupyter itself. Each returns plain data (dicts of str, int, float)
so that the result serializes anywhere. Streams come back to the gateway as signed batches POSTed to its callback
route: one per ``batch_bytes`` of events or ``batch_s`` of time, whichever comes first, so a fast engine does not
make one HTTP request per token and a slow one still shows its first token at once. A request whose client left,
or that ran past its deadline, is stopped on the node too (``remote.leash``): through the same route, the gateway
refuses what a node sends about a task it has closed, and a node computing a plain answer asks it every second.

Compute nodes often reach the gateway only through the site's HTTP proxy and trust the site's own CA, so the
callback honours ``HTTP(S)_PROXY``/``NO_PROXY`` as curl reads them and the node's trust variables
(``SSL_CERT_FILE``, ``REQUESTS_CA_BUNDLE``...), except that a loopback callback (the in-process endpoint's, to a
gateway on the same host) always goes directly.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import http.client
import json
import re
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from first_jupyter.remote.leash import ALIVE_S, Leash
from first_jupyter.remote.plain_answer import PlainAnswer
from first_jupyter.transport.proxies import Proxy, ProxyError, from_environment, is_loopback
from first_jupyter.transport.tls import client_context

ENGINE_HOST = "127.0.0.1"
REQUEST_TIMEOUT_S = 600.0
HEALTH_TIMEOUT_S = 5.0
CALLBACK_TIMEOUT_S = 30.0
BATCH_BYTES, BATCH_S = 16384, 0.05
"""A stream's batch goes to the gateway once it holds this many bytes of events, or has waited this long."""
RESULT_LIMIT_BYTES = 10 * 1024 * 1024 - 64 * 1024
"""Globus Compute refuses a task result over 10 MiB; this leaves room for the result's own envelope."""
_FINISHED = re.compile(rb'"finish_reason":\s*"|"type":\s*"(?:response\.(?:completed|failed|incomplete)|message_stop|'
                       rb'transcript\.text\.done)"')
"""An event that ends an answer: a chat or completion choice's last, the Responses API's terminal event (its streams
have no ``[DONE]``), Anthropic's ``message_stop``, a transcript's end. A stream without one (or ``[DONE]``) was cut
short."""


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


def engine_path(path: str) -> str:
    """The engine's path for a request: ``path`` from the server's root (``/v1/chat/completions``, ``/tokenize``),
    or, as gateways before the root routes sent it, a route relative to ``/v1/`` (``chat/completions``): a node
    runs its own install of first-jupyter, which may be newer than the gateway's."""
    return path if path.startswith("/") else f"/v1/{path}"


def plain_request(port: int, path: str, body: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S,
                  leash: Leash | None = None) -> dict[str, Any]:
    """POST a request to the engine on this node as it is, at ``path`` (``engine_path``); its status, answer
    (text) and how long it took. ``leash``: what may end it early (the result then says why)."""
    started = time.time()
    conn = http.client.HTTPConnection(ENGINE_HOST, port, timeout=timeout)
    try:
        conn.request("POST", engine_path(path), body=json.dumps(body), headers={"Content-Type": "application/json"})
        try:
            with leash.holding(conn) if leash is not None else contextlib.nullcontext():
                response = conn.getresponse()
                raw = response.read()
        except (OSError, http.client.HTTPException):
            if leash is not None and leash.why is not None:
                return _ended(leash, started)
            raise
        if len(raw) > RESULT_LIMIT_BYTES:
            return {**_too_large(len(raw)), "started": started, "elapsed_s": time.time() - started}
        return {"status": response.status, "body": raw.decode("utf-8", "replace"), "started": started,
                "elapsed_s": time.time() - started}
    finally:
        conn.close()


def call_engine(port: int, path: str, body: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S,
                callback_url: str | None = None, task_id: str = "", key: str = "", deadline: float | None = None,
                alive_s: float = ALIVE_S) -> dict[str, Any]:
    """A plain request from the gateway to any of the engine's routes (``path``, as ``engine_path`` reads it):
    its status, answer (text) and how long it took.

    It is ended early when nobody will take the answer any more (``remote.leash``): at ``deadline`` (a Unix time),
    and, with a callback URL, when the gateway refuses the task's word, asked before the engine is and then every
    ``alive_s`` seconds. So that ending it stops the engine's work, a completion is asked of the engine as a stream
    and put together here (``remote.plain_answer``); every other route (embeddings, tokenize, rerank...), whose
    answers take no time to speak of, goes as it is.
    """
    callback = StreamCallback(callback_url, task_id, key) if callback_url else None
    try:
        if callback is not None and not callback.keep_alive(0):  # its client left while it waited to run
            return {**_WITHDRAWN, "started": time.time(), "elapsed_s": 0.0}
        leash = Leash(deadline, callback.asker(alive_s) if callback is not None else None, alive_s)
        path = engine_path(path)
        if path not in STREAMED_PATHS:
            return plain_request(port, path, body, timeout, leash)
        return _assembled(port, path, body, timeout, leash)
    finally:
        if callback is not None:
            callback.close()


STREAMED_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
"""The routes whose plain answers a node asks of its engine as streams (``_assembled``)."""
_WITHDRAWN = {"status": 499, "body": json.dumps({"error": {
    "message": "The gateway withdrew the request (its client left, or it stopped waiting) before it was answered.",
    "type": "api_error", "param": None, "code": "request_withdrawn"}})}


def _ended(leash: Leash, started: float) -> dict[str, Any]:
    """The result of a call the leash ended: nobody waits for it, but it says why for the logs."""
    if leash.why == "withdrawn":
        return {**_WITHDRAWN, "started": started, "elapsed_s": time.time() - started}
    message = ("The request was not answered by its deadline (the endpoint's timeout), so the node stopped its "
               "generation. Ask for fewer tokens (max_tokens), or raise the endpoint's timeout.")
    return {"status": 504, "body": json.dumps({"error": {"message": message, "type": "api_error", "param": None,
                                                         "code": "deadline_exceeded"}}),
            "started": started, "elapsed_s": time.time() - started}


def _assembled(port: int, path: str, body: dict[str, Any], timeout: float, leash: Leash) -> dict[str, Any]:
    """A completion streamed from the engine and put together as its plain answer."""
    started = time.time()
    conn = http.client.HTTPConnection(ENGINE_HOST, port, timeout=timeout)
    answer = PlainAnswer(chat=path == "/v1/chat/completions")
    asked = {**body, "stream": True, "stream_options": {"include_usage": True}}  # usage, as a plain answer has
    try:
        conn.request("POST", path, body=json.dumps(asked),
                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        try:
            with leash.holding(conn):
                response = conn.getresponse()
                if response.status >= 400:
                    return {"status": response.status, "body": response.read().decode("utf-8", "replace"),
                            "started": started, "elapsed_s": time.time() - started}
                finished = _read_events(response, answer) or answer.finished()
        except (OSError, http.client.HTTPException):
            if leash.why is not None:
                return _ended(leash, started)
            raise
        if answer.error is not None:
            return {**_engine_error(answer.error), "started": started, "elapsed_s": time.time() - started}
        if not finished:
            if leash.why is not None:  # the stream's end was the leash's doing
                return _ended(leash, started)
            raise ConnectionError("the engine closed the stream before its last event")
        raw = json.dumps(answer.body(), separators=(",", ":"))
        if len(raw) > RESULT_LIMIT_BYTES:
            return {**_too_large(len(raw)), "started": started, "elapsed_s": time.time() - started}
        return {"status": response.status, "body": raw, "started": started, "elapsed_s": time.time() - started}
    finally:
        conn.close()


def _read_events(response: http.client.HTTPResponse, answer: PlainAnswer) -> bool:
    """Each server-sent event's JSON into ``answer``; whether the stream said it ended (``[DONE]``, which some
    engines do not send)."""
    data: list[bytes] = []
    while line := response.readline():
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data.append(line[5:].strip())
        elif not line and data:
            payload = b"\n".join(data)
            data.clear()
            if payload == b"[DONE]":
                return True
            try:
                answer.add(json.loads(payload))
            except ValueError:
                continue  # not JSON: nothing a plain answer could hold
    return False


def _engine_error(error: Any) -> dict[str, Any]:
    """An error event from the engine as the status and OpenAI error a plain answer would have had."""
    if not isinstance(error, dict):
        error = {"message": str(error), "type": "api_error", "param": None, "code": None}
    code = error.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 500
    return {"status": status, "body": json.dumps({"error": error})}


def _exchange(port: int, method: str, path: str, timeout: float) -> tuple[int, bytes]:
    """A request without a body to the engine on this node: its status and answer."""
    conn = http.client.HTTPConnection(ENGINE_HOST, port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def engine_route(port: int, method: str, path: str, timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
    """A call without a body on one of the engine's routes (``path`` with its query, as ``engine_path`` reads it):
    a response of the Responses API that the engine keeps, retrieved, deleted, cancelled or its input items
    listed, on the node whose engine created it. Its status and answer (text)."""
    status, raw = _exchange(port, method, engine_path(path), timeout)
    if len(raw) > RESULT_LIMIT_BYTES:
        return _too_large(len(raw))
    return {"status": status, "body": raw.decode("utf-8", "replace")}


def engine_health(port: int, timeout: float = HEALTH_TIMEOUT_S) -> dict[str, Any]:
    """Whether the engine answers (``/health``, which vLLM and ``transformers serve`` both have), and the models
    it lists when its ``/v1/models`` answers (``transformers serve`` fails that route offline), with the listing
    itself (vLLM's says each model's ``max_model_len``)."""
    started = time.time()
    try:
        status, _ = _exchange(port, "GET", "/health", timeout)
    except OSError as exc:
        return {"healthy": False, "status": None, "models": [], "error": f"{type(exc).__name__}: {exc}",
                "elapsed_s": time.time() - started}
    models: list[str] = []
    listing: Any = None
    try:
        listed_status, body = _exchange(port, "GET", "/v1/models", timeout)
        listing = json.loads(body) if listed_status == 200 else {}
        models = [m.get("id") for m in listing.get("data", [])] if isinstance(listing, dict) else []
    except (OSError, ValueError):
        pass  # the list is a detail; health is the answer
    return {"healthy": status == 200, "status": status, "models": models, "listing": listing,
            "elapsed_s": time.time() - started}


class _ResultTooLarge(Exception):
    def __init__(self, size: int) -> None:
        self.size = size


STALE_CONNECTION = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError)
"""How a kept-alive connection that the other end closed fails when it is next used (``http.client``'s
``RemoteDisconnected``, a closed connection without an answer, is a ``ConnectionResetError``)."""
ALREADY_TAKEN = 409
"""The gateway's answer to a batch whose sequence number it has already taken."""
WITHDRAWN = 403
"""The gateway's answer about a task it has closed (its client left, or it stopped waiting) or never had."""
BUSY = 429
"""The gateway's answer to a batch it cannot take yet (its client is behind, and replicas' shared backlog is full,
``serve.redis_streams``), after holding it a while: the node sends it again, and so waits for its client."""


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
        self._lock = threading.Lock()
        """One message at a time on the connection: the leash's ``keep_alive`` comes from a thread of its own."""
        self._last_sent = time.monotonic()

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
        number once and answers a repeat 409, which on the second try means the first got through. A batch
        answered ``BUSY`` is sent again until it is taken or refused: the gateway held it as long as it could."""
        with self._lock:
            status, again = self._send(message, "batch")
            while status == BUSY:
                status, resent = self._send(message, "batch")
                again = again or resent
            if status >= 400 and not (again and status == ALREADY_TAKEN):
                raise CallbackFailed(f"the gateway refused the stream's batch {self.seq}: HTTP {status} from "
                                     f"{self.where}{self._via()}")
            self.seq += 1

    def keep_alive(self, idle_s: float) -> bool:
        """Whether the gateway still wants the task's answer: asked (``{"alive": true}``, which takes no place in
        the sequence) when nothing else was sent for ``idle_s`` seconds; a batch on its way says enough meanwhile.

        Only the gateway's refusal (403: the task is closed there) says no. A gateway that cannot be reached
        says nothing: a plain answer still goes back as the task's result, and a stream fails on its next batch.
        """
        if not self._lock.acquire(blocking=False):
            return True
        try:
            if time.monotonic() - self._last_sent < idle_s:
                return True
            try:
                status, _ = self._send({"alive": True}, "word")
            except CallbackFailed:
                return True
            return status != WITHDRAWN
        finally:
            self._lock.release()

    def asker(self, idle_s: float) -> Callable[[], bool]:
        """``keep_alive`` after ``idle_s`` seconds of silence, as a leash asks it."""
        return functools.partial(self.keep_alive, idle_s)

    def _send(self, message: dict[str, Any], what: str) -> tuple[int, bool]:
        """POST ``message`` as the task's next in sequence; its status, and whether it took a second try."""
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
                self._last_sent = time.monotonic()
                return response.status, again
            except (OSError, http.client.HTTPException) as exc:
                self._conn.close()
                if reused and not again and isinstance(exc, STALE_CONNECTION):
                    again = True
                    continue
                hint = (" (set SSL_CERT_FILE or REQUESTS_CA_BUNDLE on the node to the CA that signed the gateway's "
                        "certificate)" if isinstance(exc, ssl.SSLCertVerificationError) else "")
                raise CallbackFailed(f"the stream's {what} {self.seq} could not reach the gateway's callback "
                                     f"{self.where}{self._via()}: {type(exc).__name__}: {exc}{hint}") from exc

    def close(self) -> None:
        self._conn.close()


def stream_engine(port: int, path: str, body: dict[str, Any], callback_url: str | None, task_id: str, key: str,
                  batch_bytes: int = BATCH_BYTES, batch_s: float = BATCH_S, timeout: float = REQUEST_TIMEOUT_S,
                  deadline: float | None = None, alive_s: float = ALIVE_S) -> dict[str, Any]:
    """Stream from the engine (``path``, as ``engine_path`` reads it) and send the events back in signed batches;
    a summary of what was sent.

    Without a callback URL (a cluster the gateway cannot be reached from) the whole stream comes back in the
    result instead, as one final chunk. A failure after the first byte is sent as an ``error`` message, so the
    gateway ends its client's stream with an error event rather than waiting for an idle timeout.

    The engine stops as soon as the gateway refuses a batch (it closed the stream: its client left), or refuses
    the word the node sends after ``alive_s`` seconds of silence (the engine may be silent long before its first
    token); and at ``deadline`` (a Unix time), the gateway's bound on a stream that comes back whole.
    """
    started = time.time()
    engine = http.client.HTTPConnection(ENGINE_HOST, port, timeout=timeout)
    callback = StreamCallback(callback_url, task_id, key) if callback_url else None
    leash = Leash(deadline, callback.asker(alive_s) if callback is not None else None, alive_s)
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
        engine.request("POST", engine_path(path), body=json.dumps({**body, "stream": True}),
                       headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        with leash.holding(engine):
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
        if not finished and leash.why is not None:
            return _stopped(leash, callback, started)
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
        if leash.why is not None:
            return _stopped(leash, callback, started)
        if callback is not None:
            callback.post({"error": f"the engine's stream broke off on the node: {type(exc).__name__}: {exc}"})
        raise
    finally:
        engine.close()
        if callback is not None:
            callback.close()


def _stopped(leash: Leash, callback: StreamCallback | None, started: float) -> dict[str, Any]:
    """A stream the leash ended: the gateway that withdrew it hears nothing more (it would refuse it); one past
    its deadline is told so, as the task's result."""
    if leash.why == "withdrawn":
        raise CallbackFailed("the gateway no longer wants the stream (its client left, or it stopped waiting); "
                             "the engine's generation was stopped")
    ended = _ended(leash, started)
    if callback is not None:
        with contextlib.suppress(CallbackFailed):
            callback.post({"error": json.loads(ended["body"])["error"]["message"]})
    return ended
