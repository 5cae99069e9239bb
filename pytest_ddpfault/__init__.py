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
from pytest_ddpfault.sweep import SweepError, SweepResult, SweepRun

__all__ = ["Fault", "FaultEvent", "FaultSpecError", "GroupResult", "HarnessError", "HarnessWarning", "RankResult",
           "SettingsError", "SweepError", "SweepResult", "SweepRun", "TorchrunError", "UnfiredFaultWarning",
           "run_group", "step", "sweep_group"]
__version__ = "0.1.0"

def run_group(fn, *args, **kwargs) -> GroupResult:
    """Run ``fn`` in a real process group without pytest; see ``parent.run.run_group``."""
    from pytest_ddpfault.parent.run import run_group as _run_group

    return _run_group(fn, *args, **kwargs)


def sweep_group(fn, *args, **kwargs) -> SweepResult:
    """One fault at every point a fault-free run reached, without pytest; see ``sweep.sweep_group``."""
    from pytest_ddpfault.sweep import sweep_group as _sweep_group

    return _sweep_group(fn, *args, **kwargs)
