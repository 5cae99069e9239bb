"""pytest-ddpfault: run PyTorch distributed code in real gloo groups and inject faults.

Importing this package is cheap (no torch): the plugin and the harness load the heavy
parts on first use.
"""
from __future__ import annotations

from pytest_ddpfault.errors import (
    FaultSpecError, HarnessError, HarnessWarning, SettingsError, TorchrunError, UnfiredFaultWarning,
)
from pytest_ddpfault.faults import Fault
from pytest_ddpfault.rank.steps import step
from pytest_ddpfault.results import FaultEvent, GroupResult, RankResult

__all__ = ["Fault", "FaultEvent", "FaultSpecError", "GroupResult", "HarnessError", "HarnessWarning", "RankResult",
           "SettingsError", "TorchrunError", "UnfiredFaultWarning", "run_group", "step"]
__version__ = "0.1.0"

def run_group(fn, *args, **kwargs) -> GroupResult:
    """Run ``fn`` in a real process group without pytest; see ``parent.run.run_group``."""
    from pytest_ddpfault.parent.run import run_group as _run_group

    return _run_group(fn, *args, **kwargs)
