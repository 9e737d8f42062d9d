"""Where notebook code finds the gateway, and the Python calls behind the magics and widgets.

In a kernel the Jupyter server started, ``FIRST_GATEWAY_URL`` and ``FIRST_API_KEY`` point at the server's
gateway. Anywhere else (plain IPython, a script, nbval's kernels) the first call starts an in-process gateway
on the same configuration (``$FIRST_CONFIG`` or the embedded default): the gateway's own HTTP server on a
loopback port of this process, so every caller, the official ``openai`` client included, talks to it the same
way. ``openai`` takes about a second to import; it is imported on first use, never by ``%load_ext``.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    import openai

    from first_jupyter.gateway.core import Gateway
    from first_jupyter.gateway.loop_thread import LoopThread

GATEWAY_URL_ENV = "FIRST_GATEWAY_URL"
API_KEY_ENV = "FIRST_API_KEY"
ADMIN_TIMEOUT_S = 30.0
"""Status probes every endpoint (an offline one times out in a few seconds)."""


class GatewayError(Exception):
    """A failed call, with the gateway's own message (which names the next step) and its HTTP status."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


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
        from first_jupyter.config import load_config
        from first_jupyter.gateway.api import GatewayApp
        from first_jupyter.gateway.core import Gateway
        from first_jupyter.gateway.httpd import listening_socket, serve
        from first_jupyter.gateway.loop_thread import LoopThread
        from first_jupyter.paths import default_data_dir

        data_dir = default_data_dir()
        self.gateway: Gateway = Gateway(load_config(None, data_dir), data_dir)
        self.thread: LoopThread = LoopThread("first-gateway-in-process")
        self.api_key = "first-" + secrets.token_urlsafe(32)
        sock = listening_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}/first/v1"
        app = GatewayApp(self.gateway, key=self.api_key, log=_file_log(data_dir / "logs" / "gateway.log"))
        self._server = self.thread.submit(serve(app, sock)).result(10)
        atexit.register(self.close)

    def close(self) -> None:
        """Stop the server and the gateway (a local engine it started stops with it)."""
        if not self.thread.alive:
            return
        self.thread.submit(self._stop()).result(30)
        self.thread.stop()

    async def _stop(self) -> None:
        self._server.close()
        await self.gateway.close()


def _file_log(path: Path) -> logging.Logger:
    """The in-process gateway's log, in a file: in a notebook, log lines on stderr would land in cell outputs
    beside the one-line errors the caller already shows."""
    log = logging.getLogger("first_jupyter.in_process")
    if not log.handlers:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
    return log


_lock = threading.Lock()
_connection: Connection | None = None
_in_process: InProcessGateway | None = None
_clients: dict[str, Any] = {}


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


def disconnect() -> None:
    """Forget the gateway (stopping the in-process one, and a local engine it started); the next call finds one
    again, reading the environment anew."""
    global _connection, _in_process
    with _lock:
        in_process, _in_process, _connection = _in_process, None, None
        clients = list(_clients.values())
        _clients.clear()
    for client in clients:
        client.close()
    if in_process is not None:
        in_process.close()


def openai_client(**kwargs: Any) -> openai.OpenAI:
    """The official ``openai`` client, configured for this gateway; ``kwargs`` go to ``openai.OpenAI``."""
    import openai

    conn = connection()
    return openai.OpenAI(base_url=conn.url, api_key=conn.api_key, **kwargs)


def async_openai_client(**kwargs: Any) -> openai.AsyncOpenAI:
    """The official async ``openai`` client, configured for this gateway."""
    import openai

    conn = connection()
    return openai.AsyncOpenAI(base_url=conn.url, api_key=conn.api_key, **kwargs)


def _shared_client() -> openai.OpenAI:
    """One client per process for the calls below, so their connections are pooled; no retries: a failure is
    reported at once, with the gateway's message."""
    with _lock:
        client = _clients.get("sync")
    if client is None:
        client = openai_client(max_retries=0)
        with _lock:
            client = _clients.setdefault("sync", client)
    return client


# -- the gateway's own routes ----------------------------------------------------------------------------------


def _api(method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
    """Call ``/first/api/{path}`` (stdlib HTTP: cheap to import, and these calls are small)."""
    conn = connection()
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{conn.api_url}/{path}", data=data, method=method, headers={  # noqa: S310
        "Authorization": f"Bearer {conn.api_key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=ADMIN_TIMEOUT_S) as resp:  # noqa: S310 (our own URL)
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise _gateway_error(exc.code, exc.read()) from None
    except urllib.error.URLError as exc:
        raise GatewayError(f"The FIRST gateway at {conn.url} is not reachable ({exc.reason}). Restart the kernel; "
                           "if it persists, restart the Jupyter server.") from None


def _gateway_error(status: int, body: bytes) -> GatewayError:
    try:
        error = json.loads(body)["error"]
        return GatewayError(error["message"], status, error.get("code"))
    except (ValueError, KeyError, TypeError):
        return GatewayError(f"The gateway answered HTTP {status}.", status)


def status() -> dict[str, Any]:
    """Clusters, endpoints and models with their live state, and the default model."""
    answer: dict[str, Any] = _api("GET", "status")
    return answer


def models() -> list[dict[str, Any]]:
    """Every model with its capabilities, where it is served and its state (hot, starting, cold, offline...)."""
    listed: list[dict[str, Any]] = status()["models"]
    return listed


def default_model() -> str | None:
    """The model used when none is named: the one chosen with ``%first use`` or in the sidebar."""
    chosen: str | None = status()["default_model"]
    return chosen


def set_default_model(model: str) -> str:
    """Make ``model`` the default for every client of this gateway (kept across restarts)."""
    chosen: str = _api("PUT", "default_model", {"model": model})["default_model"]
    return chosen


def usage() -> list[dict[str, Any]]:
    """Requests, errors, tokens and mean latency per model."""
    rows: list[dict[str, Any]] = _api("GET", "usage")["data"]
    return rows


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


def _translate(exc: Exception) -> GatewayError:
    """The ``openai`` package's exceptions as ``GatewayError`` with the gateway's own message."""
    import openai

    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        error = body.get("error", body) if isinstance(body, dict) else {}
        message = error.get("message") if isinstance(error, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        return GatewayError(message or str(exc), exc.status_code, code)
    if isinstance(exc, openai.APIConnectionError):
        return GatewayError(f"The FIRST gateway at {connection().url} is not reachable. Restart the kernel; if it "
                            "persists, restart the Jupyter server.")
    return GatewayError(str(exc))


def _body_fields(temperature: float | None, max_tokens: int | None, extra: dict[str, Any]) -> dict[str, Any]:
    """Options for the ``openai`` call: the common ones by name, every other field (vLLM's ``top_k``...) as
    ``extra_body``, which the client sends as is and would otherwise refuse."""
    options: dict[str, Any] = {k: v for k, v in (("temperature", temperature), ("max_tokens", max_tokens))
                               if v is not None}
    if extra:
        options["extra_body"] = extra
    return options


@contextlib.contextmanager
def _gateway_errors() -> Iterator[None]:
    """Failures of the ``openai`` package re-raised as ``GatewayError``, whose message is the gateway's own."""
    try:
        yield
    except Exception as exc:
        if type(exc).__module__.startswith("openai"):
            raise _translate(exc) from None
        raise


def resolve_model(model: str | None) -> str:
    """``model``, else the gateway's default; a clear error when there is neither."""
    chosen = model or default_model()
    if not chosen:
        raise GatewayError("No model given and no default set. `%first models` lists what you can use; "
                           "`%first use MODEL` sets the default.")
    return chosen


def chat(prompt: str | Sequence[Mapping[str, Any]], *, model: str | None = None, system: str | None = None,
         temperature: float | None = None, max_tokens: int | None = None, stream: bool = False,
         conversation: Conversation | None = None, on_text: Callable[[str], None] | None = None,
         stop: threading.Event | None = None, **extra: Any) -> Result:
    """Ask a chat model; the call behind ``%%first chat`` and ``ChatWidget``.

    ``prompt`` is the user's text, or a whole list of messages. With ``conversation`` its earlier turns go first
    and this turn is added to it. With ``stream``, ``on_text`` gets each piece of text as it arrives, and setting
    ``stop`` (or Ctrl-C) ends the stream: the connection is closed, so the gateway cancels the request upstream.
    ``extra`` fields (``top_p``, vLLM's ``top_k``...) reach the engine untouched.
    """
    chosen = resolve_model(model)
    messages: list[Any] = [{"role": "system", "content": system}] if system else []
    if conversation is not None:
        messages += conversation.messages()
    messages += [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    options = _body_fields(temperature, max_tokens, extra)
    client = _shared_client()  # first use imports openai (about a second): not part of the answer's latency
    started = time.perf_counter()
    with _gateway_errors():
        if stream:
            result = _chat_stream(client, chosen, messages, options, on_text, stop, started)
        else:
            result = _chat_once(client, chosen, messages, options, started)
    if conversation is not None and isinstance(prompt, str):
        conversation.add(prompt, result.text)
    return result


def _chat_once(client: openai.OpenAI, model: str, messages: list[Any], options: dict[str, Any],
               started: float) -> Result:
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, **options)
    completion = raw.parse()
    choice = completion.choices[0]
    usage = completion.usage
    return Result(choice.message.content or "", model, raw.headers.get("x-first-cluster"),
                  raw.headers.get("x-first-endpoint"), usage.prompt_tokens if usage else None,
                  usage.completion_tokens if usage else None, time.perf_counter() - started, None,
                  choice.finish_reason)


def _chat_stream(client: openai.OpenAI, model: str, messages: list[Any], options: dict[str, Any],
                 on_text: Callable[[str], None] | None, stop: threading.Event | None, started: float) -> Result:
    result = Result("", model)
    parts: list[str] = []
    with client.chat.completions.with_streaming_response.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **options) as raw:
        result.cluster, result.endpoint = raw.headers.get("x-first-cluster"), raw.headers.get("x-first-endpoint")
        chunks: Iterator[Any] = iter(raw.parse())
        try:
            for chunk in chunks:
                if chunk.usage is not None:
                    result.prompt_tokens = chunk.usage.prompt_tokens
                    result.completion_tokens = chunk.usage.completion_tokens
                for choice in chunk.choices:
                    if choice.delta.content:
                        if result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - started
                        parts.append(choice.delta.content)
                        if on_text is not None:
                            on_text(choice.delta.content)
                    if choice.finish_reason:
                        result.finish_reason = choice.finish_reason
                if stop is not None and stop.is_set():
                    result.stopped = True
                    break
        except KeyboardInterrupt:
            result.stopped = True  # leaving the ``with`` closes the connection: the gateway cancels upstream
            raise
        finally:
            result.text = "".join(parts)
            result.latency_s = time.perf_counter() - started
    return result


def complete(prompt: str, *, model: str | None = None, temperature: float | None = None,
             max_tokens: int | None = None, **extra: Any) -> Result:
    """A plain text completion (``/v1/completions``)."""
    chosen = resolve_model(model)
    options = _body_fields(temperature, max_tokens, extra)
    client = _shared_client()
    started = time.perf_counter()
    with _gateway_errors():
        raw = client.completions.with_raw_response.create(model=chosen, prompt=prompt, **options)
        completion = raw.parse()
    usage = completion.usage
    return Result(completion.choices[0].text, chosen, raw.headers.get("x-first-cluster"),
                  raw.headers.get("x-first-endpoint"), usage.prompt_tokens if usage else None,
                  usage.completion_tokens if usage else None, time.perf_counter() - started, None,
                  completion.choices[0].finish_reason)


def embed(inputs: str | Sequence[str], *, model: str | None = None) -> list[list[float]]:
    """One embedding vector per input text."""
    chosen = resolve_model(model)
    with _gateway_errors():
        answer = _shared_client().embeddings.create(model=chosen, input=inputs)
    return [item.embedding for item in sorted(answer.data, key=lambda item: item.index)]
