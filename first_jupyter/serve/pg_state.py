"""The PostgreSQL database that replicas of a shared gateway on several hosts share (``serve.state.database``): its
connection pool, its versioned schema, and the answer a request gets while it cannot be reached.

The database is reached through psycopg 3's async pool, on the gateway's own loop. Credentials come from libpq's
own variables (``$PGPASSWORD``, ``~/.pgpass``, ``$PGSSLMODE``...), never from the config file (the config refuses a
URL holding a password). A connection is checked as it leaves the pool, so the connections a restarted server
broke are replaced rather than handed out, and the gateway recovers without a restart.

The schema is versioned: ``MIGRATIONS`` in order, the version reached in ``schema_version``. Each replica upgrades
it at start, under a transaction-scoped advisory lock, so two replicas starting together do not both create the
same tables: the second waits, then finds the work done.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Final
from urllib.parse import urlsplit

from psycopg import AsyncConnection
from psycopg import OperationalError as PgOperationalError
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from first_jupyter.protocol import OpenAIError

CONNECT_TIMEOUT_S: Final = 2.0
"""The database is on the site's network, a millisecond away: a connection not made in two seconds is not coming."""
RETRY_AFTER_S: Final = 2
"""What a request refused during an outage is told: a restarting PostgreSQL is back within seconds."""
UNREACHABLE: Final = (PgOperationalError, OSError)
"""What a database that is down, restarting or out of reach raises (the pool's timeout is an OperationalError)."""
SCHEMA_LOCK: Final = 0x4649_5253_5400_0001
"""The advisory lock held while the schema is upgraded (any 64-bit number no other user of the database takes)."""

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: usage records, as gateway/usage.py keeps them in SQLite ("user" is a reserved word here)
    """CREATE TABLE usage (
        id BIGSERIAL PRIMARY KEY,
        ts DOUBLE PRECISION NOT NULL,
        request_id TEXT NOT NULL,
        model TEXT NOT NULL,
        cluster TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        capability TEXT NOT NULL,
        stream BOOLEAN NOT NULL,
        status INTEGER NOT NULL,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        latency_ms DOUBLE PRECISION NOT NULL,
        ttft_ms DOUBLE PRECISION,
        error TEXT,
        "user" TEXT NOT NULL DEFAULT ''
    );
    CREATE INDEX usage_model_ts ON usage (model, ts);
    CREATE INDEX usage_user_ts ON usage ("user", ts)""",
    # 2: files and batches, as batch/store.py keeps them in SQLite, per owner; a batch's run holds a lease on it
    """CREATE TABLE batch_files (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT UNIQUE NOT NULL,
        owner TEXT NOT NULL,
        purpose TEXT NOT NULL,
        filename TEXT NOT NULL,
        bytes BIGINT NOT NULL,
        lines BIGINT NOT NULL,
        created_at BIGINT NOT NULL
    );
    CREATE INDEX batch_files_owner_seq ON batch_files (owner, seq);
    CREATE TABLE batches (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT UNIQUE NOT NULL,
        owner TEXT NOT NULL,
        status TEXT NOT NULL,
        output_id TEXT NOT NULL,
        error_id TEXT NOT NULL,
        cancel_requested BOOLEAN NOT NULL DEFAULT false,
        data TEXT NOT NULL,
        holder TEXT,
        lease_until TIMESTAMPTZ
    );
    CREATE INDEX batches_owner_seq ON batches (owner, seq);
    CREATE INDEX batches_unfinished ON batches (seq)
        WHERE status NOT IN ('cancelled', 'completed', 'expired', 'failed')""",
    # 3: where each Responses-API response was created, and the gateway's copy, as response_ids.py keeps them
    """CREATE TABLE responses (
        seq BIGSERIAL PRIMARY KEY,
        response_id TEXT NOT NULL UNIQUE,
        cluster TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT NOT NULL,
        "user" TEXT NOT NULL,
        ts DOUBLE PRECISION NOT NULL,
        answer BYTEA,
        input BYTEA
    )""",
)
"""The schema, one step per version; a released step is never edited, a change is a new step."""


_CONNECTIONS: Final[dict[str, object]] = {"autocommit": True, "connect_timeout": int(CONNECT_TIMEOUT_S)}


def pool(url: str) -> AsyncConnectionPool:
    """A pool for ``url``, not yet open (``await pool.open(wait=False)`` on the loop that will use it)."""
    return AsyncConnectionPool(url, min_size=1, max_size=4, open=False, timeout=CONNECT_TIMEOUT_S,
                               check=AsyncConnectionPool.check_connection, name="first-state", kwargs=_CONNECTIONS)


def sync_pool(url: str) -> ConnectionPool:
    """A blocking pool for ``url``, opening in the background: for callers that are not coroutines (the batch
    store, whose SQLite twin is read and written in place)."""
    blocking = ConnectionPool(url, min_size=1, max_size=4, open=False, timeout=CONNECT_TIMEOUT_S,
                              check=ConnectionPool.check_connection, name="first-batches", kwargs=_CONNECTIONS)
    blocking.open(wait=False)
    return blocking


def upgrade_blocking(url: str) -> int:
    """``upgrade`` for a caller that is not a coroutine, on a connection and loop of its own (in a thread, as the
    caller's thread may run a loop already)."""

    async def once() -> int:
        async with await AsyncConnection.connect(url, autocommit=True,
                                                 connect_timeout=int(CONNECT_TIMEOUT_S)) as conn:
            return await upgrade(conn)

    with ThreadPoolExecutor(1, thread_name_prefix="first-schema") as one:
        return one.submit(asyncio.run, once()).result()


async def upgrade(conn: AsyncConnection) -> int:
    """Bring the schema to the last of ``MIGRATIONS`` (each step and its version in one transaction, under the
    advisory lock); the version reached."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                           "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        cursor = await conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        row = await cursor.fetchone()
        current = int(row[0]) if row is not None else 0
        for version, step in enumerate(MIGRATIONS[current:], start=current + 1):
            await conn.execute(step)  # (a constant of this module, not input)
            await conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
    return len(MIGRATIONS)


def where(url: str) -> str:
    """``url`` as an operator would recognise it in a message: host, port and database (it holds no password)."""
    parsed = urlsplit(url)
    return f"{parsed.hostname or 'localhost'}:{parsed.port or 5432}{parsed.path}"


def unavailable(url: str, what: str, exc: BaseException) -> OpenAIError:
    """The 503 for a request that needs the database while it cannot be reached."""
    return OpenAIError(503, f"The gateway cannot reach its shared database (PostgreSQL at {where(url)}, "
                            f"serve.state.database) to {what}: {type(exc).__name__}. Retry in {RETRY_AFTER_S} s; if "
                            "it lasts, the operator should check that PostgreSQL is running and reachable from every "
                            "replica.",
                       type="api_error", code="state_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
