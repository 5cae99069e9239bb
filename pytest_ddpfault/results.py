"""What a run produced: one ``RankResult`` per rank, a ``GroupResult`` for the group.

Pure data plus assertions and text rendering; no torch, no processes.
"""
from __future__ import annotations

import re
import signal as _signal
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

_TAIL_LINES = 20
# "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] ...": torch's
# and gloo's C++ errors start with the build machine's path; the file name is enough.
_BUILD_PATH = re.compile(r"\[(?:[^\]\s]*[/\\])([^/\\\]\s]+:\d+)\]")


def strip_build_paths(text: str) -> str:
    """``[/__w/.../gloo/transport/tcp/pair.cc:553] Connection closed`` -> ``[pair.cc:553] ...``."""
    return _BUILD_PATH.sub(r"[\1]", text)


def signal_name(sig: int | None) -> str:
    if sig is None:
        return ""
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def qualified_name(cls: type) -> str:
    module = getattr(cls, "__module__", "builtins")
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    parts = text.rstrip("\n").splitlines()
    return "\n".join(parts[-lines:])


@dataclass(frozen=True)
class FaultEvent:
    """A fault that fired: ``time`` is seconds from the run's start (ranks up)."""

    kind: str
    rank: int | None       # None for harness-side faults that hit the whole group
    trigger: str
    time: float
    spec: str = ""
    detail: str = ""

    def __str__(self) -> str:
        where = f"rank {self.rank}" if self.rank is not None else "the group"
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.kind} on {where} at {self.trigger}, t={self.time:.2f}s{extra}"


@dataclass(frozen=True)
class UnfiredFault:
    """A fault of the plan that never fired, and why (its trigger never came)."""

    spec: str
    rank: int | None
    reason: str

    def __str__(self) -> str:
        return f"{self.spec}: {self.reason}"


@dataclass
class RankResult:
    rank: int
    status: str
    value: Any = None
    exc: BaseException | None = None
    exc_type: str | None = None
    exc_mro: tuple[str, ...] = ()
    message: str | None = None
    traceback: str | None = None
    signal: int | None = None
    exit_code: int | None = None
    duration: float | None = None   # seconds from the rank's start to its end
    end_time: float | None = None   # seconds from the run's start to the rank's end
    stdout: str = ""
    stderr: str = ""
    stack: str | None = None
    note: str = ""                  # why the harness ended it, for hung ranks

    @property
    def ok(self) -> bool:
        """Did the rank return? (``value`` is None both for ``return None`` and a failure.)"""
        return self.status == "ok"

    def raised(self, *exc_types: type, match: str | None = None) -> bool:
        """Did the rank raise one of ``exc_types`` (by class MRO; any if none given)?"""
        if self.status != "raised":
            return False
        if exc_types and not any(qualified_name(t) in self.exc_mro for t in exc_types):
            return False
        return match is None or re.search(match, self.message or "") is not None

    def killed_by(self, sig: int) -> bool:
        return self.status == "killed" and self.signal == int(sig)

    def detail(self) -> str:
        """One line: what ended this rank."""
        if self.status == "ok":
            return f"returned {self._short(repr(self.value))}"
        if self.status == "raised":
            first = strip_build_paths(self.message or "").strip().splitlines()
            return f"{self.exc_type}: {self._short(first[0] if first else '')}"
        if self.status == "killed":
            return f"died of {signal_name(self.signal)}"
        if self.status == "exited":
            return f"exited with code {self.exit_code} without returning"
        return self.note or "ended by the harness"

    @staticmethod
    def _short(text: str, limit: int = 100) -> str:
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def report(self) -> str:
        """Everything worth reading about a rank that did not return."""
        out = [f"--- rank {self.rank}: {self.status}: {self.detail()}"]
        if self.traceback:
            out.append(self.traceback.rstrip())
        if self.stack:
            out.append("stacks at the end (faulthandler):\n" + self.stack.rstrip())
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text.strip():
                out.append(f"{name} (last {_TAIL_LINES} lines):\n{_tail(text)}")
        return "\n".join(out)


@dataclass
class GroupResult:
    ranks: list[RankResult]
    fault_events: list[FaultEvent] = field(default_factory=list)
    faulted_ranks: frozenset[int] = frozenset()
    duration: float = 0.0
    plan: str = ""
    unfired: list[UnfiredFault] = field(default_factory=list)  # faults whose trigger never came

    # -- access ---------------------------------------------------------------
    def __getitem__(self, rank: int) -> RankResult:
        return self.ranks[rank]

    def __iter__(self) -> Iterator[RankResult]:
        return iter(self.ranks)

    def __len__(self) -> int:
        return len(self.ranks)

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def ok(self) -> bool:
        return all(r.status == "ok" for r in self.ranks)

    @property
    def values(self) -> list:
        return [r.value if r.status == "ok" else None for r in self.ranks]

    @property
    def survivors(self) -> list[RankResult]:
        return [r for r in self.ranks if r.rank not in self.faulted_ranks]

    @property
    def faulted(self) -> list[RankResult]:
        return [r for r in self.ranks if r.rank in self.faulted_ranks]

    @property
    def hung(self) -> list[RankResult]:
        return [r for r in self.ranks if r.status == "hung"]

    # -- text -----------------------------------------------------------------
    def summary(self) -> str:
        rows = [("rank", "status", "time", "what happened")]
        for r in self.ranks:
            t = f"{r.duration:.2f}s" if r.duration is not None else "-"
            mark = "*" if r.rank in self.faulted_ranks else ""
            rows.append((f"{r.rank}{mark}", r.status, t, r.detail()))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = ["  ".join(row[i].ljust(widths[i]) for i in range(3)) + "  " + row[3] for row in rows]
        if self.faulted_ranks:
            lines.append("(* = targeted by a kill, crash or hang fault)")
        if self.plan:
            lines.append(f"fault plan: {self.plan}")
        for ev in self.fault_events:
            lines.append(f"fired: {ev}")
        for u in self.unfired:
            lines.append(f"did not fire: {u}")
        return "\n".join(lines)

    def report(self, ranks: Sequence[RankResult] | None = None) -> str:
        chosen = [r for r in self.ranks if r.status != "ok"] if ranks is None else list(ranks)
        return "\n".join([self.summary(), *(r.report() for r in chosen)])

    def __repr__(self) -> str:
        statuses = ", ".join(f"{r.rank}:{r.status}" for r in self.ranks)
        return f"<GroupResult world_size={self.world_size} [{statuses}] {self.duration:.2f}s>"

    # -- assertions -----------------------------------------------------------
    def assert_all_ok(self) -> None:
        if not self.ok:
            bad = [r.rank for r in self.ranks if r.status != "ok"]
            raise AssertionError(f"ranks {bad} did not return\n{self.report()}")

    def assert_survivors_raised(self, *exc_types: type, match: str | None = None,
                                within: float | None = None) -> None:
        """Every survivor raised one of ``exc_types`` (matching ``match``), each within
        ``within`` seconds of the first fault event."""
        problems = []
        survivors = self.survivors
        if not survivors:
            problems.append("there are no survivors (every rank was targeted by a fault)")
        wanted = ", ".join(qualified_name(t) for t in exc_types) or "any exception"
        for r in survivors:
            if not r.raised(*exc_types, match=match):
                what = f"raised {r.exc_type}" if r.status == "raised" else f"was {r.status}"
                extra = f" matching {match!r}" if match else ""
                problems.append(f"rank {r.rank} {what}, expected {wanted}{extra}")
        if within is not None:
            if not self.fault_events:
                problems.append(f"within={within}: no fault event fired, so there is nothing to measure from")
            else:
                first = min(ev.time for ev in self.fault_events)
                for r in survivors:
                    if r.end_time is None:
                        continue
                    took = r.end_time - first
                    if took > within:
                        problems.append(f"rank {r.rank} ended {took:.2f}s after the first fault, more than within={within}s")
        if problems:
            raise AssertionError("; ".join(problems) + "\n" + self.report(survivors))
