"""--ddp-max-procs: a cap on rank processes across processes (xdist workers)."""
import multiprocessing
import time

import pytest

from pytest_ddpfault.deadline import Deadline
from pytest_ddpfault.parent.slots import ProcessSlots, SlotsTimeout, default_max_procs


def _hold(directory, n, held, release, max_procs):
    slots = ProcessSlots(directory, max_procs)
    with slots.hold(n, Deadline.after(10)):
        held.set()
        release.wait(10)


def test_slots_are_shared_across_processes_and_released_on_exit(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    other = ctx.Process(target=_hold, args=(str(tmp_path), 3, held, release, 4))
    other.start()
    try:
        assert held.wait(30)
        slots = ProcessSlots(str(tmp_path), 4)
        with slots.hold(1, Deadline.after(5)):        # 3 + 1 = 4: fits
            pass
        with pytest.raises(SlotsTimeout, match="2 of 4 rank slots"):
            with slots.hold(2, Deadline.after(0.3)):   # 3 + 2 > 4: waits, then gives up
                pass
        release.set()
        other.join(10)
        start = time.monotonic()
        with slots.hold(4, Deadline.after(5)):        # all free again once it exited
            assert time.monotonic() - start < 5
    finally:
        release.set()
        other.join(10)
        if other.is_alive():
            other.kill()


def test_a_run_bigger_than_the_cap_still_runs_alone(tmp_path):
    slots = ProcessSlots(str(tmp_path), 2)
    with slots.hold(8, Deadline.after(1)):
        pass


def test_the_default_cap_leaves_room_for_an_8_rank_group():
    assert default_max_procs() >= 8


def test_max_procs_caps_ranks_across_xdist_workers(pytester, monkeypatch):
    pytester.makepyfile(
        """
        import fcntl, os, time, pytest

        def log_life(path):
            # each rank logs when it is alive, across both workers
            with open(path, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(f"+ {time.monotonic()}\\n")
            time.sleep(0.3)   # simulated work: long enough for runs to overlap if allowed
            with open(path, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(f"- {time.monotonic()}\\n")

        @pytest.mark.parametrize("i", range(6))
        @pytest.mark.ddp(world_size=2)
        def test_x(ddp, i):
            ddp.run(log_life, os.environ["LIFE_LOG"]).assert_all_ok()
        """
    )
    log = pytester.path / "life.log"
    monkeypatch.setenv("LIFE_LOG", str(log))

    def peak(*args):
        log.write_text("")
        pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", *args).assert_outcomes(passed=6)
        alive = best = 0
        events = sorted((float(t), sign) for sign, t in (line.split() for line in log.read_text().splitlines()))
        for _, sign in events:
            alive += 1 if sign == "+" else -1
            best = max(best, alive)
        return best

    # a 2-rank run takes 3 slots (its ranks and its store host): a cap of 3 lets one run
    # at a time across both workers (uncapped, their runs overlap up to 4 ranks)
    assert peak("--ddp-max-procs", "3") == 2
    assert log.read_text().count("+") == 12
