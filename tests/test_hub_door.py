"""The Jupyter door behind a JupyterHub: the server's URL is public there (the hub's proxy forwards to it), so the
kernels' scoped key, which opens the owner's Globus identity, is honoured only from the server's own machine."""

from __future__ import annotations

import json

import pytest

from tests.conftest import fake_cluster_config, server_config

FORWARDED = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
"""What configurable-http-proxy adds to a request it passes on from the hub's public URL."""


@pytest.fixture(params=[True, False], ids=["behind-a-hub", "standalone"])
def behind_hub(request, monkeypatch) -> bool:
    if request.param:
        monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/user/ada/")
    else:
        monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
    return bool(request.param)


@pytest.fixture
def jp_server_config(behind_hub, fake_upstream, write_config, tmp_path):
    return server_config(write_config(fake_cluster_config(fake_upstream)), tmp_path / "data", lasting_key=True)


@pytest.mark.parametrize("which", ["per-start", "lasting"])
async def test_the_scoped_key_from_the_hubs_public_url_is_refused_with_a_reason(first_ext, jp_fetch, behind_hub,
                                                                               which):
    """The lasting key (for tools outside kernels) opens no more than the kernels' key."""
    secret = first_ext.api_key if which == "per-start" else first_ext.kept_key.path.read_text().strip()
    key = {"Authorization": f"Bearer {secret}"}
    local = await jp_fetch("first", "v1", "models", headers=key, raise_error=False)
    assert local.code == 200  # from this machine: a kernel of the server's
    forwarded = await jp_fetch("first", "v1", "models", headers={**key, **FORWARDED}, raise_error=False)
    if behind_hub:
        assert forwarded.code == 403
        error = json.loads(forwarded.body)["error"]
        assert error["code"] == "scoped_key_not_here"
        assert "own kernels" in error["message"]
    else:  # a server of one's own: the key goes where its owner takes it
        assert forwarded.code == 200
