"""When a fault fires: ``Trigger``, its grammar and value, and the ops it counts.

Stdlib only: imported by the pytest process and inside rank processes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pytest_ddpfault.errors import FaultSpecError
from pytest_ddpfault.faults._words import did_you_mean, missing_hash

__all__ = ["ALL_FORMS", "COLLECTIVE_OPS", "COUNTED_FORMS", "KNOWN_OPS", "STORAGE_FORMS", "TRIGGER_FORMS", "Trigger"]

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

TRIGGER_FORMS = {"init": "init", "op": "OP or OP#N (e.g. all_reduce#1)",
                  "step": "step#N", "time": "t=SECONDS", "save": "save#N", "load": "load#N"}
# Checkpoint calls in the rank: torch.save and dcp save/async_save count as `save`,
# torch.load and dcp load as `load`. Counted names, not collectives.
STORAGE_FORMS = ("save", "load")
# Forms counted by name and call number (`step#3`, `save#2`); `op` also carries the op name.
COUNTED_FORMS = ("step", *STORAGE_FORMS)
ALL_FORMS = ", ".join(TRIGGER_FORMS.values())


@dataclass(frozen=True)
class Trigger:
    """When a fault fires: ``init``, the Nth call of an op, the Nth ``step()``, or ``t=S``."""

    kind: str                      # "init" | "op" | "step" | "time" | "save" | "load"
    op: str | None = None          # the op name, for kind "op"
    n: int | None = None           # the call number (from 1), for "op" and the COUNTED_FORMS
    seconds: float | None = None   # for "time"

    def __post_init__(self) -> None:
        # The one validator: parse() builds through it, and so do Python callers.
        counted = self.kind == "op" or self.kind in COUNTED_FORMS
        if self.kind not in TRIGGER_FORMS or (self.op is not None) != (self.kind == "op") \
                or (self.n is not None) != counted or (self.seconds is not None) != (self.kind == "time"):
            raise FaultSpecError(f"not a trigger: {self!r}; triggers are {ALL_FORMS}")
        if self.kind == "op" and self.op not in KNOWN_OPS:
            names = KNOWN_OPS | set(COUNTED_FORMS)
            hint = missing_hash(str(self.op), names) or did_you_mean(str(self.op), names | {"init"})
            raise FaultSpecError(f"unknown op {self.op!r}{hint}; triggers are {ALL_FORMS}; "
                                 f"OP is one of: {', '.join(sorted(KNOWN_OPS))}")
        if counted and (isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1):
            raise FaultSpecError(f"calls count from 1: the first call is {self.op or self.kind}#1")
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
            raise FaultSpecError(f"expected a trigger ({ALL_FORMS}), got {type(text).__name__} {text!r}")
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
            raise FaultSpecError(f"expected one of {ALL_FORMS}")
        name, count = m.groups()
        if name == "init":
            raise FaultSpecError("init happens once: write at=init, without a call number")
        if count is not None and not count.strip().isdecimal():
            raise FaultSpecError(f"the call number must be a whole number >= 1, e.g. {name}#1")
        n = 1 if count is None else int(count)
        return cls(name, n=n) if name in COUNTED_FORMS else cls("op", op=name, n=n)

    @property
    def counted(self) -> tuple[str, int] | None:
        """(what is counted, at which call) for call-driven triggers; None for ``t=``."""
        if self.kind == "time":
            return None
        return (self.op if self.kind == "op" else self.kind), (self.n or 1)

    def __str__(self) -> str:
        if self.n is not None:
            return f"{self.op or self.kind}#{self.n}"
        return f"t={self.seconds!r}" if self.kind == "time" else "init"
