"""Storage faults, carried out on the checkpoint save or load they are due on (``save#N``,
``load#N``: torch.save, torch.load and torch.distributed.checkpoint save/async_save/load):
a torn save, a failing filesystem, a slow one.

They act in rank 0 unless ``rank=`` says otherwise: rank 0 is the usual saver (a loop that
saves with ``if rank == 0: torch.save(...)`` never saves in the last rank, where the other
kinds default)."""
from __future__ import annotations

import errno
import os
import signal
import time
from typing import TYPE_CHECKING

from pytest_ddpfault.faults.base import OnStorageCall, StorageCall, register
from pytest_ddpfault.faults.params import SHORT, Choice, Fuzz, Number, Param, at_param

if TYPE_CHECKING:
    from pytest_ddpfault.faults.spec import Fault

# The errors a filesystem gives a checkpoint, by name; EROFS refuses the open itself.
ERRNOS = ("ENOSPC", "EIO", "EROFS", "EDQUOT")


class ErrnoName(Choice):
    """One of ``ERRNOS``, in any case; prints as the errno module spells it."""

    def __init__(self) -> None:
        super().__init__(*ERRNOS, words={e.lower(): e for e in ERRNOS})

    def format(self, value: str) -> str:
        return value


# The rank a storage fault acts in: rank 0 by default, the usual saver.
SAVER_RANK = Param("rank", Number(int), None, "the rank it acts in (default: 0, the usual saver)")


class OnSave(OnStorageCall):
    """A storage kind: acts in rank 0 unless ``rank=`` names another."""

    def acting_rank(self, fault: Fault, world_size: int, nodes: int) -> int | None:
        return 0 if fault.rank is None else fault.rank


@register
class TornSave(OnSave):
    name = "torn_save"
    doc = ("the save writes only the first `fraction` of its bytes (a DCP save: some data files, "
           "never .metadata), then the rank dies of SIGKILL: a crash or power loss mid-save")
    targets_rank = True
    params = (SAVER_RANK, at_param("save#1", "save"),
              Param("fraction", Number(float, hi=1.0), 0.5, "share of the save's bytes that reach the disk",
                    Fuzz.of(0.5, 0.0, 0.9)))

    def event_fields(self, fault: Fault) -> dict[str, int]:
        return {"kills_with": int(signal.SIGKILL)}  # sent before it dies, as kill_rank does

    def act_on_call(self, fault: Fault, call: StorageCall) -> None:
        call.write_prefix(fault.get("fraction"), then=lambda: os.kill(os.getpid(), signal.SIGKILL))


@register
class IoError(OnSave):
    name = "io_error"
    doc = "the save or load raises OSError(errno) as the filesystem would (ENOSPC, EIO, EROFS, EDQUOT)"
    targets_rank = True   # the rank hit raises: the others are the survivors
    params = (SAVER_RANK, at_param("save#1", "save", "load"),
              Param("errno", ErrnoName(), "ENOSPC",
                    "the error's name", Fuzz.of(*ERRNOS)))

    def act_on_call(self, fault: Fault, call: StorageCall) -> None:
        name = fault.get("errno")
        code = getattr(errno, name)
        exc = OSError(code, f"{os.strerror(code)} (io_error injected by pytest-ddpfault)")
        # EROFS refuses the open; the others come from a write or read of an opened file
        call.fail(exc, opened=name != "EROFS")


@register
class SlowIo(OnSave):
    name = "slow_io"
    doc = "the save or load takes `seconds` longer (a straggler while checkpointing)"
    params = (SAVER_RANK, at_param("save#1", "save", "load"),
              Param("seconds", Number(float, unit="seconds"), 1.0, "extra seconds the call takes", SHORT))

    def acts_for(self, fault: Fault, trigger: str) -> float:
        return fault.get("seconds")

    def act_on_call(self, fault: Fault, call: StorageCall) -> None:
        time.sleep(fault.get("seconds"))  # the slow disk itself: not a synchronisation
