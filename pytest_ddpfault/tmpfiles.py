"""The temp files a pytest process owns, named by its pid, and their removal.

A run's directory (``ddpf-<pid>-...``) and a zygote's log (``ddpfault-zygote-<pid>-...``)
carry the pid of the pytest process they belong to, which removes them itself. Where it
cannot (it died of SIGKILL, or called ``os._exit`` as pytest-timeout's thread method does),
its zygote removes them as it leaves (``rank/zygote.py``); the next zygote started on the
machine removes those of any owner that is gone (``parent/launcher.sweep_stale_files``).
Stdlib only: the zygote imports it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

RUN_DIR_PREFIX = "ddpf-"
ZYGOTE_LOG_PREFIX = "ddpfault-zygote-"


def temp_dirs() -> list[str]:
    """Where they are: the temp dir, and /tmp (a run dir's home when TMPDIR is too long
    for a Unix socket path, see ``parent/reaping.short_tmp``)."""
    tmp = tempfile.gettempdir()
    return [tmp] if tmp == "/tmp" else [tmp, "/tmp"]


def remove_owned(whose: Callable[[int], bool], tmp: str | None = None) -> list[str]:
    """Remove the run dirs and zygote logs in ``tmp`` (default: ``temp_dirs()``) whose owner
    pid ``whose(pid)`` says to; returns their paths."""
    removed = []
    for directory in [tmp] if tmp else temp_dirs():
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            for prefix in (RUN_DIR_PREFIX, ZYGOTE_LOG_PREFIX):
                owner = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) else ""
                if owner.isdigit() and whose(int(owner)):
                    path = os.path.join(directory, name)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        try:
                            os.unlink(path)
                        except OSError:
                            pass
                    removed.append(path)
    return removed
