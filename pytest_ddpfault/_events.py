"""Small messages from ranks and the store host to the harness, as JSON datagrams.

The harness binds a Unix datagram socket in the run's directory; children send to it.
A send lands in the kernel at once, so an event sent right before a rank kills or
freezes itself is not lost. Big things (results) go through files instead.
"""
from __future__ import annotations

import json
import socket

MAX_EVENT = 60_000


class EventSink:
    """Child side."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def send(self, event: dict) -> None:
        data = json.dumps(event).encode()[:MAX_EVENT]
        try:
            self._sock.sendto(data, self.path)
        except OSError:  # the harness is gone or its inbox is full: never fail the rank for it
            pass


class EventInbox:
    """Harness side: select on ``fileno()``, then ``drain()``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(path)
        self._sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> list[dict]:
        out = []
        while True:
            try:
                data = self._sock.recv(MAX_EVENT + 1)
            except (BlockingIOError, InterruptedError):
                return out
            try:
                out.append(json.loads(data))
            except ValueError:
                continue

    def close(self) -> None:
        self._sock.close()
