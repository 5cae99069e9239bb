"""A failure detector, the classic way: every rank beats into the job's store (which lives
with rank 0 on node 0), and rank 0 declares a rank lost when its beats stop for ``bound``
seconds. It sees a peer that died, froze or was cut off from node 0 — including a network
partition that leaves the peer's process running and the collectives merely quiet.
"""
from __future__ import annotations

import datetime
import os
import threading
import time

import torch.distributed as dist


def _store(timeout: float) -> dist.TCPStore:
    """A connection of its own to the job's store (a blocked beat holds up nothing else)."""
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)


class Heartbeat:
    """Beats ``hb/<rank>`` every ``interval`` seconds from a daemon thread."""

    def __init__(self, rank: int, interval: float = 0.05, timeout: float = 5.0) -> None:
        self.rank, self.interval = rank, interval
        self._store = _store(timeout)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{rank}", daemon=True)

    def start(self) -> Heartbeat:
        self._store.add(f"hb/{self.rank}", 1)   # the first beat before anyone watches
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()   # a beat blocked by a cut network stays blocked: the thread is a daemon

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._store.add(f"hb/{self.rank}", 1)
            except Exception:  # noqa: BLE001 - the watcher, not the beater, decides who is lost
                return


def watch(world_size: int, bound: float, watch_for: float, poll: float = 0.05, timeout: float = 5.0) -> dict:
    """Rank 0's detector: for ``watch_for`` seconds, read every peer's beat count; a peer
    whose count has not moved for ``bound`` seconds is declared lost. Returns
    ``{rank: seconds since the watch began when it was declared lost}``."""
    store = _store(timeout)
    start = time.monotonic()
    last = {r: (store.add(f"hb/{r}", 0), start) for r in range(1, world_size)}
    lost: dict[int, float] = {}
    while time.monotonic() - start < watch_for:
        now = time.monotonic()
        for r, (count, since) in list(last.items()):
            seen = store.add(f"hb/{r}", 0)
            if seen != count:
                last[r] = (seen, now)
            elif now - since > bound and r not in lost:
                lost[r] = round(now - start, 3)
        time.sleep(poll)  # the detector's polling period
    return lost


def monitored_job(bound: float = 2.0, cut_after: float = 0.5, watch_for: float = 4.0) -> dict:
    """Every rank beats for ``watch_for`` seconds, marking step 1 at its start and step 2
    ``cut_after`` seconds in (where a test's fault may land); rank 0 also watches. Returns
    rank 0's ``{lost rank: when}`` (other ranks: {})."""
    try:
        from pytest_ddpfault import step as mark_step
    except ImportError:  # pragma: no cover - outside the test plugin
        def mark_step() -> None:
            pass

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    beat = Heartbeat(rank).start()
    mark_step()
    result: dict = {}
    if rank == 0:
        threading.Timer(cut_after, mark_step).start()
        result = watch(world, bound, watch_for)
    else:
        time.sleep(cut_after)  # the job's work until step 2
        mark_step()
        time.sleep(watch_for - cut_after)  # ... and after it
    beat.stop()
    return result
