"""The package's import graph is layered and acyclic (parsed with ``ast``; nothing is imported).

Layers, lowest first: models/data <- gradients <- defenses <- attacks <- evaluation <- front ends,
with analysis on top. A module may import its own layer or lower ones, never a higher one, and no
import chain may loop. Every import counts, also one inside a function: a lazy import hides a
dependency from start-up time, not from the design.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

PACKAGE = "rfd"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# A module's layer is that of its longest dotted prefix listed here (a package covers its
# submodules). Some entries do not exist yet; they are placed ahead so they land deliberately.
LAYERS: dict[str, int] = {
    "rfd.models": 0,
    "rfd.data": 0,
    "rfd.rng": 0,
    "rfd.dct": 0,
    "rfd.paper": 0,
    "rfd.checks": 0,
    "rfd.tensors": 0,
    "rfd.gradients": 1,
    "rfd.classifier": 1,
    "rfd.defenses": 2,
    "rfd.attacks": 3,
    "rfd.metrics": 0,  # pure functions of records, used by the attacks' results and reports
    "rfd.evaluation": 4,
    "rfd.report": 4,
    "rfd.settings": 5,
    "rfd.runs": 5,
    "rfd.cli": 5,
    "rfd.runner": 5,
    "rfd.analysis": 6,
}

# Below the analysis: these never import rfd.analysis (it is the consumer of their results).
NO_ANALYSIS = ("rfd.defenses", "rfd.attacks", "rfd.models", "rfd.data")

Edge = tuple[str, str, str]  # (importer, imported, "path:line")


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` below ``root`` (``__init__`` = the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def is_package(module: str, files: dict[str, Path]) -> bool:
    return files[module].name == "__init__.py"


def _resolve(name: str, known: Iterable[str]) -> str:
    """The module an import of ``name`` runs: ``name`` itself or its longest known prefix."""
    known = set(known)
    parts = name.split(".")
    for i in range(len(parts), 1, -1):  # never fall back to the bare facade for a deeper name
        if ".".join(parts[:i]) in known:
            return ".".join(parts[:i])
    return name  # the facade itself, or a module that is not on disk


def imports_of(module: str, source: str, files: dict[str, Path], where: str = "") -> list[Edge]:
    """Every import of a package module in ``source``, module level or nested, as edges."""
    edges: list[Edge] = []
    package = module if module in files and is_package(module, files) else module.rpartition(".")[0]

    def add(target: str, node: ast.stmt) -> None:
        edge = (module, target, f"{where}:{node.lineno}")
        if target != module and edge not in edges:
            edges.append(edge)

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(_resolve(alias.name, files), node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: climb from the importing module's package
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in files else _resolve(base, files), node)
    return edges


def import_graph(files: dict[str, Path] | None = None) -> list[Edge]:
    files = module_files() if files is None else files
    edges = []
    for module, path in files.items():
        rel = path.relative_to(ROOT.parent).as_posix()
        edges += imports_of(module, path.read_text(encoding="utf-8"), files, rel)
    return edges


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if (layer := LAYERS.get(".".join(parts[:i]))) is not None:
            return layer
    return None


def _fmt(edges: Iterable[Edge]) -> str:
    return "\n".join(f"  {a} -> {b}  ({where})" for a, b, where in sorted(set(edges)))


def _components(edges: list[Edge]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, list[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        m = stack.pop()
                        comp.add(m)
                        if m == node:
                            break
                    if len(comp) > 1:
                        out.append(comp)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                work.append((child, iter(graph[child])))
            elif child in stack:
                low[node] = min(low[node], index[child])
    return out


def find_cycles(edges: list[Edge], files: dict[str, Path]) -> list[list[Edge]]:
    """The edges of every import cycle, one list per group of modules that import each other.

    The facade ``rfd`` is left out (it re-exports lazily). A cycle that stays inside one package
    and passes through its ``__init__`` is package assembly (``__init__`` imports its
    submodules, a submodule imports a name from its package): within such a group the edges from
    the ``__init__`` to its own submodules are dropped and the rest is checked again. A cycle
    that leaves the package (another module imports the package, whose ``__init__`` imports a
    submodule that imports that module back) is a real one and is reported.
    """
    edges = [e for e in edges if PACKAGE not in (e[0], e[1])]
    loops = []
    for comp in _components(edges):
        inner = [e for e in edges if e[0] in comp and e[1] in comp]
        owner = [
            p
            for p in comp
            if p in files
            and is_package(p, files)
            and all(m == p or m.startswith(p + ".") for m in comp)
        ]
        if owner:
            p = owner[0]
            loops += find_cycles([e for e in inner if not (e[0] == p and e[1] != p)], files)
        else:
            loops.append(inner)
    return loops


# --------------------------------------------------------------------------- the parser itself


def test_parser_sees_every_kind_of_import():
    files = {m: Path(f"/x/{m}.py") for m in ("rfd.a", "rfd.a.b", "rfd.a.c", "rfd.d", "rfd.e")}
    files["rfd.a"] = Path("/x/rfd/a/__init__.py")
    src = """
import os
import rfd
import rfd.d
from rfd import e, create_model
from rfd.a import b
from rfd.a.c import thing
from . import c
from .c import other
from .. import d
def lazy():
    from rfd.e import later
    import torch
"""
    got = {(a, b) for a, b, _ in imports_of("rfd.a.b", src, files)}
    assert got == {
        ("rfd.a.b", "rfd"),  # the facade: `import rfd` and `from rfd import create_model`
        ("rfd.a.b", "rfd.d"),
        ("rfd.a.b", "rfd.e"),
        ("rfd.a.b", "rfd.a.c"),
    }, got
    # from a package's __init__, "." is the package itself; `from rfd.a import x` is the package
    got = {(a, b) for a, b, _ in imports_of("rfd.a", "from . import c\nfrom .c import y", files)}
    assert got == {("rfd.a", "rfd.a.c")}
    got = {(a, b) for a, b, _ in imports_of("rfd.d", "from rfd.a import helper", files)}
    assert got == {("rfd.d", "rfd.a")}


def test_cycle_finder_reports_the_loop_and_skips_package_assembly():
    files = {"rfd.p": Path("/x/rfd/p/__init__.py"), "rfd.p.q": Path("/x/q.py")}
    files |= {"rfd.r": Path("/x/r.py")}
    edges = [("rfd.p", "rfd.p.q", ""), ("rfd.p.q", "rfd.p", "")]  # package assembly: fine
    assert find_cycles(edges, files) == []
    edges += [("rfd.p.q", "rfd.r", "q:1"), ("rfd.r", "rfd.p.q", "r:2")]
    assert [{(a, b) for a, b, _ in loop} for loop in find_cycles(edges, files)] == [
        {("rfd.p.q", "rfd.r"), ("rfd.r", "rfd.p.q"), ("rfd.p", "rfd.p.q"), ("rfd.p.q", "rfd.p")}
    ]
    # leaving the package through its __init__ is a real cycle: r imports p, p's __init__
    # imports q, q imports r
    edges = [("rfd.r", "rfd.p", "r:1"), ("rfd.p", "rfd.p.q", "p:1"), ("rfd.p.q", "rfd.r", "q:1")]
    assert len(find_cycles(edges, files)) == 1


# --------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def files() -> dict[str, Path]:
    return module_files()


@pytest.fixture(scope="module")
def edges(files: dict[str, Path]) -> list[Edge]:
    return import_graph(files)


def test_the_graph_is_read(edges: list[Edge]):
    # guards against a parser that silently finds nothing
    pairs = {(a, b) for a, b, _ in edges}
    assert ("rfd.defenses.api", "rfd.defenses.autolayer") in pairs
    assert ("rfd.defenses.autolayer", "rfd.gradients") in pairs
    assert ("rfd.analysis.autolayer", "rfd.defenses.autolayer") in pairs


def test_every_module_has_a_layer(files: dict[str, Path]):
    missing = sorted(m for m in files if m != PACKAGE and layer_of(m) is None)
    assert not missing, (
        f"modules without a layer: {missing}. Assign each one in LAYERS in "
        "tests/test_architecture.py, deliberately: the lowest layer whose modules it needs."
    )


def test_no_import_cycles(edges: list[Edge], files: dict[str, Path]):
    loops = find_cycles(edges, files)
    assert not loops, "import cycles:\n" + "\n\n".join(_fmt(loop) for loop in loops)


def test_no_module_imports_a_higher_layer(edges: list[Edge]):
    # `import rfd` reaches everything the facade re-exports: it counts as its highest layer.
    facade = max((layer_of(b) or 0) for a, b, _ in edges if a == PACKAGE)
    bad = []
    for a, b, where in edges:
        if a == PACKAGE:
            continue
        la, lb = layer_of(a), (facade if b == PACKAGE else layer_of(b))
        if la is not None and lb is not None and lb > la:
            bad.append((f"{a} [layer {la}]", f"{b} [layer {lb}]", where))
    assert not bad, "imports of a higher layer:\n" + _fmt(bad)


def test_nothing_below_the_analysis_imports_it(edges: list[Edge]):
    bad = [
        e
        for e in edges
        if any(e[0] == p or e[0].startswith(p + ".") for p in NO_ANALYSIS)
        and (e[1] == "rfd.analysis" or e[1].startswith("rfd.analysis."))
    ]
    assert not bad, "rfd.analysis imported from below it:\n" + _fmt(bad)


def test_gradients_needs_only_torch_the_stdlib_and_models(files: dict[str, Path]):
    # rfd.gradients serves both the defenses (layers="auto") and the analysis: it stays low
    tree = ast.parse(files["rfd.gradients"].read_text(encoding="utf-8"))
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level:
            tops.add(node.module or "")
    allowed = {"torch", "__future__", *sys.stdlib_module_names}
    bad = sorted(m for m in tops if m != "rfd.models" and m.split(".")[0] not in allowed)
    assert not bad, f"rfd.gradients imports {bad}; only torch, the stdlib and rfd.models"
