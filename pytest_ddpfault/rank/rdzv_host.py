"""The rendezvous endpoint of a multi-node ``ddp.torchrun``: a c10d TCPStore that no agent owns.

    python -m pytest_ddpfault.rank.rdzv_host FD PORT LAUNCHER_PID
    python -m pytest_ddpfault.rank.rdzv_host --bind HOST REPORT_FD LAUNCHER_PID

(the second inside node 0's network namespace under the "namespaces" engine: it binds
``HOST``, port 0, there itself and writes the port to ``REPORT_FD`` before importing torch)

The launcher binds and listens on 127.0.0.1, port 0, itself and hands the socket over as
``FD`` (``master_listen_fd``): the port is known, and agents may connect, before this
process has imported torch, and no port is ever probed then handed out. The agents are
told ``is_host=false``, so every one of them is a client and losing any node leaves the
endpoint up. The process dies with its launcher (PR_SET_PDEATHSIG) and is otherwise
killed by it when the run ends.
"""
from __future__ import annotations

import os
import signal
import socket
import sys
from datetime import timedelta

from pytest_ddpfault.rank.bootstrap import die_with_parent

# How long a client request may wait on the store; the agents' own read_timeout bounds theirs.
STORE_TIMEOUT = timedelta(seconds=300)
BACKLOG = 128  # the agents' connections queue here until the store takes the socket over


def main(argv: list[str]) -> int:
    if argv[0] == "--bind":  # in a node's network namespace: bind there, tell the launcher the port
        host, report, launcher = argv[1], int(argv[2]), int(argv[3])
        die_with_parent(launcher)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, 0))
        sock.listen(BACKLOG)
        fd, port = sock.fileno(), sock.getsockname()[1]
        os.write(report, f"{port}\n".encode())
        os.close(report)
    else:
        host, fd, port = "127.0.0.1", int(argv[0]), int(argv[1])
        die_with_parent(int(argv[2]))
    from torch.distributed import TCPStore

    store = TCPStore(host, port, master_listen_fd=fd, is_master=True, wait_for_workers=False,
                     timeout=STORE_TIMEOUT)
    if store.port != port:  # a store backend that ignored the socket: the agents were told another port
        print(f"ddpfault: the rendezvous store listens on {store.port}, not on {port}", file=sys.stderr, flush=True)
        return 1
    while True:  # until the launcher kills this process
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
