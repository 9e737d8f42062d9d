"""Where a shared gateway keeps what its processes must agree on: one host's SQLite under the state dir (the
default), or, for replicas on several hosts, Redis (``serve.state.redis``: the quotas' buckets, the token
introspection verdicts and remote streams' callback batches) and PostgreSQL (``serve.state.database``: usage
records, and the files' and batches' records, their contents under ``serve.state.files_dir``).

``health`` is what ``/healthz`` answers: each backend in use, and whether it answers now.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from first_jupyter.auth.resource_server import SharedVerdicts
from first_jupyter.config import ConfigError, ServeConfig
from first_jupyter.serve.quotas import QuotaBuckets, QuotaStore

if TYPE_CHECKING:
    import redis.asyncio

    from first_jupyter.batch.pg_store import PgBatchState
    from first_jupyter.serve.pg_usage import PgUsage
    from first_jupyter.serve.redis_streams import RedisCallbacks

OK: Final = "ok"
HEALTH_RETRY_AFTER_S: Final = 2
"""What a load balancer or monitor is told after a 503 from ``/healthz``: Redis or PostgreSQL restarting is back
within seconds."""


@dataclass(frozen=True)
class StateHealth:
    backends: dict[str, str]
    """Each state backend in use (sqlite, redis, postgresql): ``ok``, or why it cannot be reached."""
    usage_records: dict[str, int] | None
    """With PostgreSQL: usage records waiting in this replica's memory to be written, and those dropped because
    the wait outgrew its bound."""

    @property
    def ok(self) -> bool:
        return all(status == OK for status in self.backends.values())


@dataclass
class SharedState:
    quotas: QuotaBuckets
    verdicts: SharedVerdicts | None
    """None: each process keeps its own (one host's processes introspect a token once each)."""
    redis: redis.asyncio.Redis | None
    usage: PgUsage | None = field(default=None)
    """None: usage in SQLite under each gateway's own data dir. Handed to the gateway, which closes it."""
    batches: PgBatchState | None = field(default=None)
    """None: files and batches in SQLite under each user's batch dir in the state dir."""
    callbacks: RedisCallbacks | None = field(default=None)
    """With Redis: remote streams' batches go through it, so a node's callback may reach any replica (handed to
    the gateway's ``CallbackHub``)."""

    async def health(self) -> StateHealth:
        """Each backend in use, asked now (SQLite is local files: there while the host is)."""
        backends = {"sqlite": OK}
        checks: dict[str, asyncio.Task[BaseException | None]] = {}
        if self.redis is not None:
            checks["redis"] = asyncio.ensure_future(_redis_reachable(self.redis))
        if self.usage is not None:
            checks["postgresql"] = asyncio.ensure_future(self.usage.reachable())
        for name, check in checks.items():
            failure = await check
            backends[name] = OK if failure is None else f"unreachable: {type(failure).__name__}"
        usage = None if self.usage is None else {"buffered": self.usage.buffered, "dropped": self.usage.dropped}
        return StateHealth(backends, usage)

    async def close(self) -> None:
        await self.quotas.close()
        if self.batches is not None:
            await asyncio.to_thread(self.batches.close)
        if self.callbacks is not None:
            await self.callbacks.settle()
        if self.redis is not None:
            await self.redis.aclose()


async def _redis_reachable(client: redis.asyncio.Redis) -> BaseException | None:
    from first_jupyter.serve.redis_state import UNREACHABLE

    try:
        await client.ping()
    except UNREACHABLE as exc:
        return exc
    return None


def open_state(serve: ServeConfig, state_dir: Path) -> SharedState:
    """The configured state, on the running loop; a Redis client connects on first use and the database's pool in
    the background, so a Redis or PostgreSQL that is down does not stop the gateway from starting (requests that
    need it are answered 503 until it is back; usage records wait in memory)."""
    state = _quotas_state(serve, state_dir)
    if serve.state.database is not None:
        try:  # the serve extra
            from first_jupyter.batch.pg_store import PgBatchState
            from first_jupyter.serve.pg_usage import PgUsage
        except ImportError as exc:
            raise ConfigError(f"serve.state.database needs {exc.name}, which is not installed: pip install "
                              "'first-jupyter[serve]'") from None
        state.usage = PgUsage(serve.state.database)
        assert serve.state.files_dir is not None  # (the config takes the two together)
        state.batches = PgBatchState(serve.state.database, Path(serve.state.files_dir), serve.state.batch_lease_s)
    return state


def _quotas_state(serve: ServeConfig, state_dir: Path) -> SharedState:
    url = serve.state.redis
    if url is None:
        return SharedState(QuotaStore(state_dir / "quotas.sqlite3", serve.quotas), None, None)
    try:  # the serve extra: a gateway on one host does without
        from first_jupyter.serve.redis_quotas import RedisQuotas
        from first_jupyter.serve.redis_state import connect
        from first_jupyter.serve.redis_streams import RedisCallbacks
        from first_jupyter.serve.redis_verdicts import RedisVerdicts
    except ImportError as exc:
        raise ConfigError(f"serve.state.redis needs {exc.name}, which is not installed: pip install "
                          "'first-jupyter[serve]'") from None

    client = connect(url)
    return SharedState(RedisQuotas(client, url, serve.quotas), RedisVerdicts(client, url), client,
                       callbacks=RedisCallbacks(client, url))
