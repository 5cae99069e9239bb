"""The "namespaces" network engine (issue 21 section 2, DESIGN 5.1): each virtual node its
own Linux network namespace, so a partition is the kernel's and cuts every socket between
the nodes, the store's and the user's own included; nothing is left behind."""
from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch.distributed as dist

import pytest_ddpfault
from pytest_ddpfault import Fault, SettingsError, netns, run_group
from pytest_ddpfault.rank.netns import cut_commands, node_commands
from test_network_scoped import timed_steps

needs_namespaces = pytest.mark.skipif(bool(netns.not_permitted()),
                                      reason=f"no network namespaces here: {netns.not_permitted()}")


def net_namespaces() -> set[int]:
    """The network namespaces some process of this machine is in (by inode)."""
    out = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                out.add(os.stat(f"/proc/{pid}/ns/net").st_ino)
            except OSError:  # gone meanwhile, or not ours to see
                pass
    return out


def wait_gone(namespaces: set[int], budget: float = 20.0) -> None:
    """Poll until no process is in any of ``namespaces`` (SIGKILLed processes take a moment)."""
    end = time.monotonic() + budget
    while net_namespaces() & namespaces:
        assert time.monotonic() < end, f"left behind: {net_namespaces() & namespaces}"
        time.sleep(0.05)


def wait_for(path: str, budget: float = 15.0) -> None:
    """Poll for a file another rank writes (the two nodes cannot talk while cut)."""
    end = time.monotonic() + budget
    while not os.path.exists(path):
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear within {budget} s")
        time.sleep(0.01)


def attempt(call) -> tuple[str, str, float]:
    """(\"ok\" or the exception's type, its value or message, seconds it took)."""
    start = time.monotonic()
    try:
        value = call()
    except Exception as exc:  # what the call raises is the point
        return type(exc).__name__, str(exc)[:200], time.monotonic() - start
    return "ok", repr(value), time.monotonic() - start


def echo_server(host: str) -> socket.socket:
    """A user's own TCP server: echoes what each connection sends."""
    server = socket.create_server((host, 0))

    def echo(conn):
        with conn:
            for data in iter(lambda: conn.recv(100), b""):
                conn.sendall(data)

    def serve():
        while True:
            conn, _ = server.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


def cut_node_1(tmp):
    """Rank 0 (node 0) serves an echo socket; rank 1 (node 1) uses it and the store, then
    ``step()`` (the partition comes before it returns) and tries them again; once healed,
    again. The two ranks meet in files: nothing between the nodes passes while cut."""
    rank, addr, port = int(os.environ["RANK"]), os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, 2, False, timeout=datetime.timedelta(seconds=1))
    out = {}
    if rank == 0:
        server = echo_server(os.environ["DDPFAULT_NODE_ADDR"])
        store.set("port", str(server.getsockname()[1]))
        wait_for(f"{tmp}/cut")
        out["node0_store"] = attempt(lambda: (store.set("n0", "x"), store.get("n0")))
        open(f"{tmp}/node0_done", "w").close()
        wait_for(f"{tmp}/end")
        out["set_during_arrived"] = attempt(lambda: store.check(["during"]))
        return out
    user_port = int(store.get("port"))
    user = socket.create_connection((addr, user_port), timeout=2)
    user.sendall(b"a")
    out["before"] = user.recv(10)
    pytest_ddpfault.step()
    open(f"{tmp}/cut", "w").close()

    def connect():
        with socket.create_connection((addr, user_port), timeout=0.5):
            return "connected"

    out["connect"] = attempt(connect)
    user.settimeout(0.5)
    out["user_send"] = attempt(lambda: user.sendall(b"b"))
    out["user_recv"] = attempt(lambda: user.recv(10))
    out["store_set"] = attempt(lambda: store.set("during", "1"))
    wait_for(f"{tmp}/node0_done")
    end = time.monotonic() + 15
    while attempt(connect)[0] != "ok":   # until the harness healed it
        assert time.monotonic() < end, "never healed"
    user.settimeout(5)
    out["user_recv_after"] = attempt(lambda: user.recv(10))
    out["store_after"] = attempt(lambda: dist.TCPStore(addr, port, 2, False, timeout=datetime.timedelta(seconds=2))
                                 .get("port"))
    open(f"{tmp}/end", "w").close()
    return out


def where_am_i():
    return os.stat("/proc/self/ns/net").st_ino, os.environ.get("DDPFAULT_NODE_ADDR")


# --- which engine ------------------------------------------------------------------------

def _plan(*specs):
    return tuple(Fault.parse(s) for s in specs)


@needs_namespaces
@pytest.mark.parametrize("specs, engine", [
    ((), "proxies"),                                           # nothing to cut: the cheaper engine
    (("kill_rank(rank=1)",), "proxies"),
    (("partition(nodes=(1,), at=step#1)",), "namespaces"),
    (("partition(nodes=(1,), mode=reject, direction=out)",), "namespaces"),
    (("partition(nodes=(1,), plane=data)",), "proxies"),      # routes cannot tell ports apart
    (("partition(ranks=(1,))",), "proxies"),                  # a cut through a node
    (("latency(nodes=(1,), latency=5)",), "proxies"),         # no netem here
    (("partition(nodes=(1,))", "latency(latency=5)"), "proxies"),  # the store proxy lives in the root namespace
])
def test_auto_takes_namespaces_where_the_kernel_can_do_every_scoped_fault(specs, engine):
    assert netns.choose("auto", _plan(*specs), 4, 2) == engine


@pytest.mark.parametrize("specs, proxy, why", [
    (("partition(nodes=(1,), plane=data)",), False, "plane=data"),
    (("partition(ranks=(1,))",), False, "cuts through a node"),
    (("bandwidth(nodes=(1,), rate=10)",), False, "bandwidth has no kernel route"),
    (("partition(nodes=(1,))",), True, "proxy=True"),
])
def test_namespaces_where_the_plan_needs_proxies_is_an_error_that_says_why(specs, proxy, why):
    with pytest.raises(SettingsError, match="network='namespaces' cannot run this plan") as info:
        netns.choose("namespaces", _plan(*specs), 4, 2, proxy)
    assert why in str(info.value) or netns.not_permitted() in str(info.value)


def test_a_one_way_reject_on_the_proxies_is_refused_and_bad_values_are_named():
    with pytest.raises(SettingsError, match="one way it can only hold bytes back"):
        netns.choose("proxies", _plan("partition(nodes=(1,), mode=reject, direction=in)"), 4, 2)
    with pytest.raises(SettingsError, match="network 'kernel' from run_group.*auto, namespaces, proxies"):
        run_group(where_am_i, world_size=2, network="kernel")


def test_a_direction_needs_a_cut_between_whole_nodes():
    from pytest_ddpfault.faults import FaultSpecError, validate_plan

    with pytest.raises(FaultSpecError, match="direction=out needs a cut between whole nodes.*inside node 0"):
        validate_plan(_plan("partition(ranks=(1,), direction=out)"), 4, 2)
    with pytest.raises(FaultSpecError, match="direction= is one side of a cut"):
        Fault.parse("partition(direction=in)")
    validate_plan(_plan("partition(ranks=(2, 3), direction=in)"), 4, 2)


def test_the_routes_of_a_cut_and_of_a_node():
    # out: the side's namespaces lose the way to the rest; in: the rest's lose the way to the side
    assert cut_commands([1], 3, "out", "reject", 7, add=True) == {
        1: ["route add unreachable 127.0.7.1/32 metric 7", "route add unreachable 127.0.7.3/32 metric 7"]}
    assert cut_commands([1], 3, "in", "drop", 7, add=False) == {
        0: ["route del 127.0.7.2/32 dev void metric 7"], 2: ["route del 127.0.7.2/32 dev void metric 7"]}
    assert sorted(cut_commands([0], 2, "both", "drop", 7, add=True)) == [0, 1]
    cmds = node_commands(1, 3, [100, 101, 102])
    assert "link add v1_2 type veth peer name v2_1 netns 102" in cmds       # the veth to the higher node
    assert not any("v1_0 type veth" in c for c in cmds)                       # node 0 made that one
    assert "route add 127.0.7.1/32 dev v1_0 src 127.0.7.2 metric 1000" in cmds
    assert all("127." in c for c in cmds if "addr" in c or "route" in c)      # loopback range only


# --- real runs ---------------------------------------------------------------------------

@needs_namespaces
def test_each_node_is_a_namespace_of_its_own_and_nothing_is_left_after_the_run():
    before = net_namespaces()
    res = run_group(where_am_i, world_size=4, nodes=2, network="namespaces", timeout=30)
    res.assert_all_ok()
    assert res.network == "namespaces" and "namespaces, one per node" in res.network_note
    (ns0, a0), (ns0b, a0b), (ns1, a1), (ns1b, a1b) = res.values
    assert ns0 == ns0b != ns1 == ns1b and ns0 not in before and ns1 not in before
    assert (a0, a0b, a1, a1b) == ("127.0.7.1", "127.0.7.1", "127.0.7.2", "127.0.7.2")
    wait_gone({ns0, ns1})   # each went with its last process (other runs may make theirs meanwhile)


@needs_namespaces
def test_reject_cuts_node_1s_store_and_user_sockets_at_once_and_node_0s_keep_working(tmp_path):
    res = run_group(cut_node_1, str(tmp_path), world_size=2, nodes=2, network="auto", timeout=30,
                    faults="partition(nodes=(1,), mode=reject, at=step#1, duration=1)")
    res.assert_all_ok()
    assert res.network == "namespaces"
    n0, n1 = res.values
    assert n0["node0_store"][0] == "ok"                       # node 0 reaches its own store
    kind, message, took = n1["connect"]
    assert "No route to host" in message and took < 0.3        # EHOSTUNREACH, at once
    assert n1["user_send"][0] == "ConnectionAbortedError"      # the open socket was reset
    assert n1["store_set"][0] == "DistNetworkError"            # and the store's
    assert n1["store_after"][0] == "ok"                        # healed: a new client works
    assert [e.detail for e in res.fault_events] == ["2 links: node 0's routes, node 1's routes", "removed"]


@needs_namespaces
def test_drop_silences_node_1s_sockets_and_once_healed_nothing_is_lost(tmp_path):
    res = run_group(cut_node_1, str(tmp_path), world_size=2, nodes=2, timeout=30,
                    faults="partition(nodes=(1,), at=step#1, duration=1)")
    res.assert_all_ok()
    assert res.network == "namespaces"
    n0, n1 = res.values
    assert n0["node0_store"][0] == "ok"
    assert n1["connect"][0] == "TimeoutError"                  # silent: no refusal, no route error
    assert n1["user_send"][0] == "ok" and n1["user_recv"][0] == "TimeoutError"
    assert n1["user_recv_after"][:2] == ("ok", "b'b'")         # the held byte arrived, and its echo
    assert n0["set_during_arrived"][:2] == ("ok", "True")      # the store call held during the cut too


@needs_namespaces
@pytest.mark.parametrize("direction, cut", [("out", "node 1's routes"), ("in", "node 0's routes")])
def test_a_one_way_cut_silences_tcp_both_ways_and_gloo_resumes_once_healed(tmp_path, direction, cut):
    # one way is enough to stop TCP: what one side sends is never acknowledged
    res = run_group(cut_node_1, str(tmp_path), world_size=2, nodes=2, timeout=30,
                    faults=f"partition(nodes=(1,), at=step#1, duration=1, direction={direction})")
    res.assert_all_ok()
    n0, n1 = res.values
    assert n1["connect"][0] == "TimeoutError" and n1["user_recv"][0] == "TimeoutError"
    assert n1["user_recv_after"][:2] == ("ok", "b'b'")
    assert res.fault_events[0].detail == f"1 link: {cut}"


@needs_namespaces
def test_gloo_under_a_healed_drop_resumes_at_tcps_next_retransmission():
    res = run_group(timed_steps, world_size=2, nodes=2, pg_timeout=10.0, timeout=30,
                    faults="partition(nodes=(1,), at=step#2, duration=0.5)")
    res.assert_all_ok()
    assert res.network == "namespaces"
    for took, total in res.values:
        assert total == 2.0 ** 4                                # nothing lost
        assert took[1] >= 0.45 and took[0] < 0.4 and took[2] < 0.4, took
        assert took[1] < 1.5, took   # the resend due 0.6 s after the cut (backoff from 200 ms), not later


@needs_namespaces
def test_gloo_under_reject_fails_at_once_with_the_connection_aborted():
    res = run_group(timed_steps, world_size=2, nodes=2, pg_timeout=20.0, timeout=30,
                    faults="partition(nodes=(1,), at=step#2, mode=reject)")
    fired = res.fault_events[0].time
    for r in res.ranks:
        assert r.status == "raised" and "Software caused connection abort" in r.message, res.report()
        assert r.end_time - fired < 5, "not the 20 s process-group timeout"


def store_set_under_a_one_way_cut(tmp):
    """Rank 1 (node 1) sets a key after ``step()`` (the cut); rank 0 (node 0) then looks
    whether it arrived."""
    rank, addr, port = int(os.environ["RANK"]), os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    store = dist.TCPStore(addr, port, 2, False, timeout=datetime.timedelta(seconds=1))
    store.set(f"hello{rank}", "1")
    if rank == 0:
        wait_for(f"{tmp}/set")
        arrived = store.check(["during"])
        open(f"{tmp}/checked", "w").close()
        return arrived
    store.get("hello0")
    pytest_ddpfault.step()
    store.set("during", "1")   # c10d's set does not wait for a reply
    open(f"{tmp}/set", "w").close()
    wait_for(f"{tmp}/checked")


@pytest.mark.parametrize("network", ["proxies", pytest.param("namespaces", marks=needs_namespaces)])
@pytest.mark.parametrize("direction, arrives", [("out", False), ("in", True)])
def test_a_one_way_cut_stops_what_leaves_the_set_or_what_comes_to_it(tmp_path, network, direction, arrives):
    # out: nothing from node 1 reaches node 0 (its set is held); in: node 1's set arrives
    res = run_group(store_set_under_a_one_way_cut, str(tmp_path), world_size=2, nodes=2, network=network,
                    timeout=30, faults=f"partition(nodes=(1,), at=step#1, direction={direction})")
    res.assert_all_ok()
    assert res.network == network and res[0].value is arrives


def init_then_reduce():
    start = time.monotonic()
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1.5))
    except Exception as exc:  # what init raises is the point
        return type(exc).__name__, str(exc)[:200], time.monotonic() - start
    dist.destroy_process_group()
    return "ok", "", time.monotonic() - start


@needs_namespaces
@pytest.mark.parametrize("mode, node1_sees", [("reject", "failed to connect"), ("drop", "timed out after 1500ms")])
def test_a_partition_at_init_keeps_node_1_from_the_store_and_node_0_waits_for_it(mode, node1_sees):
    res = run_group(init_then_reduce, world_size=4, nodes=2, timeout=30, faults=f"partition(nodes=(1,), mode={mode})")
    assert res.network == "namespaces" and [e.trigger for e in res.fault_events] == ["init"]
    for rank, (kind, message, took) in enumerate(res.values):
        if rank < 2:   # node 0 reaches the store and waits for node 1's ranks
            assert kind == "DistStoreError" and "wait timeout" in message, message
        else:
            assert kind == "DistNetworkError" and node1_sees in message and "127.0.7.1" in message, message
        assert took < 5, took


def until_refused(tmp):
    """Node 1 connects to the store again and again until the cut refuses it; node 0 waits."""
    if os.environ["RANK"] == "0":
        wait_for(f"{tmp}/refused")
        return None
    end = time.monotonic() + 15
    while True:
        try:
            socket.create_connection((os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])), timeout=1).close()
        except OSError as exc:
            open(f"{tmp}/refused", "w").close()
            return exc.errno
        assert time.monotonic() < end, "never cut"


@needs_namespaces
def test_the_harness_cuts_at_its_time(tmp_path):
    import errno

    res = run_group(until_refused, str(tmp_path), world_size=2, nodes=2, timeout=30,
                    faults="partition(nodes=(1,), mode=reject, at=t=0.3)")
    res.assert_all_ok()
    # refused (a connect racing the cut may be one of the connections it resets)
    assert res[1].value in (errno.EHOSTUNREACH, errno.ECONNABORTED), res[1].value
    assert [(e.trigger, e.time >= 0.3) for e in res.fault_events] == [("t=0.3", True)]
    assert res[1].end_time >= 0.3


def where_and_who():
    return os.stat("/proc/self/ns/net").st_ino, os.stat("/proc/self/ns/user").st_ino, os.getuid()


@needs_namespaces
def test_the_user_namespace_way_unprivileged_users_get_works_as_well(monkeypatch, tmp_path):
    # as root the namespaces need no user namespace; DDPFAULT_NETNS_USERNS=1 takes that way anyway
    monkeypatch.setenv(netns.USERNS_ENV, "1")
    res = run_group(where_and_who, world_size=2, nodes=2, network="namespaces", timeout=30)
    res.assert_all_ok()
    (net0, user0, uid0), (net1, user1, uid1) = res.values
    assert net0 != net1 and user0 == user1 != os.stat("/proc/self/ns/user").st_ino
    assert uid0 == uid1 == 0   # the caller's uid is 0 inside it: caps over the nodes' namespaces
    res = run_group(cut_node_1, str(tmp_path), world_size=2, nodes=2, timeout=30,
                    faults="partition(nodes=(1,), mode=reject, at=step#1, duration=0.5)")
    res.assert_all_ok()   # rank 1 cut it from inside the user namespace; the harness healed it from outside
    assert "No route to host" in res[1].value["connect"][1] and res[1].value["store_after"][0] == "ok"


KILLED_RUN = """
import os, time
import pytest

def wait_forever(path):
    with open(f"{path}.{os.environ['RANK']}.tmp", "w") as f:   # the rank's namespace, then the file
        f.write(str(os.stat("/proc/self/ns/net").st_ino))
    os.rename(f"{path}.{os.environ['RANK']}.tmp", f"{path}.{os.environ['RANK']}")
    time.sleep(600)

@pytest.mark.ddp(world_size=2, nodes=2, fault="partition(nodes=(1,), at=t=300)", timeout=600, allow_unfired=True)
def test_long(ddp):
    ddp.run(wait_forever, os.environ["MARK"])
"""


@needs_namespaces
def test_nothing_outlives_a_sigkilled_pytest(tmp_path):
    (tmp_path / "test_killed.py").write_text(textwrap.dedent(KILLED_RUN))
    mark = tmp_path / "started"
    env = {**os.environ, "MARK": str(mark), "DDPFAULT_NETWORK": "namespaces"}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_once_both_run(proc, mark)   # holders and ranks die with the zygote, which dies with pytest


def kill_once_both_run(proc: subprocess.Popen, mark) -> None:
    """Once both ranks of the pytest ``proc`` wrote their namespace to ``mark.<rank>``:
    SIGKILL it, then wait until nothing is left in those two namespaces."""
    try:
        end = time.monotonic() + 120
        while not all(os.path.exists(f"{mark}.{r}") for r in (0, 1)):  # both ranks run, in their namespaces
            assert proc.poll() is None and time.monotonic() < end, "the run did not start"
            time.sleep(0.05)
        made = {int(open(f"{mark}.{r}").read()) for r in (0, 1)}   # node 0's and node 1's
        assert len(made) == 2 and os.stat("/proc/self/ns/net").st_ino not in made, made
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    wait_gone(made)


ENGINE_TEST = """
import os
import pytest

@pytest.mark.ddp(world_size=2, nodes=2, fault="partition(nodes=(1,), at=t=60)", allow_unfired=True, timeout=30)
def test_it(ddp):
    assert ddp.run(int).network == os.environ["EXPECT_NETWORK"]
"""


@needs_namespaces
def test_the_option_the_ini_key_and_the_env_choose_the_engine(pytester, monkeypatch):
    pytester.makepyfile(test_engine=ENGINE_TEST)
    monkeypatch.setenv("EXPECT_NETWORK", "proxies")
    pytester.runpytest("-p", "no:cacheprovider", "--ddp-network=proxies").assert_outcomes(passed=1)
    monkeypatch.setenv("DDPFAULT_NETWORK", "proxies")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    monkeypatch.delenv("DDPFAULT_NETWORK")
    monkeypatch.setenv("EXPECT_NETWORK", "namespaces")
    pytester.makeini("[pytest]\nddp_network = namespaces\n")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    monkeypatch.setenv("DDPFAULT_NETWORK", "kernel")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert "network 'kernel' from $DDPFAULT_NETWORK: must be one of auto, namespaces, proxies" in str(result.stderr) + \
        str(result.stdout), result.stdout.str()


def test_namespaces_under_a_single_node_torchrun_is_an_error_that_says_why():
    from pytest_ddpfault.api import DDP

    with pytest.raises(SettingsError, match="network='namespaces' under ddp.torchrun needs nnodes > 1"):
        DDP(world_size=2, network="namespaces").torchrun("some_script.py")
    with pytest.raises(SettingsError, match="network 'fast' from DDP"):
        DDP(world_size=2, network="fast")
