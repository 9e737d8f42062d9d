"""A batch chunk on a node: the task that runs ``vllm run-batch`` (or another command doing its job) for one
chunk, and such a command for nodes whose engine already serves: it sends the chunk's lines to that engine.

Standard library only, like every function that travels to an endpoint. The chunk's output is written under a
name of its own and renamed into place when the command succeeded, so an output that exists is whole: that is
the chunk's checkpoint, and a task run again for a chunk already done (a gateway that restarted while it ran)
returns at once.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from first_jupyter.remote.inference import REQUEST_TIMEOUT_S, plain_request

STDERR_TAIL_BYTES = 2000


def _lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def run_chunk(command: list[str], values: dict[str, str], output: str, timeout: float) -> dict[str, Any]:
    """Run ``command`` for one chunk: ``{output}`` is a fresh file beside ``output``, renamed to it on success;
    ``{python}`` this node's Python; the other placeholders come in ``values``. Its output lines and time; a
    failure raises with the command's last words, so the gateway runs the chunk again elsewhere."""
    final = Path(output)
    started = time.time()
    if final.exists():
        return {"lines": _lines(final), "elapsed_s": 0.0, "reused": True}
    partial = final.with_name(f"{final.name}.{secrets.token_hex(6)}.part")
    filled = {**values, "{output}": str(partial), "{python}": sys.executable}
    argv = [_fill(arg, filled) for arg in command]
    try:
        done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0 or not partial.exists():
            tail = done.stderr[-STDERR_TAIL_BYTES:].decode("utf-8", "replace").strip()
            raise RuntimeError(f"{argv[0]} exited with status {done.returncode} and "
                               f"{'no output' if not partial.exists() else 'an output'}: {tail or 'nothing on stderr'}")
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return {"lines": _lines(final), "elapsed_s": time.time() - started, "reused": False}


def _fill(arg: str, values: dict[str, str]) -> str:
    """Only the known placeholders are replaced: engine options may hold braces of their own (JSON)."""
    for key, value in values.items():
        arg = arg.replace(key, value)
    return arg


# -- the command: run-batch's job, against the engine serving on this node -----------------------------------


def _answer(item: dict[str, Any], port: int, timeout: float) -> dict[str, Any]:
    """One input line's output line, as ``vllm run-batch`` writes it."""
    request_id = f"first-{secrets.token_hex(12)}"
    try:
        reply = plain_request(port, str(item.get("url", "")), item["body"], timeout)
    except OSError as exc:
        return {"id": request_id, "custom_id": item["custom_id"], "response": None,
                "error": f"the engine on port {port} did not answer: {exc}"}
    try:
        body = json.loads(reply["body"])
    except ValueError:
        body = {"error": {"message": str(reply["body"])[:2000], "type": "api_error"}}
    return {"id": request_id, "custom_id": item["custom_id"],
            "response": {"status_code": reply["status"], "request_id": request_id, "body": body}, "error": None}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m first_jupyter.remote.run_batch",
        description="Do `vllm run-batch`'s job against the engine already serving on this node: each line of the "
                    "input (OpenAI batch format) is sent to it, and its answer written to the output.")
    parser.add_argument("-i", "--input-file", dest="input", required=True, type=Path)
    parser.add_argument("-o", "--output-file", dest="output", required=True, type=Path)
    parser.add_argument("--port", type=int, required=True, help="the engine's port on 127.0.0.1")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT_S, help="seconds per request")
    args = parser.parse_args(argv)
    items = [json.loads(line) for line in args.input.read_bytes().splitlines() if line.strip()]
    lock = threading.Lock()
    with args.output.open("w", encoding="utf-8") as out, ThreadPoolExecutor(max(args.concurrency, 1)) as pool:

        def one(item: dict[str, Any]) -> None:
            line = json.dumps(_answer(item, args.port, args.timeout), ensure_ascii=False) + "\n"
            with lock:
                out.write(line)

        list(pool.map(one, items))
    return 0


if __name__ == "__main__":
    sys.exit(main())
