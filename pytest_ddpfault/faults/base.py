"""What a fault kind is: ``FaultKind`` (the declaration) and the capabilities a kind
implements to carry out its action, plus the registry of kinds by name.

A kind is one class. It declares its params, trigger forms and refusals, and carries
out its action through the capability it subclasses:

- ``InRank``: ``fire_in_rank(fault)`` runs inside the target rank when its trigger comes
  (kill, crash, freeze, delay); ``event_fields(fault)`` tells the harness what it must
  know when it fired (a frozen rank, a scheduled resume).
- ``HarnessSide``: ``action(fault, run)`` returns a ``RunAction`` that the parent drives
  through the moments of one run (before the store, before the ranks, after, clean-up).
  ``run`` is anything with the ``RunControl`` methods: the kind never reaches into the
  harness's state.
- ``OnStorageCall`` (an ``InRank``): the action is carried out on the checkpoint save or
  load it is due on (``save#N``/``load#N``): ``act_on_call(fault, call)`` gets that call
  (``StorageCall``: what the rank's wrapper offers) and may write part of it, fail it or
  hold it back.

Other code asks a kind what it can do (``isinstance(kind, InRank)``, ``kind.targets_rank``),
never what it is called. Stdlib only: imported in the pytest process and inside ranks.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Protocol

from pytest_ddpfault.errors import FaultSpecError
from pytest_ddpfault.faults._words import did_you_mean, show
from pytest_ddpfault.faults.params import Param
from pytest_ddpfault.faults.triggers import Trigger

__all__ = ["CAPABILITIES", "KINDS", "FaultKind", "HarnessSide", "InRank", "OnStorageCall", "PlannedFault",
           "RunAction", "RunControl", "StorageCall", "kind_named", "kind_names", "kinds_with", "register",
           "storage_call"]

KINDS: dict[str, FaultKind] = {}
CAPABILITIES = ("acts_in_rank", "targets_rank", "harness_side", "needs_proxy", "before_ranks",
                "takes_rank", "takes_at", "is_toxic", "once_per_plan", "freezes_rank", "acts_on_storage",
                "needs_harness")


class PlannedFault(Protocol):
    """What a kind is given of one fault of its kind (``spec.Fault`` is one): a protocol,
    because ``spec`` builds its faults from the kinds declared here and imports this module."""

    @property
    def kind(self) -> str: ...
    @property
    def rank(self) -> int | None: ...
    def get(self, key: str) -> Any: ...
    def resolved_at(self) -> Trigger | None: ...


def register(cls: type[FaultKind]) -> type[FaultKind]:
    """Class decorator: one instance of the kind, registered under its name."""
    if cls.name in KINDS:
        raise ValueError(f"fault kind {cls.name!r} is registered twice")
    KINDS[cls.name] = cls()
    return cls


class FaultKind:
    """A fault kind's declaration: params (in print order), trigger forms, refusals, flags."""

    name: ClassVar[str] = ""
    doc: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = ()   # declared order = canonical print order
    refused: ClassVar[Mapping[str, str]] = {}  # key -> why this kind does not take it
    targets_rank: ClassVar[bool] = False       # its rank counts as faulted, not a survivor
    freezes_rank: ClassVar[bool] = False       # its rank stays stopped (SIGSTOP) after it fires
    before_ranks: ClassVar[bool] = False       # set up before any rank starts (rank 0 hosts the store)
    needs_proxy: ClassVar[bool] = False        # the store traffic must go through Toxiproxy
    once_per_plan: ClassVar[bool] = False      # two in one plan would clash
    needs_harness: ClassVar[bool] = False      # fires in a rank, and the ddp.run harness completes it
    toxic_type: ClassVar[str | None] = None    # the Toxiproxy toxic it adds, if any

    @property
    def acts_in_rank(self) -> bool:
        return isinstance(self, InRank)

    @property
    def acts_on_storage(self) -> bool:
        return isinstance(self, OnStorageCall)

    @property
    def harness_side(self) -> bool:
        return isinstance(self, HarnessSide)

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
        raise FaultSpecError(f"{self.name} does not take {key!r}{did_you_mean(key, self.keys)}; {takes}")

    def check(self, values: Mapping[str, Any]) -> None:
        """Checks across params (after each was parsed); raise FaultSpecError."""

    def repeats(self, fault: PlannedFault) -> bool:
        """True when the fault fires on every counted call from its trigger on."""
        return False

    def acts_for(self, fault: PlannedFault, trigger: str) -> float | None:
        """How long what it did at a fired event (``trigger``: the event's) goes on, in seconds,
        for the pictures of a run: 0.0 for a moment (a kill, a crash, the event that lifts a
        fault), None for the rest of the run (a freeze never resumed, a partition never healed)."""
        return 0.0

    def orphans_workers(self, fault: PlannedFault) -> bool:
        """True when the fault kills a torchrun agent and leaves its workers running (they
        must not die with it, as the launched run's processes otherwise do)."""
        return False

    def check_group_run(self, fault: PlannedFault) -> None:
        """Checks for a plan the ddp.run harness carries out (not a launched run's); raise FaultSpecError."""

    def check_group(self, fault: PlannedFault, world_size: int, nodes: int) -> None:
        """Checks against the group (``world_size`` ranks on ``nodes`` nodes); raise FaultSpecError."""
        if fault.rank is not None and fault.rank >= world_size:
            raise FaultSpecError(f"rank {fault.rank} is outside the group (world_size={world_size}): "
                                 f"allowed 0..{world_size - 1} (in fault spec {str(fault)!r})")

    def acting_rank(self, fault: PlannedFault, world_size: int, nodes: int) -> int | None:
        """The rank its trigger counts in (default world_size-1); None for kinds without a rank."""
        if not self.takes_rank:
            return None
        return world_size - 1 if fault.rank is None else fault.rank

    def proxies_store(self, fault: PlannedFault) -> bool:
        """Whether it needs the run's store traffic to go through a Toxiproxy proxy."""
        return self.needs_proxy

    def scope_ranks(self, fault: PlannedFault, world_size: int, nodes: int) -> frozenset[int]:
        """The ranks on one side of the cut whose links it acts on (empty: no links)."""
        return frozenset()

    def target_ranks(self, fault: PlannedFault, world_size: int, nodes: int) -> frozenset[int]:
        """The ranks it hits that are not survivors (``targets_rank``)."""
        rank = self.acting_rank(fault, world_size, nodes)
        return frozenset({rank}) if self.targets_rank and rank is not None else frozenset()

    def __repr__(self) -> str:
        return f"<fault kind {self.name}({', '.join(self.keys)})>"


class InRank(FaultKind):
    """Capability: the action runs inside the target rank, before the call it is due on."""

    # The rank tells the harness once the fault is in place, not before: the harness counts
    # ``duration`` from the event's time, and putting a fault on many links takes a while
    # on a loaded machine. Kinds that end the rank (kill, crash) must tell it first.
    reports_when_in_place: ClassVar[bool] = False

    def fire_in_rank(self, fault: PlannedFault) -> None:
        raise NotImplementedError

    def event_fields(self, fault: PlannedFault) -> dict[str, Any]:
        """Extra fields of the fault event the rank sends when it fires (JSON values)."""
        return {}


class StorageCall(Protocol):
    """The checkpoint save or load an ``OnStorageCall`` fault is due on, as the rank's
    wrapper of torch.save / torch.load / torch.distributed.checkpoint offers it."""

    op: str       # "save" or "load"
    api: str      # "torch.save", "torch.load", "dcp.save", "dcp.async_save", "dcp.load"
    target: str   # the path or DCP directory, or "<file object>"

    def write_prefix(self, fraction: float, then: Callable[[], None]) -> None:
        """Save only the first ``fraction`` of this save's bytes where the save would put
        them (a DCP save: its data files cut there, the later ones not written, no
        ``.metadata``), durably, then call ``then()``; the save does not go on. A DCP save
        writes when the call gets there (after its planning collectives)."""

    def fail(self, exc: OSError, opened: bool) -> None:
        """Make the call raise ``exc`` where the filesystem would: at once for torch.save and
        torch.load (``opened``: a save to a path first creates or empties its file, as
        ``open`` does before a write fails), inside the writer or reader of a DCP call (so
        that DCP reports it to every rank as it does a real one)."""


_STORAGE_CALL: contextvars.ContextVar[StorageCall | None] = contextvars.ContextVar("ddpfault_storage_call",
                                                                                    default=None)


@contextlib.contextmanager
def storage_call(call: StorageCall) -> Iterator[StorageCall]:
    """The save or load ``call`` is in progress here: faults that fire now may act on it."""
    token = _STORAGE_CALL.set(call)
    try:
        yield call
    finally:
        _STORAGE_CALL.reset(token)


class OnStorageCall(InRank):
    """Capability: the action is carried out on the save or load call it is due on."""

    def fire_in_rank(self, fault: PlannedFault) -> None:
        call = _STORAGE_CALL.get()
        if call is None:
            raise RuntimeError(f"{fault} acts on a checkpoint save or load, and none is in progress "
                               f"(its trigger is {fault.resolved_at()})")
        self.act_on_call(fault, call)

    def act_on_call(self, fault: PlannedFault, call: StorageCall) -> None:
        raise NotImplementedError


class RunControl(Protocol):
    """What one run offers the harness-side actions (``parent.run.GroupRun`` has these)."""

    store_proxy: Any        # the run's store proxy (toxiproxy client side), when it has one
    link_proxies: Any       # the proxies scoped faults act on (``of_fault(fault)``), when one is scoped
    master_addr: str        # where the ranks find the store (MASTER_ADDR)
    world_size: int
    nodes: int

    def at(self, seconds_from_start: float, callback) -> None: ...
    def record(self, kind: str, rank: int | None, trigger: str, spec: str = "", detail: str = "") -> None: ...
    def host_store_in_rank0(self, port: int) -> None: ...
    def stop_store(self) -> None: ...
    def override_env(self, ranks: list[int], env: dict[str, str]) -> None: ...


class RunAction:
    """One harness-side fault in one run; each moment is optional."""

    def __init__(self, fault: PlannedFault, run: RunControl) -> None:
        self.fault, self.run = fault, run

    def before_ranks(self, setup) -> None:
        """Before the store starts (``setup`` is the set-up deadline)."""

    def before_launch(self) -> None:
        """The store (and its proxy) is up; the ranks are not started yet."""

    def after_ranks(self) -> None:
        """The ranks exist: the run's clock has started (schedule with ``run.at``)."""

    def fired_in_rank(self, seconds_from_start: float) -> None:
        """Its rank reported that it fired there (an in-rank trigger) at that time."""

    def cleanup(self) -> None:
        """Always called, also when the run failed."""

    def fire(self, detail: str = "", trigger: str | None = None) -> None:
        at = self.fault.resolved_at()
        self.run.record(self.fault.kind, None, trigger or (str(at) if at else "start"), str(self.fault), detail)


class HarnessSide(FaultKind):
    """Capability: the parent carries it out around one run; the whole group is hit."""

    refused = {"rank": "it acts on the whole group from the harness"}

    def action(self, fault: PlannedFault, run: RunControl) -> RunAction:
        raise NotImplementedError


def kind_names() -> tuple[str, ...]:
    return tuple(sorted(KINDS))


def kind_named(name: Any) -> FaultKind:
    if isinstance(name, str) and name in KINDS:
        return KINDS[name]
    hint = did_you_mean(name, KINDS) if isinstance(name, str) else ""
    raise FaultSpecError(f"unknown fault kind {show(name)!r}{hint}; kinds: {', '.join(kind_names())}")


def kinds_with(capability: str) -> tuple[str, ...]:
    """Names of the kinds that have ``capability`` (one of ``CAPABILITIES``), sorted."""
    if capability not in CAPABILITIES:
        raise FaultSpecError(f"unknown capability {capability!r}{did_you_mean(capability, CAPABILITIES)}"
                             f"; capabilities: {', '.join(CAPABILITIES)}")
    return tuple(n for n in kind_names() if getattr(KINDS[n], capability))
