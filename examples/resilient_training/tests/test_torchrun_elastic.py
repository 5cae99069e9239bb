"""The job under two real torchrun agents (two machines), elastic: ``--nnodes=1:2``.

Machine 1 is lost at step 3 (its agent and its worker SIGKILLed together). Machine 0's
agent restarts its worker, re-rendezvouses alone, and the job finishes from the step-2
checkpoint with the weights of an unfaulted run that went on with one machine from there.
The short rendezvous settings are what make this take seconds instead of a minute (see the
README, "Losing a machine")."""
import os
import re
import signal

import pytest

from pytest_ddpfault import run_group
from resilient_training import TrainConfig, train

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_RDZV = "join_timeout=20,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=2"


def one_machine_from_step_2(ddp, tmp_path) -> str:
    """Two ranks train to the step-2 checkpoint; one rank (machine 0's data) goes on from it."""
    cfg = TrainConfig(steps=2, ckpt_every=2, ckpt_dir=str(tmp_path / "ref"), pg_timeout=5.0)
    ddp.run(train, cfg, faults=None).assert_all_ok()
    cfg.steps = 6
    alone = run_group(train, cfg, world_size=1, timeout=60)
    alone.assert_all_ok()
    assert alone.values[0]["resumed_from"] == 2
    return alone.values[0]["weights"]


@pytest.mark.ddp(world_size=2, timeout=60)
def test_a_lost_machine_and_the_job_scales_down_and_resumes(ddp, tmp_path):
    reference = one_machine_from_step_2(ddp, tmp_path)

    res = ddp.torchrun("resilient_training.train", "--steps", "6", "--ckpt-every", "2",
                       "--ckpt-dir", tmp_path / "ckpt", "--pg-timeout", "5", cwd=HERE, env={"PYTHONPATH": HERE},
                       nnodes=2, min_nodes=1, max_restarts=1, faults="kill_node(node=1, at=step#3)",
                       rdzv_conf=FAST_RDZV)

    res.assert_ok()                                    # every agent the plan did not kill exited 0
    assert res.lost_nodes == [1] and res.node(1).signal == signal.SIGKILL
    assert res.node(0).restarts == 1                   # one restart, into a one-machine group
    assert [(w.node, w.rank) for w in res.final] == [(0, 0)]
    assert set(re.findall(r"resumed_from=(\d+) weights=(\w+)", res.stdout)) == {("2", reference)}
