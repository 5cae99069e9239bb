"""One runnable example per fault kind, asserting what real gloo does under it.

Process-group timeouts are short (2 s) so that every example finishes in seconds.
"""
import datetime
import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

import pytest_ddpfault

PG_TIMEOUT = datetime.timedelta(seconds=2)


def allreduce_once():
    dist.init_process_group("gloo", timeout=PG_TIMEOUT)
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


def train(steps=5):
    """A tiny DDP loop; DDP's gradient all_reduce is issued from C++."""
    dist.init_process_group("gloo", timeout=PG_TIMEOUT)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        pytest_ddpfault.step()
        opt.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        opt.step()
    dist.destroy_process_group()
    return "done"


# -- in-rank kinds ----------------------------------------------------------------

@pytest.mark.ddp(world_size=3, fault="kill_rank(rank=1, at=step#3)")
def test_kill_rank_in_ddp_training(ddp):
    res = ddp.run(train)
    assert res[1].killed_by(signal.SIGKILL)
    # a killed peer: survivors raise at once ("Connection closed/reset by peer")
    res.assert_survivors_raised(RuntimeError, match="peer|Read error", within=5)


@pytest.mark.ddp(world_size=4, nodes=2, fault="kill_node(node=1, at=step#2)")
def test_kill_node_in_ddp_training(ddp):
    res = ddp.run(train)
    # both ranks of node 1 die of SIGKILL at the same moment (a machine lost)
    assert res[2].killed_by(signal.SIGKILL) and res[3].killed_by(signal.SIGKILL)
    assert [r.node for r in res.faulted] == [1, 1]
    # like kill_rank, for a whole node: survivors raise at once ("Connection closed by peer")
    res.assert_survivors_raised(RuntimeError, match="peer|Read error", within=5)


@pytest.mark.ddp(world_size=2, fault="crash_rank(rank=1, exc=ValueError, message='bad batch')")
def test_crash_rank(ddp):
    res = ddp.run(allreduce_once)
    assert res[1].raised(ValueError, match="bad batch")
    assert res[0].status == "raised"   # its peer is gone: the collective fails


@pytest.mark.ddp(world_size=3, fault="hang_rank(rank=2)", timeout=20)
def test_hang_rank(ddp):
    res = ddp.run(allreduce_once)
    # a frozen peer: survivors time out at the process-group timeout (2 s); one that
    # is still waiting when another gives up may see that one's connection close instead
    res.assert_survivors_raised(RuntimeError, within=10)
    assert any(r.raised(match="Timed out") for r in res.survivors)
    assert res.hung == [res[2]]        # reaped as soon as the others finished


@pytest.mark.ddp(world_size=2, fault="delay(rank=1, seconds=0.5)")
def test_short_delay_completes(ddp):
    res = ddp.run(allreduce_once)
    res.assert_all_ok()                # a straggler shorter than the timeout is fine


@pytest.mark.ddp(world_size=2, fault="delay(rank=1, seconds=4)", timeout=20)
def test_long_delay_times_out(ddp):
    res = ddp.run(allreduce_once)
    assert res[0].raised(RuntimeError, match="Timed out")


# -- harness-side kinds -------------------------------------------------------------

@pytest.mark.ddp(world_size=3, fault="port_collision", timeout=4)
def test_port_collision_listen(ddp):
    res = ddp.run(allreduce_once)
    assert res[0].raised(match="EADDRINUSE")       # rank 0 cannot host the store
    assert {r.rank for r in res.hung} == {1, 2}    # the others block in init, past their timeout
    assert "init_process_group" in res[1].stack


def store_rendezvous_with_retry(max_tries=30):
    """The right retry: retry the store rendezvous, then init_process_group(store=...)."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    for attempt in range(max_tries):
        try:
            store = dist.TCPStore(host, port, world, is_master=(rank == 0),
                                  timeout=datetime.timedelta(seconds=1), wait_for_workers=False)
            break
        except (RuntimeError, dist.DistError):
            time.sleep(0.2)            # back off before the next attempt
    else:
        raise RuntimeError(f"no store after {max_tries} attempts")
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=PG_TIMEOUT)
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return attempt


@pytest.mark.ddp(world_size=3, fault="port_collision(hold_for=1)", timeout=20)
def test_port_collision_recovers_with_store_retry(ddp):
    res = ddp.run(store_rendezvous_with_retry)
    res.assert_all_ok()
    assert res[0].value >= 1           # rank 0 needed more than one try


def store_user():
    dist.init_process_group("gloo", timeout=PG_TIMEOUT)
    store = dist.distributed_c10d._get_default_store()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        store.set(f"heartbeat/{dist.get_rank()}", str(time.time()))
        time.sleep(0.05)
    return "store never failed"


@pytest.mark.ddp(world_size=2, fault="store_down(at=t=0.5)", timeout=20)
def test_store_down(ddp):
    res = ddp.run(store_user)
    res.assert_survivors_raised(dist.DistNetworkError, within=3)


# -- network kinds (through Toxiproxy) ------------------------------------------------

@pytest.mark.ddp(world_size=2, fault="block_port", timeout=20)
def test_block_port(ddp):
    res = ddp.run(allreduce_once)
    res.assert_survivors_raised(dist.DistNetworkError)


def timed_init():
    start = time.monotonic()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=10))
    took = time.monotonic() - start
    # init can return in one rank while gloo is still connecting the other's pairs:
    # destroying the group at once would close them under it ("Connection closed by
    # peer"). A barrier is where both know the mesh is complete.
    dist.barrier()
    dist.destroy_process_group()
    return took


@pytest.mark.ddp(world_size=2, fault="block_port(duration=1)", timeout=20)
def test_block_port_recovers(ddp):
    res = ddp.run(timed_init)
    res.assert_all_ok()                # the store client's own reconnects get through
    assert min(res.values) >= 0.9


@pytest.mark.ddp(world_size=2, fault="latency(latency=400)", timeout=30)
def test_latency_slows_init(ddp):
    res = ddp.run(timed_init)
    res.assert_all_ok()
    assert min(res.values) >= 0.4


# -- network faults between ranks (scoped: the gloo data plane) --------------------------

def timed_steps(steps=4, pg_timeout=2.0):
    """One all_reduce per step(); what each took and the sum (ranks 0..3 -> 4**steps)."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))
    dist.barrier()  # every pair connected before a fault can land
    t = torch.ones(1)
    took = []
    for _ in range(steps):
        pytest_ddpfault.step()
        start = time.monotonic()
        dist.all_reduce(t)
        took.append(time.monotonic() - start)
    dist.destroy_process_group()
    return took, t.item()


@pytest.mark.ddp(world_size=2, nodes=2, fault="partition(nodes=(1,), at=step#3)")
def test_partition_times_out_both_sides(ddp):
    res = ddp.run(timed_steps)
    # nothing gets through, not even a close: both sides time out in all_reduce #3
    res.assert_survivors_raised(RuntimeError, match="Timed out")
    assert {(r.last_op.name, r.last_op.seq) for r in res} == {("all_reduce", 3)}


@pytest.mark.ddp(world_size=4, nodes=2, fault="partition(nodes=(1,), at=step#3, duration=0.8)")
def test_short_partition_is_survived(ddp):
    res = ddp.run(timed_steps, pg_timeout=5.0)
    res.assert_all_ok()
    for took, total in res.values:
        # all_reduce #3 held back (0.8 s from when rank 2 put the partition in place), nothing lost
        assert total == 4.0 ** 4 and took[2] >= 0.5 > max(took[:2])


@pytest.mark.ddp(world_size=4, nodes=2, fault="partition(nodes=(1,), at=step#2, mode=reject)")
def test_rejecting_partition_fails_fast(ddp):
    res = ddp.run(timed_steps, pg_timeout=20.0)
    # not the 20 s timeout: proxies close the connections ("... by peer"), namespaces reset them
    # under the ranks ("Software caused connection abort"); see README "Two engines"
    res.assert_survivors_raised(RuntimeError, match="peer|connection abort", within=10)


@pytest.mark.ddp(world_size=2, fault="latency(ranks=(1,), latency=100)")
def test_latency_on_a_ranks_links(ddp):
    res = ddp.run(timed_steps)
    res.assert_all_ok()
    # every all_reduce crosses the one link at least once each way: >= 2 x 100 ms
    assert min(min(took) for took, _ in res.values) >= 0.18
