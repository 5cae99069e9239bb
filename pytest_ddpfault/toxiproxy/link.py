"""One direction of one proxied connection, and the chain of toxics it runs through.

A :class:`Link` copies bytes from a source socket to a destination socket. With no
toxics it writes each read straight to the destination (the fast path: no per-chunk
objects, no tasks; back-pressure by pausing the source). With toxics it runs a chain::

    source --> head Pipe --> Stage(toxic 1) --> Pipe --> ... --> sink Pipe --> writer --> dest

Each :class:`Stage` runs one toxic in its own task. The chain buffers as Toxiproxy's does.
There, data enters the chain in chunks of at most 32 KiB (Go's ``io.Copy`` buffer) and
each toxic's input is a channel holding its ``GetBufferSize()`` chunks (1024 for
``latency``, else none: a hand-over). Here a pipe holds as many :data:`CHUNK` -sized units
as the toxic's ``buffer_size`` (a chunk read here counts as the 32 KiB reads it would
take in Go), so ``latency`` keeps up to ~32 MiB in flight and bulk throughput under it is
Toxiproxy's.

Toxics can be added, updated and removed while the connection is open: a stage is
*interrupted* (every wait it makes also waits on the interrupt), forwards what it held so
that nothing is lost, and then restarts with the new attributes or leaves the chain. The
end of a stream travels through the chain as an end chunk (EOF, or RST for
``reset_peer``) so that it keeps its place after the data.

Link talks to its two sockets through a small interface (``write``, ``close``, ``pause``,
``resume`` on :class:`~pytest_ddpfault.toxiproxy.proxy.Side`), and to its connection only to
reset it.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
from typing import Any, Callable, Iterable

from .toxics import NOOP, Cleanup, Stateful, ToxicSpec

__all__ = ["Chunk", "Pipe", "Stage", "Link", "CHUNK"]

log = logging.getLogger("pytest_ddpfault.toxiproxy")

#: Go's ``io.Copy`` reads at most 32 KiB at a time: a pipe counts chunks in these units
CHUNK = 32 * 1024


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class Chunk:
    """Bytes read at ``ts`` (loop time), or the end of the stream when ``data`` is None."""

    __slots__ = ("data", "ts", "reset")

    def __init__(self, data: Any, ts: float, reset: bool = False) -> None:
        self.data = data
        self.ts = ts
        self.reset = reset

    @property
    def end(self) -> bool:
        return self.data is None

    def __len__(self) -> int:
        return 0 if self.data is None else len(self.data)

    @property
    def units(self) -> int:
        """How many Go chunks (reads of up to :data:`CHUNK` bytes) this chunk stands for."""
        return max(1, -(-len(self) // CHUNK))


class Interrupted(Exception):
    """Raised inside a stage's wait when its toxic is updated or removed."""


class Pipe:
    """A FIFO of chunks into one stage (or the writer), holding ``capacity`` chunk units.

    Like a Go channel of that buffer size: a producer that has put a chunk into a full
    pipe (more than ``capacity`` units queued; 0 means every chunk is a hand-over) waits
    until the consumer has taken enough for it to be no longer full. Tiny chunks (a
    slicer's) are let through up to one :data:`CHUNK` of bytes before the pipe counts as
    full, so that they need not be handed over one by one.
    """

    __slots__ = ("items", "units", "nbytes", "capacity", "_getter", "_space")

    def __init__(self, capacity: int = 0) -> None:
        self.items: collections.deque[Chunk] = collections.deque()
        self.units = 0
        self.nbytes = 0
        self.capacity = capacity
        self._getter: asyncio.Future | None = None
        self._space: list[Callable[[], None]] = []

    @property
    def full(self) -> bool:
        return self.units > self.capacity and self.nbytes >= CHUNK

    def put(self, chunk: Chunk) -> None:
        self.items.append(chunk)
        self.units += chunk.units
        self.nbytes += len(chunk)
        self.kick()

    def pop(self) -> Chunk:
        chunk = self.items.popleft()
        self.units -= chunk.units
        self.nbytes -= len(chunk)
        if self._space and not self.full:
            self.release()
        return chunk

    def on_item(self, fut: asyncio.Future) -> None:
        """Wake ``fut`` when a chunk arrives (or on :meth:`kick`)."""
        self._getter = fut

    def on_space(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the pipe is no longer full."""
        self._space.append(callback)

    def kick(self) -> None:
        if self._getter is not None:
            getter, self._getter = self._getter, None
            _wake(getter)

    def release(self) -> None:
        callbacks, self._space = self._space, []
        for callback in callbacks:
            callback()


class Stage:
    """Runs one toxic for one link: the primitives a toxic's ``pipe`` uses.

    A toxic takes a chunk with :meth:`recv` (the stage now *holds* it), then passes it on
    with :meth:`forward` (all of it, or its first bytes), or :meth:`drop` s it. On an
    interrupt the stage forwards whatever is still held, so an update or removal never
    loses data.
    """

    def __init__(self, link: "Link", spec: ToxicSpec, input: Pipe, output: Pipe) -> None:
        self.link = link
        self.spec = spec
        self.input = input
        self.output = output
        self.held: Chunk | None = None
        self.closed = False
        self.removing = False
        self.active = False
        toxic = spec.toxic
        self.state = toxic.new_state() if isinstance(toxic, Stateful) else None
        self._loop = link.loop
        self._interrupted = False
        self._waiter: asyncio.Future | None = None
        self.task = self._loop.create_task(self._run())

    # --- primitives for toxics ---------------------------------------------------------

    def now(self) -> float:
        return self._loop.time()

    async def recv(self, deadline: float | None = None) -> Chunk | None:
        """The next chunk (now held); None if ``deadline`` (loop time) passes first."""
        while True:
            self._check()
            if self.input.items:
                self.held = self.input.pop()
                return self.held
            if deadline is not None and self.now() >= deadline:
                return None
            await self._wait(self.input.on_item, deadline)

    async def forward(self, nbytes: int | None = None) -> None:
        """Pass on the held chunk, or only its first ``nbytes`` (the rest stays held)."""
        chunk = self.held
        assert chunk is not None, "forward() without a held chunk"
        if nbytes is None or nbytes >= len(chunk):
            self.held = None
            self._emit(chunk)
        else:
            self.held = Chunk(chunk.data[nbytes:], chunk.ts)
            self._emit(Chunk(chunk.data[:nbytes], chunk.ts))
        while self.output.full and not self.closed:
            await self._wait(self._on_output_space)

    def drop(self) -> None:
        """Discard the held chunk."""
        self.held = None

    def retime(self, ts: float) -> None:
        """Give the held chunk a new timestamp (when it was delivered)."""
        if self.held is not None:
            self.held.ts = ts

    async def sleep(self, seconds: float) -> None:
        await self.sleep_until(self.now() + seconds)

    async def sleep_until(self, when: float) -> None:
        self._check()
        if when > self.now():
            await self._wait(None, when)

    async def stall(self) -> None:
        """Wait until interrupted (which raises); never returns normally."""
        while True:
            await self._wait(None)

    async def close(self, reset: bool = False) -> None:
        """End the stream here (dropping what is held); ``reset`` ends it with a TCP RST."""
        self.held = None
        self._emit(Chunk(None, self.now(), reset))

    # --- control from the link -----------------------------------------------------------

    def interrupt(self) -> None:
        self._interrupted = True
        if self._waiter is not None:
            _wake(self._waiter)

    # --- internals -----------------------------------------------------------------------

    def _check(self) -> None:
        if self._interrupted:
            raise Interrupted

    def _emit(self, chunk: Chunk) -> None:
        self.output.put(chunk)
        if chunk.end:
            self.closed = True

    def _on_output_space(self, fut: asyncio.Future) -> None:
        self.output.on_space(functools.partial(_wake, fut))

    async def _wait(self, arm: Callable[[asyncio.Future], None] | None,
                    deadline: float | None = None) -> None:
        """Wait for what ``arm`` registers, ``deadline``, or an interrupt (raises)."""
        fut = self._loop.create_future()
        self._waiter = fut
        if arm is not None:
            arm(fut)
        timer = self._loop.call_at(deadline, _wake, fut) if deadline is not None else None
        try:
            await fut
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        self._check()

    async def _run(self) -> None:
        while not self.closed:
            self.active = self.spec.roll()
            toxic = self.spec.toxic if self.active else NOOP
            try:
                await toxic.pipe(self)
                if not self.closed:  # a pipe returns only once its stream has ended
                    await self.close()
            except Interrupted:
                if await self._interrupted_for_removal():
                    return
                # an update: run again with the new attributes (and a new toxicity roll)
            except Exception:
                log.exception("toxic %r failed; closing its stream", self.spec.name)
                await self.close()

    async def _interrupted_for_removal(self) -> bool:
        """Forward what was held; if the toxic is being removed, leave the chain (True)."""
        self._interrupted = False
        if self.held is not None:
            chunk, self.held = self.held, None
            self._emit(chunk)
        if not self.removing:
            return False
        if self.active and not self.closed and isinstance(self.spec.toxic, Cleanup):
            await self.spec.toxic.cleanup(self)
        self.link.unlink(self)
        return True


class Link:
    """Copies one direction of a connection through its toxics (see the module doc)."""

    def __init__(self, conn: Any, source: Any, dest: Any, specs: Iterable[ToxicSpec]) -> None:
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        self.source = source
        self.dest = dest
        self.stages: list[Stage] = []
        self.head: Pipe | None = None  # None: the fast path
        self.sink: Pipe | None = None
        self.writer: asyncio.Task | None = None
        self.eof = False  # the source has ended
        self.finished = False  # the destination is closed or gone: nothing more to do
        self.dest_paused = False
        self._dest_ready: asyncio.Future | None = None
        for spec in specs:
            self.add(spec)

    # --- events from the sockets -----------------------------------------------------

    def feed(self, data: bytes) -> None:
        if self.finished:
            return
        head = self.head
        if head is None:
            self.dest.write(data)
            return
        head.put(Chunk(data, self.loop.time()))
        if head.full and self.source.pause("pipe"):
            head.on_space(functools.partial(self.source.resume, "pipe"))

    def feed_eof(self) -> None:
        if self.eof:
            return
        self.eof = True
        if self.finished:
            return
        if self.head is None:
            self.finished = True
            self.dest.close()
        else:
            self.head.put(Chunk(None, self.loop.time()))

    def dest_pause(self) -> None:
        self.dest_paused = True
        if self.head is None:
            self.source.pause("dest")

    def dest_resume(self) -> None:
        self.dest_paused = False
        self.source.resume("dest")
        if self._dest_ready is not None:
            _wake(self._dest_ready)

    def dest_lost(self) -> None:
        self.kill()

    # --- toxics --------------------------------------------------------------------------

    def add(self, spec: ToxicSpec) -> None:
        """Append a toxic at the end of the chain (the data already past it is unaffected)."""
        if self.finished:
            return
        if self.head is None:
            self._chain_mode()
        pipe = Pipe(spec.toxic.buffer_size)
        stage = Stage(self, spec, pipe, self.sink)
        if self.stages:
            self.stages[-1].output = pipe
        else:
            self.head = pipe
        self.stages.append(stage)

    def update(self, spec: ToxicSpec) -> None:
        for stage in self.stages:
            if stage.spec is spec and not stage.task.done():
                stage.interrupt()

    def remove(self, spec: ToxicSpec) -> asyncio.Task | None:
        """Take a toxic out of the chain; returns the stage's task to wait for, if any."""
        for stage in self.stages:
            if stage.spec is spec:
                if stage.task.done() or stage.closed:
                    self.unlink(stage)
                    return None
                stage.removing = True
                stage.interrupt()
                return stage.task
        return None

    def unlink(self, stage: Stage) -> None:
        """Splice ``stage`` out: what waits at its input moves on, in order, past it."""
        index = self.stages.index(stage)
        out = stage.output
        while stage.input.items:
            out.put(stage.input.pop())
        if index:
            self.stages[index - 1].output = out
        else:
            self.head = out
        del self.stages[index]
        stage.input.release()
        if not self.stages and self.sink is not None:
            self.sink.kick()  # the writer may go back to the fast path

    def kill(self) -> None:
        """Stop everything at once (the destination is gone or the proxy stops)."""
        self.finished = True
        for stage in self.stages:
            stage.task.cancel()
        if self.writer is not None:
            self.writer.cancel()

    # --- the writer ----------------------------------------------------------------------

    def _chain_mode(self) -> None:
        self.sink = self.head = Pipe()
        self.source.resume("dest")  # from now on the writer minds the destination's buffer
        self.writer = self.loop.create_task(self._write())

    def _fast_mode(self) -> None:
        self.head = self.sink = None
        self.writer = None
        self.source.resume("pipe")
        if self.dest_paused:
            self.source.pause("dest")

    async def _write(self) -> None:
        sink = self.sink
        assert sink is not None
        while True:
            if not sink.items:
                if not self.stages:
                    self._fast_mode()
                    return
                await self._until(sink.on_item)
            elif self.dest_paused:
                await self._until(self._on_dest_ready)
            else:
                chunk = sink.pop()
                if chunk.end:
                    self._end(chunk)
                    return
                self.dest.write(chunk.data)

    def _on_dest_ready(self, fut: asyncio.Future) -> None:
        self._dest_ready = fut

    async def _until(self, arm: Callable[[asyncio.Future], None]) -> None:
        fut = self.loop.create_future()
        arm(fut)
        await fut

    def _end(self, chunk: Chunk) -> None:
        self.finished = True
        for stage in self.stages:
            stage.task.cancel()
        if chunk.reset:
            self.conn.reset()
        else:
            self.dest.close()
