"""Scoped network faults under a multi-node ``ddp.torchrun``: the launcher as their harness.

The plan's scoped faults (``partition(nodes=(1,), ...)``) act between virtual nodes on two
kinds of traffic:

- the workers' gloo links, through one Toxiproxy proxy per crossed link
  (``links.LinkProxies``, known by the places of their ends, which stay the same across
  rendezvous; the workers route through them as ``ddp.run`` ranks do), handed to every
  worker in ``DDPFAULT_LINKS``;
- each faulted node's agent's rendezvous traffic: that agent reaches the harness-owned
  rendezvous store through a proxy of its own (the store is on no node: a node cut off
  from the others is cut off from it too).

``at=init`` faults are in place before the agents start; ``t=S`` ones come on the
launcher's clock; an in-rank trigger fires in the counting worker (its links), and the
launcher adds the agents' share and removes it all after ``duration``. The same actions
as ``ddp.run``'s (``faults.network.OnProxies``) drive it: this class is their ``RunControl``.

On the "namespaces" engine (``LaunchedNamespaces``) the node namespaces take the proxies'
place: a partition is kernel routes that cut both traffics (and every other socket).
"""
from __future__ import annotations

import heapq
import itertools
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable

from pytest_ddpfault.deadline import Deadline
from pytest_ddpfault.errors import HarnessError
from pytest_ddpfault.parent.reaping import CLEANUP_BUDGET, kill_with_group
from pytest_ddpfault.links import PROXY_HOST, LinkProxies, NodeProxy, on_plane
from pytest_ddpfault.proxy_calls import ToxiproxyAPI
from pytest_ddpfault.rank import env_plan

_runs = itertools.count()


class AgentStoreLink(NodeProxy):
    """The proxy between node ``node``'s agent and the rendezvous store."""

    @property
    def link(self) -> str:
        return f"agent {self.node}-rendezvous"


class _Table:
    """What ``OnProxies`` acts on: the workers' links and the faulted nodes' agent links."""

    def __init__(self, links: LinkProxies, agent_links: dict[int, AgentStoreLink]) -> None:
        self.links, self.agent_links = links, agent_links

    def node_on_side(self, fault, node: int) -> bool:
        """Whether every worker place of ``node`` is on the faulted side of ``fault``'s cut, and
        the fault acts on the control plane (its agent's rendezvous traffic)."""
        if not on_plane(fault, "store"):
            return False
        side = fault.definition.scope_ranks(fault, self.links.world_size, self.links.nodes)
        per_node = self.links.world_size // self.links.nodes
        return all(p in side for p in range(node * per_node, (node + 1) * per_node))

    def agents_of(self, fault) -> list[AgentStoreLink]:
        return [link for node, link in sorted(self.agent_links.items()) if self.node_on_side(fault, node)]

    def of_fault(self, fault) -> list:
        return [*self.links.of_fault(fault), *self.agents_of(fault)]


class _LaunchedFaults:
    """What both engines share: the timers, the launcher's own fault events, the actions."""

    store_proxy = None   # no store path under torchrun: unscoped network kinds are refused
    master_addr = ""     # the agents' store, not the launcher's: no port_collision under torchrun
    network = "proxies"

    def __init__(self, plan: tuple, nproc: int, nnodes: int) -> None:
        self.faults = [f for f in plan if f.definition.scope_ranks(f, nproc * nnodes, nnodes)]
        self.world_size, self.nodes = nproc * nnodes, nnodes
        self.start = 0.0
        self._timers: list = []
        self._seq = itertools.count()
        self.fired: list[dict] = []          # the launcher's own fault events
        self.actions: list = []

    def before_launch(self) -> None:
        for action in self.actions:
            action.before_launch()

    def started(self, start: float, deadline: Deadline) -> None:
        """The agents are starting: the run's clock (for ``t=S``) starts now."""
        self.start = start
        for action in self.actions:
            action.after_ranks()

    # -- RunControl ------------------------------------------------------------------------
    def at(self, seconds_from_start: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (seconds_from_start, next(self._seq), callback))

    def record(self, kind: str, rank: int | None, trigger: str, spec: str = "", detail: str = "") -> None:
        self.fired.append({"type": "fault", "kind": kind, "rank": rank, "trigger": trigger, "spec": spec,
                           "detail": detail, "time": time.monotonic(), "attempt": 0, "pid": None})

    def host_store_in_rank0(self, port: int) -> None:
        raise RuntimeError("no port_collision under ddp.torchrun")

    def stop_store(self) -> None:
        raise RuntimeError("no store_down under ddp.torchrun")

    # -- while it runs -----------------------------------------------------------------------
    def next_timer(self) -> float | None:
        """The monotonic time of the next timer, or None."""
        return self.start + self._timers[0][0] if self._timers else None

    def tick(self) -> None:
        now = time.monotonic()
        while self._timers and self.start + self._timers[0][0] <= now:
            _, _, callback = heapq.heappop(self._timers)
            callback()

    def on_event(self, ev: dict) -> None:
        """A worker's fault event: one of ours fired in its counting worker (which put it in
        place); its removal comes after ``duration``."""
        for action in self.actions:
            if str(action.fault) == ev.get("spec"):
                self.fired_in_rank(action)
                action.fired_in_rank(max(0.0, ev.get("time", time.monotonic()) - self.start))

    def fired_in_rank(self, action) -> None:
        """What the launcher adds to an in-rank-fired fault (nothing by default)."""


class LaunchedLinkFaults(_LaunchedFaults):
    """One multi-node run's scoped network faults on the proxies engine."""

    def __init__(self, plan: tuple, nproc: int, nnodes: int, api: ToxiproxyAPI, setup: Deadline) -> None:
        super().__init__(plan, nproc, nnodes)
        self.api, self.setup = api, setup
        self._id = next(_runs)
        # the workers' store (this attempt's rank 0 hosts it) through a path per worker place
        links = LinkProxies.create(api, self.faults, nproc * nnodes, nnodes, setup, worker_store=True)
        # plane=store only: no gloo link is crossed, the agents' rendezvous paths are
        self.link_proxies = _Table(links or LinkProxies(api, {}, nproc * nnodes, nnodes), {})
        self.actions = [f.definition.action(f, self) for f in self.faults]

    @classmethod
    def for_plan(cls, plan: tuple, nproc: int, nnodes: int, toxiproxy, setup: Deadline) -> LaunchedLinkFaults | None:
        faults = [item.fault for item in plan]
        if not any(f.definition.scope_ranks(f, nproc * nnodes, nnodes) for f in faults):
            return None
        from pytest_ddpfault.toxiproxy.client import resolve_api

        return cls(tuple(faults), nproc, nnodes, resolve_api(toxiproxy), setup)

    # -- set-up -------------------------------------------------------------------------
    def env(self) -> dict:
        return {env_plan.ENV_LINKS: json.dumps(self.link_proxies.links.to_wire())}

    def rendezvous_endpoint(self, node: int, endpoint: str) -> str:
        """Where node ``node``'s agent finds the rendezvous store: through its own proxy when
        a fault may cut that node off, else the store itself."""
        table = self.link_proxies
        if not any(table.node_on_side(f, node) for f in self.faults):
            return endpoint
        name = f"ddpfault_agent_{os.getpid()}_{self._id}_{node}"
        info = self.api.call("POST", "/proxies", {"name": name, "upstream": endpoint,
                                                  "listen": f"{PROXY_HOST}:0"}, self.setup)
        table.agent_links[node] = AgentStoreLink(node, name, info["listen"], self.api)
        return info["listen"]

    def started(self, start: float, deadline: Deadline) -> None:
        self.link_proxies.links.set_deadline(deadline)
        for proxy in self.link_proxies.agent_links.values():
            proxy.deadline = deadline
        super().started(start, deadline)

    def fired_in_rank(self, action) -> None:
        """The counting worker put it on the workers' links; the agents' share comes now."""
        for proxy in self.link_proxies.agents_of(action.fault):
            action.fault.definition.apply(action.fault, proxy)

    def close(self, deadline: Deadline) -> None:
        for proxy in self.link_proxies.agent_links.values():
            proxy.close(deadline)
        self.link_proxies.links.close(deadline)


class LaunchedNamespaces(_LaunchedFaults):
    """One multi-node run's node namespaces (the "namespaces" engine, ``rank/netns.py``): a
    holder process of their own; each agent (and so its workers) and the rendezvous store
    (in node 0's) start inside them through ``nsenter``. A partition is kernel routes in
    the namespaces: the harness puts ``at=init`` and ``t=S`` ones in place and removes them;
    an in-rank trigger's counting worker puts them in place on both sides itself."""

    network = "namespaces"
    link_proxies = None

    def __init__(self, plan: tuple, nproc: int, nnodes: int, run_dir: str, env: dict, setup: Deadline) -> None:
        from pytest_ddpfault.ipc import EventInbox
        from pytest_ddpfault.netns import unprivileged
        from pytest_ddpfault.rank.netns import NamespaceCuts

        super().__init__(tuple(item.fault for item in plan), nproc, nnodes)
        self.namespaces: NamespaceCuts | None = None
        self.inbox = EventInbox(os.path.join(run_dir, "netns.ev"))
        self.out_path = os.path.join(run_dir, "netns.out")
        with open(self.out_path, "wb") as out:
            self.holder = subprocess.Popen(
                [sys.executable, "-m", "pytest_ddpfault.rank.netns", self.inbox.path, str(nnodes),
                 "1" if unprivileged() else "0", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_ready(nproc, nnodes, setup)
        except BaseException:
            self.close(Deadline.after(CLEANUP_BUDGET))
            raise
        self.actions = [f.definition.action(f, self) for f in self.faults]

    def _wait_ready(self, nproc: int, nnodes: int, setup: Deadline) -> None:
        from pytest_ddpfault.rank.netns import Holders, NamespaceCuts

        while self.namespaces is None:
            ready, _, _ = select.select([self.inbox], [], [], min(setup.remaining(), 0.1))
            for ev in self.inbox.drain() if ready else ():
                if ev.get("type") == "netns_failed":
                    raise HarnessError(f"the node namespaces could not be made: {ev.get('why')}")
                if ev.get("type") == "netns_ready":
                    self.namespaces = NamespaceCuts(Holders(tuple(ev["pids"]), bool(ev["user"])), nproc * nnodes,
                                                    nnodes)
            if self.namespaces is None and (setup.expired() or self.holder.poll() is not None):
                with open(self.out_path, errors="replace") as f:
                    said = f.read()[-800:]
                raise HarnessError(f"the node namespaces were not made "
                                   f"({'the holder ended' if self.holder.poll() is not None else 'in time'}): {said}")

    def nsenter(self, node: int) -> list[str]:
        """The prefix that starts a process in ``node``'s namespace."""
        return self.namespaces.holders.nsenter(node)

    def env(self) -> dict:
        return {env_plan.ENV_NETNS: json.dumps(self.namespaces.to_wire())}

    def close(self, deadline: Deadline) -> None:
        if self.holder.poll() is None:
            kill_with_group(self.holder.pid)
            try:
                self.holder.wait(deadline.remaining())
            except subprocess.TimeoutExpired:  # SIGKILLed: gone once the kernel is done with it
                pass
        self.inbox.close()
