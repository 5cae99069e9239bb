"""Fault kinds, spec strings and triggers.

- ``spec``: the grammar and values (``Fault``, plans);
- ``triggers``: when a fault fires (``Trigger``); ``counter``: the counter that decides it;
- ``params``: the value types and ``Param`` that kinds declare themselves with;
- ``base``: what a kind is (``FaultKind``) and the capabilities it carries out its
  action through (``InRank``, ``HarnessSide``), and the registry;
- one module per family of kinds: ``process`` (in the rank), ``harness`` (the run's
  rendezvous), ``network`` (the store's path, through Toxiproxy), ``storage`` (the
  checkpoint save or load it is due on).

Adding a kind touches its family's module (and its tests): it declares its params,
with what fuzzing draws for each, and carries out its own action.

Imported by the pytest process and inside rank processes: stdlib only (no torch, no pytest).
"""
from __future__ import annotations

from pytest_ddpfault.errors import FaultSpecError
# Registration order is the order of simplicity that fuzzing shrinks toward: a killed
# rank before a frozen one, process faults before harness and network ones.
from pytest_ddpfault.faults import process, storage, harness, network  # noqa: F401,I001  (registers the kinds)
from pytest_ddpfault.faults.base import (
    CAPABILITIES, KINDS, FaultKind, HarnessSide, InRank, OnStorageCall, RunAction, RunControl, StorageCall,
    kind_names, kinds_with, storage_call,
)
from pytest_ddpfault.faults.params import Fuzz, Param
from pytest_ddpfault.faults.spec import (
    Fault, check_nodes, faulted_ranks, format_plan, parse_plan, rank_faults, split_spec, split_top_level, validate_plan,
)
from pytest_ddpfault.faults.counter import TriggerCounter
from pytest_ddpfault.faults.triggers import COLLECTIVE_OPS, KNOWN_OPS, STORAGE_FORMS, Trigger

FAULT_KIND_NAMES = kind_names()

__all__ = [
    "CAPABILITIES", "COLLECTIVE_OPS", "FAULT_KIND_NAMES", "KINDS", "KNOWN_OPS", "Fault", "FaultKind",
    "FaultSpecError", "Fuzz", "HarnessSide", "InRank", "OnStorageCall", "Param", "RunAction", "RunControl",
    "STORAGE_FORMS", "StorageCall", "Trigger", "TriggerCounter", "check_nodes", "faulted_ranks", "format_plan", "kinds_with",
    "parse_plan", "rank_faults", "split_spec", "split_top_level", "storage_call", "validate_plan",
]
