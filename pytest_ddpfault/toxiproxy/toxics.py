"""Toxics: one small class per kind, registered by its Toxiproxy type name.

The chain calls one method, ``async pipe(stage)``, which moves chunks from the stage's
input to its output until the stream ends. The base class's ``pipe`` is the usual loop
and calls ``on_data(stage, chunk)`` / ``on_end(stage)``, which is all most toxics
override. They use only the stage's primitives (``recv``, ``forward``, ``drop``,
``sleep``/``sleep_until``, ``stall``, ``close``; see
:class:`~pytest_ddpfault.toxiproxy.link.Stage`), every wait of which also wakes up on an
interrupt (the toxic is updated or removed); the stage then forwards whatever the toxic
was holding, so no data is lost. Units are in each class's docstring.

Optional capabilities are tiny protocols: :class:`Stateful` (per-connection state that
survives updates) and :class:`Cleanup` (something to do on removal).

What all toxics share lives outside them: attribute decoding and defaults in
:class:`Toxic`, name/stream/toxicity rules and the toxicity roll in :class:`ToxicSpec`
(rolled by the stage per connection and stream).
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, Protocol, runtime_checkable

from .errors import bad_request_body, invalid_stream, invalid_toxic_type, toxic_already_exists
from .gojson import BadJSON, Field, decode_struct

__all__ = [
    "UPSTREAM",
    "DOWNSTREAM",
    "STREAMS",
    "TOXICS",
    "Toxic",
    "ToxicSpec",
    "Stateful",
    "Cleanup",
    "register",
    "RNG",
    "seed",
]

UPSTREAM = 0  #: client -> upstream server bytes
DOWNSTREAM = 1  #: upstream server -> client bytes
STREAMS = ("upstream", "downstream")

TOXICS: dict[str, type["Toxic"]] = {}

#: the randomness of every toxic (jitter, slicer variation, toxicity rolls); one per
#: process, as Toxiproxy's ``math/rand`` is, so that ``-seed`` makes a run repeatable
RNG = random.Random()


def seed(value: int | None) -> None:
    """Seed :data:`RNG` (Toxiproxy's ``-seed``); ``None`` seeds from the OS."""
    RNG.seed(value)


def register(cls: type["Toxic"]) -> type["Toxic"]:
    """Class decorator: make ``cls`` available under ``cls.type_name``."""
    TOXICS[cls.type_name] = cls
    return cls


@runtime_checkable
class Stateful(Protocol):
    """A toxic with per-connection, per-stream state (kept across updates)."""

    def new_state(self) -> Any: ...


@runtime_checkable
class Cleanup(Protocol):
    """A toxic that must act on the connections it holds when it is removed."""

    async def cleanup(self, stage: Any) -> None: ...


class Toxic:
    """Base of all toxics: declared attributes (all integers, default 0) and their decoding.

    ``pipe`` is the one method a toxic must have. The default one runs the usual loop and
    calls :meth:`on_data` for each chunk and :meth:`on_end` at the end of the stream (both
    forward by default), until the stream ends or the toxic closes it.
    """

    type_name: ClassVar[str]
    go_struct: ClassVar[str]  # Go struct name, for error messages
    fields: ClassVar[tuple[Field, ...]] = ()
    #: chunks the toxic's input holds (Go's ``GetBufferSize``); 0: every chunk a hand-over
    buffer_size: ClassVar[int] = 0

    def __init__(self, **values: int) -> None:
        for field in self.fields:
            setattr(self, field.name, values.get(field.name, 0))

    def attributes(self) -> dict[str, int]:
        return {field.name: getattr(self, field.name) for field in self.fields}

    @classmethod
    def decode(cls, raw: Any, base: "Toxic | None" = None) -> "Toxic":
        """Build from a JSON ``attributes`` value, merged over ``base`` (or the defaults)."""
        values = base.attributes() if base is not None else {}
        decode_struct(raw, cls.fields, values, struct_name=cls.go_struct, path="attributes.")
        return cls(**values)

    async def pipe(self, stage: Any) -> None:
        while not stage.closed:
            chunk = await stage.recv()
            if chunk.end:
                await self.on_end(stage)
            else:
                await self.on_data(stage, chunk)

    async def on_data(self, stage: Any, chunk: Any) -> None:
        await stage.forward()

    async def on_end(self, stage: Any) -> None:
        await stage.forward()

    def __repr__(self) -> str:
        attrs = ", ".join(f"{k}={v}" for k, v in self.attributes().items())
        return f"{type(self).__name__}({attrs})"


@register
class Noop(Toxic):
    """Passes everything through (also what an un-rolled toxic runs)."""

    type_name = "noop"
    go_struct = "NoopToxic"


NOOP = Noop()


@register
class Latency(Toxic):
    """Delays each chunk by ``latency`` ± U(``jitter``) milliseconds from its arrival.

    Chunks are pipelined: each one's delay counts from when it reached the proxy, so
    delays of back-to-back chunks do not add up. Its input holds 1024 chunks, as in
    Toxiproxy, so up to ~32 MiB are in flight under it.
    """

    type_name = "latency"
    go_struct = "LatencyToxic"
    fields = (Field("latency", "int64"), Field("jitter", "int64"))
    buffer_size = 1024

    def delay(self) -> float:
        jitter = RNG.randrange(2 * self.jitter) - self.jitter if self.jitter > 0 else 0
        return (self.latency + jitter) / 1000.0

    async def on_data(self, stage: Any, chunk: Any) -> None:
        when = chunk.ts + self.delay()
        await stage.sleep_until(when)
        stage.retime(max(when, chunk.ts))
        await stage.forward()


@register
class Bandwidth(Toxic):
    """Limits the stream to ``rate`` KB/s (1 KB = 1000 bytes); ``rate`` <= 0 stalls it.

    As in Toxiproxy, each chunk owes ``len / rate`` of waiting and a chunk of more than
    100 ms worth goes out in 100 ms slices. The waits keep one schedule for the stream, so
    a wait that overran (timer granularity, a busy loop) is paid back by the next ones
    and the rate holds over a long transfer; time when no data was waiting is not credited
    (the schedule starts again from a chunk's arrival).
    """

    type_name = "bandwidth"
    go_struct = "BandwidthToxic"
    fields = (Field("rate", "int64"),)

    async def pipe(self, stage: Any) -> None:
        ready = stage.now()  # when the bytes forwarded so far are paid for
        slice_bytes = self.rate * 100
        while not stage.closed:
            chunk = await stage.recv()
            if chunk.end:
                await stage.forward()
                continue
            if self.rate <= 0:
                await stage.stall()
            ready = max(ready, chunk.ts)
            remaining = len(chunk)
            while remaining:
                piece = min(remaining, slice_bytes)
                ready += piece / (self.rate * 1000)
                await stage.sleep_until(ready)
                await stage.forward(piece)
                remaining -= piece


@register
class SlowClose(Toxic):
    """Passes data; delays the close that follows the end of the stream by ``delay`` ms."""

    type_name = "slow_close"
    go_struct = "SlowCloseToxic"
    fields = (Field("delay", "int64"),)

    async def on_end(self, stage: Any) -> None:
        await stage.sleep(self.delay / 1000.0)
        await stage.forward()


@register
class Timeout(Toxic):
    """Drops all data; closes the connection once ``timeout`` ms pass with no data (0: never).

    As in Toxiproxy, the timer restarts with every chunk dropped: a connection that keeps
    sending stays open. Removing the toxic closes the connections it was holding.
    """

    type_name = "timeout"
    go_struct = "TimeoutToxic"
    fields = (Field("timeout", "int64"),)

    async def pipe(self, stage: Any) -> None:
        while not stage.closed:
            deadline = stage.now() + self.timeout / 1000.0 if self.timeout > 0 else None
            chunk = await stage.recv(deadline=deadline)
            if chunk is None:  # the timeout passed
                await stage.close()
            elif chunk.end:
                await stage.forward()
            else:
                stage.drop()

    async def cleanup(self, stage: Any) -> None:
        await stage.close()


@register
class ResetPeer(Toxic):
    """On the first data, waits ``timeout`` ms, then resets the connection (TCP RST)."""

    type_name = "reset_peer"
    go_struct = "ResetToxic"
    fields = (Field("timeout", "int64"),)

    async def pipe(self, stage: Any) -> None:
        await stage.recv()
        await stage.sleep(self.timeout / 1000.0)
        await stage.close(reset=True)


@register
class Slicer(Toxic):
    """Cuts data into pieces of ``average_size`` ± ``size_variation`` bytes, ``delay`` µs apart."""

    type_name = "slicer"
    go_struct = "SlicerToxic"
    fields = (Field("average_size", "int"), Field("size_variation", "int"), Field("delay", "int"))

    def cuts(self, size: int) -> list[int]:
        """Piece sizes for ``size`` bytes: Toxiproxy's halving with random variation."""
        average, variation = self.average_size, max(self.size_variation, 0)
        sizes: list[int] = []
        todo = [size]
        while todo:
            length = todo.pop()
            if length - average <= variation or length <= 1:
                sizes.append(length)
                continue
            shift = RNG.randrange(2 * variation) - variation if variation else 0
            left = min(max(length // 2 + shift, 1), length - 1)
            todo.append(length - left)
            todo.append(left)
        return sizes

    async def on_data(self, stage: Any, chunk: Any) -> None:
        for piece in self.cuts(len(chunk.data)):
            await stage.forward(piece)
            await stage.sleep(self.delay / 1e6)


class _Sent:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


@register
class LimitData(Toxic):
    """Forwards ``bytes`` bytes per connection and stream, then closes the connection."""

    type_name = "limit_data"
    go_struct = "LimitDataToxic"
    fields = (Field("bytes", "int64"),)

    def new_state(self) -> _Sent:
        return _Sent()

    async def on_data(self, stage: Any, chunk: Any) -> None:
        sent: _Sent = stage.state
        allowed = min(len(chunk.data), max(self.bytes - sent.count, 0))
        if allowed:
            sent.count += allowed
            await stage.forward(allowed)
        if self.bytes - sent.count <= 0:
            await stage.close()


# --- the toxic as the API sees it -------------------------------------------------------

_WRAPPER_FIELDS = (
    Field("name", "string"),
    Field("type", "string"),
    Field("stream", "string"),
    Field("toxicity", "float32"),
)
_UPDATE_FIELDS = (Field("toxicity", "float32"),)


class ToxicSpec:
    """A toxic on a proxy: name, type, stream, toxicity and the toxic's attributes.

    Shared rules live here: defaults (stream ``downstream``, toxicity 1.0, name
    ``<type>_<stream>``), case-insensitive stream names kept as written, attribute merge
    on update, and Toxiproxy's order of checks and error answers.
    """

    def __init__(self, name: str, stream: str, toxicity: float, toxic: Toxic) -> None:
        self.name = name
        self.stream = stream
        self.direction = STREAMS.index(stream.lower())
        self.toxicity = toxicity
        self.toxic = toxic

    @property
    def type(self) -> str:
        return self.toxic.type_name

    @classmethod
    def from_body(cls, body: Any, existing_names: set[str] | frozenset[str] = frozenset()) -> "ToxicSpec":
        """Parse a ``POST /proxies/{p}/toxics`` body (already JSON-decoded)."""
        values: dict[str, Any] = {"name": "", "type": "", "stream": "downstream", "toxicity": 1.0}
        try:
            decode_struct(body, _WRAPPER_FIELDS, values, struct_name="ToxicWrapper",
                          top_type="toxics.ToxicWrapper")
        except BadJSON as exc:
            raise bad_request_body(exc) from None
        if values["stream"].lower() not in STREAMS:
            raise invalid_stream()
        name = values["name"] or f"{values['type']}_{values['stream']}"
        kind = TOXICS.get(values["type"])
        if kind is None:
            raise invalid_toxic_type()
        if name in existing_names:
            raise toxic_already_exists()
        attributes = _attributes_of(body)
        try:
            toxic = kind.decode(attributes)
        except BadJSON as exc:
            raise bad_request_body(exc) from None
        return cls(name, values["stream"], values["toxicity"], toxic)

    def update(self, body: Any) -> None:
        """Apply a ``PATCH`` body: merge attributes, maybe change toxicity; all or nothing."""
        values = {"toxicity": self.toxicity}
        try:
            decode_struct(body, _UPDATE_FIELDS, values, struct_name="ToxicWrapper",
                          top_type="toxics.ToxicWrapper")
            toxic = type(self.toxic).decode(_attributes_of(body), base=self.toxic)
        except BadJSON as exc:
            raise bad_request_body(exc) from None
        self.toxic = toxic
        self.toxicity = values["toxicity"]

    def roll(self) -> bool:
        """Whether this toxic acts on one connection's stream (probability ``toxicity``)."""
        return RNG.random() < self.toxicity

    def as_json(self) -> dict[str, Any]:
        return {
            "attributes": self.toxic.attributes(),
            "name": self.name,
            "type": self.type,
            "stream": self.stream,
            "toxicity": float(self.toxicity),
        }

    def __repr__(self) -> str:
        return f"ToxicSpec({self.name!r}, {self.stream!r}, {self.toxicity}, {self.toxic!r})"


def _attributes_of(body: Any) -> Any:
    """The raw ``attributes`` value of a body (key matched case-insensitively, like Go)."""
    if not isinstance(body, dict):
        return None
    if "attributes" in body:
        return body["attributes"]
    for key, value in body.items():
        if key.lower() == "attributes":
            return value
    return None
