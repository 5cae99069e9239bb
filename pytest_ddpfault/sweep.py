"""Sweeps: one fault at every point a fault-free run reached, each run judged against it.

``ddp.sweep(fn, kinds=["kill_rank"])`` (``api.DDP.sweep``) or ``sweep_group(fn, world_size=4)``:

1. a reference run without a fault; it must be all ok. Its operation logs give the points
   each rank reached: ``OP#N`` for every op it logged (DDP's C++ collectives too),
   ``step#N``, ``save#N``, ``load#N``; ``ops=`` keeps some op names;
2. one run per kind x target x point, the point only where the target reached it in the
   reference (for a fault that counts in another rank, a scoped network fault or a node
   fault: where that rank reached it);
3. the runs go side by side, as many as the rank-process cap allows, each with its own
   deadline; each gets one outcome, judged on the ranks its fault did not target (first
   match wins): ``wrong`` (one returned a value that differs from the reference's),
   ``hung`` (the deadline ended one), ``failed`` (one raised or exited), ``recovered``.

A fault that did not fire in its run is an error of the sweep (``SweepError``), not an
outcome: the point was in the reference, so the function did not do the same thing twice.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import html as _html
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from pytest_ddpfault import faults as _faults
from pytest_ddpfault.errors import FaultSpecError, HarnessWarning, SettingsError
from pytest_ddpfault.faults.triggers import COLLECTIVE_OPS, COUNTED_FORMS, KNOWN_OPS, Trigger
from pytest_ddpfault.results import GroupResult

__all__ = ["OUTCOMES", "SweepError", "SweepResult", "SweepRun", "ddp_sweep", "first_difference", "same_value",
           "sweep", "sweep_group"]

OUTCOMES = ("wrong", "hung", "failed", "recovered")
LETTERS = {"wrong": "W", "hung": "H", "failed": "F", "recovered": "R", "unfired": "!"}
MEANING = {
    "wrong": "a rank the fault did not target returned a value that differs from the reference's",
    "hung": "the run's deadline ended a rank the fault did not target",
    "failed": "a rank the fault did not target raised or exited (a loud failure)",
    "recovered": "every rank the fault did not target returned the reference's value",
    "unfired": "the fault never fired (an error of the sweep)",
}
NOT_REACHED = "."    # the target never reached that point in the reference: no run
LEFT_OUT = "-"       # reached, but max_runs left the point out
POINT_FORMS = ("op", *COUNTED_FORMS)   # the trigger forms a point has: OP#N, step#N, save#N, load#N
# what ops= may name: an op, step/save/load, or "collective" (every collective op)
OP_NAMES = (KNOWN_OPS - {"collective"}) | set(COUNTED_FORMS) | {"collective"}


class SweepError(RuntimeError):
    """The sweep itself could not be judged: a reference run that failed, or faults that
    never fired. ``sweep``: the ``SweepResult`` so far (None for a failed reference)."""

    def __init__(self, message: str, sweep: SweepResult | None = None) -> None:
        super().__init__(message)
        self.sweep = sweep


# --- comparing values --------------------------------------------------------------------------

def first_difference(ref: Any, got: Any, path: str = "") -> tuple[str, Any, Any] | None:
    """Where ``got`` first differs from ``ref``: ``(path, ref's part, got's part)``, or None when
    they are equal. Tensors are equal when dtype, shape and every element are (``torch.equal``),
    numpy arrays likewise; lists, tuples and dicts item by item; anything else by ``==``."""
    torch = sys.modules.get("torch")
    if torch is not None and (isinstance(ref, torch.Tensor) or isinstance(got, torch.Tensor)):
        same = (isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor) and ref.dtype == got.dtype
                and ref.shape == got.shape and ref.device == got.device and torch.equal(ref, got))
        return None if same else (path, ref, got)
    np = sys.modules.get("numpy")
    if np is not None and (isinstance(ref, np.ndarray) or isinstance(got, np.ndarray)):
        same = (isinstance(ref, np.ndarray) and isinstance(got, np.ndarray) and ref.dtype == got.dtype
                and ref.shape == got.shape and bool(np.array_equal(ref, got)))
        return None if same else (path, ref, got)
    if isinstance(ref, dict) and isinstance(got, dict):
        if type(ref) is not type(got) or list(ref) != list(got):
            return path, ref, got
        for key in ref:
            diff = first_difference(ref[key], got[key], f"{path}[{key!r}]")
            if diff is not None:
                return diff
        return None
    if isinstance(ref, (list, tuple)) and isinstance(got, (list, tuple)):
        if type(ref) is not type(got) or len(ref) != len(got):
            return path, ref, got
        for i, (a, b) in enumerate(zip(ref, got)):
            diff = first_difference(a, b, f"{path}[{i}]")
            if diff is not None:
                return diff
        return None
    if isinstance(ref, float) and isinstance(got, float) and math.isnan(ref) and math.isnan(got):
        return None   # the same result, not a difference
    try:
        return None if type(ref) is type(got) and bool(ref == got) else (path, ref, got)
    except Exception:  # an == that cannot say (an ambiguous truth value): not the same
        return path, ref, got


def same_value(ref: Any, got: Any) -> bool:
    """The default ``compare``: equality, tensors compared exactly, containers recursively."""
    return first_difference(ref, got) is None


def _short(value: Any, limit: int = 80) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- what a sweep runs ---------------------------------------------------------------------------

@dataclass(frozen=True)
class _Column:
    """One kind on one target: a column of the matrix."""

    kind: str            # the kind as given, normalised (``delay(seconds=0.05)``)
    base: Any            # its Fault (without rank/node/at)
    key: str             # what the target sets: "rank", "node", "ranks" or "nodes" ("" when the spec has it)
    target: Any          # an int (rank, node) or a tuple (a scope)
    label: str           # short, for the table: "r2", "n1", "ranks=(2,)"

    def fault(self, point: str):
        params = dict(self.base.params)
        if self.key:
            params[self.key] = self.target
        params["at"] = point
        return _faults.Fault(self.base.kind, **params)


@dataclass
class SweepRun:
    """One run of a sweep: ``fault`` (its spec: ``ddp.run(fn, faults=run.fault)`` replays it),
    ``kind`` (as given to ``kinds``), ``target`` (the rank or node, or the scope, it acts on),
    ``point`` (``all_reduce#3``, ``step#2``), ``outcome`` and ``why``, and ``result`` (its
    ``GroupResult``)."""

    fault: str
    kind: str
    target: Any
    point: str
    outcome: str = ""
    why: str = ""
    result: GroupResult | None = field(default=None, repr=False)
    column: int = field(default=0, repr=False)

    def __str__(self) -> str:
        return f"{self.fault}: {self.outcome} ({self.why})"


@dataclass
class SweepResult:
    """What a sweep did: the reference run, every run, and the matrix of outcomes."""

    fn: str
    world_size: int
    reference: GroupResult
    runs: list[SweepRun]
    points: list[str]                   # every point swept, in the order the reference reached them
    columns: list[tuple[str, str]]      # (kind, target label) per column
    reached: dict = field(default_factory=dict, repr=False)   # (point, column) -> True where a run was due
    planned: int = 0                    # runs due before max_runs
    max_runs: int | None = None
    duration: float = 0.0               # wall seconds, reference included
    lanes: int = 1                      # runs side by side
    nodes: int = 1
    compare: Callable = field(default=None, repr=False)   # how values were compared (default same_value)
    reference_seconds: float = 0.0      # wall seconds of the reference run, set-up and clean-up included

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[SweepRun]:
        return iter(self.runs)

    def __getitem__(self, i: int) -> SweepRun:
        return self.runs[i]

    def by_outcome(self) -> dict[str, list[SweepRun]]:
        out: dict[str, list[SweepRun]] = {o: [] for o in OUTCOMES}
        for run in self.runs:
            out.setdefault(run.outcome, []).append(run)
        return out

    def judge(self, result: GroupResult) -> str:
        """The outcome of ``result`` (a replay of a run, say) by this sweep's reference and compare."""
        return judge(result, self.reference, self.compare or same_value)[0]

    @property
    def unfired(self) -> list[SweepRun]:
        return [r for r in self.runs if r.outcome == "unfired"]

    # -- text -----------------------------------------------------------------
    def headline(self) -> str:
        counts = ", ".join(f"{len(v)} {k}" for k, v in self.by_outcome().items() if v)
        ran = f"{len(self.runs)} runs" if len(self.runs) == self.planned else \
            f"{len(self.runs)} runs of {self.planned} (max_runs={self.max_runs}: an even spread of the points)"
        return (f"sweep of {self.fn} ({self.world_size} ranks): {ran}, {counts or 'nothing ran'}; "
                f"{self.duration:.1f}s, the reference run {self.reference_seconds:.2f}s of it, {self.lanes} side by side")

    def table(self) -> str:
        """Points down, kind x target across, one letter per cell, and a legend."""
        grid = self._grid()
        point_w = max([len("point"), *(len(p) for p in self.points)])
        widths = [max(len(label), 1) for _, label in self.columns]
        groups: list[tuple[str, list[int]]] = []
        for i, (kind, _) in enumerate(self.columns):
            if groups and groups[-1][0] == kind:
                groups[-1][1].append(i)
            else:
                groups.append((kind, [i]))
        head1, head2 = " " * point_w, "point".ljust(point_w)
        for kind, cols in groups:
            span = sum(widths[i] + 1 for i in cols) - 1
            wide = max(span, len(kind))
            head1 += "  " + kind.ljust(wide)
            head2 += "  " + " ".join(self.columns[i][1].ljust(widths[i]) for i in cols).ljust(wide)
        lines = [self.headline(), head1.rstrip(), head2.rstrip()]
        for p in self.points:
            row = p.ljust(point_w)
            for kind, cols in groups:
                span = sum(widths[i] + 1 for i in cols) - 1
                row += "  " + " ".join(grid[(p, i)].ljust(widths[i]) for i in cols).ljust(max(span, len(kind)))
            lines.append(row.rstrip())
        shown = [o for o in (*OUTCOMES, "unfired") if any(r.outcome == o for r in self.runs)]
        lines.append("legend: " + "; ".join(f"{LETTERS[o]} {o}: {MEANING[o]}" for o in shown))
        marks = [f"{NOT_REACHED} the target never reached the point in the reference"]
        if len(self.runs) < self.planned:
            marks.append(f"{LEFT_OUT} left out by max_runs")
        lines.append("        " + "; ".join(marks) + "; r = rank, n = node")
        return "\n".join(lines)

    def _grid(self) -> dict:
        grid = {(p, i): LEFT_OUT if self.reached.get((p, i)) else NOT_REACHED
                for p in self.points for i in range(len(self.columns))}
        for run in self.runs:
            grid[(run.point, run.column)] = LETTERS.get(run.outcome, "?")
        return grid

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={len(v)}" for k, v in self.by_outcome().items() if v)
        return f"<SweepResult {self.fn}: {len(self.runs)} runs {counts}>"

    # -- assertions -------------------------------------------------------------
    def assert_never(self, *outcomes: str) -> None:
        """No run had any of ``outcomes``; else AssertionError listing each such run's spec
        (it replays with ``ddp.run(fn, faults=spec)``) and what made it so."""
        wanted = _check_outcomes(outcomes, "assert_never")
        bad = [r for r in self.runs if r.outcome in wanted]
        if bad:
            raise AssertionError(self._offending(f"{len(bad)} of {len(self.runs)} runs were "
                                                 f"{' or '.join(wanted)}", bad))

    def assert_all(self, outcome: str) -> None:
        """Every run had ``outcome``; else AssertionError listing the others."""
        [wanted] = _check_outcomes((outcome,), "assert_all")
        bad = [r for r in self.runs if r.outcome != wanted]
        if bad:
            raise AssertionError(self._offending(f"{len(bad)} of {len(self.runs)} runs were not {wanted}", bad))
        if not self.runs:
            raise AssertionError(f"the sweep ran nothing, so nothing was {wanted}\n{self.table()}")

    def _offending(self, head: str, runs: list[SweepRun]) -> str:
        lines = [f"{head} (replay one with ddp.run(fn, faults=<spec>)):"]
        lines += [f"  {r.fault}: {r.outcome}: {r.why}" for r in runs]
        return "\n".join([*lines, self.table()])

    # -- the picture ----------------------------------------------------------------
    def html(self, path) -> str:
        """Write a self-contained HTML page of the matrix, each cell linking to its run's
        timeline (written beside it, in ``<name>.runs/``); returns the path."""
        path = os.fspath(path)
        stem = os.path.splitext(os.path.basename(path))[0]
        folder = f"{stem}.runs"
        runs_dir = os.path.join(os.path.dirname(os.path.abspath(path)), folder)
        os.makedirs(runs_dir, exist_ok=True)
        links = {}
        for n, run in enumerate(self.runs, 1):
            if run.result is not None:
                run.result.timeline(os.path.join(runs_dir, f"run{n:04d}.html"))
                links[id(run)] = f"{folder}/run{n:04d}.html"
        self.reference.timeline(os.path.join(runs_dir, "reference.html"))
        with open(path, "w", encoding="utf-8") as f:
            f.write(_page(self, links, f"{folder}/reference.html"))
        return path


def _check_outcomes(outcomes: Sequence[str], where: str) -> tuple[str, ...]:
    if not outcomes:
        raise ValueError(f"{where}() needs at least one outcome: {', '.join(OUTCOMES)}")
    for o in outcomes:
        if o not in OUTCOMES:
            raise ValueError(f"{where}({o!r}): unknown outcome; outcomes are {', '.join(OUTCOMES)}")
    return tuple(outcomes)


_COLOURS = {"wrong": "#d32f2f", "hung": "#6a1b9a", "failed": "#f28e2b", "recovered": "#59a14f",
            "unfired": "#37474f"}


def _page(sweep: SweepResult, links: dict, reference_link: str) -> str:
    esc = _html.escape
    by_cell = {(r.point, r.column): r for r in sweep.runs}
    groups: list[tuple[str, int]] = []
    for kind, _ in sweep.columns:
        if groups and groups[-1][0] == kind:
            groups[-1] = (kind, groups[-1][1] + 1)
        else:
            groups.append((kind, 1))
    rows = ["<tr><th rowspan=2>point</th>" + "".join(f'<th colspan="{n}">{esc(k)}</th>' for k, n in groups) + "</tr>",
            "<tr>" + "".join(f"<th>{esc(label)}</th>" for _, label in sweep.columns) + "</tr>"]
    for p in sweep.points:
        cells = []
        for i in range(len(sweep.columns)):
            run = by_cell.get((p, i))
            if run is None:
                mark = LEFT_OUT if sweep.reached.get((p, i)) else NOT_REACHED
                why = "left out by max_runs" if mark == LEFT_OUT else "not reached by the target in the reference"
                cells.append(f'<td class="empty" title="{esc(why)}">{mark}</td>')
                continue
            letter = LETTERS.get(run.outcome, "?")
            title = esc(f"{run.fault}\n{run.outcome}: {run.why}")
            link = links.get(id(run))
            inner = f'<a href="{esc(link)}">{letter}</a>' if link else letter
            cells.append(f'<td class="cell {esc(run.outcome)}" data-outcome="{esc(run.outcome)}" '
                         f'data-fault="{esc(run.fault)}" title="{title}">{inner}</td>')
        rows.append(f"<tr><th class=point>{esc(p)}</th>{''.join(cells)}</tr>")
    legend = "".join(f'<li><span class="cell {o}">{LETTERS[o]}</span> {o}: {esc(MEANING[o])}</li>'
                     for o in (*OUTCOMES, "unfired") if o != "unfired" or sweep.unfired)
    legend += f"<li><span>{NOT_REACHED}</span> the target never reached the point in the reference</li>"
    if len(sweep.runs) < sweep.planned:
        legend += f"<li><span>{LEFT_OUT}</span> left out by max_runs</li>"
    style = "\n".join(
        [".cell a{color:inherit;text-decoration:none;display:block}",
         "table{border-collapse:collapse;font:13px monospace}",
         "th,td{border:1px solid #ccc;padding:2px 6px;text-align:center}",
         "th.point{text-align:left;font-weight:normal}", "td.empty{color:#999}",
         "ul{list-style:none;padding:0;font:13px sans-serif}",
         "li span{display:inline-block;width:1.4em;text-align:center;margin-right:.4em}",
         "body{font:14px sans-serif;margin:16px}"]
        + [f".cell.{o}{{background:{c};color:#fff;font-weight:bold}}" for o, c in _COLOURS.items()])
    return (f"<!doctype html>\n<html><head><meta charset=utf-8><title>{esc(sweep.headline())}</title>"
            f"<style>{style}</style></head><body>\n<h1>{esc(f'sweep of {sweep.fn}')}</h1>\n"
            f"<p>{esc(sweep.headline())}. <a href=\"{esc(reference_link)}\">the reference run</a>; "
            f"each cell links to its run's timeline, its tooltip holds the fault spec.</p>\n"
            f"<table class=matrix>\n" + "\n".join(rows) + f"\n</table>\n<ul class=legend>{legend}</ul>\n"
            f"</body></html>\n")


# --- planning ------------------------------------------------------------------------------------

def _index_set(values, what: str, size: int, source: str) -> tuple[int, ...] | None:
    if values is None:
        return None
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    try:
        items = tuple(values)
    except TypeError:
        raise SettingsError(f"{source}={values!r}: expected a list of {what}s (0..{size - 1})") from None
    if not items:
        raise SettingsError(f"{source}=[]: name at least one {what} (0..{size - 1}), or leave it out for all")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < size:
            raise SettingsError(f"{source}={list(items)!r}: {v!r} is not a {what} of the group; allowed 0..{size - 1}")
    return tuple(dict.fromkeys(items))


def _kind_list(kinds) -> list:
    if isinstance(kinds, (str, _faults.Fault)):
        kinds = [kinds]
    try:
        items = list(kinds)
    except TypeError:
        raise SettingsError(f"kinds={kinds!r}: expected a list of fault kinds, e.g. ['kill_rank', "
                            f"'delay(seconds=0.05)']") from None
    if not items:
        raise SettingsError("kinds=[]: name at least one fault kind, e.g. ['kill_rank']")
    out = []
    for item in items:
        try:
            fault = _faults.Fault.parse(item)
        except FaultSpecError as exc:
            raise SettingsError(f"kinds: {exc}") from None
        for key in ("rank", "node", "at"):
            if key in fault.params:
                raise SettingsError(f"kinds: {str(fault)!r} gives {key}=; the sweep sets it for each run "
                                    f"(name targets with ranks=/nodes=, points with ops=): remove it")
        forms = fault.definition.trigger_forms & set(POINT_FORMS)
        if not forms:
            raise SettingsError(f"kinds: {fault.kind} cannot fire at a point of the run (OP#N, step#N, save#N, "
                                f"load#N); its triggers are {', '.join(sorted(fault.definition.trigger_forms)) or 'none'}")
        out.append(fault)
    return list(dict.fromkeys(out))   # a kind given twice is swept once


def _columns(kinds: list, ranks, nodes, world_size: int, n_nodes: int) -> list[_Column]:
    """Each kind on each of its targets, asking the kind what it takes: a scope (a network
    kind: ``nodes=(n,)`` per node when the group has nodes or ``nodes=`` is given, else
    ``ranks=(r,)`` per rank), a node (a node kind) or a rank."""
    cols: list[_Column] = []
    used_ranks = used_nodes = False
    for fault in kinds:
        keys = fault.definition.keys
        name = str(fault)
        if "ranks" in keys and "nodes" in keys:               # a scoped kind
            if fault.get("ranks") is not None or fault.get("nodes") is not None:
                cols.append(_Column(name, fault, "", None, "scope"))
            elif nodes is not None or (n_nodes > 1 and ranks is None):
                used_nodes = True
                cols += [_Column(name, fault, "nodes", (n,), f"n{n}") for n in (nodes or range(n_nodes))]
            else:
                used_ranks = True
                cols += [_Column(name, fault, "ranks", (r,), f"r{r}") for r in (ranks or range(world_size))]
        elif "node" in keys:                                  # a node kind
            used_nodes = True
            cols += [_Column(name, fault, "node", n, f"n{n}") for n in (nodes or range(n_nodes))]
        elif fault.definition.takes_rank:                     # a rank kind
            used_ranks = True
            cols += [_Column(name, fault, "rank", r, f"r{r}") for r in (ranks or range(world_size))]
        else:
            raise SettingsError(f"kinds: {fault.kind} acts on the whole group, not on a rank or a node: "
                                f"a sweep has no target to move it over")
    if ranks is not None and not used_ranks:
        raise SettingsError(f"ranks={list(ranks)}: none of the kinds takes a rank (node kinds take nodes=)")
    if nodes is not None and not used_nodes:
        raise SettingsError(f"nodes={list(nodes)}: none of the kinds takes a node (kinds: "
                            f"{', '.join(str(k) for k in kinds)}; rank kinds take ranks=)")
    for col in cols:  # each target against the group, at a point every kind takes
        form = sorted(col.base.definition.trigger_forms & set(POINT_FORMS))[0]
        probe = col.fault("step#1" if form == "step" else f"{form}#1" if form in COUNTED_FORMS else "all_reduce#1")
        try:
            _faults.validate_plan([probe], world_size, n_nodes)
        except FaultSpecError as exc:
            raise SettingsError(f"kinds: {col.kind} on {col.key or 'its scope'} {col.target}: {exc}") from None
        hit = probe.definition.target_ranks(probe, world_size, n_nodes)
        if len(hit) == world_size:
            raise SettingsError(f"kinds: {col.kind} on {col.key} {col.target} targets every rank of the group "
                                f"(world_size={world_size}, nodes={n_nodes}): no rank is left to judge the run by")
    return cols


def _op_filter(ops) -> frozenset | None:
    if ops is None:
        return None
    if isinstance(ops, str):
        ops = [ops]
    names = list(ops)
    if not names:
        raise SettingsError("ops=[]: name at least one op (all_reduce, broadcast, ...; step, save, load), "
                            "or leave it out for every point")
    for n in names:
        if n not in OP_NAMES:
            from pytest_ddpfault.faults._words import did_you_mean

            raise SettingsError(f"ops: {n!r} is not an op{did_you_mean(str(n), OP_NAMES)}; allowed: step, save, "
                                f"load, collective (every collective) or one of {', '.join(sorted(KNOWN_OPS - {'collective'}))}")
    keep = set(names)
    if "collective" in keep:
        keep |= COLLECTIVE_OPS
    return frozenset(keep)


def reference_points(reference: GroupResult, ops=None) -> tuple[list[str], dict[int, set[str]]]:
    """Every point the reference reached, ordered by when it was first reached, and per rank
    the points it reached: ``OP#N`` per logged op, ``step#N`` per step mark (save/load are
    logged ops). ``ops``: the names to keep (None: all)."""
    keep = _op_filter(ops)
    first: dict[str, float] = {}
    per_rank: dict[int, set[str]] = {}
    for r in reference.ranks:
        marks = [(op.name, op.seq, op.start) for op in r.ops if op.name in KNOWN_OPS or op.name in COUNTED_FORMS]
        marks += [("step", s.seq, s.time) for s in r.steps]
        mine = per_rank.setdefault(r.rank, set())
        for name, seq, when in marks:
            if name == "collective" or (keep is not None and name not in keep):
                continue
            point = str(Trigger.parse(f"{name}#{seq}"))
            mine.add(point)
            first[point] = min(first.get(point, when), when)
    return sorted(first, key=lambda p: (first[p], p)), per_rank


def _evenly(n: int, k: int) -> list[int]:
    """``k`` of the indices ``0..n-1``, evenly spread, the first and the last among them
    (one alone: the middle one)."""
    if k <= 1:
        return [n // 2]
    return sorted({int(i * (n - 1) / (k - 1) + 0.5) for i in range(k)})


def _spread(points: list[str], due: dict[str, list], max_runs: int) -> list[str]:
    """The most points, evenly spread over the run, whose runs fit in ``max_runs``."""
    for k in range(len(points), 0, -1):
        picked = _evenly(len(points), k)
        chosen = [points[i] for i in picked]
        if sum(len(due[p]) for p in chosen) <= max_runs:
            return chosen
    return []


# --- running ----------------------------------------------------------------------------------

def judge(result: GroupResult, reference: GroupResult, compare: Callable[[Any, Any], bool]) -> tuple[str, str]:
    """``(outcome, why)`` of a run against the reference, from the ranks the fault did not target."""
    judged = [r for r in result.ranks if r.rank not in result.faulted_ranks]
    for r in judged:
        ref = reference[r.rank].value
        if r.ok and not compare(ref, r.value):
            diff = first_difference(ref, r.value) if compare is same_value else None
            where = f" at {diff[0]}" if diff and diff[0] else ""
            shown = (diff[1], diff[2]) if diff else (ref, r.value)
            limit = 80 if diff else 240   # a compare of its own: the whole values, it knows what differs
            return "wrong", (f"rank {r.rank} returned {_short(shown[1], limit)}{where}, "
                             f"the reference {_short(shown[0], limit)}")
    for r in judged:
        if r.status == "hung":
            return "hung", f"rank {r.rank}: {r.detail()}"
    for r in judged:
        if not r.ok:
            return "failed", f"rank {r.rank}: {r.detail()}"
    return "recovered", f"rank{'s' if len(judged) > 1 else ''} {', '.join(str(r.rank) for r in judged)} " \
                        f"returned the reference's value{'s' if len(judged) > 1 else ''}"


def _lanes(config, max_procs: int | None, runs: int) -> int:
    """Runs side by side: as many as the rank-process cap holds (ranks + the store host each)."""
    from pytest_ddpfault.parent.slots import default_max_procs

    cap = config.slots.max_procs if config.slots is not None else (max_procs or default_max_procs())
    return max(1, min(runs, cap // (config.world_size + 1)))


def _run_one(fn, args, kwargs, config, shared=None) -> GroupResult:
    from pytest_ddpfault.parent.run import GroupRun

    if shared is None:
        return GroupRun(fn, args, kwargs, config).run()

    class SharedRun(GroupRun):
        def _launcher(self):
            return shared.view()

    return SharedRun(fn, args, kwargs, config).run()


def _run_all(fn, args, kwargs, configs: list, lanes: int) -> list[GroupResult]:
    """Every config's run, ``lanes`` at a time (threads; one zygote shared through
    parent/multiplex.py). The first harness error stops the sweep once the runs under way end."""
    if lanes <= 1 or len(configs) <= 1:
        return [_run_one(fn, args, kwargs, c) for c in configs]
    from pytest_ddpfault.parent.launcher import ZygoteLauncher, get_launcher
    from pytest_ddpfault.parent.multiplex import SharedZygote

    first = configs[0]
    launcher = None
    if first.start_method == "forkserver":
        launcher = get_launcher(first.start_method, tuple(first.preload))
    shared = SharedZygote(launcher) if isinstance(launcher, ZygoteLauncher) else None
    results: list[GroupResult | None] = [None] * len(configs)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="ddpfault-sweep")
    try:
        if shared is not None:
            shared.__enter__()
        futures = {pool.submit(_run_one, fn, args, kwargs, c, shared): i for i, c in enumerate(configs)}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()   # the first error: raised here
    finally:
        pool.shutdown(wait=True, cancel_futures=True)    # runs under way end by their own deadline
        if shared is not None:
            shared.__exit__(None, None, None)
    return results  # type: ignore[return-value]


def sweep(fn: Callable, args: tuple, kwargs: dict, config, *, kinds=("kill_rank",), ranks=None, nodes=None,
          ops=None, compare=None, max_runs=None, max_procs: int | None = None) -> SweepResult:
    """The engine behind ``ddp.sweep`` and ``sweep_group``; ``config`` is the runs' ``RunConfig``
    (its ``faults`` are ignored)."""
    ws, n_nodes = config.world_size, config.nodes
    if compare is not None and not callable(compare):
        raise SettingsError(f"compare={compare!r}: expected a function compare(reference_value, value) -> bool")
    if max_runs is not None and (isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1):
        raise SettingsError(f"max_runs={max_runs!r}: expected a whole number >= 1 (or None for every run)")
    parsed = _kind_list(kinds)
    ranks = _index_set(ranks, "rank", ws, "ranks")
    nodes = _index_set(nodes, "node", n_nodes, "nodes")
    columns = _columns(parsed, ranks, nodes, ws, n_nodes)
    _op_filter(ops)  # bad names fail before the reference runs
    compare = compare or same_value
    name = getattr(fn, "__qualname__", None) or repr(fn)

    if config.start_method == "forkserver":   # the zygote's start-up is in no sweep's clock (as in no run's)
        from pytest_ddpfault.parent.launcher import get_launcher

        get_launcher(config.start_method, tuple(config.preload))
    started = time.monotonic()
    reference = _run_one(fn, args, kwargs, dataclasses.replace(config, faults=()))
    reference_seconds = time.monotonic() - started
    if not reference.ok:
        raise SweepError(f"the reference run of {name} (no fault) did not return in every rank, so there is "
                         f"nothing to judge the sweep's runs by:\n{reference.report()}")
    dropped = [r.rank for r in reference.ranks if r.ops_dropped]
    if dropped:
        warnings.warn(HarnessWarning(f"the operation logs of ranks {dropped} dropped their oldest records: the "
                                     f"earliest points of those ranks are not swept"), stacklevel=3)
    points, per_rank = reference_points(reference, ops)
    if not points:
        logged = sorted({op.name for r in reference.ranks for op in r.ops} | ({"step"} if any(
            r.steps for r in reference.ranks) else set()))
        raise SettingsError(f"the reference run reached no point to sweep{f' named by ops={list(ops)}' if ops else ''}"
                            f"; it logged: {', '.join(logged) or 'nothing'}")

    # (point, column) -> the run's fault, where the rank its trigger counts in reached the point
    due: dict[str, list] = {p: [] for p in points}
    reached: dict = {}
    for p in points:
        form = Trigger.parse(p).kind
        for i, col in enumerate(columns):
            if form not in col.base.definition.trigger_forms:
                continue
            fault = col.fault(p)
            if p in per_rank.get(fault.resolved_rank(ws, n_nodes), ()):
                due[p].append((i, fault))
                reached[(p, i)] = True
    planned = sum(len(v) for v in due.values())
    if planned == 0:
        raise SettingsError(f"no run to make: the targets ({', '.join(c.label for c in columns)}) reached none of "
                            f"the points {', '.join(points[:8])}{' ...' if len(points) > 8 else ''} in the "
                            f"reference, or the kinds cannot fire there")
    chosen = points if max_runs is None or planned <= max_runs else _spread(points, due, max_runs)
    todo = [(p, i, f) for p in chosen for i, f in due[p]]
    if max_runs is not None and len(todo) > max_runs:   # one point alone holds more runs than that
        todo = [todo[k] for k in _evenly(len(todo), max_runs)]

    configs = [dataclasses.replace(config, faults=(f,)) for _, _, f in todo]
    lanes = _lanes(config, max_procs, len(configs))
    results = _run_all(fn, args, kwargs, configs, lanes)
    runs = []
    for (p, i, f), result in zip(todo, results):
        col = columns[i]
        run = SweepRun(str(f), col.kind, col.target, p, result=result, column=i)
        if result.unfired:
            run.outcome, run.why = "unfired", "; ".join(u.reason for u in result.unfired)
        else:
            run.outcome, run.why = judge(result, reference, compare)
        runs.append(run)
    out = SweepResult(name, ws, reference, runs, points, [(c.kind, c.label) for c in columns], reached, planned,
                      max_runs, round(time.monotonic() - started, 3), lanes, n_nodes, compare,
                      round(reference_seconds, 3))
    return out


def check_unfired(result: SweepResult) -> SweepResult:
    """``result``, or ``SweepError`` when a run's fault never fired."""
    missed = result.unfired
    if missed:
        lines = "\n".join(f"  {r.fault}: {r.why}" for r in missed)
        raise SweepError(f"{len(missed)} of {len(result.runs)} faults never fired, although the reference run "
                         f"reached their point (does {result.fn} do the same in every run?):\n{lines}\n"
                         f"{result.table()}", result)
    return result


SWEEP_DEFAULTS = {"kinds": ("kill_rank",), "ranks": None, "nodes": None, "ops": None, "compare": None,
                  "max_runs": None, "init": False}


def ddp_sweep(ddp, fn: Callable, args: tuple, kwargs: dict, given: dict) -> SweepResult:
    """``ddp.sweep``: the runs are ``ddp.run``'s (world size, nodes, backend, proxy, start
    method); ``given``: the sweep's keywords the caller gave (``timeout`` defaults to the
    marker's). The result is kept in ``ddp.sweeps`` (a failing test's report shows it), also
    when a fault never fired (``SweepError``)."""
    from pytest_ddpfault.parent.run import RunConfig
    from pytest_ddpfault.settings import check_run_keywords, check_timeout

    check_run_keywords(fn, args, kwargs, given, "ddp.sweep")
    options = {**SWEEP_DEFAULTS, **given}
    timeout = check_timeout(options.pop("timeout"), "ddp.sweep(timeout=...)") if "timeout" in options else ddp.timeout
    config = RunConfig(world_size=ddp.world_size, nodes=ddp.nodes, timeout=timeout, backend=ddp.backend,
                       init=options.pop("init"), proxy=ddp.proxy, start_method=ddp.start_method,
                       preload=ddp.preload, toxiproxy=_resolved_toxiproxy(ddp.toxiproxy, options["kinds"]),
                       slots=ddp.slots, network=ddp.network)
    result = sweep(fn, args, kwargs, config, max_procs=ddp.max_procs, **options)
    ddp.sweeps.append(result)
    return check_unfired(result)


def sweep_group(fn: Callable, *args, world_size: int, nodes: int = 1, kinds=("kill_rank",), ranks=None,
                target_nodes=None, ops=None, compare=None, max_runs=None, timeout: float = 60.0,
                init: bool = False, backend: str = "gloo", proxy: bool = False, start_method: str = "forkserver",
                preload: tuple = (), env: dict | None = None, toxiproxy=None, max_procs: int | None = None,
                **kwargs) -> SweepResult:
    """``ddp.sweep`` without pytest: ``world_size`` ranks on ``nodes`` virtual nodes (as in
    ``run_group``); ``target_nodes`` is what ``ddp.sweep`` calls ``nodes`` (the nodes that node
    kinds and scoped network kinds are moved over). ``max_procs``: the cap on rank processes
    running at once (default ``max(8, 4 x CPUs)``)."""
    from pytest_ddpfault.parent.run import RunConfig
    from pytest_ddpfault.settings import check_nodes, check_timeout, check_world_size

    check_world_size(world_size, "sweep_group(world_size=...)")
    check_nodes(nodes, world_size, "sweep_group(nodes=...)")
    check_timeout(timeout, "sweep_group(timeout=...)")
    if max_procs is not None and (isinstance(max_procs, bool) or not isinstance(max_procs, int) or max_procs < 1):
        raise SettingsError(f"sweep_group(max_procs={max_procs!r}): expected a whole number >= 1")
    config = RunConfig(world_size=world_size, nodes=nodes, timeout=timeout, backend=backend, init=init, proxy=proxy,
                       start_method=start_method, preload=tuple(preload), env=dict(env or {}),
                       toxiproxy=_resolved_toxiproxy(toxiproxy, kinds))
    return check_unfired(sweep(fn, args, kwargs, config, kinds=kinds, ranks=ranks, nodes=target_nodes, ops=ops,
                               compare=compare, max_runs=max_runs, max_procs=max_procs))


def _resolved_toxiproxy(source, kinds):
    """Toxiproxy, found once here (not from the runs' threads) when a kind needs it."""
    try:
        parsed = _kind_list(kinds)
    except SettingsError:
        return source  # the sweep says what is wrong with them
    if not any(f.definition.needs_proxy for f in parsed):
        return source
    from pytest_ddpfault.toxiproxy.client import resolve_api

    return resolve_api(source)
