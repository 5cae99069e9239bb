"""Harness-side faults on the run's rendezvous: a port collision, a dead store and a rank
started with the wrong environment.

Each kind declares itself and returns its ``RunAction``; the run drives the action
through its moments (see ``base.RunAction``).
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pytest_ddpfault.faults.base import HarnessSide, RunAction, RunControl, register
from pytest_ddpfault.errors import FaultSpecError
from pytest_ddpfault.faults.params import (
    POSITIVE_SECONDS, SHORT, Choice, Fuzz, Invalid, Number, Param, ValueType, at_param,
)

if TYPE_CHECKING:
    from pytest_ddpfault.faults.spec import Fault


def release_trigger(fault: Fault) -> str:
    """The trigger of the event that records the port's release ``hold_for`` after the start."""
    return f"t={fault.get('hold_for')}"


class HeldPort(RunAction):
    sock: socket.socket | None = None

    def before_ranks(self, setup) -> None:
        # No SO_REUSEADDR: with it, rank 0's own bind would succeed beside ours.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((self.run.master_addr, 0))
        if self.fault.get("mode") == "listen":
            self.sock.listen(64)  # the kernel completes handshakes; nobody ever answers
        self.port = self.sock.getsockname()[1]
        self.run.host_store_in_rank0(self.port)

    def after_ranks(self) -> None:
        self.fire(detail=f"{self.fault.get('mode')} on port {self.port}", trigger="start")
        hold_for = self.fault.get("hold_for")
        if hold_for:
            self.run.at(hold_for, self.release)

    def release(self) -> None:
        if self.sock is not None:
            self.cleanup()
            self.fire(detail="released the port", trigger=release_trigger(self.fault))

    def cleanup(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@register
class PortCollision(HarnessSide):
    name = "port_collision"
    doc = "a foreign socket holds MASTER_PORT from before the ranks start; rank 0 hosts the store"
    before_ranks = once_per_plan = True
    params = (Param("mode", Choice("listen", "bind"), "listen",
                    "listen: accepts, never answers; bind: bound, not listening", Fuzz.of("listen", "bind")),
              Param("hold_for", POSITIVE_SECONDS, None, "seconds from the ranks' start to release", SHORT))
    refused = {"rank": "the port is the whole group's",
               "at": "the port is held from before the ranks start (use hold_for=S to release it)"}

    def acts_for(self, fault: Fault, trigger: str) -> float | None:
        return 0.0 if trigger == release_trigger(fault) else fault.get("hold_for")

    def action(self, fault: Fault, run: RunControl) -> RunAction:
        return HeldPort(fault, run)


class StopStore(RunAction):
    def after_ranks(self) -> None:
        self.run.at(self.fault.resolved_at().seconds, self._down)

    def _down(self) -> None:
        self.run.stop_store()
        self.fire(detail="store host killed")


@register
class StoreDown(HarnessSide):
    name = "store_down"
    doc = "the harness kills its store host at the trigger: the kernel closes every connection"
    params = (at_param("t=1.0", "time"),)

    def acts_for(self, fault: Fault, trigger: str) -> None:
        return None  # the store stays down

    def action(self, fault: Fault, run: RunControl) -> RunAction:
        return StopStore(fault, run)


class LoopbackAddress(ValueType):
    form = "an IPv4 address inside 127.0.0.0/8, such as 127.0.9.9"

    def parse(self, value: Any) -> str:
        try:
            address = ipaddress.IPv4Address(str(value).strip())
        except ValueError:
            raise Invalid() from None
        if not address.is_loopback:
            raise Invalid("; every address the plugin uses stays on loopback")
        return str(address)

    def format(self, value: Any) -> str:
        return str(value)


MISCONFIGURED = ("world_size", "master_addr", "master_port")
UNSERVED_ADDR = "127.0.9.9"   # a loopback address nothing here listens on


def wrong_variable(fault: Fault) -> tuple[str, Any]:
    """The environment variable a misconfig fault sets wrongly, and its value."""
    key = next((k for k in MISCONFIGURED if fault.get(k) is not None), "master_addr")
    return key.upper(), fault.get(key) or UNSERVED_ADDR


class WrongEnv(RunAction):
    def before_launch(self) -> None:
        variable, value = wrong_variable(self.fault)
        ranks = sorted(self.fault.definition.target_ranks(self.fault, self.run.world_size, self.run.nodes))
        self.run.override_env(ranks, {variable: str(value)})
        who = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        self.run.record(self.fault.kind, ranks[0], "start", str(self.fault), f"{who} started with {variable}={value}")


@register
class Misconfig(HarnessSide):
    name = "misconfig"
    doc = ("one rank (or every rank of a node) starts with a wrong WORLD_SIZE, MASTER_ADDR or MASTER_PORT "
           "in its environment: the init-time mistakes behind many 'init_process_group hangs' reports")
    targets_rank = True
    params = (Param("rank", Number(int), None, "the rank started wrongly (default: the last rank)"),
              Param("node", Number(int), None, "every rank of this node started wrongly (instead of rank=)"),
              Param("world_size", Number(int, lo=1), None, "the WORLD_SIZE it is given", Fuzz.never()),
              Param("master_addr", LoopbackAddress(), None, f"the MASTER_ADDR it is given (without any of the "
                    f"three: {UNSERVED_ADDR}, which nobody serves)", Fuzz.never()),
              Param("master_port", Number(int, lo=1, hi=65535), None, "the MASTER_PORT it is given", Fuzz.never()))
    refused = {"at": "the environment is wrong from the rank's start"}

    def check(self, values: Mapping[str, Any]) -> None:
        given = [k for k in MISCONFIGURED if k in values]
        if len(given) > 1:
            raise FaultSpecError(f"{self.name}: give one of {', '.join(f'{k}=' for k in MISCONFIGURED)} "
                                 f"(got {', '.join(given)})")
        if "rank" in values and "node" in values:
            raise FaultSpecError(f"{self.name}: give rank= or node=, not both")

    def check_group(self, fault: Fault, world_size: int, nodes: int) -> None:
        super().check_group(fault, world_size, nodes)
        node = fault.get("node")
        if node is not None and node >= nodes:
            raise FaultSpecError(f"node {node} is outside the group (nodes={nodes}): allowed 0..{nodes - 1}"
                                 f"{' (add nodes=N to the marker)' if nodes == 1 else ''} (in fault spec {str(fault)!r})")
        if fault.get("world_size") == world_size:
            raise FaultSpecError(f"world_size={world_size} is the group's own: give another "
                                 f"(in fault spec {str(fault)!r})")

    def acting_rank(self, fault: Fault, world_size: int, nodes: int) -> int:
        node = fault.get("node")
        if node is not None:
            return node * (world_size // nodes)
        return world_size - 1 if fault.rank is None else fault.rank

    def target_ranks(self, fault: Fault, world_size: int, nodes: int) -> frozenset[int]:
        first = self.acting_rank(fault, world_size, nodes)
        return frozenset(range(first, first + world_size // nodes)) if fault.get("node") is not None \
            else frozenset({first})

    def action(self, fault: Fault, run: RunControl) -> RunAction:
        return WrongEnv(fault, run)
