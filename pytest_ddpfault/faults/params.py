"""Value types (one parse/format pair per form of value) and ``Param``, shared by all kinds.

A kind declares its params from these; the spec grammar parses and prints through them,
and the hypothesis strategies draw values from the same declarations.
"""
from __future__ import annotations

import builtins
import math
import re
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_ddpfault.faults._words import did_you_mean
from pytest_ddpfault.faults.triggers import TRIGGER_FORMS, Trigger


class Invalid(ValueError):
    """A value a type refuses; args[0], if any, is a hint appended to "expected FORM"."""


class ValueType:
    form = "a value"

    def parse(self, value: Any) -> Any:
        """Python value or spec text -> normalised value; Invalid(hint) when invalid."""
        raise NotImplementedError

    def format(self, value: Any) -> str:
        return str(value)


class Number(ValueType):
    def __init__(self, cast: type, lo: float = 0, *, open_lo: bool = False,
                 hi: float | None = None, unit: str = "") -> None:
        self.cast, self.lo, self.open_lo, self.hi = cast, lo, open_lo, hi
        what = ("a whole number" if cast is int else "a number") + (f" of {unit}" if unit else "")
        bound = f"from {lo:g} to {hi:g}" if hi is not None else f"{'>' if open_lo else '>='} {lo:g}"
        self.form = f"{what} {bound}"

    def parse(self, value: Any) -> Any:
        if isinstance(value, str):
            value = self.cast(value)
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.cast is float else int):
            raise Invalid()
        value = self.cast(value) + self.cast(0)  # drops IntEnum subclasses; folds -0.0
        if not math.isfinite(value) or value < self.lo or (self.open_lo and value == self.lo) \
                or (self.hi is not None and value > self.hi):
            raise Invalid()
        return value

    def format(self, value: Any) -> str:
        return repr(value)  # repr round-trips floats exactly; `2` prints as `2.0`


class Choice(ValueType):
    def __init__(self, *options: str, words: Mapping[str, Any] | None = None) -> None:
        self.words = dict(words or {o: o for o in options})  # accepted word -> value
        self.form = "one of " + ", ".join(options)

    def parse(self, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in self.words:
            return self.words[value.strip().lower()]
        if not isinstance(value, str) and any(type(v) is type(value) and v == value
                                              for v in self.words.values()):
            return value  # a Python value (True); type-checked since 1 == True
        raise Invalid(did_you_mean(str(value), self.words))

    def format(self, value: Any) -> str:
        return next(w for w, v in self.words.items() if v == value and type(v) is type(value))


BOOL = Choice("true", "false", words={"true": True, "false": False, "yes": True, "no": False})


class SignalName(ValueType):
    form = "a signal name such as SIGTERM, or its number"

    def parse(self, value: Any) -> str:
        if isinstance(value, str):
            name = value.strip().upper()
            if name.isdigit():
                value = int(name)
            else:
                name = name if name.startswith("SIG") else "SIG" + name
                if name not in signal.Signals.__members__:
                    raise Invalid(did_you_mean(name, signal.Signals.__members__))
                return signal.Signals[name].name  # aliases (SIGIOT) normalise to one name
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid()
        return signal.Signals(value).name  # ValueError for numbers that are no signal


BUILTIN_EXCEPTIONS = sorted(n for n, v in vars(builtins).items()
                             if isinstance(v, type) and issubclass(v, BaseException))


class ExceptionName(ValueType):
    form = "a builtin exception name such as RuntimeError, a dotted module.ExceptionName, or the class"

    def parse(self, value: Any) -> str:
        if isinstance(value, type) and issubclass(value, BaseException):
            if "<locals>" in value.__qualname__:
                raise Invalid("; a class defined inside a function cannot be imported in the "
                                 "rank: define it at module level")
            if value.__module__ == "builtins":
                return value.__qualname__
            return f"{value.__module__}.{value.__qualname__}"
        if not isinstance(value, str):
            raise Invalid()
        name = value.strip()
        if "." in name:
            # Not imported here: the module may exist only where the rank runs (torch...).
            if all(part.isidentifier() for part in name.split(".")):
                return name
            raise Invalid()
        if name in BUILTIN_EXCEPTIONS:
            return name
        raise Invalid(did_you_mean(name, BUILTIN_EXCEPTIONS))


class Text(ValueType):
    form = "text (quote it with '...' or \"...\" when it holds , ; ( ) or quotes)"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise Invalid()
        return str(value)

    def format(self, value: Any) -> str:
        return repr(value)  # always quoted, so commas, parens and quotes round-trip


class IndexSet(ValueType):
    """A set of ranks or nodes: ``(2, 3)``, ``(1,)`` or ``1``; normalised to a sorted tuple."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.form = f"a tuple of {what} indexes such as (1,) or (2, 3)"

    def parse(self, value: Any) -> tuple[int, ...]:
        if isinstance(value, str):
            text = value.strip()
            if not re.fullmatch(r"[\[(]?\s*\d+(\s*,\s*\d+)*\s*,?\s*[\])]?", text) or \
                    text[:1] in "([" and text[-1:] not in ")]":
                raise Invalid()
            value = [int(v) for v in re.findall(r"\d+", text)]
        elif isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (tuple, list, set, frozenset)) or not value:
            raise Invalid(f"; name at least one {self.what}")
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in value):
            raise Invalid()
        return tuple(sorted({int(v) for v in value}))

    def format(self, value: Any) -> str:
        return "(" + ", ".join(map(str, value)) + ("," if len(value) == 1 else "") + ")"


class TriggerType(ValueType):
    def __init__(self, *forms: str) -> None:
        self.forms = frozenset(forms)
        self.form = " or ".join(TRIGGER_FORMS[f] for f in forms)

    def parse(self, value: Any) -> Trigger:
        trigger = Trigger.parse(value)  # its own FaultSpecError says what is wrong
        if trigger.kind not in self.forms:
            raise Invalid()
        return trigger


@dataclass(frozen=True)
class Fuzz:
    """What fuzzing draws for a param (plain data: the hypothesis side builds strategies).

    ``among``: values to sample, simplest first. ``between``: numbers from ``lo`` to ``hi``
    (whole numbers, or multiples of ``step``). Bounds keep each example short: fuzzing is
    many small runs, not a few long ones.
    """

    among: tuple = ()
    lo: float | None = None
    hi: float | None = None
    step: float | None = None

    @classmethod
    def of(cls, *values: Any) -> Fuzz:
        return cls(among=values)

    @classmethod
    def never(cls) -> Fuzz:
        """Not drawn: fuzzing leaves the default (a message text adds no new behaviour)."""
        return cls()

    @property
    def drawn(self) -> bool:
        return bool(self.among) or self.lo is not None

    @classmethod
    def between(cls, lo: float, hi: float, step: float | None = None) -> Fuzz:
        return cls(lo=lo, hi=hi, step=step)


@dataclass(frozen=True)
class Param:
    """One param of a kind: name, value type, default (None: unset/optional), doc with unit,
    and what fuzzing draws for it (``rank`` and ``at`` are drawn from the group and the
    kind's trigger forms)."""

    name: str
    type: ValueType
    default: Any = None
    doc: str = ""
    fuzz: Fuzz | None = None

    @property
    def form(self) -> str:
        return self.type.form


SECONDS = Number(float, unit="seconds")
POSITIVE_SECONDS = Number(float, open_lo=True, unit="seconds")
MS = Number(int, unit="ms")
SHORT = Fuzz.between(0.1, 1.0, step=0.1)   # seconds: short enough for many runs
RANK = Param("rank", Number(int), None, "the rank it acts in (default: world_size-1)")
DURATION = Param("duration", POSITIVE_SECONDS, None, "seconds until it is removed (default: never)", SHORT)
STREAM = Param("stream", Choice("upstream", "downstream"), "downstream",
               "upstream: client-to-store bytes; downstream: store-to-client", Fuzz.of("downstream", "upstream"))
TOXICITY = Param("toxicity", Number(float, hi=1.0), 1.0, "probability per connection", Fuzz.of(1.0, 0.5))


def at_param(default: str | None, *forms: str) -> Param:
    return Param("at", TriggerType(*forms), default and Trigger.parse(default), "when it fires")
