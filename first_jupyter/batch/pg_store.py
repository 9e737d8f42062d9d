"""Files and batches for replicas on several hosts: their records in the PostgreSQL database they share
(``serve.state.database``, schema version 2 of ``serve.pg_state``), their contents under
``serve.state.files_dir``, which every replica mounts. Any replica answers for any file or batch; a batch is run
by the replica holding its lease.

The store is read and written in place, as its SQLite twin is (the API's answers and the run's saves are not
coroutines), on a blocking pool: a query on the site's network takes a millisecond. While the database cannot be
reached, a call waits at most the pool's timeout (``serve.pg_state.CONNECT_TIMEOUT_S``) and raises the 503 that says so.

A lease is a batch row's ``holder`` and ``lease_until``, on the database's clock (no two hosts' clocks are
compared). A run renews it every third of ``serve.state.batch_lease_s``; a replica killed mid-run stops renewing,
and once the lease lapses another replica's resumer claims the batch and resumes it from its result files, as a
gateway on one host does after a restart: every custom_id ends in the output or error file exactly once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import orjson
from psycopg import Connection

from first_jupyter.batch.claims import Claim, Claims
from first_jupyter.batch.store import FILE_COLUMNS, NOT_FINAL, BatchStore, StoredFile, new_id, page_query
from first_jupyter.protocol import OpenAIError
from first_jupyter.serve.pg_state import UNREACHABLE, sync_pool, unavailable, upgrade_blocking

RENEWALS_PER_LEASE: Final = 3
"""A lease is renewed this many times within its length: a renewal late or lost once does not let it lapse."""
_LAPSED: Final = "(holder IS NULL OR lease_until <= now())"
"""A batch no run holds: never claimed, let go, or its holder's lease run out (on the database's clock)."""
_CLAIM: Final = ("UPDATE batches SET holder = %s, lease_until = now() + make_interval(secs => %s) "  # noqa: S608
                 f"WHERE id = %s AND {_LAPSED} RETURNING id")


class PgBatchState:
    """This replica's part in the shared files and batches: the pool, its name as a lease holder, the lease."""

    def __init__(self, url: str, files_dir: Path, lease_s: float) -> None:
        self.url = url
        self.files_dir = files_dir
        self.lease_s = lease_s
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._pool = sync_pool(url)
        self._schema = False

    @contextlib.contextmanager
    def connection(self) -> Iterator[Connection[Any]]:
        """A connection, the schema upgraded first (at the first use, so that a database down at the gateway's
        start does not stop it); the 503 that says so while the database cannot be reached."""
        try:
            with self._pool.connection() as conn:
                if not self._schema:
                    upgrade_blocking(self.url)
                    self._schema = True
                yield conn
        except UNREACHABLE as exc:
            raise unavailable(self.url, "read or write files and batches", exc) from None

    def store(self, root: Path, owner: str) -> PgStore:
        return PgStore(self, root, owner)

    def orphaned_owners(self) -> list[str]:
        """The owners of unfinished batches that no run holds: what this replica's resumer may take up."""
        with self.connection() as conn:
            return [owner for (owner,) in conn.execute(
                f"SELECT DISTINCT owner FROM batches WHERE {NOT_FINAL} AND {_LAPSED}")]  # noqa: S608 (fixed)

    def close(self) -> None:
        self._pool.close()


class PgStore(BatchStore):
    """One owner's files and batches: rows of the shared database, contents under ``root`` (in ``files_dir``)."""

    def __init__(self, state: PgBatchState, root: Path, owner: str) -> None:
        super().__init__(root)
        self.state = state
        self.owner = owner

    def close(self) -> None:
        """The pool is the replica's (``PgBatchState.close``)."""

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        with self.state.connection() as conn:
            cursor = conn.execute(sql, args)  # (queries of this module: names and placeholders, no input)
            return cursor.fetchall() if cursor.description is not None else []

    # -- files ------------------------------------------------------------------------------------------------

    def add_file(self, purpose: str, filename: str, size: int, lines: int, file_id: str | None = None) -> StoredFile:
        record = StoredFile(file_id or new_id("file-"), purpose, filename, size, lines, int(time.time()))
        self._rows("INSERT INTO batch_files (id, owner, purpose, filename, bytes, lines, created_at) VALUES "
                   "(%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                   (record.id, self.owner, purpose, filename, size, lines, record.created_at))
        return self.file(record.id) or record

    def file(self, file_id: str) -> StoredFile | None:
        rows = self._rows(f"SELECT {FILE_COLUMNS} FROM batch_files WHERE id = %s AND owner = %s",  # noqa: S608
                          (file_id, self.owner))
        return StoredFile(*rows[0]) if rows else None

    def files(self, purpose: str | None, after: str | None, limit: int, newest_first: bool) -> tuple[
            list[StoredFile], bool]:
        sql, args = page_query("batch_files", FILE_COLUMNS, {"owner": self.owner, "purpose": purpose}, after,
                               newest_first, "%s")
        rows = self._rows(sql, (*args, limit + 1))
        return [StoredFile(*row) for row in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> bool:
        deleted = bool(self._rows("DELETE FROM batch_files WHERE id = %s AND owner = %s RETURNING id",
                                  (file_id, self.owner)))
        self.path(file_id).unlink(missing_ok=True)
        return deleted

    def in_use(self, file_id: str) -> str | None:
        rows = self._rows(f"SELECT id FROM batches WHERE owner = %s AND {NOT_FINAL} "  # noqa: S608 (fixed text)
                          "AND data::jsonb ->> 'input_file_id' = %s ORDER BY seq LIMIT 1", (self.owner, file_id))
        return str(rows[0][0]) if rows else None

    # -- batches ----------------------------------------------------------------------------------------------

    def add_batch(self, batch: dict[str, Any]) -> tuple[str, str]:
        output_id, error_id = new_id("file-"), new_id("file-")
        self._rows("INSERT INTO batches (id, owner, status, output_id, error_id, data) VALUES (%s, %s, %s, %s, %s, "
                   "%s)", (batch["id"], self.owner, batch["status"], output_id, error_id, orjson.dumps(batch).decode()))
        return output_id, error_id

    def save_batch(self, batch: dict[str, Any]) -> None:
        self._rows("UPDATE batches SET status = %s, data = %s WHERE id = %s",
                   (batch["status"], orjson.dumps(batch).decode(), batch["id"]))

    def request_cancel(self, batch_id: str) -> None:
        self._rows("UPDATE batches SET cancel_requested = true WHERE id = %s AND owner = %s", (batch_id, self.owner))

    def cancel_requested(self, batch_id: str) -> bool:
        rows = self._rows("SELECT cancel_requested FROM batches WHERE id = %s", (batch_id,))
        return bool(rows and rows[0][0])

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT data FROM batches WHERE id = %s AND owner = %s", (batch_id, self.owner))
        return orjson.loads(rows[0][0]) if rows else None

    def result_ids(self, batch_id: str) -> tuple[str, str]:
        rows = self._rows("SELECT output_id, error_id FROM batches WHERE id = %s", (batch_id,))
        return rows[0][0], rows[0][1]

    def batches(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        sql, args = page_query("batches", "data", {"owner": self.owner}, after, True, "%s")
        rows = self._rows(sql, (*args, limit + 1))
        return [orjson.loads(data) for (data,) in rows[:limit]], len(rows) > limit

    def unfinished(self) -> list[dict[str, Any]]:
        return [orjson.loads(data) for (data,) in self._rows(
            f"SELECT data FROM batches WHERE owner = %s AND {NOT_FINAL} AND {_LAPSED} ORDER BY seq",  # noqa: S608
            (self.owner,))]


class PgLease(Claim):
    def __init__(self, state: PgBatchState, batch_id: str) -> None:
        self.state = state
        self.batch_id = batch_id
        self.renew_every = state.lease_s / RENEWALS_PER_LEASE

    def renew(self) -> bool:
        with self.state.connection() as conn:
            return conn.execute("UPDATE batches SET lease_until = now() + make_interval(secs => %s) "
                                "WHERE id = %s AND holder = %s RETURNING id",
                                (self.state.lease_s, self.batch_id, self.state.holder)).fetchone() is not None

    def release(self) -> None:
        """Let the batch go now rather than when the lease lapses (nothing to do while the database is away: the
        lease lapses meanwhile)."""
        with contextlib.suppress(OpenAIError), self.state.connection() as conn:
            conn.execute("UPDATE batches SET holder = NULL, lease_until = NULL WHERE id = %s AND holder = %s",
                         (self.batch_id, self.state.holder))


class PgLeases(Claims):
    """Leases in the shared database: a batch no run holds, or whose holder's lease lapsed, is claimed."""

    def __init__(self, state: PgBatchState) -> None:
        self.state = state

    def claim(self, batch_id: str) -> PgLease | None:
        with self.state.connection() as conn:
            taken = conn.execute(_CLAIM,
                                 (self.state.holder, self.state.lease_s, batch_id)).fetchone()
        return PgLease(self.state, batch_id) if taken is not None else None
