"""The quotas' token buckets in Redis, for replicas of a shared gateway on several hosts (``serve.state.redis``).

The buckets and their answers are those of ``serve.quotas`` (one host's SQLite store): the same keys, the same
lazy refill, the same rule for when a bucket admits, the same 429, ``Retry-After`` and ``x-ratelimit-*``. What
differs is where they live and how a change is made atomic: each admit and each spend is one Lua script that
Redis runs alone, so two replicas can never both take a bucket's last request.

Time is Redis's own clock (``TIME``), read inside the script: the replicas' hosts each have a clock of their own,
and a bucket refilled by two clocks a little apart would drift. Tests pass a clock of their own instead.

A bucket's key expires once it would have refilled to full: a bucket not found is full, so nothing is lost, and
Redis holds only the buckets of users active within their refill time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import redis.asyncio

from first_jupyter.config import Quotas
from first_jupyter.serve.quotas import Allowance, Bucket, QuotaBuckets, allowance
from first_jupyter.serve.redis_state import UNREACHABLE, unavailable, where

log = logging.getLogger(__name__)

PREFIX = "first:quota:"

BUCKETS_SCRIPT = """
-- KEYS: the buckets. ARGV[1]: now in seconds, or '' for Redis's clock. ARGV[2]: '1' to change nothing unless
-- every bucket admits (an admit), '0' to take regardless (a spend). Then five per bucket: capacity, rate per second,
-- floor, strict ('1': admits while above floor; '0': from floor on), how much to take.
-- Returns: 1 if taken (else 0), then each bucket's level afterwards, as text (Lua numbers would be truncated).
local now = tonumber(ARGV[1])
if now == nil then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
local check = ARGV[2] == '1'
local levels = {}
local admitted = true
for i, key in ipairs(KEYS) do
  local at = 2 + (i - 1) * 5
  local capacity, rate = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2])
  local floor, strict = tonumber(ARGV[at + 3]), ARGV[at + 4] == '1'
  local stored = redis.call('HMGET', key, 'level', 'updated')
  local level = capacity
  if stored[1] then
    level = math.min(capacity, tonumber(stored[1]) + math.max(0, now - tonumber(stored[2])) * rate)
  end
  levels[i] = level
  if check and not ((strict and level > floor) or (not strict and level >= floor)) then
    admitted = false
  end
end
local answer = {admitted and 1 or 0}
for i, key in ipairs(KEYS) do
  local at = 2 + (i - 1) * 5
  local capacity, rate, take = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), tonumber(ARGV[at + 5])
  if admitted and take ~= 0 then
    levels[i] = levels[i] - take
    redis.call('HSET', key, 'level', string.format('%.17g', levels[i]), 'updated', string.format('%.17g', now))
    redis.call('PEXPIRE', key, math.ceil((capacity - levels[i]) / rate * 1000) + 1000)
  end
  answer[i + 1] = string.format('%.17g', levels[i])
end
return answer
"""


class RedisQuotas(QuotaBuckets):
    """The buckets of every replica, in Redis."""

    def __init__(self, client: redis.asyncio.Redis, url: str, quotas: Quotas,
                 clock: Callable[[], float] | None = None, prefix: str = PREFIX) -> None:
        """``url``: for messages only. ``clock``: None for Redis's own."""
        super().__init__(quotas)
        self._client = client
        self._url = url
        self._clock = clock
        self._prefix = prefix
        self._script = client.register_script(BUCKETS_SCRIPT)
        self._spending: set[asyncio.Task[None]] = set()

    async def _admit(self, model: str, buckets: list[Bucket]) -> Allowance:
        try:
            admitted, levels = await self.take(buckets, check=True)
        except UNREACHABLE as exc:
            raise unavailable(self._url, "check your quota", exc) from None
        refusing = [] if admitted else [(key, limit) for key, limit in buckets if not limit.admits(levels[key])]
        return allowance(model, buckets, levels, refusing)

    def _spend(self, buckets: list[Bucket], tokens: int) -> None:
        """A task on the loop; tokens spent while Redis cannot be reached are forgiven (and logged)."""
        task = asyncio.get_running_loop().create_task(self._take_tokens(buckets, tokens))
        self._spending.add(task)
        task.add_done_callback(self._spending.discard)

    async def settled(self) -> None:
        """Until the spends under way have landed: at close, and for whoever reads the buckets after them."""
        while self._spending:
            await asyncio.gather(*self._spending, return_exceptions=True)

    async def close(self) -> None:
        """The spends under way land; the client is the shared state's to close (``shared_state``)."""
        await self.settled()

    async def take(self, buckets: list[Bucket], *, check: bool, tokens: int = 0) -> tuple[bool, dict[str, float]]:
        """One run of the script: with ``check``, one request from each request bucket if every bucket admits;
        else ``tokens`` from each bucket. Whether it took, and each bucket's level afterwards."""
        args: list[str | float] = ["" if self._clock is None else repr(self._clock()), "1" if check else "0"]
        for _, limit in buckets:
            taken = (1 if limit.code == "req" else 0) if check else tokens
            args += [limit.capacity, limit.rate, limit.floor, "1" if limit.strict else "0", taken]
        answer = await self._script(keys=[self._prefix + key for key, _ in buckets], args=args)
        return answer[0] == 1, {key: float(level) for (key, _), level in zip(buckets, answer[1:], strict=True)}

    async def _take_tokens(self, buckets: list[Bucket], tokens: int) -> None:
        try:
            await self.take(buckets, check=False, tokens=tokens)
        except UNREACHABLE as exc:
            log.warning("%s tokens not taken from %s: Redis at %s cannot be reached (%s)", tokens,
                        ", ".join(key for key, _ in buckets), where(self._url), type(exc).__name__)
