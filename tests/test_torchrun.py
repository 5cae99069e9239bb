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
import textwrap
from pathlib import Path

import pytest

from pytest_ddpfault.env_plan import EnvPlanError, proc_start_ticks
from pytest_ddpfault.faults import FaultSpecError
from pytest_ddpfault.torchrun import TorchrunError, TorchrunResult, run_script, run_torchrun

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "torchrun" / "train.py"
RUN_TIMEOUT = 240.0   # a bound, not the expected time (10-20 s a run, more on a loaded machine)
KILL_AT_5 = "kill_rank(rank=1, at=step#5)"
# ...and in the restarted attempt, rank 1 comes late to init_process_group, while the
# agent's store still holds what the dead attempt wrote (see the example's docstring).
LATE_IN_RETRY = "delay(rank=1, at=init, seconds=2, attempt=1)"


def train_args(d: Path) -> tuple:
    return "--ckpt-dir", str(d / "ck"), "--out", str(d / "weights.json"), "--steps", "8", "--ckpt-every", "2"


def assert_nothing_left(res: TorchrunResult) -> None:
    """Every process the run started (each one the hook recorded) is gone."""
    started = [(e["pid"], e["start_ticks"]) for e in res.events if e["type"] == "process"]
    assert started, "the hook recorded no process"
    left = [pid for pid, ticks in started if proc_start_ticks(pid) == ticks]
    assert not left, f"processes of the run still alive: {left}"


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
    res = ddp.torchrun(TRAIN, *train_args(tmp_path), max_restarts=1, faults=[KILL_AT_5, LATE_IN_RETRY])

    res.assert_ok()
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


def test_bad_requests_fail_before_anything_starts(tmp_path):
    with pytest.raises(EnvPlanError, match="store_down is applied by the ddp.run harness"):
        run_torchrun(TRAIN, faults="store_down")
    with pytest.raises(FaultSpecError, match="rank 2 is outside the group"):
        run_torchrun(TRAIN, nproc=2, faults="kill_rank(rank=2)")
    with pytest.raises(TorchrunError, match="no such script"):
        run_torchrun(tmp_path / "missing.py")
    with pytest.raises(ValueError, match="max_restarts"):
        run_torchrun(TRAIN, max_restarts=-1)
