"""Multi-node ``ddp.torchrun`` on the "namespaces" engine (issue 21, DESIGN 5.1): each node's
agent and workers in their node's network namespace, the rendezvous store in node 0's, so a
partition cuts every socket between the nodes (the workers' store, the user's own) and
nothing is left behind."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pytest_ddpfault import netns
from pytest_ddpfault.api import DDP

from _helpers import assert_nothing_left
from test_netns import kill_once_both_run, net_namespaces, wait_gone
from test_torchrun_nodes import FAST

needs_namespaces = pytest.mark.skipif(bool(netns.not_permitted()),
                                      reason=f"no network namespaces here: {netns.not_permitted()}")

# Node 0's worker serves a socket on its node's address and passes the port through the
# workers' store; node 1's worker uses it and the store, then steps (the cut is in place in both
# namespaces before step() returns) and tries again. Each writes what it saw, and its network
# namespace, to OUT/<rank>.json; node 0's worker looks once node 1's has written. The cut resets
# node 1's agent's connection to the rendezvous store too, so that agent may fail and stop its
# worker at its next look at the store: node 1's worker ignores SIGTERM until it has written. Then node 0's worker ends the
# job (exit 3): its agent would otherwise wait in its exit barrier for node 1's (300 s).
WORKER = '''
import datetime, json, os, signal, socket, sys, threading, time
import torch.distributed as dist
import pytest_ddpfault

out_dir = sys.argv[1]
rank, addr, port = int(os.environ["RANK"]), os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])


def attempt(call):
    try:
        call()
    except Exception as exc:
        return type(exc).__name__, str(exc)[:200]
    return "ok", ""


def connect(host, p):
    with socket.create_connection((host, p), timeout=0.5):
        pass


def report(seen):
    with open(os.path.join(out_dir, f"{rank}.json.tmp"), "w") as f:
        json.dump(seen, f)
    os.rename(os.path.join(out_dir, f"{rank}.json.tmp"), os.path.join(out_dir, f"{rank}.json"))


dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=5))
store = dist.TCPStore(addr, port, 2, False, timeout=datetime.timedelta(seconds=1))
seen = {"netns": os.stat("/proc/self/ns/net").st_ino, "userns": os.stat("/proc/self/ns/user").st_ino, "node_addr": os.environ.get("DDPFAULT_NODE_ADDR"),
        "master_addr": addr}
if rank == 0:
    server = socket.create_server((os.environ["DDPFAULT_NODE_ADDR"], 0))
    threading.Thread(target=lambda: [server.accept() for _ in iter(int, 1)], daemon=True).start()
    store.set("user_port", str(server.getsockname()[1]))
    end = time.monotonic() + 20
    while not os.path.exists(os.path.join(out_dir, "1.json")):   # nothing passes between the nodes now
        assert time.monotonic() < end, "node 1 did not report within 20 s"
        time.sleep(0.01)
    seen["store"] = attempt(lambda: (store.set("n0", "x"), store.get("n0")))
    seen["user"] = attempt(lambda: connect(os.environ["DDPFAULT_NODE_ADDR"], server.getsockname()[1]))
    report(seen)
    os._exit(3)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
user_port = int(store.get("user_port"))
seen["user_before"] = attempt(lambda: connect(addr, user_port))
pytest_ddpfault.step()
seen["user"] = attempt(lambda: connect(addr, user_port))
seen["store"] = attempt(lambda: store.set("during", "1"))
report(seen)
os._exit(0)   # the gloo pairs the cut reset: no goodbye over them
'''


@needs_namespaces
@pytest.mark.parametrize("userns", [False, True], ids=["root", "userns"])
def test_a_reject_cuts_node_1s_store_and_user_sockets_and_node_0s_keep_working(tmp_path, monkeypatch, userns):
    if userns:  # the way unprivileged users get (as root: DDPFAULT_NETNS_USERNS=1)
        monkeypatch.setenv(netns.USERNS_ENV, "1")
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    out = tmp_path / "out"
    out.mkdir()
    before = net_namespaces()
    res = DDP(world_size=2, network="namespaces", timeout=60).torchrun(
        script, str(out), nnodes=2, faults="partition(nodes=(1,), at=step#1, mode=reject)", rdzv_conf=FAST)
    assert res.network == "namespaces"
    seen = [json.loads((out / f"{r}.json").read_text()) for r in (0, 1)]
    # each node's worker in a namespace of its own (not this one), on its node's address;
    # the workers' store with rank 0 on node 0
    namespaces = {s["netns"] for s in seen}
    assert len(namespaces) == 2 and os.stat("/proc/self/ns/net").st_ino not in namespaces
    assert [s["node_addr"] for s in seen] == ["127.0.7.1", "127.0.7.2"]
    own_user = os.stat("/proc/self/ns/user").st_ino
    assert [s["userns"] != own_user for s in seen] == [userns, userns]
    assert seen[1]["master_addr"] == "127.0.7.1"
    assert seen[1]["user_before"] == ["ok", ""]
    assert seen[1]["user"] == ["OSError", "[Errno 113] No route to host"]
    assert seen[1]["store"][0] == "DistNetworkError", seen[1]
    assert seen[0]["store"] == ["ok", ""] and seen[0]["user"] == ["ok", ""]
    [event] = res.fault_events
    assert (event.kind, event.trigger, event.node, event.scope) == ("partition", "step#1", 1, (1,))
    # node 0's worker ended the job (node 1's agent, which lost its rendezvous store with the
    # cut, ends first or after its worker, as their clocks fall)
    assert [(w.node, w.rank) for w in res.workers] == [(0, 0), (1, 1)] and res.workers[0].exit_code == 3, \
        [(w.node, w.status, w.exit_code, w.signal, w.note) for w in res.workers]
    assert_nothing_left(res)
    wait_gone(namespaces - before)


WAITING_WORKER = '''
import os, sys, time
import torch.distributed as dist

with open(f"{sys.argv[1]}.{os.environ['RANK']}.tmp", "w") as f:   # the worker's namespace, then the file
    f.write(str(os.stat("/proc/self/ns/net").st_ino))
os.rename(f"{sys.argv[1]}.{os.environ['RANK']}.tmp", f"{sys.argv[1]}.{os.environ['RANK']}")
time.sleep(600)
'''

KILLED_RUN = '''
import os
import pytest

@pytest.mark.ddp(world_size=2, nodes=2, fault="partition(nodes=(1,), at=t=300)", timeout=600, allow_unfired=True)
def test_long(ddp):
    ddp.torchrun(os.environ["WORKER"], os.environ["MARK"], nnodes=2, rdzv_conf={"join_timeout": 20})
'''


@needs_namespaces
def test_nothing_outlives_a_sigkilled_pytest(tmp_path):
    """Holder, node children, rendezvous store, agents and workers all die with pytest."""
    (tmp_path / "test_killed.py").write_text(textwrap.dedent(KILLED_RUN))
    (tmp_path / "waiting.py").write_text(textwrap.dedent(WAITING_WORKER))
    mark = tmp_path / "started"
    env = {**os.environ, "MARK": str(mark), "WORKER": str(tmp_path / "waiting.py"), "DDPFAULT_NETWORK": "namespaces"}
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_once_both_run(proc, mark)
