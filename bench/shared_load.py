"""Load test of the shared gateway (``first serve``) on loopback: rounds of N concurrent streams, flat memory.

Everything is real but the upstream and Globus: ``first serve`` runs as a supervisor and its forked workers (the
real globus-sdk introspecting bearer tokens at a loopback stand-in), in front of the fake upstream pacing its
events so that all N streams are open at once. The baseline is the same round sent straight to the fake upstream
from this same script: the ratio of wall times is what the gateway adds under this load. Memory is the resident
size of the gateway's processes together after each round; flat means the last round's is within a few percent
of the first's (the first round warms caches and pools).

    python bench/shared_load.py [--streams 1000] [--rounds 4] [--processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson
import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fake_globus_auth import AUTH_URL_ENV, fake_globus_auth
from bench.overhead import BenchError, free_port, ready_line, started, wait_for

CLIENT_ID = "0ca9e1b6-5ea4-4f6e-9a0b-6c1d3e4f5a6b"
CHUNKS = 16
PACE_S = 0.2
"""Seconds between the fake's events: a stream lasts about 3.2 s, so a round's streams all overlap. At 0.1 s
(1.6 s) they did not always: on two cores, opening 1,000 streams through the gateway, with this script competing
for the same cores, can take longer than that, and the first ones ended before the last opened."""
USERS = 20
FLAT_WITHIN = 0.10


@dataclass
class Round:
    wall_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0
    events: int = 0


async def one_stream(session: aiohttp.ClientSession, url: str, headers: dict[str, str], tally: Round) -> None:
    body = orjson.dumps({"model": "fake-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.status != 200:
                tally.errors.append(f"HTTP {resp.status}: {(await resp.read())[:200]!r}")
                return
            tally.open_now += 1
            tally.most_open = max(tally.most_open, tally.open_now)
            seen, done = 0, False
            async for line in resp.content:
                if line.startswith(b"data: [DONE]"):
                    done = True
                elif line.startswith(b"data: "):
                    seen += 1
            tally.open_now -= 1
            tally.events += seen
            if not done or seen < CHUNKS:
                tally.errors.append(f"stream ended early: {seen} events, done={done}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.errors.append(f"{type(exc).__name__}: {exc}")


async def one_round(url: str, streams: int, token_of: list[str]) -> Round:
    tally = Round()
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=None)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_stream(session, url, {"Authorization": f"Bearer {token_of[i % len(token_of)]}"},
                                          tally) for i in range(streams)))
        tally.wall_s = time.perf_counter() - t0
    return tally


def resident_mib(root: psutil.Process) -> float:
    procs = [root, *root.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs if p.is_running()) / 2**20


def gateway_config(state: Path, upstream: str, port: int, processes: int) -> Path:
    data = {
        "clusters": {"remote": {"backend": "http", "endpoints": [{
            "name": "fake", "base_url": f"{upstream}/v1", "concurrency": 4096, "models": [{"id": "fake-model"}]}]}},
        "defaults": {"limits": {"max_connections": 4096, "max_connections_per_host": 4096}},
        "serve": {"listen": {"host": "127.0.0.1", "port": port}, "processes": processes, "state_dir": str(state),
                  "auth": {"client_id": CLIENT_ID}, "access_log": str(state / "access.log")},
    }
    path = state / "first.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def raise_fd_limit(needed: int) -> None:
    """Each stream holds a client socket here and two in the gateway; children inherit the raised limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(needed, soft)), hard))


async def run(streams: int, rounds: int, processes: int, work: Path) -> int:
    raise_fd_limit(streams * 4 + 512)
    with fake_globus_auth(CLIENT_ID) as auth, started(
            [sys.executable, str(Path(__file__).with_name("fake_upstream.py")), "--port", "0", "--models",
             "fake-model", "--chunks", str(CHUNKS), "--pace", str(PACE_S)], work / "upstream.log") as fake:
        upstream = wait_for("fake upstream", fake, work / "upstream.log", lambda: ready_line(work / "upstream.log"))
        port = free_port()
        env = {**os.environ, AUTH_URL_ENV: auth.url, "FIRST_GATEWAY_CLIENT_SECRET": "bench-secret"}
        config = gateway_config(work, upstream, port, processes)
        log = work / "serve.log"
        with started([sys.executable, "-m", "first_jupyter.cli", "serve", "--config", str(config)], log,
                     env=env) as serve:
            base = f"http://127.0.0.1:{port}"

            def healthy() -> str | None:
                import urllib.request

                try:
                    with urllib.request.urlopen(base + "/healthz", timeout=1) as answer:  # noqa: S310 (loopback)
                        return "ok" if answer.status == 200 else None
                except OSError:
                    return None

            wait_for("first serve", serve, log, healthy)
            tokens = [f"AT-user{n}" for n in range(USERS)]
            direct = await one_round(f"{upstream}/v1/chat/completions", streams, tokens)
            root = psutil.Process(serve.pid)
            warm = await one_round(f"{base}/first/v1/chat/completions", streams, tokens)  # tokens, pools: not counted
            results, memory = [], []
            for _ in range(rounds):
                results.append(await one_round(f"{base}/first/v1/chat/completions", streams, tokens))
                memory.append(resident_mib(root))
            access_lines = sum(b'"model":"fake-model"' in line for line in (work / "access.log").open("rb"))
    errors = [e for r in results for e in r.errors]
    growth = memory[-1] / memory[0] - 1
    print(f"first serve with {processes} worker processes, {streams} concurrent streams per round, {rounds} rounds, "
          f"{CHUNKS} events per stream paced {PACE_S} s")
    print(f"  warm-up round (introspections, connection pools; not counted): {warm.wall_s:.2f} s, "
          f"{warm.most_open} open at once, {len(warm.errors)} errors")
    print(f"  baseline (straight to the fake upstream): {direct.wall_s:.2f} s per round, "
          f"{direct.most_open} streams open at once, {len(direct.errors)} errors")
    for n, (r, mib) in enumerate(zip(results, memory, strict=True), 1):
        print(f"  round {n}: {r.wall_s:.2f} s ({r.wall_s / direct.wall_s:.2f}x baseline), {r.most_open} streams open "
              f"at once, {r.events} events, {len(r.errors)} errors, gateway resident {mib:.0f} MiB")
    print(f"  memory from round 1 to round {rounds}: {growth:+.1%}; access-log lines of streams {access_lines} "
          f"(expected {streams * (rounds + 1)}); introspections {auth.introspections} for {USERS} users")
    for error in errors[:5]:
        print(f"  error: {error}")
    passed = not errors and not direct.errors and abs(growth) <= FLAT_WITHIN and all(
        r.most_open == streams for r in results) and access_lines == streams * (rounds + 1) and not warm.errors
    print("PASS" if passed else "FAIL")
    return 0 if passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="first-shared-load-") as work:
        try:
            return asyncio.run(run(args.streams, args.rounds, args.processes, Path(work)))
        except BenchError as exc:
            print(f"FAIL: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
