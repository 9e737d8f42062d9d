"""Streams that come back from endpoint nodes as signed batches POSTed to the gateway's callback route.

A node cannot hold a connection open to the client: Globus Compute returns one result per task. So the function
on the node (``remote.inference.stream_engine``) POSTs the events in batches to ``/first/api/callback``, each
signed with a key made for that task alone and sent to the node inside the task itself. Batches go into the
waiting stream's queue as they arrive (no polling); the stream ends on the node's ``done`` or ``error`` message,
or when nothing comes for the idle timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import threading
from collections.abc import AsyncIterator
from typing import Any

import orjson

from first_jupyter.protocol import OpenAIError
from first_jupyter.remote.inference import sign

ACCEPTED, REFUSED, OUT_OF_ORDER = 204, 403, 409


class RemoteStream:
    """One task's stream: where the node's batches wait until the client's relay takes them."""

    def __init__(self, task_id: str, key: str, loop: asyncio.AbstractEventLoop) -> None:
        self.task_id = task_id
        self.key = key
        self.loop = loop
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.next_seq = 0

    async def chunks(self, idle_timeout: float) -> AsyncIterator[bytes]:
        """The event bytes as the node sends them; ``OpenAIError`` when the node reports a failure or goes
        silent (a node that died sends nothing more)."""
        while True:
            try:
                message = await asyncio.wait_for(self.queue.get(), idle_timeout)
            except TimeoutError:
                raise OpenAIError(504, f"The endpoint's node sent nothing for {idle_timeout:g} s; the stream is "
                                       "ended. Retry; if it persists, check the cluster's status.",
                                  type="api_error", code="upstream_idle_timeout") from None
            if "error" in message:
                raise OpenAIError(502, f"The stream failed on the endpoint's node: {message['error']}",
                                  type="api_error", code="remote_error")
            if message.get("done"):
                return
            yield str(message.get("data", "")).encode()


class CallbackHub:
    """The open remote streams, by task id; ``deliver`` is safe to call from any thread."""

    def __init__(self) -> None:
        self._streams: dict[str, RemoteStream] = {}
        self._lock = threading.Lock()

    def open(self) -> RemoteStream:
        """A stream for a new task, with its own key (on the gateway's loop, which its queue belongs to)."""
        stream = RemoteStream(secrets.token_urlsafe(16), secrets.token_urlsafe(32), asyncio.get_running_loop())
        with self._lock:
            self._streams[stream.task_id] = stream
        return stream

    def close(self, stream: RemoteStream) -> None:
        """The client's stream ended: later batches for this task are refused."""
        with self._lock:
            self._streams.pop(stream.task_id, None)

    def deliver(self, task_id: str, seq: str, signature: str, body: bytes) -> int:
        """Take one batch: the HTTP status to answer. A bad signature (or an unknown task, which is answered
        alike so as not to say which tasks exist) is refused and changes nothing for the real stream."""
        with self._lock:
            stream = self._streams.get(task_id)
            if stream is None or not seq.isdigit():
                return REFUSED
            if not hmac.compare_digest(sign(stream.key, task_id, int(seq), body), signature):
                return REFUSED
            if int(seq) != stream.next_seq:
                return OUT_OF_ORDER
            try:
                message = orjson.loads(body)
            except orjson.JSONDecodeError:
                return REFUSED
            if not isinstance(message, dict):
                return REFUSED
            stream.next_seq += 1
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, message)
        return ACCEPTED
