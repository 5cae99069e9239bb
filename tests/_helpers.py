"""Observing real processes and sockets from the outside, through /proc (Linux).

Used by the leak checks: nothing here mocks anything; it reads what the kernel says.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

TCP_LISTEN = "0A"


def children_of(pid: int) -> set[int]:
    """Live child processes of ``pid`` (every thread's children file)."""
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        out.update(int(p) for p in text.split())
    return out


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


def listening_ports() -> set[int]:
    """Every TCP port some socket in this network namespace is listening on (v4 and v6)."""
    ports: set[int] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 3 and parts[3] == TCP_LISTEN:
                ports.add(int(parts[1].rsplit(":", 1)[1], 16))
    return ports


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

    launcher = sys.modules.get("pytest_ddpfault.launcher")
    if launcher is None:
        return []
    return [z.proc.pid for z in list(launcher._zygotes.values()) if z.alive]
