"""The "namespaces" network engine, process side: each virtual node its own Linux network
namespace holding the node's address, so a partition between nodes is the kernel's and cuts
every socket between them, whoever opened it (gloo, the store, the user's own).

One holder process per run (a ``ChildJob`` forked from the zygote, single-threaded:
``hold_main``; under ``ddp.torchrun``, ``python -m pytest_ddpfault.rank.netns``: ``main``)
makes them. Unprivileged, it first makes a user namespace that owns them
(the caller's uid and gid mapped to 0). It forks one child per node that unshares a network
namespace and then only waits (``PR_SET_PDEATHSIG``: it dies with the holder, which dies
with the zygote, which dies with pytest): no namespace is ever bound to a file, so each one
goes with its last process. The holder then configures each node's namespace from inside it:

- ``lo``: 127.0.0.1/32 (not /8: the other nodes' 127.0.7.x addresses must not be local) and
  the node's address (``links.node_address``); ``route_localnet=1`` (loopback addresses on a
  wire);
- a veth pair between every two nodes (``v<i>_<j>`` in node i), a route to each other node's
  address over it (``metric 1000``, source the node's address).

A process joins its node (``enter``) first thing after its fork, before any socket: setns on
the node holder's ``/proc/<pid>/ns/{user,net}``. Unix path sockets (the event inbox, the
zygote's channel) work across network namespaces; TCP to 127.0.0.1 of the root namespace
(the Toxiproxy server, the link proxies) does not.

A partition is a route per cut-off address in the namespaces on one side (``cut_commands``):
into ``void`` (mode=drop: a veth whose frames its peer drops, so packets vanish silently;
TCP retransmits, so once the route goes the held bytes arrive, at its next retransmission) or ``unreachable`` (mode=reject:
connect fails at once with EHOSTUNREACH; the open connections to the far side are then reset
with ``ss -K``, as a refusing proxy closes them; without it they would only stall), each at a
metric of its own below the
link's, so healing deletes exactly that route. The harness (``at=init``, ``t=S``, removal) and
the counting rank (in-rank triggers) run them with ``nsenter`` into the node holders.

Every address stays inside 127.0.0.0/8. Stdlib only: imported by the harness and in ranks.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import select
import signal
import subprocess
import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

from pytest_ddpfault.ipc import EventSink
from pytest_ddpfault.links import node_address
from pytest_ddpfault.rank.lifeline import die_with_parent, set_parent_death_signal

CLONE_NEWNET = 0x40000000
CLONE_NEWUSER = 0x10000000
# A veth without ARP whose frames reach its peer addressed to no one (its own MAC): what is
# routed into it vanishes, silently. (Its peer down instead drops too, but then TCP's
# retransmissions stay stuck after healing until the backoff's next-but-one try.)
VOID = "void"
LINK_METRIC = 1000          # the route between two nodes; a cut's routes lie below it
HOLDER_READY_BUDGET = 10.0  # a node child's unshare
IP_BUDGET = 20.0            # one `ip -batch` (or nsenter + ip) call


class NamespaceError(RuntimeError):
    """A namespace could not be made, joined or changed (the message says which and why)."""


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise NamespaceError(f"{what}: {os.strerror(err)} (errno {err})")


def unshare(flags: int) -> None:
    _check(_libc().unshare(flags), f"unshare({flags:#x})")


def setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc().setns(fd, nstype), f"setns({path})")
    finally:
        os.close(fd)


def ns_inode(pid: int | str, kind: str) -> int:
    return os.stat(f"/proc/{pid}/ns/{kind}").st_ino


def enter(namespaces: Iterable[tuple[str, int]]) -> None:
    """Join each ``(path, CLONE_NEW*)`` in order (a user namespace first): before any socket,
    in a single-threaded process (the zygote's fork)."""
    for path, nstype in namespaces:
        if nstype == CLONE_NEWUSER and os.stat(path).st_ino == os.stat("/proc/self/ns/user").st_ino:
            continue  # already in it
        setns(path, nstype)


@dataclass(frozen=True)
class Holders:
    """One run's node namespaces: node n's is the one of process ``pids[n]``."""

    pids: tuple[int, ...]
    user: bool                 # they belong to a user namespace of their own (unprivileged)

    def join_list(self, node: int) -> tuple[tuple[str, int], ...]:
        """What a process of ``node`` setns's into, in order."""
        pid = self.pids[node]
        own = ((f"/proc/{pid}/ns/user", CLONE_NEWUSER),) if self.user else ()
        return (*own, (f"/proc/{pid}/ns/net", CLONE_NEWNET))

    def nsenter(self, node: int) -> list[str]:
        """The ``nsenter`` prefix into ``node``'s namespace (with the user namespace unless this
        process is already in it)."""
        pid = self.pids[node]
        argv = ["nsenter", f"--net=/proc/{pid}/ns/net"]
        if self.user and ns_inode(pid, "user") != ns_inode("self", "user"):
            argv[1:1] = [f"--user=/proc/{pid}/ns/user", "--preserve-credentials"]
        return argv

    def run_ip(self, node: int, commands: list[str], budget: float = IP_BUDGET) -> None:
        """``ip -batch`` in ``node``'s namespace."""
        if commands:
            _ip(self.nsenter(node), commands, budget, f"node {node}'s namespace (holder pid {self.pids[node]})")

    def abort_sockets(self, node: int, addresses: list[str], budget: float = IP_BUDGET) -> None:
        """Abort (``ss -K``: reset) every TCP socket of ``node``'s namespace whose peer is one
        of ``addresses``: what a refusing cut does to the connections already open."""
        where = f"node {node}'s namespace (holder pid {self.pids[node]})"
        for address in addresses:
            argv = [*self.nsenter(node), "ss", "-K", "-t", "dst", address]
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=budget)
            except subprocess.TimeoutExpired:
                raise NamespaceError(f"ss -K in {where} did not finish within {budget:g} s") from None
            if done.returncode != 0:
                raise NamespaceError(f"ss -K in {where} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")

    def to_wire(self) -> dict:
        return {"pids": list(self.pids), "user": self.user}

    @classmethod
    def from_wire(cls, wire: dict) -> Holders:
        return cls(tuple(wire["pids"]), bool(wire["user"]))


def _ip(prefix: list[str], commands: list[str], budget: float, where: str) -> None:
    try:
        done = subprocess.run([*prefix, "ip", "-batch", "-"], input="\n".join(commands) + "\n", text=True,
                              capture_output=True, timeout=budget)
    except subprocess.TimeoutExpired:
        raise NamespaceError(f"ip in {where} did not finish within {budget:g} s") from None
    if done.returncode != 0:
        raise NamespaceError(f"ip in {where} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}"
                             f"\ncommands:\n" + "\n".join(commands))


# -- partitions -------------------------------------------------------------------

def cut_routes(mode: str, addresses: Iterable[str], metric: int, add: bool) -> list[str]:
    """The ``ip`` commands that cut (``add``) or heal the way to ``addresses`` in one
    namespace: into ``VOID`` for mode=drop (a local ``blackhole`` route would fail a
    connect at once with EINVAL), ``unreachable`` for mode=reject."""
    verb = "add" if add else "del"
    if mode == "drop":
        return [f"route {verb} {address}/32 dev {VOID} metric {metric}" for address in addresses]
    return [f"route {verb} unreachable {address}/32 metric {metric}" for address in addresses]


def cut_commands(side: Iterable[int], nodes: int, direction: str, mode: str, metric: int,
                 add: bool) -> dict[int, list[str]]:
    """node -> its ``ip`` commands for a cut between the nodes of ``side`` and the others:
    ``out`` (nothing from the side reaches the rest) routes in the side's namespaces,
    ``in`` (nothing from the rest reaches the side) in the others', ``both`` in all."""
    inside = set(side)
    outside = [n for n in range(nodes) if n not in inside]
    plan: dict[int, list[str]] = {}
    if direction in ("both", "out"):
        for n in sorted(inside):
            plan[n] = cut_routes(mode, [node_address(m) for m in outside], metric, add)
    if direction in ("both", "in"):
        for n in outside:
            plan[n] = cut_routes(mode, [node_address(m) for m in sorted(inside)], metric, add)
    return plan


@dataclass
class NodeRoutes:
    """What a partition does in one node's namespace: ``cut``/``heal`` its routes."""

    holders: Holders
    node: int
    add: list[str]
    delete: list[str]
    abort: list[str]           # mode=reject: the addresses whose open connections it resets

    @property
    def link(self) -> str:
        return f"node {self.node}'s routes"

    name = link

    def cut(self) -> None:
        self.holders.run_ip(self.node, self.add)
        if self.abort:  # after the routes: no new connection slips in between
            self.holders.abort_sockets(self.node, self.abort)

    def heal(self) -> None:
        self.holders.run_ip(self.node, self.delete)


class NamespaceCuts:
    """One run's node namespaces, as the scoped network faults see them (``of_fault``, as
    ``links.LinkProxies`` for the proxies engine)."""

    def __init__(self, holders: Holders, world_size: int, nodes: int) -> None:
        self.holders, self.world_size, self.nodes = holders, world_size, nodes

    def nodes_of(self, side: Iterable[int]) -> list[int] | None:
        """The nodes the ranks of ``side`` make up, or None when it splits a node (routes
        separate namespaces, not the processes inside one)."""
        inside, per_node = set(side), self.world_size // self.nodes
        whole = sorted({r // per_node for r in inside})
        if any(set(range(n * per_node, (n + 1) * per_node)) - inside for n in whole):
            return None
        return whole

    def of_fault(self, fault) -> list[NodeRoutes]:
        side = self.nodes_of(fault.definition.scope_ranks(fault, self.world_size, self.nodes))
        if side is None:
            raise NamespaceError(f"{fault} cuts through a node; routes act between namespaces (whole nodes)")
        metric = 1 + zlib.crc32(str(fault).encode()) % (LINK_METRIC - 1)  # the same in every process
        direction = fault.get("direction") if "direction" in fault.definition.keys else "both"
        mode = fault.get("mode")
        adds = cut_commands(side, self.nodes, direction, mode, metric, add=True)
        dels = cut_commands(side, self.nodes, direction, mode, metric, add=False)
        far = {n: [node_address(m) for m in range(self.nodes) if (m in side) != (n in side)] for n in adds}
        return [NodeRoutes(self.holders, n, adds[n], dels[n], far[n] if mode == "reject" else [])
                for n in sorted(adds)]

    def to_wire(self) -> dict:
        return {**self.holders.to_wire(), "world_size": self.world_size, "nodes": self.nodes}

    @classmethod
    def from_wire(cls, wire: dict) -> NamespaceCuts:
        return cls(Holders.from_wire(wire), wire["world_size"], wire["nodes"])


_installed: NamespaceCuts | None = None


def install(table: NamespaceCuts | None) -> None:
    """This rank's node namespaces (what its in-rank-triggered partitions act on)."""
    global _installed
    _installed = table


def installed() -> NamespaceCuts | None:
    return _installed


# -- the holder -----------------------------------------------------------------------

def node_commands(node: int, nodes: int, pids: list[int]) -> list[str]:
    """``ip`` commands that set up ``node``'s namespace; the veths to lower nodes exist already."""
    me = node_address(node)
    cmds = ["link set lo up", "addr del 127.0.0.1/8 dev lo", "addr add 127.0.0.1/32 dev lo",
            f"addr add {me}/32 dev lo", f"link add {VOID} type veth peer name {VOID}x", f"link set {VOID} arp off",
            f"link set {VOID} up", f"link set {VOID}x up"]
    cmds += [f"link add v{node}_{peer} type veth peer name v{peer}_{node} netns {pids[peer]}"
             for peer in range(node + 1, nodes)]
    for peer in range(nodes):
        if peer != node:
            cmds += [f"link set v{node}_{peer} up",
                     f"route add {node_address(peer)}/32 dev v{node}_{peer} src {me} metric {LINK_METRIC}"]
    return cmds


def _sysctl(name: str, value: str) -> None:
    with open(f"/proc/sys/{name.replace('.', '/')}", "w") as f:
        f.write(value)


def _node_child(ready_w: int) -> None:
    """A node's namespace: unshare it, say so, then wait to die (with the holder)."""
    code = 1
    try:
        set_parent_death_signal(signal.SIGKILL)
        unshare(CLONE_NEWNET)
        os.write(ready_w, b"1")
        while True:
            signal.pause()
    finally:
        os._exit(code)


def _wait_byte(fd: int, deadline: float, what: str) -> None:
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    if not ready or not os.read(fd, 1):
        raise NamespaceError(f"{what} did not get ready within {HOLDER_READY_BUDGET:g} s")


def make_namespaces(nodes: int, user: bool) -> list[int]:
    """In this (single-threaded) process: the user namespace (``user``), then one child per
    node holding a network namespace, configured; returns the children's pids."""
    if user:
        uid, gid = os.getuid(), os.getgid()
        unshare(CLONE_NEWUSER)
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    pids = []
    for node in range(nodes):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            _node_child(w)
        os.close(w)
        try:
            _wait_byte(r, time.monotonic() + HOLDER_READY_BUDGET, f"node {node}'s namespace (pid {pid})")
        finally:
            os.close(r)
        pids.append(pid)
    for node, pid in enumerate(pids):
        setns(f"/proc/{pid}/ns/net", CLONE_NEWNET)  # this process hops from node to node
        for conf in ("all", "default"):
            _sysctl(f"net.ipv4.conf.{conf}.route_localnet", "1")
        _ip([], node_commands(node, nodes, pids), IP_BUDGET, f"node {node}'s namespace")
        for peer in range(nodes):
            if peer != node:
                _sysctl(f"net.ipv4.conf.v{node}_{peer}.route_localnet", "1")
    return pids


def hold_main(job) -> int:
    """``ChildJob`` target of a run's namespace holder: make them, tell the harness
    (``netns_ready`` with the node holders' pids, or ``netns_failed`` with why), then wait
    until the harness kills this process group."""
    return _hold(pickle.loads(job.payload))


def _hold(opts: dict) -> int:
    events = EventSink(opts["events_path"])
    try:
        pids = make_namespaces(opts["nodes"], opts["user"])
    except Exception as exc:
        events.send("netns_failed", why=f"{type(exc).__name__}: {exc}")
        return 1
    events.send("netns_ready", pids=pids, user=opts["user"])
    while True:
        signal.pause()


def main(argv: list[str]) -> int:
    """A holder as a process of its own (``ddp.torchrun``'s, which has no zygote)::

        python -m pytest_ddpfault.rank.netns EVENTS_PATH NODES USER(0|1) LAUNCHER_PID

    It dies with its launcher (PR_SET_PDEATHSIG), its node children with it."""

    die_with_parent(int(argv[3]))
    return _hold({"events_path": argv[0], "nodes": int(argv[1]), "user": argv[2] == "1"})


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
