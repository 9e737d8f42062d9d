"""The JupyterLab sidebar as users get it: prebuilt inside the wheel, and enabled in this environment.

Its behaviour in a browser is tested in tests/ui (Playwright in Chromium), its data logic in labextension/test.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hatchling.builders.wheel import WheelBuilder

ROOT = Path(__file__).resolve().parents[1]
SHARE = "share/jupyter/labextensions/first-jupyter"
ENABLED = re.compile(r"first-jupyter v\d+\.\d+\.\d+\S* \S*enabled\S* \S*OK")


def _labextensions(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "jupyterlab.labextensions", "list"], env=env, text=True,
                          capture_output=True, timeout=300, check=True)
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (built,) = WheelBuilder(str(ROOT)).build(directory=str(tmp_path_factory.mktemp("dist")), versions=["standard"])
    return Path(built)


def test_the_wheel_carries_the_prebuilt_extension_with_its_settings_schema(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    data = f"first_jupyter-{wheel.name.split('-')[1]}.data/data/{SHARE}"
    assert f"{data}/package.json" in names
    assert f"{data}/install.json" in names
    assert f"{data}/schemas/first-jupyter/plugin.json" in names
    assert any(re.fullmatch(rf"{re.escape(data)}/static/remoteEntry\.[0-9a-f]+\.js", n) for n in names)


def test_the_installed_wheel_is_listed_enabled_and_ok_without_node(wheel, tmp_path):
    """Installed from the wheel into a prefix of its own, with no Node on PATH: JupyterLab lists it as a
    prebuilt extension of the Python package. (``--ignore-installed``: else pip would first uninstall this
    environment's own copy.)"""
    prefix = tmp_path / "prefix"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed",
                    "--prefix", str(prefix), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "JUPYTER_PATH": str(prefix / "share/jupyter"), "PATH": str(Path(sys.executable).parent),
           "NO_COLOR": "1"}
    listing = _labextensions(env)
    section = listing.split(str(prefix / "share/jupyter/labextensions"), 1)
    assert len(section) == 2, listing
    assert re.search(ENABLED.pattern + r"\S* \(python, first-jupyter\)", section[1]), listing


def test_this_environment_has_the_extension_enabled_and_ok():
    """What scripts/setup.sh leaves (the build linked into .venv) is what JupyterLab loads."""
    assert ENABLED.search(_labextensions({**os.environ, "NO_COLOR": "1"}))
