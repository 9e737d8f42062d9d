"""The Redis that replicas of a shared gateway on several hosts share (``serve.state.redis``): the client, and the
answer a request gets while it cannot be reached.

Redis is reached through redis-py's asyncio client, on the gateway's own loop. Its password comes from
``$FIRST_REDIS_PASSWORD``, never from the config file (the config refuses a URL holding one). The client's
timeouts are short and it retries a command once at once, on a fresh connection: after Redis restarts, the pooled
connections are dead, and the first command on one fails; the retry then reconnects, so the gateway recovers
without a restart. A command that still fails is an outage, and the request that needed it gets a 503 with
``Retry-After`` rather than waiting out a backoff.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from first_jupyter.config import REDIS_PASSWORD_ENV
from first_jupyter.protocol import OpenAIError

CONNECT_TIMEOUT_S = 1.0
"""Redis is on the site's network, a millisecond away: a connection not made in a second is not coming."""
COMMAND_TIMEOUT_S = 2.0
RETRY_AFTER_S = 2
"""What a request refused during an outage is told: a restarting Redis is back within seconds."""

UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
"""What a Redis that is down, restarting (loading its data) or out of reach raises through the client."""


def connect(url: str) -> redis.asyncio.Redis:
    """A client for ``url``, with the password from the environment; it connects on first use."""
    client: redis.asyncio.Redis = redis.asyncio.Redis.from_url(  # from_url has no return annotation
        url, password=os.environ.get(REDIS_PASSWORD_ENV) or None, socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=COMMAND_TIMEOUT_S, retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
        health_check_interval=30)
    return client


def where(url: str) -> str:
    """``url`` as an operator would recognise it in a message: host and port (it holds no password)."""
    parsed = urlsplit(url)
    return parsed.path if parsed.scheme == "unix" else f"{parsed.hostname}:{parsed.port or 6379}"


def unavailable(url: str, what: str, exc: BaseException) -> OpenAIError:
    """The 503 for a request that needs Redis while it cannot be reached."""
    return OpenAIError(503, f"The gateway cannot reach its shared state (Redis at {where(url)}, serve.state.redis) "
                            f"to {what}: {type(exc).__name__}. Retry in {RETRY_AFTER_S} s; if it lasts, the "
                            "operator should check that Redis is running and reachable from every replica.",
                       type="api_error", code="state_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})
