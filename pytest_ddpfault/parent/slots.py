"""A cap on rank processes running at once across processes (``--ddp-max-procs``).

A counting semaphore made of N lock files in a directory that every pytest-xdist worker
of a session shares: a run takes one slot per rank by ``flock``-ing slot files, and
the kernel releases them when the run ends or its process dies (no stale locks).
Oversubscribing 2 cores with 4 workers x 4 ranks turns healthy runs into spurious gloo
timeouts; the cap keeps the machine at a load it can serve.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager

from pytest_ddpfault.deadline import Deadline



def default_max_procs() -> int:
    return max(8, 4 * (os.cpu_count() or 1))


class SlotsTimeout(TimeoutError):
    pass


class ProcessSlots:
    def __init__(self, directory: str, max_procs: int) -> None:
        self.directory = directory
        self.max_procs = max_procs
        os.makedirs(directory, exist_ok=True)

    def _try_take(self, n: int) -> list[int] | None:
        held: list[int] = []
        for i in range(self.max_procs):
            fd = os.open(os.path.join(self.directory, f"slot{i}"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append(fd)
            if len(held) == n:
                return held
        self._release(held)  # all or nothing: holding a part could deadlock two runs
        return None

    @staticmethod
    def _release(fds: list[int]) -> None:
        for fd in fds:
            os.close(fd)  # closing drops the flock

    @contextmanager
    def hold(self, n: int, deadline: Deadline):
        """Hold ``min(n, max_procs)`` slots for the duration of the block; wait for them
        until ``deadline`` (the caller's: a run's set-up deadline)."""
        n = min(n, self.max_procs)
        waited_from = time.monotonic()
        pause = deadline.backoff()
        while True:
            held = self._try_take(n)
            if held is not None:
                break
            if deadline.expired():
                raise SlotsTimeout(f"waited {time.monotonic() - waited_from:.0f} s for {n} of {self.max_procs} rank slots "
                                   f"in {self.directory}")
            pause.wait()  # flock has no multi-lock wait
        try:
            yield
        finally:
            self._release(held)
