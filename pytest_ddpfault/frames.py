"""Tracebacks and stacks as users read them: the harness's own frames hidden (as pytest
hides its own), torch's C++ build paths shortened, and the fields that describe an
exception in results and events. Stdlib only, imports nothing of the package: the rank
side, the results and the pictures of a run all use it.

A traceback or stack of a rank runs through the bootstrap, the trigger wrappers and the
fault kinds before it reaches the user's code or torch. Those frames are ours, not the
user's: they are left out of ``RankResult.traceback`` and ``.stack``. Set
``DDPFAULT_SHOW_INTERNAL_FRAMES=1`` to see them (when debugging the plugin itself).
Frames are recognised by the package's own directory, not by file names.
"""
from __future__ import annotations

import os
import re
import traceback

ENV_SHOW = "DDPFAULT_SHOW_INTERNAL_FRAMES"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Below the user's code in a rank: the interpreter's own start-up of the child.
_BOOTSTRAP_FILES = ("<frozen runpy>",)
# "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] ...": torch's
# and gloo's C++ errors start with the build machine's path; the file name is enough.
_BUILD_PATH = re.compile(r"\[(?:[^\]\s]*[/\\])([^/\\\]\s]+:\d+)\]")
# a frame line of faulthandler ('  File "x.py", line 3 in f') or of traceback ('  File "x.py", line 3, in f')
_FRAME_LINE = re.compile(r'^\s*File "([^"]+)", line \d+')


def strip_build_paths(text: str) -> str:
    """``[/__w/.../gloo/transport/tcp/pair.cc:553] Connection closed`` -> ``[pair.cc:553] ...``."""
    return _BUILD_PATH.sub(r"[\1]", text)


def qualified_name(cls: type) -> str:
    module = getattr(cls, "__module__", "builtins")
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def showing_internals() -> bool:
    return os.environ.get(ENV_SHOW, "") not in ("", "0")


def is_internal(filename: str) -> bool:
    return filename.startswith(PACKAGE_DIR) or filename in _BOOTSTRAP_FILES


def format_exception(exc: BaseException) -> str:
    """``traceback.format_exception`` without the harness's frames (chained ones too)."""
    te = traceback.TracebackException.from_exception(exc)
    if not showing_internals():
        seen = set()
        todo = [te]
        while todo:
            t = todo.pop()
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            kept = [f for f in t.stack if not is_internal(f.filename)]
            t.stack = traceback.StackSummary.from_list(kept)
            todo += [t.__cause__, t.__context__, *(getattr(t, "exceptions", None) or [])]
    return "".join(te.format())


def exception_fields(exc: BaseException) -> dict:
    """What a result or an event says of an exception: its type (and MRO, for
    ``RankResult.raised``), message and traceback (without the harness's frames)."""
    return {"exc_type": qualified_name(type(exc)), "exc_mro": [qualified_name(c) for c in type(exc).__mro__],
            "message": str(exc), "traceback": format_exception(exc)}


def hide_in_stack(text: str) -> str:
    """Drop the harness's frames from a faulthandler dump (one line per frame)."""
    if showing_internals():
        return text
    return "\n".join(line for line in text.splitlines()
                     if not ((m := _FRAME_LINE.match(line)) and is_internal(m.group(1))))
