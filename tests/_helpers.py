"""Observing real processes and sockets from the outside, through /proc (Linux).

Used by the leak checks: nothing here mocks anything; it reads what the kernel says.
"""
from __future__ import annotations

import time
from pathlib import Path

from pytest_ddpfault.procfs import children as children_of, listening_ports  # noqa: F401  (re-exported)


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (field 22 of stat); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def is_alive(pid: int, started: int | None = None) -> bool:
    """Running (not a zombie) and, when ``started`` is given, still the same process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return False
    return started is None or int(fields[19]) == started


def poll(predicate, timeout: float, interval: float = 0.02):
    """Call ``predicate`` until it returns something truthy or ``timeout`` passes; return its last value."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= end:
            return value
        time.sleep(interval)


def zygote_pids() -> list[int]:
    """Pids of this process's live zygotes (the harness's warm rank factory)."""
    import sys

    launcher = sys.modules.get("pytest_ddpfault.parent.launcher")
    if launcher is None:
        return []
    return [z.proc.pid for z in list(launcher._zygotes.values()) if z.alive]


def assert_nothing_left(res) -> None:
    """Every process a launched run started (each one the hook recorded) is gone."""
    from pytest_ddpfault.procfs import start_ticks

    started = [(e["pid"], e["start_ticks"]) for e in res.events if e["type"] == "process"]
    assert started, "the hook recorded no process"
    left = [pid for pid, ticks in started if start_ticks(pid) == ticks]
    assert not left, f"processes of the run still alive: {left}"
