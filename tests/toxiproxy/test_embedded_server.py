"""EmbeddedToxiproxy's lifecycle: start, stop (bounded, closing everything), errors."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from pytest_ddpfault.toxiproxy import EmbeddedToxiproxy


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "ddpfault-toxiproxy"}


def test_start_reports_real_port_and_stop_joins():
    before = _threads()
    server = EmbeddedToxiproxy().start()
    try:
        assert server.host == "127.0.0.1" and server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}"
        assert requests.get(server.url + "/version", timeout=5).json() == {"version": "2.8.0"}
        assert len(_threads() - before) == 1
    finally:
        server.stop()
    assert not server.running and _threads() == before
    server.stop()  # idempotent
    with pytest.raises(ConnectionError):
        socket.create_connection((server.host, server.port), timeout=2).close()


def test_context_manager_and_no_restart():
    with EmbeddedToxiproxy() as server:
        assert server.running
        with pytest.raises(RuntimeError, match="already started"):
            server.start()
    assert not server.running


def test_port_in_use_raises():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        server = EmbeddedToxiproxy(port=holder.getsockname()[1])
        with pytest.raises(OSError, match="cannot listen"):
            server.start()
        assert not server.running


def test_stop_closes_proxies_and_stuck_connections(echo_upstream, connect, tp):
    """Even a connection stalled by a toxic must not hold up stop()."""
    server = EmbeddedToxiproxy().start()
    kept_alive = requests.Session()
    try:
        url = server.url
        answer = requests.post(url + "/proxies", timeout=5, json={
            "name": "p", "upstream": echo_upstream.address, "listen": "127.0.0.1:0"})
        port = int(answer.json()["listen"].rsplit(":", 1)[1])
        requests.post(url + "/proxies/p/toxics", timeout=5,
                      json={"type": "bandwidth", "attributes": {"rate": 0}})
        stuck = connect(port)
        stuck.sendall(b"x" * 100_000)
        # Everything read off the client socket (else closing it would send an RST).
        tp.wait_for(lambda: len(echo_upstream.received) == 100_000, what="bytes upstream")
        kept_alive.get(url + "/proxies", timeout=5)
    finally:
        start = time.monotonic()
        server.stop(timeout=5)
        elapsed = time.monotonic() - start
        kept_alive.close()
    assert not server.running and elapsed < 3, elapsed
    assert stuck.recv(10) == b""
    with pytest.raises(ConnectionError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
