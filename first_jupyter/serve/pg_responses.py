"""Response ids in the PostgreSQL database that replicas on several hosts share (``serve.state.database``), so a
call on a response (GET, DELETE, its input items, a next turn) reaches the endpoint that created it whichever
replica the load balancer hands it to.

Writes are off the request path as in SQLite (``response_ids``): ``_store`` appends to a queue on the event loop,
and one task writes what has gathered, at once rather than after a batch interval, since the next call on a
response may come through another replica a moment after its answer. A read on this replica first waits for its
own writes. While the database is away, writes wait in the queue (bounded: the oldest are dropped past
``BUFFER_LIMIT``) and calls that must read it are answered 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Final, cast

from psycopg import AsyncConnection

from first_jupyter.gateway.response_ids import KeptCopy, ResponseBook, ResponseHome
from first_jupyter.serve.pg_state import UNREACHABLE, pool, unavailable, upgrade

log = logging.getLogger(__name__)

BUFFER_LIMIT: Final = 10_000
"""Writes kept while the database is away; past it the oldest go (their responses are then unknown)."""
RETRY_S: Final = 0.5
FLUSH_S: Final = 2.0
"""How long a read waits for this replica's own writes before it reads what the database holds."""

_HOME = ('INSERT INTO responses (response_id, cluster, endpoint, model, "user", ts) VALUES (%s, %s, %s, %s, %s, %s) '
         'ON CONFLICT (response_id) DO UPDATE SET cluster = EXCLUDED.cluster, endpoint = EXCLUDED.endpoint, '
         'model = EXCLUDED.model, "user" = EXCLUDED."user", ts = EXCLUDED.ts')
_KEEP = "UPDATE responses SET answer = %s, input = %s WHERE response_id = %s"
_DELETE = "DELETE FROM responses WHERE response_id = %s"
_BOUND = "DELETE FROM responses WHERE seq <= (SELECT MAX(seq) FROM responses) - %s"


class PgResponseIds(ResponseBook):
    """A ``ResponseBook`` over PostgreSQL; made on the gateway's loop, which its writer runs on."""

    def __init__(self, url: str, most: int) -> None:
        super().__init__(most)
        self.url = url
        self._pool = pool(url)
        self._queue: deque[ResponseHome | KeptCopy | str] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="first-responses-postgres")

    def _store(self, item: ResponseHome | KeptCopy | str) -> None:
        self._queue.append(item)
        if len(self._queue) > BUFFER_LIMIT:
            self._queue.popleft()
        self._idle.clear()
        self._wake.set()

    async def _fetch(self, response_id: str) -> ResponseHome | None:
        row = await self._select('SELECT response_id, cluster, endpoint, model, "user", ts FROM responses '
                                 "WHERE response_id = %s", response_id)
        return None if row is None else ResponseHome(*cast(tuple[str, str, str, str, str, float], row))

    async def _fetch_copy(self, response_id: str) -> KeptCopy | None:
        row = await self._select("SELECT response_id, answer, input FROM responses WHERE response_id = %s AND "
                                 "answer IS NOT NULL", response_id)
        return None if row is None else KeptCopy(*cast(tuple[str, bytes, bytes], row))

    async def settled(self) -> None:
        with contextlib.suppress(TimeoutError):  # (bounded: a database that is away is a 503 on the next read)
            await asyncio.wait_for(self._idle.wait(), FLUSH_S)

    async def _select(self, query: str, response_id: str) -> tuple[object, ...] | None:
        await self.settled()  # this replica's own writes first (another's were settled before it answered)
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(query.encode(), (response_id,))
                return await cursor.fetchone()
        except UNREACHABLE as exc:
            raise unavailable(self.url, "find the response", exc) from None

    async def _write_loop(self) -> None:
        await self._pool.open(wait=False)
        upgraded = False
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                async with self._pool.connection() as conn:
                    if not upgraded:
                        await upgrade(conn)
                        upgraded = True
                    while self._queue:
                        await self._write(conn, self._queue[0])
                        self._queue.popleft()
                    await conn.execute(_BOUND, (self._most,))
            except UNREACHABLE as exc:
                log.warning("response ids wait to be written: PostgreSQL at %s: %s", self.url, exc)
                await asyncio.sleep(RETRY_S)
                self._wake.set()
                continue
            if not self._queue:
                self._idle.set()

    @staticmethod
    async def _write(conn: AsyncConnection, item: ResponseHome | KeptCopy | str) -> None:
        execute = conn.execute
        if isinstance(item, ResponseHome):
            await execute(_HOME, tuple(item))
        elif isinstance(item, KeptCopy):
            await execute(_KEEP, (item.answer, item.input, item.response_id))
        else:
            await execute(_DELETE, (item,))

    def close(self) -> None:
        """Stop the writer (``aclose`` first writes what waits)."""
        self._writer.cancel()

    async def aclose(self) -> None:
        """Write what waits (while the database answers within ``FLUSH_S``), then close the pool."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), FLUSH_S)
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        await self._pool.close()
