"""What a run produced: one ``RankResult`` per rank, a ``GroupResult`` for the group; for
launched runs, a ``WorkerResult`` per worker process and a ``TorchrunResult``.

Pure data plus assertions and text rendering; no torch, no processes.
"""
from __future__ import annotations

import re
import signal as _signal
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from pytest_ddpfault.faults import FaultSpecError, kinds_with, parse_plan
from pytest_ddpfault.faults.triggers import KNOWN_OPS
from pytest_ddpfault.frames import qualified_name, strip_build_paths

_TAIL_LINES = 20
# The calls every rank of a group makes (collectives, new_group, init): a rank that never
# entered one its peers did lags. Not a pair's calls (send, recv), nor what a rank may do
# alone (save, load, step).
_POINT_TO_POINT = frozenset({"send", "recv", "isend", "irecv", "send_object_list", "recv_object_list",
                             "batch_isend_irecv"})
GROUP_WIDE_OPS = (KNOWN_OPS - {"collective"} - _POINT_TO_POINT) | {"init"}
_WHOLE_GROUP = ("", "default")   # the op log's group of calls on the default group (init: none)


def signal_name(sig: int | None) -> str:
    if sig is None:
        return ""
    try:
        return _signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Aligned columns; the last one (what happened) runs free."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]


def _seconds(value: float | None) -> str:
    return f"{value:.2f}s" if value is not None else "-"


def _plan_lines(plan: str, fired: Sequence, unfired: Sequence) -> list[str]:
    """The plan, what fired, and what did not (with why), under a result's table."""
    return ([f"fault plan: {plan}"] if plan else []) + [f"fired: {ev}" for ev in fired] + \
        [f"did not fire: {u}" for u in unfired]


def _star_legend(plan: str) -> str:
    """The table's ``*`` legend: the kinds of the plan that make the rank they hit not a
    survivor (each kind says so: ``targets_rank``); every such kind where the plan is not known."""
    try:
        names = sorted({f.kind for f in parse_plan(plan) if f.definition.targets_rank}) if plan else []
    except FaultSpecError:
        names = []
    names = names or list(kinds_with("targets_rank"))
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f"(* = targeted by {listed}: not a survivor)"


def _tail(text: str, lines: int = _TAIL_LINES) -> str:
    parts = text.rstrip("\n").splitlines()
    return "\n".join(parts[-lines:])


def _rank_word(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def _where(r: RankResult) -> str:
    last = r.last_op
    if last is None:
        return "no op logged"
    how = f"{last.source}, {last.group}" if last.group else last.source
    if last.in_flight:
        return f"in {last} ({how}) since t={last.start:.2f}s"
    if last.failed:
        return f"in {last} ({how}) from t={last.start:.2f}s until it failed at t={last.end:.2f}s"
    return f"after {last}, ended t={last.end:.2f}s"


def _explains(ev: FaultEvent, r: RankResult) -> bool:
    """Whether fault event ``ev`` explains why rank ``r`` never got to a call its peers made:
    it hit that rank (fired there, or cut its links), the rank did not return, and the rank
    completed no call after it (it got past a delay, a healed partition, a resumed freeze)."""
    if not (ev.rank == r.rank or r.rank in ev.scope) or r.status == "ok":
        return False
    return not any(op.end is not None and not op.failed and op.start >= ev.time for op in r.ops)


def _why_not(r: RankResult, events: Sequence) -> str:
    """Why a rank did not get to a call: the fault that explains it, its end, its last op."""
    parts = [f"{ev.kind} at {ev.trigger}" for ev in events if _explains(ev, r)]
    parts.append(r.status if r.status in ("ok", "hung") else r.detail())
    last = r.last_op
    parts.append(f"last op {last}" if last is not None else "no op logged")
    return "; ".join(parts)


def progress_table(ranks: Sequence[RankResult], events: Sequence = (), faulted: frozenset = frozenset(),
                   label=None) -> str:
    """The progress table of a group (or an attempt): rank, status, ops logged, where it
    was; then one line naming the laggards: who waits in (or failed in) the latest call
    every rank of its group makes, and who never entered it and why."""
    label = label or (lambda r: f"{r.rank}{'*' if r.rank in faulted else ''}")
    nodes = len({r.node for r in ranks}) > 1   # virtual nodes: which node each rank was on
    rows = [("rank", *(("node",) if nodes else ()), "status", "ops", "where it was")]
    rows += [(label(r), *((str(r.node),) if nodes else ()), r.status, str(len(r.ops) + r.ops_dropped), _where(r))
             for r in ranks]
    lines = ["where each rank was:", *_table(rows)]
    group_wide = {r.rank: [o for o in r.ops if o.name in GROUP_WIDE_OPS] for r in ranks}
    logged = [r for r in ranks if group_wide[r.rank]]
    if not logged:
        return "\n".join(lines)
    ahead = max(logged, key=lambda r: (len(group_wide[r.rank]) + r.ops_dropped, group_wide[r.rank][-1].start))
    ref = group_wide[ahead.rank][-1]
    # its group's ranks: all of them, or for a new_group's, those that logged a call on it
    members = [r for r in ranks if ref.group in _WHOLE_GROUP or any(o.group == ref.group for o in r.ops)]
    in_ref = [r for r in members if r.last_op is not None and (r.last_op.name, r.last_op.seq) == (ref.name, ref.seq)]
    waiting = [r.rank for r in in_ref if r.last_op.in_flight]
    failed = [r.rank for r in in_ref if r.last_op.failed]
    entered = {r.rank for r in members if any(o.name == ref.name and o.seq >= ref.seq for o in r.ops)}
    missing = [r for r in members if r.rank not in entered]
    said = []
    if waiting:
        said.append(f"{_rank_word(waiting)} {'waits' if len(waiting) == 1 else 'wait'} in {ref}")
    if failed:
        said.append(f"{_rank_word(failed)} failed in {ref}")
    for r in missing:
        said.append(f"rank {r.rank} never entered {'it' if said else ref}: {_why_not(r, events)}")
    if not said:
        said.append(f"every rank got to {ref}")
    lines.append("; ".join(said))
    return "\n".join(lines)


@dataclass(frozen=True)
class FaultEvent:
    """A fault that fired: ``time`` is seconds from the run's start (ranks up)."""

    kind: str
    rank: int | None       # None for harness-side faults that hit the whole group
    trigger: str
    time: float
    spec: str = ""
    detail: str = ""
    node: int | None = None  # the node it hit, for a fault on a whole node (kill_node)
    scope: tuple = ()        # a scoped network fault: the ranks whose links to all others it acts on

    def __str__(self) -> str:
        where = f"rank {self.rank}" if self.rank is not None else "the group"
        if self.node is not None:
            where = f"node {self.node} (from rank {self.rank})" if self.rank is not None else f"node {self.node}"
        if self.scope:
            cut = f"the links of rank{'s' if len(self.scope) > 1 else ''} {', '.join(map(str, self.scope))}"
            where = f"{cut} (from rank {self.rank})" if self.rank is not None else cut
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.kind} on {where} at {self.trigger}, t={self.time:.2f}s{extra}"


@dataclass(frozen=True)
class UnfiredFault:
    """A fault of the plan that never fired, and why (its trigger never came); ``attempt``
    for launched runs (``ddp.torchrun``), None for ``ddp.run``."""

    spec: str
    rank: int | None
    reason: str
    attempt: int | None = None

    def __str__(self) -> str:
        where = f" in attempt {self.attempt}" if self.attempt is not None else ""
        return f"{self.spec}{where}: {self.reason}"


@dataclass(frozen=True)
class OpRecord:
    """One counted call of a rank (from its operation log): ``seq`` is the call's count of
    that op in the rank, from 1, as triggers count it (``all_reduce#3``); ``start``/``end``
    are seconds from the run's start, ``end`` None while in flight (for an async op, the
    first moment it was seen completed: at the rank's next counted call or its end).
    ``source``: "python" (a ``torch.distributed`` function) or "c++" (DDP's Reducer, on
    the process group); ``bytes``: of the tensors it was given; ``failed``: it raised."""

    name: str
    seq: int
    group: str
    bytes: int
    start: float
    end: float | None
    source: str = "python"
    failed: bool = False

    @property
    def in_flight(self) -> bool:
        return self.end is None

    @property
    def since(self) -> float:
        return self.start

    @property
    def duration(self) -> float | None:
        return None if self.end is None else self.end - self.start

    def __str__(self) -> str:
        return f"{self.name} #{self.seq}"


def ops_from_log(records: Sequence[dict], dropped: int, t0: float,
                 until: float | None = None) -> tuple[list, list, int]:
    """A rank's ops and step marks from its log's records (rank/oplog.read_oplog), with
    times in seconds from ``t0`` (the run's start); and how many records the log dropped.
    ``until``: the moment the harness began to end the rank (what a frozen rank did once
    resumed for its stack dump is not what it was doing: an op that ended later was in flight)."""
    ops, steps = [], []
    for rec in records:
        if until is not None and rec["start"] > until:
            continue
        if rec["kind"] == "step":
            steps.append(StepMark(rec["seq"], round(rec["start"] - t0, 6)))
        else:
            end = rec["end"] if until is None or (rec["end"] or 0.0) <= until else None
            ops.append(OpRecord(rec["name"], rec["seq"], rec["group"], rec["bytes"], round(rec["start"] - t0, 6),
                                None if end is None else round(end - t0, 6), rec["source"], rec["state"] == "failed"))
    return ops, steps, dropped


@dataclass(frozen=True)
class StepMark:
    """A ``pytest_ddpfault.step()`` call: the ``seq``-th, at ``time`` (seconds from the run's start)."""

    seq: int
    time: float


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
    ops: list = field(default_factory=list, repr=False)    # OpRecord, in call order
    steps: list = field(default_factory=list, repr=False)  # StepMark
    ops_dropped: int = 0            # the oldest records the bounded log did not keep
    node: int = 0                   # the virtual node it ran on (nodes=)

    @property
    def last_op(self) -> OpRecord | None:
        """The call the rank was in when it ended (the latest in flight), else the last one it finished."""
        for op in reversed(self.ops):
            if op.in_flight:
                return op
        return self.ops[-1] if self.ops else None

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
    network: str = "proxies"      # the network engine of the run: what a scoped network fault could cut
    network_note: str = ""        # what it covered, when a scoped network fault was in the plan

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
        nodes = any(r.node for r in self.ranks)  # nodes > 1: a column of the node each rank ran on
        lines = _table([("rank", *(("node",) if nodes else ()), "status", "time", "what happened")] +
                       [(f"{r.rank}{'*' if r.rank in self.faulted_ranks else ''}", *((str(r.node),) if nodes else ()),
                         r.status, _seconds(r.duration), r.detail()) for r in self.ranks])
        if self.faulted_ranks:
            lines.append(_star_legend(self.plan))
        network = [f"network: {self.network}: {self.network_note}"] if self.network_note else []
        return "\n".join(lines + _plan_lines(self.plan, self.fault_events, self.unfired) + network)

    def report(self, ranks: Sequence[RankResult] | None = None) -> str:
        chosen = [r for r in self.ranks if r.status != "ok"] if ranks is None else list(ranks)
        progress = [self.progress()] if any(r.ops for r in self.ranks) else []
        return "\n".join([self.summary(), *progress, *(r.report() for r in chosen)])

    def progress(self) -> str:
        """Where each rank was when the run ended, and the laggards: which ranks wait in
        which call, which never entered it and why."""
        return progress_table(self.ranks, self.fault_events, self.faulted_ranks)

    def timeline(self, path) -> str:
        """Write a self-contained HTML picture of the run (one lane per rank); returns the path."""
        from pytest_ddpfault import timeline

        return timeline.write_html(path, timeline.group_lanes(self), title=f"ddp run: {self.world_size} ranks")

    def trace(self, path) -> str:
        """Write the run as Chrome/Perfetto trace JSON (pid = rank, tid = group); returns the path."""
        from pytest_ddpfault import timeline

        return timeline.write_trace(path, timeline.group_lanes(self))

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


# --- launched runs (ddp.torchrun, run_script) ----------------------------------------------

@dataclass(frozen=True)
class AttemptFaultEvent(FaultEvent):
    """A fault that fired in a launched process; ``time`` is seconds from the launcher's start."""

    attempt: int = 0
    pid: int | None = None

    def __str__(self) -> str:
        text = super().__str__()
        if self.node is not None and self.rank is not None:  # the worker's node (nnodes > 1)
            text = text.replace(f"node {self.node} (from rank {self.rank})", f"rank {self.rank} on node {self.node}", 1)
        return f"{text} in attempt {self.attempt}"


@dataclass
class WorkerResult(RankResult):
    """How one worker process of one attempt ended.

    ``status`` as for ``RankResult``. Sources, best first: the exception the hook saw
    reach the top (``exc_type``, ``message``, ``traceback``), the worker's torchrun error
    file (``@record``), the agent's report of its exit code, the fault that killed it, the
    agent's own SIGTERM, a normal interpreter exit ("ok": it did not fail; scripts return
    no value). ``stdout``/``stderr`` are the worker's own (torchrun ``--tee``).
    """

    attempt: int = 0
    local_rank: int | None = None
    pid: int | None = None
    error_file: str | None = None

    def detail(self) -> str:
        if self.status == "ok":
            return "exited normally"
        if self.status == "killed" and self.note:
            return f"{super().detail()}: {self.note}"
        if self.status == "exited" and self.note:
            return f"{super().detail()} ({self.note})"
        return super().detail()

    def report(self) -> str:
        head, _, rest = super().report().partition("\n")
        where = f"--- attempt {self.attempt}, rank {self.rank} (pid {self.pid}):"
        head = head.replace(f"--- rank {self.rank}:", where, 1)
        return f"{head}\n{rest}" if rest else head


@dataclass
class NodeResult:
    """One torchrun agent of a multi-node ``ddp.torchrun`` (``nnodes > 1``) and how it ended."""

    node: int
    address: str                        # the node's loopback address (--local-addr)
    exit_code: int | None               # the agent's; None when a signal ended it
    signal: int | None = None           # the signal that ended the agent
    restarts: int = 0                   # restarts its workers went through (highest attempt seen on it)
    lost: str | None = None             # the plan's fault that signalled this node (agent and workers), if any
    pid: int | None = None
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False             # still running at the harness deadline
    stack: str | None = None            # the agent's stacks when it was ended at the deadline
    reason: str = ""                    # why a failed agent failed, from its own output ("RendezvousTimeoutError")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def describe_end(self) -> str:
        if self.timed_out:
            end = "still running at the harness deadline"
        elif self.signal is not None:
            end = f"agent died of {signal_name(self.signal)}"
        else:
            end = f"agent exit code {self.exit_code}" + (f": {self.reason}" if self.reason else "")
        return f"{end} (lost: {self.lost})" if self.lost else end


@dataclass
class TorchrunResult:
    """What a launched run produced: the launcher's end and output, its workers, its faults.

    With ``nnodes > 1`` there is one agent per node (``nodes``); ``exit_code``/``signal`` are
    then the first agent's that the plan did not kill and that failed (0 when every such
    agent exited 0), and ``ok`` means: every agent the plan did not kill exited 0.
    ``stdout``/``stderr`` hold every agent's, each under a ``--- node N agent ---`` line.
    """

    command: list                       # the launcher's command line (node 0's agent with nnodes > 1)
    exit_code: int | None               # the launcher's; None when a signal ended it
    signal: int | None = None           # the signal that ended the launcher
    stdout: str = ""
    stderr: str = ""
    fault_events: list = field(default_factory=list)     # AttemptFaultEvent, by time
    workers: list = field(default_factory=list)          # WorkerResult, by attempt then rank
    restarts: int = 0                   # restarts the agent made (highest attempt seen)
    timed_out: bool = False             # ended by the harness at its deadline
    duration: float = 0.0
    plan: str = ""
    max_restarts: int = 0
    launcher_stack: str | None = None   # the launcher's stacks when it was ended at the deadline
    events: list = field(default_factory=list)           # raw DDPFAULT_EVENTS records
    unfired: list = field(default_factory=list)          # UnfiredFault: what the plan asked for in vain
    nodes: list = field(default_factory=list)            # NodeResult per node with nnodes > 1, else empty
    network: str = "proxies"            # the engine of scoped network faults between nodes (netns.py)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out

    def node(self, n: int) -> NodeResult:
        """Node ``n``'s agent (``nnodes > 1``)."""
        return next(r for r in self.nodes if r.node == n)

    @property
    def lost_nodes(self) -> list[int]:
        """The nodes the plan killed (agent and workers, or the agent alone)."""
        return [r.node for r in self.nodes if r.lost]

    @property
    def attempts(self) -> int:
        return self.restarts + 1

    def attempt(self, n: int) -> list[WorkerResult]:
        """The workers of attempt ``n`` (0 = the first), by rank."""
        return [w for w in self.workers if w.attempt == n]

    @property
    def final(self) -> list[WorkerResult]:
        """The workers of the last attempt."""
        return self.attempt(self.restarts)

    @property
    def hung(self) -> list[WorkerResult]:
        return [w for w in self.workers if w.status == "hung"]

    def describe_end(self) -> str:
        if self.timed_out:
            return "ended by the harness at its deadline"
        lost = f" (lost: {', '.join(f'node {n}' for n in self.lost_nodes)})" if self.lost_nodes else ""
        if self.signal is not None:
            return f"{'an agent' if self.nodes else 'launcher'} died of {signal_name(self.signal)}{lost}"
        return f"exit code {self.exit_code}{lost}"

    def summary(self) -> str:
        plural = "" if self.restarts == 1 else "s"
        restarts = f"{self.restarts} restart{plural} (max_restarts={self.max_restarts})"
        head = f"{len(self.nodes)} nodes, node 0: " if self.nodes else ""
        lines = [f"{head}{self.command_line()}: {self.describe_end()} after {restarts}, {self.duration:.2f}s"]
        if self.nodes:
            lines += _table([("node", "address", "restarts", "agent")] +
                            [(str(n.node), n.address, str(n.restarts), n.describe_end()) for n in self.nodes])
        node = (lambda w: (str(w.node),)) if self.nodes else (lambda w: ())
        lines += _table([("attempt", *(("node",) if self.nodes else ()), "rank", "status", "time", "what happened")] +
                        [(str(w.attempt), *node(w), str(w.rank), w.status, _seconds(w.duration), w.detail())
                         for w in self.workers])
        lines += _plan_lines(self.plan, self.fault_events, self.unfired)
        return "\n".join(lines)

    def progress(self) -> str:
        """Where each worker was when its attempt ended, attempt by attempt (see ``GroupResult.progress``)."""
        out = []
        for n in range(self.restarts + 1):
            workers = self.attempt(n)
            if workers:
                events = [ev for ev in self.fault_events if getattr(ev, "attempt", 0) == n]
                out.append(f"attempt {n}: " + progress_table(workers, events))
        return "\n".join(out)

    def timeline(self, path) -> str:
        """Write a self-contained HTML picture of the run, one lane per worker, attempts side by side."""
        from pytest_ddpfault import timeline

        return timeline.write_html(path, timeline.torchrun_lanes(self), title=self.command_line())

    def trace(self, path) -> str:
        """Write the run as Chrome/Perfetto trace JSON (pid = attempt * 100 + rank, tid = group)."""
        from pytest_ddpfault import timeline

        return timeline.write_trace(path, timeline.torchrun_lanes(self))

    def report(self) -> str:
        out = [self.summary()]
        if any(w.ops for w in self.workers):
            out.append(self.progress())
        out += [w.report() for w in self.workers if w.status != "ok"]
        if self.launcher_stack:
            out.append("launcher stacks at the deadline (faulthandler):\n" + self.launcher_stack.rstrip())
        for name, text in (("launcher stdout", self.stdout), ("launcher stderr", self.stderr)):
            if text.strip():
                out.append(f"{name} (last 40 lines):\n" + "\n".join(text.rstrip().splitlines()[-40:]))
        return "\n".join(out)

    def command_line(self) -> str:
        shown = ["python" if self.command and arg == self.command[0] else arg for arg in self.command]
        return " ".join(a for a in shown if not a.startswith("--log-dir"))

    def assert_ok(self) -> None:
        if not self.ok:
            raise AssertionError(f"the launched run failed: {self.describe_end()}\n{self.report()}")

    def __repr__(self) -> str:
        return (f"<TorchrunResult {self.describe_end()} restarts={self.restarts} "
                f"workers={len(self.workers)} {self.duration:.2f}s>")
