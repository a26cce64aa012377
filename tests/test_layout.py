"""The import layout of src/: no module imports, directly or through others, a module that imports it.

Read with ``ast``, without importing anything: every ``import`` statement of every module under
``src/vectorfit`` and ``src/vectorfit_recipes`` counts as an arrow, also one inside a function (a lazy
import) or under ``if TYPE_CHECKING:``. The graph must have no cycle; the library must never import
the recipes; and the tuner layer knows only torch and peft's tuner-layer base class.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGES = ("vectorfit", "vectorfit_recipes")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's ``__init__``)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((SRC / pkg).rglob("*.py")):
            parts = list(path.relative_to(SRC).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            if is_pkg:
                parts = parts[:-1]
            out[".".join(parts)] = (path, is_pkg)
    return out


def _imported(module: str, is_pkg: bool, node: ast.AST) -> list[str]:
    """The absolute names an import statement of ``module`` reads: for ``from X import a`` the
    submodule ``X.a`` where it is one of ours, else ``X``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = module.split(".") if is_pkg else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [f"{target}.{a.name}" for a in node.names]


def _scan() -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(module -> {our module it imports: line}, module -> {other absolute name it imports: line})."""
    mods = _modules()
    ours: dict[str, dict[str, int]] = {}
    other: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in mods.items():
        ours[name], other[name] = {}, {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for full in _imported(name, is_pkg, node):
                target = full
                while target not in mods and "." in target:  # vectorfit.config.VectorFitConfig -> vectorfit.config
                    target = target.rsplit(".", 1)[0]
                if target in mods:
                    if target != name:
                        ours[name].setdefault(target, node.lineno)
                else:
                    other[name].setdefault(full, node.lineno)
    return ours, other


def _tangles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan): each module of one
    reaches every other, so each lies on a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(old)
    return comps


def _one_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """A path start -> ... -> start inside the component ``comp`` (breadth-first, so a shortest one)."""
    start, members = comp[0], set(comp)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [*reversed(path), start]
                if w not in came_from:
                    came_from[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle found in component {comp}")


def _describe(graph: dict[str, dict[str, int]], comp: list[str]) -> str:
    """One cycle through ``comp``, then every arrow between its modules (file and line of each)."""
    mods, members = _modules(), set(comp)
    steps = [f"  {a} -> {b}   ({mods[a][0].relative_to(SRC.parent)}:{line})"
             for a in comp for b, line in sorted(graph[a].items()) if b in members]
    return " -> ".join(_one_cycle(graph, comp)) + "\n" + "\n".join(steps)


def _closure(graph: dict[str, dict[str, int]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_the_scan_sees_imports():
    """The scan finds arrows of every kind, so that an empty list of cycles means something."""
    ours, other = _scan()
    assert "vectorfit.layer" in ours["vectorfit.model"]  # from .layer import ...
    assert "vectorfit.tasks" in ours["vectorfit.model"]  # from . import tasks
    assert "vectorfit.loading" in ours["vectorfit.model"]  # inside a function
    assert "vectorfit.avf" in ours["vectorfit.integrations.trainer"]  # from ..avf import ...
    assert "vectorfit.config" in ours["vectorfit.tasks"]  # under TYPE_CHECKING
    assert "vectorfit_recipes.generate_cli" in ours["vectorfit_recipes.cli"]
    assert any(n.split(".")[0] == "vectorfit" for n in ours["vectorfit_recipes.train"])  # the library, from the recipes
    assert any(n.startswith("torch") for n in other["vectorfit.layer"])


def test_no_import_cycles():
    ours, _ = _scan()
    tangles = _tangles(ours)
    assert not tangles, "import cycles in src/ (move what both sides need into a module both import):\n" + "\n".join(
        _describe(ours, t) for t in tangles
    )


def test_the_cycle_finder():
    """The cycle finder itself, on small graphs."""
    assert _tangles({"a": {"b": 1}, "b": {"c": 1}, "c": {}}) == []
    g = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert _tangles(g) == [["a", "b", "c"]]
    assert _one_cycle(g, ["a", "b", "c"]) == ["a", "b", "c", "a"]
    g = {"a": {"b": 1, "c": 1}, "b": {"a": 1}, "c": {"a": 1}}
    assert _tangles(g) == [["a", "b", "c"]]
    assert _one_cycle(g, ["a", "b", "c"]) == ["a", "b", "a"]


#: ``python -m vectorfit`` is the ``vectorfit`` command, whose code is the recipes' CLI (as the console
#: script ``vectorfit = vectorfit_recipes.cli:main`` is): a script that nothing imports, not library code.
ENTRY_POINTS = {"vectorfit.__main__"}


def test_the_library_never_imports_the_recipes():
    ours, other = _scan()
    bad = [f"{m} -> {t}" for m in ours if m.split(".")[0] == "vectorfit" and m not in ENTRY_POINTS
           for t in [*ours[m], *other[m]] if t.split(".")[0] == "vectorfit_recipes"]
    assert not bad, "src/vectorfit imports vectorfit_recipes:\n" + "\n".join(bad)
    assert not [m for m in ours if ENTRY_POINTS & set(ours[m])], "an entry point is imported as a module"


def test_the_layer_knows_only_torch():
    """vectorfit/layer.py and what it imports of ours: torch, the standard library and peft's
    tuner-layer base (``peft.tuners.tuners_utils``); never transformers, nor the tuner model side
    (``vectorfit.model``, ``vectorfit.adapters``)."""
    ours, other = _scan()
    reached = _closure(ours, "vectorfit.layer")
    forbidden = reached & {"vectorfit.model", "vectorfit.adapters", "vectorfit"}  # the package imports the model
    assert not forbidden, f"vectorfit.layer imports, directly or through {sorted(reached - forbidden)}: {sorted(forbidden)}"
    allowed = set(sys.stdlib_module_names) | {"torch"}
    bad = []
    for m in sorted(reached):
        for name, line in other[m].items():
            top = name.split(".")[0]
            if top in allowed or name.startswith("peft.tuners.tuners_utils."):
                continue
            bad.append(f"{m} (line {line}) imports {name}")
    assert not bad, "the tuner layer must know only torch (and peft's BaseTunerLayer):\n" + "\n".join(bad)
