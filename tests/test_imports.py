"""The package's import graph, read from the source: no circles, nothing imports back up from ``opd_lens``, and the
library depends neither on the demo zoo nor (its locking) on the widgets."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import opd_lens

PACKAGE = Path(opd_lens.__file__).parent
LIBRARY = ("api", "charts", "checkpoints", "diagnostics", "engine", "locking", "schema", "store", "summary")


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's ``__init__``)."""
    out = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(PACKAGE.parent).with_suffix("").parts
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (file, package)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (functions included), relative imports
    resolved; ``from P import name`` counts as importing ``P.name`` when that is a module."""
    modules = _modules()
    graph = {}
    for name, (file, package) in modules.items():
        here = name if package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """The modules ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def dependents(graph: dict[str, set[str]], packages: tuple[str, ...], banned: str) -> dict[str, list[str]]:
    """Module of ``opd_lens.<packages>`` -> the modules of ``banned`` (a package) it reaches, where there are any."""

    def under(name: str, package: str) -> bool:
        return name == package or name.startswith(f"{package}.")

    modules = [m for m in sorted(graph) if any(under(m, f"opd_lens.{p}") for p in packages)]
    found = {m: sorted(w for w in reachable(graph, m) if under(w, banned)) for m in modules}
    return {m: ws for m, ws in found.items() if ws}


def test_reachable_follows_imports_through_other_modules():
    assert reachable({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, "a") == {"a", "b", "c"}
    assert reachable({"a": {"b"}, "b": set()}, "b") == set()
    assert dependents(
        {"opd_lens.x": {"opd_lens.y"}, "opd_lens.y": {"opd_lens.z.q"}, "opd_lens.z.q": set()}, ("x",), "opd_lens.z"
    ) == {"opd_lens.x": ["opd_lens.z.q"]}


def test_cycles_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert "opd_lens.checkpoints.reader" in graph["opd_lens.checkpoints.layouts"]  # the graph is read at all
    assert cycles(graph) == []


def test_nothing_imports_from_the_top_package():
    graph = import_graph()
    assert [name for name, edges in sorted(graph.items()) if "opd_lens" in edges and name != "opd_lens"] == []


def test_the_library_does_not_depend_on_the_demo_zoo():
    graph = import_graph()
    assert "opd_lens.zoo.retrain" in reachable(graph, "opd_lens.widgets.job")  # the check sees a dependency at all
    assert dependents(graph, LIBRARY, "opd_lens.zoo") == {}


def test_locking_does_not_depend_on_the_widgets():
    assert dependents(import_graph(), ("locking",), "opd_lens.widgets") == {}


def test_importing_the_package_or_its_nbconvert_exporter_loads_no_torch():
    """Every ``jupyter nbconvert`` loads the registered exporters: ours must not pull torch, pandas or the widgets."""
    heavy = ("torch", "pandas", "xarray", "anywidget", "opd_lens.api")
    script = f"import sys, opd_lens, opd_lens.nbconvert; print([m for m in {heavy!r} if m in sys.modules])"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
    assert opd_lens.Store.__module__ == "opd_lens.api" and opd_lens.checkpoints.__name__ == "opd_lens.checkpoints"
