"""No import cycles among sqlm's modules, found statically (no module is imported).

Every ``import`` / ``from ... import`` anywhere in a module counts: at the top, in a function (a lazy
import), under ``if TYPE_CHECKING:``. A cycle of lazy imports works today only as long as no one
moves an import to the top of its file, and it means two modules that cannot be read, tested or
split apart alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest


PACKAGE = Path(__file__).resolve().parents[1] / "sqlm"

# Cycles that are known and allowed, each as the sorted modules of its strongly connected component,
# with the reason it stays. Keep this empty: a new entry needs a reason and an issue to remove it.
ALLOWED_CYCLES: dict[tuple[str, ...], str] = {}


def module_names(package: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file under ``package`` (a package is named by
    its ``__init__.py``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _nearest_module(name: str, modules: dict[str, Path]) -> str | None:
    """``name`` if it is one of ``modules``, else its nearest enclosing one (``sqlm.data.X`` ->
    ``sqlm.data``); None outside them."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute names one import statement in ``module`` loads: ``import a.b`` -> ``a.b``;
    ``from .x import y`` -> ``<package>.x.y`` (a submodule, or an attribute of ``<package>.x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [f"{base}.{alias.name}" for alias in node.names]


def _ancestors(module: str) -> set[str]:
    """The packages enclosing ``module`` (``a.b.c`` -> ``{a, a.b}``)."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def dependencies(name: str, module: str, modules: dict[str, Path]) -> set[str]:
    """The modules that loading ``name`` from ``module`` runs: the module ``name`` is or is defined in,
    and the packages enclosing it, except ``module``'s own (Python loads those before ``module``)."""
    target = _nearest_module(name, modules)
    if target is None:
        return set()
    outer = {p for p in _ancestors(target) if p in modules} - _ancestors(module)
    return ({target} | outer) - {module}


def import_graph(package: Path) -> dict[str, set[str]]:
    """``{module: the modules of the package it imports}``, from every import statement of each file.
    ``from p import x`` depends on the submodule ``p.x`` where there is one, else on ``p`` itself (an
    attribute of ``p``, even when ``p`` encloses the importing module)."""
    modules = module_names(package)
    graph = {}
    for module, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in imported_names(node, module, path.name == "__init__.py"):
                    deps |= dependencies(name, module, modules)
        graph[module] = deps
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components of more than one module (each a set of modules that import
    each other, directly or not), each sorted; Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(tuple(sorted(component)))
    return sorted(out)


def one_cycle(graph: dict[str, set[str]], component: tuple[str, ...]) -> list[str]:
    """A shortest import path from the component's first module back to itself, inside the component
    (``[a, b, a]``: a imports b, b imports a), to name the cycle in a failure."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for m in frontier:
            for dep in sorted(graph[m] & members):
                if dep == start:
                    return paths[m] + [start]
                if dep not in paths:
                    paths[dep] = paths[m] + [dep]
                    nxt.append(dep)
        frontier = nxt
    raise AssertionError(f"{component} is not a cycle")


def test_sqlm_has_no_import_cycles():
    graph = import_graph(PACKAGE)
    assert "sqlm.trainer" in graph and "sqlm.rewards.registry" in graph  # the walk found the package
    new = [c for c in strongly_connected(graph) if c not in ALLOWED_CYCLES]
    assert not new, "import cycle(s) in sqlm/: " + "; ".join(" -> ".join(one_cycle(graph, c)) for c in new)
    stale = [c for c in ALLOWED_CYCLES if c not in strongly_connected(graph)]
    assert not stale, f"allowed cycles that no longer exist (remove them from ALLOWED_CYCLES): {stale}"


def test_the_schema_module_is_a_leaf():
    """The column names are shared by data loading, the reward cache and the trainer: they import
    nothing from sqlm, so every one of those can read them without importing the others."""
    assert import_graph(PACKAGE)["sqlm.columns"] == set()


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.mark.parametrize(
    "files, cycle",
    [
        # top-level relative imports
        ({"a.py": "from .b import x\n", "b.py": "from .a import y\n"}, ["pkg.a", "pkg.b", "pkg.a"]),
        # a lazy (function-level) import closes the cycle; absolute and two-dot relative imports
        (
            {"a.py": "import pkg.sub.c\n", "sub/__init__.py": "", "sub/c.py": "def f():\n    from .. import a\n"},
            ["pkg.a", "pkg.sub.c", "pkg.a"],
        ),
        # through a package's __init__ (a name it defines, not a submodule)
        (
            {"__init__.py": "from .a import f\n", "a.py": "def f():\n    from pkg import VERSION\n"},
            ["pkg", "pkg.a", "pkg"],
        ),
        # a longer loop, under TYPE_CHECKING
        (
            {
                "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
                "b.py": "from . import c\n",
                "c.py": "from .a import A\n",
            },
            ["pkg.a", "pkg.b", "pkg.c", "pkg.a"],
        ),
    ],
)
def test_the_checker_finds_cycles(tmp_path, files, cycle):
    files = {f"pkg/{k}": v for k, v in {"__init__.py": "", **files}.items()}
    graph = import_graph(_write(tmp_path, files))
    (component,) = strongly_connected(graph)
    assert one_cycle(graph, component) == cycle


def test_the_checker_passes_what_is_not_a_cycle(tmp_path):
    """A submodule imported through its package (``from . import b``), a module importing its own
    package's submodules, and imports from outside the package are no cycles."""
    files = {
        "pkg/__init__.py": "import os\nfrom .a import f\n",
        "pkg/a.py": "from . import b\nimport torch\ndef f():\n    from .b import g\n",
        "pkg/b.py": "import pkg.c\n",
        "pkg/c.py": "",
    }
    graph = import_graph(_write(tmp_path, files))
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.c"}, "pkg.c": set()}
    assert strongly_connected(graph) == []
