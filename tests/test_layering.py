"""The house reads bottom-up: no import circles, and the kernels never import the package they serve.

The graph is read from the source with ``ast`` (every ``import``, also inside functions): an edge goes from a
module to each module it names (``from pkg import sub`` names ``pkg.sub`` when that is a module).
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, List, Set

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = {"megatron_lighthouse": ROOT / "megatron_lighthouse", "lighthouse_kernels": ROOT / "kernels" /
            "lighthouse_kernels"}


def _modules() -> Dict[str, pathlib.Path]:
    found = {}
    for package, directory in PACKAGES.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _imports(name: str, path: pathlib.Path, modules: Dict[str, pathlib.Path]) -> Set[str]:
    """The project modules ``name`` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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


def test_the_import_graph_has_no_circles():
    graph = _graph()
    assert len(graph) > 30 and "megatron_lighthouse.attention" in graph["megatron_lighthouse.core_attention"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_kernels_import_nothing_of_the_library():
    graph = _graph()
    kernels = [name for name in graph if name.startswith("lighthouse_kernels")]
    assert len(kernels) >= 6
    assert {name: sorted(t for t in graph[name] if t.startswith("megatron_lighthouse")) for name in kernels} == {
        name: [] for name in kernels}


def _rebound_imports(path: pathlib.Path) -> List[str]:
    """Names a module imports at its top level and then defines again there (a ``def``, ``class`` or assignment):
    the later binding silently replaces the import for every caller below it."""
    imported, out = set(), []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {(alias.asname or alias.name).partition(".")[0] for alias in node.names}
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out += [node.name] if node.name in imported else []
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            out += [t.id for t in targets if isinstance(t, ast.Name) and t.id in imported]
    return out


def test_no_module_redefines_a_name_it_imports():
    sources = [*_modules().values(), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "patches").glob("*.py")]
    found = {str(path.relative_to(ROOT)): names for path in sources if (names := _rebound_imports(path))}
    assert not found, found
