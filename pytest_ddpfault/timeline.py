"""Pictures of a run from its results: a self-contained HTML timeline and Chrome/Perfetto
trace JSON (``GroupResult.timeline``/``.trace``, ``TorchrunResult.timeline``/``.trace``).

The HTML page needs no network and no JavaScript for the basics: the lanes are inline SVG
drawn here, and every bar, step mark and fault marker carries a ``<title>`` (the browser's
own tooltip). A few lines of script add a details panel that follows the mouse.

Lanes: one per rank (per worker and attempt for a launched run, attempts one after the
other on the same clock). Ops are bars from start to end; an op still in flight when the
rank ended runs, hatched, to the rank's end — for a hung rank, the harness's deadline.
Pure rendering: no torch, no processes.
"""
from __future__ import annotations

import html
import json
import os
import zlib

from pytest_ddpfault.frames import strip_build_paths

__all__ = ["group_lanes", "torchrun_lanes", "write_html", "write_trace"]

_PALETTE = {
    "all_reduce": "#4e79a7", "broadcast": "#f28e2b", "all_gather": "#59a14f", "barrier": "#b07aa1",
    "reduce_scatter": "#76b7b2", "send": "#edc948", "recv": "#9c755f", "isend": "#edc948",
    "irecv": "#9c755f", "init": "#bab0ac", "all_gather_into_tensor": "#59a14f", "reduce": "#86bcb6",
}
_STATUS_COLOUR = {"ok": "#2e7d32", "raised": "#c62828", "killed": "#6a1b9a", "exited": "#ef6c00", "hung": "#37474f"}
_LANE_H, _BAR_H, _LABEL_W, _PLOT_W, _TOP = 34, 18, 190, 960, 34


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


def write_html(path, model: dict, title: str = "ddp run") -> str:
    """Write the page; returns its path."""
    path = os.fspath(path)
    span = _span(model)
    x = lambda t: _LABEL_W + max(0.0, t) / span * _PLOT_W  # noqa: E731
    e = html.escape
    lanes = model["lanes"]
    height = _TOP + _LANE_H * len(lanes) + 40
    svg = [f'<svg id="lanes" xmlns="http://www.w3.org/2000/svg" width="{_LABEL_W + _PLOT_W + 20}" '
           f'height="{height}" role="img" aria-label="{e(title)}">',
           '<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><rect width="6" height="6" fill="#fff" fill-opacity="0.25"/>'
           '<line x1="0" y1="0" x2="0" y2="6" stroke="#000" stroke-opacity="0.35" stroke-width="2"/>'
           '</pattern></defs>']
    ticks = 8
    for i in range(ticks + 1):
        t = span * i / ticks
        svg.append(f'<line class="tick" x1="{x(t):.1f}" y1="{_TOP - 6}" x2="{x(t):.1f}" y2="{height - 36}"/>'
                   f'<text class="tick-label" x="{x(t):.1f}" y="{_TOP - 10}">{t:.2f}s</text>')
    previous_attempt = None
    for i, lane in enumerate(lanes):
        y = _TOP + i * _LANE_H
        mid = y + _LANE_H / 2
        top = mid - _BAR_H / 2
        end = lane["end"] if lane["end"] is not None else span
        colour = _STATUS_COLOUR.get(lane["status"], "#555")
        svg.append(f'<g class="lane status-{e(lane["status"])}" id="lane-{i}" data-rank="{lane["rank"]}" '
                   f'data-attempt="{"" if lane["attempt"] is None else lane["attempt"]}" data-status="{e(lane["status"])}">')
        if lane["attempt"] is not None and lane["attempt"] != previous_attempt and i:
            svg.append(f'<line class="attempt-sep" x1="0" y1="{y}" x2="{_LABEL_W + _PLOT_W}" y2="{y}"/>')
        previous_attempt = lane["attempt"]
        svg.append(f'<rect class="lane-bg" x="{_LABEL_W}" y="{y + 2}" width="{_PLOT_W}" height="{_LANE_H - 4}"/>')
        svg.append(f'<rect class="life" x="{x(lane["start"]):.1f}" y="{mid - 1}" '
                   f'width="{max(1.0, x(end) - x(lane["start"])):.1f}" height="2" fill="{colour}"/>')
        star = "*" if lane["faulted"] else ""
        svg.append(f'<text class="lane-label" x="6" y="{mid + 4}">{e(lane["label"])}{star} '
                   f'<tspan fill="{colour}">{e(lane["status"])}</tspan><title>{e(_end_text(lane))}</title></text>')
        for op in lane["ops"]:
            op_end = op.end if op.end is not None else end
            w = max(2.0, x(op_end) - x(op.start))
            cls = "op inflight" if op.in_flight else ("op failed" if op.failed else "op")
            text = _op_text(op, lane["end"])
            attrs = (f'class="{cls}" data-name="{e(op.name)}" data-seq="{op.seq}" data-bytes="{op.bytes}" '
                     f'data-source="{e(op.source)}" data-detail="{e(text)}"')
            svg.append(f'<g {attrs}><rect x="{x(op.start):.1f}" y="{top:.1f}" width="{w:.1f}" height="{_BAR_H}" '
                       f'fill="{_colour(op.name)}"/>'
                       + (f'<rect x="{x(op.start):.1f}" y="{top:.1f}" width="{w:.1f}" height="{_BAR_H}" '
                          f'fill="url(#hatch)"/>' if op.in_flight else "")
                       + f'<title>{e(text)}</title></g>')
        for s in lane["steps"]:
            text = f"step {s.seq} at t={s.time:.3f}s"
            svg.append(f'<g class="step" data-detail="{e(text)}"><line x1="{x(s.time):.1f}" y1="{y + 3}" '
                       f'x2="{x(s.time):.1f}" y2="{y + _LANE_H - 3}"/><title>{e(text)}</title></g>')
        for ev in lane["events"]:
            cx, text = x(ev.time), str(ev)
            svg.append(f'<g class="fault" data-detail="{e(text)}"><path d="M{cx:.1f},{y + 1} l6,9 l-6,9 l-6,-9 z"/>'
                       f'<title>{e(text)}</title></g>')
        if lane["status"] != "ok":
            ex = x(end) + 3
            if lane["status"] == "hung":  # two bars: stopped until the harness ended it
                shape = f"M{ex:.1f},{mid - 7} h3 v14 h-3 z M{ex + 6:.1f},{mid - 7} h3 v14 h-3 z"
            else:  # a cross: it raised, died or exited
                shape = (f"M{ex:.1f},{mid - 6} l12,12 M{ex + 12:.1f},{mid - 6} l-12,12")
            svg.append(f'<g class="end-mark" data-detail="{e(_end_text(lane))}"><path d="{shape}" '
                       f'stroke="{colour}" fill="{colour}" stroke-width="3"/><title>{e(_end_text(lane))}</title></g>')
        svg.append("</g>")
    for ev in model["group_events"]:
        cx, text = x(ev.time), str(ev)
        svg.append(f'<g class="fault group-fault" data-detail="{e(text)}"><line x1="{cx:.1f}" y1="{_TOP}" '
                   f'x2="{cx:.1f}" y2="{height - 36}"/><title>{e(text)}</title></g>')
    svg.append("</svg>")
    names = sorted({op.name for lane in lanes for op in lane["ops"]})
    legend = "".join(f'<span class="key"><i style="background:{_colour(n)}"></i>{e(n)}</span>' for n in names)
    legend += ('<span class="key"><i class="hatched"></i>in flight at the end</span>'
               '<span class="key"><i class="diamond"></i>fault</span><span class="key"><i class="stepkey"></i>step()</span>')
    rows = "".join(f'<tr><td>{e(lane["label"])}</td><td class="st-{e(lane["status"])}">{e(lane["status"])}</td>'
                   f'<td>{len(lane["ops"])}</td><td>{e(lane["detail"])}</td></tr>' for lane in lanes)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>
body {{ font: 13px/1.4 system-ui, sans-serif; margin: 16px; color: #222; background: #fff; }}
h1 {{ font-size: 17px; margin: 0 0 6px; }}
#lanes .lane-bg {{ fill: #f4f5f7; }}
#lanes .tick {{ stroke: #ddd; }}
#lanes .tick-label {{ font-size: 10px; fill: #777; text-anchor: middle; }}
#lanes .lane-label {{ font-size: 12px; font-family: ui-monospace, monospace; }}
#lanes .op rect {{ stroke: #222; stroke-opacity: .35; }}
#lanes .op.inflight rect {{ stroke: #b71c1c; stroke-width: 1.5; stroke-dasharray: 4 2; stroke-opacity: 1; }}
#lanes .op.failed rect {{ stroke: #c62828; stroke-width: 1.5; stroke-opacity: 1; }}
#lanes .step line {{ stroke: #111; stroke-width: 1; stroke-dasharray: 2 2; }}
#lanes .fault path {{ fill: #d32f2f; stroke: #fff; }}
#lanes .group-fault line {{ stroke: #d32f2f; stroke-width: 2; }}
#lanes .end-mark text {{ font-size: 15px; font-weight: bold; }}
#lanes .attempt-sep {{ stroke: #999; stroke-dasharray: 6 3; }}
#lanes g[data-detail]:hover rect, #lanes g[data-detail]:hover path {{ stroke: #000; stroke-width: 2; }}
.legend .key {{ margin-right: 14px; white-space: nowrap; }}
.legend i {{ display: inline-block; width: 12px; height: 12px; margin-right: 4px; vertical-align: -2px; }}
.legend i.hatched {{ background: repeating-linear-gradient(45deg, #888 0 3px, #ddd 3px 6px); border: 1px dashed #b71c1c; }}
.legend i.diamond {{ background: #d32f2f; transform: rotate(45deg) scale(.8); }}
.legend i.stepkey {{ width: 2px; background: #111; }}
#details {{ position: fixed; pointer-events: none; display: none; background: #222; color: #fff;
           padding: 6px 8px; border-radius: 4px; white-space: pre; font-size: 12px; z-index: 2; }}
table {{ border-collapse: collapse; margin-top: 12px; }} td, th {{ padding: 2px 10px 2px 0; text-align: left; }}
.st-ok {{ color: #2e7d32; }} .st-raised {{ color: #c62828; }} .st-killed {{ color: #6a1b9a; }} .st-hung {{ color: #37474f; font-weight: bold; }}
pre {{ background: #f7f7f7; padding: 8px; overflow-x: auto; }}
</style></head>
<body data-lanes="{len(lanes)}">
<h1>{e(title)}</h1>
<p class="meta">{len(lanes)} lanes, {model["duration"]:.2f}s. Hover a bar for its op, seq, bytes and duration.</p>
<div class="legend">{legend}</div>
{''.join(svg)}
<table class="ranks"><tr><th>lane</th><th>status</th><th>ops</th><th>what happened</th></tr>{rows}</table>
<pre class="summary">{e(model["summary"])}</pre>
{f'<pre class="progress">{e(model["progress"])}</pre>' if model["progress"] else ""}
<div id="details"></div>
<script>
(function () {{
  var box = document.getElementById("details");
  document.querySelectorAll("#lanes g[data-detail]").forEach(function (g) {{
    g.addEventListener("mousemove", function (ev) {{
      box.textContent = g.getAttribute("data-detail");
      box.style.display = "block";
      box.style.left = (ev.clientX + 14) + "px";
      box.style.top = (ev.clientY + 14) + "px";
    }});
    g.addEventListener("mouseleave", function () {{ box.style.display = "none"; }});
  }});
  document.body.setAttribute("data-js", "ready");
}})();
</script>
</body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def write_trace(path, model: dict) -> str:
    """Chrome trace event JSON (opens in Perfetto and chrome://tracing): pid = rank (attempt * 100 +
    rank for a launched run), tid = group (0 is the rank's own life), times in microseconds.
    Op events carry Flight Recorder's field names: ``profiling_name``, ``collective_seq_id``."""
    path = os.fspath(path)
    events: list[dict] = []
    tids: dict[str, int] = {}
    us = lambda t: round(t * 1e6, 1)  # noqa: E731
    for lane in model["lanes"]:
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
