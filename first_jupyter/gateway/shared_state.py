"""Where a shared gateway keeps what its processes must agree on: one host's SQLite under the state dir (the
default), or, for replicas on several hosts, Redis (``serve.state.redis``): the quotas' buckets and the token
introspection verdicts. Usage, files and batches stay in each replica's state dir for now.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from first_jupyter.auth.resource_server import SharedVerdicts
from first_jupyter.config import ConfigError, ServeConfig
from first_jupyter.gateway.quotas import QuotaBuckets, QuotaStore

if TYPE_CHECKING:
    import redis.asyncio


@dataclass
class SharedState:
    quotas: QuotaBuckets
    verdicts: SharedVerdicts | None
    """None: each process keeps its own (one host's processes introspect a token once each)."""
    redis: redis.asyncio.Redis | None

    async def close(self) -> None:
        await self.quotas.close()
        if self.redis is not None:
            await self.redis.aclose()


def open_state(serve: ServeConfig, state_dir: Path) -> SharedState:
    """The configured state; a Redis client connects on first use, so a Redis that is down does not stop the
    gateway from starting (requests that need it are answered 503 until it is back)."""
    url = serve.state.redis
    if url is None:
        return SharedState(QuotaStore(state_dir / "quotas.sqlite3", serve.quotas), None, None)
    try:  # the serve extra: a gateway on one host does without
        from first_jupyter.auth.shared_verdicts import RedisVerdicts
        from first_jupyter.gateway.redis_quotas import RedisQuotas
        from first_jupyter.redis_state import connect
    except ImportError as exc:
        raise ConfigError(f"serve.state.redis needs {exc.name}, which is not installed: pip install "
                          "'first-jupyter[serve]'") from None

    client = connect(url)
    return SharedState(RedisQuotas(client, url, serve.quotas), RedisVerdicts(client, url), client)
