"""The extension inside a real Jupyter server: enabled on install, kernels get the scoped key, all routes
guarded, a bad config reported at start."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import fake_cluster_config, server_config

ROUTES = [("GET", "first/v1/models"), ("POST", "first/v1/chat/completions"), ("POST", "first/v1/completions"),
          ("POST", "first/v1/embeddings"), ("GET", "first/api/status"), ("GET", "first/v1/unknown")]


class TestWithFakeUpstream:
    @pytest.fixture
    def jp_server_config(self, fake_upstream, write_config, tmp_path: Path):
        return server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "data")

    @pytest.mark.parametrize(("method", "path"), ROUTES)
    async def test_every_route_needs_auth(self, jp_fetch, method, path):
        response = await jp_fetch(*path.split("/"), method=method, body=b"{}" if method == "POST" else None,
                                  headers={"Authorization": ""}, raise_error=False)
        assert response.code == 401
        assert json.loads(response.body)["error"]["type"] == "authentication_error"

    async def test_kernels_reach_the_gateway_with_the_scoped_key(self, first_ext, jp_serverapp):
        km = jp_serverapp.kernel_manager
        kernel_id = await km.start_kernel()
        client = km.get_kernel(kernel_id).client()
        client.start_channels()
        try:
            await client.wait_for_ready(timeout=120)  # only a guard: a kernel starts in seconds
            code = ("import os, openai\n"
                    "c = openai.OpenAI(base_url=os.environ['FIRST_GATEWAY_URL'], api_key=os.environ['FIRST_API_KEY'])\n"
                    "r = c.chat.completions.create(model='fake-model', messages=[{'role': 'user', 'content': 'x'}])\n"
                    "print(os.environ['FIRST_GATEWAY_URL'], r.model, r.choices[0].message.content)")
            out: list[str] = []
            reply = await client.execute_interactive(
                code, timeout=120, output_hook=lambda msg: out.append(msg["content"].get("text", "")))
        finally:
            client.stop_channels()
            await km.shutdown_kernel(kernel_id)
        assert reply["content"]["status"] == "ok", out
        url, model, text = "".join(out).split(" ", 2)
        assert url == first_ext.gateway_url()
        assert model == "fake-model"
        assert text.startswith("tok0")

    async def test_runtime_file_lets_the_same_user_find_the_gateway(self, first_ext, jp_serverapp):
        await first_ext._start_jupyter_server_extension(jp_serverapp)
        path = first_ext.runtime_file
        assert json.loads(path.read_text()) == {"url": first_ext.gateway_url(), "api_key": first_ext.api_key,
                                                "jupyter_url": first_ext.jupyter_gateway_url(), "pid": os.getpid(),
                                                "lasting_key_file": None}  # (c.FirstExtension.lasting_key is off)
        assert path.stat().st_mode & 0o777 == 0o600
        await first_ext.stop_extension()
        assert not path.exists()


class TestBadConfig:
    @pytest.fixture
    def jp_server_config(self, write_config, tmp_path: Path):
        bad = {"clusters": {"polaris": {"backend": "http", "endpoints": [
            {"name": "vllm", "base_url": "polaris:8000", "models": [{"id": "llama"}]}]}}}
        return server_config(write_config(bad), tmp_path / "data")

    @pytest.mark.parametrize(("method", "route"), [("GET", "models"), ("POST", "chat/completions")])
    async def test_bad_config_is_reported_with_file_and_key_path(self, door, method, route, tmp_path: Path):
        body = json.dumps({"model": "llama", "messages": [{"role": "user", "content": "hi"}]})
        async with aiohttp.ClientSession() as session, session.request(
                method, door.route(route), headers=door.headers, data=body if method == "POST" else None) as resp:
            assert resp.status == 503
            message = json.loads(await resp.read())["error"]["message"]
        assert str(tmp_path / "first.yaml") in message
        assert "clusters.polaris.endpoints[0].base_url" in message
        assert "https?://" in message
        assert "'polaris:8000'" in message


def test_installed_extension_is_enabled_and_ok():
    """Installing the package enables the extension through its jupyter-config data file."""
    done = subprocess.run([sys.executable, "-m", "jupyter", "server", "extension", "list"], capture_output=True,
                          text=True, check=True, timeout=300, env={**os.environ, "NO_COLOR": "1"})
    listing = re.sub(r"\x1b\[[0-9;]*m", "", done.stdout + done.stderr)
    assert re.search(r"^\s*first_jupyter enabled\s*$", listing, re.MULTILINE), listing
    assert re.search(r"Validating first_jupyter\.\.\.\n\s*first_jupyter [0-9.]+ OK", listing), listing
