"""What a newcomer meets first: results that cannot be misread, errors that name what
the user passed, tracebacks without the harness's own frames, clean-up that survives a
failing step. Real ranks, real gloo."""
from __future__ import annotations

import os
import threading

import pytest

import pytest_ddpfault
from pytest_ddpfault.faults import harness as harness_kinds
from pytest_ddpfault.frames import ENV_SHOW, PACKAGE_DIR

from _helpers import children_of, listening_ports


def allreduce_then_wait():
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=1))
    dist.all_reduce(torch.ones(1))
    threading.Event().wait(10)


def gloo_timeout_message():
    import datetime

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=0.5))
    if dist.get_rank() == 0:
        dist.recv(torch.ones(1), src=1)   # rank 1 never sends: gloo's own timeout
    else:
        threading.Event().wait(3)         # stays in the group, silent, past rank 0's timeout
    return "never"


def return_none():
    return None


def step_then_return_none():
    pytest_ddpfault.step()
    return None


# -- results ----------------------------------------------------------------------------
def test_rank_result_ok_tells_a_returned_none_from_a_failure():
    res = pytest_ddpfault.run_group(step_then_return_none, world_size=2, timeout=30,
                                    faults="crash_rank(rank=1, at=step#1)")
    # the pitfall: .values holds None for the failed rank and for the one that returned None
    assert res.values == [None, None]
    assert res[0].ok and not res[1].ok
    assert not res.ok


def test_the_summary_table_drops_the_gloo_build_path_but_keeps_what_happened():
    res = pytest_ddpfault.run_group(gloo_timeout_message, world_size=2, timeout=20)
    r0 = res[0]
    assert r0.status == "raised", res.report()
    assert "/__w/" in r0.message or "third_party" in r0.message  # the message itself is untouched
    row = res.summary().splitlines()[1]
    assert "third_party" not in row and "/__w/" not in row, row
    assert "Timed out waiting" in row and "recv" in row, row


# -- errors name what the user passed -----------------------------------------------------
@pytest.mark.parametrize("kwargs, named", [
    ({"world_size": 0}, "run_group(world_size=...)"),
    ({"world_size": 2, "timeout": -1}, "run_group(timeout=...)"),
])
def test_run_group_errors_name_the_argument(kwargs, named):
    with pytest.raises(pytest_ddpfault.SettingsError, match=named.replace("(", r"\(").replace(")", r"\)")):
        pytest_ddpfault.run_group(return_none, **kwargs)


def test_the_error_classes_users_catch_are_exported():
    for name in ("FaultSpecError", "SettingsError", "HarnessError", "TorchrunError"):
        assert name in pytest_ddpfault.__all__
        assert issubclass(getattr(pytest_ddpfault, name), Exception)
    from pytest_ddpfault.parent.run import HarnessError
    from pytest_ddpfault.settings import SettingsError
    from pytest_ddpfault.launchers.torchrun import TorchrunError

    assert (HarnessError, SettingsError, TorchrunError) == (
        pytest_ddpfault.HarnessError, pytest_ddpfault.SettingsError, pytest_ddpfault.TorchrunError)


def test_a_trigger_without_its_hash_suggests_the_counted_form():
    with pytest.raises(pytest_ddpfault.FaultSpecError, match=r"did you mean 'step#3'"):
        pytest_ddpfault.Fault.parse("kill_rank(rank=1, at=step3)")


# -- the harness's own frames are hidden ----------------------------------------------------
def _internal_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if PACKAGE_DIR in line]


@pytest.mark.parametrize("show", [False, True], ids=["hidden", "shown"])
def test_tracebacks_hide_the_harness_frames_unless_asked(show):
    env = {ENV_SHOW: "1"} if show else {}
    res = pytest_ddpfault.run_group(allreduce_then_wait, world_size=2, timeout=20, env=env,
                                    faults="crash_rank(rank=1, at=all_reduce#1, exc=ValueError)")
    tb = res[1].traceback
    assert res[1].raised(ValueError) and "in allreduce_then_wait" in tb, tb
    assert bool(_internal_lines(tb)) == show, tb


def test_stacks_of_a_hung_rank_hide_the_harness_frames():
    res = pytest_ddpfault.run_group(allreduce_then_wait, world_size=2, timeout=20,
                                    faults="hang_rank(rank=1, at=all_reduce#1)")
    survivor = res[0]
    assert survivor.raised(RuntimeError), res.report()
    frozen = res[1]
    assert frozen.status == "hung"
    assert frozen.stack and "in allreduce_then_wait" in frozen.stack, frozen.stack
    assert not _internal_lines(frozen.stack), frozen.stack


# -- clean-up ------------------------------------------------------------------------------
def test_a_failing_cleanup_step_still_removes_everything_else(private_tmp, zygote_pid, monkeypatch):
    original = harness_kinds.HeldPort.cleanup
    ports = []

    def failing_cleanup(self):
        ports.append(self.sock.getsockname()[1])
        original(self)
        raise OSError("cleanup step failed on purpose")

    monkeypatch.setattr(harness_kinds.HeldPort, "cleanup", failing_cleanup)
    with pytest.raises(OSError, match="on purpose"):
        pytest_ddpfault.run_group(return_none, world_size=2, timeout=5,
                                  faults="port_collision(mode=bind)")
    assert ports and ports[0] not in listening_ports()
    assert children_of(zygote_pid) == set(), "a rank or the store host outlived the run"
    assert os.listdir(private_tmp) == [], "the run folder or the event inbox was left behind"


# -- a plan that did not fully fire says so ---------------------------------------------------
def allreduce_once_no_steps():
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(1))
    dist.destroy_process_group()
    return "done"


def test_faults_whose_trigger_never_came_are_listed_with_the_reason():
    with pytest.warns(pytest_ddpfault.UnfiredFaultWarning, match=r"kill_rank\(rank=1, at=step#3\) never fired"):
        res = pytest_ddpfault.run_group(
            allreduce_once_no_steps, world_size=2, timeout=20,
            faults="kill_rank(rank=1, at=step#3); delay(rank=0, at=all_reduce#1, seconds=0.05)")
    res.assert_all_ok()  # the kill never came: the test would pass for the wrong reason
    assert [ev.kind for ev in res.fault_events] == ["delay"]
    [unfired] = res.unfired
    assert unfired.spec == "kill_rank(rank=1, at=step#3)" and unfired.rank == 1
    assert unfired.reason == ("the trigger step#3 never came in rank 1, which returned first: "
                              "pytest_ddpfault.step() was called 0 times, at=step#3 needs 3")
    assert "did not fire: kill_rank(rank=1, at=step#3)" in res.summary()


@pytest.mark.ddp(world_size=2, fault="crash_rank(rank=1, at=step#1)", allow_unfired=True)
def test_ddp_run_warns_when_a_fault_never_fired_where_allowed(ddp):
    with pytest.warns(pytest_ddpfault.UnfiredFaultWarning, match=r"crash_rank\(rank=1, at=step#1\)"):
        res = ddp.run(allreduce_once_no_steps)
    res.assert_all_ok()


def test_the_package_exports_a_fixed_public_api():
    assert sorted(pytest_ddpfault.__all__) == [
        "Fault", "FaultEvent", "FaultSpecError", "GroupResult", "HarnessError", "HarnessWarning", "RankResult",
        "SettingsError", "SweepError", "SweepResult", "SweepRun", "TorchrunError", "UnfiredFaultWarning",
        "run_group", "step", "sweep_group"]
    for name in pytest_ddpfault.__all__:
        assert getattr(pytest_ddpfault, name) is not None
