"""The fault catalog against real gloo: what each kind does to a real group, and what
the survivors really see.

Every test starts real rank processes (forked from the warm zygote) that talk over
real sockets; nothing in torch.distributed is mocked. Process-group timeouts are short
(1-2 s) and so are the harness deadlines, so a hang costs seconds, not minutes. Time
bounds are lower bounds where the fault promises a wait, and generous upper bounds only
to catch hangs.
"""
from __future__ import annotations

import datetime
import os
import re
import signal
import time

import pytest
import torch
import torch.distributed as dist

import pytest_ddpfault
from _workloads import CLOSED, INJECTED, PG, SHORT_PG, ddp_training, init_group
from pytest_ddpfault import Fault



class InjectedError(Exception):
    """Defined in this test file: crash_rank(exc=...) must raise it inside the rank."""


# -- functions run in the ranks ------------------------------------------------------
def allreduce_once(pg_timeout=PG):
    """init, one all_reduce of rank+1, destroy; prints progress (flushed) as it goes."""
    init_group(pg_timeout)
    print("init done", flush=True)
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    print("all_reduce done", flush=True)
    dist.destroy_process_group()
    return t.item()


def timed_allreduce(pg_timeout=PG):
    """Returns (sum, seconds the rank's all_reduce took)."""
    init_group(pg_timeout)
    t = torch.ones(1) * (dist.get_rank() + 1)
    start = time.monotonic()
    dist.all_reduce(t)
    took = time.monotonic() - start
    dist.destroy_process_group()
    return t.item(), took


def timed_allreduces(n, pg_timeout=PG):
    """n all_reduces; returns the seconds the whole loop took in this rank."""
    init_group(pg_timeout)
    start = time.monotonic()
    for _ in range(n):
        dist.all_reduce(torch.ones(1))
    took = time.monotonic() - start
    dist.destroy_process_group()
    return took


def step_then_return():
    pytest_ddpfault.step()
    return int(os.environ["RANK"])


def use_the_store(seconds=3.0):
    """Writes to the default store in a loop; an error says when it came."""
    init_group(PG)
    store = dist.distributed_c10d._get_default_store()
    start, n = time.monotonic(), 0
    try:
        while time.monotonic() - start < seconds:
            store.set(f"key{os.environ['RANK']}", str(n))
            n += 1
    except Exception as exc:
        raise type(exc)(f"{exc} [after {time.monotonic() - start:.3f}s and {n} writes]") from None
    return n


def retry_init_process_group(for_seconds=3.0):
    """Retries init_process_group itself until a deadline (with a short backoff)."""
    errors, end = [], time.monotonic() + for_seconds
    while True:
        try:
            init_group(SHORT_PG)
            break
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            if time.monotonic() > end:
                raise RuntimeError(f"gave up after {len(errors)} tries: {errors}") from None
            time.sleep(0.1)  # the user's own retry backoff
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


def retry_tcpstore(for_seconds=3.0):
    """Retries only the TCPStore until a deadline, then builds the group on it."""
    rank, ws = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    errors, end = [], time.monotonic() + for_seconds
    while True:
        try:
            store = dist.TCPStore(host, port, ws, is_master=(rank == 0),
                                  timeout=datetime.timedelta(seconds=SHORT_PG), wait_for_workers=False)
            break
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            if time.monotonic() > end:
                raise RuntimeError(f"gave up after {len(errors)} tries: {errors}") from None
            time.sleep(0.1)  # the user's own retry backoff
    dist.init_process_group("gloo", store=store, rank=rank, world_size=ws,
                            timeout=datetime.timedelta(seconds=PG))
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item(), errors


def _since_fault(res, r) -> float:
    """Seconds from the first fault event to rank r's end."""
    return r.end_time - min(ev.time for ev in res.fault_events)


# -- kill_rank -------------------------------------------------------------------------
@pytest.mark.ddp(world_size=4, fault="kill_rank(rank=2, at=all_reduce#1)", timeout=8)
def test_kill_rank_sigkill_survivors_see_the_connection_close_at_once(ddp):
    res = ddp.run(allreduce_once)

    killed = res[2]
    assert killed.status == "killed", res.summary()
    assert killed.killed_by(signal.SIGKILL) and killed.signal == signal.SIGKILL
    assert not killed.killed_by(signal.SIGTERM)
    assert killed.value is None and killed.exc is None
    # it fired at its trigger: after init, before the all_reduce completed
    assert "init done" in killed.stdout and "all_reduce done" not in killed.stdout

    assert [r.rank for r in res.faulted] == [2]
    assert [r.rank for r in res.survivors] == [0, 1, 3]
    res.assert_survivors_raised(RuntimeError, match=CLOSED, within=2)
    for r in res.survivors:
        assert r.status == "raised" and "all_reduce done" not in r.stdout
    assert res.values == [None] * 4 and not res.ok and res.hung == []

    [event] = res.fault_events
    assert (event.kind, event.rank, event.trigger) == ("kill_rank", 2, "all_reduce#1")
    assert 0 <= event.time < 5
    assert "kill_rank" in str(event) and "rank 2" in str(event)
    summary = res.summary()
    assert "fault plan: kill_rank(rank=2, at=all_reduce#1)" in summary
    assert "SIGKILL" in summary
    assert res.duration < 6


@pytest.mark.ddp(world_size=2, fault="kill_rank(rank=1, signal=SIGTERM)", timeout=8)
def test_kill_rank_with_sigterm_dies_of_sigterm(ddp):
    res = ddp.run(allreduce_once)
    assert res[1].status == "killed"
    assert res[1].killed_by(signal.SIGTERM), res.summary()
    assert not res[1].killed_by(signal.SIGKILL)
    assert "SIGTERM" in res.summary()
    res.assert_survivors_raised(RuntimeError, match=CLOSED, within=2)
    [event] = res.fault_events
    # the default trigger is the first collective: here the all_reduce
    assert (event.kind, event.rank, event.trigger) == ("kill_rank", 1, "all_reduce#1")


# -- crash_rank ------------------------------------------------------------------------
@pytest.mark.ddp(world_size=3, fault="crash_rank(rank=1, at=init)", timeout=8)
def test_crash_rank_at_init_leaves_the_others_waiting_for_the_store(ddp):
    res = ddp.run(allreduce_once, SHORT_PG)

    crashed = res[1]
    assert crashed.raised(RuntimeError, match=f"^{INJECTED}$"), res.summary()
    assert isinstance(crashed.exc, RuntimeError) and str(crashed.exc) == INJECTED
    assert crashed.exc_type == "RuntimeError"
    assert "init done" not in crashed.stdout
    [event] = res.fault_events
    assert (event.kind, event.rank, event.trigger) == ("crash_rank", 1, "init")

    # the others wait for rank 1 in the store's barrier until the group's timeout
    res.assert_survivors_raised(dist.DistStoreError, match="wait timeout")
    for r in res.survivors:
        assert isinstance(r.exc, dist.DistStoreError)
        assert SHORT_PG * 0.8 <= _since_fault(res, r) <= SHORT_PG + 4, res.summary()
    assert res.duration < 7


@pytest.mark.ddp(world_size=2, fault="crash_rank(rank=1, at=all_reduce#1, exc=ValueError, message='x')",
                 timeout=8)
def test_crash_rank_raises_the_given_exception_and_message(ddp):
    res = ddp.run(allreduce_once)
    assert res[1].status == "raised"
    assert res[1].raised(ValueError, match="^x$") and not res[1].raised(RuntimeError)
    assert isinstance(res[1].exc, ValueError) and res[1].exc.args == ("x",)
    assert "all_reduce done" not in res[1].stdout
    # a rank that raised is gone: its peer sees the connection close
    res.assert_survivors_raised(RuntimeError, match=CLOSED, within=2)


def test_crash_rank_with_a_torch_or_user_exception_class(ddp):
    plan = [Fault("crash_rank", rank=1, at="all_reduce#1", exc=InjectedError, message="from the test file")]
    res = ddp.run(allreduce_once, faults=plan, timeout=8)
    assert res[1].raised(InjectedError, match="^from the test file$"), res.summary()
    assert isinstance(res[1].exc, InjectedError)

    res = ddp.run(allreduce_once, timeout=8,
                  faults="crash_rank(rank=0, at=all_reduce#1, exc=torch.distributed.DistNetworkError)")
    assert res[0].raised(dist.DistNetworkError, match=INJECTED), res.summary()
    assert res[0].raised(RuntimeError)  # DistNetworkError is a RuntimeError: isinstance semantics
    assert [r.rank for r in res.faulted] == [0]


@pytest.mark.ddp(world_size=2, fault="crash_rank(rank=1, code=3)", timeout=8)
def test_crash_rank_with_code_exits_without_returning(ddp):
    res = ddp.run(allreduce_once)
    assert res[1].status == "exited", res.summary()
    assert res[1].exit_code == 3 and res[1].signal is None
    assert res[1].exc is None and res[1].value is None
    assert INJECTED in res[1].stderr  # the message is written before os._exit
    assert "exited with code 3" in res.summary()
    res.assert_survivors_raised(RuntimeError, match=CLOSED, within=2)


# -- hang_rank -------------------------------------------------------------------------
@pytest.mark.ddp(world_size=3, fault="hang_rank(rank=0)", timeout=8)
def test_hang_rank_survivors_time_out_and_the_frozen_rank_is_reaped(ddp):
    started = time.monotonic()
    res = ddp.run(allreduce_once, SHORT_PG)
    took = time.monotonic() - started

    # the frozen rank keeps its sockets open: the others see silence, not a close
    res.assert_survivors_raised(RuntimeError, match="Timed out waiting")
    for r in res.survivors:
        assert SHORT_PG * 0.8 <= _since_fault(res, r) <= SHORT_PG + 4, res.summary()
    frozen = res[0]
    assert frozen.status == "hung" and res.hung == [frozen] and res.faulted == [frozen]
    assert not frozen.killed_by(signal.SIGKILL)  # the harness's own kill is not "killed"
    assert "hang_rank" in frozen.note
    assert frozen.stack and "in allreduce_once" in frozen.stack
    [event] = res.fault_events
    assert (event.kind, event.rank, event.trigger) == ("hang_rank", 0, "all_reduce#1")
    # reaped as soon as the others were done, long before the 8 s deadline
    assert res.duration < SHORT_PG + 4 and took < SHORT_PG + 5
    # a frozen peer is detected at the group's timeout, never earlier
    with pytest.raises(AssertionError, match=r"more than within=0\.5s"):
        res.assert_survivors_raised(RuntimeError, within=0.5)


@pytest.mark.ddp(world_size=3, fault="hang_rank(rank=2, at=broadcast#2, resume_after=0.5)", timeout=8)
def test_hang_rank_resumed_within_the_timeout_is_a_stall_the_group_survives(ddp):
    res = ddp.run(ddp_training)
    res.assert_all_ok()
    assert len(set(res.values)) == 1, "DDP keeps the replicas equal"
    assert all("step 5 done" in r.stdout for r in res)
    kinds = [(ev.kind, ev.rank) for ev in res.fault_events]
    assert kinds == [("hang_rank", 2), ("resume", 2)], res.summary()
    hang, resume = res.fault_events
    assert hang.trigger == "broadcast#2"
    assert 0.45 <= resume.time - hang.time <= 1.5
    assert res[2].duration >= 0.45


@pytest.mark.ddp(world_size=2, fault="hang_rank(rank=1, at=step#1, resume_after=0.5)", timeout=6)
def test_hang_rank_with_resume_after_resumes_even_when_no_peer_waits(ddp):
    res = ddp.run(step_then_return)
    assert [ev.kind for ev in res.fault_events] == ["hang_rank", "resume"], res.summary()
    res.assert_all_ok()
    assert res.values == [0, 1]
    assert res[1].duration >= 0.45


# -- delay -----------------------------------------------------------------------------
@pytest.mark.ddp(world_size=2, fault="delay(rank=1, seconds=0.5)", timeout=8)
def test_delay_shorter_than_the_timeout_is_a_straggler_the_group_waits_for(ddp):
    res = ddp.run(timed_allreduce)
    res.assert_all_ok()
    assert [v[0] for v in res.values] == [3.0, 3.0]
    took = [v[1] for v in res.values]
    # the straggler slept before its call; rank 0's all_reduce waited for it (less the
    # few ms by which the two ranks may have left init apart)
    assert took[1] >= 0.5 and took[0] >= 0.3, took
    assert res.duration >= 0.5
    assert res.faulted == [] and len(res.survivors) == 2  # a delay targets no rank
    [event] = res.fault_events
    assert (event.kind, event.rank, event.trigger) == ("delay", 1, "all_reduce#1")


@pytest.mark.ddp(world_size=3, fault="delay(rank=1, seconds=3)", timeout=8)
def test_delay_longer_than_the_timeout_makes_the_others_time_out(ddp):
    res = ddp.run(allreduce_once, SHORT_PG)
    for rank in (0, 2):
        r = res[rank]
        assert r.raised(RuntimeError, match="Timed out"), res.summary()
        assert SHORT_PG * 0.8 <= _since_fault(res, r) < 2.8, res.summary()
    # the straggler itself wakes up to a group that is gone
    assert res[1].status == "raised" and "all_reduce done" not in res[1].stdout
    assert res[1].duration >= 3.0
    assert res.hung == []


@pytest.mark.ddp(world_size=2, fault="delay(rank=1, seconds=0.2, every=true)", timeout=8)
def test_delay_every_slows_each_call(ddp):
    res = ddp.run(timed_allreduces, 3)
    res.assert_all_ok()
    # rank 1 slept 3 x 0.2 s in its loop; rank 0 waited for it (less the init skew)
    assert res.values[1] >= 0.6 and res.values[0] >= 0.45, res.values
    assert [ev.trigger for ev in res.fault_events] == ["all_reduce#1", "all_reduce#2", "all_reduce#3"]

    once = ddp.run(timed_allreduces, 3, faults="delay(rank=1, seconds=0.2)")
    once.assert_all_ok()
    assert [ev.trigger for ev in once.fault_events] == ["all_reduce#1"]
    assert once.values[1] >= 0.2, once.values


# -- port_collision --------------------------------------------------------------------
@pytest.mark.ddp(world_size=3, fault="port_collision", timeout=4)
def test_port_collision_listen_rank0_fails_at_once_others_block_past_their_timeout(ddp):
    res = ddp.run(allreduce_once, SHORT_PG)
    rank0 = res[0]
    assert rank0.raised(dist.DistNetworkError, match="EADDRINUSE"), res.summary()
    assert rank0.duration < 1.0
    # the others connected to a listener that never answers: only the deadline ends them
    assert [r.rank for r in res.hung] == [1, 2]
    for r in res.hung:
        assert "deadline" in r.note
        assert r.stack and "init_process_group" in r.stack and "in allreduce_once" in r.stack
        assert r.duration >= 4.0
    assert 4.0 <= res.duration < 9
    [event] = res.fault_events
    assert event.kind == "port_collision" and event.rank is None
    assert "the group" in str(event)


@pytest.mark.ddp(world_size=3, fault="port_collision(mode=bind)", timeout=10)
def test_port_collision_bind_others_fail_to_connect_after_timeout_and_retries(ddp):
    res = ddp.run(allreduce_once, SHORT_PG)
    assert res[0].raised(dist.DistNetworkError, match="EADDRINUSE"), res.summary()
    assert res[0].duration < 1.0
    for rank in (1, 2):
        r = res[rank]
        assert r.raised(dist.DistNetworkError, match=r"timed out .*trying to connect"), res.summary()
        assert r.duration >= SHORT_PG
    assert res.hung == [] and res.duration < 9


@pytest.mark.ddp(world_size=3, fault="port_collision(hold_for=1)", timeout=5)
def test_port_collision_released_later_only_a_store_level_retry_recovers(ddp):
    res = ddp.run(retry_tcpstore)
    res.assert_all_ok()
    assert [v[0] for v in res.values] == [3.0] * 3
    rank0_errors = res.values[0][1]
    assert rank0_errors and all("EADDRINUSE" in e for e in rank0_errors), rank0_errors
    assert 1.0 <= res.duration < 4.5
    assert res[0].duration >= 0.95  # rank 0 could not host the store before the release
    assert [ev.detail for ev in res.fault_events][-1] == "released the port"
    release = res.fault_events[-1]
    assert release.trigger == "t=1.0" and 0.95 <= release.time < 2.5

    # retrying init_process_group itself does not recover: each attempt moves the
    # group's store prefix on, so the ranks never meet again
    res = ddp.run(retry_init_process_group)
    assert not any(r.status == "ok" for r in res), res.summary()
    assert res[0].raised(RuntimeError, match="gave up"), res.summary()
    assert "EADDRINUSE" in res[0].message


# -- store_down ------------------------------------------------------------------------
@pytest.mark.ddp(world_size=3, fault="store_down(at=t=0.5)", timeout=8)
def test_store_down_later_store_operations_fail(ddp):
    res = ddp.run(use_the_store)
    [event] = res.fault_events
    assert (event.kind, event.rank, event.trigger) == ("store_down", None, "t=0.5")
    assert 0.45 <= event.time < 2.0
    for r in res:
        assert r.raised(dist.DistNetworkError), res.summary()
        assert 0.45 <= r.end_time and _since_fault(res, r) < 2.0, res.summary()
    assert res.duration < 3.0  # long before the loops' own 3 s


# -- the plan: marker, overrides ---------------------------------------------------------
@pytest.mark.ddp(world_size=2, fault="kill_rank(rank=1)", timeout=8)
def test_run_faults_override_the_markers_plan(ddp):
    assert [str(f) for f in ddp.faults] == ["kill_rank(rank=1)"]

    res = ddp.run(allreduce_once, faults=Fault("crash_rank", rank=0, exc=ValueError, message="override"))
    assert res[0].raised(ValueError, match="override"), res.summary()
    assert res[1].raised(RuntimeError, match=CLOSED)  # rank 1 was not killed
    assert [r.rank for r in res.faulted] == [0]
    assert "fault plan: crash_rank(rank=0, exc=ValueError, message='override')" in res.summary()
    assert "kill_rank" not in res.summary()

    res = ddp.run(allreduce_once, faults=["delay(rank=0, seconds=0.1)",
                                          Fault("kill_rank", rank=1, at="all_reduce#1")])
    assert res[1].killed_by(signal.SIGKILL), res.summary()
    assert sorted((ev.kind, ev.rank) for ev in res.fault_events) == [("delay", 0), ("kill_rank", 1)]
    assert "fault plan: delay(rank=0, seconds=0.1); kill_rank(rank=1, at=all_reduce#1)" in res.summary()

    res = ddp.run(allreduce_once, faults=[])
    res.assert_all_ok()
    assert res.values == [3.0, 3.0] and res.fault_events == []
    assert [str(f) for f in ddp.faults] == ["kill_rank(rank=1)"]  # the marker's plan is kept


# -- assert_survivors_raised on real results ------------------------------------------
@pytest.mark.ddp(world_size=3, fault="kill_rank(rank=1, at=all_reduce#1)", timeout=8)
def test_assert_survivors_raised_fails_on_the_wrong_type(ddp):
    res = ddp.run(allreduce_once)
    res.assert_survivors_raised(RuntimeError, match=CLOSED)
    with pytest.raises(AssertionError) as info:
        res.assert_survivors_raised(ValueError)
    message = str(info.value)
    assert re.search(r"rank 0 raised RuntimeError, expected ValueError", message), message
    assert "rank 2 raised RuntimeError" in message
    assert "rank 1 " not in message.split("\n")[0]  # the faulted rank is no survivor
    with pytest.raises(AssertionError, match="expected RuntimeError matching 'no such text'"):
        res.assert_survivors_raised(RuntimeError, match="no such text")


@pytest.mark.ddp(world_size=2, fault="kill_rank(rank=1, at=all_reduce#5)", timeout=8, allow_unfired=True)
def test_assert_survivors_raised_says_when_no_fault_fired(ddp):
    res = ddp.run(allreduce_once)  # one all_reduce only: all_reduce#5 never comes
    res.assert_all_ok()
    assert res.fault_events == [] and res.values == [3.0, 3.0]
    with pytest.raises(AssertionError, match="no fault event fired") as info:
        res.assert_survivors_raised(RuntimeError, within=2)
    assert "rank 0 was ok" in str(info.value)


# -- bad faults in a marker fail at collection -------------------------------------------
def test_bad_faults_in_the_marker_are_found_at_collection(pytester):
    for name, fault in {"unknown": "explode(rank=1)", "outside": "hang_rank(rank=3)",
                        "norank": "port_collision(rank=1)"}.items():
        pytester.makepyfile(**{f"test_{name}": f'''
            import pytest

            @pytest.mark.ddp(world_size=3, fault="{fault}")
            def test_it(ddp):
                pass
        '''})
    # (hypothesis's plugin would import hypothesis, ~2 s, in this in-process run; the
    # benchmark plugin warns under xdist)
    result = pytester.runpytest("--collect-only", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                "-p", "no:benchmark")
    assert result.ret == pytest.ExitCode.OK  # listed at collection; each fails its own test
    out = result.stdout.str()
    unknown = _error_line(out, "test_unknown.py::test_it")
    assert "'explode'" in unknown
    for kind in ("kill_rank", "crash_rank", "hang_rank", "delay", "port_collision", "store_down",
                 "block_port", "latency"):
        assert kind in unknown, unknown
    outside = _error_line(out, "test_outside.py::test_it")
    assert "rank 3" in outside and "0..2" in outside, outside
    norank = _error_line(out, "test_norank.py::test_it")
    assert "port_collision takes no rank" in norank, norank


def _error_line(out: str, nodeid: str) -> str:
    lines = [line for line in out.splitlines() if nodeid in line]
    assert lines, f"no error names {nodeid}:\n{out}"
    return " ".join(lines)
