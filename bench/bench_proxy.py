"""Benchmark the embedded Toxiproxy: added latency and bulk throughput vs a direct connection.

    python bench/bench_proxy.py [--rounds 2000] [--megabytes 256]

The upstream server runs in a child process (as a real peer would); the client runs in
this process's main thread and the proxy in its own thread, as in a test. One invocation
prints a table: round-trip p50/p99 direct vs proxied (the difference is the latency the
proxy adds) and bulk throughput direct vs proxied. Bounded run time (well under 30 s).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from pytest_ddpfault.toxiproxy import EmbeddedToxiproxy  # noqa: E402

# The upstream: b"P" + 63 bytes -> echo them (ping); b"B" + 8-byte size -> read that many
# bytes, then answer b"k" (bulk). One thread per connection.
UPSTREAM = r"""
import socket, sys, threading
def serve(conn):
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(1 << 20)
    with conn:
        while True:
            head = conn.recv(1)
            if not head:
                return
            if head == b"P":
                msg = b""
                while len(msg) < 63:
                    msg += conn.recv(63 - len(msg))
                conn.sendall(b"P" + msg)
            else:
                size = b""
                while len(size) < 8:
                    size += conn.recv(8 - len(size))
                left = int.from_bytes(size, "big")
                view = memoryview(buf)
                while left:
                    got = conn.recv_into(view, min(left, len(buf)))
                    if not got:
                        return
                    left -= got
                conn.sendall(b"k")
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(16)
print(listener.getsockname()[1], flush=True)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

SOCKET_TIMEOUT = 10.0


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise ConnectionError("upstream closed the connection")
        data += more
    return data


def round_trips(port: int, rounds: int) -> list[float]:
    """Round-trip times (s) of a 64-byte request/response, after a warm-up."""
    msg = b"P" + bytes(63)
    times = []
    with connect(port) as sock:
        for i in range(rounds + rounds // 10):
            start = time.perf_counter()
            sock.sendall(msg)
            recv_exactly(sock, 64)
            if i >= rounds // 10:
                times.append(time.perf_counter() - start)
    return times


def throughput(port: int, total: int, repeats: int = 3) -> float:
    """Best MB/s (1 MB = 1e6 bytes) of sending ``total`` bytes and getting the ack."""
    block = bytes(256 << 10)
    best = 0.0
    for _ in range(repeats):
        with connect(port) as sock:
            start = time.perf_counter()
            sock.sendall(b"B" + total.to_bytes(8, "big"))
            left = total
            while left:
                n = min(left, len(block))
                sock.sendall(block if n == len(block) else block[:n])
                left -= n
            if recv_exactly(sock, 1) != b"k":
                raise RuntimeError("bad ack from upstream")
            best = max(best, total / (time.perf_counter() - start) / 1e6)
    return best


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="round trips per path")
    parser.add_argument("--megabytes", type=int, default=256, help="bulk transfer size")
    args = parser.parse_args(argv)

    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM], stdout=subprocess.PIPE, text=True)
    try:
        upstream_port = int(upstream.stdout.readline())
        with EmbeddedToxiproxy() as server:
            import requests

            answer = requests.post(f"{server.url}/proxies", timeout=5, json={
                "name": "bench", "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{upstream_port}"})
            answer.raise_for_status()
            proxy_port = int(answer.json()["listen"].rsplit(":", 1)[1])

            direct_rtt = round_trips(upstream_port, args.rounds)
            proxied_rtt = round_trips(proxy_port, args.rounds)
            total = args.megabytes << 20
            direct_mbs = throughput(upstream_port, total)
            proxied_mbs = throughput(proxy_port, total)
    finally:
        upstream.kill()
        upstream.wait(5)

    us = 1e6
    d50, d99 = percentile(direct_rtt, 0.5) * us, percentile(direct_rtt, 0.99) * us
    p50, p99 = percentile(proxied_rtt, 0.5) * us, percentile(proxied_rtt, 0.99) * us
    print(f"{'metric':<28}{'direct':>12}{'proxied':>12}{'added':>12}{'ratio':>8}")
    print(f"{'round trip p50 (us)':<28}{d50:>12.1f}{p50:>12.1f}{p50 - d50:>12.1f}{p50 / d50:>8.2f}")
    print(f"{'round trip p99 (us)':<28}{d99:>12.1f}{p99:>12.1f}{p99 - d99:>12.1f}{p99 / d99:>8.2f}")
    print(f"{'bulk throughput (MB/s)':<28}{direct_mbs:>12.0f}{proxied_mbs:>12.0f}{'':>12}"
          f"{proxied_mbs / direct_mbs:>8.2f}")
    print(f"({args.rounds} round trips of 64 B; {args.megabytes} MiB bulk, best of 3; "
          f"{os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
