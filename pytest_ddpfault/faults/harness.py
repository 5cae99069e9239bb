"""Harness-side faults on the run's rendezvous: a port collision and a dead store.

Each kind declares itself and returns its ``RunAction``; the run drives the action
through its moments (see ``base.RunAction``).
"""
from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from pytest_ddpfault.faults.base import HarnessSide, RunAction, RunControl, register
from pytest_ddpfault.faults.params import POSITIVE_SECONDS, SHORT, Choice, Fuzz, Param, at_param

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
