"""The errors users may catch, in one light module (no torch), re-exported by the package.

- ``FaultSpecError``: a fault spec, trigger or fault argument that is not valid.
- ``SettingsError``: a bad marker argument, option or ``run_group``/``ddp.run`` argument.
- ``HarnessError``: the harness itself could not run the group (not a failure of user code).
- ``TorchrunError``: a launched run (``ddp.torchrun``, ``run_script``) could not be started.
- ``UnfiredFaultWarning``: a ``ddp.run`` ended with faults of its plan that never fired
  (a test that passes may pass for the wrong reason).

Every message names the bad value, where it came from, and what is allowed.
"""
from __future__ import annotations

__all__ = ["FaultSpecError", "HarnessError", "HarnessWarning", "SettingsError", "TorchrunError",
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


class UnfiredFaultWarning(UserWarning):
    """A run ended before some faults of its plan fired: their trigger never came."""
