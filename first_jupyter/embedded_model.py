"""Which model the embedded default serves: a small real one from the Hugging Face hub where the hub can be reached,
else the tiny model built here with random weights.

A new user on a laptop with internet expects a sentence back from ``bash scripts/lab.sh``; a compute node, a
test, or a train has no route to the hub and still needs a model that loads. So the choice is made at start:

- a real model downloaded earlier (complete: its marker is written only once every file is in) is served, online
  or not;
- else, with the hub reachable, the real model is served, downloaded once into the data dir first
  (``model_download``);
- else the tiny model, and the gateway says why (its log and ``/first/api/status``).

"Reachable" is decided within a few seconds: ``HF_HUB_OFFLINE`` set means no; otherwise one TCP connection to the
hub's host (or the site proxy that leads to it) must open within ``PROBE_TIMEOUT_S``, name resolution included.
Only the standard library is imported here: ``config`` imports this on every start, and ``%load_ext`` stays light.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from first_jupyter.transport.proxies import ProxyError, from_environment

REAL_MODEL_REPO = "HuggingFaceTB/SmolLM2-360M-Instruct"
"""A 360M-parameter instruct model (Apache-2.0), in transformers format (safetensors, 0.7 GB): it answers in
sentences at several tokens a second on a laptop CPU, where a 135M model rambles and a 0.5B one (Qwen2.5) downloads
and runs at half the speed. It is a Llama model, as the tiny one is, so tests of the tiny one load the same way."""
TINY_MODEL_ID = "tiny-chat"
HUB_URL = "https://huggingface.co"
ENDPOINT_ENV = "HF_ENDPOINT"
"""The hub's URL, as huggingface_hub reads it (a mirror, or a test's stand-in)."""
OFFLINE_ENV = "HF_HUB_OFFLINE"
PROBE_TIMEOUT_S = 3.0
DOWNLOADED_MARKER = "first_jupyter_download.json"
"""Written into a model's directory once all its files are there: a directory without it is a download to finish."""


@dataclass(frozen=True)
class DefaultModel:
    """The embedded default's model: its public id, its directory, and what the gateway says about it."""

    id: str
    path: Path
    download: str | None
    """A hub repository to download into ``path`` before the engine starts; None: the directory is ready (or is
    the tiny model, built on first use)."""
    note: str


def hub_endpoint(environ: Mapping[str, str]) -> str:
    return (environ.get(ENDPOINT_ENV) or HUB_URL).rstrip("/")


def _offline(environ: Mapping[str, str]) -> bool:
    return environ.get(OFFLINE_ENV, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _first_hop(url: str, environ: Mapping[str, str]) -> tuple[str, int]:
    """Where a connection to ``url`` goes first: the site's proxy for it, if the environment names one."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        proxy = from_environment(parts.scheme, host, port, environ)
    except ProxyError:
        proxy = None  # a malformed proxy variable: try directly, the download itself will say what is wrong
    return (proxy.host, proxy.port) if proxy is not None else (host, port)


def hub_unreachable(environ: Mapping[str, str], timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached, in words for the log; None when a connection to it opened in time.

    The connection is tried in a thread of its own so that the whole of it, name resolution included (which
    ``socket`` does not bound), is bounded by ``timeout``.
    """
    if _offline(environ):
        return f"{OFFLINE_ENV} is set"
    url = hub_endpoint(environ)
    host, port = _first_hop(url, environ)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(None)
        except OSError as exc:
            outcome.append(f"{host}:{port} could not be reached ({exc.strerror or exc})")

    probe = threading.Thread(target=connect, name="first-hub-probe", daemon=True)
    probe.start()
    probe.join(timeout)
    if not outcome:
        return f"{host}:{port} did not answer within {timeout:g} s"
    return outcome[0]


def choose_default_model(data_dir: Path, environ: Mapping[str, str] | None = None) -> DefaultModel:
    """The real model when it is downloaded or can be, else the tiny one, with the reason (see the module)."""
    env = os.environ if environ is None else environ
    name = REAL_MODEL_REPO.rpartition("/")[2]
    real = data_dir / "models" / name
    if (real / DOWNLOADED_MARKER).is_file():
        return DefaultModel(name, real, None, f"serving '{name}' ({REAL_MODEL_REPO}) from {real}")
    reason = hub_unreachable(env)
    if reason is None:
        return DefaultModel(name, real, REAL_MODEL_REPO,
                            f"serving '{name}': downloading {REAL_MODEL_REPO} once from {hub_endpoint(env)} into "
                            f"{real}; requests wait for it")
    tiny = data_dir / "models" / TINY_MODEL_ID
    return DefaultModel(TINY_MODEL_ID, tiny, None,
                        f"the Hugging Face hub cannot be reached ({reason}), so the embedded default serves "
                        f"'{TINY_MODEL_ID}', a tiny model built in {tiny} with RANDOM weights: its answers are "
                        f"random tokens. With the hub reachable it serves '{name}' instead; FIRST_LOCAL_MODEL names "
                        "any model")
