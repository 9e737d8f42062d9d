"""Interactive traffic while a batch runs: whom the gateway makes wait, through the real Gateway, on virtual time.

Scientists share hot nodes between ``%%first chat`` and batches of thousands of prompts. This bench drives the real
``Gateway`` (``service.build_gateway``: its router, admission, http backends and the Batch API's runner) against
capacity-limited fake engines (``bench/fake_engine.py``: ``slots`` sequences at once, a prefill per uncached
prompt token, a decode time per token, a prefix cache), and prints, from one run:

1. interactive TTFT p50/p95 with no batch (streamed chats arriving at ``rate`` per second, Poisson);
2. the same with a ``batch_lines``-line batch running on the same model; goal: p95 within 1.25x of (1);
3. the batch's throughput alone, and alongside the interactive load; goal: >= 80% of alone;
4. one user's burst of ``burst`` requests against another user's single requests; goal: the single request's TTFT
   within 1.5x of its unloaded figure;
5. the engines' prefix-cache hit rate in each phase, as the engines count it (whatever routed the requests), and
   the same with prefix affinity off (``PREFIX_AFFINITY_OFF``), in a second, shorter run of phases 2-3.

Virtual time: the engines' sleeps, the arrivals and the gateway's admission all run on the event loop's clock,
and the loop (``VirtualTimeLoop``) jumps to its next timer whenever nothing is ready, so the figures are the
scheduling's alone: the gateway's own CPU costs nothing here (``bench/overhead.py`` measures that), and a run on 2
busy cores gives the same figures as on an idle machine. A thread's work (SQLite, file reads) freezes the clock
until it is done.

Run ``python bench/mixed_load.py`` (seconds of CPU: 20,000 lines through the gateway), ``--quick`` for a small
run (engines of 8 slots, where a few chats are a large share: not sized to meet the goals); ``--json PATH`` also
writes the figures. The exit status is 0 when every goal holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import selectors
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import orjson

from bench.fake_engine import EngineSettings, FakeEngine
from first_jupyter.config import parse_config
from first_jupyter.gateway.admission import HEADROOM_WINDOW_S
from first_jupyter.gateway.caller import acting_as
from first_jupyter.gateway.core import Gateway
from first_jupyter.gateway.usage import UsageRecord
from first_jupyter.protocol import Capability, ParsedRequest, parse_request
from first_jupyter.service import build_gateway

MODEL = "mixed-model"
P95_RATIO = 1.25
THROUGHPUT_SHARE = 0.8
FAIRNESS_RATIO = 1.5
POLL_S = 0.5
WARMUP_S = 5.0
"""Virtual seconds a batch runs before its throughput is counted: its window fills."""
SYSTEM_WORDS = 300
CHAT_WORDS = 150
LINE_WORDS = 40
CHAT_TOKENS = 64
LINE_TOKENS = 32

PREFIX_AFFINITY_OFF: dict[str, Any] = {"prefix_routing": {"enabled": False}}
"""The ``defaults`` that turn every prefix affinity of the router off, for the comparison run: the settings of
cache-aware routing go here too (they are the router's, and this bench only counts what the engines see)."""

_T = TypeVar("_T")


class BenchError(RuntimeError):
    """The bench could not measure what it says: a figure would be a lie."""


@dataclass(frozen=True, slots=True)
class Settings:
    engines: int = 2
    slots: int = 32
    batch_lines: int = 20_000
    rate: float = 2.0
    baseline_s: float = 120.0
    batch_alone_s: float = 40.0
    mixed_s: float = 90.0
    burst: int = 500
    singles: int = 5
    chat_prefixes: int = 4
    batch_prefixes: int = 8
    cache_prefixes: int = 16
    ttft_target: float = 2.0
    compare_lines: int = 4_000
    seed: int = 7


QUICK = Settings(slots=8, batch_lines=4_000, baseline_s=20.0, batch_alone_s=15.0, mixed_s=30.0, burst=60, singles=3,
                 compare_lines=600)


# -- virtual time -----------------------------------------------------------------------------------------------


class _VirtualSelector(selectors.DefaultSelector):
    """Polls without waiting; when nothing is ready, the loop's clock jumps to its next timer instead."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None or self._loop.threads:  # only I/O (or a thread's answer) can wake it: wait for it
            return super().select(None)
        self._loop.now += timeout
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock stands still while anything is ready, and jumps to the next timer otherwise."""

    def __init__(self) -> None:
        self.now = 0.0
        self.threads = 0
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self.now

    def run_in_executor(self, executor: Executor | None, func: Callable[..., _T], *args: Any,
                        ) -> asyncio.Future[_T]:
        future = super().run_in_executor(executor, func, *args)
        self.threads += 1
        future.add_done_callback(self._thread_done)
        return future

    def _thread_done(self, _future: asyncio.Future[Any]) -> None:
        self.threads -= 1


# -- the load ---------------------------------------------------------------------------------------------------


class BenchUser:
    """A caller of the gateway (``gateway.caller.Caller``): only its name matters here."""

    def __init__(self, user: str) -> None:
        self.user = user

    async def admit(self, req: ParsedRequest) -> None:
        return None

    async def wait_s(self, model: str) -> float:
        return 0.0

    def may_use(self, model: str, cluster: str) -> bool:
        return True

    def recorded(self, record: UsageRecord) -> None:
        return None

    def recorded_all(self, records: Sequence[UsageRecord]) -> None:
        return None

    def token_for(self, resource_server: str) -> str | None:
        return None


def _text(tag: str, words: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(words))


def chat_body(prefix: int, seq: int) -> bytes:
    return orjson.dumps({"model": MODEL, "stream": True, "max_tokens": CHAT_TOKENS, "messages": [
        {"role": "system", "content": _text(f"chat{prefix}-", SYSTEM_WORDS)},
        {"role": "user", "content": _text(f"q{seq}-", CHAT_WORDS)}]})


def write_batch(path: Path, lines: int, prefixes: int) -> int:
    """A batch input of ``lines`` chat requests, each of one of ``prefixes`` system prompts; its size in bytes."""
    with path.open("wb") as f:
        for i in range(lines):
            f.write(orjson.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": MODEL, "max_tokens": LINE_TOKENS, "messages": [
                                      {"role": "system", "content": _text(f"task{i % prefixes}-", SYSTEM_WORDS)},
                                      {"role": "user", "content": _text(f"item{i}-", LINE_WORDS)}]}}) + b"\n")
    return path.stat().st_size


class Bench:
    """One gateway in front of ``settings.engines`` fake engines, and the load driven through it."""

    def __init__(self, settings: Settings, data_dir: Path, defaults: dict[str, Any]) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.defaults = defaults
        self.loop = asyncio.get_running_loop()
        self.rng = random.Random(settings.seed)
        self.engines = [FakeEngine(MODEL, EngineSettings(slots=settings.slots, cache_prefixes=settings.cache_prefixes))
                        for _ in range(settings.engines)]
        self.gateway: Gateway | None = None
        self._seq = 0

    async def __aenter__(self) -> Bench:
        ports = [await engine.start() for engine in self.engines]
        config = {"clusters": {f"site{i}": {"backend": "http", "endpoints": [{
            "name": "engine", "base_url": f"http://127.0.0.1:{port}/v1", "concurrency": self.settings.slots,
            "models": [{"id": MODEL}]}]} for i, port in enumerate(ports)},
            "defaults": {"batch": {"interactive_ttft_target": self.settings.ttft_target}, **self.defaults},
            "auth": {"sources": ["env"]}}
        self.gateway = build_gateway(parse_config(config, "mixed_load"), self.data_dir, environ={})
        self.gateway.admission.clock = self.loop.time
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self.gateway is not None:
            await self.gateway.close()
        for engine in self.engines:
            await engine.stop()

    @property
    def gw(self) -> Gateway:
        assert self.gateway is not None
        return self.gateway

    def cache(self) -> tuple[int, int]:
        return sum(e.cache.lookups for e in self.engines), sum(e.cache.hits for e in self.engines)

    async def chat(self, user: str, prefix: int) -> float:
        """One streamed chat of ``user``: its time to first token."""
        self._seq += 1
        req = parse_request(Capability.chat, chat_body(prefix, self._seq))
        t0 = self.loop.time()
        first: list[float] = []

        def write(data: bytes) -> bool:
            if not first:
                first.append(self.loop.time())
            return True

        with acting_as(BenchUser(user)):
            stream = await self.gw.stream(req)
        try:
            await stream.relay(write)
        finally:
            stream.close()
        if stream.error is not None:
            raise RuntimeError(f"an interactive request failed: {stream.error.message}")
        return first[0] - t0

    async def interactive(self, seconds: float) -> list[float]:
        """Chats arriving at ``rate`` per second (Poisson) for ``seconds``, from a few users; their TTFTs."""
        tasks = []
        end = self.loop.time() + seconds
        while (wait := self.rng.expovariate(self.settings.rate)) < end - self.loop.time():
            await asyncio.sleep(wait)
            user = self.rng.randrange(self.settings.chat_prefixes)
            tasks.append(asyncio.create_task(self.chat(f"user{user}", user)))
        return list(await asyncio.gather(*tasks))

    async def singles(self) -> list[float]:
        """``singles`` chats of one user, one at a time, a second apart."""
        ttfts = []
        for _ in range(self.settings.singles):
            ttfts.append(await self.chat("single", 0))
            await asyncio.sleep(1.0)
        return ttfts

    async def start_batch(self, lines: int) -> str:
        store = self.gw.batches.store
        file_id = "file-mixed-load"
        size = write_batch(store.path(file_id), lines, self.settings.batch_prefixes)
        store.add_file("batch", "mixed_load.jsonl", size, lines, file_id)
        created = await self.gw.batches.create(orjson.dumps({"input_file_id": file_id, "completion_window": "24h",
                                                             "endpoint": "/v1/chat/completions"}))
        await self.until(lambda: self.gw.batches.batch(created.id).status != "validating")
        return created.id

    def completed(self, batch_id: str) -> int:
        return self.gw.batches.batch(batch_id).request_counts.completed

    async def until(self, done: Callable[[], bool]) -> None:
        """Poll (the batch's run has no event to wait on here, only its stored state)."""
        while not done():  # noqa: ASYNC110
            await asyncio.sleep(POLL_S)

    async def throughput(self, batch_id: str, during: Awaitable[_T]) -> tuple[float, _T, float]:
        """The batch's lines per second while ``during`` runs, what it gave, and the share of polls that found
        the batch paused for interactive traffic."""
        start, done0 = self.loop.time(), self.completed(batch_id)
        work = asyncio.ensure_future(during)
        paused = polls = 0
        while not work.done():
            await asyncio.wait((work,), timeout=POLL_S)
            polls += 1
            paused += bool(self.gw.batches.batch(batch_id).paused_for_interactive)
        if self.gw.batches.batch(batch_id).status != "in_progress":
            raise BenchError(f"the batch ended before {self.loop.time() - start:.0f} s of measuring: give it more "
                             "lines (--lines) or the phases less time")
        return (self.completed(batch_id) - done0) / (self.loop.time() - start), work.result(), paused / max(polls, 1)

    async def stop_batch(self, batch_id: str) -> None:
        if self.gw.batches.batch(batch_id).status == "in_progress":
            self.gw.batches.cancel(batch_id)
        await self.until(lambda: self.gw.batches.batch(batch_id).status in ("cancelled", "completed"))


def _p(values: Sequence[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _ttfts(values: Sequence[float]) -> dict[str, float]:
    return {"n": len(values), "p50_ms": round(_p(values, 50) * 1000, 1), "p95_ms": round(_p(values, 95) * 1000, 1)}


def _rate(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    lookups, hits = after[0] - before[0], after[1] - before[1]
    return round(hits / lookups, 3) if lookups else None


async def measure(settings: Settings, data_dir: Path) -> dict[str, Any]:
    """Every phase of the main run, in order on one gateway."""
    figures: dict[str, Any] = {}
    async with Bench(settings, data_dir, {}) as bench:
        await bench.interactive(WARMUP_S)  # the engines' caches hold the chats' prefixes, as on a day's work
        cache = bench.cache()
        figures["no_batch"] = _ttfts(await bench.interactive(settings.baseline_s))
        figures["no_batch"]["prefix_hit_rate"] = _rate(cache, cache := bench.cache())
        figures["single_unloaded"] = _ttfts(await bench.singles())
        batch_id = await bench.start_batch(settings.batch_lines)
        await asyncio.sleep(HEADROOM_WINDOW_S + WARMUP_S)  # alone: the chats' headroom aged out, its window full
        cache = bench.cache()
        alone, _, _ = await bench.throughput(batch_id, asyncio.sleep(settings.batch_alone_s))
        figures["batch_alone"] = {"lines_per_s": round(alone, 2),
                                  "prefix_hit_rate": _rate(cache, cache := bench.cache())}
        mixed, ttfts, paused = await bench.throughput(batch_id, bench.interactive(settings.mixed_s))
        figures["with_batch"] = {**_ttfts(ttfts), "batch_lines_per_s": round(mixed, 2), "batch_paused_share":
                                 round(paused, 3), "prefix_hit_rate": _rate(cache, cache := bench.cache())}
        figures["batch_admission"] = [s.model_dump() for _c, _e, s in bench.gw.admission.report(
            bench.gw.catalog.backends)]
        await bench.stop_batch(batch_id)
        burst = [asyncio.create_task(bench.chat("burst", 1)) for _ in range(settings.burst)]
        await asyncio.sleep(1.0)
        figures["single_during_burst"] = _ttfts(await bench.singles())
        await asyncio.gather(*burst)
    return figures


async def compare_affinity(settings: Settings, data_dir: Path) -> dict[str, Any]:
    """The engines' prefix hit rate over a batch with interactive load, with the router's defaults and with
    ``PREFIX_AFFINITY_OFF``: the same load, the same seed, a gateway each."""
    rates = {}
    for name, defaults in (("default", {}), ("affinity_off", PREFIX_AFFINITY_OFF)):
        short = replace(settings, batch_lines=settings.compare_lines)
        async with Bench(short, data_dir / name, defaults) as bench:
            batch_id = await bench.start_batch(short.batch_lines)
            cache = bench.cache()
            await bench.throughput(batch_id, bench.interactive(short.mixed_s / 2))
            rates[name] = _rate(cache, bench.cache())
            await bench.stop_batch(batch_id)
    return rates


def goals(figures: dict[str, Any]) -> list[dict[str, Any]]:
    base, mixed = figures["no_batch"], figures["with_batch"]
    alone = figures["batch_alone"]["lines_per_s"]
    single, burst = figures["single_unloaded"], figures["single_during_burst"]
    return [
        {"name": f"interactive p95 with the batch <= {P95_RATIO}x without", "ratio": mixed["p95_ms"] / base["p95_ms"],
         "limit": P95_RATIO, "pass": mixed["p95_ms"] <= P95_RATIO * base["p95_ms"]},
        {"name": f"batch throughput beside interactive >= {THROUGHPUT_SHARE:.0%} of alone",
         "ratio": mixed["batch_lines_per_s"] / alone, "limit": THROUGHPUT_SHARE,
         "pass": mixed["batch_lines_per_s"] >= THROUGHPUT_SHARE * alone},
        {"name": f"a single request beside another user's burst: TTFT p95 <= {FAIRNESS_RATIO}x unloaded p50",
         "ratio": burst["p95_ms"] / single["p50_ms"], "limit": FAIRNESS_RATIO,
         "pass": burst["p95_ms"] <= FAIRNESS_RATIO * single["p50_ms"]},
    ]


def report(settings: Settings, figures: dict[str, Any]) -> str:
    s, base, mixed = settings, figures["no_batch"], figures["with_batch"]
    rows = [
        f"mixed load: {s.engines} engines x {s.slots} slots, {s.rate:g} chats/s, a {s.batch_lines:,}-line batch, "
        f"TTFT target {s.ttft_target:g} s (virtual time, seed {s.seed})",
        f"  interactive TTFT, no batch      p50 {base['p50_ms']:8.1f} ms  p95 {base['p95_ms']:8.1f} ms  "
        f"(n={base['n']})  prefix hit rate {base['prefix_hit_rate']}",
        f"  interactive TTFT, with batch    p50 {mixed['p50_ms']:8.1f} ms  p95 {mixed['p95_ms']:8.1f} ms  "
        f"(n={mixed['n']})  prefix hit rate {mixed['prefix_hit_rate']}",
        f"  batch throughput, alone         {figures['batch_alone']['lines_per_s']:8.2f} lines/s  "
        f"prefix hit rate {figures['batch_alone']['prefix_hit_rate']}",
        f"  batch throughput, beside chats  {mixed['batch_lines_per_s']:8.2f} lines/s  "
        f"(shown paused for interactive traffic {mixed['batch_paused_share']:.0%} of the time)",
        f"  single user, unloaded           p50 {figures['single_unloaded']['p50_ms']:8.1f} ms",
        f"  single user, beside a burst of {s.burst}  p50 {figures['single_during_burst']['p50_ms']:8.1f} ms  "
        f"p95 {figures['single_during_burst']['p95_ms']:8.1f} ms",
        f"  engines' prefix hit rate, batch + chats: router defaults {figures['affinity']['default']}, "
        f"prefix affinity off {figures['affinity']['affinity_off']}",
        "  admission at the end of the mixed phase: " + "; ".join(
            f"{a['in_flight_batch']} batch + {a['in_flight_interactive']} interactive of {a['capacity']}, "
            f"batch concurrency {a['batch_concurrency']}" for a in figures["batch_admission"]),
    ]
    rows += [f"  {'PASS' if g['pass'] else 'FAIL'}  {g['name']}: {g['ratio']:.2f}" for g in goals(figures)]
    return "\n".join(rows)


async def run(settings: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="first-mixed-") as tmp:
        figures = await measure(settings, Path(tmp) / "main")
        figures["affinity"] = await compare_affinity(settings, Path(tmp))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a small run (seconds)")
    parser.add_argument("--lines", type=int, help="batch lines (default 20,000)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--batch-prefixes", type=int, help="system prompts among the batch's lines (default 8)")
    parser.add_argument("--cache-prefixes", type=int, help="prefixes each engine's cache holds (default 16): "
                                                           "fewer than the prefixes in use makes routing matter")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else Settings()
    if args.lines:
        settings = replace(settings, batch_lines=args.lines)
    for name in ("seed", "batch_prefixes", "cache_prefixes"):
        if getattr(args, name) is not None:
            settings = replace(settings, **{name: getattr(args, name)})
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        figures = runner.run(run(settings))
    print(report(settings, figures))
    verdicts = goals(figures)
    if args.json:
        args.json.write_text(json.dumps({"settings": asdict(settings), "figures": figures, "goals": verdicts},
                                        indent=2))
    return 0 if all(g["pass"] for g in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
