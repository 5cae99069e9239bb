"""Ending processes and reading what they left, for one run of the harness and for
launched runs alike: stack dumps at a deadline, kills of a whole process group, the
wait for them to be gone, and the tails of their output files.

Budgets: a run ends its processes within one clean-up budget (stack dumps inside it).
"""
from __future__ import annotations

import os
import select
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager

from pytest_ddpfault.deadline import Deadline
from pytest_ddpfault.procfs import start_ticks

CLEANUP_BUDGET = 15.0      # stack dumps, kills and reaping of one run, together
STACK_DUMP_BUDGET = 3.0    # (inside it) for every live process to write its stacks
STACK_DUMP_SETTLE = 0.3    # a dump is complete once its file stopped growing this long
OUTPUT_LIMIT = 1 << 20     # bytes of stdout/stderr kept per process (the tail)


def short_tmp() -> str:
    """A temp dir short enough for a Unix socket path (108 bytes)."""
    tmp = tempfile.gettempdir()
    return tmp if len(tmp) < 60 else "/tmp"


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def read_tail(path: str, limit: int = OUTPUT_LIMIT) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, file_size(path) - limit))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def wait_for_stacks(live_stack_paths: Callable[[], Iterable[str]], until: Deadline,
                    pump: Callable[[], None]) -> None:
    """faulthandler writes from a signal handler: a dump is done when its file stopped
    growing. ``live_stack_paths()`` names the dump files of the processes still alive;
    ``pump()`` waits a little (and notices exits)."""
    sizes: dict[str, tuple[int, float]] = {}
    while not until.expired():
        pending = 0
        for path in live_stack_paths():
            size, prev = file_size(path), sizes.get(path)
            if size == 0 or prev is None or prev[0] != size:
                sizes[path] = (size, time.monotonic())
                pending += 1
            elif time.monotonic() - prev[1] < STACK_DUMP_SETTLE:
                pending += 1
        if not pending:
            return
        pump()


# Signals whose Python handler may raise in the middle of a wait: pytest-timeout's
# (method=signal: pytest.fail from SIGALRM) and Ctrl-C's KeyboardInterrupt.
RAISING_SIGNALS = (signal.SIGALRM, signal.SIGINT)


@contextmanager
def signals_held(signums: Iterable[int] = RAISING_SIGNALS):
    """Hold back the Python handlers of ``signums`` for the block, then run each one that
    came (in order): a step that must not stop half-way (starting processes whose pids are
    not known yet, the clean-up that kills them) finishes first, inside its own budget.
    Only the main thread has Python signal handlers: elsewhere, nothing is held."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[tuple] = []
    held = {}
    for signum in signums:
        handler = signal.getsignal(signum)
        if callable(handler):  # SIG_DFL, SIG_IGN and C handlers stay as they are
            held[signum] = handler
            signal.signal(signum, lambda n, frame: came.append((n, frame)))
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for signum, frame in came:
            held[signum](signum, frame)


def signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_group(pid: int, sig: int) -> None:
    """Signal the group ``pid`` leads (launchers and torchrun's workers lead their own)."""
    try:
        if os.getpgid(pid) == pid and pid != os.getpgrp():
            os.killpg(pid, sig)
            return
    except (ProcessLookupError, PermissionError):
        return
    signal_pid(pid, sig)


def kill_with_group(pid: int) -> None:
    signal_group(pid, signal.SIGKILL)
    signal_pid(pid, signal.SIGKILL)


def kill_and_wait(alive: dict[int, int], until: Deadline) -> list[int]:
    """SIGKILL each ``pid: start_ticks`` (and its group) and wait until each is gone;
    returns the pids still there at ``until`` (none, unless stuck in the kernel)."""
    fds = {}
    for pid, ticks in alive.items():
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        if start_ticks(pid) != ticks:  # the pid is someone else's now
            os.close(fd)
            continue
        fds[fd] = pid
        kill_with_group(pid)
    try:
        while fds and not until.expired():
            ready, _, _ = select.select(list(fds), [], [], until.remaining())
            for fd in ready:
                fds.pop(fd)
                os.close(fd)
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)
