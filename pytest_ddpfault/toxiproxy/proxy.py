"""A proxy: a listener, its live connections, and the toxics that apply to them.

Each accepted client gets a :class:`Connection`: the proxy dials the upstream, then runs
two :class:`~pytest_ddpfault.toxiproxy.link.Link` s (upstream: client -> server bytes,
downstream: server -> client) through the proxy's toxics. A toxic added, updated or
removed on the proxy is applied to every open connection at once.

As in Toxiproxy, when one direction ends (EOF, or a toxic closes it) the destination
socket is closed entirely, which ends the other direction in turn.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import struct
from typing import Any, Callable, Iterator

from .errors import ApiError, toxic_not_found
from .link import Link
from .metrics import Counter, Metrics
from .toxics import DOWNSTREAM, UPSTREAM, ToxicSpec

__all__ = ["Proxy", "Connection", "Side", "ToxicCollection", "split_host_port", "listen_socket",
           "DEFAULT_LISTEN"]

log = logging.getLogger("pytest_ddpfault.toxiproxy")

#: what an empty ``listen`` means (Toxiproxy would listen on every interface)
DEFAULT_LISTEN = "127.0.0.1:0"
#: bound on dialing the upstream for one accepted client
DIAL_TIMEOUT = 10.0
#: how long a closed socket may take to flush its buffer before it is aborted
CLOSE_GRACE = 10.0
_LINGER_ZERO = struct.pack("ii", 1, 0)


# --- addresses -------------------------------------------------------------------------


def split_host_port(addr: str) -> tuple[str, int]:
    """Go's ``net.SplitHostPort`` plus port parsing; errors read like Go's ``listen tcp``."""

    def bad(why: str) -> ApiError:
        return ApiError(f"listen tcp: address {addr}: {why}", 500)

    if addr.startswith("["):
        end = addr.find("]")
        if end < 0:
            raise bad("missing ']' in address")
        host, rest = addr[1:end], addr[end + 1:]
        if not rest.startswith(":"):
            raise bad("missing port in address")
        port_text = rest[1:]
    else:
        colon = addr.rfind(":")
        if colon < 0:
            raise bad("missing port in address")
        host, port_text = addr[:colon], addr[colon + 1:]
        if ":" in host:
            raise bad("too many colons in address")
    if port_text.isdigit():
        port = int(port_text)
    else:
        try:
            port = socket.getservbyname(port_text, "tcp")
        except OSError:
            port = -1
    if not 0 <= port <= 65535:
        raise bad("invalid port")
    return host, port


def format_addr(sockaddr: tuple) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _os_error_text(exc: OSError) -> str:
    text = os.strerror(exc.errno) if exc.errno else str(exc)
    return text[:1].lower() + text[1:]


def resolve(host: str, port: int, passive: bool = False) -> list[tuple[int, tuple]]:
    """``(family, sockaddr)`` for ``host``, IPv4 first. Resolved here, in the loop's own
    thread (fast for IP literals and /etc/hosts names), so that no resolver thread pool
    outlives the server; raises ``socket.gaierror``."""
    flags = socket.AI_PASSIVE if passive else 0
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return [(family, sockaddr) for family, _, _, _, sockaddr in infos]


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening, non-blocking socket on ``host:port`` (port 0: any free port)."""
    return _listen_on(*resolve(host, port, passive=True)[0])


def _listen_on(family: int, sockaddr: tuple) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_listener(listen: str) -> socket.socket:
    """:func:`listen_socket` for a proxy's ``listen``; errors worded as Toxiproxy's (500).

    As in Go, a failed bind names the resolved address (``listen tcp 127.0.0.1:3310:
    bind: address already in use`` for ``localhost:3310``; ``:3310`` for no host).
    """
    host, port = split_host_port(listen)
    try:
        family, sockaddr = resolve(host or "0.0.0.0", port, passive=True)[0]
    except socket.gaierror:
        raise ApiError(f"listen tcp: lookup {host}: no such host", 500) from None
    try:
        return _listen_on(family, sockaddr)
    except OSError as exc:
        where = format_addr(sockaddr) if host else f":{port}"
        raise ApiError(f"listen tcp {where}: bind: {_os_error_text(exc)}", 500) from None


async def dial(host: str, port: int, protocol_factory) -> asyncio.BaseProtocol:
    """Connect to the first address of ``host`` that answers; returns the protocol."""
    error: OSError | None = None
    for family, sockaddr in resolve(host, port):
        try:
            _, protocol = await asyncio.get_running_loop().create_connection(
                protocol_factory, sockaddr[0], sockaddr[1], family=family)
            return protocol
        except OSError as exc:
            error = exc
    raise error or OSError(f"no address for {host}")


# --- one socket of a connection --------------------------------------------------------


class Side(asyncio.Protocol):
    """One socket of a proxied connection, as the links see it.

    It feeds what it reads to ``reader`` (the link whose source it is) and reports its
    write buffer's state to ``writer`` (the link whose destination it is). Reading is
    paused while any reason to pause is pending ("dial", "dest", "pipe").
    """

    def __init__(self, conn: "Connection") -> None:
        self.conn = conn
        self.transport: asyncio.Transport | None = None
        self.reader: Link | None = None
        self.writer: Link | None = None
        self.closed = False
        self.received: Counter | None = None  # bytes read here (proxy metrics)
        self.sent: Counter | None = None  # bytes written here (proxy metrics)
        self._pauses: set[str] = set()
        self._grace: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pause("dial")
        self.conn.side_made(self)

    def data_received(self, data: bytes) -> None:
        if self.received is not None:
            self.received.value += len(data)
        if self.reader is not None:
            self.reader.feed(data)

    def eof_received(self) -> bool:
        if self.reader is not None:
            self.reader.feed_eof()
        return True  # we close the socket ourselves, once the other direction is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._grace is not None:
            self._grace.cancel()
        if self.reader is not None:
            self.reader.feed_eof()
        if self.writer is not None:
            self.writer.dest_lost()
        self.conn.side_lost(self)

    def pause_writing(self) -> None:
        if self.writer is not None:
            self.writer.dest_pause()

    def resume_writing(self) -> None:
        if self.writer is not None:
            self.writer.dest_resume()

    # what the links use

    def write(self, data: bytes) -> None:
        if not self.closed and not self.transport.is_closing():
            if self.sent is not None:
                self.sent.value += len(data)
            self.transport.write(data)

    def pause(self, reason: str) -> bool:
        """Stop reading for ``reason``; False if already paused for it."""
        if reason in self._pauses:
            return False
        if not self._pauses and not self.closed:
            self.transport.pause_reading()
        self._pauses.add(reason)
        return True

    def resume(self, reason: str) -> None:
        if reason not in self._pauses:
            return
        self._pauses.discard(reason)
        if not self._pauses and not self.closed and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        """Close once the write buffer is flushed (aborting after :data:`CLOSE_GRACE`)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return
        self.transport.close()
        self._grace = asyncio.get_running_loop().call_later(CLOSE_GRACE, self.transport.abort)

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0), dropping anything unsent."""
        if self.transport is None or self.closed:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            except OSError:
                pass
        self.transport.abort()


# --- a connection ----------------------------------------------------------------------


class Connection:
    """A client accepted by a proxy, its upstream socket, and the two links between them."""

    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy
        self.client = Side(self)
        self.upstream: Side | None = None
        self.links: tuple[Link, Link] | None = None
        self._dial: asyncio.Task | None = None

    def side_made(self, side: Side) -> None:
        if side is self.client:
            self.proxy.connections.add(self)
            self._dial = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        proxy = self.proxy
        try:
            host, port = split_host_port(proxy.upstream)
            upstream = await asyncio.wait_for(
                dial(host or "127.0.0.1", port, lambda: Side(self)), DIAL_TIMEOUT)
        except (OSError, ValueError, ApiError, asyncio.TimeoutError) as exc:
            log.info("proxy %s: unable to open connection to upstream %s: %s",
                     proxy.name, proxy.upstream, exc)
            self.client.close()
            return
        self.upstream = upstream
        if self.client.closed:
            upstream.close()
            return
        if proxy.metrics is not None:
            self._count(proxy.metrics, upstream)
        up = Link(self, self.client, upstream, proxy.toxics.chain(UPSTREAM))
        down = Link(self, upstream, self.client, proxy.toxics.chain(DOWNSTREAM))
        self.links = (up, down)
        self.client.reader = upstream.writer = up
        upstream.reader = self.client.writer = down
        self.client.resume("dial")
        upstream.resume("dial")

    def _count(self, metrics: Metrics, upstream: Side) -> None:
        """Hook the sides to the proxy's byte counters (labels as Toxiproxy's link.go)."""
        proxy = self.proxy
        for direction, source, dest in (("upstream", self.client, upstream),
                                        ("downstream", upstream, self.client)):
            counters = metrics.link_counters(direction, proxy.name, proxy.listen, proxy.upstream)
            if counters is not None:
                source.received, dest.sent = counters

    def side_lost(self, side: Side) -> None:
        if self.client.closed and (self.upstream is None or self.upstream.closed):
            self.proxy.connections.discard(self)
            if self._dial is not None:
                self._dial.cancel()

    def sides(self) -> Iterator[Side]:
        yield self.client
        if self.upstream is not None:
            yield self.upstream

    def abort(self) -> None:
        """Drop the connection now (the proxy stops, restarts or is deleted)."""
        if self._dial is not None:
            self._dial.cancel()
        for link in self.links or ():
            link.kill()
        for side in self.sides():
            side.abort()

    def reset(self) -> None:
        """Reset both sockets (``reset_peer``)."""
        for link in self.links or ():
            link.kill()
        for side in self.sides():
            side.reset()


# --- toxics of a proxy -----------------------------------------------------------------


class ToxicCollection:
    """A proxy's toxics, upstream ones then downstream ones, each in insertion order."""

    def __init__(self, proxy: "Proxy") -> None:
        self.proxy = proxy
        self._chains: tuple[list[ToxicSpec], list[ToxicSpec]] = ([], [])

    def chain(self, direction: int) -> list[ToxicSpec]:
        return list(self._chains[direction])

    def all(self) -> list[ToxicSpec]:
        return self._chains[UPSTREAM] + self._chains[DOWNSTREAM]

    def get(self, name: str) -> ToxicSpec:
        for spec in self.all():
            if spec.name == name:
                return spec
        raise toxic_not_found()

    def add(self, body: Any, check: Callable[[ToxicSpec], None] | None = None) -> ToxicSpec:
        """Add the toxic of a create body; ``check`` may refuse it (raises) before that."""
        spec = ToxicSpec.from_body(body, {spec.name for spec in self.all()})
        if check is not None:
            check(spec)
        self._chains[spec.direction].append(spec)
        for link in self.proxy.links(spec.direction):
            link.add(spec)
        return spec

    def update(self, spec: ToxicSpec, body: Any) -> ToxicSpec:
        """Apply an update body to ``spec`` (found with :meth:`get`) and to open connections."""
        spec.update(body)
        for link in self.proxy.links(spec.direction):
            link.update(spec)
        return spec

    def remove(self, name: str) -> list[asyncio.Task]:
        """Remove a toxic; returns the stages still leaving the chain, to wait for."""
        spec = self.get(name)
        self._chains[spec.direction].remove(spec)
        pending = [link.remove(spec) for link in self.proxy.links(spec.direction)]
        return [task for task in pending if task is not None]

    def reset(self) -> list[asyncio.Task]:
        pending: list[asyncio.Task] = []
        for spec in self.all():
            pending += self.remove(spec.name)
        return pending


# --- the proxy -------------------------------------------------------------------------


class Proxy:
    """A named proxy from ``listen`` to ``upstream``; enabled means listening."""

    def __init__(self, name: str, listen: str, upstream: str,
                 metrics: Metrics | None = None) -> None:
        self.name = name
        self.listen = listen or DEFAULT_LISTEN
        self.upstream = upstream
        self.metrics = metrics
        self.enabled = False
        self.toxics = ToxicCollection(self)
        self.connections: set[Connection] = set()
        self._server: asyncio.base_events.Server | None = None

    def links(self, direction: int) -> Iterator[Link]:
        for conn in list(self.connections):
            if conn.links is not None:
                yield conn.links[direction]

    async def start(self) -> None:
        """Listen (raises :class:`ApiError` 500 when the address cannot be bound)."""
        if self.enabled:
            return
        sock = bind_listener(self.listen)
        try:
            self._server = await asyncio.get_running_loop().create_server(
                lambda: Connection(self).client, sock=sock)
        except OSError as exc:
            where = format_addr(sock.getsockname())
            sock.close()
            raise ApiError(f"listen tcp {where}: {_os_error_text(exc)}", 500) from None
        self.listen = format_addr(sock.getsockname())
        self.enabled = True
        log.info("proxy %s listening on %s, upstream %s", self.name, self.listen, self.upstream)

    def stop(self) -> None:
        """Stop listening and drop every connection."""
        if not self.enabled:
            return
        self.enabled = False
        if self._server is not None:
            self._server.close()
            self._server = None
        for conn in list(self.connections):
            conn.abort()
        log.info("proxy %s stopped", self.name)

    async def update(self, listen: str, upstream: str, enabled: bool) -> None:
        """Toxiproxy's update: a new listen or upstream restarts; ``enabled`` starts/stops."""
        if listen != self.listen or upstream != self.upstream:
            self.stop()
            self.listen = listen or DEFAULT_LISTEN
            self.upstream = upstream
        if enabled and not self.enabled:
            await self.start()
        elif not enabled:
            self.stop()

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "listen": self.listen,
            "upstream": self.upstream,
            "enabled": self.enabled,
            "toxics": [spec.as_json() for spec in self.toxics.all()],
        }

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"Proxy({self.name!r}, listen={self.listen!r}, upstream={self.upstream!r}, {state})"
