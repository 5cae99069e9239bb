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

    def __repr__(self) -> str:
        left = self.at - time.monotonic()
        return f"<Deadline: {left:.1f} s from now>" if left >= 0 else f"<Deadline: {-left:.1f} s ago>"
