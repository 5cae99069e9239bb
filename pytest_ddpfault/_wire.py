"""One message shape between processes: length-prefixed pickled ``(name, payload)`` frames.

Used on the zygote's control socket. Both sides are stdlib-only so that the
zygote can speak it before (and without) importing anything heavy.
"""
from __future__ import annotations

import pickle
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
