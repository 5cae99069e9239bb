"""The fault spec grammar and values: ``Fault`` (a value that prints as a spec string
and parses back equal), plans (lists of faults, ``;``-separated in text) and their checks.

A fault is a value: ``Fault.parse(str(f)) == f`` for every valid fault, so a failing plan
(hypothesis included) replays from one printed line. Stdlib only.
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from pytest_ddpfault.errors import FaultSpecError
from pytest_ddpfault.faults._words import show
from pytest_ddpfault.faults.base import KINDS, FaultKind, InRank, kind_named, kind_names
from pytest_ddpfault.faults.params import Invalid
from pytest_ddpfault.faults.triggers import Trigger

__all__ = ["Fault", "check_nodes", "faulted_ranks", "format_plan", "parse_plan", "rank_faults", "split_spec",
           "split_top_level", "validate_plan"]

class Fault:
    """One fault: ``Fault("kill_rank", rank=2, at="all_reduce#1")`` or ``Fault.parse(spec)``.

    Only explicitly given params are kept (None counts as not given), normalised, in the
    kind's declared order; equal faults print the same spec.
    """

    __slots__ = ("kind", "_values")
    kind: str

    def __init__(self, kind: str, /, **params: Any) -> None:
        definition = kind_named(kind)
        values: dict[str, Any] = {}
        for key, value in params.items():
            if value is None:
                continue
            fragment = f"{key}={show(value)}"
            param = definition.param(key, fragment)
            try:
                values[key] = param.type.parse(value)
            except FaultSpecError as e:  # a bad trigger says itself what is wrong
                raise FaultSpecError(f"{definition.name}: {e}") from None
            except ValueError as e:  # Invalid, or int()/float()/Signals() refusing the text
                hint = e.args[0] if isinstance(e, Invalid) and e.args else ""
                raise FaultSpecError(f"{definition.name}: bad value in {fragment!r}: expected "
                                     f"{param.form}{hint}") from None
        definition.check(values)
        object.__setattr__(self, "kind", definition.name)
        object.__setattr__(self, "_values", tuple((p.name, values[p.name])
                                                  for p in definition.params if p.name in values))

    @classmethod
    def parse(cls, spec: str | Fault) -> Fault:
        """``kind`` or ``kind(key=value, ...)``; values may be quoted."""
        if isinstance(spec, Fault):
            return spec
        if not isinstance(spec, str):
            raise FaultSpecError(f"expected a fault spec string or a Fault, got "
                                 f"{type(spec).__name__} {spec!r}")
        try:
            kind, args = split_spec(spec.strip())
            return cls(kind, **args)
        except FaultSpecError as e:
            raise FaultSpecError(f"{e} (in fault spec {spec.strip()!r})") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Fault is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Fault is immutable")

    def __reduce__(self) -> tuple[Any, ...]:
        return Fault.parse, (str(self),)  # the spec is the whole value

    @property
    def definition(self) -> FaultKind:
        return KINDS[self.kind]

    @property
    def params(self) -> Mapping[str, Any]:
        return MappingProxyType(dict(self._values))

    @property
    def rank(self) -> int | None:
        return self.params.get("rank")

    @property
    def at(self) -> Trigger | None:
        return self.params.get("at")

    def get(self, key: str) -> Any:
        """The given value of ``key``, else the kind's default."""
        return self.params.get(key, self.definition.param(key).default)

    def resolved_at(self) -> Trigger | None:
        return self.get("at") if self.definition.takes_at else None

    def resolved_rank(self, world_size: int, nodes: int = 1) -> int | None:
        """The rank it acts in (default world_size-1; for a node kind, the node's first
        rank); None for kinds without a rank."""
        self.validate(world_size, nodes)
        return self.definition.acting_rank(self, world_size, nodes)

    def validate(self, world_size: int, nodes: int = 1) -> Fault:
        _check_world_size(world_size)
        check_nodes(nodes, world_size)
        self.definition.check_group(self, world_size, nodes)
        return self

    def fire_in_rank(self) -> None:
        """Carry out an in-rank fault here, now (what a rank does when its trigger comes)."""
        kind = self.definition
        if not isinstance(kind, InRank):
            raise TypeError(f"{self.kind} is applied by the harness, not inside a rank")
        kind.fire_in_rank(self)

    def __str__(self) -> str:
        if not self._values:
            return self.kind
        kind = self.definition
        args = ", ".join(f"{k}={kind.param(k).type.format(v)}" for k, v in self._values)
        return f"{self.kind}({args})"

    def __repr__(self) -> str:
        return f"Fault.parse({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Fault):
            return NotImplemented
        return (self.kind, self._values) == (other.kind, other._values)

    def __hash__(self) -> int:
        return hash((self.kind, self._values))


def _check_world_size(world_size: Any) -> None:
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise FaultSpecError(f"world_size must be a whole number >= 1, got {world_size!r}")


def check_nodes(nodes: Any, world_size: int) -> int:
    """``nodes``: a whole number >= 1 that divides ``world_size``."""
    if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1 or world_size % nodes:
        raise FaultSpecError(f"nodes must be a whole number >= 1 that divides world_size={world_size}, "
                             f"got {nodes!r}")
    return nodes


def split_top_level(text: str, sep: str, whole: str, strict: bool) -> list[str]:
    """Split ``text`` at ``sep`` outside quotes and parentheses."""
    parts, depth, quote, start, i = [], 0, "", 0, 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\":
                i += 1  # an escaped character never closes the quote
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "()":
            depth += 1 if c == "(" else -1
            if strict and depth < 0:
                raise FaultSpecError(f"unbalanced parentheses in {whole!r}: unexpected ')'")
        elif c == sep and depth <= 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    if quote:
        raise FaultSpecError(f"unterminated quoted string in {whole!r}: add the closing {quote}")
    if strict and depth > 0:
        raise FaultSpecError(f"unbalanced parentheses in {whole!r}: missing ')'")
    parts.append(text[start:])
    return parts


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    form = f"expected kind or kind(key=value, ...); kinds: {', '.join(kind_names())}"
    if not spec:
        raise FaultSpecError(f"empty fault spec: {form}")
    m = re.match(r"[A-Za-z_]\w*", spec)
    if not m:
        raise FaultSpecError(f"fault spec {spec!r} does not start with a kind name: {form}")
    kind, rest = m.group(), spec[m.end():].strip()
    if not rest:
        return kind, {}
    if rest[0] == ")" or (rest[0] == "(" and not rest.endswith(")")):
        missing = "unexpected ')'" if rest[0] == ")" else "missing ')'"
        raise FaultSpecError(f"unbalanced parentheses in {spec!r}: {missing}")
    if rest[0] != "(":
        hint = "; separate faults with ';' in a plan (parse_plan)" if ";" in rest else ""
        raise FaultSpecError(f"unexpected {rest!r} after {kind!r}: write {kind}(key=value, ...){hint}")
    args: dict[str, str] = {}
    pieces = split_top_level(rest[1:-1], ",", spec, strict=True)
    for i, piece in enumerate(pieces):
        piece = piece.strip()
        if not piece:
            if i == len(pieces) - 1:  # `kind()` and a trailing comma are fine
                continue
            raise FaultSpecError(f"empty argument in {spec!r}: remove the extra ','")
        key, eq, value = (s.strip() for s in piece.partition("="))
        if not eq or not key.isidentifier():
            raise FaultSpecError(f"{piece!r} in {spec!r} is not key=value: write e.g. rank=2")
        if not value:
            raise FaultSpecError(f"{key}= has no value in {spec!r}")
        if key in args:
            raise FaultSpecError(f"{key} is given twice in {spec!r}")
        args[key] = _unquote(value, spec) if value[0] in "'\"" else value
    return kind, args


def _unquote(value: str, spec: str) -> str:
    try:
        text = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        text = None
    if not isinstance(text, str):
        raise FaultSpecError(f"bad quoted value {value!r} in {spec!r}: quote the whole value, "
                             "escaping quotes inside with a backslash")
    return text


# --- plans -------------------------------------------------------------------------------

def parse_plan(spec: Any) -> tuple[Fault, ...]:
    """None, a spec string (faults separated by ';'), a Fault, or an iterable of those."""
    if spec is None:
        return ()
    if isinstance(spec, Fault):
        return (spec,)
    if isinstance(spec, str):
        return tuple(Fault.parse(p) for p in split_top_level(spec, ";", spec, strict=False) if p.strip())
    if isinstance(spec, Iterable) and not isinstance(spec, (bytes, Mapping)):
        plan: list[Fault] = []
        for i, item in enumerate(spec):
            if not isinstance(item, (str, Fault)):
                raise FaultSpecError(f"plan item {i} is {type(item).__name__} {item!r}: "
                                     "expected a fault spec string or a Fault")
            plan.extend(parse_plan(item))
        return tuple(plan)
    raise FaultSpecError(f"expected a fault plan (a spec string, a Fault or a list of them), got "
                         f"{type(spec).__name__} {spec!r}")


def format_plan(faults: Any) -> str:
    return "; ".join(str(f) for f in parse_plan(faults))


def validate_plan(faults: Any, world_size: int, nodes: int = 1) -> tuple[Fault, ...]:
    """Parse and check a plan against a group size (and its nodes); returns the plan."""
    plan = parse_plan(faults)
    _check_world_size(world_size)
    check_nodes(nodes, world_size)
    for fault in plan:
        fault.validate(world_size, nodes)
        fault.definition.check_group_run(fault)
    counts = Counter(f.kind for f in plan)
    for name, n in counts.items():
        if n > 1 and KINDS[name].once_per_plan:
            raise FaultSpecError(f"a plan may hold one {name} only, got {n} in {format_plan(plan)!r}")
    # A before-ranks kind (port_collision) makes rank 0 host the store itself: there is
    # no harness store for store_down to take down, nor for a proxy to stand in front of.
    own_store = sorted({f.kind for f in plan if f.definition.before_ranks})
    needs_harness_store = sorted({f.kind for f in plan
                                  if f.definition.harness_side and not f.definition.before_ranks})
    if own_store and needs_harness_store:
        raise FaultSpecError(f"{own_store[0]} cannot be combined with {', '.join(needs_harness_store)} in one "
                             f"plan: with {own_store[0]} rank 0 hosts the store, so the harness has no store "
                             f"to take down or proxy; use separate runs")
    return plan


def rank_faults(faults: Any, rank: int, world_size: int, nodes: int = 1) -> tuple[Fault, ...]:
    """The in-rank faults of a plan that act in ``rank``."""
    return tuple(f for f in parse_plan(faults)
                 if f.definition.acts_in_rank and f.resolved_rank(world_size, nodes) == rank)


def faulted_ranks(faults: Any, world_size: int, nodes: int = 1) -> frozenset[int]:
    """Ranks targeted by a fault whose kind ``targets_rank`` (a kill, crash or hang, a torn
    save, an I/O error, a wrong start); the rest are survivors."""
    out: set[int] = set()
    for f in parse_plan(faults):
        f.validate(world_size, nodes)
        out |= f.definition.target_ranks(f, world_size, nodes)
    return frozenset(out)
