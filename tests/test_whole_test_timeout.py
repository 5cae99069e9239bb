"""A whole test's limit: pytest-timeout's ``@pytest.mark.timeout(N)`` on a test that makes
many runs (a Hypothesis property) ends it at about N s, with either method, and leaves no
process of the runs (zygote, ranks, store host) and none of their temp files behind.

Each case is a real pytest session in a subprocess (``method=thread`` ends that process
with ``os._exit``). Its processes carry a tag in their environment, so whatever is left is
found in /proc whoever its parent is now; its temp dir is its own.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from xml.etree import ElementTree

import pytest

from _helpers import poll

pytest.importorskip("pytest_timeout")

LIMIT = 6.0           # the limited test's pytest-timeout, in seconds
RUN_SECONDS = 0.5     # each run's ranks sleep this long after an all_reduce: a run is under way at the limit
CLEAN_WITHIN = 10.0   # for the zygote (thread method: the parent is gone) to end and remove what was left
SESSION_BUDGET = 300  # the whole subprocess session: a fresh interpreter imports torch, forks its zygote
TAG = "DDPFAULT_TIMEOUT_TEST_TAG"

TEST_FILE = '''
import os, time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st


def work(seconds):
    import torch, torch.distributed as dist
    dist.all_reduce(torch.ones(1))
    time.sleep(seconds)
    return os.getpid()


@pytest.mark.ddp(world_size=2)
def test_warm_up(ddp):
    """The zygote's start (seconds, importing torch) is not in the limited test's time."""
    ddp.run(work, 0.0, init=True).assert_all_ok()


@pytest.mark.timeout({limit})
@settings(max_examples=10_000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 10**6))
@pytest.mark.ddp(world_size=2, timeout=120)
def test_many_runs(ddp, n):
    with open("started", "a") as f:
        f.write(f"{{time.time()}}\\n")
    ddp.run(work, {seconds}, init=True).assert_all_ok()
    with open("runs", "a") as f:
        f.write("1\\n")
'''


def tagged(tag: str) -> list[int]:
    """Pids of live processes whose environment carries ``TAG=tag``."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{entry}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env and state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def run_files(tmp: str) -> list[str]:
    return sorted(n for n in os.listdir(tmp) if n.startswith(("ddpf-", "ddpfault-")))


@pytest.fixture
def session(pytester, monkeypatch):
    """Run the two tests above in a pytest subprocess with ``method``; returns what is
    needed to judge it: its result, when it ended, its tag and its temp dir."""
    tag = uuid.uuid4().hex
    tmp = tempfile.mkdtemp(prefix="wtt-", dir="/tmp")  # short: the runs' Unix sockets live there
    monkeypatch.setenv(TAG, tag)
    monkeypatch.setenv("TMPDIR", tmp)
    pytester.makepyfile(test_limited=TEST_FILE.format(limit=LIMIT, seconds=RUN_SECONDS))

    def run(method: str, *args: str):
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly",
                                               f"--timeout-method={method}", "--junitxml=junit.xml", *args,
                                               timeout=SESSION_BUDGET)
        return result, time.time(), tag, tmp

    try:
        yield run
    finally:
        runtime = os.environ.get("XDG_RUNTIME_DIR", "")
        if runtime.startswith(tmp):  # a kept-warm zygote's home
            from pytest_ddpfault.parent import warm

            warm.stop_all(os.path.join(runtime, "ddpfault"))
        for pid in tagged(tag):  # never leave anything, even when the test fails
            os.kill(pid, 9)
        shutil.rmtree(tmp, ignore_errors=True)


def assert_nothing_left(tag: str, tmp: str, but: tuple = ()) -> None:
    left = lambda: [pid for pid in tagged(tag) if pid not in but]  # noqa: E731
    assert poll(lambda: not left(), CLEAN_WITHIN), f"processes of the session still alive: {left()}"
    assert poll(lambda: not run_files(tmp), CLEAN_WITHIN), f"temp files left in {tmp}: {run_files(tmp)}"


def completed_runs(path: Path) -> int:
    runs = path / "runs"
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def test_the_signal_method_ends_a_property_at_its_limit_and_nothing_is_left(session, pytester):
    result, _, tag, tmp = session("signal")

    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "Timeout (>6.0s) from pytest-timeout" in out or "TestTimeLimitPassed" in out, out[-3000:]
    # Hypothesis caught pytest-timeout's failure and tried the example again: ddp.run refused
    # to start it (else it would shrink on, a run per example, until its own limits)
    assert "this test's time limit (6 s, pytest-timeout) has passed" in out, out[-3000:]
    [case] = [c for c in ElementTree.parse(pytester.path / "junit.xml").iter("testcase")
              if c.get("name") == "test_many_runs"]
    took = float(case.get("time"))
    assert LIMIT - 0.5 <= took <= LIMIT + 8, f"the limited test took {took:.1f} s (limit {LIMIT:g} s)"
    assert completed_runs(pytester.path) >= 1, "the limit came before the test made a second run"
    assert_nothing_left(tag, tmp)


def test_the_thread_method_ends_the_process_and_its_zygote_removes_what_it_left(session, pytester):
    result, ended, tag, tmp = session("thread")

    out = result.stdout.str() + result.stderr.str()
    # pytest-timeout dumped every thread's stack and called os._exit(1): no session end
    assert result.ret == 1 and "Stack of" in out and "+ Timeout +" in out, out[-3000:]
    assert not (pytester.path / "junit.xml").exists(), "the session ended normally"
    started = float((pytester.path / "started").read_text().splitlines()[0])
    assert LIMIT - 1 <= ended - started <= LIMIT + 8, f"the session ended {ended - started:.1f} s after the test began"
    assert completed_runs(pytester.path) >= 1, "the limit came before the test made a second run"
    assert_nothing_left(tag, tmp)


def test_a_kept_warm_zygote_removes_what_a_client_that_died_left(session, pytester, monkeypatch):
    """--ddp-keep-warm: the zygote is nobody's child and stays; the client's ranks die when
    its connection closes, and its temp files once its process is gone."""
    runtime = tempfile.mkdtemp(prefix="run-", dir=os.environ["TMPDIR"])
    monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
    result, _, tag, tmp = session("thread", "--ddp-keep-warm")

    out = result.stdout.str() + result.stderr.str()
    assert result.ret == 1 and "+ Timeout +" in out, out[-3000:]
    from pytest_ddpfault.parent import warm

    home = os.path.join(runtime, "ddpfault")
    zygotes = {warm.owner_pid(home, name[:-len(".lock")]) for name in os.listdir(home) if name.endswith(".lock")}
    assert len(zygotes) == 1 and None not in zygotes and set(tagged(tag)) >= zygotes, (zygotes, tagged(tag))
    assert_nothing_left(tag, tmp, but=tuple(zygotes))
