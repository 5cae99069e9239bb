"""What /proc says about processes and sockets (Linux): a process's identity and state,
its pending signals, children, listening ports.

Read-only lookups shared by the rank side (the env-plan hook names its own process), the
parent side (watching processes it did not fork: a toxiproxy-server, torchrun's tree)
and the tests' leak checks. Stdlib only.
"""
from __future__ import annotations

import os

TCP_LISTEN = "0A"


def _stat_fields(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode()
        return stat[stat.rindex(")") + 2:].split()
    except (OSError, ValueError):
        return None


def start_ticks(pid: int | str = "self") -> int | None:
    """A process's start time (clock ticks since boot; None if it is gone or a zombie):
    with its pid, this names one process, whatever reuses the pid later."""
    fields = _stat_fields(pid)
    if not fields or len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def state(pid: int) -> str | None:
    """The state letter of /proc/PID/stat ("T": stopped), or None if it is gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def pending_signals(pid: int) -> set[int]:
    """Signals sent to ``pid`` and not yet acted on (a stopped process keeps them)."""
    mask = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("SigPnd:", "ShdPnd:")):
                    mask |= int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        return set()
    return {n + 1 for n in range(64) if mask & (1 << n)}


def children(pid: int) -> set[int]:
    """Live child processes of ``pid`` (from every thread's children file)."""
    out: set[int] = set()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.update(int(p) for p in f.read().split())
        except OSError:
            continue
    return out


def descendants(root: int) -> list[int]:
    """Every process below ``root``, parents before their children."""
    seen: list[int] = []
    todo = sorted(children(root))
    while todo:
        pid = todo.pop(0)
        if pid not in seen:
            seen.append(pid)
            todo.extend(sorted(children(pid)))
    return seen


def _listening(inodes: set[str] | None = None) -> dict[str, int]:
    """inode -> port of every listening TCP socket (v4 and v6), or only of ``inodes``."""
    out: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == TCP_LISTEN and (inodes is None or cols[9] in inodes):
                out[cols[9]] = int(cols[1].rsplit(":", 1)[1], 16)
    return out


def listening_ports() -> set[int]:
    """Every TCP port some socket in this network namespace listens on."""
    return set(_listening().values())


def listening_port_of(pid: int) -> int | None:
    """A TCP port that process ``pid`` listens on (for a server told to use port 0)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return None
    ports = _listening(inodes)
    return min(ports.values()) if ports else None
