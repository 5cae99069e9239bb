"""The core harness for real: warm ranks forked from the zygote, a real gloo group,
the store on port 0, results and output from files, the deadline, and clean-up.

Nothing is mocked: every run below starts real processes that talk over real sockets.
"""
from __future__ import annotations

import ctypes
import functools
import os
import re
import signal
import threading
import time

import pytest

import pytest_ddpfault
from pytest_ddpfault.parent.run import HarnessError

from _helpers import children_of, is_alive, listening_ports

HANG_TIMEOUT = 3.0
HANG_BOUND = 6.0  # the whole hung run must be over by then (deadline + dump + kill)

TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "OMP_NUM_THREADS", "TORCHELASTIC_USE_AGENT_STORE")


# -- functions run in the ranks ---------------------------------------------------
def allreduce_report():
    """init (env://), one all_reduce of rank+1, destroy; report what the rank saw."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    seen = {"rank": dist.get_rank(), "world_size": dist.get_world_size(), "backend": dist.get_backend(),
            "sum": t.item(), "env": {k: os.environ.get(k) for k in TORCHRUN_KEYS}}
    dist.destroy_process_group()
    seen["initialized_after_destroy"] = dist.is_initialized()
    return seen


def already_initialized(scale):
    """For ``init=True``: the harness has set the group up before calling this."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank())]) * scale
    dist.all_reduce(t)
    return dist.is_initialized(), dist.get_backend(), dist.get_rank(), dist.get_world_size(), t.item()


def group_initialized():
    import torch.distributed as dist

    return dist.is_initialized()


def combine(prefix, *args, sep="-", **kwargs):
    rank = os.environ["RANK"]
    return sep.join([prefix, rank, *map(str, args), *(f"{k}={v}" for k, v in sorted(kwargs.items()))])


def sleep_forever():
    threading.Event().wait()


def rank0_returns_others_sleep():
    if os.environ["RANK"] == "0":
        return "done"
    sleep_forever()


def hold_the_gil():
    # Catastrophic backtracking: the whole search runs inside the C regex engine,
    # which never releases the GIL, so no Python-level signal handler could run.
    return re.match(r"(a+)+$", "a" * 64 + "!")


def write_everywhere_then(fate):
    rank = os.environ["RANK"]
    libc = ctypes.CDLL(None)
    print(f"py-out {rank}")
    os.write(2, f"fd-err {rank}\n".encode())
    libc.puts(f"c-out {rank}".encode())  # C stdio: fully buffered into a file
    libc.fputs(f"c-err {rank}\n".encode(), ctypes.c_void_p.in_dll(libc, "stderr"))
    if fate[int(rank)] == "kill":
        libc.fflush(None)  # SIGKILL skips every buffer flush; a real program's fate too
        os.kill(os.getpid(), signal.SIGKILL)
    return rank


def port_while_running(fate):
    """Rank 0 returns MASTER_PORT after checking that it is really listening right now."""
    from _helpers import listening_ports as listening

    port = int(os.environ["MASTER_PORT"])
    rank = int(os.environ["RANK"])
    if rank == 0:
        return port, port in listening()
    if fate == "raise":
        raise ValueError(port)
    if fate == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if fate == "hang":
        sleep_forever()
    return port, None


# -- healthy groups ---------------------------------------------------------------
@pytest.mark.parametrize("world_size", [
    pytest.param(n, marks=pytest.mark.ddp(world_size=n), id=f"ws{n}") for n in (1, 2, 4, 8)])
def test_healthy_group_init_allreduce_destroy(ddp, world_size):
    assert ddp.world_size == world_size
    res = ddp.run(allreduce_report)
    res.assert_all_ok()
    assert res.ok and len(res) == world_size
    expected = float(world_size * (world_size + 1) // 2)
    assert [v["sum"] for v in res.values] == [expected] * world_size
    assert [v["rank"] for v in res.values] == list(range(world_size))
    assert all(v["world_size"] == world_size and v["backend"] == "gloo" for v in res.values)
    assert not any(v["initialized_after_destroy"] for v in res.values)
    assert [r.rank for r in res] == list(range(world_size))
    assert res.hung == [] and res.fault_events == []


@pytest.mark.ddp(world_size=4)
def test_rank_env_is_torchruns(ddp):
    res = ddp.run(allreduce_report)
    res.assert_all_ok()
    ports = {v["env"]["MASTER_PORT"] for v in res.values}
    assert len(ports) == 1, f"every rank must get the same MASTER_PORT, got {ports}"
    port = ports.pop()
    assert port.isdigit() and 0 < int(port) < 65536
    for rank, v in enumerate(res.values):
        assert v["env"] == {
            "RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "4",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
            "TORCHELASTIC_USE_AGENT_STORE": "True",
        }


@pytest.mark.ddp(world_size=3)
def test_init_true_sets_the_group_up_around_fn(ddp):
    res = ddp.run(already_initialized, 2.0, init=True)
    res.assert_all_ok()
    # sum of 2*rank over ranks 0..2 = 6
    assert res.values == [(True, "gloo", r, 3, 6.0) for r in range(3)]


@pytest.mark.ddp(world_size=2)
def test_without_init_the_group_is_not_set_up(ddp):
    res = ddp.run(group_initialized)
    res.assert_all_ok()
    assert res.values == [False, False]


def test_run_group_without_pytest_fixture():
    res = pytest_ddpfault.run_group(allreduce_report, world_size=2, timeout=30)
    res.assert_all_ok()
    assert [v["sum"] for v in res.values] == [3.0, 3.0]
    assert 0 < res.duration < 30


def test_consecutive_runs_each_get_a_store_of_their_own():
    for _ in range(3):
        res = pytest_ddpfault.run_group(allreduce_report, world_size=2, timeout=30)
        res.assert_all_ok()
        port = int(res.values[0]["env"]["MASTER_PORT"])
        assert port not in listening_ports(), f"the store of a finished run still listens on {port}"


def rounds_with_keys_of_their_own(rounds=3):
    """init, all_reduce, destroy, ``rounds`` times in one rank, each round on its own keys
    (README: the store outlives a process group, as torchrun's agent store does)."""
    import datetime

    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=5)
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout)
    sums = []
    for n in range(rounds):
        dist.init_process_group("gloo", store=dist.PrefixStore(f"round_{n}/", base), timeout=timeout,
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        t = torch.ones(1) * (n + 1)
        dist.all_reduce(t)
        sums.append(t.item())
        dist.destroy_process_group()
    return sums


@pytest.mark.ddp(world_size=4)
def test_a_rank_re_initializes_its_group_on_keys_of_its_own(ddp):
    res = ddp.run(rounds_with_keys_of_their_own)
    res.assert_all_ok()
    assert res.values == [[4.0, 8.0, 12.0]] * 4


# -- what fn may be ---------------------------------------------------------------
@pytest.mark.ddp(world_size=2)
def test_module_level_function_with_args_and_kwargs(ddp):
    res = ddp.run(combine, "m", 1, 2.5, sep="/", key="v")
    res.assert_all_ok()
    assert res.values == ["m/0/1/2.5/key=v", "m/1/1/2.5/key=v"]


@pytest.mark.ddp(world_size=3)
def test_closure_captures_local_state(ddp):
    table = {"0": "zero", "1": "one", "2": "two"}
    offset = 100

    def closure(extra):
        rank = os.environ["RANK"]
        return table[rank], int(rank) + offset + extra

    res = ddp.run(closure, extra=5)
    res.assert_all_ok()
    assert res.values == [("zero", 105), ("one", 106), ("two", 107)]


@pytest.mark.ddp(world_size=2)
def test_lambda(ddp):
    res = ddp.run(lambda base: base * (int(os.environ["RANK"]) + 1), 7)
    res.assert_all_ok()
    assert res.values == [7, 14]


@pytest.mark.ddp(world_size=2)
def test_functools_partial(ddp):
    res = ddp.run(functools.partial(combine, "p", sep=":"), "x", z=1)
    res.assert_all_ok()
    assert res.values == ["p:0:x:z=1", "p:1:x:z=1"]


@pytest.mark.ddp(world_size=2)
def test_unsendable_function_is_a_clear_harness_error(ddp):
    lock = threading.Lock()
    with pytest.raises(HarnessError, match=r"cannot send .* to the ranks: .*lock"):
        ddp.run(lambda: lock.locked())


# -- output -------------------------------------------------------------------------
@pytest.mark.ddp(world_size=2)
def test_python_fd_and_c_output_are_captured_also_for_a_killed_rank(ddp):
    res = ddp.run(write_everywhere_then, ["return", "kill"])
    assert res[0].status == "ok" and res[0].value == "0"
    assert res[1].killed_by(signal.SIGKILL)
    for r in res:
        assert f"py-out {r.rank}" in r.stdout
        assert f"c-out {r.rank}" in r.stdout
        assert f"fd-err {r.rank}" in r.stderr
        assert f"c-err {r.rank}" in r.stderr
    # each rank's output is its own
    assert "py-out 1" not in res[0].stdout and "py-out 0" not in res[1].stdout


# -- the deadline -------------------------------------------------------------------
@pytest.mark.ddp(world_size=2)
def test_hung_rank_is_ended_at_the_deadline_with_its_stack(ddp):
    start = time.monotonic()
    res = ddp.run(rank0_returns_others_sleep, timeout=HANG_TIMEOUT)
    took = time.monotonic() - start
    assert took < HANG_BOUND, f"a {HANG_TIMEOUT}s deadline took {took:.1f}s to end the run"
    assert HANG_TIMEOUT <= res.duration < HANG_BOUND
    assert res[0].status == "ok" and res[0].value == "done"
    assert res[1].status == "hung"
    assert res.hung == [res[1]]
    assert res.values == ["done", None]
    assert not res.ok
    assert "deadline" in res[1].note
    assert res[1].stack and "in sleep_forever" in res[1].stack
    assert "test_harness.py" in res[1].stack
    assert "in rank0_returns_others_sleep" in res[1].stack
    assert res[1].signal == signal.SIGKILL  # the harness's own kill: hung, not "killed"
    assert res[1].duration >= HANG_TIMEOUT


@pytest.mark.ddp(world_size=1)
def test_rank_holding_the_gil_in_c_still_dumps_its_stack(ddp):
    start = time.monotonic()
    res = ddp.run(hold_the_gil, timeout=2.0)
    assert time.monotonic() - start < 2.0 + 3.0
    assert res[0].status == "hung"
    assert res[0].stack and "in hold_the_gil" in res[0].stack


# -- nothing left behind ------------------------------------------------------------
@pytest.mark.parametrize("fate", ["ok", "raise", "kill", "hang"])
def test_nothing_left_after_a_run(fate, private_tmp, zygote_pid):
    res = pytest_ddpfault.run_group(port_while_running, fate, world_size=2, timeout=1.5)
    assert res[0].status == "ok"
    port, was_listening = res[0].value
    assert was_listening, f"MASTER_PORT {port} was not listening during the run: wrong port?"
    expected = {"ok": "ok", "raise": "raised", "kill": "killed", "hang": "hung"}[fate]
    assert res[1].status == expected
    if fate == "raise":
        assert res[1].raised(ValueError, match=str(port))

    assert port not in listening_ports(), f"the run's store port {port} is still listening"
    assert children_of(zygote_pid) == set(), "a rank or the store host outlived the run"
    assert os.listdir(private_tmp) == [], "the run left files in the temp dir"


def test_ranks_of_a_finished_run_are_gone(zygote_pid):
    res = pytest_ddpfault.run_group(os.getpid, world_size=4, timeout=30)
    res.assert_all_ok()
    pids = res.values
    assert len(set(pids)) == 4 and os.getpid() not in pids
    assert not any(is_alive(p) for p in pids)
    assert children_of(zygote_pid) == set()


@pytest.mark.ddp(world_size=8)
def test_ranks_that_all_die_at_once_end_the_run_at_once(ddp):
    # every rank is gone within milliseconds of its fork, possibly before the harness
    # has even read that it started: the run must still end now, not at its deadline
    import os as _os

    for _ in range(5):
        res = ddp.run(_os._exit, 7, timeout=30)
        assert [r.status for r in res] == ["exited"] * ddp.world_size
        assert all(r.exit_code == 7 for r in res)
        assert res.duration < 5
