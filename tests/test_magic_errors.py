"""What a notebook shows when a cluster refuses: one or two lines, no traceback, each naming the next step (sign
in again, ask for the group, when to retry). A real IPython shell, its in-process gateway in front of the FIRST
gateway stand-in (its 401s, group denial, maintenance 503, cold models) or the fake engine (its 429)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from IPython.core.interactiveshell import InteractiveShell

from bench.fake_upstream import FakeUpstream
from tests.conftest import without_a_server
from tests.fake_first_gateway import GROUP_DENIAL, TOKEN, FakeFirstGateway, job, jobs, serving_first_gateway
from tests.test_magics import cell

LLAMA = "meta-llama/Llama-3.3-70B-Instruct"
RESOURCE_SERVER = "681c10cc-f684-4540-bcd7-0b4df3bc26ef"


def _lines(shell: InteractiveShell, line: str) -> list[str]:
    """What ``%%first chat ...`` prints: its lines on stderr, once it is sure nothing else was shown."""
    shown = cell(shell, line, "hi")
    assert shown.stdout == ""
    assert shown.outputs == []
    assert "Traceback" not in shown.stderr
    return shown.stderr.strip().splitlines()


@pytest.fixture
def remote() -> Iterator[FakeFirstGateway]:
    with serving_first_gateway(FakeFirstGateway(served={"sophia": {"vllm": [LLAMA]}})) as running:
        yield running


@pytest.fixture
def first_shell(remote: FakeFirstGateway, write_config: Callable[[dict[str, Any]], Path], tmp_path: Path,
                monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    """A shell whose gateway reaches the FIRST gateway stand-in with the user's Globus token, models listed once
    (so that what a test changes next refuses requests, not the catalog); cold models are refused at once."""
    from first_jupyter import client

    config = {"clusters": {"alcf": {"backend": "first", "endpoints": [{
        "name": "gateway", "base_url": remote.url, "globus_resource_server": RESOURCE_SERVER,
        "globus_scope": f"https://auth.globus.org/scopes/{RESOURCE_SERVER}/action_all"}]}},
        "auth": {"sources": ["env"]}, "defaults": {"cold_start": {"mode": "reject"}}}
    monkeypatch.setenv("FIRST_CONFIG", str(write_config(config)))
    monkeypatch.setenv("FIRST_GLOBUS_TOKEN", TOKEN)
    without_a_server(monkeypatch, tmp_path / "data")
    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "first_jupyter")
    assert cell(shell, "models").stderr == ""
    yield shell
    InteractiveShell.clear_instance()
    client.disconnect()


def test_401_says_sign_in_again(first_shell, remote):
    remote.token = "AT-another"  # the one this gateway holds is refused: expired
    (line,) = _lines(first_shell, f"chat -m {LLAMA}")
    assert line.startswith("cluster 'alcf' endpoint 'gateway' answered HTTP 401: Access token expired.")
    assert "run `%first login`" in line


def test_403_names_the_cluster_and_the_group_and_says_ask_its_operators(first_shell, remote):
    remote.denial = GROUP_DENIAL
    (line,) = _lines(first_shell, f"chat --no-stream -m {LLAMA}")
    assert GROUP_DENIAL in line
    assert "not in the Globus group (or identity provider) that cluster 'alcf' endpoint 'gateway' allows" in line
    assert "Ask its operators to add you" in line
    assert "%first login" not in line


def test_503_under_maintenance_says_where_to_look(first_shell, remote):
    remote.faults[LLAMA] = "maintenance"
    assert _lines(first_shell, f"chat -m {LLAMA}") == [
        "cluster 'alcf' endpoint 'gateway' answered HTTP 503: Sophia is under maintenance. The engine is not ready; "
        "retry shortly or check GET /first/api/status.",
        "`%first status` shows where it stands; retry once it is up."]


def test_503_while_the_model_starts_gives_the_estimate(first_shell, remote):
    remote.jobs = {"sophia": jobs(stopped=[job("sophia", "vllm", LLAMA, "stopped")])}
    cell(first_shell, "status")  # the jobs read: the model is cold
    (line,) = _lines(first_shell, f"chat -m {LLAMA}")
    assert line.startswith(f"Model '{LLAMA}' is not running yet: cluster 'alcf' endpoint 'gateway' is starting it")
    assert "expected ready in about " in line
    assert f"`%first warm {LLAMA}`" in line


def test_429_says_when_to_retry_from_retry_after(shell, in_process: FakeUpstream):
    in_process.fault = "429"  # the engine's rate limit, with Retry-After: 1
    assert _lines(shell, "chat") == [
        "cluster 'remote' endpoint 'fake' answered HTTP 429: Rate limit reached (fake fault). The engine is busy; "
        "retry after a short wait.",
        "The cluster is at its request limit: retry in about 1 s."]


def test_403_of_an_engine_names_the_step(shell, in_process: FakeUpstream):
    in_process.fault = "403"
    assert _lines(shell, "chat --no-stream")[1] == (
        "Your account is not in a group this cluster allows: ask its operators to add you, or use a model another "
        "cluster serves (`%first models`).")
