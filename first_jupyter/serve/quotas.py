"""Request and token quotas that every process of a shared gateway enforces together.

``first serve`` runs several processes behind one port, and a user's requests land on any of them, so a limit
kept in one process's memory would let each user through ``processes`` times over. The buckets live in one
SQLite file in the state dir instead: every admit and every spend is one short transaction on that file, and
``BEGIN IMMEDIATE`` takes the write lock before reading, so two processes can never both spend the last
request of a bucket. A transaction takes tens of microseconds, far less than a request costs to proxy, so the
calls are synchronous: handing them to a thread would cost more than the transaction itself.

Buckets hold a level and the time it was last written, and refill lazily when next read, so nothing has to
tick in the background. Times come from the wall clock, the one clock that all processes on a host share.

That is one host's store. Replicas on several hosts keep the same buckets in Redis instead
(``serve.redis_quotas``); both answer the same way, through ``QuotaBuckets``, and share the rules here: which
buckets a request is held to, when a bucket admits, and the answer's headers and words.
"""

from __future__ import annotations

import math
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from first_jupyter.config import Quota, Quotas
from first_jupyter.sqlite_wal import use_wal

BUSY_TIMEOUT_S = 5.0
"""How long a process waits for another's transaction; those take tens of microseconds, so only a stalled one
could make a process wait this long."""

_SLACK = 1e-9
"""Refill is float arithmetic: a bucket that has waited exactly its Retry-After may hold 0.9999999999 requests."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS buckets (
    key TEXT PRIMARY KEY,
    level REAL NOT NULL,
    updated REAL NOT NULL
) WITHOUT ROWID
"""


@dataclass(frozen=True)
class Allowance:
    allowed: bool
    retry_after_s: float
    """0 when allowed; else seconds until every refusing bucket admits again."""
    reason: str
    """"" when allowed; else the limits that refused, in words a user can act on."""
    headers: dict[str, str]
    """OpenAI's ``x-ratelimit-*`` headers for the tighter of the user's and the model's limits, so that clients
    written for OpenAI pace themselves; plus ``Retry-After`` when refused."""


@dataclass(frozen=True)
class Limit:
    """One configured limit, built once from the config, so that a request only puts its subject in the key."""

    code: str
    """In bucket keys: ``req`` or ``tok``."""
    name: str
    """In header names: ``requests`` or ``tokens``."""
    capacity: float
    rate: float
    """Per second."""
    words: str

    @property
    def strict(self) -> bool:
        """Token buckets admit while strictly above ``floor``, request buckets from ``floor`` on."""
        return self.code == "tok"

    @property
    def floor(self) -> float:
        return 0.0 if self.strict else 1 - _SLACK

    def admits(self, level: float) -> bool:
        """Token buckets admit while above 0, since a request's tokens are known only after its answer; request
        buckets admit while they hold a whole request, which the request takes."""
        return level > self.floor if self.strict else level >= self.floor

    def wait_s(self, level: float) -> float:
        """Until the bucket holds one whole unit again: enough for a request, and strictly above 0 for tokens."""
        return (1 - level) / self.rate


def _limits(quota: Quota) -> tuple[Limit, ...]:
    limits: list[Limit] = []
    if quota.requests_per_s is not None:
        rate = quota.requests_per_s
        limits.append(Limit("req", "requests", capacity=quota.burst or max(1, math.ceil(rate)), rate=rate,
                             words=_per(rate, "request", "second")))
    if quota.tokens_per_min is not None:
        per_min = quota.tokens_per_min
        limits.append(Limit("tok", "tokens", capacity=per_min, rate=per_min / 60,
                             words=_per(per_min, "token", "minute")))
    return tuple(limits)


def _per(amount: float, unit: str, period: str) -> str:
    number = f"{int(amount):,}" if amount == int(amount) else f"{amount:,g}"
    return f"{number} {unit}{'' if amount == 1 else 's'} per {period}"


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


Bucket = tuple[str, Limit]
"""A limit applied to one subject: the bucket's key (``u:req:<user>``, ``m:tok:<model>``) and its limit."""

ALLOWED = Allowance(allowed=True, retry_after_s=0.0, reason="", headers={})
"""The answer where no limit applies."""


class QuotaRules:
    """Token buckets for requests and tokens, per user (all models together) and per model (all users together).

    A model named in ``quotas.models`` takes that entry instead of ``quotas.per_model``, as a whole: an entry
    without ``tokens_per_min`` leaves that model's tokens unlimited. ``burst`` without ``requests_per_s`` limits
    nothing, since such a bucket would never refill.
    """

    def __init__(self, quotas: Quotas) -> None:
        self._per_user = _limits(quotas.per_user)
        self._per_model = _limits(quotas.per_model)
        self._models = {model: _limits(quota) for model, quota in quotas.models.items()}
        self.limited = any((self._per_user, self._per_model, *self._models.values()))

    def buckets(self, user: str, model: str) -> list[Bucket]:
        return ([(f"u:{limit.code}:{user}", limit) for limit in self._per_user]
                + [(f"m:{limit.code}:{model}", limit) for limit in self._models.get(model, self._per_model)])

    def token_buckets(self, user: str, model: str) -> list[Bucket]:
        return [bucket for bucket in self.buckets(user, model) if bucket[1].code == "tok"]


class QuotaBuckets(ABC):
    """The quotas as the shared gateway uses them, wherever the buckets are kept: one host's SQLite
    (``QuotaStore``), or Redis for replicas on several hosts (``redis_quotas.RedisQuotas``)."""

    def __init__(self, quotas: Quotas) -> None:
        self._rules = QuotaRules(quotas)

    @property
    def limited(self) -> bool:
        """Whether any limit is configured, so that a gateway without quotas skips them entirely."""
        return self._rules.limited

    async def admit(self, user: str, model: str) -> Allowance:
        """Take one request from the user's and the model's request buckets, or from neither (a refused request
        charges nothing: a client retrying a refused request must not dig itself deeper). Raises a 503
        ``OpenAIError`` when the buckets cannot be reached."""
        buckets = self._rules.buckets(user, model)
        return await self._admit(model, buckets) if buckets else ALLOWED

    def spend(self, user: str, model: str, tokens: int) -> None:
        """Take a finished request's prompt and completion tokens from the user's and the model's token buckets.
        The buckets may go below 0: the request was admitted before its size was known, and the debt makes later
        requests wait until the refill has paid it back. It may land a moment later (Redis): nobody waits for it,
        the request has been answered."""
        buckets = self._rules.token_buckets(user, model)
        if buckets and tokens > 0:
            self._spend(buckets, tokens)

    @abstractmethod
    async def _admit(self, model: str, buckets: list[Bucket]) -> Allowance: ...

    @abstractmethod
    def _spend(self, buckets: list[Bucket], tokens: int) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...


class QuotaStore(QuotaBuckets):
    """The buckets of one host, in SQLite."""

    def __init__(self, path: Path, quotas: Quotas, clock: Callable[[], float] = time.time) -> None:
        super().__init__(quotas)
        self._clock = clock
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: the module's implicit transactions would begin only at the first write, after the
        # read that the write depends on; transactions here are explicit. check_same_thread=False: the store is
        # built wherever the gateway is set up, then called from the event loop's thread only.
        # timeout is SQLite's busy timeout: a process finding the file locked waits for the other's transaction.
        self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
        # WAL: readers never wait for the writer, and a commit appends to the log instead of rewriting pages.
        use_wal(self._db, BUSY_TIMEOUT_S)
        # synchronous=NORMAL, not OFF: in WAL mode NORMAL syncs only when the log is checkpointed, not per commit, so
        # it costs no more than OFF (measured), yet a power cut cannot leave the file corrupt, only lose its last
        # commits, which merely forgives a few requests. FULL would sync on every commit: five times slower.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)

    async def _admit(self, model: str, buckets: list[Bucket]) -> Allowance:
        """Synchronous inside: the transaction costs less than a hop to a thread would."""
        charged = [bucket for bucket in buckets if bucket[1].code == "req"]
        now = self._clock()
        # only a transaction that may write needs the write lock; token buckets alone are just read
        with self._transaction(immediate=bool(charged)):
            levels = self._levels(buckets, now)
            refusing = [(key, limit) for key, limit in buckets if not limit.admits(levels[key])]
            if not refusing:
                for key, _ in charged:
                    levels[key] -= 1
                self._write(charged, levels, now)
        return allowance(model, buckets, levels, refusing)

    def _spend(self, buckets: list[Bucket], tokens: int) -> None:
        """At once."""
        now = self._clock()
        with self._transaction(immediate=True):
            levels = self._levels(buckets, now)
            for key, _ in buckets:
                levels[key] -= tokens
            self._write(buckets, levels, now)

    async def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self, immediate: bool) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _levels(self, buckets: list[Bucket], now: float) -> dict[str, float]:
        """Each bucket's level refilled up to ``now``; a bucket never written is full."""
        placeholders = ", ".join("?" for _ in buckets)
        rows = self._db.execute(f"SELECT key, level, updated FROM buckets WHERE key IN ({placeholders})",  # noqa: S608 (placeholders, not input)
                                [key for key, _ in buckets]).fetchall()
        stored = {key: (level, updated) for key, level, updated in rows}
        levels: dict[str, float] = {}
        for key, limit in buckets:
            level, updated = stored.get(key, (limit.capacity, now))
            # max(0, ...): another process may have written a time a little ahead of this one's clock reading
            levels[key] = min(limit.capacity, level + max(0.0, now - updated) * limit.rate)
        return levels

    def _write(self, buckets: list[Bucket], levels: dict[str, float], now: float) -> None:
        self._db.executemany("INSERT OR REPLACE INTO buckets (key, level, updated) VALUES (?, ?, ?)",
                             [(key, levels[key], now) for key, _ in buckets])


def allowance(model: str, buckets: list[Bucket], levels: dict[str, float], refusing: list[Bucket]) -> Allowance:
    """The answer to a request held to ``buckets``, whose levels are ``levels`` once it was admitted or not."""
    tightest: dict[str, tuple[float, Limit]] = {}
    for key, limit in buckets:
        kept = tightest.get(limit.name)
        if kept is None or (levels[key], limit.capacity) < (kept[0], kept[1].capacity):
            tightest[limit.name] = (levels[key], limit)
    headers: dict[str, str] = {}
    for name, (level, limit) in tightest.items():
        headers[f"x-ratelimit-limit-{name}"] = str(int(limit.capacity))
        headers[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(level + _SLACK)))
        headers[f"x-ratelimit-reset-{name}"] = _duration(max(0.0, limit.capacity - level) / limit.rate)
    if not refusing:
        return Allowance(allowed=True, retry_after_s=0.0, reason="", headers=headers)
    retry_after_s = max(limit.wait_s(levels[key]) for key, limit in refusing)
    headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    reasons = [f"You are over your limit of {limit.words}" if key.startswith("u:")
               else f"Model '{model}' is over its limit of {limit.words} (all users together)"
               for key, limit in refusing]
    return Allowance(allowed=False, retry_after_s=retry_after_s, reason="; ".join(reasons), headers=headers)
