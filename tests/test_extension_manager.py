"""What JupyterLab's extension manager needs to find the package: it searches PyPI for the trove classifiers of
prebuilt JupyterLab 4 extensions, and npm-style keywords name the labextension."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_classifiers_the_extension_manager_searches_for():
    assert {"Framework :: Jupyter", "Framework :: Jupyter :: JupyterLab", "Framework :: Jupyter :: JupyterLab :: 4",
            "Framework :: Jupyter :: JupyterLab :: Extensions",
            "Framework :: Jupyter :: JupyterLab :: Extensions :: Prebuilt"} <= set(PROJECT["classifiers"])


def test_the_python_versions_classified_are_those_required():
    minor = int(PROJECT["requires-python"].removeprefix(">=3."))
    classified = [c.rsplit(".", 1)[1] for c in PROJECT["classifiers"] if c.startswith("Programming Language :: "
                                                                                      "Python :: 3.")]
    assert str(minor) in classified
    assert all(int(v) >= minor for v in classified)


def test_license_keywords_and_urls_are_declared():
    assert PROJECT["license"] == json.loads((ROOT / "labextension" / "package.json").read_text())["license"]
    assert {"jupyter", "jupyterlab", "jupyterlab-extension"} <= set(PROJECT["keywords"])
    assert all(url.startswith("https://") for url in PROJECT["urls"].values())


def test_the_labextension_names_its_keywords():
    package = json.loads((ROOT / "labextension" / "package.json").read_text())
    assert {"jupyter", "jupyterlab", "jupyterlab-extension"} <= set(package["keywords"])
