"""Triggers inside real ranks: which call a fault fires on, counted the way the user sees
the calls (Python functions, nested calls, DDP's C++ calls, step(), init, t=).

Most counting tests run one rank (world_size=1, a real gloo group of one) that performs a
script of real torch.distributed calls and catches the injected crash_rank exception:
what it caught tells exactly which call the fault fired on, and that it fired once.
The rest run real groups, DDP included. Nothing in torch.distributed is mocked.
"""
from __future__ import annotations

import signal
import time

import pytest
import torch
import torch.distributed as dist

import pytest_ddpfault
from _workloads import CLOSED, INJECTED, SHORT_PG, ddp_training, init_group
from pytest_ddpfault import Fault
from pytest_ddpfault.rank import steps



# -- functions run in the ranks ------------------------------------------------------
def _call(op: str) -> None:
    one = torch.ones(1)
    if op == "all_reduce":
        dist.all_reduce(one)
    elif op == "barrier":
        dist.barrier()
    elif op == "broadcast":
        dist.broadcast(one, 0)
    elif op == "all_gather":
        dist.all_gather([torch.zeros(1)], one)
    elif op == "all_gather_object":
        dist.all_gather_object([None], {"rank": 0})
    elif op == "broadcast_object_list":
        dist.broadcast_object_list([1], 0)
    elif op == "step":
        pytest_ddpfault.step()
    else:
        raise AssertionError(f"no such op in the script: {op}")


def run_script(ops):
    """Performs ``ops`` in order; returns [(index, message)] of each injected crash caught."""
    init_group()
    hits = []
    for i, op in enumerate(ops):
        try:
            _call(op)
        except RuntimeError as exc:
            if "injected" not in str(exc):
                raise
            hits.append((i, str(exc)))
    dist.destroy_process_group()
    return hits


def timed_script(ops):
    """Performs ``ops``; returns the seconds each one took."""
    init_group()
    took = []
    for op in ops:
        start = time.monotonic()
        _call(op)
        took.append(time.monotonic() - start)
    dist.destroy_process_group()
    return took


def what_the_rank_sees():
    init_group()
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    seen = {"backend": dist.get_backend(), "world_backend": dist.get_backend(dist.group.WORLD),
            "sum": t.item(), "objects": None}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, dist.get_rank())
    seen["objects"] = gathered
    dist.destroy_process_group()
    return seen


def backend_config_and_name():
    init_group()
    seen = (dist.get_backend_config(), dist.group.WORLD.name())
    dist.destroy_process_group()
    return seen


def gather_and_scatter_into_tensors():
    init_group()
    ws, rank = dist.get_world_size(), dist.get_rank()
    gathered = torch.zeros(2 * ws)
    dist.all_gather_into_tensor(gathered, torch.ones(2) * (rank + 1))
    scattered = torch.zeros(2)
    dist.reduce_scatter_tensor(scattered, torch.ones(2 * ws))
    dist.destroy_process_group()
    return gathered.tolist(), scattered.tolist()


def batch_p2p():
    init_group()
    rank = dist.get_rank()
    other = 1 - rank
    got = torch.zeros(2)
    ops = [dist.P2POp(dist.isend, torch.ones(2) * (rank + 1), other), dist.P2POp(dist.irecv, got, other)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()
    dist.destroy_process_group()
    return got.tolist()


def barrier_loop(seconds=4.0, pg_timeout=SHORT_PG):
    init_group(pg_timeout)
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        dist.barrier()
        n += 1
    dist.destroy_process_group()
    return n


def small_allreduces(seconds=4.0):
    init_group()
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        dist.all_reduce(torch.ones(1))
        n += 1
    dist.destroy_process_group()
    return n


def spin_in_python(seconds=4.0):
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


def init_with_progress(pg_timeout=SHORT_PG):
    print("before init", flush=True)
    init_group(pg_timeout)
    print("after init", flush=True)
    dist.all_reduce(torch.ones(1))
    dist.destroy_process_group()
    return "done"


def steps_without_a_plan(n):
    for _ in range(n):
        pytest_ddpfault.step()
    return steps.hook is None, n


# -- which call a fault fires on (one rank, exact) -----------------------------------------
SCRIPT = ["barrier", "all_reduce", "broadcast", "all_reduce", "all_gather_object",
          "all_gather", "step", "all_reduce", "step", "broadcast_object_list", "barrier"]

CASES = {
    # at=                      -> (index in SCRIPT it fires on, event trigger or None)
    "all_reduce#1": (1, "all_reduce#1"),
    "all_reduce#2": (3, "all_reduce#2"),             # barriers and broadcasts do not count
    "all_reduce": (1, "all_reduce#1"),                # OP alone is OP#1
    "barrier#2": (10, "barrier#2"),
    "collective#1": (0, None),                        # any op counts
    "collective#3": (2, None),
    "collective#5": (4, None),                        # all_gather_object counts once ...
    "collective#6": (5, None),                        # ... its inner all_gather not at all
    "all_gather#1": (5, "all_gather#1"),
    "all_gather_object#1": (4, "all_gather_object#1"),
    "broadcast_object_list#1": (9, "broadcast_object_list#1"),
    "step#1": (6, "step#1"),
    "step#2": (8, "step#2"),
}


@pytest.mark.parametrize("at", list(CASES))
@pytest.mark.ddp(world_size=1, timeout=8)
def test_a_fault_fires_once_on_the_call_its_trigger_names(ddp, at):
    index, trigger = CASES[at]
    res = ddp.run(run_script, SCRIPT, faults=f"crash_rank(rank=0, at={at})")
    res.assert_all_ok()
    assert res.values == [[(index, INJECTED)]], f"at={at}: {res.values}"
    [event] = res.fault_events
    assert (event.kind, event.rank) == ("crash_rank", 0)
    if trigger is not None:
        assert event.trigger == trigger


@pytest.mark.ddp(world_size=1, timeout=8, allow_unfired=True)
def test_a_trigger_whose_call_never_comes_fires_nothing(ddp):
    # SCRIPT has one broadcast: broadcast_object_list is its own op, not a second broadcast
    res = ddp.run(run_script, SCRIPT,
                  faults="crash_rank(rank=0, at=broadcast#2); crash_rank(rank=0, at=step#3)")
    res.assert_all_ok()
    assert res.values == [[]] and res.fault_events == []
    assert [u.spec for u in res.unfired] == ["crash_rank(rank=0, at=broadcast#2)", "crash_rank(rank=0, at=step#3)"]


@pytest.mark.ddp(world_size=1, timeout=8, allow_unfired=True)
def test_faults_of_one_plan_fire_separately_each_once(ddp):
    plan = ["crash_rank(rank=0, at=all_reduce#1)", "crash_rank(rank=0, at=all_reduce#3)",
            "crash_rank(rank=0, at=step#2, message='injected at the second step')",
            "crash_rank(rank=0, at=all_reduce#4)"]  # SCRIPT has three all_reduces
    res = ddp.run(run_script, SCRIPT, faults=plan)
    res.assert_all_ok()
    assert res.values == [[(1, INJECTED), (7, INJECTED), (8, "injected at the second step")]]
    assert [ev.trigger for ev in res.fault_events] == ["all_reduce#1", "all_reduce#3", "step#2"]
    assert [u.spec for u in res.unfired] == ["crash_rank(rank=0, at=all_reduce#4)"]


@pytest.mark.ddp(world_size=1, timeout=8)
def test_delay_every_from_a_later_trigger_slows_that_call_and_the_following_ones(ddp):
    ops = ["all_reduce", "barrier", "all_reduce", "all_reduce", "barrier"]
    res = ddp.run(timed_script, ops, faults="delay(rank=0, at=all_reduce#2, seconds=0.15, every=true)")
    res.assert_all_ok()
    [took] = res.values
    assert took[2] >= 0.14 and took[3] >= 0.14, took
    assert [ev.trigger for ev in res.fault_events] == ["all_reduce#2", "all_reduce#3"]


def test_step_is_a_no_op_outside_a_rank_and_only_marks_the_op_log_without_a_plan(ddp):
    assert steps.hook is None
    assert pytest_ddpfault.step() is None
    assert steps.hook is None
    res = ddp.run(steps_without_a_plan, 3)
    res.assert_all_ok()
    assert res.values == [(False, 3), (False, 3)]  # the op log (on by default) counts steps
    assert [[s.seq for s in r.steps] for r in res] == [[1, 2, 3], [1, 2, 3]]


# -- real groups ---------------------------------------------------------------------------
@pytest.mark.ddp(world_size=3, fault="kill_rank(rank=1, at=step#3)", timeout=8)
def test_step_trigger_kills_a_ddp_rank_before_its_third_step(ddp):
    res = ddp.run(ddp_training)
    assert res[1].killed_by(signal.SIGKILL), res.summary()
    assert "step 2 done" in res[1].stdout and "step 3 start" not in res[1].stdout
    res.assert_survivors_raised(RuntimeError, match=CLOSED, within=2)
    for r in res.survivors:
        assert "step 5 done" not in r.stdout
    [event] = res.fault_events
    assert (event.kind, event.rank, event.trigger) == ("kill_rank", 1, "step#3")


@pytest.mark.ddp(world_size=3, fault="kill_rank(rank=1, at=all_reduce#4)", timeout=8)
def test_ddps_gradient_all_reduce_from_cpp_is_counted(ddp):
    # the loop calls no all_reduce: the 4th is DDP's bucket all_reduce in step 4's backward
    res = ddp.run(ddp_training)
    assert res[1].killed_by(signal.SIGKILL), res.summary()
    out = res[1].stdout
    assert "step 3 done" in out and "step 4 start" in out and "step 4 done" not in out, out
    res.assert_survivors_raised(RuntimeError, match=CLOSED, within=2)
    [event] = res.fault_events
    assert (event.kind, event.rank, event.trigger) == ("kill_rank", 1, "all_reduce#4")


@pytest.mark.ddp(world_size=3, fault="crash_rank(rank=1, at=all_reduce#2)", timeout=8)
def test_crash_in_ddps_cpp_all_reduce_raises_out_of_backward(ddp):
    res = ddp.run(ddp_training)
    assert res[1].raised(RuntimeError, match=f"^{INJECTED}$"), res.summary()
    assert "backward" in res[1].traceback
    assert "step 1 done" in res[1].stdout and "step 2 done" not in res[1].stdout
    res.assert_survivors_raised(RuntimeError, match=CLOSED, within=2)


@pytest.mark.ddp(world_size=2, fault="kill_rank(rank=0, at=step#99); kill_rank(rank=1, at=step#99)",
                 timeout=8, allow_unfired=True)  # armed, never fires: the plan's mere presence is the point
def test_with_a_plan_installed_the_group_still_looks_like_gloo(ddp):
    res = ddp.run(what_the_rank_sees)
    res.assert_all_ok()
    for v in res.values:
        assert v == {"backend": "gloo", "world_backend": "gloo", "sum": 3.0, "objects": [0, 1]}
    assert res.fault_events == []


@pytest.mark.ddp(world_size=2, fault="kill_rank(rank=1, at=step#99)", timeout=8, allow_unfired=True)
def test_with_a_plan_installed_backend_config_and_name_stay_gloo(ddp):
    plain = ddp.run(backend_config_and_name, faults=[])
    plain.assert_all_ok()
    res = ddp.run(backend_config_and_name)
    res.assert_all_ok()
    assert res.values[1] == plain.values[1] == plain.values[0]


@pytest.mark.ddp(world_size=2, fault="kill_rank(rank=1, at=step#99)", timeout=8, allow_unfired=True)
def test_with_a_plan_installed_tensor_collectives_still_work(ddp):
    res = ddp.run(gather_and_scatter_into_tensors)
    res.assert_all_ok()
    assert res.values == [([1.0, 1.0, 2.0, 2.0], [2.0, 2.0])] * 2


@pytest.mark.ddp(world_size=2, fault="kill_rank(rank=1, at=step#99)", timeout=8, allow_unfired=True)
def test_with_a_plan_installed_batch_isend_irecv_still_works(ddp):
    res = ddp.run(batch_p2p)
    res.assert_all_ok()
    assert res.values == [[2.0, 2.0], [1.0, 1.0]]


# -- t=SECONDS ---------------------------------------------------------------------------
@pytest.mark.ddp(world_size=3, fault="kill_rank(rank=1, at=t=0.3)", timeout=8)
def test_time_trigger_kills_a_rank_that_is_busy_in_collectives(ddp):
    res = ddp.run(barrier_loop)
    assert res[1].killed_by(signal.SIGKILL), res.summary()
    # t= counts from the rank's start, the origin of its duration; the run's clock starts
    # with its first rank: on neither clock does the fault come before its time
    assert 0.3 <= res[1].duration < 2.0
    [event] = res.fault_events
    assert (event.kind, event.rank, event.trigger) == ("kill_rank", 1, "t=0.3")
    assert 0.3 <= event.time <= res[1].end_time < 2.0
    res.assert_survivors_raised(RuntimeError, match=CLOSED, within=2)


@pytest.mark.ddp(world_size=2, fault="crash_rank(rank=1, at=t=0.3)", timeout=8)
def test_time_trigger_crash_raises_in_the_main_thread_between_collectives(ddp):
    res = ddp.run(small_allreduces)
    crashed = res[1]
    assert crashed.raised(RuntimeError, match=f"^{INJECTED}$"), res.summary()
    assert "in small_allreduces" in crashed.traceback.replace(", in ", " in ")
    assert 0.3 <= crashed.duration < 2.0
    [event] = res.fault_events
    assert (event.kind, event.rank, event.trigger) == ("crash_rank", 1, "t=0.3")
    assert 0.3 <= event.time <= crashed.end_time
    res.assert_survivors_raised(RuntimeError, match=CLOSED, within=2)


@pytest.mark.ddp(world_size=1, fault="crash_rank(rank=0, at=t=0.3, exc=KeyError, message=boom)", timeout=8)
def test_time_trigger_crash_interrupts_pure_python_code(ddp):
    res = ddp.run(spin_in_python)  # would spin for 4 s
    r = res[0]
    assert r.raised(KeyError, match="boom"), res.summary()
    assert r.raised(LookupError) and r.exc_type == "KeyError"
    assert "spin_in_python" in r.traceback
    assert 0.3 <= r.duration < 2.0 and res.duration < 2.5


EVERY_RANK_AT_T = [f"crash_rank(rank={r}, at=t=0.2)" for r in range(4)]


@pytest.mark.parametrize("start_method", ["forkserver", "spawn"])
def test_a_time_trigger_is_never_early_on_the_reports_clocks(start_method):
    # Each rank's t= counts from the moment its launcher started it, the origin of its
    # duration; the run's clock starts with the first rank. Ranks started one after
    # the other (forked: the child may run before the zygote notes the time) must
    # not fire early on either clock: neither the rank's duration nor the event's time.
    # (A spawned rank's start-up, torch's import, is in its time: t=0.2 has passed by then.)
    ranks = 4 if start_method == "forkserver" else 2  # a spawned rank imports torch afresh: slow
    res = pytest_ddpfault.run_group(spin_in_python, 3.0, world_size=ranks, faults=EVERY_RANK_AT_T[:ranks],
                                    start_method=start_method, timeout=30)
    assert [r.raised(RuntimeError, match=INJECTED) for r in res] == [True] * ranks, res.summary()
    assert len(res.fault_events) == ranks
    for event in res.fault_events:
        rank = res[event.rank]
        assert 0.2 <= event.time <= rank.end_time, res.summary()
        assert rank.duration >= 0.2, res.summary()


def test_a_time_trigger_already_due_when_the_rank_starts_raises_in_the_ranks_code():
    # t=0 is due before the rank's own code begins (as any t= is in a rank slower to start):
    # it fires as that code begins, and the crash is the rank's, not a failed start (exit 70)
    res = pytest_ddpfault.run_group(spin_in_python, 3.0, world_size=2, timeout=30,
                                    faults=["crash_rank(rank=0, at=t=0)", "crash_rank(rank=1, at=t=0)"])
    assert [r.raised(RuntimeError, match=INJECTED) for r in res] == [True, True], res.summary()
    assert all(r.duration < 2.5 for r in res), res.summary()


@pytest.mark.ddp(world_size=1, fault="crash_rank(rank=0, at=t=0.2)", timeout=8)
def test_time_trigger_crash_rebuilds_the_exception_like_other_triggers(ddp):
    res = ddp.run(spin_in_python, 2.0)
    assert res[0].raised(RuntimeError, match=INJECTED), res.summary()
    assert isinstance(res[0].exc, RuntimeError) and str(res[0].exc) == INJECTED


# -- init ----------------------------------------------------------------------------------
@pytest.mark.ddp(world_size=3, fault="kill_rank(rank=1, at=init)", timeout=8)
def test_init_trigger_fires_inside_init_process_group(ddp):
    res = ddp.run(init_with_progress)
    assert res[1].killed_by(signal.SIGKILL), res.summary()
    assert "before init" in res[1].stdout and "after init" not in res[1].stdout
    [event] = res.fault_events
    assert (event.kind, event.rank, event.trigger) == ("kill_rank", 1, "init")
    # rank 1 never registered with the store: the others wait there until the timeout
    res.assert_survivors_raised(dist.DistStoreError, match="timeout")
    for r in res.survivors:
        assert "after init" not in r.stdout
        assert r.duration >= SHORT_PG * 0.8
    assert res.duration < 6


@pytest.mark.ddp(world_size=1, timeout=8)
def test_init_trigger_also_fires_in_the_harnesss_owninit_group(ddp):
    res = ddp.run(lambda: dist.get_rank(), init=True, faults=Fault("crash_rank", rank=0, at="init",
                                                                  exc=ValueError, message="no group"))
    assert res[0].raised(ValueError, match="no group"), res.summary()
    [event] = res.fault_events
    assert (event.rank, event.trigger) == (0, "init")
