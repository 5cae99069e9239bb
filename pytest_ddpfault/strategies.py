"""Hypothesis strategies of fault plans, for property-based fault fuzzing.

    from hypothesis import given, settings, HealthCheck, strategies as st
    from pytest_ddpfault import run_group
    from pytest_ddpfault.strategies import fault_plans

    @pytest.fixture(scope="module")
    def clean():                       # what the code under test reaches, without faults
        return run_group(train, world_size=3)

    @settings(suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
    @given(data=st.data())
    @pytest.mark.ddp(world_size=3, timeout=20)
    def test_training_never_hangs(ddp, clean, data):
        plan = data.draw(fault_plans(3, kinds=["kill_rank", "delay"], reachable=clean), label="plan")
        res = ddp.run(train, faults=plan)
        assert not res.hung

A plan prints as its spec string, so a falsifying example pastes straight into
``@pytest.mark.ddp(fault=...)``. Plans shrink toward fewer faults, the kind's default
trigger and params, lower ranks, later triggers and smaller values. ``reachable=`` draws
only triggers the clean run reached in the fault's rank, so a one-fault plan always fires;
``ranks=`` / ``target_nodes=`` keep faults to those ranks or nodes.
"""
from __future__ import annotations

from hypothesis import strategies as st

from pytest_ddpfault.faults import (COLLECTIVE_OPS, KINDS, KNOWN_OPS, STORAGE_FORMS, Fault, FaultSpecError, Fuzz, Param,
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
    _check_ops("triggers", ops)
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


def _check_ops(caller: str, ops) -> None:
    unknown = sorted(set(ops) - COLLECTIVE_OPS - {"collective"})
    if unknown:
        raise ValueError(f"{caller}(ops=...): unknown op {unknown[0]!r}; allowed: collective, "
                         f"{', '.join(sorted(COLLECTIVE_OPS))}")


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
    return _some_of_these(tuple(range(n)), n)


def _some_of_these(allowed: tuple[int, ...], total: int) -> st.SearchStrategy[tuple[int, ...]]:
    """A non-empty subset of ``allowed``, never all ``total`` (a cut needs two sides);
    shrinks toward one, the lowest."""
    most = min(len(allowed), total - 1)
    return st.lists(st.sampled_from(allowed), min_size=1, max_size=most, unique=True).map(
        lambda s: tuple(sorted(s)))


# -- where faults may land: ranks=, target_nodes=, reachable= -------------------------

# A trigger of each form, to ask a kind where a trigger of that form counts (``acting_rank``)
_PROBES = {"op": Trigger("op", op="collective", n=1), "step": Trigger("step", n=1), "init": Trigger("init"),
           "time": Trigger("time", seconds=0.1), "save": Trigger("save", n=1), "load": Trigger("load", n=1)}
_TIME_SHARE = 0.25  # of the clean run's time, where t= triggers are drawn
_FORM_ORDER = ("op", "step", "init", "time", "save", "load")  # simplest first, as triggers() draws them


class _Targets:
    """The ranks and nodes faults may target: all, or those ``ranks=`` / ``target_nodes=`` allow."""

    def __init__(self, world_size: int, nodes: int, ranks, target_nodes) -> None:
        self.world_size, self.nodes = world_size, nodes
        per_node = world_size // nodes
        wanted_ranks = _index_set("ranks", ranks, world_size, "rank", f"world_size={world_size}")
        wanted_nodes = _index_set("target_nodes", target_nodes, nodes, "node", f"nodes={nodes}")
        self.ranks = tuple(r for r in range(world_size)
                           if (wanted_ranks is None or r in wanted_ranks)
                           and (wanted_nodes is None or r // per_node in wanted_nodes))
        # a node is a target when all its ranks are
        self.node_list = tuple(n for n in range(nodes)
                               if all(r in self.ranks for r in range(n * per_node, (n + 1) * per_node)))
        if not self.ranks:
            raise ValueError(f"fault_plans(ranks={ranks!r}, target_nodes={target_nodes!r}): no rank is in both; "
                             f"rank r is on node r // {per_node}")

    @property
    def restricted(self) -> bool:
        return len(self.ranks) < self.world_size


def _index_set(name: str, value, size: int, what: str, group: str) -> frozenset[int] | None:
    if value is None:
        return None
    items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    try:
        items = tuple(items)
    except TypeError:
        items = ()
    bad = [v for v in items if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < size]
    if not items or bad:
        why = f"{bad[0]!r} is not a {what} of the group" if bad else f"name at least one {what}"
        raise ValueError(f"fault_plans({name}={value!r}): {why}; allowed: {what}s 0..{size - 1} "
                         f"({group}), e.g. {name}=(0,)")
    return frozenset(items)


class _Reach:
    """The triggers a clean run reached, per rank: the same calls come again in a run of
    the same code, so a fault due on one of them fires.

    Counted calls come from each rank's operation log (``RankResult.ops``: op, ``init``,
    ``save`` and ``load`` records, ``seq`` = the call's count as triggers count it) and
    its ``step()`` marks; ``collective#N`` counts them all. A time trigger is drawn up to
    a quarter of the time the rank (for harness-side kinds: the first rank to end) lived:
    a later run of the same code, under less load, may well be faster.
    """

    def __init__(self, result, world_size: int, nodes: int | None) -> None:
        from pytest_ddpfault.results import GroupResult

        if not isinstance(result, GroupResult):
            raise ValueError(f"fault_plans(reachable=...): expected the GroupResult of a clean ddp.run "
                             f"(or run_group), got {type(result).__name__}")
        if len(result) != world_size:
            raise ValueError(f"fault_plans(reachable=...): that run had {len(result)} ranks, not "
                             f"world_size={world_size}: pass the result of a run of the same group")
        if result.plan:
            raise ValueError(f"fault_plans(reachable=...): that run had faults ({result.plan!r}); pass a clean "
                             f"run's result: ddp.run(fn, faults=None)")
        if not result.ok:
            bad = next(r for r in result if not r.ok)
            raise ValueError(f"fault_plans(reachable=...): that run did not succeed (rank {bad.rank} "
                             f"{bad.status}: {bad.detail()}); pass a run where every rank returned")
        if not any(r.ops or r.steps for r in result):
            raise ValueError("fault_plans(reachable=...): that run logged no call in any rank (run with "
                             "oplog=False?); pass a run made with its operation log (the default)")
        seen_nodes = max(r.node for r in result) + 1
        if nodes is not None and nodes != seen_nodes:
            raise ValueError(f"fault_plans(nodes={nodes!r}): the reachable= run had {seen_nodes} node(s)")
        self.nodes = seen_nodes
        self.counts: list[dict[str, int]] = []
        for r in result:
            counts: dict[str, int] = {}
            for op in r.ops:
                counts[op.name] = max(counts.get(op.name, 0), op.seq)
            counts["collective"] = sum(n for name, n in counts.items() if name in COLLECTIVE_OPS)
            counts["step"] = max((m.seq for m in r.steps), default=0)
            self.counts.append(counts)
        self.rank_seconds = [_tenths((r.duration or 0.0) * _TIME_SHARE) for r in result]
        self.run_seconds = _tenths(min((r.end_time or 0.0) for r in result) * _TIME_SHARE)

    def strategy(self, rank: int | None, form: str, ops) -> st.SearchStrategy[Trigger] | None:
        """The reached triggers of ``form`` in ``rank`` (None: harness-side), or None if none."""
        if form == "time":
            bound = self.run_seconds if rank is None else self.rank_seconds[rank]
            k = int(round(bound * 10))
            return st.integers(0, k - 1).map(lambda i: Trigger("time", seconds=round((k - i) / 10, 1))) if k else None
        if rank is None:  # the harness puts it in place at the run's start
            return st.just(Trigger("init")) if form == "init" else None
        counts = self.counts[rank]
        if form == "init":
            return st.just(Trigger("init")) if counts.get("init") else None
        if form != "op":
            n = counts.get(form, 0)
            return _later(n).map(lambda k: Trigger(form, n=k)) if n else None
        names = [name for name in ("collective", *sorted(KNOWN_OPS - {"collective"}))
                 if counts.get(name) and (ops is None or name in ops)]
        if not names:
            return None
        return st.one_of(*(_later(counts[name]).map(lambda k, name=name: Trigger("op", op=name, n=k))
                           for name in names))

    def reaches(self, rank: int | None, trigger: Trigger | None) -> bool:
        if trigger is None:
            return False
        if trigger.kind == "time":
            return 0 < trigger.seconds <= (self.run_seconds if rank is None else self.rank_seconds[rank])
        if rank is None:
            return trigger.kind == "init"
        what, n = trigger.counted
        return self.counts[rank].get(what, 0) >= n


def _tenths(seconds: float) -> float:
    return int(max(0.0, seconds) * 10) / 10


def _counting_rank(kind: str, params: dict, trigger: Trigger, world_size: int, nodes: int):
    """Where a trigger of this form counts for a fault with these params: a rank, None
    (the harness), or False (the kind refuses that trigger with these params)."""
    try:
        fault = Fault(kind, **params, at=trigger).validate(world_size, nodes)
    except FaultSpecError:
        return False
    return fault.definition.acting_rank(fault, world_size, nodes)


def faults(kind: str, world_size: int, trigger_strategy: st.SearchStrategy | None = None,
           ops=None, nodes: int = 1, *, ranks=None, target_nodes=None, reachable=None) -> st.SearchStrategy[Fault]:
    """Valid faults of one kind for ``world_size`` ranks on ``nodes`` nodes; ``ranks`` /
    ``target_nodes`` / ``reachable`` as for ``fault_plans``."""
    if kind not in KINDS:
        raise ValueError(f"faults(kind={kind!r}): unknown kind; allowed: {', '.join(sorted(KINDS))}")
    if ops is not None:
        _check_ops("faults", ops)
    reach = reachable if isinstance(reachable, _Reach) or reachable is None else _Reach(reachable, world_size, nodes)
    targets = _Targets(world_size, nodes, ranks, target_nodes)
    definition = KINDS[kind]
    allowed = definition.trigger_forms
    if reach is None:
        return _plain_faults(kind, world_size, trigger_strategy, DEFAULT_OPS if ops is None else ops, nodes, targets)
    return _reached_faults(kind, world_size, trigger_strategy, ops, nodes, targets, reach, allowed)


def _target_params(kind: str, world_size: int, nodes: int, targets: _Targets, reach: _Reach | None = None):
    """(required, optional) strategies of the params that say where the fault lands."""
    definition = KINDS[kind]
    required, optional = {}, {}
    forms = [f for f in _FORM_ORDER if f in definition.trigger_forms]

    def lands(rank: int) -> bool:   # a trigger of the kind's can come in that rank
        return reach is None or not forms or any(reach.strategy(rank, f, None) is not None for f in forms)

    if definition.takes_rank:
        if "ranks" in definition.keys:   # a scoped network kind: the rank its in-rank trigger counts in
            optional["rank"] = st.sampled_from(targets.ranks)
        else:
            ranks = tuple(r for r in targets.ranks if lands(r))
            if not ranks:
                raise _Unreachable(f"{kind}: the reachable= run made no call it fires on "
                                   f"({', '.join(forms)}) in ranks {list(targets.ranks)}")
            # unset (the kind's default rank) is simplest, where that rank is allowed
            default = definition.acting_rank(Fault(kind), world_size, nodes)
            (optional if default in ranks else required)["rank"] = st.sampled_from(ranks)
    if "node" in definition.keys and not definition.takes_rank:  # one that takes both (misconfig): by rank
        per_node = world_size // nodes
        node_list = tuple(n for n in targets.node_list if lands(n * per_node))
        if not node_list:
            raise _Unreachable(f"{kind}: no node has all its ranks among the targets {list(targets.ranks)}"
                               if not targets.node_list else f"{kind}: no call it fires on was reached in the "
                               f"first rank of nodes {list(targets.node_list)}")
        (optional if nodes - 1 in node_list else required)["node"] = st.sampled_from(node_list)
    # a scope: some ranks or nodes, never all (a cut needs two sides)
    scopes = {}
    if "ranks" in definition.keys and world_size > 1:
        scopes["ranks"] = _some_of_these(targets.ranks, world_size)
    if "nodes" in definition.keys and nodes > 1 and targets.node_list:
        scopes["nodes"] = _some_of_these(targets.node_list, nodes)
    if targets.restricted and scopes:   # not the store path, which every rank uses: one of the scopes
        required[_SCOPE] = st.one_of(*(s.map(lambda v, key=key: {key: v}) for key, s in scopes.items()))
    else:
        optional.update(scopes)
    return required, optional


_SCOPE = "_scope"   # a drawn {"ranks": ...} or {"nodes": ...}, merged into the params


def _params(drawn: dict) -> dict:
    scope = drawn.pop(_SCOPE, None)
    return {**drawn, **(scope or {})}


class _Unreachable(ValueError):
    """A kind that cannot land on the allowed targets (``fault_plans`` leaves it out when
    the user did not name it)."""


def _other_params(kind: str) -> dict:
    definition = KINDS[kind]
    return {p.name: _drawn(p, kind) for p in definition.params
            if p.name not in ("rank", "node", "ranks", "nodes", "at") and (p.fuzz is None or p.fuzz.drawn)}


def _built(kind: str, params: dict, world_size: int, nodes: int) -> Fault:
    try:
        return Fault(kind, **params).validate(world_size, nodes)
    except FaultSpecError:
        from hypothesis import reject

        reject()  # a combination the kind refuses (e.g. crash_rank exc with code)


def _plain_faults(kind, world_size, trigger_strategy, ops, nodes, targets: _Targets):
    definition = KINDS[kind]
    required, optional = _target_params(kind, world_size, nodes, targets)
    optional.update(_other_params(kind))
    if definition.takes_at:
        allowed = definition.trigger_forms
        # a kind that also takes save#N/load#N draws them only when asked (a loop may never
        # save); a storage kind, which takes nothing else, draws its own
        forms = tuple(f for f in DEFAULT_FORMS if f in allowed) or tuple(f for f in ALL_FORMS if f in allowed)
        at = trigger_strategy if trigger_strategy is not None else triggers(ops=ops, forms=forms)
        optional["at"] = at.filter(lambda t: t.kind in allowed)

    @st.composite
    def build(draw):
        return _built(kind, _params(draw(st.fixed_dictionaries(required, optional=optional))), world_size, nodes)

    return build()


def _reached_faults(kind, world_size, trigger_strategy, ops, nodes, targets: _Targets, reach: _Reach, allowed):
    definition = KINDS[kind]
    required, optional = _target_params(kind, world_size, nodes, targets, reach)
    optional.update(_other_params(kind))
    forms = [f for f in _FORM_ORDER if f in allowed]

    @st.composite
    def build(draw):
        params = _params(draw(st.fixed_dictionaries(required, optional=optional)))
        if not definition.takes_at:
            return _built(kind, params, world_size, nodes)
        if trigger_strategy is not None:
            def fires(t: Trigger) -> bool:
                rank = _counting_rank(kind, params, t, world_size, nodes)
                return rank is not False and reach.reaches(rank, t)
            at = draw(trigger_strategy.filter(fires))
        else:
            choices = []
            for form in forms:
                rank = _counting_rank(kind, params, _PROBES[form], world_size, nodes)
                drawn = None if rank is False else reach.strategy(rank, form, ops)
                if drawn is not None:
                    choices.append(drawn)
            default = definition.default_at
            if default is not None:
                rank = _counting_rank(kind, params, default, world_size, nodes)
                if rank is not False and reach.reaches(rank, default):
                    choices.insert(0, st.none())    # the kind's default trigger: simplest
            if not choices:
                from hypothesis import reject

                reject()   # nothing this fault would fire on (e.g. a scope whose rank never counts)
            at = draw(st.one_of(*choices))
        return _built(kind, {**params, "at": at}, world_size, nodes)

    return build()


def fault_plans(world_size: int, kinds=None, max_faults: int = 1, triggers=None,
                ops=None, nodes: int | None = None, *, ranks=None, target_nodes=None,
                reachable=None) -> st.SearchStrategy[FaultPlan]:
    """Plans of 0..max_faults faults, each valid for ``world_size`` ranks on ``nodes`` nodes,
    accepted by ``ddp.run(faults=...)``.

    ``ranks=(...)`` / ``target_nodes=(...)``: faults land only there (the rank a fault acts
    or counts in, a killed node's ranks; a network fault gets a scope there, not the store
    path every rank uses); kinds without a rank (``store_down``, ``port_collision``) are
    drawn as they are.
    ``reachable=``: the ``GroupResult`` of a clean run of the code under test; every
    trigger drawn is one that run reached in the fault's rank (its op counts, ``step()``
    calls, saves, loads, ``init``; ``t=`` up to a quarter of the rank's time), so each fault of a
    one-fault plan fires in a run of the same code. Kinds it never reaches (a save
    trigger in a loop that never saves) are left out unless ``kinds`` names them.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"fault_plans(world_size={world_size!r}): must be an int >= 1")
    names = list(KINDS) if kinds is None else list(kinds)  # registration order: simplest first
    bad = [k for k in names if k not in KINDS]
    if bad:
        raise ValueError(f"fault_plans(kinds=...): unknown kind {bad[0]!r}; allowed: {', '.join(KINDS)}")
    reach = None if reachable is None else _Reach(reachable, world_size, nodes)
    if nodes is None:
        nodes = reach.nodes if reach is not None else 1
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1 or world_size % nodes:
        raise ValueError(f"fault_plans(nodes={nodes!r}): must be an int >= 1 that divides world_size={world_size}")
    kinds_drawn = []
    for k in names:
        try:
            kinds_drawn.append(faults(k, world_size, triggers, ops, nodes, ranks=ranks, target_nodes=target_nodes,
                                      reachable=reach))
        except _Unreachable as e:
            if kinds is not None:  # asked for by name: say why it cannot be drawn
                raise ValueError(f"fault_plans(kinds=...): {e}") from None
    if not kinds_drawn:
        raise ValueError(f"fault_plans(...): no kind can land on ranks {ranks!r} / nodes {target_nodes!r}")
    one = st.one_of(*kinds_drawn)
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
