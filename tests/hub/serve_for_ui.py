"""A real JupyterHub for the browser test of the sidebar behind a hub (tests/ui/tests/hub.spec.ts).

``python -m tests.hub.serve_for_ui`` starts, on loopback:
- the fake upstream (bench/fake_upstream.py) as cluster ``remote``, serving ``fake-model``;
- a stand-in for an existing FIRST gateway (tests/fake_first_gateway.py) as cluster ``alcf``: Llama on sophia
  (under maintenance: every model stopped) and on polaris (running, with its scheduler's free nodes and queued
  jobs, and its published details), QwQ on sophia only;
- the hub (``running_hub``), whose users' servers use both clusters with the user's Globus token from the hub's
  auth state (the FIRST stand-in accepts only the test user's, ``AT-ada-1``).
Nobody is logged in and no server is spawned: the browser does both, as a user does.

It writes ``hub.json`` (the hub's public URL, the user and the password) to ``$FIRST_UI_STATE``, prints
``READY`` and serves until its standard input closes (the test ends, or dies) or it gets SIGTERM; then it stops
the hub, whose proxy and servers ``running_hub`` checks gone by PID, and its stand-ins.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from bench.fake_upstream import serving_in_thread
from tests.fake_first_gateway import FakeFirstGateway, job, jobs, serving_first_gateway
from tests.hub import running_hub
from tests.hub.authenticator import PASSWORD, RESOURCE_SERVER, auth_state

USER = "ada"
LLAMA, QWEN = "meta-llama/Llama-3.3-70B-Instruct", "Qwen/QwQ-32B"


def first_gateway() -> FakeFirstGateway:
    """What the FIRST stand-in serves and says, for the sidebar to show."""
    token = auth_state(USER, 1, 0)["tokens"][RESOURCE_SERVER]["access_token"]  # what the hub's login gives ada
    return FakeFirstGateway(
        served={"sophia": {"vllm": [LLAMA, QWEN]}, "polaris": {"vllm": [LLAMA]}},
        jobs={"polaris": jobs([job("polaris", "vllm", LLAMA)], cluster_status={"free_nodes": 12, "queued_jobs": 3}),
              "sophia": jobs(stopped=[job("sophia", "vllm", f"{LLAMA},{QWEN}", "stopped")])},  # maintenance
        down={"sophia"},
        details={LLAMA: {"display_name": "Llama 3.3 70B", "capabilities": {
            "api_protocols": ["chat_completions"], "streaming": True, "tool_calling": {"supported": True},
            "context_window_tokens": 131072, "input_modalities": ["text"]},
            "rate_limit_token_per_minute": 200000}},
        token=token)


def first_config(upstream_url: str, first_url: str) -> dict[str, Any]:
    """Both clusters, each sent the user's Globus token (the hub's auth state, through ``hub_api``)."""
    return {"clusters": {
        "remote": {"backend": "http", "endpoints": [{
            "name": "fake", "base_url": f"{upstream_url}/v1", "globus_resource_server": RESOURCE_SERVER,
            "models": [{"id": "fake-model"}]}]},
        "alcf": {"backend": "first", "endpoints": [{
            "name": "gateway", "base_url": first_url, "globus_resource_server": RESOURCE_SERVER}]},
    }, "defaults": {"model": "fake-model"}}


def main() -> None:
    state = Path(os.environ["FIRST_UI_STATE"])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped as on a closed input: everything by PID
    with ExitStack() as stack:
        upstream = stack.enter_context(serving_in_thread(models=["fake-model"], chunks=8))
        first = stack.enter_context(serving_first_gateway(first_gateway()))
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hub-", dir=state)))
        config = directory / "first.yaml"
        config.write_text(yaml.safe_dump(first_config(upstream.url, first.url)))
        hub = stack.enter_context(running_hub(directory, config))
        (state / "hub.json").write_text(json.dumps({"url": hub.url, "user": USER, "password": PASSWORD,
                                                    "log": str(directory / "hub.log")}))
        print("READY", flush=True)
        os.set_blocking(sys.stdin.fileno(), True)  # Node gives its children's pipes non-blocking
        sys.stdin.buffer.read()


if __name__ == "__main__":
    main()
