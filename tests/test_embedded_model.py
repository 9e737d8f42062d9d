"""The embedded default's model: a real one from the hub when the hub answers, the tiny one offline, a download
that resumes. The hub is a loopback stand-in (``tests/fake_hub.py``) answering the real huggingface_hub client;
the "real" model it serves is a tiny one, loaded the same way (a local directory in transformers format)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from first_jupyter.config import load_config
from first_jupyter.embedded_model import (
    DOWNLOADED_MARKER,
    REAL_MODEL_REPO,
    TINY_MODEL_ID,
    choose_default_model,
)
from first_jupyter.model_download import ModelDownloader
from first_jupyter.protocol import OpenAIError
from first_jupyter.remote.tiny_model import TINY_MODEL_MARKER, build_tiny_model
from tests.fake_hub import FakeHub, serving_hub
from tests.test_local_engine import _status_once
from tests.waiting import ENGINE_GUARD_S, eventually

REAL_NAME = REAL_MODEL_REPO.rpartition("/")[2]
WEIGHTS = "model.safetensors"
CHUNK = 10 * 1024 * 1024
"""huggingface_hub writes a download in reads of 10 MB: only a cut past the first leaves a part on disk."""


@pytest.fixture(scope="module")
def large_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, wider: 44 MB of weights, so that half of them is more than one of the client's reads."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "wide", hidden_size=768)


@pytest.fixture
def hub(large_tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The stand-in hub serving the wide tiny model as the real model's repository, at ``$HF_ENDPOINT``."""
    with serving_hub(FakeHub.of_directory(REAL_MODEL_REPO, large_tiny_model, leave_out=(TINY_MODEL_MARKER,))) as up:
        monkeypatch.setenv("HF_ENDPOINT", up.url)
        yield up
        up.release.set()


def test_with_the_hub_reachable_the_real_model_is_chosen(hub: FakeHub, tmp_path: Path):
    chosen = choose_default_model(tmp_path)
    assert (chosen.id, chosen.path, chosen.download) == (REAL_NAME, tmp_path / "models" / REAL_NAME, REAL_MODEL_REPO)
    assert f"downloading {REAL_MODEL_REPO} once from {hub.url}" in chosen.note
    assert hub.gets == []  # chosen by a connection, not a download


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "closed port"])
def test_offline_the_tiny_model_is_served_and_the_gateway_says_why(offline: str, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    if offline == "HF_HUB_OFFLINE":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        why = "HF_HUB_OFFLINE is set"
    else:  # the conftest's HF_ENDPOINT: a loopback port nobody listens on
        why = "could not be reached"
    model = load_config(None, tmp_path).clusters["local"].endpoints[0].models[0]
    assert (model.id, model.path, model.build_tiny, model.download) == (
        TINY_MODEL_ID, str(tmp_path / "models" / TINY_MODEL_ID), True, None)
    assert model.note is not None
    assert why in model.note
    assert "RANDOM weights" in model.note


def test_a_complete_download_is_served_offline_and_a_partial_one_is_not(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    real = tmp_path / "models" / REAL_NAME
    real.mkdir(parents=True)
    (real / "config.json").write_text("{}")  # files of a download that did not finish
    assert choose_default_model(tmp_path).id == TINY_MODEL_ID
    (real / DOWNLOADED_MARKER).write_text("{}")
    chosen = choose_default_model(tmp_path)
    assert (chosen.id, chosen.download) == (REAL_NAME, None)


def test_first_local_model_overrides_a_reachable_hub(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FIRST_LOCAL_MODEL", "/models/Qwen2.5-0.5B-Instruct")
    model = load_config(None, tmp_path).clusters["local"].endpoints[0].models[0]
    assert (model.id, model.download, model.note) == ("Qwen2.5-0.5B-Instruct", None, None)


def test_an_interrupted_download_resumes_where_it_stopped(hub: FakeHub, tmp_path: Path):
    hub.cut = WEIGHTS
    target = tmp_path / "model"
    download = ModelDownloader(REAL_MODEL_REPO, target, "cluster 'local' endpoint 'engine'")
    with pytest.raises(OpenAIError) as failed:
        download.wait()
    assert failed.value.status == 503
    assert "the next request resumes it" in failed.value.message
    assert download.status()["state"] == "failed"
    assert not (target / WEIGHTS).exists()
    kept = [p.stat().st_size for p in target.rglob("*.incomplete")]
    assert kept
    assert kept[0] >= CHUNK

    download.wait()  # the next start
    assert [g for g in hub.gets if g[0] == WEIGHTS] == [(WEIGHTS, None), (WEIGHTS, f"bytes={kept[0]}-")]
    assert (target / WEIGHTS).read_bytes() == hub.files[WEIGHTS]
    assert (target / DOWNLOADED_MARKER).is_file()
    assert download.status()["state"] == "done"
    assert ModelDownloader(REAL_MODEL_REPO, target, "here").status()["state"] == "done"  # a later start: nothing to do


def test_a_download_under_way_reports_its_bytes(hub: FakeHub, tmp_path: Path):
    hub.held = WEIGHTS
    download = ModelDownloader(REAL_MODEL_REPO, tmp_path / "model", "here")
    download.start()
    eventually(lambda: download.done_bytes >= CHUNK, "the first 10 MB of the weights counted")
    status = download.status()
    assert status["state"] == "downloading"
    assert status["total_bytes"] >= len(hub.files[WEIGHTS])
    assert status["done_bytes"] < status["total_bytes"]
    hub.release.set()
    download.wait()
    assert download.status()["done_bytes"] == download.status()["total_bytes"] == sum(map(len, hub.files.values()))


class TestServedFromTheHub:
    """A real Jupyter server on the embedded default with the stand-in hub reachable: the real model is downloaded
    (its progress in ``/first/api/status``) and served by the in-process endpoint's engine."""

    @pytest.fixture
    def jp_server_config(self, hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
        monkeypatch.delenv("FIRST_CONFIG", raising=False)
        monkeypatch.delenv("FIRST_LOCAL_MODEL", raising=False)
        hub.held = WEIGHTS
        return {"ServerApp": {"jpserver_extensions": {"first_jupyter": True},
                              "allow_unauthenticated_access": False, "terminals_enabled": False},
                "FirstExtension": {"data_dir": str(tmp_path / "data")}}

    async def test_downloads_and_serves_the_real_model(self, first_ext: Any, hub: FakeHub, tmp_path: Path):
        under_way = await _status_once(first_ext, lambda e: e["download"]["done_bytes"] >= CHUNK)
        assert under_way["state"] == "starting"  # the sidebar's model state: requests wait for it
        assert under_way["download"]["state"] == "downloading"
        assert under_way["download"]["total_bytes"] >= len(hub.files[WEIGHTS])
        assert REAL_MODEL_REPO in under_way["note"]
        hub.release.set()
        client = openai.AsyncOpenAI(base_url=first_ext.gateway_url(), api_key=first_ext.api_key, max_retries=0,
                                    timeout=ENGINE_GUARD_S)
        answer = await client.chat.completions.create(model=REAL_NAME, messages=[{"role": "user", "content": "hi"}],
                                                      max_tokens=3)
        assert answer.model == REAL_NAME
        assert answer.usage is not None
        assert answer.usage.completion_tokens == 3
        served = tmp_path / "data" / "models" / REAL_NAME
        assert (served / WEIGHTS).read_bytes() == hub.files[WEIGHTS]
        assert not (served / TINY_MODEL_MARKER).exists()
        assert (await _status_once(first_ext, lambda e: e["state"] == "running"))["download"]["state"] == "done"
