"""The gateway's one pooled HTTP client to upstream engines, with idle timeouts.

One ``aiohttp.ClientSession`` per gateway keeps connections to each engine alive across requests (a new TCP
connection per request would double the added latency). Timeouts are idle timeouts: the response headers
must come within ``first_byte`` seconds and each later chunk within ``idle`` seconds, so a generation that
keeps streaming for an hour is never cut, while a stuck engine is noticed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aiohttp
import orjson
from yarl import URL

from first_jupyter.config import Limits, Timeouts
from first_jupyter.protocol import OpenAIError

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error"}


@dataclass(slots=True)
class Reply:
    """A complete (non-streamed) upstream answer."""

    status: int
    body: bytes
    retry_after: str | None = None


def upstream_error(status: int, body: bytes, where: str, retry_after: str | None = None) -> OpenAIError:
    """Turn an upstream error response into an OpenAI error, keeping an OpenAI-shaped message as it is."""
    message = body[:500].decode(errors="replace").strip() or f"HTTP {status}"
    code: str | None = None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            message, code = str(err["message"]), err.get("code")
        elif isinstance(err, str):
            message = err
        elif "detail" in data:  # FastAPI-style engines (transformers serve)
            message = str(data["detail"])
        elif "message" in data:
            message = str(data["message"])
    status_out = 400 if status == 422 else status
    hint = {429: " The engine is busy; retry after a short wait.",
            503: " The engine is not ready; retry shortly or check GET /first/api/status."}.get(status_out, "")
    return OpenAIError(status_out, f"{where} answered HTTP {status}: {message}.{hint}",
                       type=_ERROR_TYPES.get(status_out, "api_error"), code=code or "upstream_error",
                       headers={"Retry-After": retry_after} if retry_after else None)


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

    __slots__ = ("_idle", "_resp", "_where", "on_close")

    def __init__(self, resp: aiohttp.ClientResponse, idle: float, where: str) -> None:
        self._resp = resp
        self._idle = idle
        self._where = where
        self.on_close: Callable[[], None] | None = None  # lets a backend count streams still open

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        idle = self._idle
        try:
            while True:
                async with asyncio.timeout(idle):
                    chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise broken_off(self._where, exc, idle) from None

    def close(self) -> None:
        """Release the connection; one not read to the end is closed so the engine stops generating."""
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None


class UpstreamClient:
    """Shared, lazily created connection pool for every backend of one gateway."""

    def __init__(self, timeouts: Timeouts, limits: Limits) -> None:
        self.timeouts = timeouts
        self.limits = limits
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeouts.connect, sock_connect=timeouts.connect)

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.limits.max_connections,
                                             limit_per_host=self.limits.max_connections_per_host,
                                             keepalive_timeout=60, enable_cleanup_closed=False)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                                  auto_decompress=False, skip_auto_headers=("User-Agent",))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _open(self, method: str, url: URL, body: bytes | None, headers: Mapping[str, str],
                    where: str, first_byte: float) -> aiohttp.ClientResponse:
        try:
            async with asyncio.timeout(first_byte):
                return await self.session().request(method, url, data=body, headers=headers)
        except TimeoutError:
            raise OpenAIError(504, f"{where} did not answer within {first_byte:.0f} s. It may be loading the "
                                   f"model or overloaded; retry, or raise defaults.timeouts.first_byte.",
                              type="api_error", code="upstream_timeout") from None
        except aiohttp.ClientError as exc:
            raise OpenAIError(502, f"Cannot reach {where} at {url.origin()} ({exc.__class__.__name__}: {exc}). "
                                   f"Check that the engine is running: GET /first/api/status.",
                              type="api_error", code="upstream_unreachable") from None

    async def request(self, method: str, url: URL, body: bytes | None, headers: Mapping[str, str], where: str,
                      *, first_byte: float | None = None) -> Reply:
        """One complete exchange; error statuses are returned, not raised, so callers can pass them on."""
        resp = await self._open(method, url, body, headers, where, first_byte or self.timeouts.first_byte)
        try:
            async with asyncio.timeout(self.timeouts.idle):
                data = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            resp.close()
            raise broken_off(where, exc, self.timeouts.idle) from None
        resp.release()
        return Reply(resp.status, data, resp.headers.get("Retry-After"))

    async def stream(self, url: URL, body: bytes, headers: Mapping[str, str], where: str) -> UpstreamStream:
        """Open a streamed POST; an error status is raised here, before any byte reaches the client."""
        resp = await self._open("POST", url, body, headers, where, self.timeouts.first_byte)
        if resp.status >= 400:
            try:
                async with asyncio.timeout(self.timeouts.idle):
                    data = await resp.read()
            except (TimeoutError, aiohttp.ClientError):
                data = b""
            finally:
                resp.close()
            raise upstream_error(resp.status, data, where, resp.headers.get("Retry-After"))
        return UpstreamStream(resp, self.timeouts.idle, where)
