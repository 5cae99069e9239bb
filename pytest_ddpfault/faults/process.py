"""Process faults, carried out inside the target rank: kill, crash, freeze, delay."""
from __future__ import annotations

import builtins
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pytest_ddpfault.errors import FaultSpecError
from pytest_ddpfault.faults._words import more_nodes
from pytest_ddpfault.faults.base import InRank, register
from pytest_ddpfault.faults.params import (
    BOOL, POSITIVE_SECONDS, RANK, SECONDS, SHORT, ExceptionName, Fuzz, Number, Param, SignalName, Text, at_param,
)

if TYPE_CHECKING:
    from pytest_ddpfault.faults.spec import Fault

RANK_AT = at_param("collective#1", "init", "op", "step", "time", "save", "load")
NODE = Param("node", Number(int), None, "the node it acts on (default: the last node)")
# How long the node's first rank waits for the harness to signal the whole node at once;
# where no harness does (a plan outside ddp.run), the rank then signals itself.
NODE_SIGNAL_WAIT = 10.0


class _Targeting(InRank):
    targets_rank = True   # the rank it hits is not a survivor


@register
class KillRank(_Targeting):
    name = "kill_rank"
    doc = "the rank sends itself `signal` at the trigger"
    params = (RANK, RANK_AT, Param("signal", SignalName(), "SIGKILL", "signal name or number",
                                   Fuzz.of("SIGKILL", "SIGTERM", "SIGSEGV")))

    def event_fields(self, fault: Fault) -> dict[str, Any]:
        # sent before the signal: whoever reads the events knows what ended the process
        return {"kills_with": int(signal.Signals[fault.get("signal")])}

    def fire_in_rank(self, fault: Fault) -> None:
        os.kill(os.getpid(), signal.Signals[fault.get("signal")])


@register
class KillNode(_Targeting):
    name = "kill_node"
    doc = ("every rank of the node gets `signal` at the same moment (a machine lost); "
           "the trigger counts in the node's first rank")
    needs_harness = True   # the harness signals the node's ranks: not from DDPFAULT_PLAN
    params = (NODE, RANK_AT, Param("signal", SignalName(), "SIGKILL", "signal name or number",
                                   Fuzz.of("SIGKILL", "SIGTERM")),
              Param("agent_only", BOOL, False, "ddp.torchrun with nnodes > 1: signal the node's torchrun "
                    "agent alone, its workers are left to what follows", Fuzz.never()))

    def orphans_workers(self, fault: Fault) -> bool:
        return fault.get("agent_only")

    def check_group_run(self, fault: Fault) -> None:
        if fault.get("agent_only"):  # ddp.run's ranks have no agent: nothing would happen
            raise FaultSpecError(f"agent_only=true needs torchrun agents: give the plan to "
                                 f"ddp.torchrun(..., nnodes=2 or more, faults=...), not to ddp.run or the marker "
                                 f"(in fault spec {str(fault)!r})")

    def _node(self, fault: Fault, nodes: int) -> int:
        node = fault.get("node")
        return nodes - 1 if node is None else node

    def check_group(self, fault: Fault, world_size: int, nodes: int) -> None:
        node = fault.get("node")
        if node is not None and node >= nodes:
            raise FaultSpecError(f"node {node} is outside the group (nodes={nodes}): allowed 0..{nodes - 1}; "
                                 f"{more_nodes(node, world_size, 'kill_rank(rank=N)')} (in fault spec {str(fault)!r})")

    def acting_rank(self, fault: Fault, world_size: int, nodes: int) -> int:
        return self._node(fault, nodes) * (world_size // nodes)

    def target_ranks(self, fault: Fault, world_size: int, nodes: int) -> frozenset[int]:
        first = self.acting_rank(fault, world_size, nodes)
        return frozenset(range(first, first + world_size // nodes))

    def event_fields(self, fault: Fault) -> dict[str, Any]:
        # sent by the node's first rank: the harness signals every rank of that rank's node at once
        sig = int(signal.Signals[fault.get("signal")])
        if fault.get("agent_only"):
            return {"signals_agent": sig}
        return {"signals_node": sig, "kills_with": sig}

    def fire_in_rank(self, fault: Fault) -> None:
        if fault.get("agent_only"):  # the launcher signals the agent; this worker goes on
            return
        # The harness signals this rank with the others of its node; wait for it (bounded).
        threading.Event().wait(NODE_SIGNAL_WAIT)
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


@register
class CrashRank(_Targeting):
    name = "crash_rank"
    doc = "the rank raises `exc(message)`, or with `code` writes message and calls os._exit(code)"
    params = (RANK, RANK_AT,
              Param("exc", ExceptionName(), "RuntimeError", "exception class to raise",
                    Fuzz.of("RuntimeError", "ValueError", "OSError")),
              Param("message", Text(), "crash_rank injected by pytest-ddpfault", "its message",
                    Fuzz.never()),
              Param("code", Number(int, hi=255), None, "exit code: exit instead of raising", Fuzz.between(0, 3)))

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


@register
class HangRank(_Targeting):
    name = "hang_rank"
    doc = "the rank stops itself with SIGSTOP (sockets stay open); the harness may SIGCONT it"
    freezes_rank = True
    params = (RANK, RANK_AT,
              Param("resume_after", POSITIVE_SECONDS, None, "seconds until SIGCONT (default: never)", SHORT))

    def event_fields(self, fault: Fault) -> dict[str, Any]:
        # sent before the SIGSTOP: the harness learns the rank is frozen, and when to resume it
        return {"freezes": True, "resume_after": fault.get("resume_after")}

    def acts_for(self, fault: Fault, trigger: str) -> float | None:
        return fault.get("resume_after")

    def fire_in_rank(self, fault: Fault) -> None:
        os.kill(os.getpid(), signal.SIGSTOP)


@register
class Delay(InRank):
    name = "delay"
    doc = "the rank sleeps before the op (a straggler: it stays a survivor)"
    # No t=: a delay acts before a call, and a clock has no call to hold back.
    params = (RANK, at_param("collective#1", "init", "op", "step", "save", "load"),
              Param("seconds", SECONDS, 1.0, "seconds to sleep", SHORT),
              Param("every", BOOL, False, "sleep before every call from the trigger on", Fuzz.of(False, True)))

    def repeats(self, fault: Fault) -> bool:
        return fault.get("every")

    def acts_for(self, fault: Fault, trigger: str) -> float:
        return fault.get("seconds")

    def fire_in_rank(self, fault: Fault) -> None:
        time.sleep(fault.get("seconds"))
