"""Multi-node ddp.torchrun: one real torchrun agent per virtual node, a machine lost mid-training.

Two nodes of one worker each train ``examples/torchrun/train.py`` (a checkpoint every step),
with a c10d rendezvous endpoint the harness owns and short rendezvous timeouts
(``FAST``). ``kill_node`` fires in node 1's worker at step 3 and the launcher SIGKILLs
node 1's agent and worker together:

- ``min_nodes=1``: node 0's agent restarts its worker, re-rendezvouses alone once node 1's
  heartbeats have lapsed, and the job finishes from the step-2 checkpoint with the weights
  of an unfaulted run that goes on with one node from there;
- ``min_nodes=2``: the re-rendezvous waits for a second node until ``join_timeout`` and the
  job fails, naming node 1 as lost;
- the agent alone (``agent_only=true``): nothing in torch notices. The workers finish, and
  node 0's agent then waits in its exit barrier for the dead agent (300 s in torch).
"""
from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from pytest_ddpfault import SettingsError, netns, run_group
from pytest_ddpfault.api import DDP
from pytest_ddpfault.faults import FaultSpecError
from pytest_ddpfault.launchers.rendezvous import parse_rdzv_conf
from pytest_ddpfault.launchers.torchrun import TorchrunResult, agent_failure, run_script, run_torchrun
from pytest_ddpfault.rank.env_plan import EnvPlanError, validate_env_plan

from _helpers import assert_nothing_left, children_of, poll

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "torchrun" / "train.py"
STEPS = 6
LOSE_NODE_1 = "kill_node(node=1, at=step#3)"
# Node 1's heartbeats lapse after 1 s x 2, the survivors' round closes 1 s after min_nodes
# joined (torch's defaults: 5 s x 3 and 30 s; see README, "Losing a machine").
FAST = {"join_timeout": 20, "last_call_timeout": 1, "keep_alive_interval": 1, "keep_alive_max_attempt": 2}
RUN_TIMEOUT = 60.0   # a bound, not the expected time (10-20 s a run here)


def train_args(d: Path, steps: int = STEPS) -> tuple:
    return "--ckpt-dir", str(d / "ck"), "--out", str(d / "weights.json"), "--steps", str(steps), "--ckpt-every", "1"


@pytest.fixture
def no_launcher_left():
    """Every process the test's launched run started here (agents, the rendezvous store) is gone after it."""
    before = set(children_of(os.getpid()))
    yield
    poll(lambda: set(children_of(os.getpid())) <= before, 2.0)
    assert set(children_of(os.getpid())) <= before, f"left behind: {set(children_of(os.getpid())) - before}"


def weights(d: Path) -> dict:
    return json.loads((d / "weights.json").read_text())


def train_in_rank(script: str, argv: tuple) -> None:
    """The script's training loop in a rank of ``run_group`` (init=True): same model, data and math."""
    import importlib.util
    import os

    import torch.distributed as dist

    spec = importlib.util.spec_from_file_location("nodes_train", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.parse_args(list(argv))
    os.makedirs(args.ckpt_dir, exist_ok=True)
    module.train(args, dist.get_rank(), dist.get_world_size())


@pytest.fixture(scope="module")
def one_node_from_step_2(tmp_path_factory):
    """The unfaulted reference: two ranks train steps 1-2 and checkpoint, then one rank
    (node 0's data) goes on from that checkpoint to the end."""
    d = tmp_path_factory.mktemp("reference")
    run_group(train_in_rank, str(TRAIN), train_args(d, steps=2), world_size=2, init=True,
              timeout=RUN_TIMEOUT).assert_all_ok()
    run_group(train_in_rank, str(TRAIN), train_args(d), world_size=1, init=True, timeout=RUN_TIMEOUT).assert_all_ok()
    out = weights(d)
    assert out["resumed_from"] == 2
    return out["weights"]


def fired(res: TorchrunResult) -> list[tuple]:
    return [(e.kind, e.rank, e.node, e.trigger, e.attempt) for e in res.fault_events]


@pytest.mark.ddp(world_size=2, timeout=RUN_TIMEOUT)
def test_a_lost_node_and_the_other_finishes_alone_from_its_checkpoint(ddp, tmp_path, one_node_from_step_2,
                                                                     no_launcher_left):
    res = ddp.torchrun(TRAIN, *train_args(tmp_path), nnodes=2, min_nodes=1, max_restarts=1,
                       faults=LOSE_NODE_1, rdzv_conf=FAST)

    res.assert_ok()
    assert fired(res) == [("kill_node", 1, 1, "step#3", 0)]
    assert res.lost_nodes == [1]
    assert (res.node(1).signal, res.node(1).restarts) == (signal.SIGKILL, 0)
    assert (res.node(0).exit_code, res.node(0).restarts) == (0, 1)
    assert [(w.node, w.rank, w.status) for w in res.attempt(0)] == [(0, 0, "raised"), (1, 1, "killed")]
    assert res.attempt(0)[1].detail() == f"died of SIGKILL: by the plan: {LOSE_NODE_1}"  # as kill_rank's say
    assert [(w.node, w.rank, w.status) for w in res.final] == [(0, 0, "ok")]   # alone: world size 1
    out = weights(tmp_path)
    assert (out["attempt"], out["resumed_from"]) == (1, 2)
    assert out["weights"] == one_node_from_step_2
    assert "1     127.0.7.2" in res.summary()   # the node table
    assert_nothing_left(res)


@pytest.mark.ddp(world_size=2, timeout=RUN_TIMEOUT)
def test_with_min_nodes_2_the_job_fails_and_names_the_lost_node(ddp, tmp_path):
    res = ddp.torchrun(TRAIN, *train_args(tmp_path), nnodes=2, min_nodes=2, max_restarts=1,
                       faults=LOSE_NODE_1, rdzv_conf={**FAST, "join_timeout": 8})

    assert not res.ok and not res.timed_out
    assert res.exit_code == 1   # node 0's agent: its re-rendezvous never found a second node
    assert res.lost_nodes == [1] and res.node(1).signal == signal.SIGKILL
    assert "RendezvousTimeoutError" in res.node(0).stderr
    # the node table says why the agent failed, from its own output (its workers' lines, teed into
    # it with a "[default0]:" prefix, end in their own RuntimeError)
    assert res.node(0).reason == "RendezvousTimeoutError"
    assert re.search(r"^0 +127\.0\.7\.1 +\d+ +agent exit code 1: RendezvousTimeoutError$", res.summary(), re.M), \
        res.summary()
    assert "(lost: node 1)" in res.describe_end()
    with pytest.raises(AssertionError, match=r"exit code 1 \(lost: node 1\)"):
        res.assert_ok()
    assert_nothing_left(res)


@pytest.mark.ddp(world_size=2, timeout=20)
def test_an_agent_lost_alone_goes_unnoticed_until_the_exit_barrier(ddp, tmp_path, no_launcher_left):
    """Its worker, orphaned, trains on with the others; node 0's agent, done, waits in
    ``_exit_barrier`` for an agent that will never come (torch: 300 s), here until the deadline."""
    res = ddp.torchrun(TRAIN, *train_args(tmp_path), nnodes=2, max_restarts=1,
                       faults="kill_node(node=1, at=step#3, agent_only=true)", rdzv_conf=FAST)

    assert res.timed_out and res.lost_nodes == [1]
    assert res.node(1).signal == signal.SIGKILL
    assert [(w.node, w.status) for w in res.workers] == [(0, "ok"), (1, "ok")]   # one attempt, finished
    assert weights(tmp_path)["resumed_from"] == 0
    assert res.node(0).timed_out and "_exit_barrier" in res.node(0).stack
    assert_nothing_left(res)


@pytest.mark.parametrize("kwargs, match", [
    ({"nnodes": 0}, "nnodes must be a whole number >= 1"),
    ({"nnodes": True}, "nnodes must be a whole number >= 1"),
    ({"nnodes": 2, "min_nodes": 3}, "min_nodes must be a whole number from 1 to nnodes=2"),
    ({"nnodes": 2, "min_nodes": 0}, "min_nodes must be a whole number from 1 to nnodes=2"),
    ({"nnodes": 2, "rdzv_conf": "last_call_timeout"}, "is not key=value"),
    ({"nnodes": 2, "rdzv_conf": {"last_call": 1}}, "unknown key 'last_call'; allowed: join_timeout"),
    ({"nnodes": 2, "rdzv_conf": "join_timeout=1.5"}, r"join_timeout='1.5': must be a whole number >= 1"),
    ({"nnodes": 2, "rdzv_conf": {"is_host": True}}, "the harness hosts the rendezvous store"),
    ({"nnodes": 2, "rdzv_conf": 3}, "rdzv_conf must be a dict or"),
])
def test_bad_node_arguments_fail_before_anything_starts(kwargs, match):
    with pytest.raises(SettingsError, match=match):  # the documented class of a bad argument
        run_torchrun(TRAIN, nproc=1, timeout=5, **kwargs)


@pytest.mark.ddp(world_size=4)
def test_ddp_torchrun_checks_nproc_against_the_world_size(ddp):
    with pytest.raises(SettingsError, match="nnodes=3 does not divide world_size=4"):
        ddp.torchrun(TRAIN, nnodes=3)
    with pytest.raises(SettingsError, match="make 6 workers, not world_size=4"):
        ddp.torchrun(TRAIN, nnodes=2, nproc=3)


def test_a_node_fault_needs_a_multi_node_launcher():
    """Without agents to signal, nothing completes a node fault: refused up front, and in
    the environment of a plain script."""
    with pytest.raises(EnvPlanError, match=r"kill_node is applied by the ddp.run harness or a multi-node "
                                           r"ddp.torchrun \(nnodes > 1\)"):
        run_torchrun(TRAIN, nproc=2, faults=LOSE_NODE_1, timeout=5)
    with pytest.raises(EnvPlanError, match="kill_node is applied by"):
        run_script(TRAIN, faults=LOSE_NODE_1, timeout=5)
    with pytest.raises(FaultSpecError, match="node 2 is outside the group"):
        run_torchrun(TRAIN, nproc=1, nnodes=2, faults="kill_node(node=2)", timeout=5)
    # past 9 agents torchrun's order (addresses as text) is not node order: group rank 1 would
    # be the agent at 127.0.7.10, and node 9 would be signalled instead of node 1
    with pytest.raises(EnvPlanError, match=r"kill_node under ddp.torchrun works with up to 9 nodes, got nnodes=10"):
        run_torchrun(TRAIN, nproc=1, nnodes=10, faults=LOSE_NODE_1, timeout=5)
    # a scoped network fault finds its links by address, not by group rank: not limited
    assert validate_env_plan("partition(nodes=(1,), at=step#3)", 10, nodes=10)


def test_an_agent_only_kill_is_refused_where_there_is_no_agent():
    with pytest.raises(FaultSpecError, match="agent_only=true needs torchrun agents"):
        DDP(world_size=2, nodes=2, faults="kill_node(node=1, agent_only=true)")


CHILD_FAILED = """\
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1032, in <module>
    main()
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
train.py FAILED
------------------------------------------------------------
"""


@pytest.mark.parametrize("output, reason", [
    ("[default0]:Traceback (most recent call last):\n[default0]:RuntimeError: a worker's own\n", ""),
    ("[default0]:RuntimeError: a worker's own\n" + CHILD_FAILED, "ChildFailedError: train.py FAILED"),
    ("Traceback (most recent call last):\n  File \"a.py\", line 1, in f\nKeyError: 'x'\n\nDuring handling of the "
     "above exception, another exception occurred:\n\nTraceback (most recent call last):\n  File \"a.py\", line 3\n"
     "    raise RendezvousTimeoutError\ntorch.distributed.elastic.rendezvous.api.RendezvousTimeoutError\n",
     "RendezvousTimeoutError"),
    ("Traceback (most recent call last):\n  File \"a.py\", line 1\nValueError: " + "x" * 200 + "\n", "ValueError: " + "x" * 85 + "..."),
    ("", ""),
])
def test_an_agents_failure_is_its_last_own_exception(output, reason):
    assert agent_failure(output) == reason


def test_rdzv_conf_forms():
    assert parse_rdzv_conf("last_call_timeout=1, join_timeout=30") == {"last_call_timeout": 1, "join_timeout": 30}
    assert parse_rdzv_conf({"keep_alive_interval": "2"}) == {"keep_alive_interval": 2}
    assert parse_rdzv_conf(None) == parse_rdzv_conf("") == {}


@pytest.mark.ddp(world_size=2, timeout=30)
def test_a_partition_between_the_nodes(ddp, tmp_path, one_node_from_step_2, no_launcher_left):
    """Node 1 cut off at step 3, workers and agent alike: both workers time out (2 s), node 0's
    agent re-rendezvouses alone once node 1's heartbeats lapse and finishes from the step-2
    checkpoint; node 1's agent, whose rendezvous store calls get no answer, stays blocked in
    them (``read_timeout`` does not end them) until the harness deadline."""
    res = ddp.torchrun(TRAIN, *train_args(tmp_path), "--pg-timeout", "2", nnodes=2, min_nodes=1, max_restarts=1,
                       faults="partition(nodes=(1,), at=step#3)", rdzv_conf=FAST)

    # auto: node namespaces where the machine permits them (a partition between whole nodes)
    assert res.network == ("proxies" if netns.not_permitted() else "namespaces")
    [event] = res.fault_events
    assert (event.kind, event.trigger, event.node, event.scope, event.attempt) == ("partition", "step#3", 1, (1,), 0)
    assert [(w.node, w.status) for w in res.attempt(0)] == [(0, "raised"), (1, "raised")]
    assert all("Timed out" in w.message for w in res.attempt(0))
    assert [(w.node, w.status) for w in res.final] == [(0, "ok")]
    assert (res.node(0).exit_code, res.node(0).restarts) == (0, 1)
    out = weights(tmp_path)
    assert (out["attempt"], out["resumed_from"]) == (1, 2)
    assert out["weights"] == one_node_from_step_2
    assert res.timed_out and res.node(1).timed_out
    assert "c10d_rendezvous_backend" in res.node(1).stack
    assert_nothing_left(res)


def test_scoped_network_faults_need_a_scope_under_torchrun():
    with pytest.raises(EnvPlanError, match=r"latency without ranks= or nodes= acts on the store's path"):
        run_torchrun(TRAIN, nproc=1, nnodes=2, faults="latency(latency=10)", timeout=5)
