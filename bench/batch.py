"""Batch throughput and memory: a batch through the gateway against the same requests sent straight to the engine.

What it shows, on the benchmark's fake upstream (an engine that answers at once, so the cost measured is all
ours): the requests/s of a 100,000-line batch (from ``batches.create`` to ``completed``: validation, the run and
the finalizing included) against the requests/s of a client sending the same request bodies straight to the
upstream with the batch's concurrency (aiohttp, a closed loop: what a user's own script would do); and the
Jupyter server's peak RSS (``VmHWM``) over a 10,000-line and a 100,000-line batch, each in a fresh server: the
runner reads its input as a stream, so the difference must stay small.

Targets: batch requests/s >= 90% of direct; peak RSS difference < 50 MB. Run ``python bench/batch.py``
(a few minutes on 2 cores) or ``--quick`` (20,000 and 2,000 lines); ``--json PATH`` also writes the figures. The
exit status is 0 when both targets hold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import yaml

from bench.overhead import (
    FAKE_UPSTREAM,
    MODEL,
    BenchError,
    Side,
    client_session,
    file_text,
    free_port,
    log_tail,
    one_plain,
    ready_line,
    run_load,
    started,
    wait_for,
)

MIN_RATIO = 0.9
MAX_RSS_GROWTH_MB = 50.0
POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class Settings:
    lines: int
    small: int
    concurrency: int


def write_input(path: Path, lines: int) -> Path:
    """A batch input of ``lines`` chat requests, each its own prompt."""
    with path.open("wb") as f:
        for i in range(lines):
            f.write(json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
                "model": MODEL, "max_tokens": 16,
                "messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}]}}).encode() + b"\n")
    return path


def bodies(path: Path) -> list[bytes]:
    with path.open("rb") as f:
        return [json.dumps(json.loads(line)["body"]).encode() for line in f]


async def direct(url: str, path: Path, concurrency: int) -> float:
    """Requests/s of the input's bodies sent straight to the upstream, ``concurrency`` at a time."""
    requests = bodies(path)
    sent = iter(requests)
    async with client_session() as session:
        side = Side("direct", f"{url}/v1/chat/completions", {"Content-Type": "application/json"}, session)
        total = len(requests)
        began = time.perf_counter()
        await run_load(lambda: one_plain(side, next(sent)), total, concurrency)
        return total / (time.perf_counter() - began)


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set (``VmHWM``), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchError("no VmHWM in /proc: peak RSS needs Linux")


def through_gateway(upstream_url: str, path: Path, lines: int, settings: Settings, tmp: Path) -> dict[str, float]:
    """A fresh Jupyter server runs the batch; its requests/s and peak RSS."""
    config = tmp / f"first-{lines}.yaml"
    config.write_text(yaml.safe_dump({
        "clusters": {"bench": {"backend": "http", "endpoints": [{
            "name": "fake", "base_url": f"{upstream_url}/v1", "concurrency": settings.concurrency,
            "models": [{"id": MODEL}]}]}},
        "defaults": {"batch": {"max_file_lines": lines, "max_in_flight": settings.concurrency}}}))
    run_dir = tmp / f"run-{lines}"
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(run_dir / "runtime"), "JUPYTER_CONFIG_DIR": str(run_dir / "config"),
           "JUPYTER_DATA_DIR": str(run_dir / "jupyter-data")}
    log = run_dir.with_suffix(".log")
    run_dir.mkdir()
    with started([sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", f"--port={free_port()}",
                  f"--IdentityProvider.token={secrets.token_urlsafe(24)}", f"--FirstExtension.config_file={config}",
                  f"--FirstExtension.data_dir={run_dir / 'data'}"], log, env) as server:
        runtime = run_dir / "runtime" / f"first-gateway-{server.pid}.json"
        gateway = json.loads(wait_for("the Jupyter server", server, log, lambda: file_text(runtime)))
        client = openai.OpenAI(base_url=gateway["url"], api_key=gateway["api_key"], max_retries=3, timeout=600)
        with path.open("rb") as f:
            uploaded = client.files.create(file=f, purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        began = time.perf_counter()
        while (done := client.batches.retrieve(batch.id)).status not in ("completed", "failed", "expired",
                                                                          "cancelled"):
            if server.poll() is not None:
                raise BenchError(f"the Jupyter server exited during the batch; {log_tail(log)}")
            time.sleep(POLL_S)
        seconds = time.perf_counter() - began
        if done.status != "completed" or done.request_counts.completed != lines:
            raise BenchError(f"the batch ended {done.status} with {done.request_counts}: {done.errors}")
        return {"lines": lines, "seconds": seconds, "requests_per_s": lines / seconds,
                "peak_rss_mb": peak_rss_mb(server.pid)}


def run(settings: Settings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="first-batch-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        log = tmp / "fake-upstream.log"
        fake = stack.enter_context(started([sys.executable, str(FAKE_UPSTREAM), "--port", "0", "--models", MODEL,
                                            "--chunks", "16"], log))
        url = wait_for("the fake upstream", fake, log, lambda: ready_line(log))
        big = write_input(tmp / "big.jsonl", settings.lines)
        small = write_input(tmp / "small.jsonl", settings.small)
        direct_rps = asyncio.run(direct(url, big, settings.concurrency))
        large = through_gateway(url, big, settings.lines, settings, tmp)
        little = through_gateway(url, small, settings.small, settings, tmp)
        return {"lines": settings.lines, "small": settings.small, "concurrency": settings.concurrency,
                "direct_requests_per_s": direct_rps, "batch": large, "small_batch": little,
                "ratio": large["requests_per_s"] / direct_rps,
                "rss_growth_mb": large["peak_rss_mb"] - little["peak_rss_mb"]}


def render(figures: dict[str, Any]) -> str:
    large, little = figures["batch"], figures["small_batch"]
    rows = [
        f"Batch of {figures['lines']:,} chat requests, concurrency {figures['concurrency']}, fake upstream",
        f"  direct (aiohttp, same bodies, same concurrency)  {figures['direct_requests_per_s']:8.0f} req/s",
        f"  batch through the gateway (create -> completed)  {large['requests_per_s']:8.0f} req/s "
        f"({large['seconds']:.1f} s)",
        f"  ratio                                            {figures['ratio']:8.2f}   target >= {MIN_RATIO}  "
        f"{'PASS' if figures['ratio'] >= MIN_RATIO else 'FAIL'}",
        "Peak RSS of the Jupyter server (VmHWM), a fresh server per batch",
        f"  {little['lines']:>7,} lines  {little['peak_rss_mb']:7.1f} MB",
        f"  {large['lines']:>7,} lines  {large['peak_rss_mb']:7.1f} MB",
        f"  difference     {figures['rss_growth_mb']:7.1f} MB   target < {MAX_RSS_GROWTH_MB:.0f}  "
        f"{'PASS' if figures['rss_growth_mb'] < MAX_RSS_GROWTH_MB else 'FAIL'}"]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, help="lines of the large batch (default 100,000; quick 20,000)")
    parser.add_argument("--small", type=int, help="lines of the small batch (default 10,000; quick 2,000)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight, both ways (default 64)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    settings = Settings(args.lines or (20_000 if args.quick else 100_000),
                        args.small or (2_000 if args.quick else 10_000), args.concurrency)
    try:
        figures = run(settings)
    except BenchError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    print(render(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0 if figures["ratio"] >= MIN_RATIO and figures["rss_growth_mb"] < MAX_RSS_GROWTH_MB else 1


if __name__ == "__main__":
    sys.exit(main())
