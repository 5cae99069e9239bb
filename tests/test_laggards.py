"""The progress table's laggard line (issue 20 §6): it names laggards only for calls every
rank of the group makes, and blames only a fault that explains the lag.

Pure data: results as the harness builds them from op logs (the real runs behind each
table are in test_oplog.py).
"""
from __future__ import annotations

import signal

from pytest_ddpfault.results import FaultEvent, OpRecord, RankResult, progress_table


def ops(*calls: tuple) -> list[OpRecord]:
    """(name, seq, start[, end, group]) -> op records; end None: in flight; "failed": it failed at start + 1."""
    out = []
    for name, seq, start, *rest in calls:
        end = rest[0] if rest else start + 0.1
        group = rest[1] if len(rest) > 1 else ("" if name == "init" else "default")
        failed = end == "failed"
        out.append(OpRecord(name, seq, group, 4, start, start + 1 if failed else end, failed=failed))
    return out


def training(rank_steps: int, t0: float = 0.0) -> list[tuple]:
    """init, then one all_reduce a second from t=1."""
    return [("init", 1, t0), *(("all_reduce", i, t0 + i) for i in range(1, rank_steps + 1))]


def laggard_line(ranks: list[RankResult], events=()) -> str:
    return progress_table(ranks, events).splitlines()[-1]


def test_a_save_only_rank_0_makes_is_no_lag():
    """The issue's passing run: "rank 1 never entered save #5"."""
    saver = RankResult(0, "ok", ops=ops(*training(3), *(("save", i, 3.2 + i / 10) for i in range(1, 6))))
    other = RankResult(1, "ok", ops=ops(*training(3)))
    assert laggard_line([saver, other]) == "every rank got to all_reduce #3"


def test_point_to_point_calls_and_loads_are_no_lag():
    sender = RankResult(0, "hung", ops=ops(*training(2), ("load", 1, 2.5), ("send", 1, 3.0, None)))
    other = RankResult(1, "hung", ops=ops(*training(2)))
    assert laggard_line([sender, other]) == "every rank got to all_reduce #2"


def test_a_partition_healed_before_the_rank_went_on_is_not_blamed():
    """Rank 1 was cut off from t=0.5 to 1.5 (the fault fired in it), finished all_reduce #2 at t=2.1, then failed on
    its own: the partition does not explain why it never entered all_reduce #3."""
    waiting = RankResult(0, "hung", ops=ops(*training(2), ("all_reduce", 3, 3.0, None)))
    failed = RankResult(1, "raised", exc_type="ValueError", message="bad batch", ops=ops(*training(2)))
    cut = "partition(ranks=(1,), rank=1, at=all_reduce#1, duration=1.0)"   # counted in rank 1: its event
    events = [FaultEvent("partition", 1, "all_reduce#1", 0.5, cut, scope=(1,)),
              FaultEvent("partition", None, "duration=1.0", 1.5, cut, "removed", scope=(1,))]
    line = laggard_line([waiting, failed], events)
    assert line == "rank 0 waits in all_reduce #3; rank 1 never entered it: ValueError: bad batch; last op all_reduce #2"


def test_a_partition_still_in_place_is_blamed_and_so_is_a_kill():
    waiting = RankResult(0, "hung", ops=ops(*training(2), ("all_reduce", 3, 3.0, None)))
    cut_off = RankResult(1, "raised", exc_type="RuntimeError", message="Connection closed",
                         ops=ops(*training(1), ("all_reduce", 2, 2.0, "failed")))
    killed = RankResult(2, "killed", signal=int(signal.SIGKILL), ops=ops(*training(2)))
    events = [FaultEvent("partition", None, "t=1.5", 1.5, "partition(ranks=(1,), at=t=1.5)", scope=(1,)),
              FaultEvent("kill_rank", 2, "all_reduce#3", 2.5, "kill_rank(rank=2, at=all_reduce#3)")]
    line = laggard_line([waiting, cut_off, killed], events)
    assert line == ("rank 0 waits in all_reduce #3; "
                    "rank 1 never entered it: partition at t=1.5; RuntimeError: Connection closed; last op all_reduce #2; "
                    "rank 2 never entered it: kill_rank at all_reduce#3; died of SIGKILL; last op all_reduce #2")


def test_a_delay_the_rank_slept_through_is_not_blamed():
    waiting = RankResult(0, "hung", ops=ops(*training(2), ("all_reduce", 3, 3.0, None)))
    late = RankResult(1, "hung", note="ended by the harness at its deadline", ops=ops(*training(2)))
    events = [FaultEvent("delay", 1, "all_reduce#2", 1.5, "delay(rank=1, at=all_reduce#2)")]
    assert laggard_line([waiting, late], events) == "rank 0 waits in all_reduce #3; rank 1 never entered it: hung; last op all_reduce #2"


def test_a_subgroups_collective_names_only_its_ranks():
    """Ranks 0 and 1 share a new group "1"; rank 2 is not in it and never lags in it."""
    in_group = [RankResult(r, "hung", ops=ops(*training(1), ("new_group", 1, 1.5), ("barrier", 1, 2.0, None, "1")))
                for r in (0, 1)]
    outside = RankResult(2, "hung", ops=ops(*training(1), ("new_group", 1, 1.5)))
    assert laggard_line([*in_group, outside]) == "ranks 0, 1 wait in barrier #1"
