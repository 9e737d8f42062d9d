"""Remote streams across replicas (``serve.state.redis``): a node's callback batch reaches the client's stream
whichever replica the load balancer hands the POST to.

With replicas, the replica that holds a client's stream (its *owner*, which submitted the task) is only one of
several behind the callback URL. So every batch goes through Redis, whichever replica receives it, the owner
included: the task's key and its next sequence number live in a hash (``first:callback:{task}``), and the batches
in a Redis Stream (``…:batches``) that the owner reads as its client takes them.

Why Redis Streams and not pub/sub: a stream keeps what was added until it is read, so a batch added while the
owner is between two reads (or reconnecting) is not lost, and its length is the backlog that the bound below
counts; pub/sub delivers only to whoever listens at that instant, and needs an acknowledgement protocol of its own
to be complete. Why every batch goes through Redis, the owner's own included: the node sends batch n+1 as soon as
batch n is answered, and the two may reach different replicas; one ordered path is what keeps them in order.

Checks, wherever the batch lands: its HMAC against the task's key read from Redis, then, in one Lua script, its
sequence number against the task's next (a replayed or reordered batch is refused with 409 whichever replica it
reaches, since the number is taken in Redis), the bound, and the append.

Backpressure: the owner reads a batch only when its client's relay asks for the next one (``RemoteAnswer.pipe``
waits while the client drains). A backlog of ``MAX_BACKLOG`` batches is refused by the script rather than trimmed
(``XADD MAXLEN`` would drop the oldest unread batch: the client's answer would have a hole). The replica that
received the batch then holds the POST open, woken by the owner's word that it took some (a one-token list it
BLPOPs), so the node, which sends its batches one at a time, waits as it would for a slow gateway. Past
``FULL_WAIT_S`` it answers ``BUSY`` (429), which the node takes as "send it again" (``StreamCallback.post``):
the POST is never left open past the node's own timeout, and a client that left closes the task, so the retry is
refused (403) and the node stops. Redis holds at most ``MAX_BACKLOG`` batches of ``BATCH_BYTES`` per stream.

Closing a stream deletes its keys, which is how a node whose client left learns it (403) on any replica; keys of
a replica that died expire after ``KEY_TTL_S`` without a batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import orjson

from first_jupyter.gateway.backends.compute.callbacks import (
    ACCEPTED,
    ALIVE,
    OUT_OF_ORDER,
    REFUSED,
    RemoteStream,
    signed_message,
)
from first_jupyter.remote.inference import BUSY
from first_jupyter.serve.redis_state import UNREACHABLE, unavailable

if TYPE_CHECKING:
    import redis.asyncio

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BACKLOG: Final = 64
"""Batches of one stream waiting in Redis for its client at most: about 1 MB (``BATCH_BYTES`` each)."""
FULL_WAIT_S: Final = 10.0
"""How long a POST is held while the backlog is full before it is answered ``BUSY``: well inside the node's
``CALLBACK_TIMEOUT_S``."""
WAIT_SLICE_S: Final = 1
"""One blocking Redis wait (BLPOP, XREAD BLOCK) at most: under the client's command timeout."""
READ_COUNT: Final = 8
"""Batches the owner reads in one XREAD."""
KEY_TTL_S: Final = 3600
"""A stream's keys outlive their last batch by this much when no replica closes them (its owner died)."""
MAX_TASK_CHARS: Final = 64
"""Task ids are 22 characters (``secrets.token_urlsafe(16)``); a longer one is no task's."""

_DELIVER = """
local nxt = redis.call('HGET', KEYS[1], 'next')
if not nxt then return 'gone' end
if tonumber(ARGV[1]) ~= tonumber(nxt) then return 'order' end
redis.call('HSET', KEYS[1], 'started', '1')
redis.call('EXPIRE', KEYS[1], ARGV[4])
if ARGV[2] == '1' then return 'ok' end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[5]) then return 'full' end
redis.call('XADD', KEYS[2], '*', 'm', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
redis.call('HINCRBY', KEYS[1], 'next', 1)
return 'ok'
"""
"""KEYS: the task's hash, its batches. ARGV: seq, whether it is the node's word that it works (no place in the
sequence), the body, the keys' TTL, the bound. 'gone' (closed or unknown), 'order', 'full' or 'ok'."""
_VERDICTS: Final = {b"gone": REFUSED, b"order": OUT_OF_ORDER, b"ok": ACCEPTED}


def _awaited(call: Awaitable[T] | T) -> Awaitable[T]:
    """redis-py types its commands for both of its clients (a value, or an awaitable); the asyncio one's are
    awaitables."""
    return cast(Awaitable[T], call)


def _hash(task_id: str) -> str:
    return f"first:callback:{task_id}"


def _batches(task_id: str) -> str:
    return f"first:callback:{task_id}:batches"


def _room(task_id: str) -> str:
    return f"first:callback:{task_id}:room"


class RedisCallbacks:
    """The remote streams' shared half: registration, delivery from any replica, reading by the owner."""

    def __init__(self, client: redis.asyncio.Redis, url: str) -> None:
        self.client = client
        self.url = url
        self._deliver = client.register_script(_DELIVER)
        self._closing: set[asyncio.Task[None]] = set()

    async def open(self, task_id: str, key: str, where: str) -> SharedStream:
        """A stream for a new task, known to every replica before its node can be sent it."""
        stream = SharedStream(task_id, key, asyncio.get_running_loop(), where, self)
        try:
            fields = {"key": stream.key, "next": 0, "started": 0}
            await _awaited(self.client.hset(_hash(stream.task_id), mapping=fields))
            await _awaited(self.client.expire(_hash(stream.task_id), KEY_TTL_S))
        except UNREACHABLE as exc:
            raise unavailable(self.url, "open the stream's callback", exc) from None
        return stream

    async def deliver(self, task_id: str, seq: str, signature: str, body: bytes) -> int:
        """One batch, received by this replica for whichever holds its stream: the status to answer."""
        if not seq.isdigit() or len(task_id) > MAX_TASK_CHARS:
            return REFUSED
        try:
            return await self._deliver_checked(task_id, int(seq), signature, body)
        except UNREACHABLE as exc:
            raise unavailable(self.url, "hand the batch to its stream", exc) from None

    async def _deliver_checked(self, task_id: str, seq: int, signature: str, body: bytes) -> int:
        key = cast(bytes | None, await _awaited(self.client.hget(_hash(task_id), "key")))
        message = None if key is None else signed_message(key.decode(), task_id, seq, signature, body)
        if message is None:
            return REFUSED
        keys = [_hash(task_id), _batches(task_id)]
        args: list[bytes | int] = [seq, int(message == ALIVE), body, KEY_TTL_S, MAX_BACKLOG]
        deadline = time.monotonic() + FULL_WAIT_S
        while (verdict := await self._deliver(keys=keys, args=args)) == b"full":
            if time.monotonic() >= deadline:
                return BUSY
            await _awaited(self.client.blpop([_room(task_id)], timeout=WAIT_SLICE_S))  # the owner took some
        return _VERDICTS[verdict]

    async def started(self, task_id: str) -> bool:
        """Whether the node has said anything about the task (to any replica)."""
        try:
            started = cast(bytes | None, await _awaited(self.client.hget(_hash(task_id), "started")))
            return started == b"1"
        except UNREACHABLE:
            return True  # unknown: taken to run, so its end is waited for rather than cut short

    async def read(self, task_id: str, after: str, block: bool) -> list[tuple[str, dict[str, Any]]]:
        """The batches after ``after`` (a stream id), at most ``READ_COUNT``, waiting up to ``WAIT_SLICE_S`` for
        one when ``block``; each is deleted as it is read, and a node held back by a full backlog is woken."""
        task = _batches(task_id)
        found: list[Any] = await _awaited(self.client.xread({task: after}, count=READ_COUNT,
                                                            block=WAIT_SLICE_S * 1000 if block else None))
        entries = [(ident.decode(), orjson.loads(fields[b"m"])) for _, batch in found for ident, fields in batch]
        if entries:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.xdel(task, *(ident for ident, _ in entries))
                pipe.lpush(_room(task_id), 1)
                pipe.ltrim(_room(task_id), 0, 0)
                pipe.expire(_room(task_id), KEY_TTL_S)
                await pipe.execute()
        return entries

    def forget(self, task_id: str) -> None:
        """The stream is closed: its keys go (in the background: closing is synchronous), and whatever the node
        sends about it from now on is refused, whichever replica receives it."""
        task = asyncio.get_running_loop().create_task(self._delete(task_id))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def settle(self) -> None:
        """Wait for the closed streams' keys to be deleted (before the client is closed)."""
        await asyncio.gather(*self._closing)

    async def _delete(self, task_id: str) -> None:
        try:
            await self.client.delete(_hash(task_id), _batches(task_id), _room(task_id))
        except UNREACHABLE as exc:  # they expire (KEY_TTL_S); meanwhile the node's batches wait unread
            log.warning("could not delete the closed stream %s's keys in Redis: %s", task_id, exc)


class SharedStream(RemoteStream):
    """A stream whose node's batches come through Redis (``RedisCallbacks``); the task's own end, which only the
    owner sees, still comes through the local queue, after every batch the node sent before it ended."""

    def __init__(self, task_id: str, key: str, loop: asyncio.AbstractEventLoop, where: str,
                 shared: RedisCallbacks) -> None:
        super().__init__(task_id, key, loop, where)
        self._shared = shared
        self._after = "0-0"
        self._read: asyncio.Task[list[dict[str, Any]]] | None = None
        self._held: deque[dict[str, Any]] = deque()

    async def next_message(self) -> dict[str, Any]:
        """The next batch from Redis; the task's end once every batch added before it has been read (a node
        answers its last batch before its task ends, so Redis holds them all by then)."""
        while not self._held:
            if self._read is None:
                self._read = asyncio.ensure_future(self._take(block=True))
            ended = asyncio.ensure_future(self.queue.get())
            try:
                await asyncio.wait({self._read, ended}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not ended.done():
                    ended.cancel()
            if self._read.done():
                self._held.extend(self._read.result())
                self._read = None
            if ended.done() and not ended.cancelled():
                await self._drain()
                self._held.append(ended.result())
        return self._held.popleft()

    async def _drain(self) -> None:
        """Every batch still in Redis, before the task's end."""
        if self._read is not None:
            self._read.cancel()
            self._read = None
        while batch := await self._take(block=False):
            self._held.extend(batch)

    async def _take(self, block: bool) -> list[dict[str, Any]]:
        try:
            entries = await self._shared.read(self.task_id, self._after, block)
        except UNREACHABLE as exc:
            return [{"error": f"its batches could not be read from Redis: {type(exc).__name__}"}]
        if entries:
            self._after = entries[-1][0]
        return [message for _, message in entries]

    def close(self) -> None:
        if self._read is not None:
            self._read.cancel()
