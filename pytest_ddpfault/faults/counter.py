"""The one place that decides "due now" and "fires once": ``TriggerCounter``, used inside
every armed process (ranks of ``ddp.run`` and the processes of a launched run)."""
from __future__ import annotations

import threading
from collections import Counter
from typing import Any

from pytest_ddpfault.faults.spec import Fault, parse_plan, rank_faults
from pytest_ddpfault.faults.triggers import COLLECTIVE_OPS

__all__ = ["TriggerCounter"]


class TriggerCounter:
    """Counts one rank's calls (ops, ``step``, ``init``) and says which faults are due.

    A fault fires at most once, except one whose kind ``repeats`` it (delay every=true):
    that one fires on every counted call from its trigger on.  ``collective`` counts every
    call in ``COLLECTIVE_OPS``; record each user-visible call once.  Thread-safe: a timer
    thread (``due_at``) and the rank's main thread (``record``) both use it.
    """

    def __init__(self, faults: Any = (), *, rank: int | None = None,
                 world_size: int | None = None, nodes: int = 1) -> None:
        plan = parse_plan(faults)
        if rank is not None:
            if world_size is None:
                raise TypeError("TriggerCounter(rank=...) needs world_size to resolve default ranks")
            plan = rank_faults(plan, rank, world_size, nodes)
        self.faults = plan
        # Resolved once: record() runs on every op of the rank.
        triggers = [(i, f.resolved_at()) for i, f in enumerate(plan)]
        self._calls = [(i, *at.counted) for i, at in triggers if at is not None and at.counted]
        self._times = [(i, at.seconds) for i, at in triggers if at is not None and at.kind == "time"]
        self._counts: Counter[str] = Counter()
        self._fired: set[int] = set()  # indices: equal faults in one plan fire separately
        self._lock = threading.Lock()

    def count(self, name: str) -> int:
        return self._counts[name]

    def record(self, name: str) -> tuple[Fault, ...]:
        """Count one call of ``name`` (an op, ``step`` or ``init``); return the faults due."""
        with self._lock:
            self._counts[name] += 1
            if name in COLLECTIVE_OPS:
                self._counts["collective"] += 1
            due = []
            for i, watched, n in self._calls:
                if watched != name and not (watched == "collective" and name in COLLECTIVE_OPS):
                    continue
                seen, fault = self._counts[watched], self.faults[i]
                if seen == n or (seen > n and fault.definition.repeats(fault)):
                    self._fired.add(i)
                    due.append(fault)
            return tuple(due)

    def due_at(self, elapsed: float) -> tuple[Fault, ...]:
        """The ``t=`` faults whose time has come by ``elapsed`` seconds, each returned once."""
        with self._lock:
            due = [i for i, s in self._times if s <= elapsed and i not in self._fired]
            self._fired.update(due)
            return tuple(self.faults[i] for i in due)

    def next_time(self) -> float | None:
        """Seconds of the earliest ``t=`` fault not yet fired (for a timer), or None."""
        with self._lock:
            return min((s for i, s in self._times if i not in self._fired), default=None)

    def unfired(self, elapsed: float) -> list[tuple[Fault, str]]:
        """The faults with a trigger that have not fired, each with what this process did
        instead (``elapsed``: seconds since it started)."""
        out = []
        for fault in self.pending():
            at = fault.resolved_at()
            if at is None:
                continue
            if at.kind == "time":
                why = f"the process ended {elapsed:.2f}s after it started, before {at}"
            elif at.kind == "init":
                why = "init_process_group was never called"
            else:
                name, n = at.counted
                seen = self.count(name)
                what = "pytest_ddpfault.step()" if name == "step" else name
                why = f"{what} was called {seen} time{'' if seen == 1 else 's'}, at={at} needs {n}"
            out.append((fault, why))
        return out

    def pending(self) -> tuple[Fault, ...]:
        """Faults that have not fired (yet)."""
        with self._lock:
            return tuple(f for i, f in enumerate(self.faults) if i not in self._fired)
