"""Network faults between ranks (DESIGN 4.1): scoped kinds on the gloo data plane, with
real gloo through real Toxiproxy proxies (the embedded server), what gloo does under each."""
from __future__ import annotations

import datetime
import json
import time
import urllib.request

import pytest
import torch
import torch.distributed as dist

import pytest_ddpfault
from pytest_ddpfault import Fault, SettingsError, run_group
from pytest_ddpfault.faults import validate_plan
from pytest_ddpfault.links import crossing
from pytest_ddpfault.rank.gloo_addresses import parse_published
from pytest_ddpfault.settings import SessionSettings, marker_settings
from pytest_ddpfault.toxiproxy.client import default_server


def timed_steps(steps=4, numel=4, pg_timeout=3.0):
    """``steps`` all_reduces, one per ``step()``: what each took, and the result."""
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))
    dist.barrier()
    t = torch.ones(numel)
    took = []
    try:
        for _ in range(steps):
            pytest_ddpfault.step()
            start = time.monotonic()
            dist.all_reduce(t)
            took.append(time.monotonic() - start)
    finally:
        dist.destroy_process_group()
    return took, t[0].item()


def link_proxies_seen(url):
    """What a rank sees: its table of link proxies, and the server's link proxies."""
    from pytest_ddpfault import links

    with urllib.request.urlopen(f"{url}/proxies", timeout=5) as resp:
        names = sorted(n for n in json.load(resp) if n.startswith("ddpfault_link_"))
    table = links.installed()
    return (None if table is None else sorted(p.link for p in table.proxies.values())), names


def _server_links():
    with urllib.request.urlopen(f"{default_server().url}/proxies", timeout=5) as resp:
        return sorted(n for n in json.load(resp) if n.startswith("ddpfault_link_"))


# --- specs ----------------------------------------------------------------------------

@pytest.mark.parametrize("spec", [
    "latency(ranks=(1,), latency=50)",
    "bandwidth(nodes=(1,), rate=1000, at=step#2)",
    "partition(ranks=(2, 3), at=step#3)",
    "partition(nodes=(1,), mode=reject, at=t=1.0, duration=2)",
    "blackhole(ranks=(0,), rank=2, at=all_reduce#2)",
])
def test_scoped_specs_round_trip(spec):
    f = Fault.parse(spec)
    assert Fault.parse(str(f)) == f
    validate_plan([f], 4, nodes=2)


@pytest.mark.parametrize("world_size, nodes, fault, fix", [
    (4, 1, "partition(nodes=(1,))", "add nodes=2 to the marker (@pytest.mark.ddp(world_size=4, nodes=2): 2 nodes of "
                                    "2 ranks; ddp.torchrun(..., nnodes=2)), or name ranks instead, ranks=(...)"),
    (6, 1, "latency(nodes=(2,), latency=5)", "add nodes=3 to the marker (@pytest.mark.ddp(world_size=6, nodes=3)"),
    (6, 3, "partition(nodes=(3,))", "add nodes=6 to the marker (@pytest.mark.ddp(world_size=6, nodes=6): 6 nodes "
                                    "of 1 rank;"),     # the fewest nodes that hold node 3 and divide 6
    (2, 1, "partition(nodes=(2,))", "world_size=2 makes at most 2 nodes: name ranks instead, ranks=(...)"),
    (4, 1, "kill_node(node=1)", "add nodes=2 to the marker (@pytest.mark.ddp(world_size=4, nodes=2): 2 nodes of "
                                "2 ranks; ddp.torchrun(..., nnodes=2)), or name ranks instead, kill_rank(rank=N)"),
])
def test_a_node_the_marker_does_not_make_says_how_many_nodes_to_add(world_size, nodes, fault, fix):
    with pytest.raises(SettingsError) as info:
        marker_settings((world_size,), {"nodes": nodes, "fault": fault}, SessionSettings())
    assert f"outside the group (nodes{'=' if 'kill_node' in fault else ' 0..'}" in str(info.value)
    assert fix in str(info.value), str(info.value)


def test_the_counting_rank_is_the_sets_lowest_unless_named():
    assert Fault.parse("partition(ranks=(3, 2), at=step#3)").resolved_rank(4) == 2
    assert Fault.parse("partition(nodes=(1,), at=step#3)").resolved_rank(4, nodes=2) == 2
    assert Fault.parse("partition(ranks=(2,), rank=0, at=step#3)").resolved_rank(4) == 0
    # the harness puts init and t= ones in place: no rank counts them
    assert Fault.parse("partition(ranks=(2,), at=t=1.0)").resolved_rank(4) is None


def test_the_links_a_scope_crosses():
    assert crossing({2, 3}, 4) == {(0, 2), (0, 3), (1, 2), (1, 3)}
    assert crossing({1}, 3) == {(0, 1), (1, 2)}
    f = Fault.parse("partition(nodes=(1,))")
    assert f.definition.scope_ranks(f, 6, 3) == {2, 3}


def test_gloo_published_address_is_read_and_rewritten():
    import socket
    import struct

    host = b"machine"
    sockaddr = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 4242) + socket.inet_aton("127.0.7.2")
    address = sockaddr.ljust(128, b"\0") + struct.pack("=q", -1)
    value = struct.pack("=Q", len(host)) + host + struct.pack("=Q", len(address)) + address + struct.pack("=qq", 5, 6)
    rec = parse_published("0/3", value)
    assert (rec.rank, rec.host_port) == (3, "127.0.7.2:4242")
    moved = parse_published("0/3", rec.with_address("127.0.0.1", 5555))
    assert moved.host_port == "127.0.0.1:5555" and len(rec.with_address("127.0.0.1", 5555)) == len(value)
    assert parse_published("0/x", value) is None and parse_published("0/3", b"short") is None


# --- what gloo does under each ------------------------------------------------------------

def test_a_partition_mid_training_times_out_on_both_sides(tmp_path):
    res = run_group(timed_steps, world_size=4, nodes=2, faults="partition(nodes=(1,), at=step#3)",
                    pg_timeout=1.0, timeout=30)
    # every rank fails in all_reduce #3, none before the process group's timeout
    assert [r.status for r in res.ranks] == ["raised"] * 4, res.report()
    [event] = res.fault_events
    assert (event.kind, event.rank, event.trigger, event.scope) == ("partition", 2, "step#3", (2, 3))
    progress = res.progress().splitlines()
    assert progress[1].split()[:3] == ["rank", "node", "status"] and progress[4].split()[:2] == ["2", "1"]
    res.timeline(tmp_path / "t.html")
    assert "rank 2 (node 1)" in (tmp_path / "t.html").read_text()
    for r in res.ranks:
        assert r.last_op.name == "all_reduce" and r.last_op.seq == 3
        # not at once: at its timeout (1 s from its all_reduce #3, which ranks 0 and 1 may
        # begin while rank 2 is still putting the partition in place)
        assert r.end_time - event.time >= 0.3, res.report()
    # on each side the first to give up timed out; the close of its process may reach its
    # own side's peers (not across the cut: the partition holds closes back too)
    for side in ((0, 1), (2, 3)):
        assert any("Timed out" in res[r].message for r in side), res.report()
        for r in side:
            assert "Timed out" in res[r].message or "Connection closed by peer" in res[r].message


def test_a_partition_healed_before_the_timeout_is_survived_with_correct_values():
    res = run_group(timed_steps, world_size=4, nodes=2, network="proxies",
                    faults="partition(ranks=(2, 3), at=step#3, duration=0.8)", pg_timeout=5.0, timeout=30)
    res.assert_all_ok()
    for rank, (took, total) in enumerate(res.values):
        assert total == 4.0 ** 4            # nothing lost: the held-back bytes arrived
        # it landed exactly at step 3: rank 2 put it in place before its all_reduce #3 began,
        # and the harness lifts it 0.8 s after that; the others began #3 about then (one
        # descheduled for a moment begins later and waits less)
        assert took[2] >= (0.75 if rank == 2 else 0.5), took
        assert max(took[:2]) < 0.5, took    # ... not before
    # ranks 2, 3 are node 1 entire: its path to the store on node 0 is cut too
    assert [e.detail for e in res.fault_events] == ["5 links: 0-2, 0-3, 1-2, 1-3, node 1-store", "removed"]


def pair_group_steps(steps=3, pg_timeout=5.0):
    """Ranks 0 and 2 all_reduce in a group of their own (``new_group``), once per step."""
    timeout = datetime.timedelta(seconds=pg_timeout)
    dist.init_process_group("gloo", timeout=timeout)
    dist.barrier()
    pair = dist.new_group([0, 2], timeout=timeout)
    t, took = torch.ones(4), []
    try:
        if dist.get_rank() in (0, 2):
            for _ in range(steps):
                pytest_ddpfault.step()
                start = time.monotonic()
                dist.all_reduce(t, group=pair)
                took.append(time.monotonic() - start)
    finally:
        dist.destroy_process_group()
    return took, t[0].item()


def test_a_new_group_on_virtual_nodes_without_a_fault():
    res = run_group(pair_group_steps, world_size=4, nodes=2, timeout=30)
    res.assert_all_ok()
    assert [total for _, total in res.values] == [8.0, 1.0, 8.0, 1.0]


def test_a_partition_holds_back_a_new_groups_traffic_too():
    # 0 and 2 are on different nodes: their group's one link crosses the cut
    res = run_group(pair_group_steps, world_size=4, nodes=2,
                    faults="partition(nodes=(1,), at=step#2, duration=0.8)", timeout=30)
    res.assert_all_ok()
    for rank in (0, 2):
        took, total = res.values[rank]
        assert total == 2.0 ** 3, took        # nothing lost
        assert took[1] >= (0.75 if rank == 2 else 0.5) and max(took[0], took[2]) < 0.5, took


def test_a_rejecting_partition_fails_fast():
    res = run_group(timed_steps, world_size=4, nodes=2, network="proxies",  # namespaces: tests/test_netns.py
                    faults="partition(nodes=(1,), at=step#2, mode=reject)", pg_timeout=20.0, timeout=30)
    assert [r.status for r in res.ranks] == ["raised"] * 4, res.report()
    fired = res.fault_events[0].time
    for r in res.ranks:
        assert "Connection closed by peer" in r.message or "Connection reset" in r.message, r.message
        assert r.end_time - fired < 10, "not the 20 s process-group timeout"


def test_latency_on_one_ranks_links_slows_every_collective_it_is_in():
    res = run_group(timed_steps, world_size=2, faults="latency(ranks=(1,), latency=100)", timeout=30)
    res.assert_all_ok()
    for took, total in res.values:
        assert total == 2.0 ** 4
        # a two-rank all_reduce needs two round trips over the one link: at least 4 x 100 ms
        assert min(took) >= 0.35, took


def test_bandwidth_on_a_nodes_links_bounds_a_large_all_reduce():
    numel, rate_kb = 64 * 1024, 256          # 256 KB each way at 256 KB/s
    res = run_group(timed_steps, world_size=2, nodes=2, faults=f"bandwidth(nodes=(1,), rate={rate_kb})",
                    steps=1, numel=numel, timeout=30)
    res.assert_all_ok()
    for took, _ in res.values:
        assert took[0] >= 0.8 * (numel * 4 / 1024) / rate_kb, took


def test_no_scoped_fault_no_link_proxies_and_the_proxies_go_with_the_run():
    url = default_server().url
    before = _server_links()
    plain = run_group(link_proxies_seen, url, world_size=2, faults="latency(latency=1)", timeout=30)
    plain.assert_all_ok()
    assert plain.values == [(None, before)] * 2          # store-path fault: no data-plane proxy
    scoped = run_group(link_proxies_seen, url, world_size=3, faults="latency(ranks=(2,), latency=1)", timeout=30)
    scoped.assert_all_ok()
    for table, names in scoped.values:
        assert table == ["0-2", "1-2"] and len(names) == len(before) + 2
    assert _server_links() == before


def test_a_scoped_fault_through_a_toxiproxy_url():
    from pytest_ddpfault.toxiproxy import EmbeddedToxiproxy

    server = EmbeddedToxiproxy("127.0.0.1", 0).start(20)
    try:
        res = run_group(timed_steps, world_size=2, faults="partition(ranks=(0,), duration=0.5)",
                        toxiproxy=server.url, steps=1, timeout=30)
        res.assert_all_ok()
        assert res.values[0][1] == 2.0
    finally:
        server.stop()
