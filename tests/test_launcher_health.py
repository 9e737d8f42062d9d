"""The engine launcher's health check on a node whose environment names a site proxy: the engine listens on the
node's loopback, which no proxy can reach, so the check must go there directly or the engine never shows healthy."""

from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import cast

import pytest

from first_jupyter.remote.launcher import EngineProcess, EngineSpec
from tests.conftest import closed_port, serving_http

PROXY_VARIABLES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


class Health(BaseHTTPRequestHandler):
    """An engine's ``/health``, answered 200."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def engine_at(port: int, tmp_path: Path) -> EngineProcess:
    """The launcher's view of an engine on ``port``; the health check never looks at the process."""
    spec = EngineSpec(model="tiny", log_path=tmp_path / "engine.log")
    return EngineProcess(spec=spec, engine="transformers", port=port, popen=cast(subprocess.Popen[bytes], None))


def proxied_by(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """The node's environment: every proxy variable names ``url``, and nothing is exempt from it."""
    for name in PROXY_VARIABLES:
        monkeypatch.setenv(name, url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


def test_a_refusing_site_proxy_does_not_hide_a_healthy_engine(tinyproxy, monkeypatch, tmp_path):
    proxy = tinyproxy(refusing=True)
    proxied_by(monkeypatch, proxy.url)
    with serving_http(Health) as base:
        # the environment really routes loopback to the proxy: an opener urllib builds now is refused there (not
        # urlopen's: it keeps the proxies it read when the process first used it)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.build_opener().open(f"{base}/health", timeout=30)
        assert refused.value.code == 403
        assert proxy.requests() == [f"GET {base}/health HTTP/1.1"]

        engine = engine_at(int(base.rsplit(":", 1)[1]), tmp_path)
        assert engine.healthy()
    assert len(proxy.requests()) == 1  # the launcher's check never went to the proxy


def test_a_proxy_that_is_down_does_not_hide_a_healthy_engine(monkeypatch, tmp_path):
    proxied_by(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    with serving_http(Health) as base:
        assert engine_at(int(base.rsplit(":", 1)[1]), tmp_path).healthy()


def test_an_engine_that_is_not_listening_is_not_healthy(monkeypatch, tmp_path):
    proxied_by(monkeypatch, f"http://127.0.0.1:{closed_port()}")
    assert not engine_at(closed_port(), tmp_path).healthy()
