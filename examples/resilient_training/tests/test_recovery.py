"""The training job's fault handling, one test per fault kind, as a user writes them."""
import signal

import pytest
import torch.distributed as dist

from resilient_training import TrainConfig, train


# Two ranks: the sum of two gradients is exact in any order, so "the same weights" can
# be checked bit for bit (with three, the order of a ring all_reduce varies the last bits).
@pytest.mark.ddp(world_size=2, fault="kill_rank(rank=1, at=step#4)", timeout=30)
def test_killed_rank_then_resume_gives_the_same_weights(ddp, cfg, reference):
    res = ddp.run(train, cfg)
    assert res[1].killed_by(signal.SIGKILL)
    res.assert_survivors_raised(RuntimeError, within=5)      # a dead peer is detected at once
    resumed = ddp.run(train, cfg, faults=None)                # the job is restarted
    resumed.assert_all_ok()
    assert {v["resumed_from"] for v in resumed.values} == {2}  # from the step-2 checkpoint
    assert {v["weights"] for v in resumed.values} == {reference}


@pytest.mark.ddp(world_size=2, fault="crash_rank(rank=0, at=step#3, exc=ValueError, message='bad batch')",
                 timeout=30)
def test_crashed_rank_fails_the_job_cleanly(ddp, cfg):
    res = ddp.run(train, cfg)
    assert res[0].raised(ValueError, match="bad batch")
    res.assert_survivors_raised(RuntimeError, within=5)


@pytest.mark.ddp(world_size=2, fault="hang_rank(rank=1, at=all_reduce#3)", timeout=30)
def test_frozen_rank_is_caught_by_the_process_group_timeout(ddp, cfg):
    res = ddp.run(train, cfg)
    res.assert_survivors_raised(RuntimeError, match="Timed out", within=cfg.pg_timeout + 3)
    assert res.hung == [res[1]]


@pytest.mark.ddp(world_size=2, fault="delay(rank=1, at=step#2, seconds=0.5)", timeout=30)
def test_straggler_within_the_timeout_is_tolerated(ddp, cfg, reference):
    res = ddp.run(train, cfg)
    res.assert_all_ok()
    assert {v["weights"] for v in res.values} == {reference}


@pytest.mark.ddp(world_size=2, fault="port_collision(hold_for=1)", timeout=30)
def test_init_retry_survives_a_port_held_for_a_while(ddp, cfg, reference):
    res = ddp.run(train, cfg)
    res.assert_all_ok()
    assert {v["weights"] for v in res.values} == {reference}


@pytest.mark.ddp(world_size=2, fault="block_port(duration=1)", timeout=30)
def test_init_retry_survives_a_blocked_port(ddp, cfg):
    ddp.run(train, cfg).assert_all_ok()


@pytest.mark.ddp(world_size=2, fault="latency(latency=100)", timeout=60)
def test_slow_store_is_only_slower(ddp, cfg, reference):
    res = ddp.run(train, cfg)
    res.assert_all_ok()
    assert {v["weights"] for v in res.values} == {reference}


@pytest.mark.ddp(world_size=2, fault="store_down(at=t=0.2)", timeout=30)
def test_training_does_not_need_the_store_after_init(ddp, cfg):
    # gloo talks peer to peer once the group is up: losing the store mid-training is
    # harmless here, until something (a new group, a barrier on the store) needs it
    # (on a loaded machine the store may go before a rank's init is done: then its few store
    # tries fail and it raises, rather than retrying past the harness's deadline)
    res = ddp.run(train, TrainConfig(steps=2000, ckpt_every=10_000, ckpt_dir=cfg.ckpt_dir, pg_timeout=2.0,
                                     store_tries=3))
    assert res.fault_events and res.fault_events[0].kind == "store_down"
    assert all(r.status in ("ok", "raised") for r in res)
    for r in res:
        if r.status == "raised":
            assert r.raised(dist.DistError, RuntimeError)


@pytest.mark.ddp(world_size=2, fault="reset_peer(timeout=0, duration=1)", timeout=30)
def test_init_retry_survives_connection_resets(ddp, cfg):
    ddp.run(train, cfg).assert_all_ok()


@pytest.mark.ddp(world_size=2, fault="limit_data(bytes=16, duration=1)", timeout=30)
def test_a_store_connection_cut_after_connecting_is_not_retried(ddp, cfg):
    # A known gap of the store-level retry: the first bytes pass, so TCPStore() succeeds
    # and the retry loop is over; the cut then hits init_process_group's own rendezvous,
    # which does not retry. The job fails fast and clearly instead of hanging.
    res = ddp.run(train, cfg)
    res.assert_survivors_raised(dist.DistNetworkError, match="Connection was likely closed", within=5)


@pytest.mark.ddp(world_size=2, fault="blackhole(duration=1)", timeout=30)
def test_init_retry_survives_a_store_that_swallows_data(ddp, cfg):
    # each store attempt times out after store_timeout (1 s); the next one gets through
    ddp.run(train, cfg).assert_all_ok()


@pytest.mark.ddp(world_size=2, fault="bandwidth(rate=5)", timeout=60)
def test_a_thin_store_link_is_only_slower(ddp, cfg):
    ddp.run(train, cfg).assert_all_ok()


@pytest.mark.ddp(world_size=2, fault="slow_close(delay=300)", timeout=30)
def test_slow_closes_are_harmless(ddp, cfg):
    ddp.run(train, cfg).assert_all_ok()


# Checkpoint faults: rank 0 saves at steps 2, 4, 6 (save#1, save#2, save#3). Each one
# fails the job; the restarted job resumes from the last complete checkpoint (step 2)
# and ends with the weights of an unfaulted run.
@pytest.mark.ddp(world_size=2, timeout=30)
@pytest.mark.parametrize("fault", [
    "torn_save(rank=0, at=save#2)",                  # killed half-way through writing step 4
    "torn_save(rank=0, at=save#2, fraction=0.99)",   # all but the last bytes
    "io_error(rank=0, at=save#2, errno=ENOSPC)",     # the disk is full
    "io_error(rank=0, at=save#2, errno=EIO)",
])
def test_a_failed_save_leaves_the_last_checkpoint_and_the_job_resumes_from_it(ddp, cfg, reference, fault):
    res = ddp.run(train, cfg, faults=fault)
    assert not res[0].ok
    res.assert_survivors_raised(RuntimeError, within=5)     # rank 1 waits at the barrier: it learns at once
    resumed = ddp.run(train, cfg, faults=None)
    resumed.assert_all_ok()
    assert {v["resumed_from"] for v in resumed.values} == {2}
    assert {v["weights"] for v in resumed.values} == {reference}


@pytest.mark.ddp(world_size=2, fault="io_error(rank=0, at=load#1, errno=EIO)", timeout=30)
def test_an_unreadable_checkpoint_fails_the_start_and_a_retry_resumes(ddp, cfg, reference):
    ddp.run(train, TrainConfig(steps=2, ckpt_every=2, ckpt_dir=cfg.ckpt_dir, pg_timeout=2.0),
            faults=None).assert_all_ok()
    res = ddp.run(train, cfg)
    assert res[0].raised(OSError, match="Input/output error")
    resumed = ddp.run(train, cfg, faults=None)
    resumed.assert_all_ok()
    assert {v["resumed_from"] for v in resumed.values} == {2}
    assert {v["weights"] for v in resumed.values} == {reference}


@pytest.mark.ddp(world_size=2, timeout=30)
def test_a_slow_save_within_the_timeout_is_tolerated_and_beyond_it_fails_then_resumes(ddp, cfg, reference):
    ok = ddp.run(train, cfg, faults="slow_io(rank=0, at=save#2, seconds=0.5)")
    ok.assert_all_ok()
    assert {v["weights"] for v in ok.values} == {reference}
    slow = TrainConfig(steps=6, ckpt_every=2, ckpt_dir=cfg.ckpt_dir + "-slow", pg_timeout=1.0)
    res = ddp.run(train, slow, faults="slow_io(rank=0, at=save#2, seconds=2.0)")
    assert res[1].raised(RuntimeError, match="Timed out")   # rank 1 waited at the barrier
    resumed = ddp.run(train, slow, faults=None)
    resumed.assert_all_ok()
    assert {v["resumed_from"] for v in resumed.values} == {4}  # the slow save itself completed
    assert {v["weights"] for v in resumed.values} == {reference}
