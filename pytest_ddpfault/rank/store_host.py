"""Runs in the store-host process: the run's c10d TCPStore, bound to port 0.

Every rank, rank 0 included, connects to it as a client (torchrun's agent-store
layout), so no port is ever probed, closed and handed out. The harness ends the
store by killing this process: the kernel then closes every client connection, which
is also exactly how ``store_down`` takes it away mid-run.

Reverse DNS. c10d names the peer of every socket it opens or accepts with
``getnameinfo``, which asks DNS when the hosts file does not list the address; where
DNS drops reverse queries, that stalls for the resolver's timeout (5 s, per try). Two
addresses are involved, and every hosts file lists only one of them, 127.0.0.1:

- the store's side: c10d's own listening socket is dual-stack, so clients appear as
  ``::ffff:127.0.0.1``. The store host binds an IPv4 socket on 127.0.0.1 itself and
  hands it over (``master_listen_fd``): clients appear as 127.0.0.1.
- the clients' side: a c10d client tries IPv6 first (v4-mapped), so it names the store
  ``::ffff:127.0.0.1`` whatever the listening socket is, in every rank and in this
  process (a master TCPStore is also its own client). Since torch 2.9 c10d stops
  naming peers, for the rest of the process, after the first lookup that fails;
  ``quiet_c10d_name_lookups`` makes that first failure happen at once, without DNS, in
  the zygote that every rank and store host is forked from (not under
  ``DDPFAULT_START_METHOD=spawn``, nor in ``ddp.torchrun``'s workers).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
from datetime import timedelta

from pytest_ddpfault.ipc import EventSink


def store_main(job) -> int:
    opts = pickle.loads(job.payload)
    store = start_store(opts["world_size"], timedelta(seconds=opts["timeout"]), opts.get("host", "127.0.0.1"))
    EventSink(opts["events_path"]).send("store_ready", port=store.port)
    while True:  # until the harness kills this process
        signal.pause()


def start_store(world_size: int, timeout: timedelta, host: str = "127.0.0.1"):
    """A master TCPStore on ``host`` (127.0.0.1, or node 0's address with virtual nodes), port 0,
    listening on an IPv4-only socket where this torch accepts one (``master_listen_fd``,
    torch >= 2.0), else on c10d's own socket (every address: loopback reaches it)."""
    from torch.distributed import TCPStore

    common = dict(world_size=world_size, is_master=True, wait_for_workers=False, timeout=timeout)
    if "master_listen_fd" in (TCPStore.__init__.__doc__ or ""):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((host, 0))  # TCPStore calls listen() itself
        port = sock.getsockname()[1]
        fd = sock.detach()  # c10d owns and closes it from here on
        try:
            store = TCPStore(host, port, master_listen_fd=fd, **common)
        except (RuntimeError, ValueError, TypeError) as exc:  # a backend that cannot take it
            print(f"ddpfault: TCPStore(master_listen_fd=...) failed ({exc}); "
                  f"using c10d's own listening socket", file=sys.stderr, flush=True)
        else:
            if store.port == port:
                return store
            del store  # a backend that ignored the fd: use c10d's own socket, as below
    return TCPStore(host, 0, **common)


# -- c10d's reverse lookups -----------------------------------------------------------

_quieted = False


def quiet_c10d_name_lookups() -> bool:
    """Turn c10d's peer naming off for this process and the processes forked from it,
    without a DNS query; returns whether it could try (glibc, torch importable).

    c10d (torch >= 2.9) sets a process-wide flag after the first ``getnameinfo`` that
    fails and from then on prints peers as numbers. Here that first failure is made to
    happen at once: for one c10d client connection attempt (to a port that refuses it),
    the resolver of this thread is given zero tries (glibc's ``_res.retry``), so the
    lookup fails without sending anything; the previous value is restored right after,
    and nothing else of the resolver changes. Where the hosts file answers the lookup
    (a ``::ffff:127.0.0.1`` entry), nothing fails and nothing needs turning off.
    Costs under a second, once; starts no thread. Only glibc on Linux; elsewhere a no-op.
    """
    global _quieted
    if _quieted:
        return True
    _quieted = True
    if not sys.platform.startswith("linux") or not _is_glibc():
        return False
    with _resolver_without_tries() as ok:
        if not ok:
            return False
        return _one_refused_c10d_connect()


def _is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


@contextlib.contextmanager
def _resolver_without_tries():
    """This thread's glibc resolver state (``struct __res_state``: ``int retrans, retry;``
    first, a stable public layout) with ``retry = 0`` inside the block."""
    import ctypes

    class _ResHead(ctypes.Structure):
        _fields_ = [("retrans", ctypes.c_int), ("retry", ctypes.c_int)]

    try:
        libc = ctypes.CDLL(None)
        res_state, res_init = libc.__res_state, libc.__res_init
    except (OSError, AttributeError):
        yield False
        return
    res_state.restype = ctypes.POINTER(_ResHead)
    if res_init() != 0:  # loads resolv.conf into this thread's state, as the first query would
        yield False
        return
    head = res_state().contents
    saved = head.retry
    head.retry = 0
    try:
        yield True
    finally:
        head.retry = saved


def _one_refused_c10d_connect() -> bool:
    """A TCPStore client connection attempt to 127.0.0.1 on a port bound but not listening:
    c10d names the address (the lookup), the kernel refuses, c10d gives up after one retry
    (0.5-1 s of backoff). c10d's messages about it go to /dev/null."""
    try:
        from torch.distributed import TCPStore
    except ImportError:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held, _stderr_to_devnull():
        held.bind(("127.0.0.1", 0))
        try:
            TCPStore("127.0.0.1", held.getsockname()[1], is_master=False, timeout=timedelta(milliseconds=1))
        except Exception:  # noqa: BLE001 -- refused is the expected outcome
            pass
    return True


@contextlib.contextmanager
def _stderr_to_devnull():
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
