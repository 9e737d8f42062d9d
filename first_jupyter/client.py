"""Where notebook code finds the gateway, and the Python calls behind the magics and widgets.

In a kernel the Jupyter server started, ``FIRST_GATEWAY_URL`` and ``FIRST_API_KEY`` point at the server's
gateway. Anywhere else (plain IPython, a script, nbval's kernels) the first call starts an in-process gateway
on the same configuration (``$FIRST_CONFIG`` or the embedded default): the gateway's own HTTP server on a
loopback port of this process, so every caller, the official ``openai`` client included, talks to it the same
way. The calls here use the stdlib's ``http.client``; ``openai`` (about a second to import) is imported only by
``openai_client()``.
"""

from __future__ import annotations

import atexit
import contextlib
import http.client
import json
import logging
import os
import secrets
import signal
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from first_jupyter.protocol import PROGRESS_HEADER, Progress

if TYPE_CHECKING:
    import openai

OnProgress = Callable[[Progress], None]
"""Told each ``Progress`` of a model's start while a call waits for it (minutes, on a cluster)."""

GATEWAY_URL_ENV = "FIRST_GATEWAY_URL"
API_KEY_ENV = "FIRST_API_KEY"
CALL_TIMEOUT_S = 900.0
"""Socket timeout of a call: a backstop only, since the gateway's own first-byte and idle timeouts answer first
(a cold start of a large model can take minutes)."""


class GatewayError(Exception):
    """A failed call, with the gateway's own message (which names the next step), its HTTP status, and its
    ``Retry-After`` in seconds where it gave one (a 429 or a 503: when the cluster takes requests again)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.retry_after = retry_after


NO_GATEWAY = "gateway_not_found"
"""``GatewayError.code`` when no running server's gateway was found (a command in a terminal)."""
UNREACHABLE = "gateway_unreachable"
"""``GatewayError.code`` when the gateway's address took no connection."""


class Connection(NamedTuple):
    url: str
    """Base URL of the OpenAI routes, ending in ``/first/v1``."""
    api_key: str
    source: str
    """``server``: the Jupyter server that started this kernel; ``in-process``: started here on first use."""

    @property
    def api_url(self) -> str:
        """Base URL of the gateway's own routes (status, usage, default model)."""
        return self.url.removesuffix("/v1") + "/api"


class InProcessGateway:
    """The gateway and its own HTTP server on a loopback port of this process, stopped at exit."""

    def __init__(self) -> None:
        from first_jupyter.api.lean_door import GatewayApp
        from first_jupyter.config import load_config
        from first_jupyter.paths import default_data_dir
        from first_jupyter.service import GatewayService, build_gateway
        from first_jupyter.transport.http_server import listening_socket

        data_dir = default_data_dir()
        log = _file_log(data_dir / "logs" / "gateway.log")  # first: building the gateway may log already
        gateway = build_gateway(load_config(None, data_dir), data_dir)
        self.api_key = "first-" + secrets.token_urlsafe(32)
        sock = listening_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/first/v1"
        app = GatewayApp(gateway, key=self.api_key, log=log)
        self.service: GatewayService = GatewayService(gateway, app, sock, "first-gateway-in-process")
        atexit.register(self.close)
        _close_on_sigterm(self.close)

    def close(self) -> None:
        """Stop the server and the gateway (a local engine it started stops with it)."""
        self.service.stop_now()


def _close_on_sigterm(close: Callable[[], None]) -> None:
    """A process ended by SIGTERM runs no ``atexit`` handler, yet the engine blocks its gateway started must stop
    with it. So SIGTERM closes the gateway, then ends the process as it would have; only where nothing else
    handles SIGTERM (an application that does keeps its own way), and from the main thread, where handlers are
    set."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, _frame: object) -> None:
        close()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, on_sigterm)


def _file_log(path: Path) -> logging.Logger:
    """The in-process gateway's log, in a file: in a notebook, log lines on stderr would land in cell outputs
    beside the one-line errors the caller already shows. The package's own loggers write there too (a module's
    warning, such as the offline model's note, would otherwise reach stderr through Python's last resort)."""
    log = logging.getLogger("first_jupyter.in_process")
    if not log.handlers:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        package = logging.getLogger("first_jupyter")
        if not package.handlers:
            package.addHandler(handler)
    return log


_lock = threading.Lock()
_connection: Connection | None = None
_in_process: InProcessGateway | None = None


def connection() -> Connection:
    """The gateway this process uses: the server's when it started this kernel, else one started here."""
    global _connection, _in_process
    with _lock:
        if _connection is None:
            url, key = os.environ.get(GATEWAY_URL_ENV), os.environ.get(API_KEY_ENV)
            if url and key:
                _connection = Connection(url.rstrip("/"), key, "server")
            else:
                _in_process = InProcessGateway()
                _connection = Connection(_in_process.url, _in_process.api_key, "in-process")
        return _connection


def _runtime_files() -> list[Path]:
    from jupyter_core.paths import jupyter_runtime_dir

    return sorted(Path(jupyter_runtime_dir()).glob("first-gateway-*.json"), key=lambda p: p.stat().st_mtime,
                  reverse=True)


def _running_servers() -> Iterator[dict[str, Any]]:
    """What the runtime files of servers still alive say (``url`` without a trailing slash), newest first."""
    for path in _runtime_files():
        try:
            info = json.loads(path.read_text())
            os.kill(int(info["pid"]), 0)
            yield {**info, "url": str(info["url"]).rstrip("/"), "api_key": str(info["api_key"])}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a server that is gone (or a file being written)


def lasting_key_file(conn: Connection) -> Path | None:
    """Where the server behind ``conn`` keeps its lasting key; None when it keeps none (its runtime file says)."""
    for info in _running_servers():
        if info["url"] == conn.url:
            where = info.get("lasting_key_file")
            return Path(where) if isinstance(where, str) else None
    return None


def use_running_server() -> Connection:
    """Use the gateway of a running Jupyter server, for commands in a terminal: the environment its terminals
    and kernels get, else the runtime file of the newest server still alive. An in-process gateway would be no
    use there (it ends with the command, and what it started with it)."""
    global _connection
    url, key = os.environ.get(GATEWAY_URL_ENV), os.environ.get(API_KEY_ENV)
    found = Connection(url.rstrip("/"), key, "server") if url and key else None
    if found is None:
        newest = next(_running_servers(), None)
        found = Connection(newest["url"], newest["api_key"], "server") if newest else None
    if found is None:
        raise GatewayError("No running FIRST gateway found: start JupyterLab with the extension (the README's "
                           "lab command), or run this from one of its terminals.", code=NO_GATEWAY)
    with _lock:
        _connection = found
    return found


def is_current(conn: Connection) -> bool:
    """Whether ``conn`` is still this process's gateway. A reader in the background (a batch monitor) stops once
    it is not: following on would start a gateway of its own, with whatever configuration is set by then."""
    with _lock:
        return _connection == conn


def disconnect() -> None:
    """Forget the gateway (stopping the in-process one, and a local engine it started); the next call finds one
    again, reading the environment anew."""
    global _connection, _in_process
    with _lock:
        in_process, _in_process, _connection = _in_process, None, None
    if in_process is not None:
        in_process.close()


def _on_loopback(url: str) -> bool:
    """A plain-http gateway on this machine: a proxy in the environment could never reach it, so it is not asked."""
    from first_jupyter.transport.proxies import is_loopback

    parts = urllib.parse.urlsplit(url)
    return parts.scheme == "http" and is_loopback(parts.hostname or "")


def openai_client(**kwargs: Any) -> openai.OpenAI:
    """The official ``openai`` client, configured for this gateway; ``kwargs`` go to ``openai.OpenAI``.

    The gateway's loopback URL is reached directly even where ``HTTP_PROXY`` is set and ``NO_PROXY`` does not list
    it (a kernel this process started itself, with the in-process gateway)."""
    import openai

    conn = connection()
    if "http_client" not in kwargs and _on_loopback(conn.url):
        kwargs["http_client"] = openai.DefaultHttpxClient(trust_env=False)
    return openai.OpenAI(base_url=conn.url, api_key=conn.api_key, **kwargs)


def async_openai_client(**kwargs: Any) -> openai.AsyncOpenAI:
    """The official async ``openai`` client, configured for this gateway (loopback reached directly, as above)."""
    import openai

    conn = connection()
    if "http_client" not in kwargs and _on_loopback(conn.url):
        kwargs["http_client"] = openai.DefaultAsyncHttpxClient(trust_env=False)
    return openai.AsyncOpenAI(base_url=conn.url, api_key=conn.api_key, **kwargs)


# -- the gateway's own routes ----------------------------------------------------------------------------------


class Payload(NamedTuple):
    """A request body sent as it is read (a file upload), rather than JSON built in memory."""

    chunks: Iterable[bytes]
    length: int
    content_type: str


class _ApiCall:
    """One request to the gateway on a connection of its own, which ``abort`` ends from any thread.

    The stdlib's ``http.client`` rather than ``openai``: it imports in milliseconds (``openai`` takes a second,
    on the first prompt of every kernel), and its socket is ours to shut down, which is how a stop button ends a
    call blocked waiting for a cold engine's first byte. Closing the connection is what makes the gateway cancel
    the request upstream.
    """

    def __init__(self, conn: Connection, method: str, url: str, body: Mapping[str, Any] | Payload | None,
                 *, progress: bool = False) -> None:
        """``progress``: ask to hear a model's start while a plain call waits for it (``protocol.PROGRESS_HEADER``)."""
        self.url = url
        self._gateway = conn.url
        parts = urllib.parse.urlsplit(url)
        self._http = _http_connection(parts)
        self._target = parts.path + (f"?{parts.query}" if parts.query else "")
        self._method = method
        self._headers = {"Authorization": f"Bearer {conn.api_key}", "Content-Type": "application/json"}
        if progress:
            self._headers[PROGRESS_HEADER] = "1"
        self._body: bytes | Iterable[bytes] | None = None
        if isinstance(body, Payload):
            self._body = body.chunks
            self._headers.update({"Content-Type": body.content_type, "Content-Length": str(body.length)})
        elif body is not None:
            self._body = json.dumps(body).encode()
        self._aborted = threading.Event()

    def send(self) -> http.client.HTTPResponse:
        """Send the request and return the response once its head is in; ``GatewayError`` for a refusal."""
        try:
            self._http.connect()
            if self._aborted.is_set():
                raise ConnectionAbortedError("stopped")
            self._http.request(self._method, self._target, body=self._body, headers=self._headers)
            response = self._http.getresponse()
        except ssl.SSLCertVerificationError as exc:
            self.close()
            raise GatewayError(f"The FIRST gateway at {self._gateway} presents a certificate this kernel does not "
                               f"trust ({exc.verify_message}). Set SSL_CERT_FILE or REQUESTS_CA_BUNDLE to the CA "
                               "bundle that signed the Jupyter server's certificate: in the server's environment "
                               "for every kernel, or in this kernel's os.environ.") from None
        except OSError as exc:
            self.close()
            if self._aborted.is_set():
                raise
            raise GatewayError(f"The FIRST gateway at {self._gateway} is not reachable ({exc}). Restart the "
                               "kernel; if it persists, restart the Jupyter server.", code=UNREACHABLE) from None
        if response.status >= 400:
            error = _gateway_error(response.status, response.read(), response.getheader("Retry-After"))
            self.close()
            raise error
        return response

    def abort(self) -> None:
        """Shut the socket down: a read blocked in another thread returns at once (a plain close would not wake
        it)."""
        self._aborted.set()
        sock = self._http.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._http.close()


def _http_connection(parts: urllib.parse.SplitResult) -> http.client.HTTPConnection:
    """A connection for the gateway's URL. It is https when the Jupyter server serves TLS (a certfile) and the
    gateway has no loopback server of its own (``api_port = -1``): kernels then get the server's own https URL,
    whose certificate is often an institution's, trusted through ``SSL_CERT_FILE`` / ``REQUESTS_CA_BUNDLE``,
    which ``client_context`` adds to the system store. Never through a proxy: the gateway is this server's."""
    host = parts.hostname or "127.0.0.1"
    if parts.scheme != "https":
        return http.client.HTTPConnection(host, parts.port, timeout=CALL_TIMEOUT_S)
    from first_jupyter.transport.tls import client_context  # only for https: plain kernels skip the import

    return http.client.HTTPSConnection(host, parts.port, timeout=CALL_TIMEOUT_S, context=client_context())


def _call(conn: Connection, method: str, url: str, body: Mapping[str, Any] | Payload | None = None,
          on_progress: OnProgress | None = None) -> tuple[Any, http.client.HTTPResponse]:
    """A whole JSON exchange with ``conn``'s gateway: the decoded answer and the response (for its headers).
    ``on_progress``: told how a model's start goes while the call waits for one (the gateway then answers with
    progress comments and one event holding the answer)."""
    exchange = _ApiCall(conn, method, url, body, progress=on_progress is not None)
    try:
        response = exchange.send()
        if on_progress is None or not (response.getheader("Content-Type") or "").startswith("text/event-stream"):
            return json.loads(response.read()), response
        for answer in _events(response, on_progress):
            return answer, response
        raise GatewayError("The gateway's answer ended before it came. Run the cell again.")
    finally:
        exchange.close()


def _api(method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
    """Call ``/first/api/{path}``, the gateway's own routes."""
    conn = connection()
    return _call(conn, method, f"{conn.api_url}/{path}", body)[0]


def v1(method: str, path: str, body: Mapping[str, Any] | Payload | None = None, *,
       conn: Connection | None = None) -> Any:
    """Call ``/first/v1/{path}``, the OpenAI routes (files and batches among them); the decoded answer. ``conn``
    pins the gateway (a background reader's), else this process's gateway is used, started when there is none."""
    conn = conn or connection()
    return _call(conn, method, f"{conn.url}/{path}", body)[0]


@contextlib.contextmanager
def v1_lines(path: str) -> Iterator[Iterator[bytes]]:
    """The lines of ``GET /first/v1/{path}`` as they arrive (a file's contents), the connection open meanwhile."""
    conn = connection()
    exchange = _ApiCall(conn, "GET", f"{conn.url}/{path}", None)
    try:
        yield iter(exchange.send())
    finally:
        exchange.close()


def _gateway_error(status: int, body: bytes, retry_after: str | None = None) -> GatewayError:
    wait = float(retry_after) if retry_after and retry_after.strip().isdigit() else None  # (an HTTP date: none)
    try:
        error = json.loads(body)["error"]
        return GatewayError(error["message"], status, error.get("code"), wait)
    except (ValueError, KeyError, TypeError):
        return GatewayError(f"The gateway answered HTTP {status}.", status, retry_after=wait)


def status() -> dict[str, Any]:
    """Clusters, endpoints and models with their live state, and the default model."""
    answer: dict[str, Any] = _api("GET", "status")
    return answer


def warm(model: str, *, cluster: str | None = None, wait: bool = False,
         on_progress: OnProgress | None = None) -> dict[str, Any]:
    """Start ``model`` ahead of need, where it would be served (on ``cluster`` if named); ``wait``: return once it
    answers, telling ``on_progress`` how the start goes meanwhile. Where, its state, and the seconds it is still
    expected to take."""
    conn = connection()
    answer: dict[str, Any] = _call(conn, "POST", f"{conn.api_url}/models/{urllib.parse.quote(model, safe='/')}/warm",
                                   {"cluster": cluster, "wait": wait}, on_progress)[0]
    return answer


def describe_warm(answer: Mapping[str, Any]) -> str:
    """A warm-up's answer in words, for the magic and the command line alike."""
    where = f"cluster '{answer['cluster']}' endpoint '{answer['endpoint']}'"
    if answer["state"] == "hot":
        return f"{answer['model']} is hot on {where}." + ("" if answer["started"] else " Nothing to start.")
    return (f"Starting {answer['model']} on {where}: {answer['state']}, expected in about "
            f"{answer['expected_s']:.0f} s. `%first status` (or `first status`) shows where it stands.")


def state_rows(status: Mapping[str, Any]) -> list[list[str]]:
    """Each model at each endpoint with its state, for a table: model, cluster/endpoint, state, model's best."""
    return [[m["id"], f"{s['cluster']}/{s['endpoint']}", s["state"], m["state"]]
            for m in status["models"] for s in m["served_by"]]


STATE_COLUMNS = ["model", "served by", "state there", "best state"]


def model_rows(listing: Mapping[str, Any]) -> list[list[str]]:
    """Each model of ``GET /first/v1/models`` for a table: its id, state, capabilities and where it is served."""
    return [[m["id"], m.get("state", ""), ", ".join(m.get("capabilities", {}).get("api_protocols", ())),
             ", ".join(f"{s['cluster']}/{s['endpoint']}" for s in m.get("served_by", ()))] for m in listing["data"]]


MODEL_COLUMNS = ["model", "state", "can", "served by"]


def usage_rows(report: Mapping[str, Any]) -> list[list[Any]]:
    """Each model of ``GET /first/api/usage`` for a table, latencies in milliseconds to one decimal."""
    def ms(value: float | None) -> str:
        return "" if value is None else f"{value:.1f}"

    return [[r["model"], r["requests"], r["errors"], r["prompt_tokens"], r["completion_tokens"],
             ms(r["mean_latency_ms"]), ms(r["mean_ttft_ms"])] for r in report["data"]]


USAGE_COLUMNS = ["model", "requests", "errors", "prompt tokens", "completion tokens", "mean latency ms",
                 "mean TTFT ms"]


def models() -> list[dict[str, Any]]:
    """Every model with its capabilities, where it is served and its state (hot, starting, cold, offline...)."""
    listed: list[dict[str, Any]] = status()["models"]
    return listed


def default_model() -> str | None:
    """The model used when none is named: the one chosen with ``%first use`` or in the sidebar."""
    chosen: str | None = _api("GET", "default_model")["default_model"]
    return chosen


def set_default_model(model: str) -> str:
    """Make ``model`` the default for every client of this gateway (kept across restarts)."""
    chosen: str = _api("PUT", "default_model", {"model": model})["default_model"]
    return chosen


def whoami() -> dict[str, Any]:
    """Which Globus identity and token source the gateway uses (never a token: those stay in the server)."""
    answer: dict[str, Any] = _api("GET", "whoami")
    return answer


def login_start() -> str:
    """Start a Globus sign-in in the gateway; the URL to open. Finish it with ``login_finish(code)``."""
    url: str = _api("POST", "login", {})["url"]
    return url


def login_finish(code: str) -> dict[str, Any]:
    """Hand the gateway the code Globus showed; who is now signed in."""
    answer: dict[str, Any] = _api("POST", "login/code", {"code": code})
    return answer


def usage_report() -> dict[str, Any]:
    """``GET /first/api/usage`` as the gateway answers it: a list object whose ``data`` is ``usage()``."""
    answer: dict[str, Any] = _api("GET", "usage")
    return answer


def usage() -> list[dict[str, Any]]:
    """Requests, errors, tokens and mean latency per model."""
    rows: list[dict[str, Any]] = usage_report()["data"]
    return rows


def model_listing() -> dict[str, Any]:
    """``GET /first/v1/models`` as the gateway answers it: OpenAI's model list, each model once."""
    answer: dict[str, Any] = v1("GET", "models")
    return answer


# -- inference ------------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """The turns of one chat, oldest first, of which the last ``max_turns`` are sent with the next prompt."""

    max_turns: int = 10
    turns: list[tuple[str, str]] = field(default_factory=list)

    def messages(self) -> list[dict[str, str]]:
        kept = self.turns[-self.max_turns:] if self.max_turns > 0 else []
        return [message for user, assistant in kept for message in (
            {"role": "user", "content": user}, {"role": "assistant", "content": assistant})]

    def add(self, user: str, assistant: str) -> None:
        self.turns.append((user, assistant))

    def reset(self) -> None:
        self.turns.clear()


@dataclass
class Result:
    """One answer and where and how it was made."""

    text: str
    model: str
    cluster: str | None = None
    endpoint: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float = 0.0
    ttft_s: float | None = None
    finish_reason: str | None = None
    stopped: bool = False
    """The caller stopped the stream (stop button, Ctrl-C) before it ended: ``text`` is what came until then."""

    def metadata(self) -> dict[str, Any]:
        """What a display carries along, for notebooks to keep with the output."""
        return {"model": self.model, "cluster": self.cluster, "endpoint": self.endpoint,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "latency_s": round(self.latency_s, 3), "ttft_s": round(self.ttft_s, 3) if self.ttft_s else None,
                "finish_reason": self.finish_reason, "stopped": self.stopped}


def resolve_model(model: str | None) -> str:
    """``model``, else the gateway's default; a clear error when there is neither."""
    chosen = model or default_model()
    if not chosen:
        raise GatewayError("No model given and no default set. `%first models` lists what you can use; "
                           "`%first use MODEL` sets the default.")
    return chosen


def _body(model: str, temperature: float | None, max_tokens: int | None, extra: Mapping[str, Any],
          **fields: Any) -> dict[str, Any]:
    """A request body: the fields given, the options that are set, and every extra field (vLLM's ``top_k``...)
    as is."""
    options = {k: v for k, v in (("temperature", temperature), ("max_tokens", max_tokens)) if v is not None}
    return {"model": model, **fields, **options, **extra}


def _where(result: Result, response: http.client.HTTPResponse) -> Result:
    result.cluster = response.getheader("X-First-Cluster")
    result.endpoint = response.getheader("X-First-Endpoint")
    return result


def chat(prompt: str | Sequence[Mapping[str, Any]], *, model: str | None = None, system: str | None = None,
         temperature: float | None = None, max_tokens: int | None = None, stream: bool = False,
         conversation: Conversation | None = None, on_text: Callable[[str], None] | None = None,
         stop: threading.Event | None = None, on_progress: OnProgress | None = None, **extra: Any) -> Result:
    """Ask a chat model; the call behind ``%%first chat`` and ``ChatWidget``.

    ``prompt`` is the user's text, or a whole list of messages. With ``conversation`` its earlier turns go first
    and this turn is added to it. With ``stream``, ``on_text`` gets each piece of text as it arrives, and setting
    ``stop`` (or Ctrl-C) ends the stream, even before its first token: the connection is closed, so the gateway
    cancels the request upstream. ``on_progress`` is told how a model's start goes while the call waits for one
    (streamed or not). ``extra`` fields (``top_p``, vLLM's ``top_k``...) reach the engine untouched.
    """
    chosen = resolve_model(model)
    messages: list[Any] = [{"role": "system", "content": system}] if system else []
    if conversation is not None:
        messages += conversation.messages()
    messages += [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    conn = connection()
    url = f"{conn.url}/chat/completions"
    started = time.perf_counter()
    if stream:
        body = _body(chosen, temperature, max_tokens, extra, messages=messages, stream=True,
                     stream_options={"include_usage": True})
        result = _chat_stream(conn, url, body, on_text, stop, started, on_progress)
    else:
        answer, response = _call(conn, "POST", url, _body(chosen, temperature, max_tokens, extra, messages=messages),
                                 on_progress)
        choice, usage = answer["choices"][0], answer.get("usage") or {}
        result = _where(Result(choice["message"].get("content") or "", chosen, None, None, usage.get("prompt_tokens"),
                               usage.get("completion_tokens"), time.perf_counter() - started, None,
                               choice.get("finish_reason")), response)
    if conversation is not None and isinstance(prompt, str):
        conversation.add(prompt, result.text)
    return result


@contextlib.contextmanager
def _aborted_on(stop: threading.Event | None, exchange: _ApiCall) -> Iterator[None]:
    """Abort ``exchange`` once ``stop`` is set, from a watcher thread: the call may be blocked waiting for the
    response head (a cold start, a queued job) or for the next chunk, where no loop can look at the event."""
    if stop is None:
        yield
        return
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            if stop.wait(0.05):
                exchange.abort()
                return

    watcher = threading.Thread(target=watch, name="first-stop-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def _events(response: http.client.HTTPResponse, on_progress: OnProgress | None = None) -> Iterator[dict[str, Any]]:
    """The JSON events of a server-sent event stream, to ``[DONE]``; an error event raises ``GatewayError``.
    ``on_progress`` is told each progress comment of a wait for a model's start."""
    for line in response:
        if not line.startswith(b"data:"):
            if on_progress is not None and (progress := Progress.from_comment(line.rstrip(b"\r\n"))) is not None:
                on_progress(progress)
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            raise GatewayError(error.get("message") or "The stream failed.", None, error.get("code"))
        yield event


def _chat_stream(conn: Connection, url: str, body: dict[str, Any], on_text: Callable[[str], None] | None,
                 stop: threading.Event | None, started: float, on_progress: OnProgress | None) -> Result:
    result = Result("", body["model"])
    parts: list[str] = []
    exchange = _ApiCall(conn, "POST", url, body)
    try:
        with _aborted_on(stop, exchange):
            response = exchange.send()
            _where(result, response)
            for event in _events(response, on_progress):
                usage = event.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.completion_tokens = usage.get("completion_tokens")
                for choice in event.get("choices") or ():
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - started
                        parts.append(piece)
                        if on_text is not None:
                            on_text(piece)
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
                if stop is not None and stop.is_set():
                    break
    except KeyboardInterrupt:
        result.stopped = True  # the connection is closed below: the gateway cancels upstream
        raise
    except (OSError, http.client.HTTPException, ValueError):
        if stop is None or not stop.is_set():
            raise GatewayError("The stream from the gateway broke off. Run the cell again.") from None
    finally:
        exchange.close()
        result.stopped = result.stopped or (stop is not None and stop.is_set())
        result.text = "".join(parts)
        result.latency_s = time.perf_counter() - started
    return result


def complete(prompt: str, *, model: str | None = None, temperature: float | None = None,
             max_tokens: int | None = None, on_progress: OnProgress | None = None, **extra: Any) -> Result:
    """A plain text completion (``/v1/completions``); ``on_progress`` as for ``chat``."""
    chosen = resolve_model(model)
    started = time.perf_counter()
    conn = connection()
    answer, response = _call(conn, "POST", f"{conn.url}/completions",
                             _body(chosen, temperature, max_tokens, extra, prompt=prompt), on_progress)
    choice, usage = answer["choices"][0], answer.get("usage") or {}
    return _where(Result(choice.get("text") or "", chosen, None, None, usage.get("prompt_tokens"),
                         usage.get("completion_tokens"), time.perf_counter() - started, None,
                         choice.get("finish_reason")), response)


def embed(inputs: str | Sequence[str], *, model: str | None = None,
          on_progress: OnProgress | None = None) -> list[list[float]]:
    """One embedding vector per input text; ``on_progress`` as for ``chat``."""
    chosen = resolve_model(model)
    conn = connection()
    answer, _ = _call(conn, "POST", f"{conn.url}/embeddings",
                      {"model": chosen, "input": inputs if isinstance(inputs, str) else list(inputs)}, on_progress)
    return [item["embedding"] for item in sorted(answer["data"], key=lambda item: item["index"])]
