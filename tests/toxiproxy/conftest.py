"""Fixtures for the embedded Toxiproxy tests: servers, loopback upstreams, clients.

Everything binds 127.0.0.1 port 0 and is torn down by its fixture, even when a test
fails; every wait is bounded (socket timeouts, joins with timeouts, polls with deadlines).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from types import SimpleNamespace
from typing import Callable, Iterator

import pytest
import requests

from pytest_ddpfault.toxiproxy import EmbeddedToxiproxy
from pytest_ddpfault.toxiproxy.client import _start_binary

#: default bound on any single blocking socket operation in these tests
IO_TIMEOUT = 5.0
#: how often upstream threads look at their stop flag
_TICK = 0.05


def wait_for(predicate: Callable[[], object], timeout: float = IO_TIMEOUT, what: str = "condition"):
    """Poll ``predicate`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise EOFError(f"connection closed after {len(data)} of {size} bytes")
        data += more
    return data


def recv_until_eof(sock: socket.socket, limit: int = 1 << 24) -> bytes:
    data = b""
    while len(data) < limit:
        more = sock.recv(65536)
        if not more:
            return data
        data += more
    raise AssertionError(f"no EOF after {limit} bytes")


class Upstream:
    """A loopback TCP server running ``handler(conn, upstream)`` in one thread per client.

    ``received`` collects every byte any client sent (for handlers that record it);
    ``accepted`` counts connections. :meth:`close` stops and joins everything (bounded).
    """

    def __init__(self, handler: Callable[[socket.socket, "Upstream"], None]) -> None:
        self.handler = handler
        self.stop = threading.Event()
        self.received = bytearray()
        self.accepted = 0
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(_TICK)
        self.port = self._listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._accepter = threading.Thread(target=self._accept, name="test-upstream", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            conn.settimeout(_TICK)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(target=self._run, args=(conn,), daemon=True)
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
                self._threads.append(thread)
            thread.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn, self)
        except OSError:
            pass
        finally:
            conn.close()

    def recv(self, conn: socket.socket) -> bytes | None:
        """One read for handlers: data, b"" at EOF, None when stopping."""
        while not self.stop.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            with self._lock:
                self.received += data
            return data
        return None

    def close(self) -> None:
        self.stop.set()
        self._listener.close()
        self._accepter.join(IO_TIMEOUT)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(IO_TIMEOUT)
        assert not any(t.is_alive() for t in threads + [self._accepter]), "upstream threads leaked"


def echo(conn: socket.socket, upstream: Upstream) -> None:
    while True:
        data = upstream.recv(conn)
        if not data:
            return
        conn.sendall(data)


class Api:
    """Thin ``requests`` wrapper for the raw HTTP API (bounded timeouts, one session)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", IO_TIMEOUT)
        return self.session.request(method, self.url + path, **kwargs)

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        return self.request("POST", path, **kwargs)

    def patch(self, path: str, **kwargs) -> requests.Response:
        return self.request("PATCH", path, **kwargs)

    def delete(self, path: str, **kwargs) -> requests.Response:
        return self.request("DELETE", path, **kwargs)

    def create_proxy(self, name: str, upstream: str, **fields) -> int:
        """Create a proxy on 127.0.0.1:0; return its real port."""
        answer = self.post("/proxies", json={"name": name, "upstream": upstream,
                                             "listen": "127.0.0.1:0", **fields})
        assert answer.status_code == 201, answer.text
        return int(answer.json()["listen"].rsplit(":", 1)[1])

    def add_toxic(self, proxy: str, type: str, **fields) -> dict:
        answer = self.post(f"/proxies/{proxy}/toxics", json={"type": type, **fields})
        assert answer.status_code == 200, answer.text
        return answer.json()

    def close(self) -> None:
        self.session.close()


@pytest.fixture
def tp() -> SimpleNamespace:
    """The helpers of this conftest, for test modules (which cannot import a conftest)."""
    return SimpleNamespace(wait_for=wait_for, recv_exactly=recv_exactly,
                           recv_until_eof=recv_until_eof, echo=echo, IO_TIMEOUT=IO_TIMEOUT)


@pytest.fixture
def server() -> Iterator[EmbeddedToxiproxy]:
    srv = EmbeddedToxiproxy("127.0.0.1", 0).start()
    try:
        yield srv
    finally:
        srv.stop(timeout=5.0)
        assert not srv.running, "embedded toxiproxy thread did not stop"


@pytest.fixture
def api(server: EmbeddedToxiproxy) -> Iterator[Api]:
    client = Api(server.url)
    try:
        yield client
    finally:
        client.close()


def real_binary() -> str | None:
    """A real toxiproxy-server for differential tests: ``DDPFAULT_REAL_TOXIPROXY``, else on PATH."""
    return os.environ.get("DDPFAULT_REAL_TOXIPROXY") or shutil.which("toxiproxy-server")


@pytest.fixture(params=["embedded", "real"])
def either_api(request) -> Iterator[Api]:
    """An :class:`Api` on the embedded server, then on a real ``toxiproxy-server`` (skipped
    where there is none), for tests that pin what both do."""
    if request.param == "embedded":
        embedded = EmbeddedToxiproxy("127.0.0.1", 0).start()
        url, stop = embedded.url, lambda: embedded.stop(timeout=5.0)
    else:
        binary = real_binary()
        if binary is None:
            pytest.skip("no real toxiproxy-server: put one on PATH or set DDPFAULT_REAL_TOXIPROXY")
        real = _start_binary(binary)
        url, stop = real.url, real.stop
    client = Api(url)
    try:
        yield client
    finally:
        client.close()
        stop()


@pytest.fixture
def metered() -> Iterator[SimpleNamespace]:
    """A server with proxy metrics (``/metrics``), as ``.server`` and ``.api``."""
    srv = EmbeddedToxiproxy("127.0.0.1", 0, proxy_metrics=True).start()
    client = Api(srv.url)
    try:
        yield SimpleNamespace(server=srv, api=client)
    finally:
        client.close()
        srv.stop(timeout=5.0)
        assert not srv.running, "embedded toxiproxy thread did not stop"


@pytest.fixture
def make_upstream() -> Iterator[Callable[..., Upstream]]:
    made: list[Upstream] = []

    def make(handler: Callable[[socket.socket, Upstream], None] = echo) -> Upstream:
        upstream = Upstream(handler)
        made.append(upstream)
        return upstream

    try:
        yield make
    finally:
        for upstream in made:
            upstream.close()


@pytest.fixture
def echo_upstream(make_upstream: Callable[..., Upstream]) -> Upstream:
    return make_upstream(echo)


@pytest.fixture
def connect() -> Iterator[Callable[..., socket.socket]]:
    """Open client sockets to 127.0.0.1:port (timeout ``IO_TIMEOUT``); all closed afterwards."""
    socks: list[socket.socket] = []

    def open_(port: int, timeout: float = IO_TIMEOUT) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(sock)
        return sock

    try:
        yield open_
    finally:
        for sock in socks:
            sock.close()


@pytest.fixture
def echo_proxy(api: Api, echo_upstream: Upstream) -> int:
    """Port of a proxy named ``echo`` in front of an echo server."""
    return api.create_proxy("echo", echo_upstream.address)
