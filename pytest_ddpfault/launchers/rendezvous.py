"""The harness-owned c10d rendezvous endpoint of a multi-node ``ddp.torchrun``, and ``rdzv_conf``.

The endpoint is a TCPStore in a process of its own (``rank/rdzv_host.py``) on a socket this
process binds to 127.0.0.1, port 0, and listens on before handing it over: no port race,
no fixed port, and the agents may start connecting at once. No agent hosts it
(``is_host=false``), so the endpoint outlives any node the plan kills.
"""
from __future__ import annotations

import os
import select
import socket
import subprocess
import sys

from pytest_ddpfault.deadline import Deadline
from pytest_ddpfault.errors import HarnessError, SettingsError
from pytest_ddpfault.parent.reaping import kill_with_group
from pytest_ddpfault.rank.rdzv_host import BACKLOG

# rdzv_conf keys torch's c10d/dynamic rendezvous reads (dynamic_rendezvous.create_handler and
# c10d_rendezvous_backend), all whole seconds or counts >= 1.
RDZV_INT_KEYS = ("join_timeout", "last_call_timeout", "close_timeout", "heartbeat_timeout",
                 "keep_alive_interval", "keep_alive_max_attempt", "read_timeout")
_HARNESS_KEYS = {"is_host": "the harness hosts the rendezvous store: every agent is a client",
                 "store_type": "the rendezvous store is the harness's TCPStore"}


def parse_rdzv_conf(conf) -> dict[str, int]:
    """``rdzv_conf`` as a dict or ``"k=v,k=v"``; each key one of ``RDZV_INT_KEYS`` with a
    whole number >= 1. Raises SettingsError naming what is wrong and what is allowed."""
    if conf is None:
        return {}
    if isinstance(conf, str):
        items = []
        for piece in (p.strip() for p in conf.split(",")):
            if not piece:
                continue
            key, eq, value = piece.partition("=")
            if not eq:
                raise SettingsError(f"rdzv_conf {conf!r}: {piece!r} is not key=value (e.g. 'last_call_timeout=1')")
            items.append((key.strip(), value.strip()))
    elif isinstance(conf, dict):
        items = list(conf.items())
    else:
        raise SettingsError(f"rdzv_conf must be a dict or a 'key=value,...' string, got {type(conf).__name__} {conf!r}")
    out = {}
    allowed = ", ".join(RDZV_INT_KEYS)
    for key, value in items:
        if key in _HARNESS_KEYS:
            raise SettingsError(f"rdzv_conf {key!r} cannot be set: {_HARNESS_KEYS[key]}; allowed: {allowed}")
        if key not in RDZV_INT_KEYS:
            raise SettingsError(f"rdzv_conf has an unknown key {key!r}; allowed: {allowed}")
        number = value if isinstance(value, int) and not isinstance(value, bool) else None
        if isinstance(value, str) and value.isdecimal():
            number = int(value)
        if number is None or number < 1:
            raise SettingsError(f"rdzv_conf {key}={value!r}: must be a whole number >= 1 (seconds, or a count)")
        out[key] = number
    return out


def format_rdzv_conf(conf: dict, client: bool = True) -> str:
    """The ``--rdzv-conf`` value: the given keys, after ``is_host=false`` for an agent of the
    harness's endpoint (``client``)."""
    return ",".join([*(["is_host=false"] if client else []), *(f"{k}={v}" for k, v in conf.items())])


class RendezvousEndpoint:
    """A TCPStore on 127.0.0.1 that the harness owns; ``address`` is ``host:port``.

    ``inside`` (the ``nsenter`` prefix into node 0's network namespace, under the
    "namespaces" engine) and ``host`` (node 0's address): the store process binds there
    itself and reports its port (``--bind``), within ``until``."""

    def __init__(self, env: dict, out_path: str, inside: list[str] | None = None, host: str = "127.0.0.1",
                 until: Deadline | None = None) -> None:
        self.host = host
        self.proc: subprocess.Popen | None = None
        if inside is not None:
            self._start_inside(env, out_path, inside, until or Deadline.after(30.0))
            return
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(BACKLOG)   # clients queue here until the store takes the socket over
            self.port = self.sock.getsockname()[1]
            fd = self.sock.fileno()
            with open(out_path, "wb") as out:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "pytest_ddpfault.rank.rdzv_host", str(fd), str(self.port), str(os.getpid())],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, pass_fds=(fd,),
                    start_new_session=True)
        finally:
            self.sock.close()  # the store process holds the socket now

    def _start_inside(self, env: dict, out_path: str, inside: list[str], until: Deadline) -> None:
        r, w = os.pipe()
        try:
            with open(out_path, "wb") as out:
                self.proc = subprocess.Popen(
                    [*inside, sys.executable, "-m", "pytest_ddpfault.rank.rdzv_host", "--bind", self.host, str(w),
                     str(os.getpid())],
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, pass_fds=(w,),
                    start_new_session=True)
            os.close(w)
            w = -1
            text = b""
            while not text.endswith(b"\n"):
                ready, _, _ = select.select([r], [], [], until.remaining())
                chunk = os.read(r, 64) if ready else b""
                if not chunk:
                    self.stop(Deadline.after(1.0))
                    with open(out_path, errors="replace") as f:
                        said = f.read()[-800:]
                    raise HarnessError(f"the rendezvous store in node 0's namespace did not report its port "
                                       f"({'it ended' if ready else 'in time'}): {said}")
                text += chunk
            self.port = int(text)
        finally:
            os.close(r)
            if w >= 0:
                os.close(w)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, until: Deadline) -> None:
        if self.proc is not None and self.proc.poll() is None:
            kill_with_group(self.proc.pid)
            try:
                self.proc.wait(until.remaining())
            except subprocess.TimeoutExpired:  # SIGKILLed: gone once the kernel is done with it
                pass
