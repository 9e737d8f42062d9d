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
    assert capsys.readouterr().out == "local/engine (local): tiny-chat\n"


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
