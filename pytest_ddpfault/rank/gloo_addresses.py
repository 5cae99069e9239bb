"""Route a rank's crossed gloo links through their proxies (``links.LinkProxies``).

gloo's full-mesh set-up publishes one value per rank through the group's store (key
``<device>/<rank>``): ``u64 hostname length, hostname, u64 address length, address,
pair ids``, where the address is gloo's ``Address::Impl`` — a ``sockaddr_storage``
(``AF_INET``: family, port in network order, 4 address bytes) and a sequence number.
Each pair is one TCP connection, opened by the side with the larger address (gloo's
``Device::isInitiator``: address bytes, then the port as stored).

Links are known by the places of their two ends (``LinkProxies.place``: node and local
rank, from the listening address and the rank), which under multi-node torchrun stay the
same across rendezvous while the ranks do not. ``AddressRewritingStore`` wraps the store
handed to gloo. Reading a peer's value, the
rank that will connect a crossed link points that link's proxy at the peer's real
listener and hands gloo the proxy's address instead; the peer, which listens, reads the
connecting rank's own address unchanged. The proxies listen on 127.0.0.1, below every
node address the devices bind to, so the connecting side stays the one gloo chose.

Every gloo group of a process (the default one and each ``new_group``) is built on one
gloo device, bound to the node's address (``gloo_arguments``): one listener per process, so
a link's proxy, pointed at that listener, carries the link's pairs of every group. A
group's store keys carry its group ranks; ``global_ranks`` turns them into the ranks the
links are known by.
"""
from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pytest_ddpfault.links import LinkProxies

_U64 = struct.Struct("=Q")
_AF_INET = socket.AF_INET


@dataclass(frozen=True)
class PublishedRank:
    """One rank's published gloo value, cut at the listener's IPv4 address."""

    rank: int
    raw: bytes
    addr_at: int        # offset of the sockaddr in ``raw``
    ip: bytes           # 4 bytes, network order
    port_raw: int       # sin_port as gloo compares it (the stored bytes read natively)

    @property
    def host_port(self) -> str:
        return f"{socket.inet_ntoa(self.ip)}:{socket.ntohs(self.port_raw)}"

    def with_address(self, host: str, port: int) -> bytes:
        sockaddr = struct.pack("=H", _AF_INET) + struct.pack("!H", port) + socket.inet_aton(host)
        return self.raw[:self.addr_at] + sockaddr + self.raw[self.addr_at + len(sockaddr):]

    def connects_to(self, peer: PublishedRank) -> bool:
        """gloo's ``isInitiator(self, peer)``: this side opens the connection."""
        if self.ip != peer.ip:
            return self.ip > peer.ip
        return self.port_raw > peer.port_raw


def parse_published(key: str, value: bytes) -> PublishedRank | None:
    """The value of a ``.../<rank>`` key if it is gloo's rank record with an IPv4 address."""
    tail = key.rsplit("/", 1)[-1]
    if not tail.isdecimal() or len(value) < 2 * _U64.size:
        return None
    try:
        (host_len,) = _U64.unpack_from(value, 0)
        at = _U64.size + host_len
        (addr_len,) = _U64.unpack_from(value, at)
        at += _U64.size
        if addr_len < 16 or at + addr_len > len(value):
            return None
        (family,) = struct.unpack_from("=H", value, at)
        if family != _AF_INET:
            return None
        (port_raw,) = struct.unpack_from("=H", value, at + 2)
        return PublishedRank(int(tail), bytes(value), at, bytes(value[at + 4:at + 8]), port_raw)
    except struct.error:
        return None


_device: tuple[str, Any] | None = None   # (address, gloo device): made once per process


def node_device(address: str):
    """This process's gloo device, bound to ``address`` (its node's), shared by its groups."""
    global _device
    if _device is None or _device[0] != address:
        from torch._C._distributed_c10d import ProcessGroupGloo

        _device = (address, ProcessGroupGloo.create_device(hostname=address))
    return _device[1]


def gloo_arguments(store, rank: int, size: int, timeout, address: str | None, table: LinkProxies | None,
                   global_ranks: Sequence[int] | None = None, **options: Any) -> tuple[tuple, dict]:
    """The arguments to build a real ``ProcessGroupGloo`` with: on the node's device when the
    run gives the rank one (``address``), through the link proxies when it has them
    (``table``); ``global_ranks``: the group's ranks in the default group (None: it is the
    default group); ``options``: the constructor's other options (``enable_reconfigure``)."""
    from torch._C._distributed_c10d import ProcessGroupGloo

    if table is not None:  # crossed links go through their proxies
        store = rewriting_store(store, rank, table, global_ranks)
    if not address:
        return (store, rank, size), {"timeout": timeout, **options}
    on_device = ProcessGroupGloo._Options()
    on_device._timeout = timeout
    on_device._devices = [node_device(address)]
    for name, value in options.items():
        setattr(on_device, name, value)
    return (store, rank, size, on_device), {}


def routed_gloo_class(address: str | None, table: LinkProxies | None, global_ranks: Sequence[int]):
    """A ``ProcessGroupGloo`` (subclass) for torch to build a ``new_group`` with, as
    ``gloo_arguments`` says; it is the real gloo backend, as torch checks."""
    from torch._C._distributed_c10d import ProcessGroupGloo

    class RoutedGloo(ProcessGroupGloo):
        def __init__(self, store, rank, size, timeout, **options):
            args, kwargs = gloo_arguments(store, rank, size, timeout, address, table, global_ranks, **options)
            super().__init__(*args, **kwargs)

    RoutedGloo.__name__ = RoutedGloo.__qualname__ = "ProcessGroupGloo"
    return RoutedGloo


def rewriting_store(inner, rank: int, table: LinkProxies, global_ranks: Sequence[int] | None = None):
    """``inner`` wrapped for gloo (see the module's doc); torch is imported here. ``rank`` and
    the ranks in the store's keys are the group's; ``global_ranks`` maps them to the links'."""
    import torch.distributed as dist

    def global_rank(group_rank: int) -> int:
        return group_rank if global_ranks is None else global_ranks[group_rank]

    class AddressRewritingStore(dist.Store):
        def __init__(self) -> None:
            super().__init__()
            self.own: PublishedRank | None = None
            self.pointed: dict[int, bytes] = {}

        def set(self, key, value):
            data = value.encode() if isinstance(value, str) else bytes(value)
            published = parse_published(key, data)
            if published is not None and published.rank == rank:
                self.own = published
            return inner.set(key, value)

        def get(self, key):
            return self._rewrite(key, inner.get(key))

        def multi_get(self, keys):
            return [self._rewrite(k, v) for k, v in zip(keys, inner.multi_get(keys))]

        def _rewrite(self, key, value):
            peer = parse_published(key, bytes(value))
            if peer is None or self.own is None or peer.rank == rank:
                return value
            own = table.place(global_rank(rank), self.own.ip)
            other = table.place(global_rank(peer.rank), peer.ip)
            proxy = None if own is None or other is None else table.between(own, other)
            if proxy is None or not self.own.connects_to(peer):
                return value  # not crossed, or the peer connects (through its own view)
            if peer.rank not in self.pointed:
                host, port = proxy.listen.rsplit(":", 1)
                if self.own.ip <= socket.inet_aton(host):
                    raise RuntimeError(f"rank {rank}'s gloo listens on {self.own.host_port}, not above the link "
                                       f"proxies' {host}: gloo would reverse who connects; the harness binds "
                                       f"each rank to its node's address (DDPFAULT_NODE_ADDR) for this")
                proxy.point_to(peer.host_port)
                self.pointed[peer.rank] = peer.with_address(host, int(port))
            return self.pointed[peer.rank]

        # everything else as the wrapped store does it
        def add(self, key, value):
            return inner.add(key, value)

        def append(self, key, value):
            return inner.append(key, value)

        def check(self, keys):
            return inner.check(keys)

        def compare_set(self, key, expected, desired):
            return inner.compare_set(key, expected, desired)

        def delete_key(self, key):
            return inner.delete_key(key)

        def num_keys(self):
            return inner.num_keys()

        def multi_set(self, keys, values):
            return inner.multi_set(keys, values)

        def set_timeout(self, timeout):
            return inner.set_timeout(timeout)

        def wait(self, keys, timeout=None):
            return inner.wait(keys) if timeout is None else inner.wait(keys, timeout)

        def has_extended_api(self):
            return False   # gloo then reads each rank's value with get(): one path to rewrite

    return AddressRewritingStore()
