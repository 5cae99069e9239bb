"""The timeline page in a real browser: headless Chromium (Debian's ``chromium``, which
``.ci/run`` installs) loads the pages of real runs (a hang; a delay, a partition between
virtual nodes, a slow and a torn save, a freeze), takes screenshots and dumps the DOM after
the page's script ran; a probe script appended to a copy of a page reads the drawn marks
and drives the zoom (buttons, the wheel, a drag) as a user would. Where Chromium is missing
the browser tests are skipped with the install hint, except in CI (``DDPFAULT_REQUIRE_BROWSER=1``,
set by ``.ci/run``), where they fail."""
from __future__ import annotations

import datetime
import html
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import pytest_ddpfault
from _workloads import ddp_training
from pytest_ddpfault import timeline
from pytest_ddpfault.results import FaultEvent

BROWSER_TIMEOUT = 90.0   # a bound for one headless run (a cold start on a loaded machine: seconds)
WINDOW = (1200, 420)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        hint = "chromium is not installed (Debian: apt-get update && apt-get install -y chromium)"
        if os.environ.get("DDPFAULT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"{hint}; CI requires it")
        pytest.skip(hint)
    return path


def run_chromium(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless run in its own session, with a fresh profile; the whole session is
    killed if it outlives the bound."""
    argv = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=BROWSER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        raise
    finally:
        try:  # what the browser left of its own (zygote, renderers), none expected
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(argv, proc.returncode, out.decode(errors="replace"),
                                       err.decode(errors="replace"))


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGBA rows of an 8-bit RGBA or RGB PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            bpp = 4 if colour == 6 else 3
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line) if bpp == 4 else bytes(
            v for px in range(width) for v in (*line[px * 3:px * 3 + 3], 255)))
        prev = line
    return width, height, rows


def count_colour(rows: list[bytes], rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    n = 0
    for row in rows:
        for x in range(0, len(row), 4):
            if all(abs(row[x + k] - rgb[k]) <= tolerance for k in range(3)):
                n += 1
    return n


@pytest.fixture(scope="module")
def hang_page(tmp_path_factory) -> Path:
    from pytest_ddpfault import run_group

    # the process-group timeout (60 s) is past the deadline: rank 0 waits in DDP's all_reduce to it
    res = run_group(ddp_training, 3, 60.0, world_size=2, faults="hang_rank(rank=1, at=step#2)", timeout=2)
    assert [r.status for r in res] == ["hung", "hung"]
    return Path(res.timeline(tmp_path_factory.mktemp("page") / "hang.html"))


def probe(browser: str, page: Path, tmp_path: Path, script: str, view: str = "") -> dict:
    """Load a copy of ``page`` with ``script`` appended (it runs after the page's own script,
    in the browser) and return what it left as JSON in ``<pre id="probe">``."""
    copy = tmp_path / f"probe-{page.name}"
    copy.write_text(page.read_text().replace("</body>", f'<pre id="probe"></pre><script>{script}</script></body>'))
    done = run_chromium(browser, tmp_path / "profile", "--window-size=1280,800", "--dump-dom",
                        copy.as_uri() + view)
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found and found.group(1), f"the probe left nothing: {done.stdout[-3000:]}"
    return json.loads(html.unescape(found.group(1)))


# What the probes read: every lane's fault marks (their strip's place and size, label and
# tooltip), the axis (tick labels and places), the legend's keys and the marks drawn.
READ_MARKS = """
function readMarks() {
  var num = function (el, a) { return +el.getAttribute(a); };
  var shift = function (g) { return +/translate\\(([-0-9.]+)/.exec(g.getAttribute("transform"))[1]; };
  var lanes = Array.prototype.map.call(document.querySelectorAll("#lanes g.lane"), function (lane) {
    return {rank: +lane.dataset.rank, status: lane.dataset.status,
            marks: Array.prototype.map.call(lane.querySelectorAll("g.fault"), function (g) {
              var strip = g.querySelector("rect[data-t0]"),
                  label = g.querySelector("text") || document.querySelector('[data-of="' + g.id + '"]');
              return {cls: g.getAttribute("class"), title: g.querySelector("title").textContent,
                      label: label ? label.textContent : "", shown: label ? label.style.display !== "none" : false,
                      t0: strip ? num(strip, "data-t0") : +g.dataset.t, t1: strip ? num(strip, "data-t1") : null,
                      x: strip ? num(strip, "x") : shift(g), width: strip ? num(strip, "width") : 0};
            }),
            tints: Array.prototype.map.call(lane.querySelectorAll("rect[class^=tint-]"), function (r) {
              return r.getAttribute("class"); })};
  });
  var ticks = Array.prototype.map.call(document.querySelectorAll("#axis g.tick"), function (g) {
    return [+g.dataset.t, g.querySelector("text").textContent, shift(g)]; });
  var present = {"op": "#lanes g.op", "hatched": "#lanes g.op.inflight", "failed": "#lanes g.op.failed",
                 "step": "#lanes g.step", "acting": "#lanes .strip-acting", "frozen": "#lanes .strip-frozen",
                 "links": "#lanes .strip-links", "moment": "#lanes g.fault.moment", "life": "#lanes rect.life",
                 "cross": "#lanes g.end-mark", "hung": "#lanes g.lane.status-hung g.end-mark"};
  var drawn = Object.keys(present).filter(function (k) { return document.querySelector(present[k]); });
  var legend = Array.prototype.map.call(document.querySelectorAll(".legend .key"), function (k) {
    return k.dataset.key; });
  return {lanes: lanes, ticks: ticks, drawn: drawn, legend: legend, view: document.body.dataset.view,
          hung: document.querySelectorAll("#lanes g.lane.status-hung").length,
          ended: document.querySelectorAll("#lanes g.lane:not(.status-ok):not(.status-hung)").length};
}
"""


def px_per_second(read: dict) -> float:
    (t0, _, x0), (t1, _, x1) = read["ticks"][:2]
    return (x1 - x0) / (t1 - t0)


def assert_round_ticks(ticks: list) -> None:
    """Evenly spaced at 1, 2 or 5 times a power of ten, each label its tick's value."""
    assert len(ticks) >= 3, ticks
    values = [t for t, _, _ in ticks]
    step = values[1] - values[0]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-6, f"step {step} is not round: {ticks}"
    for (t, label, _), k in zip(ticks, range(len(ticks))):
        assert abs(t - values[0] - k * step) < step * 1e-6, ticks
        assert abs(float(label.removesuffix(" s")) - t) < step * 1e-6, f"{label!r} is not {t}"
        assert abs(t / step - round(t / step)) < 1e-6, f"tick {t} is not a multiple of {step}"


def test_ticks_fall_on_round_values_at_any_scale():
    for v0, v1 in [(0, 2.2), (0, 1.59), (0.1, 0.4), (1.5, 2.4), (0, 0.003), (7.3, 7.31), (0, 130)]:
        marks = timeline.ticks(v0, v1)
        assert 3 <= len(marks) <= 11, (v0, v1, marks)  # 10 steps or fewer
        assert marks[0][0] >= v0 - 1e-12 and marks[-1][0] <= v1 + 1e-12
        assert_round_ticks([(t, label, 0) for t, label in marks])
    assert [label for _, label in timeline.ticks(0, 2.2)] == ["0.0 s", "0.5 s", "1.0 s", "1.5 s", "2.0 s"]


def lane(rank: int, end: float, node: int = 0) -> dict:
    return {"label": f"rank {rank}", "pid": rank, "rank": rank, "attempt": None, "status": "ok", "detail": "",
            "start": 0.0, "end": end, "ops": [], "steps": [], "events": [], "faulted": False, "node": node}


def test_fault_marks_span_what_each_fault_did_on_every_lane_it_touched():
    lanes = [lane(r, 3.0, node=r // 2) for r in range(4)]
    lanes[1]["end"] = 2.0  # rank 1 ended early: a freeze of it ends there
    part = "partition(nodes=(1,), at=step#3, duration=0.5)"
    lanes[1]["events"] = [FaultEvent("delay", 1, "step#2", 0.2, "delay(rank=1, at=step#2, seconds=0.4)"),
                          FaultEvent("hang_rank", 1, "step#4", 1.5, "hang_rank(rank=1, at=step#4)")]
    lanes[2]["events"] = [FaultEvent("partition", 2, "step#3", 1.0, part, scope=(2, 3))]
    lanes[0]["events"] = [FaultEvent("torn_save", 0, "save#2", 2.5, "torn_save(rank=0, at=save#2)")]
    group = [FaultEvent("partition", None, "duration=0.5", 1.6, part, "removed", scope=(2, 3))]
    marks = timeline.fault_marks({"lanes": lanes, "group_events": group, "duration": 3.0})
    got = sorted((m["lane"], m["style"], m["t0"], m["t1"], m["label"]) for m in marks)
    assert got == [
        (0, "links", 1.0, 1.6, "partition 0.5 s ↔ ranks 2, 3"),  # lifted at 1.6 (its removal), not 1.5
        (0, "moment", 2.5, None, "torn_save"),
        (1, "acting", 0.2, 0.2 + 0.4, "delay 0.4 s"),
        (1, "frozen", 1.5, 2.0, "hang_rank to the end"),             # to its rank's end
        (1, "links", 1.0, 1.6, "partition 0.5 s ↔ ranks 2, 3"),
        (2, "links", 1.0, 1.6, "partition 0.5 s ↔ ranks 0, 1"),
        (3, "links", 1.0, 1.6, "partition 0.5 s ↔ ranks 0, 1"),
    ]


def test_faults_that_overlap_in_time_get_rows_of_their_own_in_the_strip(tmp_path):
    lanes = [lane(0, 2.0), lane(1, 2.0)]
    lanes[0]["events"] = [FaultEvent("delay", 0, f"step#{n}", 0.2 + 0.3 * n, "delay(rank=0, at=step#1, seconds=0.2, "
                                     "every=true)") for n in range(1, 4)]
    group = [FaultEvent("partition", None, "t=0.5", 0.5, "partition(at=t=0.5, duration=0.4)", "proxy store")]
    model = {"lanes": lanes, "group_events": group, "duration": 2.0, "summary": "", "progress": ""}
    page = Path(timeline.write_html(tmp_path / "rows.html", model)).read_text()
    first, second = page.split('<g class="lane ')[1:]
    # rank 0: three delays on the first row, the store's partition (from the first's moment) on a second
    assert re.findall(r'class="strip-(\w+)" data-row="(\d)"', first) == [
        ("acting", "0"), ("acting", "1"), ("acting", "0"), ("acting", "0")]
    assert re.findall(r'class="strip-(\w+)" data-row="(\d)"', second) == [("acting", "0")]
    assert first.count(">delay 0.2 s</text>") == 3 and ">partition 0.4 s</text>" in first


def test_a_launched_runs_fault_marks_stay_in_their_attempt():
    from pytest_ddpfault.results import AttemptFaultEvent

    lanes = [dict(lane(r % 2, 2.0 + r), attempt=r // 2) for r in range(4)]  # attempt 0: ranks 0, 1; attempt 1
    lanes[1]["events"] = [AttemptFaultEvent("partition", 1, "step#2", 0.5, "partition(ranks=(1,), at=step#2)",
                                            scope=(1,), attempt=0)]
    lanes[2]["events"] = [AttemptFaultEvent("delay", 0, "step#1", 2.5, "delay(rank=0, at=step#1, seconds=0.2)",
                                            attempt=1)]
    marks = timeline.fault_marks({"lanes": lanes, "group_events": [], "duration": 6.0})
    assert sorted((m["lane"], m["style"], m["t0"], m["t1"], m["label"]) for m in marks) == [
        (0, "links", 0.5, 2.0, "partition to the end ↔ rank 1"),  # to each lane's end, not into attempt 1
        (1, "links", 0.5, 3.0, "partition to the end ↔ rank 0"),
        (2, "acting", 2.5, 2.7, "delay 0.2 s"),
    ]


def train_and_save(directory, steps, pg_timeout=2.0):
    """DDP training; each step rank 0 saves a checkpoint (torch.save), then a barrier."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        pytest_ddpfault.step()
        opt.zero_grad()
        model(torch.ones(8, 4) * (dist.get_rank() + 1)).sum().backward()
        opt.step()
        if dist.get_rank() == 0:
            torch.save(model.state_dict(), os.path.join(directory, "ckpt.pt"))
        dist.barrier()
    total = model.module.weight.detach().sum().item()
    del model, opt
    dist.destroy_process_group()
    return total


# One run with a fault of each family: a straggler, a partition between two virtual nodes
# (healed after its duration), a slow save, a freeze resumed, a torn save that kills rank 0.
MANY = ("delay(rank=1, at=step#2, seconds=0.4); partition(nodes=(1,), at=step#3, duration=0.4); "
        "slow_io(rank=0, at=save#4, seconds=0.3); hang_rank(rank=1, at=step#5, resume_after=0.3); "
        "torn_save(rank=0, at=save#6)")


@pytest.fixture(scope="module")
def many_faults(tmp_path_factory):
    from pytest_ddpfault import run_group

    work = tmp_path_factory.mktemp("many")
    res = run_group(train_and_save, str(work), 7, 3.0, world_size=4, nodes=2, faults=MANY, timeout=20)
    assert not res.unfired, res.summary()
    assert res[0].status == "killed" and res.hung == [], res.summary()
    return res, Path(res.timeline(work / "many.html"))


def test_each_fault_is_a_span_on_the_lanes_it_touched_in_chromium(chromium, many_faults, tmp_path):
    res, page = many_faults
    read = probe(chromium, page, tmp_path, READ_MARKS + 'document.getElementById("probe").textContent = '
                                                         'JSON.stringify(readMarks());')
    scale = px_per_second(read)
    by_rank = {lane["rank"]: lane["marks"] for lane in read["lanes"]}
    fired = {ev.kind: ev for ev in reversed(res.fault_events)}  # each kind's first event

    def marks(rank, kind):
        return [m for m in by_rank[rank] if m["title"].startswith(f"{kind} on ")]

    # the delay: on rank 1 only, as wide as its 0.4 s on the axis, named on it
    [delay] = marks(1, "delay")
    assert not any(marks(r, "delay") for r in (0, 2, 3))
    assert "span-acting" in delay["cls"] and delay["label"] == "delay 0.4 s" and delay["shown"]
    assert delay["t0"] == pytest.approx(fired["delay"].time, abs=1e-6)
    assert delay["width"] == pytest.approx(0.4 * scale, abs=1.5)
    # the partition: on both sides' lanes, each naming the other side, until the harness lifted it
    lifted = [ev.time for ev in res.fault_events if ev.kind == "partition" and ev.rank is None]
    assert len(lifted) == 1
    for rank in range(4):
        [cut] = marks(rank, "partition")
        assert "span-links" in cut["cls"]
        assert cut["label"] == f"partition 0.4 s ↔ ranks {'2, 3' if rank < 2 else '0, 1'}"
        assert cut["t1"] == pytest.approx(lifted[0], abs=1e-6)
        assert cut["width"] == pytest.approx((lifted[0] - fired["partition"].time) * scale, abs=1.5)
    # the slow save on rank 0, the freeze on rank 1 for its resume_after, the torn save a moment
    [slow] = marks(0, "slow_io")
    assert "span-acting" in slow["cls"] and slow["width"] == pytest.approx(0.3 * scale, abs=1.5)
    [frozen] = marks(1, "hang_rank")
    assert "span-frozen" in frozen["cls"] and frozen["width"] == pytest.approx(0.3 * scale, abs=1.5)
    [torn] = marks(0, "torn_save")
    assert "moment" in torn["cls"] and torn["label"] == "torn_save" and torn["width"] == 0
    assert not any(marks(r, k) for r in (2, 3) for k in ("slow_io", "hang_rank", "torn_save"))
    # the lanes' tints behind the ops match: links on all, acting and frozen where they acted
    assert [sorted(set(lane["tints"])) for lane in read["lanes"]] == [
        ["tint-acting", "tint-links"], ["tint-acting", "tint-frozen", "tint-links"], ["tint-links"], ["tint-links"]]
    assert_round_ticks(read["ticks"])
    # the legend explains each kind of mark drawn, and nothing that is not
    assert set(read["drawn"]) >= {"op", "step", "acting", "frozen", "links", "moment", "life", "cross"}
    assert set(read["legend"]) == set(read["drawn"]), (read["legend"], read["drawn"])


ZOOM = """
var out = {}, svg = document.getElementById("lanes"), box = svg.getBoundingClientRect();
var L = +svg.dataset.plotX, W = +svg.dataset.plotW;
function at(t) { var v = ddpTimeline.view(); return box.left + L + (t - v[0]) / (v[1] - v[0]) * W; }
function mouse(target, type, x) {
  target.dispatchEvent(new MouseEvent(type, {clientX: x, clientY: box.top + 60, button: 0, bubbles: true,
                                             cancelable: true, view: window}));
}
out.start = readMarks();
document.getElementById("zoom-in").click(); out.zoomedIn = readMarks();
document.getElementById("pan-right").click(); out.panned = readMarks();
document.getElementById("zoom-fit").click(); out.fit = readMarks();
mouse(svg, "mousedown", at(0.2)); mouse(window, "mousemove", at(0.3)); mouse(window, "mouseup", at(0.4));
out.brushed = readMarks();
svg.dispatchEvent(new WheelEvent("wheel", {deltaY: 100, clientX: at(0.3), clientY: box.top + 60,
                                           bubbles: true, cancelable: true}));
out.wheeled = readMarks();
out.hash = location.hash;
document.getElementById("probe").textContent = JSON.stringify(out);
"""


def view(read: dict) -> tuple[float, float]:
    a, b = read["view"].split("-")
    return float(a), float(b)


def test_zoom_shows_a_short_stretch_in_detail(chromium, many_faults, tmp_path):
    _, page = many_faults
    out = probe(chromium, page, tmp_path, READ_MARKS + ZOOM)
    span = float(page.read_text().split('data-span="')[1].split('"')[0])
    assert view(out["start"]) == pytest.approx((0, span), abs=1e-3)
    assert view(out["zoomedIn"]) == pytest.approx((span / 4, span * 3 / 4), abs=1e-3)  # + halves it, centred
    assert view(out["panned"]) == pytest.approx((span * 3 / 8, span * 7 / 8), abs=1e-3)  # a quarter later
    assert view(out["fit"]) == pytest.approx((0, span), abs=1e-3)
    pixel = span / 960 * 1.5  # a mouse event's place is whole pixels
    assert view(out["brushed"]) == pytest.approx((0.2, 0.4), abs=pixel)  # the dragged stretch
    assert view(out["wheeled"]) == pytest.approx((0.3 - 0.1 * 1.25, 0.3 + 0.1 * 1.25), abs=pixel)  # about the cursor
    assert out["hash"] == f"#view={out['wheeled']['view']}"  # the address names the stretch shown
    for read in out.values():
        if isinstance(read, dict):
            assert_round_ticks(read["ticks"])
    # zoomed in, the same delay is drawn five times as wide: the stretch in detail
    wide = {r["rank"]: r["marks"] for r in out["brushed"]["lanes"]}
    whole = {r["rank"]: r["marks"] for r in out["fit"]["lanes"]}
    assert px_per_second(out["brushed"]) == pytest.approx(px_per_second(out["fit"]) * span / 0.2, rel=0.01)
    assert len(wide[1]) == len(whole[1])


def test_an_address_with_a_view_opens_on_that_stretch(chromium, many_faults, tmp_path):
    _, page = many_faults
    out = probe(chromium, page, tmp_path, READ_MARKS + 'document.getElementById("probe").textContent = '
                                                        'JSON.stringify(readMarks());', view="#view=1-1.5")
    assert view(out) == (1.0, 1.5)
    assert [label for _, label, _ in out["ticks"]] == ["1.00 s", "1.05 s", "1.10 s", "1.15 s", "1.20 s", "1.25 s",
                                                       "1.30 s", "1.35 s", "1.40 s", "1.45 s", "1.50 s"]
    x0, x1 = out["ticks"][0][2], out["ticks"][-1][2]
    svg = page.read_text()
    plot_x, plot_w = (int(svg.split(f'data-plot-{k}="')[1].split('"')[0]) for k in ("x", "w"))
    assert (x0, x1) == pytest.approx((plot_x, plot_x + plot_w), abs=0.2)


def test_the_page_of_many_faults_reads_in_a_screenshot(chromium, many_faults, tmp_path):
    _, page = many_faults
    shot = tmp_path / "many.png"
    done = run_chromium(chromium, tmp_path / "profile", "--window-size=1240,480", "--hide-scrollbars",
                        f"--screenshot={shot}", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    _, _, rows = png_pixels(shot.read_bytes())
    lanes = rows[190:420]
    # each fault family's strip colour, as the page's style gives it
    for name, rgb in [("acting", (0xd8, 0x1b, 0x60)), ("frozen", (0x45, 0x5a, 0x64)), ("links", (0xc6, 0x28, 0x28))]:
        assert count_colour(lanes, rgb, 6) > 300, f"no {name} strip drawn"


def test_the_timeline_renders_its_lanes_in_chromium(chromium, hang_page, tmp_path):
    shot = tmp_path / "shot.png"
    done = run_chromium(chromium, tmp_path / "profile", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                        "--hide-scrollbars", f"--screenshot={shot}", hang_page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    width, height, rows = png_pixels(shot.read_bytes())
    assert (width, height) == WINDOW
    # the in-flight gloo op runs to the deadline (the hatched bar of rank 0's lane), the
    # freeze on rank 1's lane (its strip, to the end) and the hung marks at the lanes' ends
    lanes = rows[180:300]
    assert count_colour(lanes, (0x45, 0x5a, 0x64), 6) > 5000, "no freeze drawn across rank 1's lane"
    # an op's colour (all_reduce blue, broadcast orange), also under the in-flight hatching's white veil
    colours = [(0x4e, 0x79, 0xa7), (0xf2, 0x8e, 0x2b)]
    colours += [tuple(round(v * 0.75 + 255 * 0.25) for v in c) for c in colours]
    bars = sum(count_colour(lanes, c, 24) for c in colours)
    assert bars > 5000, f"no op bars drawn ({bars} bar pixels)"
    assert count_colour(lanes, (0x37, 0x47, 0x4f), 8) > 50, "no hung marks drawn"


def test_the_timeline_dom_after_its_script_ran(chromium, hang_page, tmp_path):
    done = run_chromium(chromium, tmp_path / "profile", "--dump-dom", hang_page.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert 'data-js="ready"' in dom  # the page's script ran in the browser
    assert dom.count('<g class="lane ') == 2
    assert dom.count('data-status="hung"') == 2
    assert 'class="op inflight"' in dom and 'data-source="c++"' in dom
    assert "hang_rank on rank 1 at step#2" in dom
    lanes = dom.split('<g class="lane ')[1:]
    assert [lane.count('class="fault span-frozen"') for lane in lanes] == [0, 1]  # on the frozen rank only
    assert "hang_rank to the end</text>" in lanes[1]
