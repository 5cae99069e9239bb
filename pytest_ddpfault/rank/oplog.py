"""A rank's operation log: every counted call (op, ``step()``, ``init``) as a fixed-size
record in a memory-mapped file that the harness reads after the rank ended.

Why a shared mapping: a record is in the file (the page cache) the moment it is written,
with no ``write`` call and no flush, so the log of a rank that was SIGKILLed or frozen with
SIGSTOP mid-call is there to read, up to its last op. The file is a ring of ``capacity``
records (bounded size: 88 bytes a record, 4096 records by default): a long run keeps its
last records and says how many it dropped.

Layout: a 64-byte header (magic, capacity, how many records were ever begun), then the
records. A record is written whole before the count says it exists; its end time and state
are filled in later, in place (an op in flight has state 0).

Stdlib only: written inside ranks and armed processes, read by the harness.
"""
from __future__ import annotations

import mmap
import os
import struct
import threading

__all__ = ["CAPACITY", "OpLog", "read_oplog"]

CAPACITY = 4096
MAGIC = b"DDPO"
_HEADER = struct.Struct("<4sIQ")         # magic, capacity, records begun
_HEADER_SIZE = 64
_RECORD = struct.Struct("<BBHIQdd32s24s")  # kind, source, state, seq, bytes, start, end, name, group
_END = struct.Struct("<H")                 # state, at offset 2 of a record
_END_TIME = struct.Struct("<d")            # end, at offset 24 of a record

KINDS = {1: "op", 2: "step"}
SOURCES = {0: "python", 1: "c++"}
STATES = {0: "in flight", 1: "done", 2: "failed"}
OP, STEP = 1, 2
PYTHON, CPP = 0, 1
IN_FLIGHT, DONE, FAILED = 0, 1, 2


class OpLog:
    """Writer side. Thread-safe (DDP's Reducer may issue ops from autograd threads)."""

    def __init__(self, path: str, capacity: int = CAPACITY) -> None:
        self.path = path
        self.capacity = capacity
        size = _HEADER_SIZE + capacity * _RECORD.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map: mmap.mmap | None = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        _HEADER.pack_into(self._map, 0, MAGIC, capacity, 0)
        self._next = 0
        self._lock = threading.Lock()
        self._names: dict[str, bytes] = {}
        self._pid = os.getpid()

    def begin(self, kind: int, name: str, seq: int, group: str, nbytes: int, source: int,
              start: float, end: float = 0.0, state: int = IN_FLIGHT) -> int:
        """Write one record; returns its index (for ``end``), or -1 when the log is off."""
        if self._map is None or os.getpid() != self._pid:  # a forked child writes no parent's log
            return -1
        encoded = self._names.get(name)
        if encoded is None:
            encoded = self._names[name] = name.encode()[:32]
        with self._lock:
            i = self._next
            self._next = i + 1
            _RECORD.pack_into(self._map, _HEADER_SIZE + (i % self.capacity) * _RECORD.size, kind, source, state,
                              seq, nbytes, start, end, encoded, group.encode()[:24])
            _HEADER.pack_into(self._map, 0, MAGIC, self.capacity, i + 1)
        return i

    def end(self, index: int, end: float, state: int = DONE) -> None:
        """The record ``index`` ended at ``end`` (if the ring still holds it)."""
        if index < 0 or self._map is None:
            return
        with self._lock:
            if self._next - index > self.capacity:
                return
            offset = _HEADER_SIZE + (index % self.capacity) * _RECORD.size
            _END_TIME.pack_into(self._map, offset + 24, end)
            _END.pack_into(self._map, offset + 2, state)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


def read_oplog(path: str) -> tuple[list[dict], int]:
    """The records of the log at ``path`` in order, and how many the ring dropped.

    Each record is a dict: ``kind`` ("op", "step"), ``name``, ``seq``, ``group``, ``bytes``,
    ``start``, ``end`` (None while in flight), ``state``, ``source`` ("python", "c++");
    times on this machine's monotonic clock. A missing or foreign file is an empty log.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return [], 0
    if len(data) < _HEADER_SIZE:
        return [], 0
    magic, capacity, count = _HEADER.unpack_from(data, 0)
    if magic != MAGIC or capacity <= 0 or len(data) < _HEADER_SIZE + capacity * _RECORD.size:
        return [], 0
    first = max(0, count - capacity)
    out = []
    for i in range(first, count):
        kind, source, state, seq, nbytes, start, end, name, group = _RECORD.unpack_from(
            data, _HEADER_SIZE + (i % capacity) * _RECORD.size)
        out.append({"kind": KINDS.get(kind, "op"), "name": name.rstrip(b"\0").decode(errors="replace"),
                    "seq": seq, "group": group.rstrip(b"\0").decode(errors="replace"), "bytes": nbytes,
                    "start": start, "end": end if state != IN_FLIGHT else None,
                    "state": STATES.get(state, "done"), "source": SOURCES.get(source, "python")})
    return out, first
