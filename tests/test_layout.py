"""The layout's rules, checked on the source (DESIGN section 3):

- no import cycles between the package's modules: none at module level, and none even
  through the imports inside functions or under ``TYPE_CHECKING``;
- rank-side modules import nothing from the parent side (nor the pytest glue);
- no kind-name comparisons outside the fault kinds (capabilities, not names);
- no private names used across modules.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pytest_ddpfault.faults import KINDS

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_ddpfault"
# What runs inside the processes the harness starts, and what those import.
RANK_SIDE = ("pytest_ddpfault.rank",)
PARENT_SIDE = ("pytest_ddpfault.parent", "pytest_ddpfault.launchers", "pytest_ddpfault.plugin",
               "pytest_ddpfault.api", "pytest_ddpfault.toxiproxy", "pytest_ddpfault.strategies",
               "pytest_ddpfault.settings")


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


MODULES = _modules()


def _imports(name: str, tree: ast.Module, top_level_only: bool) -> set[str]:
    """Package modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also inside if/try at module level, not inside functions or TYPE_CHECKING
        nodes = [n for stmt in tree.body if not (isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test))
                 for n in ([stmt] if not isinstance(stmt, (ast.If, ast.Try)) else list(ast.walk(stmt)))]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycles():
    graph = {name: _imports(name, tree, top_level_only=True) - {"pytest_ddpfault"} for name, tree in MODULES.items()}
    # a package importing its own submodules (to register them) is how packages work
    graph = {n: {d for d in deps if not d.startswith(n + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def _every_import(name: str, tree: ast.Module) -> set[str]:
    """Package modules ``name`` imports anywhere (in functions, under ``TYPE_CHECKING`` too),
    each resolved to the module it names: ``from pkg import mod`` is ``pkg.mod``, ``from pkg
    import name`` is ``pkg`` (the package itself, ``import pytest_ddpfault`` included)."""
    package = name if (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists() else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{module}" if module else base
            found.update(f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module for a in node.names)
    return {m for m in found if m in MODULES and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected parts of ``graph`` with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            part = []
            while not part or part[-1] != node:
                part.append(stack.pop())
            if len(part) > 1:
                found.append(sorted(part))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return found


def test_no_import_cycles_even_through_lazy_imports():
    """A lazy import only hides a cycle: the parts still cannot be read, tested or moved
    apart (issue 20 §6 broke the last three: results <-> timeline, faults.base <-> faults.spec,
    rank.hooks -> the package -> parent.run -> rank.hooks)."""
    graph = {name: _every_import(name, tree) for name, tree in MODULES.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_imports_inside_functions():
    lazy = ast.parse("def f():\n    from pytest_ddpfault import results, faults\n    import pytest_ddpfault\n"
                     "    from pytest_ddpfault.faults import Fault\n")
    assert _every_import("pytest_ddpfault.frames", lazy) == {
        "pytest_ddpfault.results", "pytest_ddpfault.faults", "pytest_ddpfault"}
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}) == [["a", "b", "c"]]


def test_rank_side_imports_nothing_of_the_parent_side():
    """Also not through the shared modules it imports (ipc, faults, results...): their
    module-level imports count (a lazy import in a function the rank never calls, such as
    the package's ``run_group``, does not)."""
    bad = []
    todo = [n for n in MODULES if n.startswith(RANK_SIDE)]
    seen = set(todo)
    while todo:
        name = todo.pop()
        for dep in _imports(name, MODULES[name], top_level_only=not name.startswith(RANK_SIDE)):
            if dep.startswith(PARENT_SIDE):
                bad.append(f"{name} imports {dep}")
            elif dep not in seen:
                seen.add(dep)
                todo.append(dep)
    assert not bad, bad


def test_no_kind_name_comparisons_outside_the_kinds():
    names = set(KINDS)
    bad = []
    for name, tree in MODULES.items():
        if name.startswith("pytest_ddpfault.faults"):
            continue
        for node in ast.walk(tree):
            compared = []
            if isinstance(node, ast.Compare):
                compared = [node.left, *node.comparators]
            elif isinstance(node, ast.keyword) and node.arg == "kind":
                compared = [node.value]
            if any(isinstance(c, ast.Constant) and c.value in names for c in compared):
                bad.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, bad


def test_no_private_names_across_modules():
    bad = []
    for name, tree in MODULES.items():
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pytest_ddpfault"):
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__"):
                        bad.append(f"{name}: from {node.module} import {a.name}")
                    if f"{node.module}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("pytest_ddpfault") and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__"):
                bad.append(f"{name}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert not bad, bad
