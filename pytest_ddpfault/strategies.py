"""Hypothesis strategies of fault plans, for property-based fault fuzzing.

    from hypothesis import given, settings, HealthCheck
    from pytest_ddpfault.strategies import fault_plans

    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
    @given(plan=fault_plans(world_size=3, kinds=["kill_rank", "delay"]))
    @pytest.mark.ddp(world_size=3, timeout=20)
    def test_training_never_hangs(ddp, plan):
        res = ddp.run(train, faults=plan)
        assert not res.hung

A plan prints as its spec string, so a falsifying example pastes straight into
``@pytest.mark.ddp(fault=...)``. Plans shrink toward fewer faults, the kind's default
trigger and params, lower ranks, later triggers and smaller values.
"""
from __future__ import annotations

from hypothesis import strategies as st

from pytest_ddpfault.faults import (COLLECTIVE_OPS, KINDS, STORAGE_FORMS, Fault, FaultSpecError, Fuzz, Param,
                                    Trigger, format_plan, validate_plan)

__all__ = ["FaultPlan", "fault_plans", "faults", "triggers"]

# The ops a plan triggers on by default: what a training loop certainly calls.
DEFAULT_OPS = ("collective", "all_reduce", "broadcast", "barrier")
MAX_CALL = 5
MAX_SECONDS = 2.0
DEFAULT_FORMS = ("op", "step", "init", "time")
ALL_FORMS = (*DEFAULT_FORMS, *STORAGE_FORMS)   # save#N, load#N: drawn when asked for, or for storage kinds


class FaultPlan(tuple):
    """A tuple of ``Fault``s that prints as the spec string ``@pytest.mark.ddp(fault=...)`` takes."""

    def __repr__(self) -> str:
        return repr(format_plan(self))

    __str__ = format_plan


def _later(n_max: int) -> st.SearchStrategy[int]:
    # integers shrink toward their lower bound: count down from n_max so that
    # shrinking moves a trigger later, where it disturbs less of the run
    return st.integers(0, n_max - 1).map(lambda k: n_max - k)


def triggers(ops=DEFAULT_OPS, forms=("op", "step", "init", "time"), max_call: int = MAX_CALL,
             max_seconds: float = MAX_SECONDS) -> st.SearchStrategy[Trigger]:
    """Triggers of the given forms; simplest first (ops, then steps, init, times, saves, loads).
    ``forms`` may also name ``save`` and ``load`` (the Nth checkpoint save or load)."""
    unknown = sorted(set(ops) - COLLECTIVE_OPS - {"collective"})
    if unknown:
        raise ValueError(f"triggers(ops=...): unknown op {unknown[0]!r}; allowed: collective, "
                         f"{', '.join(sorted(COLLECTIVE_OPS))}")
    choices = []
    if "op" in forms and ops:
        choices.append(st.builds(lambda op, n: Trigger("op", op=op, n=n), st.sampled_from(list(ops)),
                                 _later(max_call)))
    if "step" in forms:
        choices.append(_later(max_call).map(lambda n: Trigger("step", n=n)))
    if "init" in forms:
        choices.append(st.just(Trigger("init")))
    if "time" in forms:
        choices.append(st.integers(0, int(max_seconds * 10)).map(
            lambda k: Trigger("time", seconds=round(max_seconds - k / 10, 1))))
    for form in STORAGE_FORMS:
        if form in forms:
            choices.append(_later(max_call).map(lambda n, form=form: Trigger(form, n=n)))
    if not choices:
        raise ValueError(f"triggers(forms={forms!r}): no trigger form left; allowed: {', '.join(ALL_FORMS)}")
    return st.one_of(*choices)


def _small(hi: float, step: float = 0.1) -> st.SearchStrategy[float]:
    return st.integers(1, int(round(hi / step))).map(lambda k: round(k * step, 3))


def _drawn(param: Param, kind: str) -> st.SearchStrategy:
    """What a param's declaration (``Param.fuzz``) says to draw, simplest first."""
    fuzz: Fuzz | None = param.fuzz
    if fuzz is None:
        raise ValueError(f"fault kind {kind!r}: param {param.name!r} declares no fuzz values "
                         "(Param(..., fuzz=Fuzz.of(...) or Fuzz.between(lo, hi)))")
    if fuzz.among:
        return st.sampled_from(list(fuzz.among))
    if fuzz.step:
        return _small(fuzz.hi, fuzz.step)
    return st.integers(int(fuzz.lo), int(fuzz.hi))


def _some_of(n: int) -> st.SearchStrategy[tuple[int, ...]]:
    """1..n-1 of the indexes 0..n-1; shrinks toward one, the lowest."""
    return st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1).map(lambda s: tuple(sorted(s)))


def faults(kind: str, world_size: int, trigger_strategy: st.SearchStrategy | None = None,
           ops=DEFAULT_OPS, nodes: int = 1) -> st.SearchStrategy[Fault]:
    """Valid faults of one kind for ``world_size`` ranks on ``nodes`` nodes."""
    if kind not in KINDS:
        raise ValueError(f"faults(kind={kind!r}): unknown kind; allowed: {', '.join(sorted(KINDS))}")
    definition = KINDS[kind]
    optional = {p.name: _drawn(p, kind) for p in definition.params
                if p.name not in ("rank", "node", "ranks", "nodes", "at") and (p.fuzz is None or p.fuzz.drawn)}
    if definition.takes_rank:
        optional["rank"] = st.integers(0, world_size - 1)
    if "node" in definition.keys:
        optional["node"] = st.integers(0, nodes - 1)
    # a scope: some ranks or nodes, never all (a cut needs two sides)
    if "ranks" in definition.keys and world_size > 1:
        optional["ranks"] = _some_of(world_size)
    if "nodes" in definition.keys and nodes > 1:
        optional["nodes"] = _some_of(nodes)
    if definition.takes_at:
        allowed = definition.trigger_forms
        # a kind that also takes save#N/load#N draws them only when asked (a loop may never
        # save); a storage kind, which takes nothing else, draws its own
        forms = tuple(f for f in DEFAULT_FORMS if f in allowed) or tuple(f for f in ALL_FORMS if f in allowed)
        at = trigger_strategy if trigger_strategy is not None else triggers(ops=ops, forms=forms)
        optional["at"] = at.filter(lambda t: t.kind in allowed)

    @st.composite
    def build(draw):
        params = draw(st.fixed_dictionaries({}, optional=optional))
        try:
            return Fault(kind, **params).validate(world_size, nodes)
        except FaultSpecError:
            from hypothesis import reject

            reject()  # a combination the kind refuses (e.g. crash_rank exc with code)

    return build()


def fault_plans(world_size: int, kinds=None, max_faults: int = 1, triggers=None,
                ops=DEFAULT_OPS, nodes: int = 1) -> st.SearchStrategy[FaultPlan]:
    """Plans of 0..max_faults faults, each valid for ``world_size`` ranks on ``nodes`` nodes,
    accepted by ``ddp.run(faults=...)``."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"fault_plans(world_size={world_size!r}): must be an int >= 1")
    names = list(KINDS) if kinds is None else list(kinds)  # registration order: simplest first
    bad = [k for k in names if k not in KINDS]
    if bad:
        raise ValueError(f"fault_plans(kinds=...): unknown kind {bad[0]!r}; allowed: {', '.join(KINDS)}")
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1 or world_size % nodes:
        raise ValueError(f"fault_plans(nodes={nodes!r}): must be an int >= 1 that divides world_size={world_size}")
    one = st.one_of(*(faults(k, world_size, triggers, ops, nodes) for k in names))
    # kinds that must not appear twice (one MASTER_PORT): unique by kind for those
    plans = st.lists(one, min_size=0, max_size=max_faults,
                     unique_by=lambda f: f.kind if f.definition.once_per_plan else id(f))
    return plans.filter(lambda p: _valid(p, world_size, nodes)).map(FaultPlan)


def _valid(plan, world_size: int, nodes: int = 1) -> bool:
    try:
        validate_plan(plan, world_size, nodes)
    except FaultSpecError:
        return False   # a combination no plan may hold (e.g. port_collision with store_down)
    return True
