"""Quotas: token buckets in one SQLite file, shared by every process of the gateway, on a clock the tests move."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from first_jupyter.config import Quota, Quotas
from first_jupyter.gateway.quotas import QuotaStore


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


@pytest.fixture
def open_store(db_path: Path, clock: FakeClock) -> Iterator[Callable[[Quotas], QuotaStore]]:
    stores: list[QuotaStore] = []

    def open_(quotas: Quotas) -> QuotaStore:
        stores.append(QuotaStore(db_path, quotas, clock=clock))
        return stores[-1]

    yield open_
    for store in stores:
        store.close()


def test_without_limits_nothing_touches_sqlite(open_store: Callable[[Quotas], QuotaStore]) -> None:
    unlimited = open_store(Quotas())
    assert not unlimited.limited
    # only another model is limited: this pair has no bucket at all
    other = open_store(Quotas(models={"big": Quota(requests_per_s=1)}))
    assert other.limited
    for store in (unlimited, other):
        store.close()  # a closed connection raises on any use, so these calls show SQLite is never reached
        allowance = store.admit("alice", "small")
        assert (allowance.allowed, allowance.retry_after_s, allowance.reason, allowance.headers) == (True, 0, "", {})
        store.spend("alice", "small", 1000)


def test_burst_then_refusal(open_store: Callable[[Quotas], QuotaStore]) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=5)))  # burst: one second's worth
    remaining = []
    for _ in range(5):
        allowance = store.admit("alice", "m")
        assert allowance.allowed
        assert allowance.retry_after_s == 0
        assert "Retry-After" not in allowance.headers
        remaining.append(allowance.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["4", "3", "2", "1", "0"]

    refused = store.admit("alice", "m")
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(0.2)
    assert refused.reason == "You are over your limit of 5 requests per second"
    assert refused.headers == {"x-ratelimit-limit-requests": "5", "x-ratelimit-remaining-requests": "0",
                               "x-ratelimit-reset-requests": "1s", "Retry-After": "1"}


def test_refill_over_time(open_store: Callable[[Quotas], QuotaStore], clock: FakeClock) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=0.5, burst=3)))
    assert [store.admit("alice", "m").allowed for _ in range(4)] == [True, True, True, False]
    refused = store.admit("alice", "m")
    assert refused.retry_after_s == pytest.approx(2.0)
    assert refused.headers["Retry-After"] == "2"
    assert refused.reason == "You are over your limit of 0.5 requests per second"

    clock.now += 1.9
    assert not store.admit("alice", "m").allowed
    clock.now += 0.1  # exactly the Retry-After since the bucket ran dry
    first = store.admit("alice", "m")
    assert first.allowed
    assert first.headers["x-ratelimit-reset-requests"] == "6s"  # three requests to refill at 0.5 per second
    assert not store.admit("alice", "m").allowed

    clock.now += 3600  # a long pause refills up to the burst, not beyond
    assert [store.admit("alice", "m").allowed for _ in range(4)] == [True, True, True, False]


def test_default_burst_is_at_least_one(open_store: Callable[[Quotas], QuotaStore]) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=0.25)))
    assert [store.admit("alice", "m").allowed for _ in range(2)] == [True, False]
    refused = store.admit("alice", "m")
    assert refused.retry_after_s == pytest.approx(4.0)
    assert refused.reason == "You are over your limit of 0.25 requests per second"


def test_a_users_limit_covers_all_models_and_no_other_user(open_store: Callable[[Quotas], QuotaStore]) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=2)))
    assert store.admit("alice", "m").allowed
    assert store.admit("alice", "n").allowed
    refused = store.admit("alice", "other")
    assert not refused.allowed
    assert refused.reason == "You are over your limit of 2 requests per second"
    assert [store.admit("bob", "m").allowed for _ in range(3)] == [True, True, False]


def test_a_models_limit_is_shared_by_all_users(open_store: Callable[[Quotas], QuotaStore]) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=10), per_model=Quota(requests_per_s=3)))
    assert [store.admit("alice", "m").allowed for _ in range(3)] == [True, True, True]
    refused = store.admit("bob", "m")
    assert not refused.allowed
    assert refused.reason == "Model 'm' is over its limit of 3 requests per second (all users together)"
    assert refused.retry_after_s == pytest.approx(1 / 3)
    assert store.admit("bob", "n").allowed  # each model has its own bucket


def test_models_override_per_model_as_a_whole(open_store: Callable[[Quotas], QuotaStore]) -> None:
    store = open_store(Quotas(per_model=Quota(requests_per_s=1, tokens_per_min=60),
                              models={"big": Quota(requests_per_s=4)}))
    assert [store.admit("alice", "big").allowed for _ in range(5)] == [True] * 4 + [False]
    assert [store.admit("alice", "small").allowed for _ in range(2)] == [True, False]
    assert store.admit("alice", "small").reason == ("Model 'small' is over its limit of 1 request per second "
                                                    "(all users together)")
    # the override names no token limit, so "big" has none, whatever per_model says
    store.spend("alice", "big", 10_000)
    headers = store.admit("bob", "big").headers
    assert not any(name.endswith("-tokens") for name in headers)


def test_tokens_admit_while_above_zero_and_spend_goes_negative(open_store: Callable[[Quotas], QuotaStore],
                                                               clock: FakeClock) -> None:
    store = open_store(Quotas(per_user=Quota(tokens_per_min=600)))  # 10 tokens a second
    first = store.admit("alice", "m")
    assert first.allowed
    assert first.headers == {"x-ratelimit-limit-tokens": "600", "x-ratelimit-remaining-tokens": "600",
                             "x-ratelimit-reset-tokens": "0s"}
    assert store.admit("alice", "m").allowed  # admitting takes no tokens: their number is not known yet

    store.spend("alice", "m", 590)
    assert store.admit("alice", "m").headers["x-ratelimit-remaining-tokens"] == "10"
    store.spend("alice", "m", 410)  # more than was left: the bucket owes 400
    refused = store.admit("alice", "m")
    assert not refused.allowed
    assert refused.reason == "You are over your limit of 600 tokens per minute"
    assert refused.retry_after_s == pytest.approx(40.1)  # until it holds a whole token again
    assert refused.headers["Retry-After"] == "41"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert refused.headers["x-ratelimit-reset-tokens"] == "100s"  # the debt and a full minute
    assert store.admit("bob", "m").allowed  # another user's bucket is full

    clock.now += 40.0  # the debt is paid, but the bucket is empty: 0 is not above 0
    assert not store.admit("alice", "m").allowed
    clock.now += 0.1
    assert store.admit("alice", "m").allowed


def test_model_tokens_are_shared_by_all_users(open_store: Callable[[Quotas], QuotaStore]) -> None:
    store = open_store(Quotas(per_model=Quota(tokens_per_min=100_000)))
    store.spend("alice", "m", 100_000)
    refused = store.admit("bob", "m")
    assert not refused.allowed
    assert refused.reason == "Model 'm' is over its limit of 100,000 tokens per minute (all users together)"
    assert refused.retry_after_s == pytest.approx(60 / 100_000)
    assert refused.headers["Retry-After"] == "1"  # at least a whole second
    store.spend("alice", "n", 5)  # another model's bucket
    assert store.admit("bob", "n").allowed


def test_headers_follow_the_tighter_of_user_and_model(open_store: Callable[[Quotas], QuotaStore]) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=1, burst=5, tokens_per_min=1000),
                              per_model=Quota(requests_per_s=1, burst=3, tokens_per_min=60_000)))
    allowance = store.admit("alice", "m")
    assert allowance.headers == {
        "x-ratelimit-limit-requests": "3", "x-ratelimit-remaining-requests": "2", "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "0s",
    }
    store.admit("bob", "m")
    store.admit("bob", "m")  # the model is spent; alice still has 4 of her own
    refused = store.admit("alice", "m")
    assert refused.headers["x-ratelimit-limit-requests"] == "3"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_both_refusing_name_both_limits_and_wait_for_the_later(open_store: Callable[[Quotas], QuotaStore]) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=1), per_model=Quota(tokens_per_min=60)))
    assert store.admit("alice", "m").allowed
    store.spend("alice", "m", 65)  # 5 owed at 1 token a second
    refused = store.admit("alice", "m")
    assert refused.reason == ("You are over your limit of 1 request per second; "
                              "Model 'm' is over its limit of 60 tokens per minute (all users together)")
    assert refused.retry_after_s == pytest.approx(6.0)
    assert refused.headers["Retry-After"] == "6"


def test_a_refusal_charges_neither_bucket(open_store: Callable[[Quotas], QuotaStore]) -> None:
    store = open_store(Quotas(per_user=Quota(requests_per_s=10), per_model=Quota(requests_per_s=1),
                              models={"free": Quota()}))
    assert store.admit("alice", "m").allowed
    for _ in range(20):
        assert not store.admit("alice", "m").allowed  # the model refuses: alice's own bucket is not charged
    # "free" has no model bucket, so the headers show alice's bucket alone: only 2 of her 10 taken
    assert store.admit("alice", "free").headers["x-ratelimit-remaining-requests"] == "8"

    assert [store.admit("bob", "free").allowed for _ in range(11)] == [True] * 10 + [False]
    for _ in range(20):
        assert not store.admit("bob", "n").allowed  # bob refuses: model n is not charged
    assert store.admit("carol", "n").allowed


def test_two_stores_on_one_file_share_the_buckets(open_store: Callable[[Quotas], QuotaStore]) -> None:
    quotas = Quotas(per_user=Quota(requests_per_s=1, burst=4, tokens_per_min=1000))
    first, second = open_store(quotas), open_store(quotas)
    assert [first.admit("alice", "m").allowed for _ in range(3)] == [True, True, True]
    assert second.admit("alice", "m").headers["x-ratelimit-remaining-requests"] == "0"
    assert not first.admit("alice", "m").allowed
    second.spend("alice", "m", 1000)
    assert first.admit("alice", "m").reason == ("You are over your limit of 1 request per second; "
                                                "You are over your limit of 1,000 tokens per minute")


_HAMMER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from first_jupyter.config import Quota, Quotas
    from first_jupyter.gateway.quotas import QuotaStore

    path, attempts = Path(sys.argv[1]), int(sys.argv[2])
    quotas = Quotas(per_user=Quota(requests_per_s=1, burst=300), per_model=Quota(tokens_per_min=1_000_000))
    store = QuotaStore(path, quotas, clock=lambda: 0.0)  # a clock that stands still: no refill at all
    print("ready", flush=True)
    sys.stdin.readline()  # start together with the other process
    admitted = 0
    for _ in range(attempts):
        if store.admit("alice", "m").allowed:
            admitted += 1
        store.spend("alice", "m", 7)
    print(admitted, flush=True)
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
        refused = store.admit("alice", "m")
    finally:
        store.close()
    assert not refused.allowed
    assert refused.headers["x-ratelimit-remaining-tokens"] == str(1_000_000 - 2 * attempts * 7)  # every spend
