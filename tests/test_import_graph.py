"""The import graph of ``first_jupyter``: no circle at run time, and at most one through imports made only for
type checking (``if TYPE_CHECKING:``), so that the package reads in layers: the domain under the doors, plumbing
under the domain.

Imports are read with ``ast`` from the source, as Python would resolve them (relative ones included, and the
packages whose ``__init__`` an import runs first): the module level, and the blocks at module level (``if``,
``try``). Imports inside functions are lazy on purpose (a kernel's
``%load_ext`` must stay light) and run only when called, so they are no part of the graph a module is loaded in.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import first_jupyter

PACKAGE = Path(first_jupyter.__file__).parent
NAME = PACKAGE.name


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _is_type_checking(test: ast.expr) -> bool:
    return "TYPE_CHECKING" in ast.unparse(test)


def _top_imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Each import at module level, and whether it is made only for type checking."""
    def walk(body: list[ast.stmt], typing_only: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node, typing_only
            elif isinstance(node, ast.If):
                yield from walk(node.body, typing_only or _is_type_checking(node.test))
                yield from walk(node.orelse, typing_only)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                    yield from walk(block, typing_only)
    yield from walk(tree.body, False)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The package's modules an import loads: a name imported from a package is its submodule where one exists."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".")
            if MODULES[module].name != "__init__.py":
                package = package[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join([*package, base] if base else package)
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        # importing a module runs its packages' __init__ first (``gateway.stream_watch`` loads ``gateway``)
        for loaded in [*_packages_of(name), name] if name else ():
            if loaded != module and not module.startswith(f"{loaded}."):
                yield loaded


def _packages_of(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """The edges at run time, and those made only for type checking."""
    runtime: dict[str, set[str]] = {m: set() for m in MODULES}
    typing: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for node, typing_only in _top_imports(ast.parse(path.read_text(), str(path))):
            (typing if typing_only else runtime)[module].update(_targets(module, node))
    return runtime, typing


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_itself_back_at_run_time():
    runtime, _ = import_graph()
    assert circles(runtime) == []


def test_at_most_one_circle_through_imports_for_type_checking_only():
    """The one allowed: the gateway's batches and the batch runner's gateway, each named in the other's types
    (the composition root builds both; neither loads the other's module)."""
    runtime, typing = import_graph()
    both = {module: runtime[module] | typing[module] for module in runtime}
    assert len(circles(both)) <= 1, circles(both)


def test_the_graph_is_read_as_python_resolves_imports():
    """Relative imports, names imported from a package, and blocks under TYPE_CHECKING read as intended."""
    runtime, typing = import_graph()
    assert f"{NAME}.gateway.core" in runtime[f"{NAME}.api.door_kit"]
    assert f"{NAME}.protocol" in runtime[f"{NAME}.gateway.core"]
    assert f"{NAME}.gateway.caller" in typing[f"{NAME}.api.route_table"]
    assert f"{NAME}.gateway" in runtime[f"{NAME}.batch.offload"]  # (gateway.stream_watch: its package runs first)
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
