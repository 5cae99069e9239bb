"""Shipping the user's function to the ranks.

cloudpickle sends module-level functions by reference (the rank imports the module)
and lambdas/closures by value. A function whose module the rank cannot import by
name, such as a test file under ``--import-mode=importlib`` or a script's
``__main__``, has its module's functions and classes sent by value instead.
"""
from __future__ import annotations

import os
import sys
from types import ModuleType

import cloudpickle


def _find_spec_on_path(name: str):
    """Where a fresh interpreter would find ``name``. Unlike ``importlib.util.find_spec``,
    this does not answer from ``sys.modules``: a test file imported under
    ``--import-mode=importlib`` sits there under a name that nothing on sys.path provides."""
    parent_name = name.rpartition(".")[0]
    path = None
    if parent_name:
        parent = sys.modules.get(parent_name)
        if parent is None or not _importable_by_name(parent):
            return None
        path = getattr(parent, "__path__", None)
    for finder in sys.meta_path:
        find = getattr(finder, "find_spec", None)
        spec = find(name, path) if find is not None else None
        if spec is not None:
            return spec
    return None


def _importable_by_name(module: ModuleType) -> bool:
    name = module.__name__
    if name == "__main__":
        return False
    spec = getattr(module, "__spec__", None)
    if spec is None or spec.name != name:
        return False
    try:
        found = _find_spec_on_path(name)
    except (ImportError, ValueError):
        return False
    if found is None:
        return False
    a, b = getattr(module, "__file__", None), found.origin
    return a is None or b is None or os.path.realpath(a) == os.path.realpath(b)


def _modules_to_send_by_value(obj) -> list[ModuleType]:
    names = {getattr(obj, "__module__", None)}
    func = getattr(obj, "__func__", obj)  # bound methods
    names.add(getattr(func, "__module__", None))
    mods = [sys.modules.get(n) for n in names if n]
    return [m for m in mods if m is not None and m.__name__ != "__main__" and not _importable_by_name(m)]


def dumps_call(fn, args: tuple, kwargs: dict) -> bytes:
    by_value = _modules_to_send_by_value(fn)
    for m in by_value:
        cloudpickle.register_pickle_by_value(m)
    try:
        return cloudpickle.dumps((fn, args, kwargs))
    finally:
        for m in by_value:
            cloudpickle.unregister_pickle_by_value(m)
