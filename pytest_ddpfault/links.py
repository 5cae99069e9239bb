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

__all__ = ["NODE_NET", "PROXY_HOST", "LinkProxies", "LinkProxy", "crossing", "install", "installed", "node_address",
           "node_of_address", "scopes"]

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
                 nodes: int) -> None:
        self.api, self.proxies, self.world_size, self.nodes = api, proxies, world_size, nodes

    @classmethod
    def create(cls, api: ToxiproxyAPI, plan: Iterable[Any], world_size: int, nodes: int,
               deadline: Deadline) -> LinkProxies | None:
        """One proxy per link some fault of ``plan`` crosses; None when none does."""
        links: set[tuple[int, int]] = set()
        for fault in plan:
            links |= crossing(fault.definition.scope_ranks(fault, world_size, nodes), world_size)
        if not links:
            return None
        table = cls(api, {}, world_size, nodes)
        run = f"ddpfault_link_{os.getpid()}_{next(_names)}"
        try:
            for a, b in sorted(links):
                name = f"{run}_{a}_{b}"
                info = api.call("POST", "/proxies", {"name": name, "upstream": _UNSET_UPSTREAM,
                                                     "listen": f"{PROXY_HOST}:0"}, deadline)
                table.proxies[(a, b)] = LinkProxy(a, b, name, info["listen"], api)
        except BaseException:
            table.close(deadline)
            raise
        return table

    def set_deadline(self, deadline: Deadline) -> None:
        for proxy in self.proxies.values():
            proxy.deadline = deadline

    def between(self, a: int, b: int) -> LinkProxy | None:
        return self.proxies.get((min(a, b), max(a, b)))

    def place(self, rank: int, address: bytes) -> int | None:
        """The place (``node * per_node + local rank``) of the process with ``rank`` whose gloo
        listens on ``address``: its rank under ``ddp.run``; under multi-node torchrun, where
        ranks are given anew at each rendezvous, the same place for the same node's worker."""
        node = node_of_address(address)
        per_node = self.world_size // self.nodes
        return None if node is None or node >= self.nodes else node * per_node + rank % per_node

    def of_fault(self, fault: Any) -> list[LinkProxy]:
        """The proxies of the links ``fault`` crosses, by link."""
        side = fault.definition.scope_ranks(fault, self.world_size, self.nodes)
        return [self.proxies[link] for link in sorted(crossing(side, self.world_size))]

    def close(self, deadline: Deadline | None = None) -> None:
        for proxy in self.proxies.values():
            proxy.close(deadline)

    # -- to the ranks ---------------------------------------------------------------
    def to_wire(self) -> dict:
        return {"url": self.api.url, "world_size": self.world_size, "nodes": self.nodes,
                "proxies": [[p.a, p.b, p.name, p.listen] for p in self.proxies.values()]}

    @classmethod
    def from_wire(cls, wire: dict) -> LinkProxies:
        api = ToxiproxyAPI(wire["url"])
        proxies = {(a, b): LinkProxy(a, b, name, listen, api) for a, b, name, listen in wire["proxies"]}
        return cls(api, proxies, wire["world_size"], wire["nodes"])


_installed: LinkProxies | None = None


def install(table: LinkProxies | None) -> None:
    """This rank's table (what its in-rank-triggered faults and its gloo use)."""
    global _installed
    _installed = table


def installed() -> LinkProxies | None:
    return _installed
