"""Shared fixtures of the project's tests.

``no_rank_left_behind`` (autouse) checks after every test that the warm zygote of this
pytest process has no child left: every rank and every store host of every run must
be gone once ``ddp.run``/``run_group`` has returned, however the run ended.
"""
from __future__ import annotations

import shutil
import tempfile

import pytest

# Imported here, before any test, so that pytester's in-process runs (which drop the
# modules a test imported when it ends) keep sharing this module and so one zygote.
import pytest_ddpfault.parent.launcher  # noqa: F401

from _helpers import children_of, poll, zygote_pids

LEAK_GRACE = 2.0  # seconds for the zygote to reap what a failed test killed last


@pytest.fixture(autouse=True)
def no_rank_left_behind():
    yield
    leftovers = {}
    for pid in zygote_pids():
        poll(lambda: not children_of(pid), LEAK_GRACE)
        left = children_of(pid)
        if left:
            leftovers[pid] = sorted(left)
    assert not leftovers, f"processes left behind by the test, by zygote pid: {leftovers}"


@pytest.fixture
def zygote_pid() -> int:
    """The pid of this process's default zygote, started (and ready) if it was not yet."""
    from pytest_ddpfault.parent import launcher

    z = launcher.get_launcher("forkserver", ())
    return z.proc.pid


@pytest.fixture
def private_tmp(zygote_pid, monkeypatch):
    """A temp dir of its own for the harness (short path: it holds a Unix socket), so
    that what a run leaves in it can be seen without races with other processes."""
    path = tempfile.mkdtemp(prefix="ddpft-", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
