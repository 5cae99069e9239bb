"""Each toxic's effect, measured on loopback through the embedded server.

Timing bounds are generous upwards (a loaded 2-core machine) and strict downwards (a
toxic must never be faster than it says).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time

import pytest


def _round_trip(sock: socket.socket, tp, payload: bytes = b"ping") -> float:
    start = time.perf_counter()
    sock.sendall(payload)
    assert tp.recv_exactly(sock, len(payload)) == payload
    return time.perf_counter() - start


def _time_to_eof(sock: socket.socket, tp) -> tuple[bytes, float]:
    start = time.perf_counter()
    data = tp.recv_until_eof(sock)
    return data, time.perf_counter() - start


def _sends_then_waits(payload: bytes):
    """Upstream handler: send ``payload`` at once, then read until the client goes."""

    def handler(conn, upstream):
        conn.sendall(payload)
        while upstream.recv(conn):
            pass

    return handler


def _sends_then_closes(payload: bytes):
    def handler(conn, upstream):
        conn.sendall(payload)

    return handler


# --- latency -----------------------------------------------------------------------------


def test_latency_delays_round_trip(api, echo_proxy, connect, tp):
    sock = connect(echo_proxy)
    assert _round_trip(sock, tp) < 0.2
    api.add_toxic("echo", "latency", attributes={"latency": 300})
    elapsed = _round_trip(sock, tp)
    assert 0.3 <= elapsed < 0.45, elapsed


def test_latency_jitter_stays_in_bounds(api, echo_proxy, connect, tp):
    api.add_toxic("echo", "latency", attributes={"latency": 100, "jitter": 50})
    sock = connect(echo_proxy)
    times = [_round_trip(sock, tp) for _ in range(6)]
    assert all(0.05 <= t < 0.25 for t in times), times


def test_latency_is_pipelined(api, echo_upstream, echo_proxy, connect, tp):
    """Back-to-back chunks are each delayed from their own arrival: delays do not add up."""
    api.add_toxic("echo", "latency", attributes={"latency": 200})
    sock = connect(echo_proxy)
    start = time.perf_counter()
    for i in range(5):  # five separate echoes, so five separate chunks downstream
        sock.sendall(b"%d" % i)
        tp.wait_for(lambda: len(echo_upstream.received) == i + 1, what=f"byte {i} upstream")
    assert tp.recv_exactly(sock, 5) == b"01234"
    elapsed = time.perf_counter() - start
    assert 0.2 <= elapsed < 0.5, elapsed


def test_toxicity_zero_has_no_effect(api, echo_proxy, connect, tp):
    api.add_toxic("echo", "latency", toxicity=0, attributes={"latency": 1000})
    sock = connect(echo_proxy)
    assert _round_trip(sock, tp) < 0.3


def test_toxic_applies_to_open_connection_and_goes_away(api, echo_proxy, connect, tp):
    sock = connect(echo_proxy)
    assert _round_trip(sock, tp) < 0.2
    api.add_toxic("echo", "latency", attributes={"latency": 250})
    assert _round_trip(sock, tp) >= 0.25
    assert api.patch("/proxies/echo/toxics/latency_downstream",
                     json={"attributes": {"latency": 400}}).status_code == 200
    assert _round_trip(sock, tp) >= 0.4
    assert api.delete("/proxies/echo/toxics/latency_downstream").status_code == 204
    assert _round_trip(sock, tp) < 0.2
    fresh = connect(echo_proxy)
    assert _round_trip(fresh, tp) < 0.2


# --- bandwidth -----------------------------------------------------------------------------


def test_bandwidth_limits_rate(api, make_upstream, connect, tp):
    payload = os.urandom(50_000)
    port = api.create_proxy("bulk", make_upstream(_sends_then_closes(payload)).address)
    api.add_toxic("bulk", "bandwidth", attributes={"rate": 100})  # 100 KB/s -> ~0.5 s
    data, elapsed = _time_to_eof(connect(port), tp)
    assert data == payload
    assert 0.4 <= elapsed < 1.2, elapsed


def test_bandwidth_zero_stalls_and_removal_releases(api, echo_upstream, echo_proxy, connect, tp):
    api.add_toxic("echo", "bandwidth", attributes={"rate": 0})
    api.add_toxic("echo", "latency", attributes={"latency": 10})  # a successor to splice to
    sock = connect(echo_proxy, timeout=0.4)
    for i, part in enumerate([b"one,", b"two,", b"three"]):  # held, then queued behind it
        sock.sendall(part)
        tp.wait_for(lambda: echo_upstream.received.count(b",") + (b"three" in echo_upstream.received) > i,
                    what=f"part {i} at the upstream")
    with pytest.raises(socket.timeout):
        sock.recv(10)
    assert api.delete("/proxies/echo/toxics/bandwidth_downstream").status_code == 204
    sock.settimeout(tp.IO_TIMEOUT)
    assert tp.recv_exactly(sock, 13) == b"one,two,three", "held and queued data must survive"


# --- slow_close --------------------------------------------------------------------------


def test_slow_close_delays_the_close(api, make_upstream, connect, tp):
    port = api.create_proxy("bye", make_upstream(_sends_then_closes(b"bye")).address)
    data, plain = _time_to_eof(connect(port), tp)
    assert data == b"bye" and plain < 0.2
    api.add_toxic("bye", "slow_close", attributes={"delay": 300})
    sock = connect(port)
    start = time.perf_counter()
    assert tp.recv_exactly(sock, 3) == b"bye"
    assert time.perf_counter() - start < 0.2, "data itself is not delayed"
    assert sock.recv(10) == b""
    assert 0.3 <= time.perf_counter() - start < 0.6


# --- timeout -------------------------------------------------------------------------------


def test_timeout_drops_data_then_closes(api, echo_proxy, connect, tp):
    api.add_toxic("echo", "timeout", attributes={"timeout": 300})
    sock = connect(echo_proxy)
    start = time.perf_counter()
    sock.sendall(b"lost")
    data, _ = _time_to_eof(sock, tp)
    assert data == b""
    assert 0.3 <= time.perf_counter() - start < 0.6


def test_timeout_zero_holds_until_removed(api, echo_proxy, connect, tp):
    api.add_toxic("echo", "timeout", attributes={"timeout": 0})
    sock = connect(echo_proxy, timeout=0.5)
    sock.sendall(b"lost")
    with pytest.raises(socket.timeout):
        sock.recv(10)  # neither data nor a close
    assert api.delete("/proxies/echo/toxics/timeout_downstream").status_code == 204
    sock.settimeout(tp.IO_TIMEOUT)
    assert sock.recv(10) == b"", "removing a timeout toxic closes the connections it held"


def test_upstream_stream_affects_client_to_server_only(api, echo_upstream, echo_proxy, connect, tp):
    api.add_toxic("echo", "timeout", stream="upstream", attributes={"timeout": 0})
    sock = connect(echo_proxy, timeout=0.3)
    sock.sendall(b"never")
    with pytest.raises(socket.timeout):
        sock.recv(10)
    assert bytes(echo_upstream.received) == b"", "upstream toxic must stop client->server bytes"

    api.delete("/proxies/echo/toxics/timeout_upstream")
    api.add_toxic("echo", "timeout", attributes={"timeout": 0})  # downstream now
    other = connect(echo_proxy, timeout=0.3)
    other.sendall(b"arrives")
    tp.wait_for(lambda: bytes(echo_upstream.received) == b"arrives", what="bytes at upstream")
    with pytest.raises(socket.timeout):
        other.recv(10)


# --- reset_peer ----------------------------------------------------------------------------


def test_reset_peer_resets(api, echo_proxy, connect):
    api.add_toxic("echo", "reset_peer", attributes={"timeout": 0})
    sock = connect(echo_proxy)
    sock.sendall(b"hello")
    with pytest.raises(ConnectionResetError):
        sock.recv(10)


def test_reset_peer_waits_timeout(api, echo_proxy, connect):
    api.add_toxic("echo", "reset_peer", attributes={"timeout": 250})
    sock = connect(echo_proxy)
    start = time.perf_counter()
    sock.sendall(b"hello")
    with pytest.raises(ConnectionResetError):
        sock.recv(10)
    assert 0.25 <= time.perf_counter() - start < 0.6


# --- slicer, limit_data ----------------------------------------------------------------


def test_slicer_delivers_every_byte_in_order(api, echo_proxy, connect, tp):
    api.add_toxic("echo", "slicer", attributes={"average_size": 100, "size_variation": 50,
                                                "delay": 10})
    api.add_toxic("echo", "slicer", stream="upstream",
                  attributes={"average_size": 7, "size_variation": 3})
    payload = os.urandom(64 << 10)
    sock = connect(echo_proxy)
    sock.sendall(payload)
    assert tp.recv_exactly(sock, len(payload)) == payload


def test_limit_data_closes_after_n_bytes(api, make_upstream, connect, tp):
    port = api.create_proxy("lim", make_upstream(_sends_then_waits(bytes(range(100)))).address)
    api.add_toxic("lim", "limit_data", attributes={"bytes": 10})
    data, elapsed = _time_to_eof(connect(port), tp)
    assert data == bytes(range(10))
    assert elapsed < 1.0


def test_limit_data_counts_per_connection(api, echo_upstream, echo_proxy, connect, tp):
    api.add_toxic("echo", "limit_data", stream="upstream", attributes={"bytes": 6})
    for n in (1, 2):
        sock = connect(echo_proxy)
        sock.sendall(b"abc")
        assert tp.recv_exactly(sock, 3) == b"abc"
        sock.sendall(b"defghi")
        # As in Toxiproxy, the limit closes the upstream socket; that ends the connection.
        assert b"def".startswith(tp.recv_until_eof(sock))
        tp.wait_for(lambda: bytes(echo_upstream.received) == b"abcdef" * n,
                    what="exactly 6 bytes per connection upstream")


def test_chained_toxics_keep_data_intact(api, echo_proxy, connect, tp):
    api.add_toxic("echo", "latency", attributes={"latency": 20})
    api.add_toxic("echo", "bandwidth", attributes={"rate": 10_000})
    api.add_toxic("echo", "slicer", attributes={"average_size": 1000, "size_variation": 100})
    api.add_toxic("echo", "slow_close", stream="upstream", attributes={"delay": 10})
    payload = os.urandom(256 << 10)
    sock = connect(echo_proxy)
    sock.sendall(payload)
    assert tp.recv_exactly(sock, len(payload)) == payload


def test_toxicity_is_rolled_per_connection(api, echo_proxy, connect, tp):
    api.add_toxic("echo", "latency", toxicity=0.5, attributes={"latency": 60})
    delayed = [_round_trip(connect(echo_proxy), tp) >= 0.06 for _ in range(20)]
    assert any(delayed) and not all(delayed), delayed  # all equal: p = 2e-6


def test_no_byte_lost_while_toxics_come_and_go(api, echo_proxy, connect, tp):
    """Add, update and remove toxics on a live bulk transfer: the stream stays intact."""
    payload = os.urandom(4 << 20)
    sock = connect(echo_proxy)
    sender_error: list[BaseException] = []

    def send() -> None:
        try:
            for offset in range(0, len(payload), 32 << 10):
                sock.sendall(payload[offset:offset + (32 << 10)])
        except OSError as exc:  # reported by the assertion below
            sender_error.append(exc)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    received = bytearray()
    toxics = [("latency", {"latency": 20}), ("slicer", {"average_size": 3000, "size_variation": 1000}),
              ("bandwidth", {"rate": 50_000}), ("slow_close", {"delay": 1}), ("noop", {})]
    step = 0
    while len(received) < len(payload):
        more = sock.recv(64 << 10)
        assert more, f"connection closed after {len(received)} bytes"
        received += more
        kind, attributes = toxics[step % len(toxics)]
        stream = ("upstream", "downstream")[step % 2]
        name = f"t{step}"
        api.add_toxic("echo", kind, name=name, stream=stream, attributes=attributes)
        if step % 3 == 0:
            api.patch(f"/proxies/echo/toxics/{name}", json={"toxicity": 0.5})
        if step >= 2:
            assert api.delete(f"/proxies/echo/toxics/t{step - 2}").status_code == 204
        step += 1
    sender.join(tp.IO_TIMEOUT)
    assert not sender_error and not sender.is_alive()
    assert bytes(received) == payload
    assert step > 20, "the test should have changed toxics mid-stream"


# --- under load: buffering, timers and pacing as in Toxiproxy 2.8 --------------------------


def _drains(conn, upstream):
    while upstream.recv(conn):
        pass


def _link_bytes(api, proxy: str, direction: str) -> tuple[int, int]:
    """``(received, sent)`` bytes of one link of ``proxy``, from ``/metrics``."""
    page = api.get("/metrics")
    assert page.status_code == 200, page.text
    counts = []
    for kind in ("received", "sent"):
        match = re.search(rf'^toxiproxy_proxy_{kind}_bytes_total{{direction="{direction}",'
                          rf'[^}}]*proxy="{proxy}"[^}}]*}} (\S+)$', page.text, re.M)
        counts.append(int(float(match.group(1))) if match else 0)
    return counts[0], counts[1]


def test_latency_holds_toxiproxys_buffer_in_flight(metered, make_upstream, connect, tp):
    """Under ``latency`` the proxy holds what Toxiproxy's toxic channel does: 1024 chunks
    of up to 32 KiB, so bulk throughput is ~32 MiB per latency period. (A 1 MiB pipe
    held ~1 MiB: 13 MiB/s at 100 ms, where the real server does 104 MiB/s.)"""
    api = metered.api
    port = api.create_proxy("bulk", make_upstream(_drains).address)
    api.add_toxic("bulk", "latency", stream="upstream", attributes={"latency": 10_000})
    sock = connect(port)
    sock.setblocking(False)
    block = bytes(1 << 20)
    looks: list[tuple[int, int]] = []  # (bytes the client could send, bytes in flight)

    def push() -> int:
        pushed = 0
        try:
            while True:
                pushed += sock.send(block)
        except BlockingIOError:
            pass
        received, sent = _link_bytes(api, "bulk", "upstream")
        assert sent == 0, f"{sent} bytes passed a 10 s latency"
        looks.append((pushed, received))
        return received

    tp.wait_for(lambda: push() >= 16 << 20, what="16 MiB in flight under latency")
    # then until it is full: the client blocked, and the proxy read nothing more
    tp.wait_for(lambda: push() == looks[-2][1] and looks[-1][0] == 0, what="a full buffer")
    assert looks[-1][1] <= (32 << 20) + (1 << 20), f"{looks[-1][1]} bytes in flight: beyond Go's"


def test_bulk_throughput_under_latency_is_toxiproxys(either_api, make_upstream, connect, tp):
    """24 MiB through a 500 ms latency arrive within a few periods, as on the real server
    (a 1 MiB buffer in flight needed ~10 s: one buffer per latency period)."""
    upstream = make_upstream(_drains)
    port = either_api.create_proxy("bulk", upstream.address)
    either_api.add_toxic("bulk", "latency", stream="upstream", attributes={"latency": 500})
    sock = connect(port)
    size = 24 << 20
    start = time.perf_counter()
    sock.sendall(bytes(size))
    tp.wait_for(lambda: len(upstream.received) >= size, what="24 MiB through the latency")
    elapsed = time.perf_counter() - start
    assert 0.5 <= elapsed < 2.5, f"{elapsed:.2f} s"
    assert len(upstream.received) == size


def test_timeout_restarts_with_every_chunk(either_api, echo_upstream, connect, tp):
    """As in Toxiproxy, each chunk restarts the timer: a connection that keeps sending
    stays open past ``timeout``; once quiet, it closes ``timeout`` after its last data."""
    port = either_api.create_proxy("echo", echo_upstream.address)
    either_api.add_toxic("echo", "timeout", stream="upstream", attributes={"timeout": 600})
    sock = connect(port, timeout=0.1)
    start = last = time.perf_counter()
    while last - start < 1.5:  # 2.5 timeouts of sending, a byte every ~0.1 s
        last = time.perf_counter()
        sock.sendall(b"x")
        try:
            data = sock.recv(10)
        except socket.timeout:
            continue  # still open, and the byte was dropped
        pytest.fail(f"got {data!r} {time.perf_counter() - start:.2f} s into sending: "
                    "a connection that keeps sending must stay open")
    sock.settimeout(tp.IO_TIMEOUT)
    assert sock.recv(10) == b""
    assert 0.6 <= time.perf_counter() - last < 1.2


def test_bandwidth_holds_the_rate_over_a_long_transfer(either_api, make_upstream, connect, tp):
    """Overrun waits are paid back by the next ones: 20 MB at 10 000 KB/s arrive at the
    rate within a few percent (Toxiproxy: ~1 % under; a schedule restarted at every
    chunk lost 5-7 %). Measured from the first chunk's arrival to the last byte."""
    payload = os.urandom(20_000_000)

    def sends_slowly_then_closes(conn, upstream):
        conn.settimeout(4 * tp.IO_TIMEOUT)  # the whole sendall, paced by the toxic: ~2 s
        conn.sendall(payload)

    port = either_api.create_proxy("bulk", make_upstream(sends_slowly_then_closes).address)
    either_api.add_toxic("bulk", "bandwidth", attributes={"rate": 10_000})
    sock = connect(port)
    data = bytearray(sock.recv(1 << 20))
    first, start = len(data), time.perf_counter()
    end = start
    while more := sock.recv(1 << 20):
        data += more
        end = time.perf_counter()
    assert data == payload
    rate = (len(data) - first) / (end - start) / 1000
    assert 9_600 <= rate <= 10_300, f"{rate:.0f} KB/s for rate 10000"
