"""Virtual nodes (``nodes=``) and ``kill_node``, with real processes and real gloo (DESIGN 4.1)."""
from __future__ import annotations

import os
import signal

import pytest

from pytest_ddpfault import Fault, FaultSpecError, SettingsError, run_group
from pytest_ddpfault.faults import faulted_ranks, rank_faults, validate_plan
from pytest_ddpfault.settings import SessionSettings, marker_settings, node_address

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
            "ROLE_RANK", "DDPFAULT_NODE_ADDR")


# --- settings and specs ------------------------------------------------------------------

@pytest.mark.parametrize("nodes", [0, 3, -1, "2", 2.0, True])
def test_bad_nodes_on_the_marker_name_the_value(nodes):
    with pytest.raises(SettingsError, match=rf"nodes {nodes!r} from @pytest.mark.ddp\(nodes=...\): "
                                            r"must be an int >= 1 that divides world_size=4"):
        marker_settings((4,), {"nodes": nodes}, SessionSettings())


def test_bad_nodes_elsewhere_name_where_they_came_from():
    with pytest.raises(SettingsError, match=r"nodes 3 from run_group\(nodes=...\)"):
        run_group(print, world_size=4, nodes=3)
    from pytest_ddpfault.api import DDP
    with pytest.raises(SettingsError, match=r"nodes 0 from DDP\(nodes=...\)"):
        DDP(world_size=2, nodes=0)


def test_marker_takes_nodes():
    ms = marker_settings((4,), {"nodes": 2, "fault": "kill_node(node=1)"}, SessionSettings())
    assert (ms.world_size, ms.nodes, ms.faults) == (4, 2, (Fault("kill_node", node=1),))
    assert marker_settings((4,), {}, SessionSettings()).nodes == 1


def test_a_node_outside_the_group_fails_at_collection():
    with pytest.raises(SettingsError, match=r"node 2 is outside the group \(nodes=2\): allowed 0..1"):
        marker_settings((4,), {"nodes": 2, "fault": "kill_node(node=2)"}, SessionSettings())
    with pytest.raises(FaultSpecError, match=r"node 1 is outside the group \(nodes=1\)"):
        validate_plan("kill_node(node=1)", 4)


def test_kill_node_round_trips_and_targets_its_nodes_ranks():
    f = Fault.parse("kill_node(node=1, at=step#2, signal=SIGTERM)")
    assert Fault.parse(str(f)) == f and str(f) == "kill_node(node=1, at=step#2, signal=SIGTERM)"
    assert faulted_ranks([f], 6, nodes=3) == {2, 3}
    assert faulted_ranks(["kill_node"], 6, nodes=3) == {4, 5}       # default: the last node
    assert faulted_ranks(["kill_node"], 4) == {0, 1, 2, 3}            # one node: all of them
    # the trigger counts in the node's first rank only
    assert [r for r in range(6) if rank_faults([f], r, 6, nodes=3)] == [2]
    assert f.resolved_rank(6, nodes=3) == 2


def test_node_addresses_are_distinct_loopback_addresses():
    addrs = [node_address(n) for n in range(600)]
    assert len(set(addrs)) == 600
    assert addrs[:2] == ["127.0.7.1", "127.0.7.2"]
    for a in addrs:
        parts = [int(p) for p in a.split(".")]
        assert parts[0] == 127 and all(0 <= p <= 255 for p in parts) and parts[3] not in (0, 255)
        assert a != "127.0.0.1"


def test_strategies_draw_kill_node_within_the_nodes():
    from hypothesis import given, settings

    from pytest_ddpfault.strategies import fault_plans

    seen = set()

    @settings(max_examples=60, deadline=None, database=None)
    @given(fault_plans(6, kinds=["kill_node"], nodes=3))
    def check(plan):
        validate_plan(plan, 6, nodes=3)
        for f in plan:
            assert Fault.parse(str(f)) == f
            seen.add(f.get("node"))

    check()
    assert seen <= {None, 0, 1, 2} and seen & {0, 1, 2}
    with pytest.raises(ValueError, match="nodes=4"):
        fault_plans(6, nodes=4)


# --- real runs ---------------------------------------------------------------------------

def env_and_allreduce():
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item(), {k: os.environ.get(k) for k in ENV_KEYS}


def test_each_rank_has_its_nodes_torchrun_environment():
    res = run_group(env_and_allreduce, world_size=6, nodes=3, timeout=60)
    res.assert_all_ok()
    for r in res:
        total, env = r.value
        node = r.rank // 2
        assert total == 21.0
        assert r.node == node
        assert env == {"RANK": str(r.rank), "WORLD_SIZE": "6", "LOCAL_RANK": str(r.rank % 2),
                       "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": str(node), "GROUP_WORLD_SIZE": "3",
                       "ROLE_RANK": str(r.rank), "DDPFAULT_NODE_ADDR": node_address(node)}
    table = res.summary().splitlines()
    assert table[0].split()[:3] == ["rank", "node", "status"]
    assert table[5].split()[:3] == ["4", "2", "ok"]


def test_one_node_is_todays_environment():
    res = run_group(env_and_allreduce, world_size=2, timeout=60)
    res.assert_all_ok()
    assert [r.node for r in res] == [0, 0]
    assert [r.value[1]["LOCAL_RANK"] for r in res] == ["0", "1"]
    assert {r.value[1]["DDPFAULT_NODE_ADDR"] for r in res} == {None}
    assert res.summary().splitlines()[0].split()[:2] == ["rank", "status"]


def _established_tcp() -> list[tuple[tuple[str, int], tuple[str, int]]]:
    """(local, remote) of this process's established IPv4 TCP sockets."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])

    def addr(text):
        ip, port = text.split(":")
        return ".".join(str(int(ip[i:i + 2], 16)) for i in (6, 4, 2, 0)), int(port, 16)

    out = []
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "01":  # 01: ESTABLISHED
                out.append((addr(fields[1]), addr(fields[2])))
    return out


def gloo_connections():
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.all_reduce(torch.ones(1))  # every pair is connected by now
    store_port = int(os.environ["MASTER_PORT"])
    pairs = [(local, remote) for local, remote in _established_tcp() if store_port not in (local[1], remote[1])]
    # no rank closes its pairs until every rank has read its table: a peer's destroy would
    # leave this rank's end of their pair in CLOSE_WAIT, no longer listed as established
    dist.barrier()
    dist.destroy_process_group()
    return pairs


def test_gloo_pairs_connect_to_each_nodes_own_address():
    """Each rank's gloo device listens on its node's address and advertises it: every pair
    between two ranks is a connection to the accepting rank's node address. (The connecting
    end's source address is the kernel's choice on loopback, 127.0.0.1: gloo does not bind
    a socket before it connects.)"""
    res = run_group(gloo_connections, world_size=4, nodes=2, timeout=60)
    res.assert_all_ok()
    node_addrs = {node_address(0), node_address(1)}
    listening = {}   # port -> the rank that accepted on it
    connecting = []  # (rank, the address and port it connected to)
    for r in res:
        assert len(r.value) == 3, r.value   # one pair with each peer
        for local, remote in r.value:
            if local[0] == node_address(r.node):
                assert listening.setdefault(local[1], r.rank) == r.rank
            else:
                assert local[0] == "127.0.0.1" and remote[0] in node_addrs, (r.rank, local, remote)
                connecting.append((r.rank, remote))
    assert len(connecting) == 6   # each of the 6 pairs: one end connected, the other accepted
    assert len(set(listening.values())) == len(listening)   # one listener per rank
    for rank, (addr, port) in connecting:
        if port in listening:  # the peer it connected to accepted there: that peer's node address
            assert addr == node_address(listening[port] // 2), (rank, addr, port)
    assert {node_address(r // 2) for r in listening.values()} == node_addrs


def allreduce_steps(n=3, timeout_s=None):
    import datetime

    import torch
    import torch.distributed as dist

    import pytest_ddpfault

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s) if timeout_s else None)
    # init can return in one rank while gloo still connects another's pairs: a node lost
    # then leaves the others in connectFullMesh until gloo's connect timeout. The barrier
    # is where every rank knows the mesh is complete (it counts as no all_reduce or step).
    dist.barrier()
    t = torch.ones(1)
    for _ in range(n):
        pytest_ddpfault.step()
        dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


@pytest.mark.parametrize("at", ["all_reduce#1", "step#2", "init", "t=1.0"])
def test_kill_node_kills_every_rank_of_the_node_together(at):
    fn, kwargs = (_wait_then_allreduce, {}) if at == "t=1.0" else (allreduce_steps, {"timeout_s": 3})
    res = run_group(fn, world_size=4, nodes=2, faults=f"kill_node(node=1, at={at})", timeout=60, **kwargs)
    assert [r.status for r in res] == ["raised", "raised", "killed", "killed"], res.summary()
    assert res[2].killed_by(signal.SIGKILL) and res[3].killed_by(signal.SIGKILL)
    assert [r.rank for r in res.faulted] == [2, 3] and [r.rank for r in res.survivors] == [0, 1]
    [ev] = res.fault_events
    assert (ev.kind, ev.rank, ev.node, ev.trigger) == ("kill_node", 2, 1, at)
    assert "kill_node on node 1 (from rank 2)" in str(ev)
    # both died at once: the harness signalled them together, within a moment of each other
    assert abs(res[2].end_time - res[3].end_time) < 1.0, res.summary()
    # what real gloo does: after init, survivors see the closed connections at once; at
    # init, they wait on the store for the dead node's ranks until the group's timeout
    if at == "init":
        res.assert_survivors_raised(RuntimeError, within=20)
    else:
        res.assert_survivors_raised(RuntimeError, match="Connection closed by peer|Connection reset by peer",
                                    within=10)
    assert not res.unfired


def _wait_then_allreduce():
    import time

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()  # the mesh is complete everywhere before node 1 is lost
    t = torch.ones(1)
    end = time.monotonic() + 20  # node 1's ranks die at t=1.0 s, mid-loop; the others fail then
    while time.monotonic() < end:
        dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


def test_kill_node_with_sigterm_and_three_nodes():
    res = run_group(allreduce_steps, world_size=6, nodes=3, faults="kill_node(node=0, at=step#1, signal=SIGTERM)",
                    timeout=60)
    assert [r.status for r in res][:2] == ["killed", "killed"], res.summary()
    assert res[0].killed_by(signal.SIGTERM) and res[1].killed_by(signal.SIGTERM)
    assert [r.rank for r in res.survivors] == [2, 3, 4, 5]
    assert res.fault_events[0].node == 0
