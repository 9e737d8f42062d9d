"""The `first` command for checks that need no server."""

from __future__ import annotations

from pathlib import Path

import pytest

from first_jupyter.cli import main


def test_config_lists_what_each_endpoint_serves(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.delenv("FIRST_CONFIG", raising=False)
    monkeypatch.delenv("FIRST_LOCAL_MODEL", raising=False)
    monkeypatch.setenv("FIRST_DATA_DIR", str(tmp_path))
    assert main(["config"]) == 0
    assert capsys.readouterr().out == "local/engine (globus_compute, in process): tiny-chat\n"


def test_config_says_a_first_gateways_models_are_discovered(tmp_path: Path, capsys):
    file = tmp_path / "first.yaml"
    file.write_text("clusters:\n  alcf:\n    backend: first\n    endpoints:\n"
                    "      - {name: gw, base_url: 'https://example.org/resource_server'}\n")
    assert main(["config", str(file)]) == 0
    assert capsys.readouterr().out == ("alcf/gw (first): the models https://example.org/resource_server/"
                                       "list-endpoints lists\n")


def test_config_reports_a_bad_file_and_fails(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters:\n  a: {backend: http}\n")
    assert main(["config", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"{bad}: at clusters.a.endpoints: Field required (found nothing)"


def test_launch_passes_its_arguments_to_the_launcher(capsys):
    with pytest.raises(SystemExit) as info:
        main(["launch", "--help"])
    assert info.value.code == 0
    assert "--served-name" in capsys.readouterr().out


@pytest.fixture
def no_sign_in(tmp_path: Path, monkeypatch):
    """No token anywhere: a fresh data dir, no hub, no globus-compute login, no token variable."""
    for name in ("FIRST_CONFIG", "FIRST_GLOBUS_TOKEN", "GLOBUS_DATA", "JUPYTERHUB_API_URL", "JUPYTERHUB_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FIRST_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("GLOBUS_COMPUTE_USER_DIR", str(tmp_path / "compute"))


def test_whoami_says_how_to_sign_in_and_fails_when_nobody_is(no_sign_in, capsys):
    assert main(["whoami"]) == 3  # exit 3: not signed in
    assert "Not signed in to Globus. Sign in with `first login`" in capsys.readouterr().out


def test_whoami_names_the_source_and_never_the_token(no_sign_in, monkeypatch, capsys):
    monkeypatch.setenv("FIRST_GLOBUS_TOKEN", "AT-script")
    assert main(["whoami"]) == 0
    out = capsys.readouterr().out
    assert "(source: env)" in out
    assert "any resource server: no stated expiry" in out
    assert "AT-script" not in out


def test_login_without_a_native_app_says_what_to_configure(no_sign_in, capsys):
    assert main(["login"]) == 2
    assert "set auth.client_id in the FIRST config file" in capsys.readouterr().err
