"""Messages between the harness's processes: one shape on every channel.

A message is a dict whose ``"type"`` names it; the other keys are its payload. Every
receiver dispatches on the type and rejects a type it does not know, loudly
(``UnknownMessage`` names it, its sender and what is known). Channels differ only in
encoding:

- frames (the zygote's control socket): length-prefixed pickles, so a ``ChildJob``
  travels as it is;
- events (ranks and the store host to the harness): JSON Unix datagrams in the run's
  directory. A send lands in the kernel at once, so an event sent right before a rank
  kills or freezes itself is not lost;
- event lines (every process of a launched run, ``DDPFAULT_EVENTS``): the same JSON, one
  line each, appended with one ``write`` per line;
- result files (a rank's end): one pickled message, written atomically.

A JSON message too big for a datagram has its longest text fields shortened (saying
so) rather than being cut or dropped. Stdlib only: the zygote speaks this before
importing anything heavy, and ranks import nothing of the parent side.
"""
from __future__ import annotations

import json
import os
import pickle
import socket
import struct
import time
from collections.abc import Callable, Iterable, Mapping

_HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024
MAX_EVENT = 60_000            # bytes of one JSON datagram (well under the socket's limit)


class UnknownMessage(RuntimeError):
    """A message a receiver does not know (or that is not a message at all)."""


def message(type_: str, **payload) -> dict:
    return {"type": type_, **payload}


def dispatch(msg: Mapping, handlers: Mapping[str, Callable[[Mapping], object]], source: str):
    """Call the handler of ``msg``'s type; an unknown type is an error that says so."""
    kind = msg.get("type") if isinstance(msg, Mapping) else None
    handler = handlers.get(kind) if isinstance(kind, str) else None
    if handler is None:
        raise UnknownMessage(f"unknown message {kind!r} from {source} (known: {', '.join(sorted(handlers))}): "
                             f"{_preview(msg)}")
    return handler(msg)


def check_type(msg: object, known: Iterable[str], source: str) -> dict:
    """``msg`` if it is a message of one of the ``known`` types; else ``UnknownMessage``."""
    known = set(known)
    if not isinstance(msg, dict) or msg.get("type") not in known:
        kind = msg.get("type") if isinstance(msg, dict) else type(msg).__name__
        raise UnknownMessage(f"unknown message {kind!r} from {source} (known: {', '.join(sorted(known))}): "
                             f"{_preview(msg)}")
    return msg


def _preview(msg: object) -> str:
    text = repr(msg)
    return text if len(text) <= 200 else text[:197] + "..."


# --- frames ----------------------------------------------------------------------------

def encode_frame(msg: dict) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


def send_frame(sock, type_: str, **payload) -> None:
    sock.sendall(encode_frame(message(type_, **payload)))


class FrameReader:
    """Accumulates bytes from a socket and returns the complete messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[dict]:
        self._buf += data
        out = []
        while len(self._buf) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(self._buf)
            if size > MAX_FRAME:
                raise UnknownMessage(f"a frame of {size} bytes exceeds the {MAX_FRAME}-byte limit")
            end = _HEADER.size + size
            if len(self._buf) < end:
                break
            out.append(pickle.loads(bytes(self._buf[_HEADER.size:end])))
            del self._buf[:end]
        return out


# --- JSON: events and event lines ---------------------------------------------------------

def encode_json(msg: dict, limit: int | None = None) -> bytes:
    """JSON of ``msg``; within ``limit`` bytes by shortening its longest text fields."""
    data = json.dumps(msg, default=str).encode()
    if limit is None or len(data) <= limit:
        return data
    msg = dict(msg)
    while len(data) > limit:
        texts = [k for k, v in msg.items() if isinstance(v, str) and k != "type"]
        if not texts:
            msg = message(msg.get("type", "?"), oversized=len(data))
            return json.dumps(msg).encode()
        key = max(texts, key=lambda k: len(msg[k]))
        value, excess = msg[key], len(data) - limit + 64
        keep = max(0, len(value) - excess)
        msg[key] = value[:keep] + f"... [{len(value) - keep} characters cut to fit a message]"
        data = json.dumps(msg, default=str).encode()
    return data


def decode_json(data: bytes, source: str) -> dict:
    try:
        msg = json.loads(data)
    except ValueError as exc:
        raise UnknownMessage(f"a message from {source} that is not JSON ({exc}): {data[:200]!r}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise UnknownMessage(f"a message from {source} without a type: {_preview(msg)}")
    return msg


class EventSink:
    """Sender side of a run's event datagrams (ranks, the store host)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def send(self, type_: str, **payload) -> None:
        data = encode_json(message(type_, **payload), MAX_EVENT)
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
            out.append(decode_json(data, f"a process of the run ({self.path})"))

    def close(self) -> None:
        self._sock.close()


class LineSink:
    """Appends one JSON line per message to a file shared by many processes.

    One ``os.write`` per line on an ``O_APPEND`` descriptor: lines of different processes
    do not interleave. ``stamp`` fields go into every line. A failed write never fails
    the process (the message is lost, the run goes on).
    """

    def __init__(self, path: str, **stamp) -> None:
        self.path = path
        self.stamp = stamp
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def send(self, type_: str, **payload) -> None:
        msg = message(type_, **{**self.stamp, **payload}, pid=os.getpid(), wall=time.time())
        msg.setdefault("time", time.monotonic())
        try:
            os.write(self._fd, encode_json(msg) + b"\n")
        except OSError:
            pass


class LineTail:
    """The messages appended to an event-lines file since the last look. Only whole lines
    count: a last line without its newline (being written, or its writer was killed
    mid-write) waits; a whole line that is not a message is an ``UnknownMessage``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        return [decode_json(line, self.path) for line in lines if line.strip()]


def read_lines(path: str) -> list[dict]:
    """Every whole message of an event-lines file, in file order."""
    return LineTail(path).read()


# --- result files ----------------------------------------------------------------------------

def write_file(path: str, type_: str, **payload) -> None:
    """One message in a file, atomically: a process killed half-way leaves none, not a torn one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(message(type_, **payload), f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)


def read_file(path: str, known: Iterable[str]) -> dict | None:
    """The message in ``path``; None if there is none (its writer never got that far)."""
    try:
        with open(path, "rb") as f:
            msg = pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None
    return check_type(msg, known, path)
