"""The shape of the code, checked from its import statements (no import is executed).

Every ``import`` counts, at module level or inside a function: a lazy import is still a dependency, and a cycle
through one is still a knot a reader has to untangle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = [ROOT / "ophav_core", *sorted(p for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").is_file())]


def _module_name(path: Path) -> str:
    base = ROOT if path.is_relative_to(ROOT / "ophav_core") else ROOT / "plugins"
    parts = list(path.relative_to(base).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for folder in PACKAGE_DIRS for path in folder.rglob("*.py")}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules that ``path`` imports: ``from a.b import c`` counts as ``a.b.c`` when that is a module,
    else as ``a.b``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` where only `a.b` is ours, say
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
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


def _is_parent_package_edge(a: str, b: str) -> bool:
    # A package's __init__ re-exporting its own submodules, and a submodule importing a sibling through the
    # package, is how Python packages are built, not a knot between two parts.
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = {a: {b for b in targets if not _is_parent_package_edge(a, b)} for a, targets in _graph().items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles (each a set of modules that import each other):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles)


def test_plugins_import_only_the_core_and_themselves():
    modules = _modules()
    offenders = []
    for name, path in modules.items():
        if name.startswith("ophav_core"):
            continue
        own = name.split(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for target in names:
                top = target.split(".")[0]
                if top.startswith("ophav_") and top not in (own, "ophav_core"):
                    offenders.append(f"{name} imports {target}")
    assert not offenders, "plugins depend on the core's contracts only:\n" + "\n".join(offenders)


def test_core_never_imports_a_plugin_or_study_code_the_cli():
    graph = _graph()
    plugin_tops = {p.name for p in PACKAGE_DIRS if p.name != "ophav_core"}
    bad = []
    for name, targets in graph.items():
        if not name.startswith("ophav_core"):
            continue
        for target in targets:
            if target.split(".")[0] in plugin_tops:
                bad.append(f"{name} imports the plugin {target}")
            if target.startswith("ophav_core.cli") and not name.startswith("ophav_core.cli"):
                bad.append(f"{name} imports the command line ({target})")
    assert not bad, "\n".join(bad)
