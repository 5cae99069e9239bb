"""``pytest_ddpfault.step()`` and the slot a rank's trigger machinery fills.

Inside a rank, ``hooks.install_plan`` puts its step counter in ``hook``; everywhere else it
is None and ``step()`` does nothing. A module of its own so that the rank side sets it
without importing the package's public face (which reaches the parent side).
"""
from __future__ import annotations

from collections.abc import Callable

__all__ = ["hook", "step"]

# Set inside a rank by the trigger machinery; None everywhere else.
hook: Callable[[], object] | None = None


def step() -> None:
    """Mark one training step, for ``at=step#N`` triggers. A no-op outside the plugin."""
    marker = hook
    if marker is not None:
        marker()
