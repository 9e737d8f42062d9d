"""What the gateway costs: the same load straight at a fake upstream and through a real Jupyter server.

Why this exists: the gateway is a proxy, and a proxy is judged by what it adds (latency per request, time to
first token) and what it burns (server CPU per request and per relayed chunk), not by absolute numbers that
mostly measure the machine. So one run starts the fast fake upstream and a real ``jupyter server`` with the
extension in front of it (reached at the URL kernels get, the gateway's own server; the zero-latency
non-stream scenarios also go through the same routes on Jupyter's own URL, for comparison), drives every path
with one aiohttp load generator in this process (a process apart from both servers, so its CPU is never billed
to them), alternates direct and gateway rounds so that drift (thermal, noisy neighbours, caches) falls on all
alike, and reads each server's CPU time with psutil.

Concurrency 32 runs twice for non-stream chat. A second fake upstream waits ``--service-ms`` (20 ms, a short
engine answer) before answering: the engine-like case, where requests spend most of their time waiting on the
upstream as they do in front of any real engine, so added p99 there is what the gateway adds to a real request;
that is the c=32 latency target. Against the zero-latency fake, a closed loop of 32 keeps all three processes
(load generator, gateway, fake) busy on the machine's cores, so each request's latency is 32 x the time one
takes on the busiest path: the added figure there is queueing behind CPU and says how many requests per second
each path sustains, which the req/s column shows directly. Its target is throughput: at saturation the gateway
must serve at least the 32 / service time requests per second that the engine-like loop asks, so that at
concurrency 32 it is never what requests wait for. Both rows are printed in full either way.

The field's transports get rows of their own: the same non-stream load at the highest concurrency to an https
upstream and through a forward proxy (tinyproxy, absolute-form requests), beside the plain http endpoint in the
same rounds: server CPU per request each, informational (the proxy's own CPU is its machine's, not the
gateway's, and TLS costs what the cipher costs).

Run ``python bench/overhead.py`` (about 75 s) or ``--quick`` (about 25 s); ``--json PATH`` also writes
the figures. The exit status is 0 when every target passes, 1 when one fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import psutil
import yaml

from bench.site_network import Tinyproxy, make_tls_certs

FAKE_UPSTREAM = Path(__file__).resolve().with_name("fake_upstream.py")
MODEL = "fake-model"
ENGINE_MODEL = "fake-engine"
"""Served by the second fake upstream only, so the gateway routes it to the engine-like endpoint."""
TLS_MODEL = "fake-tls"
"""MODEL as served by an https fake upstream (a test CA's certificate, trusted through the endpoint's tls)."""
PROXIED_MODEL = "fake-proxied"
"""MODEL on the fast fake upstream again, reached through a forward proxy (Debian's tinyproxy)."""
LEVELS = (1, 32)
STARTUP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 10.0
SETTLE_S = 0.3
"""Wait after each round before reading CPU: the usage writer commits batches 0.2 s after a request."""
IDLE_S = 1.0
DONE = b"data: [DONE]\n\n"
PROMPT = [{"role": "user", "content": "Say hello."}]


class BenchError(RuntimeError):
    """The bench could not measure (a server did not start, a request failed): a result would be a lie."""


@dataclass(frozen=True, slots=True)
class Settings:
    """One run's knobs, after ``--quick`` filled in what the user left out."""

    requests: int
    streams: int
    rounds: int
    chunks: int
    pace: float
    service: float
    """Seconds the engine-like upstream waits before answering."""

    @property
    def events_per_stream(self) -> int:
        """``data:`` events a client must see: one per token, the finish/usage event, then ``[DONE]``."""
        return self.chunks + 2

    @property
    def events_per_response(self) -> int:
        """The Responses API's events (the fake's, as OpenAI's): one delta per token, and 8 around them (created,
        in progress, item and part added, text done, part and item done, completed with the usage)."""
        return self.chunks + 8


@dataclass(frozen=True, slots=True)
class Side:
    """One way to the same model: straight to the upstream, or through the gateway."""

    name: str
    url: str
    headers: dict[str, str]
    session: aiohttp.ClientSession


@dataclass(frozen=True, slots=True)
class Upstream:
    """One fake upstream: its base URL, and the processes whose CPU a scenario against it bills.

    ``procs`` is always ``server`` and ``upstream``, the latter being this fake, so that the figures of either
    upstream's scenarios read the same keys.
    """

    url: str
    procs: dict[str, psutil.Process]


@dataclass(slots=True)
class Sample:
    """One request as the client saw it: seconds to the whole answer (or to the first token, for streams)."""

    seconds: float
    events: int = 0
    complete: bool = True


@dataclass(slots=True)
class Tally:
    """Everything one side did over all rounds of one scenario."""

    samples: list[Sample] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: dict[str, float] = field(default_factory=dict)


# -- processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    """A port the kernel just gave out, for the Jupyter server (which, unlike the fake, needs one up front)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def fake_command(model: str, settings: Settings, first_byte_delay: float) -> list[str]:
    """The fake upstream serving ``model``, with headers held back ``first_byte_delay`` seconds per response."""
    return [sys.executable, str(FAKE_UPSTREAM), "--port", "0", "--models", model, "--chunks", str(settings.chunks),
            "--pace", str(settings.pace), "--first-byte-delay", str(first_byte_delay)]


@contextlib.contextmanager
def started(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` for the duration of the block, then stop it by PID whatever happened.

    Own session: a Ctrl-C in the terminal reaches this driver only (Jupyter would otherwise ask on stdin
    whether to shut down), and the driver stops the child itself. Output goes to a file so a chatty child
    can never block on a full pipe.
    """
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for(what: str, proc: subprocess.Popen[bytes], log: Path, ready: Callable[[], str | None]) -> str:
    """Poll ``ready`` until it returns a value; fail with the child's log if it dies or takes too long."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while (value := ready()) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {proc.returncode}" if proc.returncode is not None else "did not become ready"
            raise BenchError(f"{what} {state} within {STARTUP_TIMEOUT_S:.0f} s; {log_tail(log)}")
        time.sleep(0.05)
    return value


def log_tail(log: Path) -> str:
    """The end of a child's log, for an error that must say why the child is not usable."""
    return f"its log ({log}) ends:\n{log.read_text(errors='replace')[-3000:]}"


def ready_line(log: Path) -> str | None:
    """The fake upstream's base URL once it printed ``READY http://...``."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("READY "):
            return line.split()[1]
    return None


def file_text(path: Path) -> str | None:
    """The file's content once it exists and is complete JSON (the server writes it in one go, but may not
    have finished when first seen)."""
    try:
        text = path.read_text()
        json.loads(text)
    except (OSError, ValueError):
        return None
    return text


def cpu_seconds(proc: psutil.Process) -> float:
    """User+system CPU of a process and of its children, live or reaped."""
    times = proc.cpu_times()
    total = times.user + times.system + times.children_user + times.children_system
    for child in proc.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            child_times = child.cpu_times()
            total += child_times.user + child_times.system
    return total


def cpu_all(procs: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU seconds of every measured process, read back to back so a window is the same for all."""
    return {name: cpu_seconds(proc) for name, proc in procs.items()}


# -- load ----------------------------------------------------------------------------------------------------


def client_session() -> aiohttp.ClientSession:
    """An unbounded keep-alive pool with DNS cached for good: no connect or lookup inside measured rounds."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=None))


async def one_plain(side: Side, body: bytes) -> Sample:
    """One non-streamed completion; the latency is to the last byte of the answer."""
    t0 = time.perf_counter()
    async with side.session.post(side.url, data=body, headers=side.headers) as resp:
        answer = await resp.read()
    seconds = time.perf_counter() - t0
    if resp.status != 200:
        raise BenchError(f"{side.name}: HTTP {resp.status}: {answer[:300]!r}")
    return Sample(seconds)


async def one_stream(side: Side, body: bytes, expected: int, done: bytes = DONE) -> Sample:
    """One streamed completion: time to the first ``data:`` event, and whether all events came and ``done`` ended
    it (a Responses stream has no ``[DONE]``: its last event is counted among the events, and ``done`` is empty).

    Events are counted with ``bytes.count`` over each read plus the previous read's last 4 bytes, so an event
    marker split between two reads is counted once, and the client spends next to no CPU per chunk.
    """
    t0 = time.perf_counter()
    ttft = 0.0
    events = 0
    carry = end = b""
    async with side.session.post(side.url, data=body, headers=side.headers) as resp:
        if resp.status != 200:
            raise BenchError(f"{side.name}: HTTP {resp.status}: {(await resp.read())[:300]!r}")
        async for chunk in resp.content.iter_any():
            window = carry + chunk
            found = window.count(b"data:")
            if found and not events:
                ttft = time.perf_counter() - t0
            events += found
            carry = window[-4:]
            end = (end + chunk)[-len(done):] if done else b""
    return Sample(ttft, events, events == expected and end == done)


async def run_load(one: Callable[[], Awaitable[Sample]], total: int, concurrency: int) -> list[Sample]:
    """``total`` requests, ``concurrency`` in flight at all times (closed loop), as fast as answered."""
    samples: list[Sample] = []
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            samples.append(await one())

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(min(concurrency, total)):
                group.create_task(worker())
    except ExceptionGroup as failed:  # one failed request voids the round; report the first cause plainly
        first = failed.exceptions[0]
        raise first if isinstance(first, BenchError) else BenchError(f"{type(first).__name__}: {first}") from first
    return samples


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection in this process while a round runs; one full collection after it.

    The load generator is a Python process too: aiohttp's objects make it run full collections of 15-20 ms
    under load, and each would stall every request in flight in whichever round it fell on, a tail that
    belongs to neither path. A round's garbage is a few megabytes at most.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect()


async def scenario(sides: list[Side], make: Callable[[Side], Callable[[], Awaitable[Sample]]], total: int,
                   concurrency: int, rounds: int, procs: dict[str, psutil.Process]) -> dict[str, Tally]:
    """Split ``total`` per side into rounds, alternating which side goes first, and add up each side.

    A round never has fewer requests than ``concurrency``, or the level would not be reached (so small
    counts at high concurrency run more than ``total``; the figures give the real counts).
    A round's CPU window runs ``SETTLE_S`` past its last answer so work a server finishes after answering
    (usage commits) is billed to the round that caused it rather than to the next one, possibly the other
    side's.
    """
    tallies = {side.name: Tally() for side in sides}
    per_round = max(concurrency, total // rounds)
    for index in range(rounds):
        for side in sides if index % 2 == 0 else sides[::-1]:
            tally = tallies[side.name]
            cpu0 = cpu_all(procs)
            with collector_paused():
                t0 = time.perf_counter()
                tally.samples += await run_load(make(side), per_round, concurrency)
                tally.wall_s += time.perf_counter() - t0
            await asyncio.sleep(SETTLE_S)
            for name, seconds in cpu_all(procs).items():
                tally.cpu_s[name] = tally.cpu_s.get(name, 0.0) + seconds - cpu0[name]
    return tallies


# -- figures -------------------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds (linear interpolation between closest ranks); NaN with no values."""
    if not values:
        return math.nan, math.nan
    if len(values) < 2:
        return values[0] * 1000, values[0] * 1000
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49] * 1000, cuts[98] * 1000


def plain_figures(tally: Tally) -> dict[str, float]:
    """Latency, throughput and CPU per request of one side; CPU per request is what sizes a server."""
    p50, p99 = percentiles([s.seconds for s in tally.samples])
    count = len(tally.samples)
    return {"requests": count, "p50_ms": p50, "p99_ms": p99, "req_per_s": count / tally.wall_s,
            "server_cpu_ms_per_req": tally.cpu_s["server"] * 1000 / count,
            "upstream_cpu_ms_per_req": tally.cpu_s["upstream"] * 1000 / count}


def stream_figures(tally: Tally) -> dict[str, float]:
    """TTFT, completeness and CPU per relayed event of one side; per event because long streams dominate."""
    p50, p99 = percentiles([s.seconds for s in tally.samples if s.events])
    events = sum(s.events for s in tally.samples)
    return {"streams": len(tally.samples), "complete": sum(s.complete for s in tally.samples), "events": events,
            "ttft_p50_ms": p50, "ttft_p99_ms": p99, "server_cpu_s": tally.cpu_s["server"],
            "server_cpu_us_per_event": tally.cpu_s["server"] * 1e6 / max(events, 1),
            "upstream_cpu_us_per_event": tally.cpu_s["upstream"] * 1e6 / max(events, 1)}


def plain_row(tallies: dict[str, Tally]) -> dict[str, Any]:
    """Every side's figures of one non-stream scenario, and what each way through the server added to the
    latency percentiles (``added`` for the gateway's own URL, ``added_jupyter`` for Jupyter's, when run)."""
    row: dict[str, Any] = {name: plain_figures(t) for name, t in tallies.items()}
    for side, key in (("gateway", "added"), ("jupyter", "added_jupyter")):
        if side in row:
            row[key] = {k: row[side][k] - row["direct"][k] for k in ("p50_ms", "p99_ms")}
    return row


def marginal_chunk_cpu_us(stream: dict[str, float], request_cpu_ms: float) -> float:
    """Server CPU per relayed event once each stream's per-request cost is taken out.

    The total per-chunk figure spreads every stream's request work (auth, routing, the upstream request, the
    usage record) over its events; subtracting what a whole non-stream request costs leaves what one more chunk
    costs, which is what grows with the length of an answer. It is an estimate: it assumes opening a stream
    costs what a non-stream request does.
    """
    return (stream["server_cpu_s"] * 1e3 - stream["streams"] * request_cpu_ms) * 1e3 / max(stream["events"], 1)


def targets(figures: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """The goals the gateway is held to.

    CPU goals are judged at the highest concurrency, where CPU per request decides how much a server can
    carry; at concurrency 1 every request or chunk also pays for waking an idle process (the fake upstream
    pays it too), which the table shows but which no change to the gateway can remove.

    Added p99 at the highest concurrency is judged against the engine-like upstream, where it is what the gateway
    adds to a request. Against the zero-latency one the gateway is saturated and added latency is queueing, that
    is throughput: there the gateway must sustain the rate the engine-like loop asks (see the module docstring).
    """
    plain, service, stream = figures["plain"], figures["plain_service"], figures["stream"]
    levels = [str(c) for c in LEVELS]
    low, top = str(min(LEVELS)), str(max(LEVELS))
    streams = sum(stream[c][side]["streams"] for c in levels for side in ("direct", "gateway"))
    complete = sum(stream[c][side]["complete"] for c in levels for side in ("direct", "gateway"))
    responses = figures["responses_stream"][top]
    missing = sum(responses[side]["streams"] - responses[side]["complete"] for side in ("direct", "gateway"))
    service_ms = f"{settings.service * 1000:g} ms"
    rows = [
        (f"added latency p50, c={low}", plain[low]["added"]["p50_ms"], "<=", 1.0, "ms"),
        (f"added latency p99, c={top}, {service_ms} upstream", service[top]["added"]["p99_ms"], "<=", 5.0, "ms"),
        (f"gateway req/s, c={top}, zero-latency (saturated)", plain[top]["gateway"]["req_per_s"], ">=",
         round(int(top) / settings.service), "req/s"),
        (f"server CPU per proxied request, c={top}", plain[top]["gateway"]["server_cpu_ms_per_req"], "<=", 0.5, "ms"),
        (f"server CPU per relayed chunk, c={top}", stream[top]["gateway"]["server_cpu_us_per_event"], "<=", 50.0,
         "us"),
        (f"streams with all {settings.events_per_stream} events", streams - complete, "<=", 0, "missing"),
        (f"server CPU per relayed Responses event, c={top}", responses["gateway"]["server_cpu_us_per_event"], "<=",
         50.0, "us"),
        (f"Responses streams with all {settings.events_per_response} events", missing, "<=", 0, "missing"),
    ]
    return [{"name": name, "value": value, "op": op, "limit": limit, "unit": unit,
             "pass": value <= limit if op == "<=" else value >= limit}
            for name, value, op, limit, unit in rows]


def render(figures: dict[str, Any], settings: Settings) -> str:
    """The plain-text report."""
    idle = figures["idle_cpu_ms_per_s"]
    top = str(max(LEVELS))
    service_ms = f"{settings.service * 1000:g} ms"
    plain_rows = [(level, figures["plain"][level]) for level in map(str, LEVELS)]
    plain_rows.append((f"{top} ({service_ms} upstream)", figures["plain_service"][top]))
    width = max(len(label) for label, _ in plain_rows)
    lines = [
        f"Gateway overhead: fake upstream direct vs through the gateway in a Jupyter server ({os.cpu_count()} "
        f"CPUs, {settings.rounds} alternating rounds per scenario)",
        f"idle CPU before load: server {idle['server']:.2f} ms/s, upstream {idle['upstream']:.2f} ms/s",
        "",
        "Non-stream chat completions (zero-latency upstream unless marked)",
        f"  {'conc':>{width}} {'side':<8} {'requests':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} "
        f"{'server CPU/req':>15} {'upstream CPU/req':>17}",
    ]
    for label, row in plain_rows:
        for side in ("direct", "gateway", "jupyter"):
            if side not in row:
                continue
            f = row[side]
            lines.append(f"  {label:>{width}} {side:<8} {f['requests']:>8} {f['p50_ms']:>8.3f} {f['p99_ms']:>8.3f} "
                         f"{f['req_per_s']:>8.0f} {f['server_cpu_ms_per_req']:>12.3f} ms "
                         f"{f['upstream_cpu_ms_per_req']:>14.3f} ms")
        for key, name in (("added", "added"), ("added_jupyter", "+jupyter")):
            if key in row:
                added = row[key]
                lines.append(f"  {label:>{width}} {name:<8} {'':>8} {added['p50_ms']:>+8.3f} "
                             f"{added['p99_ms']:>+8.3f}")
    lines += ["  gateway: the gateway's own URL, which kernels get as FIRST_GATEWAY_URL (all targets are judged on "
              "it);",
              "  jupyter: the same routes on the Jupyter server's URL, same scoped key (browsers and Jupyter tokens "
              "come this way)."]
    request_cpu_ms = figures["plain"][top]["gateway"]["server_cpu_ms_per_req"]
    offered = int(top) / settings.service  # the most a closed loop of ``top`` asks when each answer takes that long
    service_cpu_ms = figures["plain_service"][top]["gateway"]["server_cpu_ms_per_req"]
    lines += [
        f"  Zero-latency upstream, c={top}: the closed loop keeps load generator, gateway and fake busy on "
        f"{os.cpu_count()} CPUs, so added",
        f"    latency is queueing behind CPU (the gateway alone takes {top} x {request_cpu_ms:.3f} ms = "
        f"{int(top) * request_cpu_ms:.1f} ms per round of {top}): judged as req/s.",
        f"  {service_ms} upstream, c={top}: as long as a short engine answer, so added p99 is what the gateway adds "
        f"to real requests;",
        f"    the loop still asks up to {top} / {service_ms} = {offered:.0f} req/s, "
        f"{offered * service_cpu_ms / 1000:.0%} of one core at {service_cpu_ms:.3f} ms CPU/req.",
    ]
    http = figures["transports"]["http"]["server_cpu_ms_per_req"]
    lines += ["", f"Transports, non-stream, c={top}, same rounds (informational: server CPU per request)"]
    for name, label in (("http", "http upstream"), ("https", "https upstream (test CA)"),
                        ("proxy", "through tinyproxy (http)")):
        f = figures["transports"][name]
        # a tiny run's CPU times can read zero (the clock's tick is longer than the run's work): no ratio then
        ratio = f"{f['server_cpu_ms_per_req'] / http:>4.2f}x" if http > 0 else "  n/a"
        lines.append(f"  {label:<26} {f['server_cpu_ms_per_req']:>7.3f} ms ({ratio})"
                     f"  p50 {f['p50_ms']:>7.3f} ms  {f['req_per_s']:>6.0f} req/s")
    lines += [
        "",
        f"Streams of {settings.chunks} tokens {settings.pace * 1000:g} ms apart ({settings.events_per_stream} data "
        f"events each)",
        f"  {'conc':>4} {'side':<8} {'TTFT p50':>10} {'TTFT p99':>10} {'complete':>11} {'server CPU/chunk':>17} "
        f"{'upstream CPU/chunk':>19}",
    ]
    for level in map(str, LEVELS):
        row = figures["stream"][level]
        for side in ("direct", "gateway"):
            f = row[side]
            lines.append(f"  {level:>4} {side:<8} {f['ttft_p50_ms']:>7.3f} ms {f['ttft_p99_ms']:>7.3f} ms "
                         f"{f['complete']:>5}/{f['streams']:<5} {f['server_cpu_us_per_event']:>14.1f} us "
                         f"{f['upstream_cpu_us_per_event']:>16.1f} us")
        added = row["added"]
        lines.append(f"  {level:>4} {'added':<8} {added['ttft_p50_ms']:>+7.3f} ms {added['ttft_p99_ms']:>+7.3f} ms")
    stream_top = figures["stream"][top]["gateway"]
    lines += [
        f"  Marginal per-chunk cost (informational, no target): server CPU per chunk at c={top} excluding the "
        f"per-request cost",
        f"    = ({stream_top['server_cpu_s'] * 1000:.1f} ms stream-run server CPU - {stream_top['streams']} streams x "
        f"{request_cpu_ms:.3f} ms non-stream CPU/req) / {stream_top['events']} data events "
        f"= {stream_top['server_cpu_us_per_event_marginal']:.1f} us",
    ]
    responses = figures["responses_stream"][top]
    lines += [
        "",
        f"Responses API streams of {settings.chunks} tokens ({settings.events_per_response} events each, passed "
        f"through: the model needs no rename), c={top}",
    ]
    for side in ("direct", "gateway"):
        f = responses[side]
        lines.append(f"  {top:>4} {side:<8} {f['ttft_p50_ms']:>7.3f} ms {f['ttft_p99_ms']:>7.3f} ms "
                     f"{f['complete']:>5}/{f['streams']:<5} {f['server_cpu_us_per_event']:>14.1f} us "
                     f"{f['upstream_cpu_us_per_event']:>16.1f} us")
    lines.append(f"  server CPU per chunk, c={top}: chat {stream_top['server_cpu_us_per_event']:.1f} us, Responses "
                 f"{responses['gateway']['server_cpu_us_per_event']:.1f} us; marginal (as above): chat "
                 f"{stream_top['server_cpu_us_per_event_marginal']:.1f} us, Responses "
                 f"{responses['gateway']['server_cpu_us_per_event_marginal']:.1f} us")
    lines += ["", "Added = gateway percentile minus direct percentile. CPU = process user+system time over the "
                  "rounds (plus 0.3 s settle each) divided by requests or by data events received.", "",
              "Targets"]
    name_width = max(len(t["name"]) for t in figures["targets"])
    for t in figures["targets"]:
        value = f"{t['value']:.3f}" if isinstance(t["value"], float) else str(t["value"])
        lines.append(f"  {t['name']:<{name_width}} {value:>9} {t['unit']:<7} {t['op']} {t['limit']:<5} "
                     f"{'PASS' if t['pass'] else 'FAIL'}")
    return "\n".join(lines)


# -- the run -------------------------------------------------------------------------------------------------


def body_for(model: str, settings: Settings) -> bytes:
    return json.dumps({"model": model, "messages": PROMPT, "max_tokens": settings.chunks}).encode()


async def measure(fast: Upstream, engine: Upstream, gateway: dict[str, str], settings: Settings) -> dict[str, Any]:
    """Warm both paths to both upstreams up, then run every scenario on both paths and compute the figures."""
    plain_body = body_for(MODEL, settings)
    engine_body = json.dumps({"model": ENGINE_MODEL, "messages": PROMPT, "max_tokens": settings.chunks}).encode()
    stream_body = json.dumps({"model": MODEL, "messages": PROMPT, "max_tokens": settings.chunks,
                              "stream": True}).encode()
    responses_body = json.dumps({"model": MODEL, "input": PROMPT, "max_output_tokens": settings.chunks,
                                 "stream": True}).encode()
    json_type = {"Content-Type": "application/json"}
    async with client_session() as direct_session, client_session() as gateway_session:
        through_gateway = Side("gateway", f"{gateway['url']}/chat/completions",
                               {**json_type, "Authorization": f"Bearer {gateway['api_key']}"}, gateway_session)
        sides = [Side("direct", f"{fast.url}/v1/chat/completions", json_type, direct_session), through_gateway]
        through_jupyter = Side("jupyter", f"{gateway['jupyter_url']}/chat/completions", through_gateway.headers,
                               gateway_session)
        engine_sides = [Side("direct", f"{engine.url}/v1/chat/completions", json_type, direct_session),
                        through_gateway]

        def plain(side: Side) -> Callable[[], Awaitable[Sample]]:
            return lambda: one_plain(side, plain_body)

        def engine_plain(side: Side) -> Callable[[], Awaitable[Sample]]:
            return lambda: one_plain(side, engine_body)

        def stream(side: Side) -> Callable[[], Awaitable[Sample]]:
            return lambda: one_stream(side, stream_body, settings.events_per_stream)

        response_sides = [Side(side.name, side.url.replace("chat/completions", "responses"), side.headers,
                               side.session) for side in sides]

        def response_stream(side: Side) -> Callable[[], Awaitable[Sample]]:
            return lambda: one_stream(side, responses_body, settings.events_per_response, b"")

        top = max(LEVELS)
        for side in sides:  # open every pooled connection both ways, fill caches, take first-call costs
            await run_load(plain(side), 10 * top, top)
            await run_load(stream(side), top, top)
        for side in response_sides:
            await run_load(response_stream(side), top, top)
        await run_load(plain(through_jupyter), 10 * top, top)
        for side in engine_sides:  # the gateway's pool to the second upstream too
            await run_load(engine_plain(side), 10 * top, top)
        await asyncio.sleep(SETTLE_S)
        before = cpu_all(fast.procs)
        await asyncio.sleep(IDLE_S)
        idle = {name: (seconds - before[name]) * 1000 / IDLE_S for name, seconds in cpu_all(fast.procs).items()}

        figures: dict[str, Any] = {"settings": {"requests": settings.requests, "streams": settings.streams,
                                                "rounds": settings.rounds, "chunks": settings.chunks,
                                                "pace_s": settings.pace, "service_ms": settings.service * 1000,
                                                "cpus": os.cpu_count()},
                                   "idle_cpu_ms_per_s": idle, "plain": {}, "plain_service": {}, "stream": {},
                                   "responses_stream": {}}
        for level in LEVELS:
            tallies = await scenario([*sides, through_jupyter], plain, settings.requests, level, settings.rounds,
                                     fast.procs)
            figures["plain"][str(level)] = plain_row(tallies)
        tallies = await scenario(engine_sides, engine_plain, settings.requests, top, settings.rounds, engine.procs)
        figures["plain_service"][str(top)] = plain_row(tallies)
        figures["transports"] = await transports(through_gateway, fast, settings)
        for level in LEVELS:
            tallies = await scenario(sides, stream, settings.streams, level, settings.rounds, fast.procs)
            row = {name: stream_figures(t) for name, t in tallies.items()}
            row["added"] = {k: row["gateway"][k] - row["direct"][k] for k in ("ttft_p50_ms", "ttft_p99_ms")}
            figures["stream"][str(level)] = row
        tallies = await scenario(response_sides, response_stream, settings.streams, top, settings.rounds, fast.procs)
        figures["responses_stream"][str(top)] = {name: stream_figures(t) for name, t in tallies.items()}
    request_cpu_ms = figures["plain"][str(top)]["gateway"]["server_cpu_ms_per_req"]
    for kind in ("stream", "responses_stream"):
        gateway_side = figures[kind][str(top)]["gateway"]
        gateway_side["server_cpu_us_per_event_marginal"] = marginal_chunk_cpu_us(gateway_side, request_cpu_ms)
    figures["targets"] = targets(figures, settings)
    return figures


async def transports(gateway: Side, fast: Upstream, settings: Settings) -> dict[str, dict[str, float]]:
    """Server CPU per non-stream request at the highest concurrency over each transport, in the same rounds."""
    bodies = {"http": body_for(MODEL, settings), "https": body_for(TLS_MODEL, settings),
              "proxy": body_for(PROXIED_MODEL, settings)}
    sides = [Side(name, gateway.url, gateway.headers, gateway.session) for name in bodies]
    top = max(LEVELS)

    def plain(side: Side) -> Callable[[], Awaitable[Sample]]:
        return lambda: one_plain(side, bodies[side.name])

    for side in sides[1:]:  # open the pooled connections (and the proxy's) first
        await run_load(plain(side), 10 * top, top)
    tallies = await scenario(sides, plain, settings.requests, top, settings.rounds, fast.procs)
    return {name: {key: value for key, value in plain_figures(tally).items() if not key.startswith("upstream")}
            for name, tally in tallies.items()}


def run(settings: Settings) -> dict[str, Any]:
    """Start both fake upstreams and the Jupyter server in a private temp dir, measure, and stop them."""
    with tempfile.TemporaryDirectory(prefix="first-overhead-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        fast_log, engine_log = tmp / "fake-upstream.log", tmp / "fake-engine.log"
        # Both start before either is waited for; each is in the stack, so stopped by PID however the run ends.
        fast = stack.enter_context(started(fake_command(MODEL, settings, 0.0), fast_log))
        engine = stack.enter_context(started(fake_command(ENGINE_MODEL, settings, settings.service), engine_log))
        certs = make_tls_certs(tmp / "tls")
        tls_log = tmp / "fake-tls.log"
        tls = stack.enter_context(started([*fake_command(MODEL, settings, 0.0), "--certfile", str(certs.server_pem)],
                                          tls_log))
        proxy = stack.enter_context(Tinyproxy(tmp / "proxy"))
        fast_url = wait_for("the fake upstream", fast, fast_log, lambda: ready_line(fast_log))
        engine_url = wait_for("the engine-like fake upstream", engine, engine_log, lambda: ready_line(engine_log))
        tls_url = wait_for("the https fake upstream", tls, tls_log, lambda: ready_line(tls_log))

        config = tmp / "first.yaml"
        config.write_text(yaml.safe_dump({"clusters": {"bench": {"backend": "http", "endpoints": [
            {"name": "fake", "base_url": f"{fast_url}/v1",
             "models": [{"id": MODEL, "capabilities": ["chat", "completions", "responses"]}]},
            {"name": "engine", "base_url": f"{engine_url}/v1", "models": [{"id": ENGINE_MODEL}]},
            {"name": "tls", "base_url": f"{tls_url}/v1", "tls": {"ca_bundle": str(certs.ca)},
             "models": [{"id": TLS_MODEL, "upstream_name": MODEL}]},
            {"name": "proxied", "base_url": f"{fast_url}/v1", "proxy": proxy.url,
             "models": [{"id": PROXIED_MODEL, "upstream_name": MODEL}]}]}}}))
        # Private Jupyter dirs: the user's own config and running servers neither leak in nor see this one.
        env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp / "config"),
               "JUPYTER_DATA_DIR": str(tmp / "jupyter-data")}
        server_log = tmp / "jupyter-server.log"
        # ``python -m jupyter_server`` is ``jupyter server`` without the launcher, so the PID is the server's.
        server = stack.enter_context(started(
            [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", f"--port={free_port()}",
             f"--IdentityProvider.token={secrets.token_urlsafe(24)}", f"--FirstExtension.config_file={config}",
             f"--FirstExtension.data_dir={tmp / 'data'}"], server_log, env))
        runtime_file = tmp / "runtime" / f"first-gateway-{server.pid}.json"
        gateway = json.loads(wait_for("the Jupyter server", server, server_log, lambda: file_text(runtime_file)))
        server_proc = psutil.Process(server.pid)
        upstreams = [Upstream(url, {"server": server_proc, "upstream": psutil.Process(proc.pid)})
                     for url, proc in ((fast_url, fast), (engine_url, engine))]
        return asyncio.run(wait_and_measure(*upstreams, gateway, settings, server, server_log))


async def wait_and_measure(fast: Upstream, engine: Upstream, gateway: dict[str, str], settings: Settings,
                           server: subprocess.Popen[bytes], server_log: Path) -> dict[str, Any]:
    """Wait until the gateway answers ``GET /models`` with the scoped key, then measure."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    headers = {"Authorization": f"Bearer {gateway['api_key']}"}
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{gateway['url']}/models", headers=headers) as resp:
                    if resp.status == 200:
                        break
            if server.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"GET {gateway['url']}/models never answered 200; {log_tail(server_log)}")
            await asyncio.sleep(0.1)
    return await measure(fast, engine, gateway, settings)


def parse_args(argv: list[str] | None) -> tuple[Settings, Path | None]:
    """Flags with ``--quick`` defaults applied only to counts the user did not give."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, help="non-stream requests per side per concurrency level "
                                                     "(default 3000, quick 600)")
    parser.add_argument("--streams", type=int, help="streams per side per concurrency level (default 128, quick 32)")
    parser.add_argument("--rounds", type=int, help="alternating direct/gateway rounds per scenario "
                                                   "(default 4, quick 2)")
    parser.add_argument("--chunks", type=int, default=64, help="tokens per completion, one event each (64)")
    parser.add_argument("--pace", type=float, default=0.002, help="seconds between streamed events (0.002)")
    parser.add_argument("--service-ms", type=float, default=20.0,
                        help="milliseconds the engine-like upstream waits before answering (20)")
    parser.add_argument("--quick", action="store_true", help="smaller counts: a smoke run of about 25 s")
    parser.add_argument("--json", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)

    def count(given: int | None, quick: int, full: int) -> int:
        return given if given is not None else quick if args.quick else full

    settings = Settings(requests=count(args.requests, 600, 3000), streams=count(args.streams, 32, 128),
                        rounds=count(args.rounds, 2, 4), chunks=args.chunks, pace=args.pace,
                        service=args.service_ms / 1000)
    if min(settings.requests, settings.streams, settings.rounds) < 1 or settings.chunks < 1 or settings.pace < 0:
        parser.error("counts must be positive and --pace must not be negative")
    if settings.service <= 0:
        parser.error("--service-ms must be positive: the engine-like scenario is the zero-latency one otherwise")
    return settings, args.json


def exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """Unwind on SIGTERM as on Ctrl-C, so the ``with`` blocks stop every child by PID.

    Python's default is to die on the spot, and the children, each in a session of its own, would outlive the
    bench; ``timeout`` and cancelled CI jobs send SIGTERM.
    """
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run, print, optionally write JSON; the exit status says whether every target passed (2: no result)."""
    settings, json_path = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        figures = run(settings)
    except BenchError as exc:
        print(f"overhead bench failed: {exc}", file=sys.stderr)
        return 2
    print(render(figures, settings))
    if json_path is not None:
        json_path.write_text(json.dumps(figures, indent=2))
    return 0 if all(t["pass"] for t in figures["targets"]) else 1


if __name__ == "__main__":
    sys.exit(main())
