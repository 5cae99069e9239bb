"""The timeline page in a real browser: headless Chromium (Debian's ``chromium``, which
``.ci/run`` installs) loads the page of a real hang, takes a screenshot and dumps the DOM
after its script ran. Where Chromium is missing the test is skipped with the install hint,
except in CI (``DDPFAULT_REQUIRE_BROWSER=1``, set by ``.ci/run``), where it fails."""
from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from _workloads import ddp_training

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


def test_the_timeline_renders_its_lanes_in_chromium(chromium, hang_page, tmp_path):
    shot = tmp_path / "shot.png"
    done = run_chromium(chromium, tmp_path / "profile", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                        "--hide-scrollbars", f"--screenshot={shot}", hang_page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    width, height, rows = png_pixels(shot.read_bytes())
    assert (width, height) == WINDOW
    # the in-flight gloo op runs to the deadline (the hatched bar of rank 0's lane), the
    # fault marker on rank 1's lane and the hung marks at the lanes' ends are drawn
    lanes = rows[100:260]
    assert count_colour(lanes, (0xd3, 0x2f, 0x2f)) > 40, "no fault marker drawn"
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
