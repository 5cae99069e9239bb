"""``ddpfault-toxiproxy``: run the embedded Toxiproxy-compatible server standalone.

    ddpfault-toxiproxy --host 127.0.0.1 --port 8474 [--config proxies.json] [--seed N]
                       [--proxy-metrics] [--runtime-metrics] [--version]

Loopback only unless ``--allow-remote``: whoever reaches the API can open proxies from
this machine to anywhere. ``--port 0`` picks a free port; the startup line tells which.
Stops cleanly on SIGINT or SIGTERM. Every flag also takes toxiproxy-server's one-dash
spelling (``-config``, ``-seed``, ...), so this is a drop-in for it; unlike it, a bad
``-config`` file is an error (exit 1), not a log line.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
from typing import Sequence

from .api import VERSION
from .server import ConfigError, EmbeddedToxiproxy

__all__ = ["main", "is_loopback"]

PROG = "ddpfault-toxiproxy"
#: how often the main thread checks that the server thread is still alive
_POLL = 0.5


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="A Toxiproxy 2.x compatible server (HTTP API on --host:--port).")
    # -host/-port too: the real toxiproxy-server's spelling, so this is a drop-in for it
    parser.add_argument("--host", "-host", default="127.0.0.1",
                        help="address for the API to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", "-port", type=int, default=8474,
                        help="API port; 0 picks a free one (default: 8474)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback --host (anyone who reaches the API "
                             "can make this machine connect anywhere)")
    parser.add_argument("--config", "-config", metavar="FILE",
                        help="JSON file of proxies to create on startup: a list of "
                             '{"name", "listen", "upstream", "enabled"}, as POST /populate takes')
    parser.add_argument("--seed", "-seed", type=int,
                        help="seed for the toxics' randomness (jitter, slicer sizes, toxicity)")
    parser.add_argument("--proxy-metrics", "-proxy-metrics", action="store_true",
                        help="serve GET /metrics (Prometheus) with each proxy's byte counters")
    parser.add_argument("--runtime-metrics", "-runtime-metrics", action="store_true",
                        help="serve GET /metrics (Prometheus) with process and Python "
                             "runtime metrics")
    parser.add_argument("--version", "-version", action="store_true",
                        help="print the Toxiproxy version this server emulates and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.version:
        print(f"{PROG} version {VERSION}")
        return 0
    if not is_loopback(args.host) and not args.allow_remote:
        print(f"{PROG}: error: refusing to listen on non-loopback host {args.host!r}: "
              f"anyone who reaches the API could open proxies from this machine. "
              f"Use --host 127.0.0.1, or pass --allow-remote to do it anyway.", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"{PROG}: error: --port {args.port} is not in 0..65535", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = EmbeddedToxiproxy(args.host, args.port, config=args.config, seed=args.seed,
                               proxy_metrics=args.proxy_metrics,
                               runtime_metrics=args.runtime_metrics)
    try:
        try:
            server.start()
        except (OSError, ConfigError) as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 1
        print(f"{PROG}: Toxiproxy {server.version} API listening on {server.url}", flush=True)
        while not stop.wait(_POLL):
            if not server.running:
                print(f"{PROG}: error: the server thread ended unexpectedly", file=sys.stderr)
                return 1
        return 0
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
