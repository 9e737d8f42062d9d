"""Quotas: token buckets in one SQLite file, shared by every process of a gateway on one host, or in Redis, shared by
its replicas on several hosts; the same answers from both, on a clock the tests move (the Redis script is passed the
time, so nothing sleeps)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from first_jupyter.config import Quota, Quotas
from first_jupyter.serve.quotas import QuotaBuckets, QuotaStore
from first_jupyter.serve.redis_quotas import RedisQuotas
from first_jupyter.serve.redis_state import connect


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "quotas" / "quotas.sqlite3"  # parents that do not exist yet


Opener = Callable[[Quotas], QuotaBuckets]


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, db_path: Path, clock: FakeClock,
               jp_asyncio_loop: asyncio.AbstractEventLoop) -> Iterator[Opener]:
    """Stores on one SQLite file, or on one Redis (each with a client of its own, as replicas have)."""
    stores: list[QuotaBuckets] = []
    clients = []

    def open_(quotas: Quotas) -> QuotaBuckets:
        if request.param == "sqlite":
            stores.append(QuotaStore(db_path, quotas, clock=clock))
        else:
            url = request.getfixturevalue("redis_server").url
            clients.append(connect(url))
            stores.append(RedisQuotas(clients[-1], url, quotas, clock=clock))
        return stores[-1]

    yield open_
    for store in stores:
        jp_asyncio_loop.run_until_complete(store.close())
    for client in clients:
        jp_asyncio_loop.run_until_complete(client.aclose())


async def spend(store: QuotaBuckets, user: str, model: str, tokens: int) -> None:
    """``store.spend``, landed: Redis's is a task, which the next admit must not overtake."""
    store.spend(user, model, tokens)
    if isinstance(store, RedisQuotas):
        await store.settled()


async def test_without_limits_nothing_touches_sqlite(db_path: Path) -> None:
    unlimited = QuotaStore(db_path, Quotas())
    assert not unlimited.limited
    # only another model is limited: this pair has no bucket at all
    other = QuotaStore(db_path, Quotas(models={"big": Quota(requests_per_s=1)}))
    assert other.limited
    for store in (unlimited, other):
        await store.close()  # a closed connection raises on any use, so these calls show SQLite is never reached
        allowance = await store.admit("alice", "small")
        assert (allowance.allowed, allowance.retry_after_s, allowance.reason, allowance.headers) == (True, 0, "", {})
        store.spend("alice", "small", 1000)


async def test_burst_then_refusal(open_store: Opener) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=5)))  # burst: one second's worth
    remaining = []
    for _ in range(5):
        allowance = await store.admit("alice", "m")
        assert allowance.allowed
        assert allowance.retry_after_s == 0
        assert "Retry-After" not in allowance.headers
        remaining.append(allowance.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["4", "3", "2", "1", "0"]

    refused = await store.admit("alice", "m")
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(0.2)
    assert refused.reason == "You are over your limit of 5 requests per second"
    assert refused.headers == {"x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "0",
                               "x-ratelimit-reset-requests": "1s", "Retry-After": "1"}


async def test_refill_over_time(open_store: Opener, clock: FakeClock) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=0.5, burst=3)))
    assert [(await store.admit("alice", "m")).allowed for _ in range(4)] == [True, True, True, False]
    refused = await store.admit("alice", "m")
    assert refused.retry_after_s == pytest.approx(2.0)
    assert refused.headers["Retry-After"] == "2"
    assert refused.reason == "You are over your limit of 0.5 requests per second"

    clock.now += 1.9
    assert not (await store.admit("alice", "m")).allowed
    clock.now += 0.1  # exactly the Retry-After since the bucket ran dry
    first = await store.admit("alice", "m")
    assert first.allowed
    assert first.headers["x-ratelimit-reset-requests"] == "6s"  # three requests to refill at 0.5 per second
    assert not (await store.admit("alice", "m")).allowed

    clock.now += 3600  # a long pause refills up to the burst, not beyond
    assert [(await store.admit("alice", "m")).allowed for _ in range(4)] == [True, True, True, False]


async def test_default_burst_is_at_least_one(open_store: Opener) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=0.25)))
    assert [(await store.admit("alice", "m")).allowed for _ in range(2)] == [True, False]
    refused = await store.admit("alice", "m")
    assert refused.retry_after_s == pytest.approx(4.0)
    assert refused.reason == "You are over your limit of 0.25 requests per second"


async def test_a_users_limit_covers_all_models_and_no_other_user(open_store: Opener) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=2)))
    assert (await store.admit("alice", "m")).allowed
    assert (await store.admit("alice", "n")).allowed
    refused = await store.admit("alice", "other")
    assert not refused.allowed
    assert refused.reason == "You are over your limit of 2 requests per second"
    assert [(await store.admit("bob", "m")).allowed for _ in range(3)] == [True, True, False]


async def test_a_models_limit_is_shared_by_all_users(open_store: Opener) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=10), per_model=Quota(requests_per_s=3)))
    assert [(await store.admit("alice", "m")).allowed for _ in range(3)] == [True, True, True]
    refused = await store.admit("bob", "m")
    assert not refused.allowed
    assert refused.reason == "Model 'm' is over its limit of 3 requests per second (all users together)"
    assert refused.retry_after_s == pytest.approx(1 / 3)
    assert (await store.admit("bob", "n")).allowed  # each model has its own bucket


async def test_models_override_per_model_as_a_whole(open_store: Opener) -> None:
    store = open_store(Quotas(per_model=Quota(requests_per_s=1, tokens_per_min=60),
                              models={"big": Quota(requests_per_s=4)}))
    assert [(await store.admit("alice", "big")).allowed for _ in range(5)] == [True] * 4 + [False]
    assert [(await store.admit("alice", "small")).allowed for _ in range(2)] == [True, False]
    assert (await store.admit("alice", "small")).reason == ("Model 'small' is over its limit of 1 request per second "
                                                    "(all users together)")
    # the override names no token limit, so "big" has none, whatever per_model says
    await spend(store, "alice", "big", 10_000)
    headers = (await store.admit("bob", "big")).headers
    assert not any(name.endswith("-tokens") for name in headers)


async def test_tokens_admit_while_above_zero_and_spend_goes_negative(open_store: Opener,
                                                               clock: FakeClock) -> None:
    store = open_store(Quotas(per_user=Quota(tokens_per_min=600)))  # 10 tokens a second
    first = await store.admit("alice", "m")
    assert first.allowed
    assert first.headers == {"x-ratelimit-limit-tokens": "600", "x-ratelimit-remaining-tokens": "600",
                             "x-ratelimit-reset-tokens": "0s"}
    assert (await store.admit("alice", "m")).allowed  # admitting takes no tokens: their number is not known yet

    await spend(store, "alice", "m", 590)
    assert (await store.admit("alice", "m")).headers["x-ratelimit-remaining-tokens"] == "10"
    await spend(store, "alice", "m", 410)  # more than was left: the bucket owes 400
    refused = await store.admit("alice", "m")
    assert not refused.allowed
    assert refused.reason == "You are over your limit of 600 tokens per minute"
    assert refused.retry_after_s == pytest.approx(40.1)  # until it holds a whole token again
    assert refused.headers["Retry-After"] == "41"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert refused.headers["x-ratelimit-reset-tokens"] == "100s"  # the debt and a full minute
    assert (await store.admit("bob", "m")).allowed  # another user's bucket is full

    clock.now += 40.0  # the debt is paid, but the bucket is empty: 0 is not above 0
    assert not (await store.admit("alice", "m")).allowed
    clock.now += 0.1
    assert (await store.admit("alice", "m")).allowed


async def test_model_tokens_are_shared_by_all_users(open_store: Opener) -> None:
    store = open_store(Quotas(per_model=Quota(tokens_per_min=100_000)))
    await spend(store, "alice", "m", 100_000)
    refused = await store.admit("bob", "m")
    assert not refused.allowed
    assert refused.reason == "Model 'm' is over its limit of 100,000 tokens per minute (all users together)"
    assert refused.retry_after_s == pytest.approx(60 / 100_000)
    assert refused.headers["Retry-After"] == "1"  # at least a whole second
    await spend(store, "alice", "n", 5)  # another model's bucket
    assert (await store.admit("bob", "n")).allowed


async def test_headers_follow_the_tighter_of_user_and_model(open_store: Opener) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=1, burst=5, tokens_per_min=1000),
                              per_model=Quota(requests_per_s=1, burst=3, tokens_per_min=60_000)))
    allowance = await store.admit("alice", "m")
    assert allowance.headers == {
        "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2", "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "0s",
    }
    await store.admit("bob", "m")
    await store.admit("bob", "m")  # the model is spent; alice still has 4 of her own
    refused = await store.admit("alice", "m")
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_both_refusing_name_both_limits_and_wait_for_the_later(open_store: Opener) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=1), per_model=Quota(tokens_per_min=60)))
    assert (await store.admit("alice", "m")).allowed
    await spend(store, "alice", "m", 65)  # 5 owed at 1 token a second
    refused = await store.admit("alice", "m")
    assert refused.reason == ("You are over your limit of 1 request per second; "
                              "Model 'm' is over its limit of 60 tokens per minute (all users together)")
    assert refused.retry_after_s == pytest.approx(6.0)
    assert refused.headers["Retry-After"] == "6"


async def test_a_refusal_charges_neither_bucket(open_store: Opener) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=10), per_model=Quota(requests_per_s=1),
                              models={"free": Quota()}))
    assert (await store.admit("alice", "m")).allowed
    for _ in range(20):
        assert not (await store.admit("alice", "m")).allowed  # the model refuses: alice's own bucket is not charged
    # "free" has no model bucket, so the headers show alice's bucket alone: only 2 of her 10 taken
    assert (await store.admit("alice", "free")).headers["x-ratelimit-remaining-requests"] == "8"

    assert [(await store.admit("bob", "free")).allowed for _ in range(11)] == [True] * 10 + [False]
    for _ in range(20):
        assert not (await store.admit("bob", "n")).allowed  # bob refuses: model n is not charged
    assert (await store.admit("carol", "n")).allowed


async def test_two_stores_on_one_file_share_the_buckets(open_store: Opener) -> None:
    quotas = Quotas(per_user=Quota(requests_per_s=1, burst=4, tokens_per_min=1000))
    first, second = open_store(quotas), open_store(quotas)
    assert [(await first.admit("alice", "m")).allowed for _ in range(3)] == [True, True, True]
    assert (await second.admit("alice", "m")).headers["x-ratelimit-remaining-requests"] == "0"
    assert not (await first.admit("alice", "m")).allowed
    await spend(second, "alice", "m", 1000)
    assert (await first.admit("alice", "m")).reason == ("You are over your limit of 1 request per second; "
                                                "You are over your limit of 1,000 tokens per minute")


_HAMMER = textwrap.dedent("""
    import asyncio
    import sys
    from pathlib import Path
    from first_jupyter.config import Quota, Quotas
    from first_jupyter.serve.quotas import QuotaStore

    async def hammer(path: Path, attempts: int) -> int:
        quotas = Quotas(per_user=Quota(requests_per_s=1, burst=300), per_model=Quota(tokens_per_min=1_000_000))
        store = QuotaStore(path, quotas, clock=lambda: 0.0)  # a clock that stands still: no refill at all
        print("ready", flush=True)
        sys.stdin.readline()  # start together with the other process
        admitted = 0
        for _ in range(attempts):
            if (await store.admit("alice", "m")).allowed:
                admitted += 1
            store.spend("alice", "m", 7)
        return admitted

    print(asyncio.run(hammer(Path(sys.argv[1]), int(sys.argv[2]))), flush=True)
""")


def test_two_processes_hammering_one_file_lose_no_update(db_path: Path) -> None:
    attempts = 400
    procs = [subprocess.Popen([sys.executable, "-c", _HAMMER, str(db_path), str(attempts)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
             for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=60)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0]
    assert sum(int(out) for out in outputs) == 300  # exactly the burst, of 800 attempts

    quotas = Quotas(per_user=Quota(requests_per_s=1, burst=300), per_model=Quota(tokens_per_min=1_000_000))
    store = QuotaStore(db_path, quotas, clock=lambda: 0.0)
    try:
        refused = asyncio.run(store.admit("alice", "m"))
    finally:
        asyncio.run(store.close())
    assert not refused.allowed
    assert refused.headers["x-ratelimit-remaining-tokens"] == str(1_000_000 - 2 * attempts * 7)  # every spend
