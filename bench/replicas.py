"""Two ``first serve`` replicas behind nginx, sharing one Redis and one PostgreSQL: 1,000 streams held across a
kill -9 of one replica, and a batch running on it across the kill.

Everything is real but the engine and Globus: Debian's redis-server, PostgreSQL and nginx (the deployment
example's site) on loopback ports, two ``first serve`` processes with separate state dirs and one shared files
dir, the fake upstream pacing its events so that every stream is still open at the kill, and the loopback stand-in
answering Globus introspection. The run, in order:

1. Round trips: one round of streams, start to end and their usage written, between readings of Redis's
   ``INFO commandstats`` and PostgreSQL's ``pg_stat_statements`` (preloaded for the run; read from a database of
   its own, so the readings are not counted). What the replicas do on their own while idle (lease scans) is read
   over a quiet window first and taken off, so the figure is what a request costs. Each user has a per-user and a
   per-model quota, as at a facility, set far above what the run asks.
2. The kill: N streams opened through nginx; once each has its first token, the upstream's gate closes, a batch is
   made and some of its lines answered, and the replica holding the batch's lease is killed with SIGKILL. The
   gate opens, N/2 new streams go through nginx (to the survivor), and the survivor takes the lapsed lease and
   finishes the batch. Its output and error files must hold every ``custom_id`` exactly once.

    python bench/replicas.py [--streams 1000] [--batch-lines 200] [--quick]

Prints plain figures, then PASS or FAIL (exit status 0 or 1).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import aiohttp
import httpx
import openai
import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fake_globus_auth import fake_globus_auth
from bench.overhead import BenchError, percentiles, ready_line, started, wait_for
from bench.serve_processes import batch_holder, serve_processes
from bench.shared_load import CLIENT_ID, USERS, raise_fd_limit
from bench.state_servers import Nginx, Postgres, RedisServer, nginx_in_front

MODEL: Final = "fake-model"
LEASE_S: Final = 2.0
"""The batch lease: the survivor takes a killed replica's batch over within seconds."""
QUIET_S: Final = 5.0
"""The quiet window in which the replicas' own round trips (no request) are counted."""
MONITOR_DB: Final = "bench"
"""The database the bench reads pg_stat_statements from; the replicas use ``postgres``."""
QUOTA: Final = {"requests_per_s": 1_000_000, "burst": 1_000_000}
GUARD_S: Final = 300.0
"""How long any one step may take before the bench calls it hung: a failure guard, never a pace."""
CHAT: Final = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
FILES: Final = 8
"""Descriptors per stream, with room: the client's socket, nginx's two, the replica's two, the upstream's one."""


@dataclass(frozen=True)
class Settings:
    streams: int
    batch_lines: int
    chunks: int
    pace: float
    """Seconds between the fake's events: a stream lasts ``chunks * pace``, long enough for every stream to be
    open, the batch made and the replica killed before the first stream ends, on two loaded cores."""

    @property
    def after(self) -> int:
        return max(1, self.streams // 2)


DEFAULT: Final = Settings(streams=1000, batch_lines=200, chunks=80, pace=0.25)
QUICK: Final = Settings(streams=20, batch_lines=10, chunks=20, pace=0.25)


@dataclass
class Stream:
    """One streamed chat completion through nginx, as its client saw it (``perf_counter`` times)."""

    started: float
    replica: str = ""
    first_token: float | None = None
    ended: float | None = None
    events: int = 0
    error: str | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and self.ended is not None


@dataclass
class Streams:
    """A set of streams under way; ``opened`` is set once each has its first token or has failed."""

    expected: int
    items: list[Stream] = field(default_factory=list)
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    _settled: set[int] = field(default_factory=set)

    def settled(self, stream: Stream) -> None:
        """``stream`` has its first token or has failed (counted once, in constant time: the client's own CPU is
        in every time to first token it measures)."""
        self._settled.add(id(stream))
        if len(self._settled) >= self.expected:
            self.opened.set()

    def ttft(self) -> list[float]:
        return [s.first_token - s.started for s in self.items if s.first_token is not None]


async def one_stream(session: aiohttp.ClientSession, url: str, token: str, chunks: int, into: Streams) -> None:
    """Stream one chat completion; the first event carrying text is its first token; [DONE] after ``chunks``
    tokens is complete, anything else (a cut connection, an early end) is its error."""
    stream = Stream(time.perf_counter())
    into.items.append(stream)
    try:
        async with session.post(url, json=CHAT, headers={"Authorization": f"Bearer {token}"}) as answer:
            stream.replica = answer.headers.get("X-Upstream", "")
            if answer.status != 200:
                stream.error = f"HTTP {answer.status}: {(await answer.read())[:200]!r}"
                return
            async for line in answer.content:
                if line.startswith(b"data: [DONE]"):
                    stream.ended = time.perf_counter()
                elif line.startswith(b"data: ") and b'"content":"' in line and b'"content":""' not in line:
                    stream.events += 1
                    if stream.first_token is None:
                        stream.first_token = time.perf_counter()
                        into.settled(stream)
            if stream.ended is None or stream.events < chunks:
                stream.error = f"ended after {stream.events} of {chunks} tokens, [DONE] {stream.ended is not None}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
    finally:
        if stream.error is not None:
            stream.ended = time.perf_counter()
        into.settled(stream)


def start_streams(session: aiohttp.ClientSession, url: str, count: int,
                  chunks: int) -> tuple[Streams, asyncio.Future[Any]]:
    streams = Streams(count)
    tokens = [f"AT-user{n}" for n in range(USERS)]
    done = asyncio.gather(*(one_stream(session, url, tokens[i % USERS], chunks, streams) for i in range(count)))
    return streams, done


# -- the round trips a request costs -------------------------------------------------------------------------------

class RedisWatch:
    """Counts the commands the replicas send Redis, through MONITOR. ``INFO commandstats`` counts a script's own
    commands too (the quota script's HMGET, HSET, PEXPIRE and TIME), which run inside Redis and are no round trip;
    MONITOR shows them as the script's (``lua``). Each reading sends a marker (``ECHO``) and takes the count at the
    moment the watch sees it, so that no command still on its way is left out or counted twice."""

    MARK: Final = "first-bench-mark-"

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        self._sent = 0
        self._marks = 0
        self._seen: dict[str, int] = {}
        self._changed = threading.Condition()
        self._watching = redis.Redis.from_url(url).monitor()
        self._watching.__enter__()  # MONITOR sent and acknowledged: every command from now on is seen
        self._thread = threading.Thread(target=self._watch, name="redis-monitor", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        for entry in self._watching.listen():
            command = str(entry["command"])
            if command.upper().startswith(f"ECHO {self.MARK.upper()}"):
                with self._changed:
                    self._seen[command.split()[-1]] = self._sent
                    self._changed.notify_all()
                if command.endswith("stop"):
                    return
            elif entry["client_type"] != "lua" and not command.upper().startswith("INFO"):
                self._sent += 1

    def sent(self, name: str = "") -> int:
        """Commands sent by the replicas so far."""
        self._marks += 1
        mark = f"{self.MARK}{name or self._marks}"
        self._client.echo(mark)
        with self._changed:
            if not self._changed.wait_for(lambda: mark in self._seen, GUARD_S):
                raise BenchError(f"Redis's MONITOR never showed {mark}")
            return self._seen[mark]

    def close(self) -> None:
        self.sent("stop")
        self._thread.join(GUARD_S)
        self._watching.__exit__(None, None, None)


@dataclass(frozen=True)
class Reading:
    at: float
    redis_sent: int
    redis_commands: Counter[str]
    pg_statements: Counter[str]
    usage_rows: int


_STATEMENTS = ("SELECT s.query, s.calls, s.rows FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
               "WHERE d.datname = 'postgres'")
_USAGE_INSERT = "INSERT INTO usage "
_SHOWN_WORDS = 3
"""A statement is named by its first words in the figures: its kind and its table."""


def read_counts(watch: RedisWatch, redis_url: str, monitor_url: str) -> Reading:
    """Redis commands sent by the replicas and run in all (``INFO`` itself left out: it is this reading's), and
    statements run and usage rows written in the replicas' database, read from another database so that the
    reading is not counted."""
    sent = watch.sent()
    stats = cast(dict[str, dict[str, Any]], redis.Redis.from_url(redis_url).info("commandstats"))
    commands = Counter({k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()
                        if k not in ("cmdstat_info", "cmdstat_echo")})  # the bench's own
    statements: Counter[str] = Counter()
    usage_rows = 0
    with psycopg.connect(monitor_url, autocommit=True) as conn:
        for query, calls, rows in conn.execute(_STATEMENTS):
            statements[" ".join(query.split()[:_SHOWN_WORDS])] += calls
            usage_rows += rows if query.startswith(_USAGE_INSERT) else 0
    return Reading(time.monotonic(), sent, commands, statements, usage_rows)


@dataclass(frozen=True)
class RoundTrips:
    requests: int
    redis_per_request: float
    pg_per_request: float
    redis_idle_per_s: float
    pg_idle_per_s: float
    redis_commands: dict[str, float]
    """Each Redis command's calls per request, scripts' own included, gross (the quiet window's not taken off)."""
    pg_statements: dict[str, float]
    """The same for PostgreSQL's statements, by their first words."""


def per_request(idle: tuple[Reading, Reading], busy: tuple[Reading, Reading], requests: int) -> RoundTrips:
    """What ``requests`` cost between the ``busy`` readings, less the idle rate over the same time."""
    quiet_s = idle[1].at - idle[0].at
    redis_idle = (idle[1].redis_sent - idle[0].redis_sent) / quiet_s
    pg_idle = (idle[1].pg_statements.total() - idle[0].pg_statements.total()) / quiet_s
    busy_s = busy[1].at - busy[0].at
    redis_net = busy[1].redis_sent - busy[0].redis_sent - redis_idle * busy_s
    pg_net = busy[1].pg_statements.total() - busy[0].pg_statements.total() - pg_idle * busy_s
    commands = busy[1].redis_commands - busy[0].redis_commands
    statements = busy[1].pg_statements - busy[0].pg_statements
    return RoundTrips(requests, redis_net / requests, pg_net / requests, redis_idle, pg_idle,
                      {name: calls / requests for name, calls in commands.most_common()},
                      {name: calls / requests for name, calls in statements.most_common()})


# -- the parts -----------------------------------------------------------------------------------------------------

@dataclass
class Parts:
    work: Path
    upstream: str
    redis: RedisServer
    postgres: Postgres
    balancer: Nginx
    ports: list[int]
    procs: list[subprocess.Popen[bytes]]

    @property
    def monitor_url(self) -> str:
        return self.postgres.url.rsplit("/", 1)[0] + "/" + MONITOR_DB

    def gate(self, **command: Any) -> dict[str, Any]:
        answer = httpx.post(f"{self.upstream}/gate", json=command, timeout=GUARD_S)
        answer.raise_for_status()
        state: dict[str, Any] = answer.json()
        return state

    def batch_holder(self, batch_id: str) -> int | None:
        return batch_holder(self.postgres.url, self.procs, batch_id)


def replica_config(work: Path, upstream: str, redis_url: str, database: str, n: int) -> dict[str, Any]:
    return {
        "clusters": {"remote": {"backend": "http", "endpoints": [{
            "name": "fake", "base_url": f"{upstream}/v1", "concurrency": 4096,
            "models": [{"id": MODEL, "capabilities": ["chat"]}]}]}},
        "defaults": {"model": MODEL, "limits": {"max_connections": 4096, "max_connections_per_host": 4096}},
        "serve": {"state_dir": str(work / f"state-{n}"), "auth": {"client_id": CLIENT_ID},
                  "quotas": {"per_user": QUOTA, "per_model": QUOTA},
                  "state": {"redis": redis_url, "database": database, "files_dir": str(work / "shared-files"),
                            "batch_lease_s": LEASE_S}},
    }


def monitor(url: str) -> None:
    """A database of the bench's own, with pg_stat_statements, from which the replicas' statements are read."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {MONITOR_DB}")
    with psycopg.connect(url.rsplit("/", 1)[0] + "/" + MONITOR_DB, autocommit=True) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")


@contextlib.contextmanager
def running_parts(work: Path, settings: Settings) -> Iterator[Parts]:
    upstream_log = work / "upstream.log"
    with contextlib.ExitStack() as stack:
        fake = stack.enter_context(started(
            [sys.executable, str(Path(__file__).with_name("fake_upstream.py")), "--port", "0", "--models", MODEL,
             "--chunks", str(settings.chunks), "--pace", str(settings.pace)], upstream_log))
        upstream = wait_for("fake upstream", fake, upstream_log, lambda: ready_line(upstream_log))
        state = RedisServer(work / "redis")
        stack.callback(state.stop)
        state.start()
        postgres = Postgres({"shared_preload_libraries": "pg_stat_statements"})
        stack.callback(postgres.stop)
        postgres.start()
        monitor(postgres.url)
        auth = stack.enter_context(fake_globus_auth(CLIENT_ID))
        procs: list[subprocess.Popen[bytes]] = []
        urls = stack.enter_context(serve_processes(
            work, lambda n: replica_config(work, upstream, state.url, postgres.url, n), auth.url, procs=procs))
        ports = [int(url.rsplit(":", 1)[1]) for url in urls]
        balancer = stack.enter_context(nginx_in_front(work / "nginx", ports, settings.streams * FILES + 1024))
        yield Parts(work, upstream, state, postgres, balancer, ports, procs)


# -- the run -------------------------------------------------------------------------------------------------------

async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until ``await check()`` is true, keeping the loop (and the streams on it) going."""
    deadline = time.monotonic() + GUARD_S
    while not await check():
        if time.monotonic() > deadline:
            raise BenchError(f"never happened within {GUARD_S:g} s: {what}")
        await asyncio.sleep(0.05)


async def round_trips(parts: Parts, session: aiohttp.ClientSession, url: str, settings: Settings) -> RoundTrips:
    """One round of streams, start to end and its usage written, between readings; a quiet window first."""
    watch = await asyncio.to_thread(RedisWatch, parts.redis.url)
    try:
        return await _round_trips(parts, watch, session, url, settings)
    finally:
        await asyncio.to_thread(watch.close)


async def _round_trips(parts: Parts, watch: RedisWatch, session: aiohttp.ClientSession, url: str,
                       settings: Settings) -> RoundTrips:
    readings: list[Reading] = []

    async def usage_written(rows: int) -> bool:
        readings.append(await asyncio.to_thread(read_counts, watch, parts.redis.url, parts.monitor_url))
        return readings[-1].usage_rows >= rows

    await eventually(lambda: usage_written(len(parts.ports) * USERS), "the warm-up's usage is written")
    idle_start = readings[-1]
    await asyncio.sleep(QUIET_S)  # what the replicas do with no request
    idle_end = await asyncio.to_thread(read_counts, watch, parts.redis.url, parts.monitor_url)
    count = min(settings.streams, 200)
    streams, done = start_streams(session, url, count, settings.chunks)
    await done
    failed = [s.error for s in streams.items if not s.complete]
    if failed:
        raise BenchError(f"{len(failed)} of the round trips' {count} streams failed: {failed[:3]}")
    await eventually(lambda: usage_written(idle_end.usage_rows + count), "the round's usage is written")
    return per_request((idle_start, idle_end), (idle_end, readings[-1]), count)


def batch_input(path: Path, lines: int) -> Path:
    path.write_bytes(b"".join(json.dumps({
        "custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}]}}).encode() + b"\n"
        for i in range(lines)))
    return path


@dataclass
class BatchRun:
    lines: int
    answered_before_kill: int = 0
    finished_after_kill_s: float = 0.0
    status: str = ""
    lost: int = 0
    doubled: int = 0


async def start_batch(parts: Parts, client: openai.AsyncOpenAI, run: BatchRun) -> tuple[str, int]:
    """With the upstream's gate closed: a batch made through nginx, a quarter of its lines let through and
    answered, the rest held; the batch's id and the replica that runs it."""
    parts.gate(hold=True)
    source = batch_input(parts.work / "batch.jsonl", run.lines)
    uploaded = await client.files.create(file=source.open("rb"), purpose="batch")
    batch = await client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
    before = max(1, run.lines // 4)
    parts.gate(release=before)

    async def under_way() -> bool:
        counts = (await client.batches.retrieve(batch.id)).request_counts
        answered = counts.completed if counts else 0
        run.answered_before_kill = max(run.answered_before_kill, answered)
        return (answered >= before and parts.gate(release=0)["held"] > 0
                and await asyncio.to_thread(parts.batch_holder, batch.id) is not None)

    await eventually(under_way, "the batch runs, some lines answered and the next held at the upstream")
    holder = await asyncio.to_thread(parts.batch_holder, batch.id)
    assert holder is not None
    return batch.id, holder


async def finish_batch(client: openai.AsyncOpenAI, batch_id: str, killed_at: float, run: BatchRun) -> None:
    """Wait for the survivor to finish the batch, then count each ``custom_id`` in its output and error files."""
    async def finished() -> bool:
        return (await client.batches.retrieve(batch_id)).status in ("completed", "failed", "cancelled", "expired")

    await eventually(finished, "the survivor takes the lapsed lease and finishes the batch")
    run.finished_after_kill_s = time.perf_counter() - killed_at
    done = await client.batches.retrieve(batch_id)
    run.status = done.status
    seen: Counter[str] = Counter()
    for file_id in (done.output_file_id, done.error_file_id):
        if file_id is not None:
            content = await client.files.content(file_id)
            seen.update(json.loads(line)["custom_id"] for line in content.text.splitlines())
    expected = {f"q{i}" for i in range(run.lines)}
    run.lost = len(expected - set(seen))
    run.doubled = sum(n - 1 for n in seen.values()) + sum(n for cid, n in seen.items() if cid not in expected)


@dataclass
class Figures:
    settings: Settings
    trips: RoundTrips
    held: Streams
    after: Streams
    batch: BatchRun
    killed: str
    killed_at: float
    open_at_kill: int


async def run(parts: Parts, settings: Settings) -> Figures:
    url = f"{parts.balancer.url}/first/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=GUARD_S)
    client = openai.AsyncOpenAI(base_url=f"{parts.balancer.url}/first/v1", api_key="AT-batcher", max_retries=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session, client:
        for port in parts.ports:  # each user's token introspected, and known to each replica
            await start_streams(session, f"http://127.0.0.1:{port}/first/v1/chat/completions", USERS,
                                settings.chunks)[1]
        trips = await round_trips(parts, session, url, settings)
        held, held_done = start_streams(session, url, settings.streams, settings.chunks)
        await asyncio.wait_for(held.opened.wait(), GUARD_S)
        batch = BatchRun(settings.batch_lines)
        batch_id, holder = await start_batch(parts, client, batch)
        open_at_kill = sum(s.first_token is not None and s.ended is None for s in held.items)
        os.kill(parts.procs[holder].pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        await asyncio.to_thread(parts.procs[holder].wait, GUARD_S)
        parts.gate(open=True)
        after, after_done = start_streams(session, url, settings.after, settings.chunks)
        await finish_batch(client, batch_id, killed_at, batch)
        await held_done
        await after_done
    return Figures(settings, trips, held, after, batch, f"127.0.0.1:{parts.ports[holder]}", killed_at, open_at_kill)


def report(f: Figures) -> bool:
    """Print the figures; whether the run passed."""
    s = f.settings
    on_killed = [x for x in f.held.items if x.replica == f.killed]
    on_survivor = [x for x in f.held.items if x.replica != f.killed]
    failed = [x for x in f.held.items if not x.complete]
    failed_killed = [x for x in on_killed if not x.complete]
    failed_survivor = [x for x in on_survivor if not x.complete]
    fail_after = sorted(x.ended - f.killed_at for x in failed_killed if x.ended is not None)
    fail_p50, fail_p99 = percentiles(fail_after)
    before50, before99 = percentiles(f.held.ttft())
    after50, after99 = percentiles(f.after.ttft())
    after_ok = sum(x.complete for x in f.after.items)
    print(f"two first serve replicas behind nginx on one Redis and one PostgreSQL; {s.streams} concurrent streams "
          f"of {s.chunks} tokens {s.pace:g} s apart; a batch of {s.batch_lines} lines; lease {LEASE_S:g} s")
    print(f"streams open at the kill: {f.open_at_kill} of {s.streams} ({len(on_killed)} on the killed replica, "
          f"{len(on_survivor)} on the survivor)")
    print(f"streams completed on the survivor: {sum(x.complete for x in on_survivor)} of {len(on_survivor)}")
    print(f"streams failed: {len(failed)} ({len(failed_killed)} on the killed replica, {len(failed_survivor)} on "
          f"the survivor)")
    print(f"killed replica's streams failed after the kill: p50 {fail_p50:.1f} ms, p99 {fail_p99:.1f} ms, "
          f"max {max(fail_after, default=0) * 1000:.1f} ms")
    print(f"streams after the kill: {after_ok} of {len(f.after.items)} completed")
    print(f"batch lines lost: {f.batch.lost}")
    print(f"batch lines doubled: {f.batch.doubled}")
    print(f"batch: {f.batch.status}, {f.batch.answered_before_kill} of {f.batch.lines} lines answered before the "
          f"kill, finished by the survivor {f.batch.finished_after_kill_s:.1f} s after it")
    print(f"time to first token before the kill: p50 {before50:.1f} ms, p99 {before99:.1f} ms")
    print(f"time to first token after the kill: p50 {after50:.1f} ms, p99 {after99:.1f} ms")
    t = f.trips
    print(f"Redis round trips per request: {t.redis_per_request:.2f} (commands the replicas sent, over "
          f"{t.requests} streams; the quiet window's {t.redis_idle_per_s:.1f} per s taken off)")
    commands = ", ".join(f"{name} {n:.2f}" for name, n in t.redis_commands.items())
    print(f"Redis commands run per request, the scripts' own included: {commands}")
    print(f"PostgreSQL statements per request: {t.pg_per_request:.2f} (over {t.requests} streams; the quiet "
          f"window's {t.pg_idle_per_s:.1f} per s taken off)")
    statements = ", ".join(f"{name} {n:.2f}" for name, n in t.pg_statements.items())
    print(f"PostgreSQL statements run per request, the quiet window's rate kept: {statements}")
    for error in [x.error for x in failed_survivor + [x for x in f.after.items if not x.complete]][:5]:
        print(f"error: {error}")
    passed = (f.open_at_kill == s.streams and len(on_killed) > 0 and len(failed_killed) == len(on_killed)
              and not failed_survivor and after_ok == len(f.after.items) and f.batch.status == "completed"
              and f.batch.lost == 0 and f.batch.doubled == 0)
    print("PASS" if passed else "FAIL")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, help=f"streams held across the kill (default {DEFAULT.streams})")
    parser.add_argument("--batch-lines", type=int, help=f"lines of the batch run across it (default "
                                                          f"{DEFAULT.batch_lines})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.streams} streams, a {QUICK.batch_lines}-line "
                                                             "batch: a smoke run")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULT
    settings = Settings(args.streams or base.streams, args.batch_lines or base.batch_lines, base.chunks, base.pace)
    raise_fd_limit(settings.streams * FILES + 1024)
    with tempfile.TemporaryDirectory(prefix="first-replicas-") as work:
        try:
            with running_parts(Path(work), settings) as parts:
                return 0 if report(asyncio.run(run(parts, settings))) else 1
        except BenchError as exc:
            print(f"FAIL: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
