"""The data plane's proxies: one Toxiproxy proxy per rank-to-rank link that a scoped
network fault crosses (``partition(ranks=(2, 3))``: the links 0-2, 0-3, 1-2, 1-3).

The harness makes them before the ranks start (``LinkProxies.create``: each listens on
127.0.0.1, its upstream not known yet) and hands the table to every rank (``to_wire``).
A rank's gloo publishes its listener's address through the store; of the two ranks of a
crossed link, the one that connects (gloo: the larger address) points the link's proxy at
the peer's real listener and connects to the proxy instead (``rank/gloo_addresses.py``).
A fault acts on the proxies of the links it crosses (``of_fault``), from the harness
(``at=init``, ``t=S``, removal) or from the rank that counts its in-rank trigger.

A run with no scoped fault has no table: its gloo traffic goes straight from rank to rank.
Stdlib only: imported in the pytest process and inside ranks.
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pytest_ddpfault.deadline import Deadline
from pytest_ddpfault.proxy_calls import ProxyHandle, ToxiproxyAPI

__all__ = ["LinkProxies", "LinkProxy", "NODE_NET", "NodeProxy", "PROXY_HOST", "StorePath", "crossing",
           "cut_off_nodes", "install", "installed", "node_address", "node_of_address", "on_plane", "scopes"]

# Virtual node n's loopback address (n < 254 * 250: inside 127.0.0.0/8, never 127.0.0.x).
NODE_NET = 127 << 24 | 7 << 8
# Below every node address (127.0.7.1, ...): gloo lets the larger address connect, so the
# rank that connects to a proxy stays the one that would have connected to the peer.
PROXY_HOST = "127.0.0.1"
_UNSET_UPSTREAM = f"{PROXY_HOST}:9"   # until the connecting rank points the proxy at its peer
_names = itertools.count()


def node_address(node: int) -> str:
    """The IPv4 loopback address of virtual node ``node`` (127.0.7.1 for node 0, ...)."""
    value = NODE_NET + (node // 254) * 256 + node % 254 + 1
    return ".".join(str(value >> shift & 255) for shift in (24, 16, 8, 0))


def node_of_address(packed: bytes) -> int | None:
    """The virtual node whose address ``packed`` (4 bytes, network order) is, else None."""
    offset = int.from_bytes(packed, "big") - NODE_NET
    if not 0 <= offset < 1 << 16 or not 1 <= offset & 255 <= 254:
        return None
    return (offset >> 8) * 254 + (offset & 255) - 1


def scopes(faults: Iterable[Any], world_size: int, nodes: int) -> dict[str, tuple[int, ...]]:
    """spec -> the places (ranks under ``ddp.run``) whose links each scoped fault acts on."""
    out = {}
    for fault in faults:
        side = fault.definition.scope_ranks(fault, world_size, nodes)
        if side:
            out[str(fault)] = tuple(sorted(side))
    return out


def crossing(side: Iterable[int], world_size: int) -> set[tuple[int, int]]:
    """The links (a, b), a < b, between the ranks of ``side`` and every other rank."""
    inside = set(side)
    return {(min(a, b), max(a, b)) for a in inside for b in range(world_size) if b not in inside}


def on_plane(fault: Any, plane: str) -> bool:
    """Whether a scoped fault acts on ``plane`` ("data": gloo links, "store": store paths)."""
    return fault.get("plane") in ("all", plane) if "plane" in fault.definition.keys else True


def cut_off_nodes(side: Iterable[int], world_size: int, nodes: int) -> list[int]:
    """The nodes n >= 1 that a cut around the ranks ``side`` separates from node 0, the
    store's host: node n wholly on one side, node 0 wholly on the other. A cut through a
    node (``ranks=`` naming some of its ranks) separates processes, not hosts: no store path."""
    inside, per_node = set(side), world_size // nodes

    def where(node: int) -> bool | None:  # True: wholly inside, False: wholly outside, None: split
        members = {r in inside for r in range(node * per_node, (node + 1) * per_node)}
        return members.pop() if len(members) == 1 else None

    home = where(0)
    if home is None:
        return []
    return [n for n in range(1, nodes) if where(n) is (not home)]


@dataclass
class NodeProxy(ProxyHandle):
    """A proxy between node ``node`` and a store (``listen`` is where the node dials instead)."""

    node: int
    name: str
    listen: str
    api: ToxiproxyAPI
    deadline: Deadline | None = None

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


class StorePath(NodeProxy):
    """Node ``node``'s path to the store on node 0: its ranks' MASTER_PORT (the proxy listens
    on node 0's address, MASTER_ADDR) leads to the store through it."""

    @property
    def link(self) -> str:
        return f"node {self.node}-store"


@dataclass
class LinkProxy(ProxyHandle):
    """The proxy of the link between ranks ``a`` < ``b``."""

    a: int
    b: int
    name: str
    listen: str                      # host:port the connecting rank dials instead of its peer
    api: ToxiproxyAPI
    deadline: Deadline | None = None  # the run's: no request outlives it

    @property
    def link(self) -> str:
        return f"{self.a}-{self.b}"

    def point_to(self, upstream: str) -> None:
        self.api.set_upstream(self.name, upstream, self.deadline)


class LinkProxies:
    """The proxies of one run's crossed links, by link."""

    def __init__(self, api: ToxiproxyAPI, proxies: dict[tuple[int, int], LinkProxy], world_size: int,
                 nodes: int, store_paths: dict[int, StorePath] | None = None) -> None:
        self.api, self.proxies, self.world_size, self.nodes = api, proxies, world_size, nodes
        self.store_paths: dict[int, StorePath] = store_paths or {}

    @classmethod
    def create(cls, api: ToxiproxyAPI, plan: Iterable[Any], world_size: int, nodes: int,
               deadline: Deadline, store: str | None = None) -> LinkProxies | None:
        """One proxy per link some fault of ``plan`` crosses; None when none does.

        ``store`` (``host:port``, on node 0's address): also one path to it per node some
        fault cuts off from node 0, as on real machines where the store lives with rank 0."""
        links: set[tuple[int, int]] = set()
        cut_off: set[int] = set()
        for fault in plan:
            side = fault.definition.scope_ranks(fault, world_size, nodes)
            if on_plane(fault, "data"):
                links |= crossing(side, world_size)
            if store is not None and side and on_plane(fault, "store"):
                cut_off.update(cut_off_nodes(side, world_size, nodes))
        if not links and not cut_off:
            return None
        table = cls(api, {}, world_size, nodes)
        run = f"ddpfault_link_{os.getpid()}_{next(_names)}"
        try:
            for a, b in sorted(links):
                name = f"{run}_{a}_{b}"
                info = api.call("POST", "/proxies", {"name": name, "upstream": _UNSET_UPSTREAM,
                                                     "listen": f"{PROXY_HOST}:0"}, deadline)
                table.proxies[(a, b)] = LinkProxy(a, b, name, info["listen"], api)
            for node in sorted(cut_off):
                name = f"{run}_store_{node}"
                listen = f"{store.rsplit(':', 1)[0]}:0"
                info = api.call("POST", "/proxies", {"name": name, "upstream": store, "listen": listen}, deadline)
                table.store_paths[node] = StorePath(node, name, info["listen"], api)
        except BaseException:
            table.close(deadline)
            raise
        return table

    def set_deadline(self, deadline: Deadline) -> None:
        for proxy in self._all():
            proxy.deadline = deadline

    def _all(self) -> list[ProxyHandle]:
        return [*self.proxies.values(), *self.store_paths.values()]

    def between(self, a: int, b: int) -> LinkProxy | None:
        return self.proxies.get((min(a, b), max(a, b)))

    def place(self, rank: int, address: bytes) -> int | None:
        """The place (``node * per_node + local rank``) of the process with ``rank`` whose gloo
        listens on ``address``: its rank under ``ddp.run``; under multi-node torchrun, where
        ranks are given anew at each rendezvous, the same place for the same node's worker."""
        node = node_of_address(address)
        per_node = self.world_size // self.nodes
        return None if node is None or node >= self.nodes else node * per_node + rank % per_node

    def of_fault(self, fault: Any) -> list:
        """The proxies of the links ``fault`` crosses, by link, then the store paths it cuts."""
        side = fault.definition.scope_ranks(fault, self.world_size, self.nodes)
        links = sorted(crossing(side, self.world_size)) if on_plane(fault, "data") else []
        return [self.proxies[link] for link in links] + (self.store_paths_of(side) if on_plane(fault, "store") else [])

    def store_paths_of(self, side: Iterable[int]) -> list[StorePath]:
        """The store paths a cut around ``side`` crosses (the nodes it separates from node 0)."""
        return [self.store_paths[n] for n in cut_off_nodes(side, self.world_size, self.nodes)
                if n in self.store_paths]

    def store_port(self, node: int) -> int | None:
        """The port node ``node``'s ranks reach the store on, when it has a path of its own."""
        path = self.store_paths.get(node)
        return None if path is None else path.port

    def close(self, deadline: Deadline | None = None) -> None:
        for proxy in self._all():
            proxy.close(deadline)

    # -- to the ranks ---------------------------------------------------------------
    def to_wire(self) -> dict:
        return {"url": self.api.url, "world_size": self.world_size, "nodes": self.nodes,
                "proxies": [[p.a, p.b, p.name, p.listen] for p in self.proxies.values()],
                "store_paths": [[p.node, p.name, p.listen] for p in self.store_paths.values()]}

    @classmethod
    def from_wire(cls, wire: dict) -> LinkProxies:
        api = ToxiproxyAPI(wire["url"])
        proxies = {(a, b): LinkProxy(a, b, name, listen, api) for a, b, name, listen in wire["proxies"]}
        paths = {node: StorePath(node, name, listen, api) for node, name, listen in wire.get("store_paths", ())}
        return cls(api, proxies, wire["world_size"], wire["nodes"], paths)


_installed: LinkProxies | None = None


def install(table: LinkProxies | None) -> None:
    """This rank's table (what its in-rank-triggered faults and its gloo use)."""
    global _installed
    _installed = table


def installed() -> LinkProxies | None:
    return _installed
