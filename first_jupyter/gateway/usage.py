"""Durable usage accounting in SQLite, written off the request path.

Every request is recorded (tokens, latency, time to first token, status), through a ``QueuedWriter``: records
go onto an in-memory queue and one writer thread commits them in batches; ``flush()`` makes them visible to
readers (tests, the usage API). Replicas on several hosts keep theirs in PostgreSQL instead
(``gateway/pg_usage.py``): both are a ``UsageLog``, and both answer the usage API with the same two queries,
written once here for both dialects.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import NamedTuple, Protocol

import orjson

from first_jupyter.gateway.queued_writer import QueuedWriter, json_available
from first_jupyter.gateway.supervisor import Supervisor
from first_jupyter.sqlite_wal import use_wal

_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    request_id TEXT NOT NULL,
    model TEXT NOT NULL,
    cluster TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    capability TEXT NOT NULL,
    stream INTEGER NOT NULL,
    status INTEGER NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    latency_ms REAL NOT NULL,
    ttft_ms REAL,
    error TEXT,
    user TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS usage_model_ts ON usage (model, ts);
CREATE INDEX IF NOT EXISTS usage_user_ts ON usage (user, ts);
"""


class LineUsage(NamedTuple):
    """What one batch line answered by a cluster's own run (an offloaded chunk) is accounted with."""

    custom_id: str
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str | None


class UsageRecord(NamedTuple):
    """One request's accounting; a tuple, so it is the row ``executemany`` takes, with no conversion."""

    ts: float
    request_id: str
    model: str
    cluster: str
    endpoint: str
    capability: str
    stream: bool
    status: int
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_ms: float
    ttft_ms: float | None
    error: str | None
    user: str
    """Who sent it, at a shared gateway (``first serve``): the Globus username; empty in a user's own server."""


_COLUMNS = UsageRecord._fields
_INSERT_ROW = (f"INSERT INTO usage ({', '.join(_COLUMNS)}) "  # noqa: S608 (field names, not input)
               f"VALUES ({', '.join('?' for _ in _COLUMNS)})")
_INSERT_BATCH = (f"INSERT INTO usage ({', '.join(_COLUMNS)}) "  # noqa: S608 (field names, not input)
                 f"SELECT {', '.join(f'json_extract(value, {chr(39)}$[{i}]{chr(39)})' for i in range(len(_COLUMNS)))} "
                 "FROM json_each(?)")
"""A whole batch in one statement over one JSON array (see ``json_available``)."""


PER_MODEL = (
    "SELECT g.model, g.requests, g.errors, g.prompt, g.completion, g.latency, g.ttft, g.ts, last.latency_ms "
    "FROM (SELECT model, COUNT(*) AS requests, SUM({failed}) AS errors, "
    "COALESCE(SUM(prompt_tokens), 0) AS prompt, COALESCE(SUM(completion_tokens), 0) AS completion, "
    "AVG(latency_ms) AS latency, AVG(ttft_ms) AS ttft, MAX(ts) AS ts, MAX({row}) AS last_row "
    "FROM usage WHERE model != '' AND ({who} IS NULL OR {user} = {who}) GROUP BY model) g "
    "JOIN usage last ON last.{row} = g.last_row ORDER BY g.model")
"""One row per model (``PER_MODEL_KEYS``); its last request is its newest row (rows are appended as requests
end). A template over the dialect: ``failed`` (1 for a status >= 400), ``row`` (the row's number), ``user`` (the
column), ``who`` (the user asked for, or NULL for all)."""
PER_MODEL_KEYS = ("model", "requests", "errors", "prompt_tokens", "completion_tokens", "mean_latency_ms",
                  "mean_ttft_ms", "last_used", "last_latency_ms")
PER_USER = ("SELECT {user}, model, COUNT(*), SUM({failed}), COALESCE(SUM(prompt_tokens), 0), "
            "COALESCE(SUM(completion_tokens), 0), MAX(ts) FROM usage WHERE model != '' GROUP BY {user}, model "
            "ORDER BY {user}, model")
"""Requests and tokens per user and model (``PER_USER_KEYS``), the same template."""
PER_USER_KEYS = ("user", "model", "requests", "errors", "prompt_tokens", "completion_tokens", "last_used")
_SQLITE = {"failed": "status >= 400", "row": "rowid", "user": "user", "who": "?1"}


class UsageLog(Protocol):
    """Where a gateway's usage records go, and its usage answers come from."""

    def record(self, rec: UsageRecord) -> None:
        """Keep ``rec``, off the request path (a queue put on the event loop)."""

    async def per_model(self, user: str | None) -> list[tuple[object, ...]]:
        """``PER_MODEL``'s rows, every record handed to ``record`` before the call included; ``user``: theirs."""

    async def per_user(self) -> list[tuple[object, ...]]:
        """``PER_USER``'s rows, likewise."""

    async def aclose(self) -> None:
        """Write what is still queued, then let go of the store."""


def _insert(conn: sqlite3.Connection, rows: list[UsageRecord], batch: bool) -> None:
    if batch:
        conn.execute(_INSERT_BATCH, (orjson.dumps(rows, default=tuple),))
    else:
        conn.executemany(_INSERT_ROW, rows)


class UsageStore:
    """Append-only usage log; ``record`` is one lock-free queue put on the event loop."""

    def __init__(self, path: Path, supervisor: Supervisor | None = None, *, batch_interval: float = 0.25,
                 json_batches: bool = True) -> None:
        """``supervisor``: where a failed commit is logged and counted (the gateway's; else one of its own)."""
        self.path = path
        self._json_batches = json_batches
        self._batch: bool | None = None
        """Whether batches go in as one JSON statement: known once the writer has its connection."""
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, isolation_level=None)
        try:  # a shared gateway's workers open it together: one of them upgrades it, the others find it done
            use_wal(conn)
            conn.execute("BEGIN IMMEDIATE")
            columns = {row[0] for row in conn.execute("SELECT name FROM pragma_table_info('usage')")}
            if columns and "user" not in columns:
                conn.execute("ALTER TABLE usage ADD COLUMN user TEXT NOT NULL DEFAULT ''")  # a store from 0.1
            conn.execute("COMMIT")
            conn.executescript(_SCHEMA)
        finally:
            conn.close()
        self._writer = QueuedWriter(path, self._write, "usage writer", supervisor or Supervisor(),
                                    interval=batch_interval)

    def record(self, rec: UsageRecord) -> None:
        self._writer.put(rec)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every record handed to ``record`` before this call is committed."""
        self._writer.flush(timeout)

    def close(self) -> None:
        self._writer.close()

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        """Rows from the store, every record handed to ``record`` before the call included (blocking: from a
        thread on a server's loop)."""
        self.flush()
        with contextlib.closing(sqlite3.connect(self.path)) as conn:  # sqlite3's own ``with`` leaves it open
            return conn.execute(sql, params).fetchall()

    async def per_model(self, user: str | None) -> list[tuple[object, ...]]:
        return await asyncio.to_thread(self.query, PER_MODEL.format(**_SQLITE), (user,))

    async def per_user(self) -> list[tuple[object, ...]]:
        return await asyncio.to_thread(self.query, PER_USER.format(**_SQLITE))

    async def aclose(self) -> None:
        self.close()

    def _write(self, conn: sqlite3.Connection, rows: list[UsageRecord]) -> None:
        """One batch, on the writer's thread."""
        if self._batch is None:
            self._batch = self._json_batches and json_available(conn)
        _insert(conn, rows, self._batch)
