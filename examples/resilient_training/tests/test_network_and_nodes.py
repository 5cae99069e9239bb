"""The training job across two machines: a network partition between them, and a machine
lost. Two virtual nodes of one rank each (the sums of two gradients are exact, so "the
same weights" is checked bit for bit)."""
import signal

import pytest

from resilient_training import train
from resilient_training.heartbeat import monitored_job


@pytest.mark.ddp(world_size=2, nodes=2, fault="partition(nodes=(1,), at=step#3, duration=0.5)", timeout=30)
def test_a_partition_shorter_than_the_timeout_is_ridden_out(ddp, cfg, reference):
    res = ddp.run(train, cfg)
    res.assert_all_ok()                                   # held back 0.5 s, nothing lost
    assert {v["weights"] for v in res.values} == {reference}


@pytest.mark.ddp(world_size=2, nodes=2, fault="partition(nodes=(1,), at=step#4)", timeout=30)
def test_a_lasting_partition_fails_both_sides_then_the_job_resumes(ddp, cfg, reference):
    res = ddp.run(train, cfg)
    # both machines are alive: each side times out waiting for the other
    res.assert_survivors_raised(RuntimeError, match="Timed out", within=cfg.pg_timeout + 3)
    resumed = ddp.run(train, cfg, faults=None)            # the network is back; the job restarts
    resumed.assert_all_ok()
    assert {v["resumed_from"] for v in resumed.values} == {2}
    assert {v["weights"] for v in resumed.values} == {reference}


@pytest.mark.ddp(world_size=2, nodes=2, fault="kill_node(node=1, at=step#4)", timeout=30)
def test_a_lost_machine_is_detected_at_once_and_the_job_resumes(ddp, cfg, reference):
    res = ddp.run(train, cfg)
    assert res[1].killed_by(signal.SIGKILL) and res[1].node == 1
    res.assert_survivors_raised(RuntimeError, within=5)   # a dead peer: the connection closes
    resumed = ddp.run(train, cfg, faults=None)            # a replacement machine joins
    resumed.assert_all_ok()
    assert {v["resumed_from"] for v in resumed.values} == {2}
    assert {v["weights"] for v in resumed.values} == {reference}


# -- a store-heartbeat failure detector (resilient_training/heartbeat.py) --------------------------
BOUND = 2.0   # seconds without a beat before rank 0 declares a rank lost


@pytest.mark.ddp(world_size=4, nodes=2, timeout=30)
def test_the_heartbeat_detector_loses_nobody_on_a_healthy_network(ddp):
    res = ddp.run(monitored_job, bound=BOUND)
    res.assert_all_ok()
    assert res[0].value == {}


@pytest.mark.ddp(world_size=4, nodes=2, fault="partition(nodes=(1,), at=step#2)", timeout=30)
def test_the_heartbeat_detector_sees_a_partitioned_node_within_its_bound(ddp):
    """The cut-off node's processes live on and their collectives are merely quiet; what
    detects it is that node 1's beats no longer reach the store on node 0."""
    res = ddp.run(monitored_job, bound=BOUND)
    res.assert_all_ok()
    lost = res[0].value
    assert sorted(lost) == [2, 3], res.report()             # node 1 entire, nobody on node 0
    cut = res.fault_events[0].time                          # on the run's clock (rank 0's starts after it)
    assert all(when - cut <= BOUND + 1.0 for when in lost.values()), (lost, cut)
