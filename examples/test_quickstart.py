"""The README's first example: a healthy group and a dead peer."""
import signal

import pytest
import torch
import torch.distributed as dist


def allreduce_once():                      # user code: runs in every rank
    dist.init_process_group("gloo")        # env:// — the harness sets the env like torchrun
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


@pytest.mark.ddp(world_size=4)
def test_healthy(ddp):
    res = ddp.run(allreduce_once)
    res.assert_all_ok()
    assert res.values == [10.0] * 4


@pytest.mark.ddp(world_size=4, fault="kill_rank(rank=2, at=all_reduce#1)", timeout=30)
def test_dead_peer_is_detected(ddp):
    res = ddp.run(allreduce_once)
    assert res[2].killed_by(signal.SIGKILL)
    res.assert_survivors_raised(RuntimeError, within=10)
