"""Child-side bootstrap shared by zygote forks and spawned processes.

It runs first in every process the harness starts (ranks and the store host): the
process gets its own process group (so the harness can kill it with all it started),
dies with its parent, writes fds 1 and 2 to files (so C++ output is captured too),
dumps every thread's stack on SIGUSR1 at C level, takes the parent's env, cwd and
sys.path, then calls the job's target. It imports nothing from the parent side.
"""
from __future__ import annotations

import ctypes
import faulthandler
import importlib
import os
import pickle
import signal
import sys
import traceback
from dataclasses import dataclass

from pytest_ddpfault.rank.lifeline import (  # noqa: F401  (where the zygote and env plans take them)
    BOOTSTRAP_FAILED, die_with_parent, set_parent_death_signal,
)

STACK_DUMP_SIGNAL = signal.SIGUSR1


@dataclass
class ChildJob:
    name: str                 # "rank 2", "store host": for messages
    target: str               # "module:function", called with payload, returns an exit code
    payload: bytes
    env: dict
    cwd: str
    sys_path: list
    stdout_path: str
    stderr_path: str
    stack_path: str | None = None
    preload: tuple = ()       # modules to import first (a spawned child has no zygote's imports)
    # time.monotonic() just before the launcher started the process (set by the launcher): the
    # origin of the child's t= triggers and of its duration in the report, so neither is early
    started: float = 0.0
    # (path, CLONE_NEW* flag) to setns into first, before any socket: its virtual node's network
    # namespace under the "namespaces" engine (rank/netns.py)
    namespaces: tuple = ()


def register_stack_dump(path: str):
    """On ``STACK_DUMP_SIGNAL``, faulthandler writes every thread's stack into ``path``.
    The file stays open for the life of the process (returned: keep it): faulthandler
    writes to its fd from a C signal handler, which works even while a C call holds the GIL."""
    stack_file = open(path, "w")
    faulthandler.register(STACK_DUMP_SIGNAL, file=stack_file, all_threads=True, chain=False)
    return stack_file


def _redirect(fd: int, path: str) -> None:
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(target, fd)
    os.close(target)


def run_job(job: ChildJob, expected_parent: int):
    """Set the process up for ``job`` and run it; never returns."""
    code = BOOTSTRAP_FAILED
    try:
        die_with_parent(expected_parent)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        _redirect(1, job.stdout_path)
        _redirect(2, job.stderr_path)
        if job.namespaces:
            from pytest_ddpfault.rank.netns import enter

            enter(job.namespaces)  # before any socket of the job's
        # Line-buffered, so what a rank printed survives its being killed.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.reconfigure(line_buffering=True)
            except (AttributeError, ValueError):
                pass
        if job.stack_path:
            stack_file = register_stack_dump(job.stack_path)  # noqa: F841  (kept open)
        faulthandler.enable(file=sys.stderr, all_threads=True)
        os.environ.clear()
        os.environ.update(job.env)
        os.chdir(job.cwd)
        sys.path[:] = job.sys_path
        for name in job.preload:
            importlib.import_module(name)
        module_name, _, func_name = job.target.partition(":")
        target = getattr(importlib.import_module(module_name), func_name)
        code = target(job)
    except SystemExit as exc:  # a target may end itself with sys.exit
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        try:
            sys.stderr.write(f"pytest-ddpfault: {job.name} failed to start:\n{traceback.format_exc()}")
        except BaseException:
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            ctypes.CDLL(None).fflush(None)  # C stdio buffers too: os._exit skips them
        except BaseException:
            pass
        os._exit(code if isinstance(code, int) else BOOTSTRAP_FAILED)


def main(argv=None) -> None:
    """Entry point of a spawned (not forked) child: ``python -m pytest_ddpfault.rank.bootstrap JOBFILE PPID``."""
    argv = sys.argv[1:] if argv is None else argv
    job_path, parent = argv[0], int(argv[1])
    with open(job_path, "rb") as f:
        job = pickle.load(f)
    run_job(job, parent)


if __name__ == "__main__":
    main()
