"""The errors users may catch, in one light module (no torch), re-exported by the package.

- ``FaultSpecError``: a fault spec, trigger or fault argument that is not valid.
- ``SettingsError``: a bad marker argument, option or ``run_group``/``ddp.run`` argument.
- ``HarnessError``: the harness itself could not run the group (not a failure of user code).
- ``TorchrunError``: a launched run (``ddp.torchrun``, ``run_script``) could not be started.
- ``TestTimeLimitPassed``: the test's pytest-timeout limit has passed; ``ddp`` starts no
  more runs (a BaseException, like pytest's own outcomes).
- ``UnfiredFaultWarning``: a ``ddp.run`` ended with faults of its plan that never fired
  (a test that passes may pass for the wrong reason).

Every message names the bad value, where it came from, and what is allowed.
"""
from __future__ import annotations

import os
import sys
import warnings

__all__ = ["FaultSpecError", "HarnessError", "HarnessWarning", "SettingsError", "TestTimeLimitPassed", "TorchrunError",
           "UnfiredFaultWarning"]


class FaultSpecError(ValueError):
    """A fault spec, trigger or fault argument that is not valid; the message says what is."""


class SettingsError(ValueError):
    """A setting (marker argument, option, run argument) that is not valid."""


class HarnessError(RuntimeError):
    """The harness itself could not run the group (not a failure of the user's code)."""


class HarnessWarning(UserWarning):
    """The harness could not do all it should (a process that would not die)."""


class TorchrunError(RuntimeError):
    """The run could not be started (not a failure of the script)."""


class TestTimeLimitPassed(BaseException):
    """The whole test's time limit (pytest-timeout) has passed: ``ddp`` starts no more runs.

    A BaseException, as pytest's own outcomes are: code that catches every ``Exception``
    (Hypothesis, which would go on to shrink, each example a run) lets it through."""

    __test__ = False  # not a test class, whatever its name


class UnfiredFaultWarning(UserWarning):
    """A run ended before some faults of its plan fired: their trigger never came."""


def unfired_lines(unfired) -> list[str]:
    """One line per ``UnfiredFault``: ``<spec>[ in attempt N] never fired: <why>``."""
    return [f"{u.spec}{'' if u.attempt is None else f' in attempt {u.attempt}'} never fired: {u.reason}"
            for u in unfired]


def user_frame():
    """``(up, frame)``: the innermost frame outside this package (the user's line that called
    in), ``up`` frames above the caller of ``user_frame``; frame None if there is none."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    up, frame = 0, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        up, frame = up + 1, frame.f_back
    return up, frame


def warn_unfired(unfired) -> None:
    """``UnfiredFaultWarning`` for a run's unfired faults, attributed to the user's line
    that started the run; nothing if every fault fired."""
    if not unfired:
        return
    up, _ = user_frame()
    warnings.warn(UnfiredFaultWarning("these faults never fired, their trigger did not come:\n"
                                      + "\n".join(unfired_lines(unfired))), stacklevel=up + 1)
