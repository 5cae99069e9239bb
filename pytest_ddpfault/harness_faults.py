"""The harness-side part of faults: what the pytest process does, not the rank.

One small class per kind, registered by name. Each gets four moments: before the
store starts (``before_ranks``), once the store (and its proxy) is up but before the
ranks start (``before_launch``), once they exist (``after_ranks``, where it schedules
its timers on the run's clock) and ``cleanup`` (always called, also on failure).
Network kinds live in ``network.py`` and register themselves here too.
"""
from __future__ import annotations

import socket

ACTIONS: dict[str, type] = {}


def register(kind: str):
    def deco(cls):
        ACTIONS[kind] = cls
        return cls
    return deco


def action_for(fault, run):
    cls = ACTIONS.get(fault.kind)
    return None if cls is None else cls(fault, run)


class HarnessAction:
    def __init__(self, fault, run) -> None:
        self.fault, self.run = fault, run

    def before_ranks(self, setup) -> None:
        pass

    def before_launch(self) -> None:
        pass

    def after_ranks(self) -> None:
        pass

    def cleanup(self) -> None:
        pass

    def fire(self, detail: str = "", trigger: str | None = None) -> None:
        at = self.fault.resolved_at()
        self.run.record(self.fault.kind, None, trigger or (str(at) if at else "start"), str(self.fault), detail)


@register("port_collision")
class PortCollision(HarnessAction):
    """A foreign socket holds MASTER_PORT before the ranks start; rank 0 hosts the store."""

    sock: socket.socket | None = None

    def before_ranks(self, setup) -> None:
        # No SO_REUSEADDR: with it, rank 0's own bind would succeed beside ours.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        if self.fault.get("mode") == "listen":
            self.sock.listen(64)  # the kernel completes handshakes; nobody ever answers
        self.run.master_port = self.sock.getsockname()[1]
        self.run.use_agent_store = False

    def after_ranks(self) -> None:
        self.fire(detail=f"{self.fault.get('mode')} on port {self.run.master_port}", trigger="start")
        hold_for = self.fault.get("hold_for")
        if hold_for:
            self.run.at(hold_for, self.release)

    def release(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.run.record("port_collision", None, f"t={self.fault.get('hold_for')}", str(self.fault),
                            "released the port")

    def cleanup(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@register("store_down")
class StoreDown(HarnessAction):
    """The harness kills its store host at the trigger: the kernel closes every connection."""

    def after_ranks(self) -> None:
        self.run.at(self.fault.resolved_at().seconds, self._down)

    def _down(self) -> None:
        self.run.kill_store()
        self.fire(detail="store host killed")


from pytest_ddpfault import network  # noqa: E402,F401  (registers the network kinds)
