"""Every name of the package that README.md or a docstring shows exists.

README's ``pytest_ddpfault.X`` names and ``from pytest_ddpfault... import ...`` lines are
imported; so are the package's docstrings' full names, and their short ````module.name````
and ````rank/oplog.py```` references to its own modules (a module moved or a function renamed
leaves a name that no longer imports: issue 20).
"""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import pytest_ddpfault

PACKAGE = Path(pytest_ddpfault.__file__).parent
README = PACKAGE.parent / "README.md"
FULL_NAME = re.compile(r"\bpytest_ddpfault(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"^\s*from (pytest_ddpfault(?:\.\w+)*) import \(?([\w, ]+)", re.M)
# ``module.name``, ``module.name()``, ``pkg/module.name``, ``pkg/module.py`` in a docstring
SHORT_REF = re.compile(r"``([A-Za-z_]\w*(?:/[A-Za-z_]\w*)*(?:\.[A-Za-z_]\w*)+)(?:\(\))?``")
NOT_PYTHON = {"go", "json", "lock", "log", "sock", "txt"}   # ``api.go``, ``KEY.lock``: files, not names


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def resolve(dotted: str) -> bool:
    """Whether ``dotted`` imports: its longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def resolves_in_module(module: str, attrs: list[str]) -> bool:
    """``attrs`` of ``module``, or of one of its classes (``run.at``: ``GroupRun.at``)."""
    if resolve(".".join([module, *attrs])):
        return True
    mod = importlib.import_module(module)
    return any(isinstance(v, type) and resolve(".".join([v.__module__, v.__qualname__, *attrs]))
               for v in vars(mod).values())


def docstrings(path: Path):
    """(line, text) of the module's, its classes' and its functions' docstrings."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=False)
            if text:
                yield getattr(node, "lineno", 1), text


def short_ref_ok(ref: str, mods: dict[str, Path]) -> bool | None:
    """Whether a short reference to the package's own modules resolves; None when ``ref``
    is not one (``ddp.run``, ``torch.save``, ``api.go``: Go's toxiproxy, ``train.py``)."""
    head, _, tail = ref.partition(".")
    parts = head.split("/")
    candidates = [m for m in mods if m.split(".")[1:][-len(parts):] == parts]
    if tail == "py":  # a file of the package: ``rank/oplog.py``, ``zygote.py``
        in_package = len(parts) > 1 and (PACKAGE / parts[0]).is_dir()
        return bool(candidates) if candidates or in_package else None
    if not candidates or tail.split(".")[-1] in NOT_PYTHON:
        return None
    return any(resolves_in_module(m, tail.split(".")) for m in candidates)


def readme_names() -> list[str]:
    text = README.read_text()
    names = set(FULL_NAME.findall(text))
    for module, imported in FROM_IMPORT.findall(text):
        names |= {f"{module}.{n.strip()}" for n in imported.split(",") if n.strip()}
    return sorted(names)


@pytest.mark.parametrize("name", readme_names())
def test_every_package_name_readme_shows_imports(name):
    assert resolve(name), f"README.md shows {name}, which does not import"


def test_readme_shows_package_names_at_all():
    # the test above must not pass by finding nothing
    assert {"pytest_ddpfault.step", "pytest_ddpfault.run_group", "pytest_ddpfault.strategies.fault_plans"} \
        <= set(readme_names())


def test_every_package_name_a_docstring_shows_imports():
    mods = modules()
    bad, seen = [], 0
    for module, path in sorted(mods.items()):
        for line, text in docstrings(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            for name in FULL_NAME.findall(text):
                seen += 1
                if not resolve(name):
                    bad.append(f"{where}: {name}")
            for ref in SHORT_REF.findall(text):
                ok = short_ref_ok(ref, mods)
                seen += ok is not None
                if ok is False:
                    bad.append(f"{where}: ``{ref}``")
    assert seen > 50  # it looked
    assert not bad, "docstrings name what does not exist (moved or renamed?):\n" + "\n".join(bad)


@pytest.mark.parametrize("ref, ok", [
    ("rank/oplog.py", True), ("rank/oplog.OpLog", True), ("faults.network.OnProxies", True),
    ("oplog.DONE", True), ("run.at", True),                 # GroupRun.at, a class of parent/run.py
    ("harness.run_group", False), ("rank/nothing.py", False), ("triggers.install_plan", False),
    ("ddp.run", None), ("torch.save", None), ("api.go", None),
])
def test_what_a_short_reference_is(ref, ok):
    assert short_ref_ok(ref, modules()) is ok
