"""Hypothesis strategies of fault plans: validity, shrinking, replay, and real properties."""
import re
import signal
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pytest_ddpfault
import pytest_ddpfault.strategies as strategies
from pytest_ddpfault import Fault
from pytest_ddpfault.faults import KINDS, parse_plan, validate_plan
from pytest_ddpfault.strategies import fault_plans, faults, triggers

from _workloads import ddp_training

# find() draws the same examples each run: a shrink that stops short is then not a flake
SAME_EACH_RUN = settings(derandomize=True, database=None)

RANK_KINDS = ["kill_rank", "crash_rank", "hang_rank", "delay"]


def test_public_names_are_pinned():
    assert sorted(strategies.__all__) == ["FaultPlan", "fault_plans", "faults", "triggers"]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), world_size=st.integers(1, 8))
def test_every_plan_is_valid_and_replays_from_its_repr(data, world_size):
    plan = data.draw(fault_plans(world_size, max_faults=3))
    assert len(plan) <= 3
    for f in plan:
        f.validate(world_size)
    # what a falsifying example prints pastes into @pytest.mark.ddp(fault=...)
    spec = eval(repr(plan))
    assert isinstance(spec, str)
    assert parse_plan(spec) == tuple(plan)


def test_every_kind_is_reachable():
    seen = set()

    @settings(max_examples=400, deadline=None, database=None)
    @given(fault_plans(4))
    def collect(plan):
        seen.update(f.kind for f in plan)

    collect()
    assert seen == set(KINDS)


def test_triggers_cover_every_form():
    seen = set()

    @settings(max_examples=200, deadline=None, database=None)
    @given(triggers(ops=["all_reduce", "collective"]))
    def collect(t):
        seen.add(t.kind)

    collect()
    assert seen == {"op", "step", "init", "time"}


def test_shrinks_to_no_fault_when_any_plan_fails():
    from hypothesis import find

    assert find(fault_plans(4, max_faults=3), lambda p: True, settings=SAME_EACH_RUN) == ()


def test_shrinks_toward_low_rank_and_default_params():
    from hypothesis import find

    plan = find(fault_plans(4, kinds=["kill_rank"]), lambda p: any(f.resolved_rank(4) < 3 for f in p),
                settings=SAME_EACH_RUN)
    assert plan == (Fault("kill_rank", rank=0),)
    plan = find(fault_plans(4, kinds=["kill_rank"]), lambda p: any(f.get("signal") != "SIGKILL" for f in p),
                settings=SAME_EACH_RUN)
    assert len(plan) == 1 and plan[0].at is None and plan[0].rank is None


def test_shrinks_toward_later_triggers():
    from hypothesis import find

    t = find(triggers(ops=["all_reduce"], forms=("op",)), lambda t: True, settings=SAME_EACH_RUN)
    assert str(t) == "all_reduce#5"


def test_bad_arguments_say_what_is_allowed():
    with pytest.raises(ValueError, match="unknown kind 'kil_rank'; allowed: .*kill_rank"):
        fault_plans(2, kinds=["kil_rank"])
    with pytest.raises(ValueError, match="world_size"):
        fault_plans(0)
    with pytest.raises(ValueError, match="unknown op 'allreduce'"):
        triggers(ops=["allreduce"])
    with pytest.raises(ValueError, match="unknown kind"):
        faults("nope", 2)


# -- properties over real groups ------------------------------------------------------

@settings(max_examples=6, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=fault_plans(3, kinds=RANK_KINDS, triggers=triggers(ops=["collective", "all_reduce"],
                                                                 forms=("op", "step"), max_call=4)))
@pytest.mark.ddp(world_size=3, timeout=15)
def test_training_finishes_or_fails_cleanly_under_any_rank_fault(ddp, plan):
    res = ddp.run(ddp_training, 4, 1.0, faults=plan)
    # the property a user writes: nobody hangs past the harness (frozen ranks aside),
    # and every survivor either finished or raised
    for r in res.survivors:
        assert r.status in ("ok", "raised"), res.summary()
    if not plan:
        res.assert_all_ok()


# The head of a test file a pytester test writes: a property's imports and a one-all_reduce run
PROPERTY_FILE = """
import pytest, torch, torch.distributed as dist
from hypothesis import given, settings, HealthCheck
from pytest_ddpfault.strategies import fault_plans, triggers

def allreduce_once():
    dist.init_process_group("gloo")
    t = torch.ones(1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()
"""


def test_a_failing_property_prints_a_replayable_plan(pytester):
    pytester.makepyfile(PROPERTY_FILE + textwrap.dedent("""

        @settings(max_examples=20, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(plan=fault_plans(2, kinds=["kill_rank"]))
        @pytest.mark.ddp(world_size=2, timeout=10, allow_unfired=True)  # drawn triggers may not come
        def test_property(ddp, plan):
            ddp.run(allreduce_once, faults=plan).assert_all_ok()
        """))
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    # the shrunk counterexample: one kill with defaults, printed as a spec string
    assert "plan='kill_rank'" in out
    # and it replays as printed
    assert Fault.parse("kill_rank") == Fault("kill_rank")
    assert signal.SIGKILL.name in out or "killed" in out


def test_a_failing_propertys_report_shows_the_falsifying_examples_final_run_only(pytester):
    pytester.makepyfile(PROPERTY_FILE + textwrap.dedent("""

        @settings(max_examples=12, deadline=None, database=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(plan=fault_plans(2, kinds=["kill_rank", "delay"],
                                triggers=triggers(ops=["all_reduce"], forms=("op",), max_call=1)))
        @pytest.mark.ddp(world_size=2, timeout=10)
        def test_property(ddp, plan):
            res = ddp.run(allreduce_once, faults=plan)
            assert res.ok, "not every rank returned"
        """))
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    # many runs, some of them failing with other plans, before the shrunk one
    assert "plan='kill_rank'" in out
    sections = re.findall(r"-{3,} (ddp ranks[^\n]*?) -{3,}", out)
    assert sections == ["ddp ranks (falsifying example)"], sections
    section = out.split("ddp ranks (falsifying example)", 1)[1]
    assert re.findall(r"fault plan: .*", out) == ["fault plan: kill_rank"]
    assert "died of SIGKILL" in section and " of 1" not in out


def test_every_param_of_every_kind_declares_what_fuzzing_draws():
    # a new kind's param without Fuzz would otherwise never be fuzzed, silently
    from pytest_ddpfault.faults import KINDS

    for name, kind in KINDS.items():
        for p in kind.params:
            if p.name not in ("rank", "node", "ranks", "nodes", "at"):  # drawn from the group
                assert p.fuzz is not None, f"{name}.{p.name} declares no Fuzz"
        faults(name, 3)  # builds without error


def test_plans_shrink_toward_the_simplest_kind():
    from hypothesis import find

    plan = find(fault_plans(3, max_faults=1), lambda p: len(p) == 1, settings=SAME_EACH_RUN)
    assert plan[0].kind == "kill_rank"


def test_scoped_network_faults_are_drawn_and_valid():
    from pytest_ddpfault.faults.network import scope_of

    seen = set()

    @settings(max_examples=300, deadline=None, database=None)
    @given(fault_plans(4, kinds=["partition", "latency"], nodes=2))
    def collect(plan):
        validate_plan(plan, 4, nodes=2)
        for f in plan:
            scope = scope_of(f)
            seen.add(scope[0] if scope else "store")
            if scope:  # a cut has two sides
                assert 0 < len(f.definition.scope_ranks(f, 4, 2)) < 4

    collect()
    assert seen == {"ranks", "nodes", "store"}


# -- where faults land: ranks=, target_nodes=, reachable= -------------------------------

def _rank_kinds_and_storage():
    return [*RANK_KINDS, "torn_save", "io_error", "slow_io"]


def _clean_result(world_size=2, nodes=1, saves_in=(0,), steps=3, collectives=2, duration=1.0):
    """A clean run's result as the harness builds it: per-rank op log and step marks."""
    from pytest_ddpfault.results import GroupResult, OpRecord, RankResult, StepMark

    ranks = []
    for r in range(world_size):
        ops = [OpRecord("init", 1, "", 0, 0.01, 0.02)]
        for i in range(1, collectives + 1):
            ops += [OpRecord("all_reduce", i, "default", 4, 0.1 * i, 0.1 * i + 0.01),
                    OpRecord("barrier", i, "default", 0, 0.1 * i + 0.02, 0.1 * i + 0.03)]
        if r in saves_in:
            ops.append(OpRecord("save", 1, "", 0, 0.5, 0.6))
        ranks.append(RankResult(rank=r, status="ok", value=1, duration=duration, end_time=duration + 0.05,
                                ops=ops, steps=[StepMark(i, 0.1 * i) for i in range(1, steps + 1)],
                                node=r // (world_size // nodes)))
    return GroupResult(ranks, duration=duration + 0.1)


def _draw_all(strategy, n=300):
    seen = []

    @settings(max_examples=n, deadline=None, database=None)
    @given(strategy)
    def collect(plan):
        seen.append(plan)

    collect()
    return seen


def test_reachable_draws_only_triggers_the_clean_run_reached():
    clean = _clean_result(world_size=3, saves_in=(0,), steps=3, collectives=2, duration=1.0)
    counts = {"collective": 4, "all_reduce": 2, "barrier": 2, "step": 3, "init": 1, "save": 1, "load": 0}
    plans = _draw_all(fault_plans(3, kinds=_rank_kinds_and_storage(), reachable=clean))
    forms = set()
    for plan in plans:
        for f in plan:
            at, rank = f.resolved_at(), f.resolved_rank(3)
            forms.add(at.kind)
            if at.kind == "time":
                assert 0 < at.seconds <= 0.25      # a quarter of the rank's 1.0 s
            elif at.kind == "op":
                assert at.n <= counts[at.op], f
            elif at.kind != "init":
                assert at.n <= counts[at.kind], f
            if at.kind == "save":
                assert rank == 0, f                # only rank 0 saved
    assert forms == {"op", "step", "init", "time", "save"}
    # a loop that never saves: the storage kinds are left out, unless asked for by name
    never_saves = _clean_result(saves_in=())
    assert not {f.kind for p in _draw_all(fault_plans(2, reachable=never_saves), 200) for f in p} \
        & {"torn_save", "io_error", "slow_io"}
    with pytest.raises(ValueError, match=r"torn_save: the reachable= run made no call it fires on \(save\)"):
        fault_plans(2, kinds=["torn_save"], reachable=never_saves)


def test_ranks_and_target_nodes_restrict_where_faults_land():
    for plan in _draw_all(fault_plans(4, kinds=RANK_KINDS, ranks=(1, 2)), 200):
        assert all(f.resolved_rank(4) in (1, 2) for f in plan), plan
    for plan in _draw_all(fault_plans(6, kinds=["kill_rank", "kill_node", "partition"], nodes=3,
                                      target_nodes=(1,)), 300):
        for f in plan:
            hit = f.definition.target_ranks(f, 6, 3) | f.definition.scope_ranks(f, 6, 3)
            assert hit and hit <= {2, 3}, plan  # node 1 = ranks 2, 3
    # storage kinds: the default rank 0 is outside ranks=(1,), so the rank is given
    clean = _clean_result(saves_in=(0, 1))
    plans = [p for p in _draw_all(fault_plans(2, kinds=["torn_save"], ranks=(1,), reachable=clean), 50) if p]
    assert plans and all(str(f) .startswith("torn_save(rank=1") for p in plans for f in p)


def test_reachable_plans_shrink_simplest_first():
    from hypothesis import find

    clean = _clean_result(world_size=3)
    strategy = fault_plans(3, kinds=_rank_kinds_and_storage(), max_faults=2, reachable=clean)
    assert find(strategy, lambda p: True, settings=SAME_EACH_RUN) == ()
    # one fault: the simplest kind, its default rank and trigger (collective#1 was reached)
    assert find(strategy, lambda p: len(p) >= 1, settings=SAME_EACH_RUN) == (Fault("kill_rank"),)
    # a lower rank, then the latest trigger of the simplest form
    plan = find(strategy, lambda p: any(f.resolved_rank(3) == 1 and f.at is not None for f in p),
                settings=SAME_EACH_RUN)
    assert plan == (Fault("kill_rank", rank=1, at="collective#4"),)


def test_bad_restrictions_and_reachable_runs_say_what_is_wrong():
    clean = _clean_result()
    with pytest.raises(ValueError, match=r"ranks=\(2,\)\): 2 is not a rank of the group; allowed: ranks 0..1"):
        fault_plans(2, ranks=(2,))
    with pytest.raises(ValueError, match="name at least one rank"):
        fault_plans(2, ranks=())
    with pytest.raises(ValueError, match=r"target_nodes=\(3,\)\): 3 is not a node .* nodes 0..1"):
        fault_plans(4, nodes=2, target_nodes=(3,))
    with pytest.raises(ValueError, match="no rank is in both"):
        fault_plans(4, nodes=2, ranks=(0,), target_nodes=(1,))
    with pytest.raises(ValueError, match="that run had 2 ranks, not world_size=3"):
        fault_plans(3, reachable=clean)
    with pytest.raises(ValueError, match="expected the GroupResult of a clean ddp.run"):
        fault_plans(2, reachable=[clean])
    with pytest.raises(ValueError, match="the reachable= run had 1 node"):
        fault_plans(2, nodes=2, reachable=clean)
    failed = _clean_result()
    failed.ranks[1].status = "raised"
    failed.ranks[1].exc_type, failed.ranks[1].message = "RuntimeError", "boom"
    with pytest.raises(ValueError, match="did not succeed \\(rank 1 raised: RuntimeError: boom\\)"):
        fault_plans(2, reachable=failed)
    faulty = _clean_result()
    faulty.plan = "delay(rank=0)"
    with pytest.raises(ValueError, match=r"that run had faults \('delay\(rank=0\)'\).*faults=None"):
        fault_plans(2, reachable=faulty)
    unlogged = _clean_result(steps=0, collectives=0, saves_in=())
    for r in unlogged:
        r.ops = []
    with pytest.raises(ValueError, match="logged no call in any rank"):
        fault_plans(2, reachable=unlogged)
    with pytest.raises(ValueError, match="unknown op 'allreduce'"):
        fault_plans(2, ops=["allreduce"], reachable=clean)
    with pytest.raises(ValueError, match="kill_node: no node has all its ranks among the targets"):
        fault_plans(2, kinds=["kill_node"], ranks=(1,))


def checkpointing_loop(directory):
    """3 steps, an all_reduce and a barrier each, rank 0 saves at step 2; a little compute
    per step, so that the clean run lasts long enough for t= triggers to be drawn."""
    import os
    import time

    import torch
    import torch.distributed as dist

    import pytest_ddpfault
    from _workloads import SHORT_PG, init_group

    init_group(SHORT_PG)
    t = torch.ones(1)
    for step in range(1, 4):
        pytest_ddpfault.step()
        time.sleep(0.1)   # the step's compute: not a synchronisation
        dist.all_reduce(t)
        if step == 2 and dist.get_rank() == 0:
            torch.save(t, os.path.join(directory, f"ck{step}.pt"))
        dist.barrier()
    dist.destroy_process_group()
    return t.item()


@pytest.fixture(scope="module")
def clean_loop(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("clean"))
    res = pytest_ddpfault.run_group(checkpointing_loop, directory, world_size=2, timeout=30)
    res.assert_all_ok()
    return res


FIRED_KINDS = []


@settings(max_examples=40, deadline=None, database=None, derandomize=True,   # the same forty each time
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.ddp(world_size=2, timeout=20)
def test_forty_plans_drawn_with_reachable_all_fire(ddp, clean_loop, data, tmp_path_factory):
    plan = data.draw(fault_plans(2, kinds=_rank_kinds_and_storage(), reachable=clean_loop), label="plan")
    res = ddp.run(checkpointing_loop, str(tmp_path_factory.mktemp("ck")), faults=plan)
    assert not res.unfired, res.report()
    assert len(res.fault_events) >= len(plan), res.report()
    FIRED_KINDS.extend(ev.trigger.split("#")[0].split("=")[0] for ev in res.fault_events)


def test_the_forty_plans_covered_every_trigger_form():
    # runs after the property (file order): the draws were not all of one easy form
    if not FIRED_KINDS:
        pytest.skip("the property did not run in this session")
    assert {"step", "save", "init"} <= set(FIRED_KINDS), FIRED_KINDS
