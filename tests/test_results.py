"""What a run reports: every way a rank can end, observed from real runs, and how
``GroupResult``/``RankResult`` present it (statuses, rebuilt exceptions, the table,
the assertion messages)."""
from __future__ import annotations

import os
import re
import signal
import sys
import threading

import pytest

import pytest_ddpfault
from pytest_ddpfault.results import FaultEvent, GroupResult, RankResult


class CustomError(RuntimeError):
    """Defined in this test file: the rank must raise it and the harness rebuild it."""


class Unrebuildable(Exception):
    def __init__(self, a, b):  # pickle calls cls(*args) with args=("a and b",): fails
        super().__init__(f"{a} and {b}")


# -- rank functions -----------------------------------------------------------------
def five_fates():
    rank = int(os.environ["RANK"])
    if rank == 0:
        return rank * 10
    if rank == 1:
        raise ValueError("bad value 1")
    if rank == 2:
        os._exit(3)
    if rank == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(4)


def raise_custom():
    raise CustomError(f"custom failure on rank {os.environ['RANK']}")


def raise_unrebuildable():
    raise Unrebuildable("x", "y")


def return_unpicklable():
    return threading.Lock()


@pytest.fixture(scope="module")
def fates() -> GroupResult:
    return pytest_ddpfault.run_group(five_fates, world_size=5, timeout=30)


# -- statuses -------------------------------------------------------------------------
def test_statuses(fates):
    assert [r.status for r in fates] == ["ok", "raised", "exited", "killed", "exited"]
    assert not fates.ok
    assert fates.values == [0, None, None, None, None]
    assert fates.hung == []
    assert fates[0].value == 0 and fates[0].exc is None


def test_raised_exception_is_rebuilt(fates):
    r = fates[1]
    assert isinstance(r.exc, ValueError) and r.exc.args == ("bad value 1",)
    assert r.exc_type == "ValueError"
    assert r.message == "bad value 1"
    assert "Traceback (most recent call last)" in r.traceback
    assert 'raise ValueError("bad value 1")' in r.traceback
    assert "in five_fates" in r.traceback
    assert r.value is None


def test_raised_uses_isinstance_semantics_and_match(fates):
    r = fates[1]
    assert r.raised(ValueError)
    assert r.raised(Exception) and r.raised(BaseException)
    assert r.raised()  # any exception
    assert r.raised(KeyError, ValueError)
    assert not r.raised(LookupError)
    assert not r.raised(TypeError)
    assert r.raised(ValueError, match=r"bad value \d")
    assert not r.raised(ValueError, match="good value")
    # a rank that did not raise never "raised"
    assert not fates[0].raised() and not fates[2].raised() and not fates[3].raised(Exception)


def test_os_exit_is_exited_with_its_code(fates):
    r = fates[2]
    assert r.status == "exited" and r.exit_code == 3 and r.signal is None
    assert not r.killed_by(signal.SIGKILL)


def test_self_sigkill_is_killed(fates):
    r = fates[3]
    assert r.status == "killed" and r.signal == signal.SIGKILL and r.exit_code is None
    assert r.killed_by(signal.SIGKILL)
    assert not r.killed_by(signal.SIGTERM)
    assert not fates[1].killed_by(signal.SIGKILL)


def test_sys_exit_is_exited_with_its_code(fates):
    r = fates[4]
    assert r.status == "exited" and r.exit_code == 4
    assert r.exc is None and r.traceback is None


def test_durations(fates):
    assert 0 < fates.duration < 30
    for r in fates:
        assert r.duration is not None and 0 <= r.duration < 30


def test_summary_table(fates):
    lines = fates.summary().splitlines()
    assert re.match(r"rank\s+status\s+time\s+what happened$", lines[0])
    expected = [
        r"0\s+ok\s+\d+\.\d\ds\s+returned 0$",
        r"1\s+raised\s+\d+\.\d\ds\s+ValueError: bad value 1$",
        r"2\s+exited\s+\d+\.\d\ds\s+exited with code 3 without returning$",
        r"3\s+killed\s+\d+\.\d\ds\s+died of SIGKILL$",
        r"4\s+exited\s+\d+\.\d\ds\s+exited with code 4 without returning$",
    ]
    assert len(lines) == 1 + len(expected), fates.summary()
    for line, pattern in zip(lines[1:], expected):
        assert re.match(pattern, line), f"{line!r} !~ {pattern!r}"


def test_assert_all_ok_message_has_table_and_tracebacks(fates):
    with pytest.raises(AssertionError) as info:
        fates.assert_all_ok()
    text = str(info.value)
    assert "ranks [1, 2, 3, 4] did not return" in text
    assert fates.summary() in text
    assert "Traceback (most recent call last)" in text and "ValueError: bad value 1" in text
    assert "--- rank 3: killed: died of SIGKILL" in text
    assert "--- rank 0" not in text  # a rank that returned needs no report


def test_repr(fates):
    assert repr(fates).startswith("<GroupResult world_size=5 [0:ok, 1:raised, 2:exited, 3:killed, 4:exited]")


# -- exceptions ---------------------------------------------------------------------
@pytest.mark.ddp(world_size=2)
def test_custom_exception_class_from_the_test_file(ddp):
    res = ddp.run(raise_custom)
    for r in res:
        assert r.status == "raised"
        assert type(r.exc) is CustomError
        assert r.exc_type == f"{__name__}.CustomError"
        assert r.message == f"custom failure on rank {r.rank}"
        assert r.raised(CustomError) and r.raised(RuntimeError)
        assert not r.raised(ValueError)
        assert r.raised(CustomError, match=f"rank {r.rank}$")


@pytest.mark.ddp(world_size=1)
def test_exception_that_cannot_be_rebuilt_keeps_type_message_and_traceback(ddp):
    res = ddp.run(raise_unrebuildable)
    r = res[0]
    assert r.status == "raised" and r.exc is None
    assert r.exc_type == f"{__name__}.Unrebuildable"
    assert r.message == "x and y"
    assert r.raised(Unrebuildable) and r.raised(Exception) and not r.raised(ValueError)
    assert "in raise_unrebuildable" in r.traceback


@pytest.mark.ddp(world_size=2)
def test_unpicklable_return_value_is_a_clear_error(ddp):
    res = ddp.run(return_unpicklable)
    assert not res.ok and res.values == [None, None]
    for r in res:
        assert r.status == "raised"
        assert r.raised(TypeError, match=f"rank {r.rank} returned a value that cannot be pickled")
        assert "lock" in r.message


# -- pure data: the rules behind the table and the assertions -----------------------
def _group(*ranks, faulted=(), events=()):
    return GroupResult(list(ranks), list(events), frozenset(faulted), 1.0, "")


def test_values_are_none_only_where_a_rank_failed():
    res = _group(RankResult(0, "ok", value=None), RankResult(1, "ok", value=0), RankResult(2, "hung"))
    assert res.values == [None, 0, None]
    assert [r.rank for r in res.hung] == [2]


def test_survivors_and_faulted_follow_the_plan():
    res = _group(RankResult(0, "raised"), RankResult(1, "killed", signal=9), faulted={1})
    assert [r.rank for r in res.survivors] == [0] and [r.rank for r in res.faulted] == [1]
    assert "1*" in res.summary() and "(* = targeted" in res.summary()


@pytest.mark.parametrize("plan, legend", [
    ("torn_save(rank=0)", "(* = targeted by torn_save: not a survivor)"),
    ("io_error(rank=1, at=load#1); delay(rank=0, seconds=1); kill_rank(rank=1)",   # delay stars no rank
     "(* = targeted by io_error or kill_rank: not a survivor)"),
    ("", "(* = targeted by " + ", ".join(pytest_ddpfault.faults.kinds_with("targets_rank")[:-1])
     + f" or {pytest_ddpfault.faults.kinds_with('targets_rank')[-1]}: not a survivor)"),
])
def test_the_star_legend_names_the_kinds_that_star_a_rank(plan, legend):
    res = GroupResult([RankResult(0, "killed", signal=9), RankResult(1, "raised")], [], frozenset({0}), 1.0, plan)
    assert legend in res.summary().splitlines(), res.summary()
    # without a plan, every kind that stars a rank: storage faults do
    assert {"kill_rank", "crash_rank", "hang_rank", "torn_save", "io_error"} <= set(re.findall(r"\w+", legend)) or plan


def test_assert_survivors_raised_within_measures_from_the_first_fault():
    slow = RankResult(0, "raised", exc_type="RuntimeError", exc_mro=("RuntimeError", "Exception"),
                      message="Connection closed by peer", end_time=5.0)
    res = _group(slow, RankResult(1, "killed", signal=9), faulted={1},
                 events=[FaultEvent("kill_rank", 1, "all_reduce#1", 0.5)])
    res.assert_survivors_raised(RuntimeError, match="closed")
    res.assert_survivors_raised(RuntimeError, within=5.0)
    with pytest.raises(AssertionError, match=r"rank 0 ended 4\.50s after the first fault"):
        res.assert_survivors_raised(RuntimeError, within=1.0)
    with pytest.raises(AssertionError, match=r"rank 0 raised RuntimeError, expected ValueError"):
        res.assert_survivors_raised(ValueError)
