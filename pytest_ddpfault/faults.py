"""Fault kinds, spec strings (format and parse) and triggers.

A fault is a value: ``Fault.parse(str(f)) == f`` for every valid fault, so a failing plan
(hypothesis included) replays from one printed line.  Each kind is one small class,
registered by name in ``KINDS``: it declares its params (default, unit), the trigger forms
it accepts, its capability flags and, for in-rank kinds, performs the action.  Whether a
trigger is due, and "fires at most once", live in ``TriggerCounter`` alone.

Imported by the pytest process and inside rank processes: stdlib only (no torch, no pytest).
"""
from __future__ import annotations

import ast
import builtins
import difflib
import importlib
import math
import os
import re
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

from pytest_ddpfault.errors import FaultSpecError

__all__ = [
    "CAPABILITIES", "COLLECTIVE_OPS", "FAULT_KIND_NAMES", "KINDS", "KNOWN_OPS", "Fault",
    "FaultKind", "FaultSpecError", "Param", "Trigger", "TriggerCounter", "faulted_ranks",
    "format_plan", "kinds_with", "parse_plan", "rank_faults", "validate_plan",
]


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _missing_hash(word: str) -> str:
    """``step3`` / ``all_reduce2``: the call number without its ``#``."""
    m = re.fullmatch(r"(\w*?)_?(\d+)", word)
    if m and m.group(1) in KNOWN_OPS | {"step"}:
        return f" (did you mean '{m.group(1)}#{m.group(2)}'?)"
    return ""


def _show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


# --- triggers ------------------------------------------------------------------------

# torch.distributed's collective and point-to-point functions (async ones included);
# `collective` is the wildcard: any of them.
KNOWN_OPS = frozenset({
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_object",
    "all_gather_into_tensor", "all_gather_coalesced", "reduce_scatter", "reduce_scatter_tensor",
    "all_to_all", "all_to_all_single", "broadcast", "broadcast_object_list", "barrier",
    "monitored_barrier", "reduce", "gather", "gather_object", "scatter", "scatter_object_list",
    "send", "recv", "isend", "irecv", "send_object_list", "recv_object_list",
    "batch_isend_irecv", "new_group", "collective",
})
# What `collective` counts: new_group only builds a group, it is not a collective call.
COLLECTIVE_OPS = KNOWN_OPS - {"collective", "new_group"}

_TRIGGER_FORMS = {"init": "init", "op": "OP or OP#N (e.g. all_reduce#1)",
                  "step": "step#N", "time": "t=SECONDS"}
_ALL_FORMS = ", ".join(_TRIGGER_FORMS.values())


@dataclass(frozen=True)
class Trigger:
    """When a fault fires: ``init``, the Nth call of an op, the Nth ``step()``, or ``t=S``."""

    kind: str                      # "init" | "op" | "step" | "time"
    op: str | None = None          # the op name, for kind "op"
    n: int | None = None           # the call number (from 1), for "op" and "step"
    seconds: float | None = None   # for "time"

    def __post_init__(self) -> None:
        # The one validator: parse() builds through it, and so do Python callers.
        counted = self.kind in ("op", "step")
        if self.kind not in _TRIGGER_FORMS or (self.op is not None) != (self.kind == "op") \
                or (self.n is not None) != counted or (self.seconds is not None) != (self.kind == "time"):
            raise FaultSpecError(f"not a trigger: {self!r}; triggers are {_ALL_FORMS}")
        if self.kind == "op" and self.op not in KNOWN_OPS:
            hint = _missing_hash(str(self.op)) or _did_you_mean(str(self.op), KNOWN_OPS | {"init", "step"})
            raise FaultSpecError(f"unknown op {self.op!r}{hint}; triggers are {_ALL_FORMS}; "
                                 f"OP is one of: {', '.join(sorted(KNOWN_OPS))}")
        if counted and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1):
            raise FaultSpecError(f"calls count from 1: the first call is {self.op or 'step'}#1")
        s = self.seconds
        if self.kind == "time":
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
                raise FaultSpecError("SECONDS must be a number >= 0, e.g. t=1.5")
            object.__setattr__(self, "seconds", float(s) + 0.0)  # +0.0 folds -0.0 into 0.0

    @classmethod
    def parse(cls, text: str | Trigger) -> Trigger:
        if isinstance(text, Trigger):
            return text
        if not isinstance(text, str):
            raise FaultSpecError(f"expected a trigger ({_ALL_FORMS}), got {type(text).__name__} {text!r}")
        try:
            return cls._parse(text.strip())
        except FaultSpecError as e:
            raise FaultSpecError(f"bad trigger {text.strip()!r}: {e}") from None

    @classmethod
    def _parse(cls, spec: str) -> Trigger:
        if spec == "init":
            return cls("init")
        m = re.fullmatch(r"t\s*=\s*(.*)", spec, re.S)
        if m:
            try:
                seconds = float(m.group(1))
            except ValueError:
                raise FaultSpecError("SECONDS must be a number >= 0, e.g. t=1.5") from None
            return cls("time", seconds=seconds)
        m = re.fullmatch(r"([A-Za-z_]\w*)\s*(?:#(.*))?", spec, re.S)
        if not m:
            raise FaultSpecError(f"expected one of {_ALL_FORMS}")
        name, count = m.groups()
        if name == "init":
            raise FaultSpecError("init happens once: write at=init, without a call number")
        if count is not None and not count.strip().isdecimal():
            raise FaultSpecError(f"the call number must be a whole number >= 1, e.g. {name}#1")
        n = 1 if count is None else int(count)
        return cls("step", n=n) if name == "step" else cls("op", op=name, n=n)

    @property
    def counted(self) -> tuple[str, int] | None:
        """(what is counted, at which call) for call-driven triggers; None for ``t=``."""
        if self.kind == "time":
            return None
        return (self.op if self.kind == "op" else self.kind), (self.n or 1)

    def __str__(self) -> str:
        if self.kind in ("op", "step"):
            return f"{self.op or 'step'}#{self.n}"
        return f"t={self.seconds!r}" if self.kind == "time" else "init"


# --- value types: one parse/format pair per form of value, shared by all kinds ----------

class _Invalid(ValueError):
    """A value a type refuses; args[0], if any, is a hint appended to "expected FORM"."""


class _Type:
    form = "a value"

    def parse(self, value: Any) -> Any:
        """Python value or spec text -> normalised value; _Invalid(hint) when invalid."""
        raise NotImplementedError

    def format(self, value: Any) -> str:
        return str(value)


class _Number(_Type):
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
            raise _Invalid()
        value = self.cast(value) + self.cast(0)  # drops IntEnum subclasses; folds -0.0
        if not math.isfinite(value) or value < self.lo or (self.open_lo and value == self.lo) \
                or (self.hi is not None and value > self.hi):
            raise _Invalid()
        return value

    def format(self, value: Any) -> str:
        return repr(value)  # repr round-trips floats exactly; `2` prints as `2.0`


class _Choice(_Type):
    def __init__(self, *options: str, words: Mapping[str, Any] | None = None) -> None:
        self.words = dict(words or {o: o for o in options})  # accepted word -> value
        self.form = "one of " + ", ".join(options)

    def parse(self, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in self.words:
            return self.words[value.strip().lower()]
        if not isinstance(value, str) and any(type(v) is type(value) and v == value
                                              for v in self.words.values()):
            return value  # a Python value (True); type-checked since 1 == True
        raise _Invalid(_did_you_mean(str(value), self.words))

    def format(self, value: Any) -> str:
        return next(w for w, v in self.words.items() if v == value and type(v) is type(value))


_BOOL = _Choice("true", "false", words={"true": True, "false": False, "yes": True, "no": False})


class _Signal(_Type):
    form = "a signal name such as SIGTERM, or its number"

    def parse(self, value: Any) -> str:
        if isinstance(value, str):
            name = value.strip().upper()
            if name.isdigit():
                value = int(name)
            else:
                name = name if name.startswith("SIG") else "SIG" + name
                if name not in signal.Signals.__members__:
                    raise _Invalid(_did_you_mean(name, signal.Signals.__members__))
                return signal.Signals[name].name  # aliases (SIGIOT) normalise to one name
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid()
        return signal.Signals(value).name  # ValueError for numbers that are no signal


_BUILTIN_EXCEPTIONS = sorted(n for n, v in vars(builtins).items()
                             if isinstance(v, type) and issubclass(v, BaseException))


class _Exception(_Type):
    form = "a builtin exception name such as RuntimeError, a dotted module.ExceptionName, or the class"

    def parse(self, value: Any) -> str:
        if isinstance(value, type) and issubclass(value, BaseException):
            if "<locals>" in value.__qualname__:
                raise _Invalid("; a class defined inside a function cannot be imported in the "
                                 "rank: define it at module level")
            if value.__module__ == "builtins":
                return value.__qualname__
            return f"{value.__module__}.{value.__qualname__}"
        if not isinstance(value, str):
            raise _Invalid()
        name = value.strip()
        if "." in name:
            # Not imported here: the module may exist only where the rank runs (torch...).
            if all(part.isidentifier() for part in name.split(".")):
                return name
            raise _Invalid()
        if name in _BUILTIN_EXCEPTIONS:
            return name
        raise _Invalid(_did_you_mean(name, _BUILTIN_EXCEPTIONS))


class _Text(_Type):
    form = "text (quote it with '...' or \"...\" when it holds , ; ( ) or quotes)"

    def parse(self, value: Any) -> str:
        if not isinstance(value, str):
            raise _Invalid()
        return str(value)

    def format(self, value: Any) -> str:
        return repr(value)  # always quoted, so commas, parens and quotes round-trip


class _TriggerType(_Type):
    def __init__(self, *forms: str) -> None:
        self.forms = frozenset(forms)
        self.form = " or ".join(_TRIGGER_FORMS[f] for f in forms)

    def parse(self, value: Any) -> Trigger:
        trigger = Trigger.parse(value)  # its own FaultSpecError says what is wrong
        if trigger.kind not in self.forms:
            raise _Invalid()
        return trigger


@dataclass(frozen=True)
class Param:
    """One param of a kind: name, value type, default (None: unset/optional), doc with unit."""

    name: str
    type: _Type
    default: Any = None
    doc: str = ""

    @property
    def form(self) -> str:
        return self.type.form


_SECONDS = _Number(float, unit="seconds")
_POSITIVE_SECONDS = _Number(float, open_lo=True, unit="seconds")
_MS = _Number(int, unit="ms")
_RANK = Param("rank", _Number(int), None, "the rank it acts in (default: world_size-1)")
_DURATION = Param("duration", _POSITIVE_SECONDS, None, "seconds until it is removed (default: never)")
_STREAM = Param("stream", _Choice("upstream", "downstream"), "downstream",
                "upstream: client-to-store bytes; downstream: store-to-client")
_TOXICITY = Param("toxicity", _Number(float, hi=1.0), 1.0, "probability per connection")


def _at(default: str | None, *forms: str) -> Param:
    return Param("at", _TriggerType(*forms), default and Trigger.parse(default), "when it fires")


# --- kinds: one small class each, registered by name -----------------------------------

KINDS: dict[str, FaultKind] = {}
CAPABILITIES = ("acts_in_rank", "targets_rank", "harness_side", "needs_proxy", "before_ranks",
                "takes_rank", "takes_at", "is_toxic", "once_per_plan")


def _register(cls: type[FaultKind]) -> type[FaultKind]:
    KINDS[cls.name] = cls()
    return cls


class FaultKind:
    """A fault kind: its params, its trigger forms, its capability flags and its action."""

    name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()   # declared order = canonical print order
    refused: ClassVar[Mapping[str, str]] = {}  # key -> why this kind does not take it
    # capability flags (read by harness, rank code and reports instead of kind names)
    acts_in_rank: ClassVar[bool] = False   # fire_in_rank() runs inside the target rank
    targets_rank: ClassVar[bool] = False   # its rank counts as faulted, not a survivor
    harness_side: ClassVar[bool] = False   # the harness applies it
    needs_proxy: ClassVar[bool] = False    # the store traffic must go through Toxiproxy
    before_ranks: ClassVar[bool] = False   # set up before any rank starts
    once_per_plan: ClassVar[bool] = False  # two in one plan would clash
    toxic_type: ClassVar[str | None] = None

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def takes_rank(self) -> bool:
        return "rank" in self.keys

    @property
    def takes_at(self) -> bool:
        return "at" in self.keys

    @property
    def is_toxic(self) -> bool:
        return self.toxic_type is not None

    @property
    def default_at(self) -> Trigger | None:
        return self.param("at").default if self.takes_at else None

    @property
    def trigger_forms(self) -> frozenset[str]:
        return self.param("at").type.forms if self.takes_at else frozenset()

    def param(self, key: str, fragment: str | None = None) -> Param:
        for p in self.params:
            if p.name == key:
                return p
        fragment = fragment or key
        takes = f"{self.name} takes: {', '.join(self.keys) or 'no params'}"
        if key in self.refused:
            raise FaultSpecError(f"{self.name} takes no {key}: {self.refused[key]}; "
                                 f"remove {fragment!r}. {takes}")
        raise FaultSpecError(f"{self.name} does not take {key!r}{_did_you_mean(key, self.keys)}; {takes}")

    def check(self, values: Mapping[str, Any]) -> None:
        """Checks across params (after each was parsed); raise FaultSpecError."""

    def repeats(self, fault: Fault) -> bool:
        """True when the fault fires on every counted call from its trigger on."""
        return False

    def fire_in_rank(self, fault: Fault) -> None:
        raise TypeError(f"{self.name} is applied by the harness, not inside a rank")

    def __repr__(self) -> str:
        return f"<fault kind {self.name}({', '.join(self.keys)})>"


class _InRank(FaultKind):
    acts_in_rank = True


class _Targeting(_InRank):
    targets_rank = True


_RANK_AT = _at("collective#1", "init", "op", "step", "time")


@_register
class KillRank(_Targeting):
    name = "kill_rank"
    doc = "the rank sends itself `signal` at the trigger"
    params = (_RANK, _RANK_AT, Param("signal", _Signal(), "SIGKILL", "signal name or number"))

    def fire_in_rank(self, fault: Fault) -> None:
        os.kill(os.getpid(), signal.Signals[fault.get("signal")])


def _import_exception(name: str) -> type[BaseException]:
    if "." not in name:
        return getattr(builtins, name)
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):  # longest importable module prefix, then attributes
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"crash_rank: cannot import exception {name!r}")


@_register
class CrashRank(_Targeting):
    name = "crash_rank"
    doc = "the rank raises `exc(message)`, or with `code` writes message and calls os._exit(code)"
    params = (_RANK, _RANK_AT,
              Param("exc", _Exception(), "RuntimeError", "exception class to raise"),
              Param("message", _Text(), "crash_rank injected by pytest-ddpfault", "its message"),
              Param("code", _Number(int, hi=255), None, "exit code: exit instead of raising"))

    def check(self, values: Mapping[str, Any]) -> None:
        if "exc" in values and "code" in values:
            raise FaultSpecError(f"crash_rank: exc={values['exc']} and code={values['code']} exclude "
                                 "each other (code exits without raising); give one of them")

    def fire_in_rank(self, fault: Fault) -> None:
        code = fault.get("code")
        if code is None:
            raise _import_exception(fault.get("exc"))(fault.get("message"))
        sys.stderr.write(f"{fault.get('message')}\n")
        for stream in (sys.stdout, sys.stderr):  # os._exit skips the flush at exit
            stream.flush()
        os._exit(code)


@_register
class HangRank(_Targeting):
    name = "hang_rank"
    doc = "the rank stops itself with SIGSTOP (sockets stay open); the harness may SIGCONT it"
    params = (_RANK, _RANK_AT,
              Param("resume_after", _POSITIVE_SECONDS, None, "seconds until SIGCONT (default: never)"))

    def fire_in_rank(self, fault: Fault) -> None:
        os.kill(os.getpid(), signal.SIGSTOP)


@_register
class Delay(_InRank):
    name = "delay"
    doc = "the rank sleeps before the op (a straggler: it stays a survivor)"
    # No t=: a delay acts before a call, and a clock has no call to hold back.
    params = (_RANK, _at("collective#1", "init", "op", "step"),
              Param("seconds", _SECONDS, 1.0, "seconds to sleep"),
              Param("every", _BOOL, False, "sleep before every call from the trigger on"))

    def repeats(self, fault: Fault) -> bool:
        return fault.get("every")

    def fire_in_rank(self, fault: Fault) -> None:
        time.sleep(fault.get("seconds"))


class _Harness(FaultKind):
    harness_side = True
    refused = {"rank": "it acts on the whole group from the harness"}


@_register
class PortCollision(_Harness):
    name = "port_collision"
    doc = "a foreign socket holds MASTER_PORT from before the ranks start"
    before_ranks = once_per_plan = True
    params = (Param("mode", _Choice("listen", "bind"), "listen",
                    "listen: accepts, never answers; bind: bound, not listening"),
              Param("hold_for", _POSITIVE_SECONDS, None, "seconds from the ranks' start to release"))
    refused = {"rank": "the port is the whole group's",
               "at": "the port is held from before the ranks start (use hold_for=S to release it)"}


@_register
class StoreDown(_Harness):
    name = "store_down"
    doc = "the harness shuts its store at the trigger"
    params = (_at("t=1.0", "time"),)


class _Network(_Harness):
    needs_proxy = True
    refused = {"rank": "the proxy carries the store traffic of every rank"}


_NET_AT = _at("init", "init", "time")


@_register
class BlockPort(_Network):
    name = "block_port"
    doc = "the store proxy is disabled (connections refused)"
    params = (_NET_AT, _DURATION)


class _Toxic(_Network):
    attributes: ClassVar[tuple[Param, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.params = (_NET_AT, *cls.attributes, _STREAM, _TOXICITY, _DURATION)

    def toxic_attributes(self, fault: Fault) -> dict[str, Any]:
        return {p.name: fault.get(p.name) for p in self.attributes}

    def toxic(self, fault: Fault, name: str | None = None) -> dict[str, Any]:
        """The body of Toxiproxy's POST /proxies/{p}/toxics (also add_toxic's kwargs)."""
        stream = fault.get("stream")
        return {"name": name or f"ddpfault_{self.name}_{stream}", "type": self.toxic_type,
                "stream": stream, "toxicity": fault.get("toxicity"),
                "attributes": self.toxic_attributes(fault)}


@_register
class Blackhole(_Toxic):
    name, toxic_type = "blackhole", "timeout"
    doc = "connections open but data vanishes"
    attributes = (Param("timeout", _MS, 0, "ms until the connection is closed; 0 = never"),)


@_register
class Latency(_Toxic):
    name = toxic_type = "latency"
    doc = "each chunk is delayed"
    attributes = (Param("latency", _MS, 1000, "ms added"), Param("jitter", _MS, 0, "ms, +-"))


@_register
class Bandwidth(_Toxic):
    name = toxic_type = "bandwidth"
    doc = "rate limit; 0 stalls the stream"
    attributes = (Param("rate", _Number(int, unit="KB/s"), 0, "KB/s"),)


@_register
class ResetPeer(_Toxic):
    name = toxic_type = "reset_peer"
    doc = "after the first data, waits `timeout` then closes with RST"
    attributes = (Param("timeout", _MS, 0, "ms before the reset"),)


@_register
class SlowClose(_Toxic):
    name = toxic_type = "slow_close"
    doc = "the close after EOF is delayed"
    attributes = (Param("delay", _MS, 1000, "ms"),)


@_register
class LimitData(_Toxic):
    name = toxic_type = "limit_data"
    doc = "forwards `bytes` per connection and stream, then closes"
    attributes = (Param("bytes", _Number(int, unit="bytes"), 0, "bytes"),)


FAULT_KIND_NAMES = tuple(sorted(KINDS))


def _kind(name: Any) -> FaultKind:
    if isinstance(name, str) and name in KINDS:
        return KINDS[name]
    hint = _did_you_mean(name, KINDS) if isinstance(name, str) else ""
    raise FaultSpecError(f"unknown fault kind {_show(name)!r}{hint}; kinds: {', '.join(FAULT_KIND_NAMES)}")


def kinds_with(capability: str) -> tuple[str, ...]:
    """Names of the kinds that have ``capability`` (one of ``CAPABILITIES``), sorted."""
    if capability not in CAPABILITIES:
        raise FaultSpecError(f"unknown capability {capability!r}{_did_you_mean(capability, CAPABILITIES)}"
                             f"; capabilities: {', '.join(CAPABILITIES)}")
    return tuple(n for n in FAULT_KIND_NAMES if getattr(KINDS[n], capability))


# --- faults ------------------------------------------------------------------------------

class Fault:
    """One fault: ``Fault("kill_rank", rank=2, at="all_reduce#1")`` or ``Fault.parse(spec)``.

    Only explicitly given params are kept (None counts as not given), normalised, in the
    kind's declared order; equal faults print the same spec.
    """

    __slots__ = ("kind", "_values")
    kind: str

    def __init__(self, kind: str, /, **params: Any) -> None:
        definition = _kind(kind)
        values: dict[str, Any] = {}
        for key, value in params.items():
            if value is None:
                continue
            fragment = f"{key}={_show(value)}"
            param = definition.param(key, fragment)
            try:
                values[key] = param.type.parse(value)
            except FaultSpecError as e:  # a bad trigger says itself what is wrong
                raise FaultSpecError(f"{definition.name}: {e}") from None
            except ValueError as e:  # _Invalid, or int()/float()/Signals() refusing the text
                hint = e.args[0] if isinstance(e, _Invalid) and e.args else ""
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
            kind, args = _split_spec(spec.strip())
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

    def resolved_rank(self, world_size: int) -> int | None:
        """The rank it acts in (default world_size-1); None for kinds without a rank."""
        if not self.definition.takes_rank:
            return None
        self.validate(world_size)
        return world_size - 1 if self.rank is None else self.rank

    def validate(self, world_size: int) -> Fault:
        _check_world_size(world_size)
        if self.rank is not None and self.rank >= world_size:
            raise FaultSpecError(f"rank {self.rank} is outside the group (world_size={world_size}): "
                                 f"allowed 0..{world_size - 1} (in fault spec {str(self)!r})")
        return self

    def fire_in_rank(self) -> None:
        self.definition.fire_in_rank(self)

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


def _split_top(text: str, sep: str, whole: str, strict: bool) -> list[str]:
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


def _split_spec(spec: str) -> tuple[str, dict[str, str]]:
    form = f"expected kind or kind(key=value, ...); kinds: {', '.join(FAULT_KIND_NAMES)}"
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
    pieces = _split_top(rest[1:-1], ",", spec, strict=True)
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
        return tuple(Fault.parse(p) for p in _split_top(spec, ";", spec, strict=False) if p.strip())
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


def validate_plan(faults: Any, world_size: int) -> tuple[Fault, ...]:
    """Parse and check a plan against a group size; returns the plan."""
    plan = parse_plan(faults)
    _check_world_size(world_size)
    for fault in plan:
        fault.validate(world_size)
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


def rank_faults(faults: Any, rank: int, world_size: int) -> tuple[Fault, ...]:
    """The in-rank faults of a plan that act in ``rank``."""
    return tuple(f for f in parse_plan(faults)
                 if f.definition.acts_in_rank and f.resolved_rank(world_size) == rank)


def faulted_ranks(faults: Any, world_size: int) -> frozenset[int]:
    """Ranks targeted by a kill, crash or hang fault (the rest are survivors)."""
    return frozenset(f.resolved_rank(world_size) for f in parse_plan(faults)
                     if f.definition.targets_rank)


# --- trigger matching: the one place that decides "due now" and "fires once" -----------

class TriggerCounter:
    """Counts one rank's calls (ops, ``step``, ``init``) and says which faults are due.

    A fault fires at most once, except one whose kind ``repeats`` it (delay every=true):
    that one fires on every counted call from its trigger on.  ``collective`` counts every
    call in ``COLLECTIVE_OPS``; record each user-visible call once.  Thread-safe: a timer
    thread (``due_at``) and the rank's main thread (``record``) both use it.
    """

    def __init__(self, faults: Any = (), *, rank: int | None = None,
                 world_size: int | None = None) -> None:
        plan = parse_plan(faults)
        if rank is not None:
            if world_size is None:
                raise TypeError("TriggerCounter(rank=...) needs world_size to resolve default ranks")
            plan = rank_faults(plan, rank, world_size)
        self.faults = plan
        # Resolved once: record() runs on every op of the rank.
        triggers = [(i, f.resolved_at()) for i, f in enumerate(plan)]
        self._calls = [(i, *at.counted) for i, at in triggers if at is not None and at.counted]
        self._times = [(i, at.seconds) for i, at in triggers if at is not None and at.kind == "time"]
        self._counts: Counter[str] = Counter()
        self._fired: set[int] = set()  # indices: equal faults in one plan fire separately
        self._lock = threading.Lock()

    def count(self, name: str) -> int:
        return self._counts[name]

    def record(self, name: str) -> tuple[Fault, ...]:
        """Count one call of ``name`` (an op, ``step`` or ``init``); return the faults due."""
        with self._lock:
            self._counts[name] += 1
            if name in COLLECTIVE_OPS:
                self._counts["collective"] += 1
            due = []
            for i, watched, n in self._calls:
                if watched != name and not (watched == "collective" and name in COLLECTIVE_OPS):
                    continue
                seen, fault = self._counts[watched], self.faults[i]
                if seen == n or (seen > n and fault.definition.repeats(fault)):
                    self._fired.add(i)
                    due.append(fault)
            return tuple(due)

    def due_at(self, elapsed: float) -> tuple[Fault, ...]:
        """The ``t=`` faults whose time has come by ``elapsed`` seconds, each returned once."""
        with self._lock:
            due = [i for i, s in self._times if s <= elapsed and i not in self._fired]
            self._fired.update(due)
            return tuple(self.faults[i] for i in due)

    def next_time(self) -> float | None:
        """Seconds of the earliest ``t=`` fault not yet fired (for a timer), or None."""
        with self._lock:
            return min((s for i, s in self._times if i not in self._fired), default=None)

    def pending(self) -> tuple[Fault, ...]:
        """Faults that have not fired (yet)."""
        with self._lock:
            return tuple(f for i, f in enumerate(self.faults) if i not in self._fired)
