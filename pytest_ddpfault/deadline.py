"""Absolute deadlines: every wait in the harness takes one, never loose seconds."""
from __future__ import annotations

import time


class Deadline:
    """A point in ``time.monotonic()`` time; ``Deadline.after(s)`` is ``s`` seconds from now."""

    __slots__ = ("at",)

    def __init__(self, at: float) -> None:
        self.at = at

    @classmethod
    def after(cls, seconds: float) -> "Deadline":
        return cls(time.monotonic() + seconds)

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def within(self, seconds: float) -> "Deadline":
        """The smaller of this deadline and ``seconds`` from now (an inner wait's own bound)."""
        return Deadline(min(self.at, time.monotonic() + seconds))

    def backoff(self, first: float = 0.005, most: float = 0.1) -> "Backoff":
        return Backoff(self, first, most)

    def __repr__(self) -> str:
        left = self.at - time.monotonic()
        return f"<Deadline: {left:.1f} s from now>" if left >= 0 else f"<Deadline: {-left:.1f} s ago>"


class Backoff:
    """Polling where there is nothing to wait on (flock has no multi-lock wait; a socket's
    name appearing): each ``wait()`` sleeps twice as long as the last, up to ``most``, and
    never past the deadline."""

    __slots__ = ("deadline", "step", "most")

    def __init__(self, deadline: Deadline, first: float = 0.005, most: float = 0.1) -> None:
        self.deadline, self.step, self.most = deadline, first, most

    def wait(self) -> None:
        time.sleep(min(self.step, self.deadline.remaining()))
        self.step = min(self.step * 2, self.most)
