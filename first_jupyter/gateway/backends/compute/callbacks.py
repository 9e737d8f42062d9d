"""Streams that come back from endpoint nodes as signed batches POSTed to the gateway's callback route.

A node cannot hold a connection open to the client: Globus Compute returns one result per task. So the function
on the node (``remote.inference.stream_engine``) POSTs the events in batches to ``/first/api/callback``, each
signed with a key made for that task alone and sent to the node inside the task itself. Batches go into the
waiting stream's queue as they arrive (no polling); the stream ends on the node's ``done`` or ``error`` message,
or when nothing comes for the idle timeout; the task's own end (its future) is watched as well, so a node that
dies ends the stream at once instead of at the idle timeout.

Closing a task here is also how its node learns to stop: whatever it sends about a closed task is refused, and a
node that is refused ends its engine's work. A plain request is opened here too, for that alone: its node sends
only its word that it still works (``ALIVE``), and its answer comes back as the task's result.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any, Protocol

import orjson

from first_jupyter.gateway.upstream import upstream_error
from first_jupyter.protocol import OpenAIError
from first_jupyter.remote.inference import sign

ACCEPTED, REFUSED, OUT_OF_ORDER = 204, 403, 409
ALIVE = {"alive": True}
"""What a node sends while it computes an answer and has sent nothing else for a while: the answer, 204 or 403,
tells it whether the answer is still wanted (``remote.leash``)."""
CALLBACK_PATH = "/first/api/callback"


class RemoteStream:
    """One task's stream: where the node's batches, and the task's own end, wait until the client's relay takes
    them."""

    def __init__(self, task_id: str, key: str, loop: asyncio.AbstractEventLoop, where: str) -> None:
        self.task_id = task_id
        self.key = key
        self.loop = loop
        self.where = where
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.next_seq = 0
        self.started = False
        """Whether the node has said anything: its task runs, and the engine works on it until the node is told to
        stop (its next word is refused once the stream is closed here)."""

    def watch(self, task: Future[Any], describe: Callable[[BaseException], str]) -> None:
        """Put the task's end in the queue too: a task that failed (its node died, its function raised) ends
        the stream at once, and one that returned without a callback brings the whole stream as its result."""
        def ended(done: Future[Any]) -> None:
            if done.cancelled():
                message: dict[str, Any] = {"error": "the task was cancelled"}
            elif (exc := done.exception()) is not None:
                message = {"error": describe(exc)}
            else:
                message = {"result": done.result()}
            self.loop.call_soon_threadsafe(self.queue.put_nowait, message)

        task.add_done_callback(ended)

    async def chunks(self, idle_timeout: float, first_timeout: float | None = None) -> AsyncIterator[bytes]:
        """The event bytes as the node sends them; ``OpenAIError`` when the node reports a failure or goes
        silent (a node that died sends nothing more). ``first_timeout``: the wait for the first message (a
        cold start), when longer than the idle timeout."""
        timeout = first_timeout or idle_timeout
        while True:
            try:
                message = await asyncio.wait_for(self.next_message(), timeout)
            except TimeoutError:
                raise OpenAIError(504, f"{self.where} sent nothing for {timeout:g} s; the stream is ended. Retry; "
                                       "if it persists, check the cluster's status.",
                                  type="api_error", code="upstream_idle_timeout") from None
            timeout = idle_timeout
            if "error" in message:
                raise OpenAIError(502, f"The stream failed on {self.where}: {message['error']}",
                                  type="api_error", code="remote_error")
            if message.get("done"):
                return
            if "result" in message:  # the task ended without a done message: no callback URL, or a refusal
                result = message["result"] if isinstance(message["result"], dict) else {}
                body = str(result.get("body") or "").encode()
                if int(result.get("status") or 502) >= 400:
                    raise upstream_error(int(result.get("status") or 502), body, self.where)
                if body:
                    yield body
                return
            yield str(message.get("data", "")).encode()

    async def next_message(self) -> dict[str, Any]:
        """The node's next message, or the task's end: here, as they were put in the queue."""
        return await self.queue.get()

    def close(self) -> None:
        """Nothing to release here: the queue goes with the stream (a shared stream stops reading Redis)."""


class StreamHandOff(Protocol):
    """Where replicas that share Redis open, feed and close remote streams (``serve.redis_streams``), so that a
    node's batch may reach any replica and still come to the one holding the client."""

    async def open(self, task_id: str, key: str, where: str) -> RemoteStream: ...

    async def deliver(self, task_id: str, seq: str, signature: str, body: bytes) -> int: ...

    async def started(self, task_id: str) -> bool: ...

    def forget(self, task_id: str) -> None: ...


class CallbackHub:
    """The open remote streams, by task id; ``deliver`` is safe to call from any thread."""

    def __init__(self, shared: StreamHandOff | None = None) -> None:
        """``shared``: for replicas that share Redis; None on one host, where streams live in this process."""
        self.shared = shared
        self._streams: dict[str, RemoteStream] = {}
        self._lock = threading.Lock()
        self.accepted = self.refused = 0
        """Batches taken and refused since start, for the status API (a refusal count that grows says that
        something is posting batches it has no key for)."""

    def tasks(self) -> list[str]:
        """The tasks whose streams are open."""
        with self._lock:
            return list(self._streams)

    def open(self, where: str = "the endpoint's node") -> RemoteStream:
        """A stream for a new task, with its own key (on the gateway's loop, which its queue belongs to)."""
        stream = RemoteStream(secrets.token_urlsafe(16), secrets.token_urlsafe(32), asyncio.get_running_loop(),
                              where)
        with self._lock:
            self._streams[stream.task_id] = stream
        return stream

    async def begin(self, where: str = "the endpoint's node") -> RemoteStream:
        """``open``, or through Redis where replicas share it (known to all of them before this returns)."""
        if self.shared is None:
            return self.open(where)
        stream = await self.shared.open(secrets.token_urlsafe(16), secrets.token_urlsafe(32), where)
        with self._lock:
            self._streams[stream.task_id] = stream
        return stream

    def close(self, stream: RemoteStream) -> None:
        """The client's stream or request ended: whatever the node sends about this task is refused from now on,
        and that stops its work."""
        with self._lock:
            known = self._streams.pop(stream.task_id, None) is not None
        stream.close()
        if known and self.shared is not None:
            self.shared.forget(stream.task_id)

    async def started(self, stream: RemoteStream) -> bool:
        """Whether the node has said anything about the task (to any replica, where they share Redis)."""
        return stream.started if self.shared is None else await self.shared.started(stream.task_id)

    async def receive(self, task_id: str, seq: str, signature: str, body: bytes) -> int:
        """``deliver`` from the callback route: through Redis where replicas share it, whichever holds the
        stream."""
        if self.shared is None:
            return self.deliver(task_id, seq, signature, body)
        answer = await self.shared.deliver(task_id, seq, signature, body)
        if answer == ACCEPTED:
            self.accepted += 1
        elif answer in (REFUSED, OUT_OF_ORDER):
            self.refused += 1
        return answer

    def deliver(self, task_id: str, seq: str, signature: str, body: bytes) -> int:
        """Take one batch: the HTTP status to answer. A bad signature (or an unknown task, which is answered
        alike so as not to say which tasks exist) is refused and changes nothing for the real stream."""
        with self._lock:
            answer, message, stream = self._check(task_id, seq, signature, body)
            alive = message == ALIVE
            if answer == ACCEPTED:
                stream.started = True
                if not alive:  # the node's word that it works on the task takes no place in the sequence
                    self.accepted += 1
                    stream.next_seq += 1
            else:
                self.refused += 1
        if answer == ACCEPTED and not alive:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, message)
        return answer

    def _check(self, task_id: str, seq: str, signature: str, body: bytes) -> tuple[int, Any, Any]:
        stream = self._streams.get(task_id)
        if stream is None or not seq.isdigit():
            return REFUSED, None, None
        message = signed_message(stream.key, task_id, int(seq), signature, body)
        if message is None:
            return REFUSED, None, None
        if int(seq) != stream.next_seq:
            return OUT_OF_ORDER, None, None
        return ACCEPTED, message, stream


def signed_message(key: str, task_id: str, seq: int, signature: str, body: bytes) -> dict[str, Any] | None:
    """A node's batch as its message, when it is signed with the task's key and is a JSON object; None for any
    other (refused, whichever replica received it: ``serve.redis_streams`` checks batches with it too)."""
    if not hmac.compare_digest(sign(key, task_id, seq, body), signature):
        return None
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return message if isinstance(message, dict) else None
