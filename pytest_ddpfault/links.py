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
           "cut_off_nodes", "install", "installed", "node_address", "node_of_address", "on_plane", "route_store", "scopes"]

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

    def stream_from(self, side: Iterable[int]) -> str:
        """The stream carrying bytes from the ranks ``side`` of a cut between this node and
        node 0 (rank 0's): the node's ranks are the store's clients (upstream)."""
        return "downstream" if 0 in set(side) else "upstream"


@dataclass
class StorePath(NodeProxy):
    """Node ``node``'s path to the store on node 0: its ranks' MASTER_PORT (the proxy listens
    on node 0's address, MASTER_ADDR) leads to the store through it. Under a multi-node
    ``ddp.torchrun``, one per worker ``place`` of the node: the worker points it at the
    store its attempt was given (``route_store``), which the launcher cannot know."""

    place: int | None = None

    @property
    def link(self) -> str:
        return f"node {self.node}-store" if self.place is None else f"place {self.place}-store"

    def point_to(self, upstream: str) -> None:
        self.api.set_upstream(self.name, upstream, self.deadline)


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

    def stream_from(self, side: Iterable[int]) -> str:
        """The stream carrying bytes from the ranks ``side``, for a link between two nodes:
        gloo lets the larger address connect, the higher node's rank ``b`` (upstream: from
        the connecting rank to the listener). Inside one node which rank connects is gloo's
        choice (a spec with a direction cannot cut such a link: ``Partition.check_group``)."""
        return "upstream" if self.b in set(side) else "downstream"

    def point_to(self, upstream: str) -> None:
        self.api.set_upstream(self.name, upstream, self.deadline)


class LinkProxies:
    """The proxies of one run's crossed links, by link."""

    def __init__(self, api: ToxiproxyAPI, proxies: dict[tuple[int, int], LinkProxy], world_size: int,
                 nodes: int, store_paths: list[StorePath] | None = None) -> None:
        self.api, self.proxies, self.world_size, self.nodes = api, proxies, world_size, nodes
        self.store_paths: list[StorePath] = store_paths or []

    @classmethod
    def create(cls, api: ToxiproxyAPI, plan: Iterable[Any], world_size: int, nodes: int,
               deadline: Deadline, store: str | None = None, worker_store: bool = False) -> LinkProxies | None:
        """One proxy per link some fault of ``plan`` crosses; None when none does.

        ``store`` (``host:port``, on node 0's address): also one path to it per node some
        fault cuts off from node 0, as on real machines where the store lives with rank 0.
        ``worker_store`` (multi-node torchrun, whose store each attempt's rank 0 hosts): one
        such path per worker place of those nodes, which each worker points at its store."""
        links: set[tuple[int, int]] = set()
        cut_off: set[int] = set()
        for fault in plan:
            side = fault.definition.scope_ranks(fault, world_size, nodes)
            if on_plane(fault, "data"):
                links |= crossing(side, world_size)
            if (store is not None or worker_store) and side and on_plane(fault, "store"):
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
            per_node = world_size // nodes
            for node in sorted(cut_off):
                for place in range(node * per_node, (node + 1) * per_node) if worker_store else (None,):
                    name = f"{run}_store_{node}" + ("" if place is None else f"_{place}")
                    upstream, listen = (store, store.rsplit(":", 1)[0]) if store else (_UNSET_UPSTREAM, node_address(0))
                    info = api.call("POST", "/proxies", {"name": name, "upstream": upstream, "listen": f"{listen}:0"},
                                    deadline)
                    table.store_paths.append(StorePath(node, name, info["listen"], api, place=place))
        except BaseException:
            table.close(deadline)
            raise
        return table

    def set_deadline(self, deadline: Deadline) -> None:
        for proxy in self._all():
            proxy.deadline = deadline

    def _all(self) -> list[ProxyHandle]:
        return [*self.proxies.values(), *self.store_paths]

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
        out = [self.proxies[link] for link in links] + (self.store_paths_of(side) if on_plane(fault, "store") else [])
        for proxy in out:  # the group's shape, for a one-way cut (faults.network.Partition)
            proxy.group = (self.world_size, self.nodes)
        return out

    def store_paths_of(self, side: Iterable[int]) -> list[StorePath]:
        """The store paths a cut around ``side`` crosses (the nodes it separates from node 0)."""
        cut_off = cut_off_nodes(side, self.world_size, self.nodes)
        return [p for p in self.store_paths if p.node in cut_off]

    def store_port(self, node: int) -> int | None:
        """The port node ``node``'s ranks reach the store on, when it has a path of its own."""
        return next((p.port for p in self.store_paths if p.node == node and p.place is None), None)

    def store_path_of_place(self, place: int) -> StorePath | None:
        return next((p for p in self.store_paths if p.place == place), None)

    def store_path_nodes(self) -> list[int]:
        return sorted({p.node for p in self.store_paths})

    def close(self, deadline: Deadline | None = None) -> None:
        for proxy in self._all():
            proxy.close(deadline)

    # -- to the ranks ---------------------------------------------------------------
    def to_wire(self) -> dict:
        return {"url": self.api.url, "world_size": self.world_size, "nodes": self.nodes,
                "proxies": [[p.a, p.b, p.name, p.listen] for p in self.proxies.values()],
                "store_paths": [[p.node, p.place, p.name, p.listen] for p in self.store_paths]}

    @classmethod
    def from_wire(cls, wire: dict) -> LinkProxies:
        api = ToxiproxyAPI(wire["url"])
        proxies = {(a, b): LinkProxy(a, b, name, listen, api) for a, b, name, listen in wire["proxies"]}
        paths = [StorePath(node, name, listen, api, place=place) for node, place, name, listen in wire.get("store_paths", ())]
        return cls(api, proxies, wire["world_size"], wire["nodes"], paths)


_installed: LinkProxies | None = None


def route_store(table: LinkProxies, place: int, env: dict) -> bool:
    """A multi-node torchrun worker at ``place``: when a fault may cut its node off from the
    store, point its store path at the store this attempt was given (``MASTER_ADDR:PORT``)
    and dial the path instead (``env`` is changed). The worker that hosts the store
    (``RANK=0``) keeps it. Returns whether it rerouted."""
    path = table.store_path_of_place(place)
    if path is None or env.get("RANK") == "0" or "MASTER_ADDR" not in env or "MASTER_PORT" not in env:
        return False
    path.point_to(f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}")
    env["MASTER_ADDR"], env["MASTER_PORT"] = path.listen.rsplit(":", 1)
    return True


def install(table: LinkProxies | None) -> None:
    """This rank's table (what its in-rank-triggered faults and its gloo use)."""
    global _installed
    _installed = table


def installed() -> LinkProxies | None:
    return _installed
