"""A child process's tie to its parent: it dies with it (PR_SET_PDEATHSIG). Stdlib only, and
imports nothing of the package: every kind of child (a bootstrapped rank, a namespace holder,
the rendezvous host) takes it first."""
from __future__ import annotations

import ctypes
import os
import signal

# Exit code of a child whose bootstrap itself failed (EX_SOFTWARE).
BOOTSTRAP_FAILED = 70
_PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """``sig`` (SIGKILL) to this process when its parent dies (Linux; elsewhere, a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the parent's own clean-up still applies
        pass


def die_with_parent(expected_parent: int, sig: int = signal.SIGKILL) -> None:
    """``sig`` (SIGKILL) to this process when its parent dies; exit now if it already has."""
    set_parent_death_signal(sig)
    if os.getppid() != expected_parent:  # the parent died before prctl took effect
        os._exit(BOOTSTRAP_FAILED)
