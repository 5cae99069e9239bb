"""ddp.torchrun: unmodified scripts under the real torchrun, faults from the environment.

Real torchrun (``python -m torch.distributed.run --standalone``), real gloo, real restarts.
Each launched run starts fresh interpreters that import torch (seconds each on this
machine), so there are few of them: one mp.spawn run gives the reference weights, one
torchrun run recovers from a killed rank, one fails without restarts, and one hangs until
the deadline.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_ddpfault.errors import UnfiredFaultWarning
from pytest_ddpfault.frames import PACKAGE_DIR
from pytest_ddpfault.rank.env_plan import EnvPlanError
from pytest_ddpfault.faults import FaultSpecError
from pytest_ddpfault.launchers.torchrun import TorchrunError, run_script, run_torchrun

from _helpers import assert_nothing_left

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "torchrun" / "train.py"
RUN_TIMEOUT = 240.0   # a bound, not the expected time (10-20 s a run, more on a loaded machine)
KILL_AT_5 = "kill_rank(rank=1, at=step#5)"
# ...and in the restarted attempt, rank 1 comes late to init_process_group, while the
# agent's store still holds what the dead attempt wrote (see the example's docstring).
LATE_IN_RETRY = "delay(rank=1, at=init, seconds=2, attempt=1)"


def train_args(d: Path) -> tuple:
    return "--ckpt-dir", str(d / "ck"), "--out", str(d / "weights.json"), "--steps", "8", "--ckpt-every", "2"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same training job as a plain ``python train.py --spawn 2``: unfaulted weights.

    Its plan is a short delay, so the plan must reach the mp.spawn children through the
    hook, and no number can change.
    """
    d = tmp_path_factory.mktemp("spawn")
    res = run_script(TRAIN, *train_args(d), "--spawn", "2",
                     faults="delay(rank=1, at=step#3, seconds=0.2)", timeout=RUN_TIMEOUT)
    assert_nothing_left(res)
    return res, json.loads((d / "weights.json").read_text())


def test_a_plain_mp_spawn_script_gets_the_plan(reference):
    res, out = reference
    res.assert_ok()
    assert [(e.kind, e.rank, e.trigger, e.attempt) for e in res.fault_events] == [("delay", 1, "step#3", 0)]
    armed = sorted((e["rank"], e["world_size"]) for e in res.events if e["type"] == "armed")
    assert armed == [(0, 2), (1, 2)]  # installed in each spawned rank, from init's arguments
    assert [(w.rank, w.status) for w in res.workers] == [(0, "ok"), (1, "ok")]
    assert out["resumed_from"] == 0


@pytest.mark.ddp(world_size=2, timeout=RUN_TIMEOUT)
def test_torchrun_restarts_and_the_job_recovers(ddp, tmp_path, reference):
    """A plain ``init_process_group("gloo")`` restarts cleanly: ddp.torchrun sets
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (pytorch#135712), so each attempt has its own store."""
    res = ddp.torchrun(TRAIN, *train_args(tmp_path), max_restarts=1, faults=[KILL_AT_5, LATE_IN_RETRY])

    res.assert_ok()
    assert "rank 0: plain init_process_group" in res.final[0].stdout
    assert res.restarts == 1 and res.attempts == 2
    fired = [(e.kind, e.rank, e.trigger, e.attempt) for e in res.fault_events]
    assert fired == [("kill_rank", 1, "step#5", 0), ("delay", 1, "init", 1)]
    assert str(res.fault_events[0]).startswith("kill_rank on rank 1 at step#5, t=")
    assert str(res.fault_events[0]).endswith("s in attempt 0")
    first, final = res.attempt(0), res.final
    assert first[1].killed_by(signal.SIGKILL)
    assert [(w.rank, w.status) for w in final] == [(0, "ok"), (1, "ok")]
    assert "starting at step 5" in final[0].stdout  # resumed from the checkpoint of step 4
    out = json.loads((tmp_path / "weights.json").read_text())
    assert (out["attempt"], out["resumed_from"]) == (1, 4)
    assert out["weights"] == reference[1]["weights"]  # bit for bit, as if nothing had failed
    assert ddp.results[-1] is res
    assert_nothing_left(res)


@pytest.mark.ddp(world_size=2, timeout=RUN_TIMEOUT)
def test_with_the_agents_store_a_per_attempt_prefix_recovers(ddp, tmp_path):
    """The second remedy, for the agent's shared store (the variable set to 0): the example
    prefixes its keys with the attempt."""
    res = ddp.torchrun(TRAIN, *train_args(tmp_path), max_restarts=1, faults=KILL_AT_5,
                       env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "0"})

    res.assert_ok()
    assert res.restarts == 1 and res.attempt(0)[1].killed_by(signal.SIGKILL)
    assert "rank 0: the agent's store, keys prefixed attempt_1/" in res.final[0].stdout
    assert json.loads((tmp_path / "weights.json").read_text())["resumed_from"] == 4
    assert_nothing_left(res)


def test_without_restarts_the_same_fault_fails_the_job(tmp_path):
    res = run_torchrun(TRAIN, *train_args(tmp_path), nproc=2, max_restarts=0, faults=KILL_AT_5,
                       timeout=RUN_TIMEOUT)

    assert not res.ok and res.exit_code == 1 and not res.timed_out
    assert res.restarts == 0
    survivor, killed = res.attempt(0)
    assert killed.killed_by(signal.SIGKILL) and killed.rank == 1
    # rank 0 sees its peer vanish in all_reduce (or is stopped by the agent first)
    assert survivor.raised(RuntimeError) or survivor.killed_by(signal.SIGTERM), survivor.report()
    assert not (tmp_path / "weights.json").exists()
    with pytest.raises(AssertionError, match="exit code 1") as info:
        res.assert_ok()
    assert "fired: kill_rank on rank 1 at step#5" in str(info.value)
    assert_nothing_left(res)


HANGS = '''
import threading

def wait_forever():
    threading.Event().wait()

if __name__ == "__main__":
    print("waiting", flush=True)
    wait_forever()
'''


def test_at_the_deadline_stacks_are_dumped_and_everything_is_killed(tmp_path):
    script = tmp_path / "hangs.py"
    script.write_text(textwrap.dedent(HANGS))
    res = run_torchrun(script, nproc=2, timeout=12.0)  # the workers are up after ~3-5 s

    assert res.timed_out and not res.ok
    assert res.signal == signal.SIGKILL and res.exit_code is None
    assert [(w.rank, w.status) for w in res.workers] == [(0, "hung"), (1, "hung")], res.report()
    for w in res.workers:
        assert "wait_forever" in w.stack and "threading.py" in w.stack
        assert "waiting" in w.stdout
    assert "torch/distributed" in res.launcher_stack  # the agent, in its monitoring loop
    assert "ended by the harness at its deadline" in res.summary()
    assert_nothing_left(res)


# Five all_reduce calls on a plain env:// group; argv[1]: the process group timeout (s).
# With --idle, rank 0 waits forever after init, outside any collective. With
# --after-frozen N, the other ranks start their collectives only once rank N is stopped
# (hang_rank froze it in its first one): a peer's timeout cannot come before the freeze.
COLLECTIVES = '''
import os, sys, threading, time
from datetime import timedelta
import torch, torch.distributed as dist

dist.init_process_group("gloo", timeout=timedelta(seconds=float(sys.argv[1])))
rank = dist.get_rank()
if rank == 0 and "--idle" in sys.argv:
    threading.Event().wait()
if "--after-frozen" in sys.argv:
    frozen = int(sys.argv[sys.argv.index("--after-frozen") + 1])
    store = dist.distributed_c10d._get_default_store()
    if rank == frozen:
        store.set(f"pid{frozen}", str(os.getpid()))
    else:
        store.wait([f"pid{frozen}"], timedelta(seconds=120))
        stat, deadline = f"/proc/{int(store.get(f'pid{frozen}'))}/stat", time.monotonic() + 120
        while open(stat).read().rsplit(")", 1)[1].split()[0] not in ("t", "T"):
            if time.monotonic() > deadline:
                sys.exit(f"rank {frozen} did not freeze in 120 s")
            time.sleep(0.01)  # a poll with a deadline: a stopped process tells nobody
for _ in range(5):
    dist.all_reduce(torch.ones(1))
print(f"rank {dist.get_rank()} finished", flush=True)
dist.destroy_process_group()
'''


def collectives_script(tmp_path: Path) -> Path:
    script = tmp_path / "collectives.py"
    script.write_text(COLLECTIVES)
    return script


def test_the_deadline_leaves_a_frozen_rank_frozen(tmp_path):
    """issue 10 §1: at the deadline, the rank hang_rank froze is not woken (SIGCONT would
    let its collective complete and the job finish past the deadline, reported "ok")."""
    res = run_torchrun(collectives_script(tmp_path), "1800", nproc=2, timeout=20.0,
                       faults="hang_rank(rank=1, at=all_reduce#3)")

    assert res.timed_out and not res.ok, res.report()
    assert [(e.kind, e.rank, e.trigger) for e in res.fault_events] == [("hang_rank", 1, "all_reduce#3")]
    assert "finished" not in res.stdout + res.stderr, res.report()
    assert [(w.rank, w.status) for w in res.workers] == [(0, "hung"), (1, "hung")], res.report()
    frozen = res.final[1]
    assert frozen.note.startswith("frozen by hang_rank(rank=1, at=all_reduce#3) at all_reduce#3"), frozen.note
    assert "all_reduce" in frozen.stack and "stacks as it froze itself" in frozen.stack
    assert "all_reduce" in res.final[0].stack           # SIGUSR1 at the deadline
    assert "still running at the harness deadline" in res.final[0].note
    for stack in (frozen.stack, res.final[0].stack):  # without the hook's and trigger wrappers' frames
        assert "collectives.py" in stack and PACKAGE_DIR not in stack, stack
    assert_nothing_left(res)


def test_a_frozen_rank_under_torchrun_is_hung_and_costs_no_grace_period(tmp_path):
    """issue 10 §3: the agent's SIGTERM cannot reach a stopped worker; the harness kills it
    at once instead of letting the agent wait its 30 s, and reports it hung, not killed.
    Rank 1 times out (2 s) waiting for the others; rank 0, idle, is stopped by the agent.
    Rank 1 starts its all_reduce only once rank 2 has frozen in its own (under load, rank 1's
    2 s could end before rank 2 came to all_reduce #1, and nothing would have frozen)."""
    res = run_torchrun(collectives_script(tmp_path), "2", "--idle", "--after-frozen", "2", nproc=3,
                       timeout=RUN_TIMEOUT,
                       faults="hang_rank(rank=2, at=all_reduce#1)")

    assert res.exit_code == 1 and not res.timed_out, res.report()
    [froze] = res.fault_events
    assert res.duration - froze.time < 20, res.report()  # the survivor's 2 s, not the agent's 30 s grace
    idle, survivor, frozen = res.final
    assert survivor.raised(RuntimeError), survivor.report()
    assert frozen.status == "hung", res.report()
    assert frozen.note.startswith("frozen by hang_rank(rank=2, at=all_reduce#1) at all_reduce#1 (the plan); "
                                  "killed by the harness when its launcher sent SIGTERM"), frozen.note
    assert "stacks as it froze itself" in frozen.stack
    assert idle.killed_by(signal.SIGTERM) and idle.duration is not None, res.report()
    [row] = [line for line in res.summary().splitlines() if line.startswith("0 ") and " 0 " in line]
    assert "died of SIGTERM: stopped by the torchrun agent after another worker failed" in row, row
    assert " - " not in row  # a time, where the table had "-"
    assert_nothing_left(res)


# A plain mp.spawn script: the parent hosts the store, each worker does three all_reduce
# calls. With --idle, worker 1 waits forever after init (the parent has to terminate it).
SPAWNS = '''
import sys, threading
from datetime import timedelta
import torch, torch.distributed as dist, torch.multiprocessing as mp

def work(i, port, idle):
    timeout = timedelta(seconds=30)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=i, world_size=2, timeout=timeout)
    if idle and i == 1:
        threading.Event().wait()
    for _ in range(3):
        dist.all_reduce(torch.ones(1))
    dist.destroy_process_group()

if __name__ == "__main__":
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.spawn(work, args=(store.port, "--idle" in sys.argv), nprocs=2)
'''


def spawn_script(tmp_path: Path) -> Path:
    script = tmp_path / "spawns.py"
    script.write_text(SPAWNS)
    return script


def test_mp_spawn_workers_show_what_they_raised_and_what_their_parent_did(tmp_path):
    """issue 10 §2: mp.spawn catches the worker's exception and calls sys.exit(1); the
    worker the parent terminates died of its SIGTERM."""
    res = run_script(spawn_script(tmp_path), "--idle", timeout=RUN_TIMEOUT,
                     faults="crash_rank(rank=0, exc=ValueError, at=all_reduce#1)")

    assert res.exit_code == 1, res.report()
    crashed, idle = res.workers
    assert (crashed.rank, idle.rank) == (0, 1), res.report()
    assert crashed.raised(ValueError, match="crash_rank injected"), res.report()
    assert "ValueError" in crashed.traceback and crashed.exit_code == 1
    assert idle.killed_by(signal.SIGTERM), res.report()
    assert "sent it SIGTERM, as mp.spawn does" in idle.detail() and idle.duration is not None
    assert res.unfired == []
    assert_nothing_left(res)


def test_without_a_plan_mp_spawn_workers_are_listed(tmp_path):
    """issue 10 §2: with no plan the workers are listed (and armed: counting) as under torchrun."""
    res = run_script(spawn_script(tmp_path), timeout=RUN_TIMEOUT)

    res.assert_ok()
    assert [(w.rank, w.status) for w in res.workers] == [(0, "ok"), (1, "ok")], res.report()
    assert sorted(e["rank"] for e in res.events if e["type"] == "armed") == [0, 1]
    assert res.unfired == [] and "did not fire" not in res.summary()
    assert_nothing_left(res)


def test_a_fault_whose_trigger_never_comes_is_reported(tmp_path):
    """issue 10 §5: every rank is armed, also one with no fault due; a fault that never
    fired (a script that never calls step()) says so, and why; and warns (issue 20 §1)."""
    with pytest.warns(UnfiredFaultWarning, match=r"kill_rank\(rank=1, at=step#3\) in attempt 0 never fired"):
        res = run_script(spawn_script(tmp_path), timeout=RUN_TIMEOUT, faults="kill_rank(rank=1, at=step#3)")

    res.assert_ok()
    armed = sorted((e["rank"], tuple(e["faults"])) for e in res.events if e["type"] == "armed")
    assert armed == [(0, ()), (1, ("kill_rank(rank=1, at=step#3)",))]
    [unfired] = res.unfired
    assert (unfired.spec, unfired.rank, unfired.attempt) == ("kill_rank(rank=1, at=step#3)", 1, 0)
    assert unfired.reason == ("the trigger never came: pytest_ddpfault.step() was called 0 times, "
                           "at=step#3 needs 3")
    assert f"did not fire: {unfired}" in res.summary() and "did not fire" in res.report()
    assert_nothing_left(res)


def test_torchrun_run_folders_are_swept_once_their_owner_is_gone(tmp_path):
    """issue 9 §7: the run folder's name carries its owner's pid, which the sweep reads."""
    from pytest_ddpfault.parent.launcher import sweep_stale_files

    made = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            import tempfile
            from pytest_ddpfault.launchers.torchrun import _LaunchRun
            tempfile.tempdir = {str(tmp_path)!r}
            run = _LaunchRun((), 10.0, None, None)  # made, never cleaned: its owner dies now
            print(run.dir)
        """)], capture_output=True, text=True, timeout=60, check=True)
    left = Path(made.stdout.strip())  # under tmp_path, or /tmp when that path is too long
    assert left.is_dir()
    sweep_stale_files(str(left.parent))
    assert not left.exists()


def test_bad_requests_fail_before_anything_starts(tmp_path):
    with pytest.raises(EnvPlanError, match="store_down is applied by the ddp.run harness"):
        run_torchrun(TRAIN, faults="store_down")
    with pytest.raises(FaultSpecError, match="rank 2 is outside the group"):
        run_torchrun(TRAIN, nproc=2, faults="kill_rank(rank=2)")
    with pytest.raises(TorchrunError, match="no such script"):
        run_torchrun(tmp_path / "missing.py")
    with pytest.raises(ValueError, match="max_restarts"):
        run_torchrun(TRAIN, max_restarts=-1)
