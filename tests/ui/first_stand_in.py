"""A FIRST cluster for the browser's notebook tests (tests/ui/tests/notebook.spec.ts), in a process of its own.

``python -m tests.ui.first_stand_in`` serves, on loopback, the stand-in of an existing FIRST gateway
(tests/fake_first_gateway.py) with two models on sophia:
- ``HOT``, running, whose answer is Markdown (a heading and a list), for a cell to render as HTML;
- ``COLD``, whose job is queued: its requests are held, as FIRST holds them while the job starts, until the test
  lets them go with ``POST {control}/release``. So the test, not the clock, says how long the start lasts.

It prints one line ``READY {"first": URL, "control": URL}`` once both listen, and serves until its standard input
closes (the Jupyter server that started it exits, or dies) or it gets SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler

from tests.conftest import send_json, serving_http
from tests.fake_first_gateway import FakeFirstGateway, job, jobs, serving_first_gateway

HOT, COLD = "meta-llama/Llama-3.3-70B-Instruct", "Qwen/QwQ-32B"
MARKDOWN = "## Findings\n\n- the samples agree\n- the error is small"


def stand_in() -> FakeFirstGateway:
    """HOT running, COLD queued and held; no token asked (a cell's display is tested here, not a sign-in)."""
    return FakeFirstGateway(
        served={"sophia": {"vllm": [HOT, COLD]}},
        jobs={"sophia": jobs([job("sophia", "vllm", HOT)], queued=[job("sophia", "vllm", COLD)])},
        held={COLD: threading.Event()}, texts={HOT: MARKDOWN}, token=None)


def control(state: FakeFirstGateway) -> type[BaseHTTPRequestHandler]:
    """``POST /release``: COLD's job has started, its held requests (and any later one) are answered."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            """Quiet: the server's own log is what the tests read."""

        def do_POST(self) -> None:
            if self.path != "/release":
                send_json(self, {"error": f"no route {self.path}: POST /release"}, 404)
                return
            state.held[COLD].set()
            send_json(self, {"released": COLD})

    return Handler


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped as on a closed input
    state = stand_in()
    with ExitStack() as stack:
        first = stack.enter_context(serving_first_gateway(state))
        control_url = stack.enter_context(serving_http(control(state)))
        stack.callback(state.held[COLD].set)  # a request still held lets go, so the servers' shutdown ends
        print("READY " + json.dumps({"first": first.url, "control": control_url}), flush=True)
        sys.stdin.buffer.read()


if __name__ == "__main__":
    main()
