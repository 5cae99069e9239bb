"""misconfig: a rank (or a node's ranks) started with a wrong WORLD_SIZE, MASTER_ADDR or
MASTER_PORT, the other cause the DDP init-timeout reports give; what torch really does."""
from __future__ import annotations

import datetime
import os
import re

import pytest
import torch
import torch.distributed as dist

from pytest_ddpfault import Fault, run_group
from pytest_ddpfault.faults import FaultSpecError, parse_plan, validate_plan
from pytest_ddpfault.links import node_address
from pytest_ddpfault.rank.env_plan import EnvPlanError, validate_env_plan

PG = 0.5


def init_then_all_reduce(pg_timeout=PG):
    """What init and one all_reduce did, and the environment the rank was given."""
    env = {k: os.environ[k] for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))
        t = torch.ones(1)
        dist.all_reduce(t)
    except Exception as exc:  # what torch raises, and where, is the point
        return type(exc).__name__, str(exc).splitlines()[0], env
    return "ok", t.item(), env


def test_a_wrong_master_addr_fails_that_rank_to_connect_and_the_others_wait_for_its_key():
    res = run_group(init_then_all_reduce, world_size=3, timeout=30, faults="misconfig(rank=1, master_addr=127.0.9.9)")
    res.assert_all_ok()  # every rank returned what it met
    kind, message, env = res[1].value
    assert env["MASTER_ADDR"] == "127.0.9.9" and res[0].value[2]["MASTER_ADDR"] == "127.0.0.1"
    assert kind == "DistNetworkError" and "trying to connect to (127.0.9.9" in message
    for rank in (0, 2):   # they wait in the store for rank 1's key until their timeout
        assert res[rank].value[0] == "DistStoreError" and "wait timeout" in res[rank].value[1], res.report()
    assert [e.kind for e in res.fault_events] == ["misconfig"] and res.faulted_ranks == {1}
    assert "rank 1 started with MASTER_ADDR=127.0.9.9" in res.summary()


def test_a_wrong_master_port_on_a_node_fails_its_ranks_to_connect():
    res = run_group(init_then_all_reduce, world_size=4, nodes=2, timeout=30, faults="misconfig(node=1, master_port=1)")
    res.assert_all_ok()
    for rank in (2, 3):
        kind, message, env = res[rank].value
        assert env["MASTER_PORT"] == "1"
        assert kind == "DistNetworkError" and f"({node_address(0)}, 1)" in message, res.report()
    for rank in (0, 1):
        assert res[rank].value[0] == "DistStoreError", res.report()
    assert res.faulted_ranks == {2, 3}


def test_a_smaller_world_size_times_out_in_gloo_not_in_the_store():
    """Rank 1 believes the group has 2 ranks: the store rendezvous passes (its keys exist),
    then gloo's pairs never match: a timeout in the first collective or in connectFullMesh."""
    res = run_group(init_then_all_reduce, world_size=3, timeout=30, faults="misconfig(rank=1, world_size=2)")
    res.assert_all_ok()
    assert res[1].value[2]["WORLD_SIZE"] == "2" and res[0].value[2]["WORLD_SIZE"] == "3"
    for r in res:  # which ones fail in connectFullMesh and which in the all_reduce depends on timing
        assert r.value[0] == "RuntimeError" and re.search("Timed out waiting|connectFullMesh", r.value[1]), res.report()


@pytest.mark.parametrize("spec, error", [
    ("misconfig(world_size=3, master_port=2)", "give one of world_size=, master_addr=, master_port= .got world_size, master_port"),
    ("misconfig(master_addr=10.0.0.1)", "inside 127.0.0.0/8"),
    ("misconfig(rank=1, node=1, master_port=1)", "rank= or node=, not both"),
    ("misconfig(at=init, world_size=3)", "takes no at"),
    ("misconfig(world_size=4)", "the group's own"),
    ("misconfig(node=1, master_port=1)", "add nodes=N to the marker"),
])
def test_bad_misconfig_specs_say_what_is_allowed(spec, error):
    with pytest.raises(FaultSpecError, match=error):
        validate_plan(parse_plan(spec), 4, 1)


def test_misconfig_specs_round_trip_and_are_the_harness_s_not_torchrun_s():
    assert str(Fault.parse("misconfig")) == "misconfig"   # MASTER_ADDR=127.0.9.9 in the last rank
    for spec in ("misconfig(world_size=3)", "misconfig(node=1, master_addr=127.0.9.9)", "misconfig(rank=0, master_port=1)"):
        assert str(Fault.parse(spec)) == spec
    with pytest.raises(EnvPlanError):
        validate_env_plan("misconfig(world_size=3)", 2)
