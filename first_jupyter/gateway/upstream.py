"""The gateway's one pooled HTTP client to upstream engines, with idle timeouts.

One connection pool per gateway keeps connections to each engine alive across requests (a new TCP
connection per request would double the added latency). Timeouts are idle timeouts: the response headers
must come within ``first_byte`` seconds and each later chunk within ``idle`` seconds, so a generation that
keeps streaming for an hour is never cut, while a stuck engine is noticed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import orjson

from first_jupyter.config import Limits, Timeouts
from first_jupyter.protocol import OpenAIError
from first_jupyter.transport.http_client import (
    Body,
    ConnectFailed,
    FirstByteTimeout,
    HTTPClientError,
    Pool,
    ProxyFailed,
    Response,
    ResponseTooLarge,
    TlsFailed,
    Url,
)

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error"}


@dataclass(slots=True)
class Reply:
    """A complete (non-streamed) upstream answer."""

    status: int
    body: bytes
    retry_after: str | None = None
    via: str | None = None
    """The proxy it came through (never its credentials): an error status may be the proxy's own refusal."""
    content_type: str | None = None
    """The answer's own Content-Type, where it said one."""


def upstream_error(status: int, body: bytes, where: str, retry_after: str | None = None,
                   via: str | None = None) -> OpenAIError:
    """Turn an upstream error response into an OpenAI error, keeping an OpenAI-shaped message, code and param as
    they are (an engine's 400 names the field it refused)."""
    message = body[:500].decode(errors="replace").strip() or f"HTTP {status}"
    code: str | None = None
    param: str | None = None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            message, code = str(err["message"]), err.get("code")
            param = err["param"] if isinstance(err.get("param"), str) else None
        elif isinstance(err, str):
            message = err
        elif "detail" in data:  # FastAPI-style engines (transformers serve)
            message = str(data["detail"])
        elif "message" in data:
            message = str(data["message"])
    status_out = 400 if status == 422 else status
    hint = {429: " The engine is busy; retry after a short wait.",
            503: " The engine is not ready; retry shortly or check GET /first/api/status."}.get(status_out, "")
    if via is not None:
        where = f"{where} (through the proxy {via}, which may have refused the request itself)"
    error = OpenAIError(status_out, f"{where} answered HTTP {status}: {message.rstrip('.')}.{hint}",
                        type=_ERROR_TYPES.get(status_out, "api_error"), param=param, code=code or "upstream_error",
                        headers={"Retry-After": retry_after} if retry_after else None)
    error.engine_body = body
    return error


def redirected(status: int, location: str | None, where: str, url: Url) -> OpenAIError:
    """A 3xx: never followed (a POST cannot be replayed safely, and a moved API root is a configuration
    mistake best fixed once), but said plainly, since passing it on would look like an empty success."""
    target = f" to {location}" if location else ""
    return OpenAIError(502, f"{where} answered HTTP {status}, redirecting{target}; the gateway does not follow "
                            f"redirects. The endpoint's base_url may be wrong (it led to {url.text})"
                            f"{'; should it be the address above?' if location else '.'}",
                       type="api_error", code="upstream_redirect")


def broken_off(where: str, exc: BaseException, idle: float) -> OpenAIError:
    """The error for an answer that stopped after it began: stalled past the idle timeout, or cut."""
    if isinstance(exc, TimeoutError):
        return OpenAIError(504, f"{where} sent nothing for {idle:.0f} s in the middle of its answer; the engine "
                                f"may be overloaded or stuck. Retry, or check GET /first/api/status.",
                           type="api_error", code="upstream_idle_timeout")
    return OpenAIError(502, f"{where} broke off its answer ({type(exc).__name__}). The engine may have stopped; "
                            f"retry, or check GET /first/api/status.", type="api_error", code="upstream_disconnected")


class UpstreamStream:
    """The byte chunks of one streamed upstream response, as they arrive."""

    __slots__ = ("_idle", "_read", "_resp", "_where", "on_close")

    def __init__(self, resp: Response, idle: float, where: str) -> None:
        self._resp = resp
        self._idle = idle
        self._where = where
        self._read = b""
        """Bytes ``first_event`` read ahead, which ``pipe`` hands on first."""
        self.on_close: Callable[[], None] | None = None  # lets a backend count streams still open

    async def first_event(self, limit: int) -> bytes:
        """The stream's first server-sent event (up to ``limit`` bytes of it, or what came before the end), read
        ahead and kept for ``pipe``: a gateway that reports a failure inside a 200 stream (FIRST does) can so be
        judged before anything reaches the client, while failing over is still possible."""
        try:
            while b"\n\n" not in self._read.replace(b"\r\n", b"\n") and len(self._read) < limit:
                chunk = await self._resp.next_chunk()
                if not chunk:
                    break
                self._read += chunk
        except (TimeoutError, HTTPClientError) as exc:
            raise broken_off(self._where, exc, self._idle) from None
        return self._read

    async def pipe(self, sink: Callable[[bytes], bool]) -> None:
        """Push each chunk into ``sink`` as it arrives (see ``Response.pipe``); return at the end."""
        read, self._read = self._read, b""
        if read:
            sink(read)  # one chunk already read: the next ones wait in the response if the sink is full
        try:
            await self._resp.pipe(sink)
        except (TimeoutError, HTTPClientError) as exc:
            raise broken_off(self._where, exc, self._idle) from None

    def resume_reading(self) -> None:
        self._resp.resume_reading()

    def close(self) -> None:
        """Release the connection; one not read to the end is closed so the engine stops generating."""
        self._resp.release()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None

    @staticmethod
    def when_done(callback: Callable[[], None]) -> None:
        """At once: the engine stops as its connection closes."""
        callback()


class UpstreamClient:
    """Shared, lazily created connection pool for every backend of one gateway."""

    def __init__(self, timeouts: Timeouts, limits: Limits) -> None:
        self.timeouts = timeouts
        self.limits = limits
        self._pool: Pool | None = None

    def _through(self, url: Url) -> str:
        proxy = url.origin.proxy
        return f" through the proxy {proxy.display}" if proxy is not None else ""

    def pool(self) -> Pool:
        if self._pool is None:
            self._pool = Pool(limit=self.limits.max_connections, limit_per_host=self.limits.max_connections_per_host,
                              connect_timeout=self.timeouts.connect)
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def _open(self, method: str, url: Url, head_lines: bytes, body: Body, where: str,
                    first_byte: float) -> Response:
        try:
            return await self.pool().request(method, url, head_lines, body, first_byte=first_byte,
                                              idle=self.timeouts.idle)
        except FirstByteTimeout:
            raise OpenAIError(504, f"{where} did not answer within {first_byte:.0f} s. It may be loading the "
                                   f"model or overloaded; retry, or raise defaults.timeouts.first_byte.",
                              type="api_error", code="upstream_timeout") from None
        except ProxyFailed as exc:
            raise OpenAIError(502, f"Cannot reach {where} at {url.text}: {exc}. Check the proxy setting "
                                   f"(HTTPS_PROXY / HTTP_PROXY, NO_PROXY, or the endpoint's proxy:).",
                              type="api_error", code="proxy_failed") from None
        except TlsFailed as exc:
            raise OpenAIError(502, f"Cannot reach {where} at {url.text}{self._through(url)}: {exc}.",
                              type="api_error", code="upstream_tls_failed") from None
        except ConnectFailed as exc:
            raise OpenAIError(502, f"Cannot reach {where} at {url.text}{self._through(url)} ({exc}). Check that "
                                   f"the engine is running: GET /first/api/status.", type="api_error",
                              code="upstream_unreachable") from None
        except HTTPClientError as exc:
            raise OpenAIError(502, f"{where} closed the connection without answering ({exc}). Retry, or check "
                                   f"GET /first/api/status.", type="api_error", code="upstream_disconnected") from None

    async def request(self, method: str, url: Url, head_lines: bytes, body: Body, where: str,
                      *, first_byte: float | None = None) -> Reply:
        """One complete exchange; error statuses are returned, not raised, so callers can pass them on."""
        resp = await self._open(method, url, head_lines, body, where, first_byte or self.timeouts.first_byte)
        self._check_head(resp, where, url)
        limit = self.limits.max_response_bytes
        try:
            declared = int(resp.headers.get("content-length", "0"))
            if declared > limit:
                raise ResponseTooLarge(limit)
            data = await resp.read(limit)
        except ResponseTooLarge:
            resp.release()
            raise OpenAIError(502, f"{where} answered with more than {limit:,} bytes, over "
                                   f"defaults.limits.max_response_bytes. Ask for less (fewer tokens or inputs), "
                                   f"stream the answer, or raise the limit.", type="api_error",
                              code="upstream_response_too_large") from None
        except (TimeoutError, HTTPClientError) as exc:
            resp.release()
            if resp.status < 400:
                raise broken_off(where, exc, self.timeouts.idle) from None
            data = b""  # a refusal whose sender hung up mid-body (a proxy that did not read ours): its status is
            #             the answer that matters
        proxy = url.origin.proxy
        return Reply(resp.status, data, resp.headers.get("retry-after"), proxy.display if proxy else None,
                     resp.headers.get("content-type"))

    def _check_head(self, resp: Response, where: str, url: Url) -> None:
        """Statuses that are not the engine's answer: a redirect, or the proxy asking for credentials."""
        if 300 <= resp.status < 400:
            resp.release()
            raise redirected(resp.status, resp.headers.get("location"), where, url)
        proxy = url.origin.proxy
        if resp.status == 407 and proxy is not None:
            resp.release()
            raise OpenAIError(502, f"Cannot reach {where} at {url.text}: the proxy {proxy.display} wants "
                                   f"credentials (HTTP 407); put them in the proxy URL "
                                   f"(http://user:password@host:port).", type="api_error",
                              code="proxy_failed")

    async def stream(self, url: Url, head_lines: bytes, body: Body, where: str, *,
                     first_byte: float | None = None) -> UpstreamStream:
        """Open a streamed POST; an error status is raised here, before any byte reaches the client."""
        resp = await self._open("POST", url, head_lines, body, where, first_byte or self.timeouts.first_byte)
        self._check_head(resp, where, url)
        if resp.status >= 400:
            try:
                data = await resp.read(self.limits.max_response_bytes)
            except (TimeoutError, HTTPClientError):
                data = b""
            finally:
                resp.release()
            proxy = url.origin.proxy
            raise upstream_error(resp.status, data, where, resp.headers.get("retry-after"),
                                 proxy.display if proxy else None)
        return UpstreamStream(resp, self.timeouts.idle, where)
