"""Usage records in the PostgreSQL database that replicas on several hosts share (``serve.state.database``), so a
user's ``/first/api/usage`` counts their requests whichever replica served them.

Writes are off the request path: ``record`` appends to an in-memory buffer on the event loop, and one task on the
same loop writes what has gathered in one transaction. The buffer is what carries the records through an outage:
while the database is down they wait there, and are written, in order, once it is back. It is bounded
(``buffer_limit``): past it the oldest records are dropped, counted (``dropped``, in ``/healthz``) and logged,
so a long outage costs the oldest accounting rather than the gateway's memory. Requests go on meanwhile; only
the usage answers, which must read the database, are refused with a 503.

The schema is upgraded when the writer starts (``serve.pg_state.upgrade``, under an advisory lock): at the gateway's
start, or as soon as the database can be reached if it could not be then.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

from psycopg import Error as PgError

from first_jupyter.gateway.usage import PER_MODEL, PER_USER, UsageRecord
from first_jupyter.serve.pg_state import UNREACHABLE, pool, unavailable, upgrade

log = logging.getLogger(__name__)

BUFFER_LIMIT: Final = 100_000
"""Records kept while the database is away: about 30 MB, minutes of a busy facility's traffic."""
BATCH_ROWS: Final = 1_000
"""Rows written in one transaction at most: a backlog after an outage goes in steps, none holding a lock long."""
RETRY_S: Final = 0.5
"""How long the writer waits before trying the database again after it failed."""
FLUSH_S: Final = 2.0
"""How long a usage answer waits for this replica's buffered records before it reads what the database holds."""

_COLUMNS = ", ".join(f'"{name}"' for name in UsageRecord._fields)
_INSERT = (f"INSERT INTO usage ({_COLUMNS}) "  # noqa: S608 (field names, not input)
           f"VALUES ({', '.join('%s' for _ in UsageRecord._fields)})")
_PG = {"failed": "(status >= 400)::int", "row": "id", "user": '"user"', "who": "%(user)s::text"}


class PgUsage:
    """A ``UsageLog`` over PostgreSQL; made on the gateway's loop, which its writer runs on."""

    def __init__(self, url: str, *, batch_interval: float = 0.25, buffer_limit: int = BUFFER_LIMIT) -> None:
        self.url = url
        self._pool = pool(url)
        self._interval = batch_interval
        self._limit = buffer_limit
        self._buffer: deque[UsageRecord] = deque()
        self._writing = 0
        """Records taken off the buffer by the write under way."""
        self.dropped = 0
        """Records dropped, oldest first, because the buffer was full while the database was away."""
        self._handed = 0
        """Records handed to ``record``: ``_settled`` reaches it once each is written or dropped."""
        self._settled = 0
        self._progress = asyncio.Event()
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()
        self._closing = False
        self.outage: BaseException | None = None
        """Why the last write or schema upgrade failed, while the database has not answered since."""
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="first-usage-postgres")

    @property
    def buffered(self) -> int:
        """Records waiting to be written (the write under way included)."""
        return len(self._buffer) + self._writing

    def record(self, rec: UsageRecord) -> None:
        self._buffer.append(rec)
        self._handed += 1
        if len(self._buffer) > self._limit:
            self._buffer.popleft()
            self._drop(1)
        self._wake.set()

    async def flush(self, within: float = 5.0) -> bool:
        """Wait until every record handed to ``record`` before this call is written (or dropped), at most
        ``within`` seconds; whether it was."""
        target, deadline = self._handed, time.monotonic() + within
        self._hurry.set()
        self._wake.set()
        while self._settled < target and not self._writer.done():
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._progress.wait(), deadline - time.monotonic())
            if time.monotonic() >= deadline:
                break
        return self._settled >= target

    async def per_model(self, user: str | None) -> list[tuple[object, ...]]:
        return await self._read(PER_MODEL.format(**_PG), {"user": user})

    async def per_user(self) -> list[tuple[object, ...]]:
        return await self._read(PER_USER.format(**_PG), {})

    async def reachable(self) -> BaseException | None:
        """None if the database answers now; else why not."""
        try:
            async with self._pool.connection() as conn:
                await conn.execute("SELECT 1")
        except UNREACHABLE as exc:
            return exc
        return None

    async def aclose(self) -> None:
        """Write what is buffered (while the database answers within ``FLUSH_S``), then close the pool."""
        self._closing = True
        self._hurry.set()
        self._wake.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._writer), FLUSH_S)
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._writer
        if self._buffer:
            log.error("%d usage records not written: PostgreSQL at %s did not answer as the gateway stopped",
                      len(self._buffer), self.url)
        await self._pool.close()

    async def _read(self, query: str, params: dict[str, object]) -> list[tuple[object, ...]]:
        if self.outage is None:  # this replica's recent requests (another's are written within its interval)
            await self.flush(FLUSH_S)
        try:
            async with self._pool.connection() as conn:
                cursor = await conn.execute(query.encode(), params)
                return await cursor.fetchall()
        except UNREACHABLE as exc:
            raise unavailable(self.url, "read usage", exc) from None

    def _drop(self, count: int) -> None:
        if not self.dropped:
            log.error("usage buffer full (%d records) while PostgreSQL at %s is away: dropping the oldest records",
                      self._limit, self.url)
        self.dropped += count
        self._settle(count)

    def _settle(self, count: int) -> None:
        self._settled += count
        self._progress.set()

    async def _write_loop(self) -> None:
        await self._pool.open(wait=False)
        while not await self._attempt(self._upgrade):
            if self._closing:
                return
            await asyncio.sleep(RETRY_S)
        while not self._closing or self._buffer:
            if not self._buffer:
                await self._wake.wait()
                self._wake.clear()
                if not self._hurry.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._hurry.wait(), self._interval)
                self._hurry.clear()
            if self._buffer and not await self._attempt(self._write_batch):
                if self._closing:
                    return  # what is left is reported by ``aclose``
                await asyncio.sleep(RETRY_S)

    async def _upgrade(self) -> None:
        async with self._pool.connection() as conn:
            await upgrade(conn)

    async def _write_batch(self) -> None:
        """The oldest records, in one transaction. They leave the buffer while being written (``record`` may drop
        the oldest meanwhile, never these); a failed write puts them back in front, within the bound."""
        batch = [self._buffer.popleft() for _ in range(min(len(self._buffer), BATCH_ROWS))]
        self._writing = len(batch)
        try:
            async with self._pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
                await cursor.executemany(_INSERT.encode(), batch)
        except PgError as exc:
            if not isinstance(exc, UNREACHABLE):  # the rows themselves: trying again would fail again
                log.error("%d usage records refused by PostgreSQL at %s: %s", len(batch), self.url, exc)
                self._settle(len(batch))
                return
            self._put_back(batch)
            raise
        except (OSError, asyncio.CancelledError):
            self._put_back(batch)
            raise
        finally:
            self._writing = 0
        self._settle(len(batch))

    def _put_back(self, batch: list[UsageRecord]) -> None:
        """``batch``, not written, in front of the buffer again; past the bound, the oldest go."""
        self._buffer.extendleft(reversed(batch))
        excess = len(self._buffer) - self._limit
        for _ in range(excess):
            self._buffer.popleft()
        if excess > 0:
            self._drop(excess)

    async def _attempt(self, step: Callable[[], Awaitable[None]]) -> bool:
        """Run ``step``; False if the database could not be reached, which is logged once per outage."""
        try:
            await step()
        except UNREACHABLE as exc:
            if self.outage is None:
                log.warning("PostgreSQL at %s unreachable (%s); usage records wait in memory (%d now, at most %d)",
                            self.url, exc, self.buffered, self._limit)
            self.outage = exc
            return False
        if self.outage is not None:
            log.warning("PostgreSQL at %s is back; writing %d buffered usage records", self.url, self.buffered)
            self.outage = None
        return True
