"""Pictures of a run from its results: a self-contained HTML timeline and Chrome/Perfetto
trace JSON (``GroupResult.timeline``/``.trace``, ``TorchrunResult.timeline``/``.trace``).

The HTML page needs no network and no JavaScript for the basics: the lanes are inline SVG
drawn here, and every bar, step mark and fault carries a ``<title>`` (the browser's own
tooltip). Its script adds a details panel that follows the mouse, and the zoom: buttons, the
wheel, a drag across the lanes, ``#view=A-B`` (seconds) in the address; every mark carries
its times (``data-t``, ``data-t0``/``data-t1``) and the script places it again for the
stretch shown, with round ticks (``ticks``) for it.

Lanes: one per rank (per worker and attempt for a launched run, attempts one after the
other on the same clock). Ops are bars from start to end; an op still in flight when the
rank ended runs, hatched, to the rank's end — for a hung rank, the harness's deadline.
What each fault did (``fault_marks``) is drawn on every lane it touched, named on a strip
at the top of the lane and tinted behind the ops: for as long as its kind says it acts
(``FaultKind.acts_for``: a delay's seconds, a freeze to ``resume_after`` or the end, a
network fault until the harness lifted it), or as a moment (a kill, a torn save).
Pure rendering: no torch, no processes.
"""
from __future__ import annotations

import html
import json
import math
import os
import zlib

from pytest_ddpfault.faults import Fault, FaultSpecError
from pytest_ddpfault.frames import strip_build_paths

__all__ = ["fault_marks", "group_lanes", "ticks", "torchrun_lanes", "write_html", "write_trace"]

_PALETTE = {
    "all_reduce": "#4e79a7", "broadcast": "#f28e2b", "all_gather": "#59a14f", "barrier": "#b07aa1",
    "reduce_scatter": "#76b7b2", "send": "#edc948", "recv": "#9c755f", "isend": "#edc948",
    "irecv": "#9c755f", "init": "#bab0ac", "all_gather_into_tensor": "#59a14f", "reduce": "#86bcb6",
}
_STATUS_COLOUR = {"ok": "#2e7d32", "raised": "#c62828", "killed": "#6a1b9a", "exited": "#ef6c00", "hung": "#37474f"}


def _colour(name: str) -> str:
    if name in _PALETTE:
        return _PALETTE[name]
    h = zlib.crc32(name.encode()) % 360
    return f"hsl({h},55%,55%)"


def _lane(label: str, pid: int, r, events: list, faulted: bool, attempt: int | None) -> dict:
    end = r.end_time
    start = max(0.0, end - r.duration) if end is not None and r.duration is not None else 0.0
    return {"label": label, "pid": pid, "rank": r.rank, "attempt": attempt, "status": r.status,
            "detail": strip_build_paths(r.detail()), "start": start, "end": end, "ops": list(r.ops),
            "node": getattr(r, "node", None),
            "steps": list(r.steps), "events": events, "faulted": faulted}


def group_lanes(res) -> dict:
    """The drawing model of a ``GroupResult``."""
    nodes = len({r.node for r in res.ranks}) > 1
    lanes = [_lane(f"rank {r.rank}" + (f" (node {r.node})" if nodes else ""), r.rank, r,
                   [ev for ev in res.fault_events if ev.rank == r.rank], r.rank in res.faulted_ranks, None)
             for r in res.ranks]
    return {"lanes": lanes, "group_events": [ev for ev in res.fault_events if ev.rank is None],
            "duration": res.duration, "summary": res.summary(),
            "progress": res.progress() if any(r.ops for r in res.ranks) else ""}


def torchrun_lanes(res) -> dict:
    """The drawing model of a ``TorchrunResult``: lanes by attempt, then rank."""
    lanes = []
    for w in res.workers:
        events = [ev for ev in res.fault_events if ev.rank == w.rank and getattr(ev, "attempt", 0) == w.attempt]
        lanes.append(_lane(f"attempt {w.attempt} · rank {w.rank}", w.attempt * 100 + w.rank, w, events,
                           bool(events), w.attempt))
    return {"lanes": lanes, "group_events": [ev for ev in res.fault_events if ev.rank is None],
            "duration": res.duration, "summary": res.summary(),
            "progress": res.progress() if any(w.ops for w in res.workers) else ""}


def _span(model: dict) -> float:
    times = [model["duration"] or 0.0]
    for lane in model["lanes"]:
        times += [lane["end"] or 0.0] + [o.end or o.start for o in lane["ops"]] + [s.time for s in lane["steps"]]
        times += [ev.time for ev in lane["events"]]
    times += [ev.time for ev in model["group_events"]]
    return max(max(times), 1e-3) * 1.02


def ticks(v0: float, v1: float, target: int = 10) -> list[tuple[float, str]]:
    """Axis ticks from ``v0`` to ``v1`` seconds at a round step (1, 2 or 5 times a power of
    ten: the smallest that leaves ``target`` steps or fewer), each with its label. The page's script does the same
    for the stretch shown after a zoom."""
    raw = max(v1 - v0, 1e-9) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw * 0.999)
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    k, out = math.ceil(v0 / step - 1e-9), []
    while k * step <= v1 + step * 1e-9:
        out.append((k * step, f"{k * step:.{decimals}f} s"))
        k += 1
    return out


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _op_text(op, lane_end: float | None) -> str:
    if op.in_flight:
        until = f"still in flight at the rank's end (t={lane_end:.3f}s)" if lane_end is not None else "in flight"
        timing = f"started t={op.start:.3f}s, {until}"
    else:
        timing = f"t={op.start:.3f}s to {op.end:.3f}s ({(op.end - op.start) * 1000:.2f} ms)"
    where = f", group {op.group}" if op.group else ""
    return (f"{op.name} #{op.seq} ({op.source}{where})\n{_size(op.bytes)}\n{timing}"
            + ("\nraised" if op.failed else ""))


def _end_text(lane: dict) -> str:
    if lane["status"] == "hung":
        return f"hung: {lane['detail']}"
    return f"{lane['status']}: {lane['detail']}"


# -- what each fault did, on every lane it touched ----------------------------------------------

def _lasts(ev) -> tuple[float | None, bool]:
    """How long the event's fault acted (``FaultKind.acts_for``; 0.0: a moment, None: to the
    end) and whether it froze its rank."""
    try:
        fault = Fault.parse(ev.spec) if ev.spec else None
    except FaultSpecError:
        fault = None
    if fault is None:
        return 0.0, False
    return fault.definition.acts_for(fault, ev.trigger), fault.definition.freezes_rank


def _touched(ev, home: int | None, lanes: list[dict]) -> list[int]:
    """The lanes an event's fault acted on: both sides of a scoped network fault, every rank
    of a node, its rank, else (the group's store, port, ...) every lane (of its attempt)."""
    attempt = getattr(ev, "attempt", None)
    same = [i for i, lane in enumerate(lanes) if attempt is None or lane["attempt"] in (None, attempt)]
    if ev.scope:
        return same
    if ev.node is not None and any(lanes[i].get("node") == ev.node for i in same):
        return [i for i in same if lanes[i].get("node") == ev.node]
    if home is not None:
        return [home]
    if ev.rank is not None:
        return [i for i in same if lanes[i]["rank"] == ev.rank]
    return same


def _ranks_text(ranks) -> str:
    ranks = sorted(ranks)
    return f"rank{'s' if len(ranks) != 1 else ''} {', '.join(map(str, ranks))}"


def fault_marks(model: dict) -> list[dict]:
    """What each fired fault did, one mark per lane it touched: ``lane`` (index), ``t0``,
    ``t1`` (None for a moment), ``style`` (``acting``, ``frozen``, ``links``, ``moment``),
    ``label`` (drawn) and ``text`` (the tooltip)."""
    lanes = model["lanes"]
    events = [(i, ev) for i, lane in enumerate(lanes) for ev in lane["events"]]
    events += [(None, ev) for ev in model["group_events"]]
    events = [(home, ev, *_lasts(ev)) for home, ev in sorted(events, key=lambda he: he[1].time)]
    marks, lifts = [], set()
    for n, (home, ev, lasts, freezes) in enumerate(events):
        style = "moment" if lasts == 0 else "links" if ev.scope else "frozen" if freezes else "acting"
        if style == "moment" and id(ev) in lifts:
            continue  # the end of a span drawn already
        # a fault the harness lifts (a partition's duration, a held port) ends when it did so
        lifting = next((later for _, later, after, _ in events[n + 1:]
                        if after == 0 and later.spec == ev.spec and style != "moment"), None)
        lifts.add(id(lifting))
        lifted = lifting.time if lifting is not None else None
        touched = _touched(ev, home, lanes)
        for i in touched:
            lane = lanes[i]
            end = lane["end"] if lane["end"] is not None else model["duration"]
            if end is not None and end < ev.time and style != "moment":
                continue  # the rank had ended before the fault came
            label = ev.kind
            if style == "moment":
                t1 = None
                if ev.detail and len(ev.detail) <= 24:
                    label = f"{ev.kind}: {ev.detail}"
                how = "at that moment"
            else:
                t1 = lifted if lifted is not None else end if lasts is None else ev.time + lasts
                t1 = t1 if end is None else min(end, t1)
                label += " to the end" if lasts is None else f" {lasts:g} s"
                how = (f"acting from t={ev.time:.3f}s " + ("to the rank's end" if lasts is None else
                       f"for {lasts:g} s") + (f", lifted at t={lifted:.3f}s" if lifted is not None else "")
                       + (f" (drawn to t={t1:.3f}s)" if t1 is not None else ""))
            if ev.scope:
                other = {lanes[j]["rank"] for j in touched} - set(ev.scope)
                side = other if lane["rank"] in ev.scope else set(ev.scope)
                label += f" ↔ {_ranks_text(side)}"
                how += f"; {_ranks_text(ev.scope)} on one side, {_ranks_text(other)} on the other"
            marks.append({"lane": i, "t0": ev.time, "t1": t1, "style": style, "label": label,
                          "text": f"{ev}\n{how}"})
    return marks


# -- the page -----------------------------------------------------------------------------------

# Every kind of mark the page can draw: its legend icon (SVG, 22x14) and what it means.
_LEGEND = {
    "hatched": ('<rect x="1" y="2" width="20" height="10" fill="#888"/><rect x="1" y="2" width="20" height="10" '
                'fill="url(#hatch)" class="inflight-edge"/>', "op in flight when the rank ended"),
    "failed": ('<rect x="1" y="2" width="20" height="10" fill="#888" class="failed-edge"/>', "op that raised"),
    "step": ('<line x1="11" y1="0" x2="11" y2="14" class="step-line"/>', "step() (its number below)"),
    "acting": ('<rect x="1" y="1" width="20" height="12" class="tint-acting"/><rect x="1" y="1" width="20" '
               'height="5" class="strip-acting"/>', "fault acting on the rank (its name and seconds on it)"),
    "frozen": ('<rect x="1" y="1" width="20" height="12" class="tint-frozen"/><rect x="1" y="1" width="20" '
               'height="5" class="strip-frozen"/>', "rank frozen (SIGSTOP)"),
    "links": ('<rect x="1" y="1" width="20" height="12" class="tint-links"/><rect x="1" y="1" width="20" '
              'height="5" class="strip-links"/>', "links faulted, drawn on both sides (↔ the other side)"),
    "moment": ('<path d="M11,1 l5,6 l-5,6 l-5,-6 z" class="diamond"/>',
               "a fault's moment (kill, crash, torn save, a fault lifted)"),
    "life": ('<rect x="1" y="6" width="20" height="2" fill="#2e7d32"/>', "rank running, coloured by how it ended:"),
    "cross": ('<path d="M5,2 l10,10 M15,2 l-10,10" stroke="#c62828" stroke-width="3"/>',
              "raised, killed or exited"),
    "hung": ('<path d="M6,2 h3 v10 h-3 z M12,2 h3 v10 h-3 z" fill="#37474f"/>', "hung to the harness's deadline"),
}
_LANE_H, _BAR_H, _STRIP_H, _LABEL_W, _PLOT_W, _TOP = 50, 18, 13, 190, 960, 30
_PLOT_END = _LABEL_W + _PLOT_W   # the plot's right edge; long lane labels take from its left
_ROW_H = _STRIP_H + 1   # a lane's strip grows a row for each fault that overlaps another in time


def _at(t: float, x: float, inner: str, cls: str, text: str | None = None, attrs: str = "") -> str:
    """A mark at one moment: drawn around x=0 and moved there (the script moves it on zoom)."""
    e = html.escape
    detail = f' data-detail="{e(text)}"' if text is not None else ""
    title = f"<title>{e(text)}</title>" if text is not None else ""
    return (f'<g class="{cls}" data-t="{t:.6f}" transform="translate({x:.1f},0)"{detail}{attrs}>'
            f'{inner}{title}</g>')


def _range(t0: float, t1: float, x, y: float, h: float, attrs: str, minw: float = 0.0) -> str:
    """A rect from t0 to t1 seconds (the script resizes it on zoom)."""
    return (f'<rect data-t0="{t0:.6f}" data-t1="{t1:.6f}" data-minw="{minw:g}" x="{x(t0):.1f}" y="{y:.1f}" '
            f'width="{max(minw, x(t1) - x(t0)):.1f}" height="{h:.1f}" {attrs}/>')


def _strip_rows(own: list[dict]) -> list[int]:
    """Each of a lane's marks' row in its strip: spans that overlap in time on rows of their
    own (first fit, in time order), moments on the first."""
    rows, free_from = [], []
    for m in own:
        row = 0 if m["t1"] is None else next((k for k, t in enumerate(free_from) if t <= m["t0"]), len(free_from))
        if m["t1"] is not None:
            free_from[row:row + 1] = [m["t1"]]
        rows.append(row)
    return rows


def _place_labels(own: list[dict], rows: list[int], x) -> list[dict]:
    """Where each fault's name goes in its lane's strip: a span's inside it where it fits, else
    after it; a moment's after its diamond, or before it where the plot ends first. A name
    outside its span that would cover another name or another span of its row is left out
    (names inside their spans first; hover says it all, a zoom makes room). The page's script
    redoes this after a zoom with the text's real widths."""
    placed = []
    for m, row in zip(own, rows):
        width = len(m["label"]) * 6.2
        if m["t1"] is None:
            at = x(m["t0"])
            before = at + 9 + width > _PLOT_END
            left = at - 9 - width if before else at + 9
            placed.append({"x": -9 if before else 9, "anchor": "end" if before else "start", "left": left,
                           "right": left + width, "outside": True, "row": row})
        else:
            inside = x(m["t1"]) - x(m["t0"]) >= width + 8
            left = x(m["t0"]) + 4 if inside else x(m["t1"]) + 4
            placed.append({"x": left, "anchor": "start", "left": left, "right": left + width, "outside": not inside,
                           "row": row})
    strips = [(row, x(m["t0"]), x(m["t1"]), k) for k, (m, row) in enumerate(zip(own, rows)) if m["t1"] is not None]
    shown: list[dict] = []
    for k, p in sorted(enumerate(placed), key=lambda kp: (kp[1]["outside"], kp[1]["left"])):
        covers = [(lo, hi) for row, lo, hi, j in strips if row == p["row"] and j != k] if p["outside"] else []
        covers += [(q["left"], q["right"]) for q in shown if q["row"] == p["row"]]
        p["hidden"] = any(p["left"] < hi + 4 and lo < p["right"] + 4 for lo, hi in covers)
        shown += [] if p["hidden"] else [p]
    return placed


def _label_text(m: dict, p: dict, y: float, of: str = "") -> str:
    """A fault's name; a span's names the id of the span it belongs to (``data-of``)."""
    hide = ' style="display: none;"' if p["hidden"] else ""
    if m["t1"] is None:
        return (f'<text class="strip-label moment-label" data-row="0" x="{p["x"]}" y="{y:.1f}" '
                f'text-anchor="{p["anchor"]}"{hide}>{html.escape(m["label"])}</text>')
    return (f'<text class="strip-label span-label {m["style"]}{" outside" if p["outside"] else ""}" '
            f'data-of="{of}" data-row="{p["row"]}" data-t0="{m["t0"]:.6f}" data-t1="{m["t1"]:.6f}" x="{p["x"]:.1f}" y="{y:.1f}"{hide}>'
            f'{html.escape(m["label"])}</text>')


def write_html(path, model: dict, title: str = "ddp run") -> str:
    """Write the page; returns its path."""
    path = os.fspath(path)
    span = _span(model)
    e = html.escape
    lanes = model["lanes"]
    # the labels' column: as wide as the longest (monospace 12 px: about 7.3 px a character)
    label_w = max([_LABEL_W] + [round(len(f'{lane["label"]}* {lane["status"]}') * 7.3 + 14) for lane in lanes])
    plot_w = _PLOT_END - label_w
    x = lambda t: label_w + max(0.0, t) / span * plot_w  # noqa: E731
    marks = fault_marks(model)
    drawn: set[str] = set()
    own_marks = [[m for m in marks if m["lane"] == i] for i in range(len(lanes))]
    strip_rows = [_strip_rows(own) for own in own_marks]
    lane_h = [_LANE_H + (max(rows, default=0)) * _ROW_H for rows in strip_rows]
    height = _TOP + sum(lane_h) + 8
    svg = [f'<svg id="lanes" xmlns="http://www.w3.org/2000/svg" width="{_PLOT_END + 24}" '
           f'height="{height}" role="img" aria-label="{e(title)}" data-span="{span:.6f}" '
           f'data-plot-x="{label_w}" data-plot-w="{plot_w}">',
           f'<defs><clipPath id="plot-clip"><rect x="{label_w}" y="0" width="{plot_w}" '
           f'height="{height}"/></clipPath></defs>',
           f'<g id="axis" data-y0="{_TOP - 4}" data-y1="{height - 6}">']
    for t, text in ticks(0.0, span):
        svg.append(_at(t, x(t), f'<line x1="0" y1="{_TOP - 4}" x2="0" y2="{height - 6}"/>'
                                f'<text x="0" y="{_TOP - 9}">{text}</text>', "tick"))
    svg.append("</g>")
    previous_attempt = None
    for i, lane in enumerate(lanes):
        y, own, rows, lane_height = _TOP + sum(lane_h[:i]), own_marks[i], strip_rows[i], lane_h[i]
        strip, top = y + 3, y + 5 + _STRIP_H + (lane_height - _LANE_H)
        mid = top + _BAR_H / 2
        end = lane["end"] if lane["end"] is not None else span
        colour = _STATUS_COLOUR.get(lane["status"], "#555")
        svg.append(f'<g class="lane status-{e(lane["status"])}" id="lane-{i}" data-rank="{lane["rank"]}" '
                   f'data-attempt="{"" if lane["attempt"] is None else lane["attempt"]}" data-status="{e(lane["status"])}">')
        if lane["attempt"] is not None and lane["attempt"] != previous_attempt and i:
            svg.append(f'<line class="attempt-sep" x1="0" y1="{y}" x2="{_PLOT_END}" y2="{y}"/>')
        previous_attempt = lane["attempt"]
        star = "*" if lane["faulted"] else ""
        svg.append(f'<text class="lane-label" x="6" y="{mid + 4}">{e(lane["label"])}{star} '
                   f'<tspan fill="{colour}">{e(lane["status"])}</tspan><title>{e(_end_text(lane))}</title></text>')
        svg.append(f'<rect class="lane-bg" x="{label_w}" y="{y + 2}" width="{plot_w}" height="{lane_height - 4}"/>')
        svg.append('<g class="plot" clip-path="url(#plot-clip)">')
        for m in own:  # the tint of what a fault did, behind the ops
            if m["t1"] is not None:
                drawn.add(m["style"])
                svg.append(_range(m["t0"], m["t1"], x, y + 2, lane_height - 4, f'class="tint-{m["style"]}"', 1.0))
        drawn.add("life")
        svg.append(_range(lane["start"], end, x, mid - 1, 2, f'class="life" fill="{colour}"', 1.0))
        for op in lane["ops"]:
            op_end = op.end if op.end is not None else end
            cls = "op inflight" if op.in_flight else ("op failed" if op.failed else "op")
            drawn.update(["hatched"] if op.in_flight else ["failed"] if op.failed else [])
            text = _op_text(op, lane["end"])
            attrs = (f'class="{cls}" data-name="{e(op.name)}" data-seq="{op.seq}" data-bytes="{op.bytes}" '
                     f'data-source="{e(op.source)}" data-detail="{e(text)}"')
            bar = _range(op.start, op_end, x, top, _BAR_H, f'fill="{_colour(op.name)}"', 2.0)
            hatch = _range(op.start, op_end, x, top, _BAR_H, 'fill="url(#hatch)"', 2.0) if op.in_flight else ""
            svg.append(f'<g {attrs}>{bar}{hatch}<title>{e(text)}</title></g>')
        shown = -1e9
        for s in lane["steps"]:
            drawn.add("step")
            number = x(s.time) - shown >= 16  # the number where it has room (the script redoes this on zoom)
            shown = x(s.time) if number else shown
            hide = "" if number else ' style="display: none;"'
            svg.append(_at(s.time, x(s.time), f'<line class="step-line" x1="0" y1="{top - 2}" x2="0" '
                                              f'y2="{top + _BAR_H + 2}"/><text class="step-num" x="0" '
                                              f'y="{y + lane_height - 4}"{hide}>{s.seq}</text>',
                           "step", f"step {s.seq} at t={s.time:.3f}s"))
        # the strip naming each fault on top of the lane: spans, then names and moments over them
        on_top = []
        for k, (m, p, row) in enumerate(zip(own, _place_labels(own, rows, x), rows)):
            drawn.add(m["style"])
            row_y = strip + row * _ROW_H
            if m["t1"] is None:
                inner = (f'<line class="moment-line" x1="0" y1="{strip + _STRIP_H}" x2="0" '
                         f'y2="{y + lane_height - 3}"/><path class="diamond" d="M0,{strip - 1} l6,{_STRIP_H / 2 + 1} '
                         f'l-6,{_STRIP_H / 2 + 1} l-6,{-_STRIP_H / 2 - 1} z"/>{_label_text(m, p, strip + 10)}')
                on_top.append(_at(m["t0"], x(m["t0"]), inner, "fault moment", m["text"]))
            else:
                svg.append(f'<g class="fault span-{m["style"]}" id="fault-{i}-{k}" data-detail="{e(m["text"])}">'
                           + _range(m["t0"], m["t1"], x, row_y, _STRIP_H,
                                    f'class="strip-{m["style"]}" data-row="{row}"', 2.0)
                           + f'<title>{e(m["text"])}</title></g>')
                on_top.insert(0, _label_text(m, p, row_y + 10, f"fault-{i}-{k}"))
        svg += on_top
        if lane["status"] != "ok":
            if lane["status"] == "hung":  # two bars: stopped until the harness ended it
                drawn.add("hung")
                shape = f"M3,{mid - 7} h3 v14 h-3 z M9,{mid - 7} h3 v14 h-3 z"
            else:  # a cross: it raised, died or exited
                drawn.add("cross")
                shape = f"M3,{mid - 6} l12,12 M15,{mid - 6} l-12,12"
            svg.append(_at(end, x(end), f'<path d="{shape}" stroke="{colour}" fill="{colour}" stroke-width="3"/>',
                           "end-mark", _end_text(lane)))
        svg.append("</g></g>")
    svg.append(f'<rect id="brush" x="0" y="{_TOP - 4}" width="0" height="{height - _TOP - 2}" display="none"/>')
    svg.append("</svg>")
    names = sorted({op.name for lane in lanes for op in lane["ops"]})
    statuses = sorted({lane["status"] for lane in lanes})
    legend = [f'<span class="key" data-key="op"><i style="background:{_colour(n)}"></i>{e(n)}</span>' for n in names]
    for key, (icon, meaning) in _LEGEND.items():
        if key in drawn:
            extra = " ".join(f'<b style="color:{_STATUS_COLOUR.get(s, "#555")}">{e(s)}</b>' for s in statuses) \
                if key == "life" else ""
            legend.append(f'<span class="key" data-key="{key}"><svg width="22" height="14">{icon}</svg>'
                          f'{e(meaning)} {extra}</span>')
    rows = "".join(f'<tr><td>{e(lane["label"])}</td><td class="st-{e(lane["status"])}">{e(lane["status"])}</td>'
                   f'<td>{len(lane["ops"])}</td><td>{e(lane["detail"])}</td></tr>' for lane in lanes)
    page = (_PAGE.replace("$TITLE", e(title)).replace("$LANES", str(len(lanes)))
            .replace("$DURATION", f"{model['duration']:.2f}").replace("$SPAN", f"{span:.2f}")
            .replace("$LEGEND", "".join(legend)).replace("$SVG", "".join(svg)).replace("$ROWS", rows)
            .replace("$SUMMARY", e(model["summary"]))
            .replace("$PROGRESS", f'<pre class="progress">{e(model["progress"])}</pre>' if model["progress"] else ""))
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


# The page around the lanes: its style, and the script that zooms (buttons, the wheel, a drag
# across the lanes, ``#view=A-B`` in the address) and shows details on hover. No network.
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>$TITLE</title>
<style>
body { font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }
h1 { font-size: 17px; margin: 0 0 6px; }
.lane-bg { fill: #f4f5f7; }
.tick line { stroke: #ddd; }
.tick text { font-size: 10px; fill: #666; text-anchor: middle; }
.lane-label { font-size: 12px; font-family: ui-monospace, monospace; }
.op rect { stroke: #222; stroke-opacity: .35; }
.op.inflight rect, .inflight-edge { stroke: #b71c1c; stroke-width: 1.5; stroke-dasharray: 4 2; stroke-opacity: 1; }
.op.failed rect, .failed-edge { stroke: #c62828; stroke-width: 2; stroke-opacity: 1; }
.step-line { stroke: #111; stroke-width: 1; stroke-dasharray: 2 2; }
.step-num { font-size: 9px; fill: #555; text-anchor: middle; }
.tint-acting { fill: #d81b60; fill-opacity: .10; }
.strip-acting { fill: #d81b60; }
.tint-frozen { fill: url(#frozen); }
.strip-frozen { fill: #455a64; }
.tint-links { fill: url(#cut); }
.strip-links { fill: #c62828; }
.span-label { font-size: 10.5px; font-weight: 600; fill: #fff; pointer-events: none; }
.span-label.outside.acting { fill: #ad1457; } .span-label.outside.frozen { fill: #37474f; }
.span-label.outside.links { fill: #b71c1c; }
.diamond { fill: #d32f2f; stroke: #fff; }
.moment-line { stroke: #d32f2f; stroke-width: 1.5; stroke-dasharray: 3 2; }
.moment-label { font-size: 10.5px; font-weight: 600; fill: #b71c1c; }
.attempt-sep { stroke: #999; stroke-dasharray: 6 3; }
#brush { fill: #1e88e5; fill-opacity: .15; stroke: #1e88e5; }
#lanes { user-select: none; cursor: crosshair; }
#lanes .lane-label { cursor: default; }
#lanes g[data-detail]:hover rect, #lanes g[data-detail]:hover path { stroke: #000; stroke-width: 2; }
.legend { max-width: 1170px; margin: 4px 0; }
.legend .key { margin-right: 14px; white-space: nowrap; display: inline-block; }
.legend i, .legend svg { display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -2px; }
.legend svg { width: 22px; height: 14px; }
.controls button { font: inherit; min-width: 28px; margin-right: 2px; }
.controls .view { margin-left: 8px; color: #555; }
#details { position: fixed; pointer-events: none; display: none; background: #222; color: #fff;
           padding: 6px 8px; border-radius: 4px; white-space: pre; font-size: 12px; z-index: 2; }
table { border-collapse: collapse; margin-top: 12px; } td, th { padding: 2px 10px 2px 0; text-align: left; }
.st-ok { color: #2e7d32; } .st-raised { color: #c62828; } .st-killed { color: #6a1b9a; } .st-hung { color: #37474f; font-weight: bold; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; }
</style></head>
<body data-lanes="$LANES">
<svg width="0" height="0" style="position:absolute"><defs>
<pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">
<rect width="6" height="6" fill="#fff" fill-opacity="0.25"/>
<line x1="0" y1="0" x2="0" y2="6" stroke="#000" stroke-opacity="0.35" stroke-width="2"/></pattern>
<pattern id="frozen" width="8" height="8" patternUnits="userSpaceOnUse" patternTransform="rotate(45)">
<rect width="8" height="8" fill="#607d8b" fill-opacity="0.10"/>
<line x1="0" y1="0" x2="0" y2="8" stroke="#455a64" stroke-opacity="0.25" stroke-width="3"/></pattern>
<pattern id="cut" width="8" height="8" patternUnits="userSpaceOnUse" patternTransform="rotate(-45)">
<rect width="8" height="8" fill="#e53935" fill-opacity="0.08"/>
<line x1="0" y1="0" x2="0" y2="8" stroke="#e53935" stroke-opacity="0.22" stroke-width="2"/></pattern>
</defs></svg>
<h1>$TITLE</h1>
<p class="meta">$LANES lanes, $DURATION s. Hover a bar or a fault for what it was; drag across the lanes to
see a stretch in detail, or zoom with the wheel or the buttons.</p>
<div class="controls" id="controls" hidden><button id="zoom-out" title="zoom out">−</button><button id="zoom-in" title="zoom in">+</button><button
 id="pan-left" title="earlier">◀</button><button id="pan-right" title="later">▶</button><button id="zoom-fit"
 title="the whole run">whole run</button><span class="view" id="view">showing 0 s to $SPAN s (the whole run)</span></div>
<div class="legend">$LEGEND</div>
$SVG
<table class="ranks"><tr><th>lane</th><th>status</th><th>ops</th><th>what happened</th></tr>$ROWS</table>
<pre class="summary">$SUMMARY</pre>
$PROGRESS
<div id="details"></div>
<script>
(function () {
  var svg = document.getElementById("lanes"), box = document.getElementById("details");
  var L = +svg.dataset.plotX, W = +svg.dataset.plotW, SPAN = +svg.dataset.span, v0 = 0, v1 = SPAN;
  var NS = svg.namespaceURI, axis = document.getElementById("axis");
  function sx(t) { return L + (t - v0) / (v1 - v0) * W; }
  function clip(x) { return Math.max(L - 40, Math.min(L + W + 40, x)); }
  function ticks() {  /* as timeline.ticks(): a round step, 1, 2 or 5 times a power of ten */
    var raw = (v1 - v0) / 10, mag = Math.pow(10, Math.floor(Math.log10(raw))), step = 10 * mag;
    [1, 2, 5].some(function (m) { if (m * mag >= raw * 0.999) { step = m * mag; return true; } return false; });
    var decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9)), out = [];
    for (var k = Math.ceil(v0 / step - 1e-9); k * step <= v1 + step * 1e-9; k++) {
      out.push([k * step, (k * step).toFixed(decimals) + " s"]);
    }
    return out;
  }
  function render() {
    var y0 = axis.dataset.y0, y1 = axis.dataset.y1;
    axis.textContent = "";
    ticks().forEach(function (tk) {
      var g = document.createElementNS(NS, "g"), line = document.createElementNS(NS, "line"),
          text = document.createElementNS(NS, "text");
      g.setAttribute("class", "tick"); g.setAttribute("data-t", tk[0]);
      line.setAttribute("y1", y0); line.setAttribute("y2", y1);
      text.setAttribute("y", y0 - 5); text.textContent = tk[1];
      g.appendChild(line); g.appendChild(text); axis.appendChild(g);
    });
    svg.querySelectorAll("g[data-t]").forEach(function (g) {
      g.setAttribute("transform", "translate(" + clip(sx(+g.dataset.t)).toFixed(1) + ",0)");
    });
    svg.querySelectorAll("rect[data-t0]").forEach(function (r) {
      var a = clip(sx(+r.dataset.t0)), b = clip(sx(+r.dataset.t1));
      r.setAttribute("x", a.toFixed(1)); r.setAttribute("width", Math.max(+r.dataset.minw, b - a).toFixed(1));
    });
    svg.querySelectorAll("text.span-label").forEach(function (t) {  /* as timeline._place_labels() */
      var a = sx(+t.dataset.t0), b = sx(+t.dataset.t1), left = Math.max(a, L), right = Math.min(b, L + W);
      t.style.display = "";  /* measured shown (a hidden text has no length) */
      var inside = right - left >= t.getComputedTextLength() + 8;
      t.setAttribute("x", (inside ? left + 4 : b + 4).toFixed(1));
      t.classList.toggle("outside", !inside);
      t.style.display = b < L || a > L + W ? "none" : "";
    });
    svg.querySelectorAll("text.moment-label").forEach(function (t) {
      t.style.display = "";
      var at = sx(+t.parentNode.dataset.t), before = at + 9 + t.getComputedTextLength() > L + W;
      t.setAttribute("x", before ? -9 : 9); t.setAttribute("text-anchor", before ? "end" : "start");
      t.style.display = at < L || at > L + W ? "none" : "";
    });
    svg.querySelectorAll("g.lane").forEach(function (lane) {  /* as timeline._place_labels() */
      var box = function (el) { var r = el.getBoundingClientRect(); return {left: r.left, right: r.right}; };
      var strips = Array.prototype.map.call(lane.querySelectorAll("rect[data-row]"), function (r) {
        var b = box(r); b.row = r.dataset.row; b.of = r.parentNode.id; return b; });
      var shown = [], labels = Array.prototype.slice.call(lane.querySelectorAll("text.strip-label"))
        .filter(function (t) { return t.style.display !== "none"; })
        .map(function (t) { var b = box(t); b.t = t; b.row = t.dataset.row;
                            b.outside = t.classList.contains("outside") || t.classList.contains("moment-label");
                            return b; });
      labels.sort(function (p, q) { return (p.outside - q.outside) || (p.left - q.left); });
      labels.forEach(function (p) {
        var covers = shown.filter(function (q) { return q.row === p.row; });
        if (p.outside) covers = covers.concat(strips.filter(function (s) {
          return s.row === p.row && s.of !== p.t.dataset.of; }));
        var hidden = covers.some(function (q) { return p.left < q.right + 4 && q.left < p.right + 4; });
        if (hidden) p.t.style.display = "none"; else shown.push(p);
      });
    });
    svg.querySelectorAll("g.lane").forEach(function (lane) {
      var shown = -1e9;
      lane.querySelectorAll("g.step").forEach(function (g) {
        var x = sx(+g.dataset.t), room = x - shown >= 16;
        if (room) shown = x;
        g.querySelector("text").style.display = room ? "" : "none";
      });
    });
    var whole = v0 <= 0 && v1 >= SPAN;
    document.getElementById("view").textContent = "showing " + v0.toFixed(3) + " s to " + v1.toFixed(3) + " s" +
      (whole ? " (the whole run)" : " of " + SPAN.toFixed(2) + " s");
    document.body.setAttribute("data-view", v0.toFixed(4) + "-" + v1.toFixed(4));
    try { history.replaceState(null, "", whole ? location.pathname : "#view=" + v0.toFixed(4) + "-" + v1.toFixed(4)); }
    catch (err) { /* a page without history (some viewers): the view still changes */ }
  }
  function setView(a, b) {
    var least = Math.max(SPAN * 1e-4, 1e-6);
    if (b - a < least) { var c = (a + b) / 2; a = c - least / 2; b = c + least / 2; }
    if (b - a >= SPAN) { a = 0; b = SPAN; }
    if (a < 0) { b -= a; a = 0; }
    if (b > SPAN) { a -= b - SPAN; b = SPAN; }
    v0 = a; v1 = b; render();
  }
  function zoom(about, k) { setView(about - (about - v0) * k, about + (v1 - about) * k); }
  function xOf(ev) { return ev.clientX - svg.getBoundingClientRect().left; }
  function tOf(x) { return v0 + (Math.max(L, Math.min(L + W, x)) - L) / W * (v1 - v0); }
  var buttons = {"zoom-in": function () { zoom((v0 + v1) / 2, 0.5); },
                 "zoom-out": function () { zoom((v0 + v1) / 2, 2); },
                 "pan-left": function () { setView(v0 - (v1 - v0) / 4, v1 - (v1 - v0) / 4); },
                 "pan-right": function () { setView(v0 + (v1 - v0) / 4, v1 + (v1 - v0) / 4); },
                 "zoom-fit": function () { setView(0, SPAN); }};
  Object.keys(buttons).forEach(function (id) { document.getElementById(id).addEventListener("click", buttons[id]); });
  svg.addEventListener("wheel", function (ev) {
    if (xOf(ev) < L) return;
    ev.preventDefault();
    zoom(tOf(xOf(ev)), ev.deltaY > 0 ? 1.25 : 0.8);
  }, {passive: false});
  var brush = document.getElementById("brush"), from = null;
  svg.addEventListener("mousedown", function (ev) {
    if (ev.button !== 0 || xOf(ev) < L) return;
    from = Math.min(L + W, xOf(ev)); ev.preventDefault();
  });
  window.addEventListener("mousemove", function (ev) {
    if (from === null) return;
    var to = Math.max(L, Math.min(L + W, xOf(ev)));
    brush.setAttribute("x", Math.min(from, to)); brush.setAttribute("width", Math.abs(to - from));
    brush.setAttribute("display", "inline");
  });
  window.addEventListener("mouseup", function (ev) {
    if (from === null) return;
    var to = Math.max(L, Math.min(L + W, xOf(ev)));
    brush.setAttribute("display", "none");
    if (Math.abs(to - from) > 4) setView(tOf(Math.min(from, to)), tOf(Math.max(from, to)));
    from = null;
  });
  svg.addEventListener("dblclick", function () { setView(0, SPAN); });
  document.querySelectorAll("#lanes g[data-detail]").forEach(function (g) {
    g.addEventListener("mousemove", function (ev) {
      box.textContent = g.getAttribute("data-detail");
      box.style.display = "block";
      box.style.left = (ev.clientX + 14) + "px";
      box.style.top = (ev.clientY + 14) + "px";
    });
    g.addEventListener("mouseleave", function () { box.style.display = "none"; });
  });
  var asked = /view=([0-9.]+)-([0-9.]+)/.exec(location.hash);
  if (asked) setView(+asked[1], +asked[2]); else render();
  window.ddpTimeline = {setView: setView, zoom: zoom, view: function () { return [v0, v1]; }};
  document.getElementById("controls").hidden = false;  /* the zoom needs this script */
  document.body.setAttribute("data-js", "ready");
})();
</script>
</body></html>
"""


_FAULTS_THREAD = object()  # the trace's thread of fault spans (any text could be a group's name)


def write_trace(path, model: dict) -> str:
    """Chrome trace event JSON (opens in Perfetto and chrome://tracing): pid = rank (attempt * 100 +
    rank for a launched run), tid = group (0 is the rank's own life; a "faults" thread holds what
    each fault did there, as the page draws it), times in microseconds.
    Op events carry Flight Recorder's field names: ``profiling_name``, ``collective_seq_id``."""
    path = os.fspath(path)
    events: list[dict] = []
    tids: dict[object, int] = {}  # a group's name, or FAULTS
    marks = fault_marks(model)
    us = lambda t: round(t * 1e6, 1)  # noqa: E731
    for i, lane in enumerate(model["lanes"]):
        pid = lane["pid"]
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": lane["label"]}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": 0, "args": {"name": "rank"}})
        end = lane["end"] if lane["end"] is not None else model["duration"]
        events.append({"ph": "X", "name": f"{lane['status']}", "cat": "rank", "pid": pid, "tid": 0,
                       "ts": us(lane["start"]), "dur": us(max(0.0, end - lane["start"])),
                       "args": {"status": lane["status"], "detail": lane["detail"]}})
        named = set()
        for op in lane["ops"]:
            group = op.group or "no group"  # init, checkpoint saves and loads
            tid = tids.setdefault(group, len(tids) + 1)
            if group not in named:
                named.add(group)
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                               "args": {"name": f"group {group}" if op.group else group}})
            op_end = op.end if op.end is not None else end
            events.append({"ph": "X", "name": op.name, "cat": op.source, "pid": pid, "tid": tid,
                           "ts": us(op.start), "dur": us(max(0.0, op_end - op.start)),
                           "args": {"profiling_name": f"gloo:{op.name}", "collective_seq_id": op.seq,
                                    "process_group": group, "bytes": op.bytes, "source": op.source,
                                    "state": "in flight" if op.in_flight else ("failed" if op.failed else "completed")}})
        for s in lane["steps"]:
            events.append({"ph": "i", "s": "p", "name": f"step {s.seq}", "cat": "step", "pid": pid, "tid": 0,
                           "ts": us(s.time)})
        for ev in lane["events"]:
            events.append({"ph": "i", "s": "p", "name": f"fault: {ev.kind}", "cat": "fault", "pid": pid, "tid": 0,
                           "ts": us(ev.time), "args": {"event": str(ev), "spec": ev.spec}})
        rows: list[float] = []  # overlapping spans on threads of their own (a thread's slices must nest)
        named_rows: set[int] = set()
        for m in sorted((m for m in marks if m["lane"] == i and m["t1"] is not None), key=lambda m: m["t0"]):
            row = next((k for k, free in enumerate(rows) if free <= m["t0"]), len(rows))
            rows[row:row + 1] = [m["t1"]]
            tid = tids.setdefault((_FAULTS_THREAD, row), len(tids) + 1)
            if row not in named_rows:
                named_rows.add(row)
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                               "args": {"name": "faults" if row == 0 else f"faults ({row + 1})"}})
            events.append({"ph": "X", "name": m["label"], "cat": "fault", "pid": pid, "tid": tid, "ts": us(m["t0"]),
                           "dur": us(m["t1"] - m["t0"]), "args": {"event": m["text"], "style": m["style"]}})
        if lane["status"] != "ok":
            events.append({"ph": "i", "s": "p", "name": f"end: {lane['status']}", "cat": "end", "pid": pid,
                           "tid": 0, "ts": us(end), "args": {"detail": lane["detail"]}})
    for ev in model["group_events"]:
        events.append({"ph": "i", "s": "g", "name": f"fault: {ev.kind}", "cat": "fault", "pid": 0, "tid": 0,
                       "ts": us(ev.time), "args": {"event": str(ev), "spec": ev.spec}})
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms",
                   "otherData": {"producer": "pytest-ddpfault"}}, f)
    return path
