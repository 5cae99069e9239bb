"""Kept importable for ``pytest-ddpfault.pth`` files installed by earlier versions, which
call ``pytest_ddpfault.env_plan.activate()``; the hook lives in ``rank/env_plan.py``."""
from pytest_ddpfault.rank.env_plan import *  # noqa: F401,F403
from pytest_ddpfault.rank.env_plan import activate  # noqa: F401
