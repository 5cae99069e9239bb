"""Messages between the harness's processes. Stdlib only (the zygote speaks it before
importing anything heavy; ranks import nothing of the parent side).

- frames: length-prefixed pickled ``(name, payload)`` on the zygote's control socket;
- events: small messages from ranks and the store host to the harness, as Unix datagrams
  in the run's directory. A send lands in the kernel at once, so an event sent right
  before a rank kills or freezes itself is not lost. Big things (results) go through files.
"""
from __future__ import annotations

import json
import pickle
import socket
import struct

_HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024


def encode(name: str, payload: object) -> bytes:
    body = pickle.dumps((name, payload), protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def send(sock, name: str, payload: object) -> None:
    sock.sendall(encode(name, payload))


class FrameReader:
    """Accumulates bytes from a non-blocking socket and yields complete frames."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, object]]:
        self._buf += data
        frames = []
        while len(self._buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise ValueError(f"frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
            end = _HEADER.size + size
            if len(self._buf) < end:
                break
            frames.append(pickle.loads(bytes(self._buf[_HEADER.size:end])))
            del self._buf[:end]
        return frames


# --- events ---------------------------------------------------------------------------
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
