"""What the package imports, it declares: a module imported from a distribution that pyproject.toml does not name
works here only because something else happened to install it, and fails in a leaner environment."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
BROUGHT_BY = {
    "globus_compute_common": "globus-compute-sdk",  # its own models, which the SDK's answers are made of
    "parsl": "globus-compute-endpoint",  # the engine the local extra's endpoint runs on
    "tokenizers": "transformers",  # the local extra's, for the tiny model built on the spot
    "torch": "transformers",  # installed on its own before the local extra (a CPU wheel; see README)
}
"""Imported modules that come with a declared requirement rather than being one (the requirement named)."""


def _imported(package: Path) -> dict[str, set[str]]:
    """Top-level modules imported anywhere in ``package`` (at module level or inside functions), and where."""
    found: dict[str, set[str]] = {}
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.partition(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_third_party_import_is_a_declared_requirement():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values()
                                                for r in extra)]
    declared = {canonicalize_name(Requirement(text).name) for text in requirements}
    assert set(map(canonicalize_name, BROUGHT_BY.values())) <= declared
    distributions = importlib.metadata.packages_distributions()
    undeclared = {}
    for module, where in _imported(ROOT / "first_jupyter").items():
        if module in sys.stdlib_module_names or module == "first_jupyter" or module in BROUGHT_BY:
            continue
        names = {canonicalize_name(name) for name in distributions.get(module, [module])}
        if not names & declared:
            undeclared[module] = sorted(where)
    assert undeclared == {}
