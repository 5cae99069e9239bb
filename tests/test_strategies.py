"""Hypothesis strategies of fault plans: validity, shrinking, replay, and real properties."""
import signal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


def test_a_failing_property_prints_a_replayable_plan(pytester):
    pytester.makepyfile(
        """
        import pytest, torch, torch.distributed as dist
        from hypothesis import given, settings, HealthCheck
        from pytest_ddpfault.strategies import fault_plans

        def allreduce_once():
            dist.init_process_group("gloo")
            t = torch.ones(1)
            dist.all_reduce(t)
            dist.destroy_process_group()
            return t.item()

        @settings(max_examples=20, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(plan=fault_plans(2, kinds=["kill_rank"]))
        @pytest.mark.ddp(world_size=2, timeout=10)
        def test_property(ddp, plan):
            ddp.run(allreduce_once, faults=plan).assert_all_ok()
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    # the shrunk counterexample: one kill with defaults, printed as a spec string
    assert "plan='kill_rank'" in out
    # and it replays as printed
    assert Fault.parse("kill_rank") == Fault("kill_rank")
    assert signal.SIGKILL.name in out or "killed" in out


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
