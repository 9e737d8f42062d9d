"""The README's tree of the code (between its ``layout`` markers) is the package's tree: every package and module
listed exists, and every one that exists is listed, so the picture a newcomer reads cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "first_jupyter"
INDENT = 2


def listed() -> set[str]:
    """The paths the README's tree names, relative to the repository root (folders end with ``/``)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- layout: begin -->\n```\n(.*?)```\n<!-- layout: end -->", text, re.S)
    assert block is not None, "README.md has no layout block between its markers"
    paths: set[str] = set()
    parents: list[str] = []
    for line in block.group(1).splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // INDENT
        words = line.split()
        names = [w for w in words if w.endswith(".py")] if all(w.endswith(".py") for w in words) else words[:1]
        del parents[depth:]
        prefix = "".join(parents)
        for name in names:
            paths.add(prefix + name)
        if names and names[0].endswith("/"):
            parents.append(names[0])
    return paths


def in_the_package() -> set[str]:
    """Every package (as a folder) and module of ``first_jupyter``, ``__init__`` modules apart."""
    found = {f"{PACKAGE}/"}
    for path in (ROOT / PACKAGE).rglob("*.py"):
        relative = path.relative_to(ROOT)
        if "labextension" in relative.parts:
            continue
        found.update(f"{'/'.join(relative.parts[:n])}/" for n in range(1, len(relative.parts)))
        if path.name != "__init__.py":
            found.add(relative.as_posix())
    return found


def test_every_module_is_in_the_readme_tree_and_nothing_else_is():
    tree = listed()
    package = {p for p in tree if p.startswith(f"{PACKAGE}/")}
    actual = in_the_package()
    assert sorted(actual - package) == [], "in the package, missing from README.md's tree"
    assert sorted(package - actual) == [], "in README.md's tree, not in the package"


def test_the_other_folders_it_names_exist():
    others = {p for p in listed() if not p.startswith(f"{PACKAGE}/")}
    assert others, "the tree names the repository's other folders too"
    assert [p for p in sorted(others) if not (ROOT / p).exists()] == []
