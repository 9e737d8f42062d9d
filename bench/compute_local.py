"""Cold and hot latency through the Globus Compute path (the embedded default), against the engine reached directly.

The path: the gateway submits a task to the Globus Compute engine run in-process; a worker runs the remote
function next to ``transformers serve`` on the tiny model; a stream comes back through the callback route. The
baseline, in the same run: the same engine started by the launcher and asked directly. Figures printed:

* cold first request: block start (parsl starts a block, its ``worker_init`` starts the engine and waits for it)
  plus the request, against the engine's own start time measured directly;
* hot request latency (p50, p95) and stream time to first token, through the path and directly, with the
  difference (what the task hop costs).

Run: ``python bench/compute_local.py [--requests N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import openai
import yaml

from first_jupyter.remote.launcher import EngineSpec, start_engine
from first_jupyter.remote.tiny_model import build_tiny_model

MESSAGES = [{"role": "user", "content": "How do hot nodes work?"}]


def _timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def _ttft(client: openai.OpenAI, model: str) -> float:
    started = time.perf_counter()
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, stream=True)
    first = None
    for _ in stream:
        first = first or time.perf_counter()
    return (first or time.perf_counter()) - started


def _measure(client: openai.OpenAI, model: str, requests: int) -> dict[str, float]:
    ask = lambda: client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8)  # noqa: E731
    latencies = sorted(_timed(ask) for _ in range(requests))
    ttfts = sorted(_ttft(client, model) for _ in range(max(requests // 2, 3)))
    return {"p50": statistics.median(latencies), "p95": latencies[int(0.95 * (len(latencies) - 1))],
            "ttft_p50": statistics.median(ttfts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="first-bench-"))
    model_dir = build_tiny_model(work / "tiny-chat")

    started = time.perf_counter()
    engine = start_engine(EngineSpec(model=str(model_dir), engine="transformers", device="cpu",
                                     log_path=work / "direct.log"), owned=True)
    try:
        engine.wait_healthy(600)
        direct_start = time.perf_counter() - started
        direct = openai.OpenAI(base_url=engine.base_url, api_key="none", max_retries=0)
        direct_hot = _measure(direct, engine.model_name, args.requests)
    finally:
        engine.stop()

    config = {"clusters": {"local": {"backend": "globus_compute", "endpoints": [{
        "name": "engine", "in_process": {"engine": "transformers", "device": "cpu"},
        "models": [{"id": "tiny-chat", "path": str(model_dir)}]}]}}}
    (work / "first.yaml").write_text(yaml.safe_dump(config))
    os.environ.update(FIRST_CONFIG=str(work / "first.yaml"), FIRST_DATA_DIR=str(work / "data"))
    for name in ("FIRST_GATEWAY_URL", "FIRST_API_KEY"):
        os.environ.pop(name, None)
    from first_jupyter import client as first

    try:
        path = first.openai_client()
        cold = _timed(lambda: path.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8))
        path_hot = _measure(path, "tiny-chat", args.requests)
    finally:
        first.disconnect()

    print(f"{'':34}{'direct':>10}{'compute path':>14}{'added':>10}")
    print(f"{'cold: engine start / first request':34}{direct_start:>9.2f}s{cold:>13.2f}s"
          f"{cold - direct_start:>9.2f}s")
    for key, label in (("p50", "hot request p50"), ("p95", "hot request p95"), ("ttft_p50", "stream TTFT p50")):
        d, p = direct_hot[key] * 1000, path_hot[key] * 1000
        print(f"{label:34}{d:>8.1f}ms{p:>12.1f}ms{p - d:>8.1f}ms")


if __name__ == "__main__":
    main()
