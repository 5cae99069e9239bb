"""A virtual node is a host (issue 21, DESIGN 5.1): the store lives on node 0, and a node
cut off from node 0 loses it too, as on real machines (the proxies engine: the node's
ranks reach the store through a path of their own, which the fault also cuts)."""
from __future__ import annotations

import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist

import pytest_ddpfault
from pytest_ddpfault import netns, run_group
from pytest_ddpfault.links import cut_off_nodes, node_address


def store_add_after_cut(pg_timeout=1.5):
    """Every rank: init, a barrier (all connected), ``step()`` (the fault's trigger in its
    counting rank), then one ``add`` on the default store: what came of it and how long it took."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    env = (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    pytest_ddpfault.step()
    start = time.monotonic()
    try:
        outcome = ("ok", store.add("count", 1))
    except Exception as exc:  # what the store client raises is the point
        outcome = (type(exc).__name__, str(exc)[:200])
    return outcome, time.monotonic() - start, env


def test_cut_off_nodes_are_the_hosts_a_cut_separates_from_node_0():
    # world 6 on 3 nodes: node n holds ranks 2n, 2n+1
    assert cut_off_nodes({2, 3}, 6, 3) == [1]
    assert cut_off_nodes({0, 1}, 6, 3) == [1, 2]        # node 0 cut off from the rest
    assert cut_off_nodes({2, 3, 4, 5}, 6, 3) == [1, 2]
    assert cut_off_nodes({2}, 6, 3) == []              # a cut through node 1: processes, not hosts
    assert cut_off_nodes({0}, 6, 3) == []              # through node 0
    assert cut_off_nodes({0, 1, 2, 3}, 6, 3) == [2]


def test_with_nodes_master_addr_is_node_0s_address_and_no_fault_costs_no_store_path():
    res = run_group(store_add_after_cut, world_size=4, nodes=2, timeout=30)
    res.assert_all_ok()
    assert {v[2] for v in res.values} == {(node_address(0), res.values[0][2][1])}  # one store, direct
    assert sorted(v[0][1] for v in res.values) == [1, 2, 3, 4]
    assert res.network == "proxies" and "network:" not in res.summary()


def test_reject_partition_cuts_the_cut_off_nodes_store_calls_and_not_node_0s():
    res = run_group(store_add_after_cut, world_size=4, nodes=2, timeout=30, network="proxies",
                    faults="partition(nodes=(1,), rank=2, at=step#1, mode=reject)")
    (kind, _), _, (addr, port) = res[2].value
    assert addr == node_address(0)
    assert kind == "DistNetworkError"           # the store's connection was reset under it
    for rank in (0, 1):                          # node 0 reaches its own store directly
        assert res[rank].value[0][0] == "ok", res.report()
        assert res[rank].value[2] == (node_address(0), res[0].value[2][1])
    assert port != res[0].value[2][1]            # node 1's store path is a port of its own
    assert "node 1-store" in str(res.fault_events[0].detail)
    assert "network: proxies" in res.summary() and "store paths of node 1" in res.summary()


def test_drop_partition_holds_the_cut_off_nodes_store_calls_until_it_heals_nothing_lost():
    duration = 1.0
    res = run_group(store_add_after_cut, world_size=4, nodes=2, timeout=30,
                    faults=f"partition(nodes=(1,), rank=2, at=step#1, duration={duration})")
    res.assert_all_ok()
    (kind, count), took, _ = res[2].value
    # in place before rank 2's step() returned, lifted `duration` after: its add waited for it
    assert kind == "ok" and took >= duration * 0.8, res.report()
    assert sorted(v[0][1] for v in res.values) == [1, 2, 3, 4]   # every add arrived once
    assert [e.detail for e in res.fault_events][-1] == "removed"


def test_an_unscoped_store_fault_still_proxies_the_whole_store_path_with_nodes():
    res = run_group(store_add_after_cut, world_size=4, nodes=2, timeout=30, proxy=True)
    res.assert_all_ok()
    assert {v[2][0] for v in res.values} == {node_address(0)}


@pytest.mark.ddp(world_size=4, nodes=2, fault="partition(nodes=(1,), rank=2, at=step#1, mode=reject)", timeout=30)
def test_the_ddp_fixture_reports_the_network_engine(ddp):
    res = ddp.run(store_add_after_cut)
    # auto: kernel namespaces where this machine permits them (pytest_ddpfault/netns.py)
    assert res.network == ("proxies" if netns.not_permitted() else "namespaces")
    assert res[2].value[0][0] == "DistNetworkError"


def all_reduce_then_store_add(pg_timeout=1.5):
    """After ``step()`` (the fault's trigger): an all_reduce (the data plane), then a store
    ``add`` (the control plane); what came of each."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))
    dist.barrier()
    store = dist.distributed_c10d._get_default_store()
    pytest_ddpfault.step()
    t = torch.ones(1)
    dist.all_reduce(t)
    try:
        outcome = ("ok", store.add("count", 1))
    except Exception as exc:  # what the store client raises is the point
        outcome = (type(exc).__name__, str(exc)[:200])
    return t.item(), outcome


def init_outcome(pg_timeout=0.5):
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))
    except RuntimeError as exc:
        return "raised", str(exc).splitlines()[0]
    return "ok", ""


def test_plane_store_cuts_the_control_plane_only_gloo_goes_on():
    res = run_group(all_reduce_then_store_add, world_size=4, nodes=2, timeout=30,
                    faults="partition(nodes=(1,), rank=2, at=step#1, mode=reject, plane=store)")
    res.assert_all_ok()
    assert [v[0] for v in res.values] == [4.0] * 4            # the data plane carried the all_reduce
    assert res[2].value[1][0] == "DistNetworkError"            # after the cut: node 1's store call fails
    assert [res[r].value[1][0] for r in (0, 1)] == ["ok", "ok"]
    assert "node 1-store" in res.fault_events[0].detail and "0-2" not in res.fault_events[0].detail


def test_plane_data_is_the_firewall_that_lets_master_port_through():
    """Rendezvous through the store works, then gloo's connectFullMesh fails: the connecting
    side (node 1: gloo lets the larger address connect) is refused at once, node 0 waits for
    a peer that never comes until gloo's connect timeout."""
    res = run_group(init_outcome, world_size=4, nodes=2, timeout=30,
                    faults="partition(nodes=(1,), mode=reject, plane=data)")
    res.assert_all_ok()
    for rank in (2, 3):
        assert res[rank].value[0] == "raised" and "Connection refused" in res[rank].value[1], res.report()
    for rank in (0, 1):
        assert res[rank].value[0] == "raised" and "connectFullMesh" in res[rank].value[1], res.report()
    assert "store" not in res.fault_events[0].detail


@pytest.mark.parametrize("spec, error", [
    ("partition(plane=store)", "plane= chooses the traffic of a scoped fault"),
    ("partition(ranks=(2,), plane=store)", "separates no whole node from node 0"),
])
def test_plane_needs_a_cut_between_whole_nodes(spec, error):
    from pytest_ddpfault.faults import FaultSpecError, parse_plan, validate_plan

    with pytest.raises(FaultSpecError, match=error):
        validate_plan(parse_plan(spec), 4, 2)


STORE_PROBE_SCRIPT = '''
import datetime, json, os, time
import torch, torch.distributed as dist
import pytest_ddpfault

dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=5))
dist.barrier()
store = dist.distributed_c10d._get_default_store()
pytest_ddpfault.step()          # the fault's trigger, in node 1's worker
t = torch.ones(1)
dist.all_reduce(t)              # plane=store: the data plane is up
start = time.monotonic()
count = store.add("count", 1)   # node 1: held until the cut heals
print("PROBE", json.dumps({"rank": dist.get_rank(), "sum": t.item(), "count": count,
                           "took": time.monotonic() - start,
                           "master": [os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]]}), flush=True)
dist.barrier()                  # rank 0 hosts the store: it stays until node 1's add got through
dist.destroy_process_group()
'''


@pytest.mark.ddp(world_size=2, timeout=60)
def test_under_multi_node_torchrun_a_cut_off_nodes_workers_lose_the_store_too(ddp, tmp_path):
    """The workers' store is hosted by the attempt's rank 0 (on node 0): node 1's worker
    reaches it through its own path, which a store-plane partition of node 1 holds back
    (its agent's rendezvous path too) until it heals, nothing lost."""
    import json

    script = tmp_path / "probe.py"
    script.write_text(STORE_PROBE_SCRIPT)
    duration = 1.0
    res = ddp.torchrun(str(script), nnodes=2, rdzv_conf={"join_timeout": 20, "last_call_timeout": 1},
                       faults=f"partition(nodes=(1,), at=step#1, plane=store, duration={duration})")
    probes = {}
    for worker in res.workers:
        for line in worker.stdout.splitlines():
            if line.startswith("PROBE "):
                probe = json.loads(line[len("PROBE "):])
                probes[probe["rank"]] = probe
    assert sorted(probes) == [0, 1], res.summary()
    assert probes[0]["sum"] == probes[1]["sum"] == 2.0            # gloo went on between the nodes
    assert sorted(p["count"] for p in probes.values()) == [1, 2]    # both adds arrived, once each
    # in place before node 1's step() returned, lifted `duration` after: its add waited for it
    assert probes[1]["took"] >= duration * 0.8, probes
    assert probes[1]["master"][1] != probes[0]["master"][1]        # node 1 dialled its own path
