"""The same job under real torchrun: the agent restarts a killed worker, and the job
finishes from its checkpoint with the weights of an unfaulted run."""
import os
import re
import signal

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(ddp, tmp_path, name, **kwargs):
    return ddp.torchrun("resilient_training.train", "--steps", "8", "--ckpt-every", "2",
                        "--ckpt-dir", tmp_path / name, "--pg-timeout", "5", cwd=HERE,
                        env={"PYTHONPATH": HERE}, **kwargs)


def final_weights(res):
    return set(re.findall(r"resumed_from=(\d+) weights=(\w+)", res.stdout))


@pytest.mark.ddp(world_size=2, timeout=240)
def test_torchrun_restarts_the_killed_worker_and_the_job_resumes(ddp, tmp_path):
    clean = launch(ddp, tmp_path, "clean")
    clean.assert_ok()
    [(_, reference)] = final_weights(clean)

    res = launch(ddp, tmp_path, "faulted", max_restarts=1, faults="kill_rank(rank=1, at=step#5)")
    res.assert_ok()                                   # the job as a whole succeeded
    assert res.restarts == 1                          # after one restart by the agent
    assert res.attempt(0)[1].killed_by(signal.SIGKILL)
    [event] = res.fault_events                        # fired in the first attempt only
    assert (event.kind, event.rank, event.attempt) == ("kill_rank", 1, 0)
    assert final_weights(res) == {("4", reference)}   # resumed at step 4, same weights


@pytest.mark.ddp(world_size=2, timeout=240)
def test_torchrun_restart_after_a_torn_save_resumes_from_the_last_complete_checkpoint(ddp, tmp_path):
    clean = launch(ddp, tmp_path, "clean")
    clean.assert_ok()
    [(_, reference)] = final_weights(clean)

    res = launch(ddp, tmp_path, "torn", max_restarts=1, faults="torn_save(rank=0, at=save#2)")
    res.assert_ok()
    assert res.restarts == 1
    assert res.attempt(0)[0].killed_by(signal.SIGKILL)      # torn while writing step 4
    [event] = res.fault_events
    assert (event.kind, event.rank, event.trigger, event.attempt) == ("torn_save", 0, "save#2", 0)
    assert final_weights(res) == {("2", reference)}         # resumed from step 2, same weights
