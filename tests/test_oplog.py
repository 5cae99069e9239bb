"""Where each rank was: the operation log, the progress table, the timeline and the trace
(DESIGN 4.2). Real ranks, real gloo, real DDP; the log is read back from the files the
ranks wrote, also after a SIGKILL or while a rank is frozen."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_ddpfault import run_group
from pytest_ddpfault.launchers.torchrun import run_torchrun
from pytest_ddpfault.rank.oplog import CAPACITY, OpLog, read_oplog

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "torchrun" / "train.py"
GRAD_BYTES = (16 * 4 + 4) * 4   # Linear(16, 4): one DDP bucket of 68 floats


def ddp_train(steps: int = 3):
    """A small DDP training loop with step() marks and one explicit all_reduce at the end."""
    import torch
    import torch.distributed as dist

    import pytest_ddpfault

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        pytest_ddpfault.step()
        opt.zero_grad()
        model(torch.randn(8, 16)).sum().backward()
        opt.step()
    t = torch.ones(4)
    dist.all_reduce(t)
    del model
    dist.destroy_process_group()
    return t.tolist()


# -- the log file ------------------------------------------------------------------------------

def test_the_log_is_a_bounded_ring_that_keeps_the_last_records(tmp_path):
    path = str(tmp_path / "ops")
    log = OpLog(path, capacity=8)
    for i in range(20):
        log.end(log.begin(1, "all_reduce", i + 1, "default", 4, 0, float(i)), i + 0.5)
    records, dropped = read_oplog(path)
    assert dropped == 12
    assert [r["seq"] for r in records] == list(range(13, 21))
    assert all(r["end"] == r["start"] + 0.5 and r["state"] == "done" for r in records)
    assert os.path.getsize(path) == 64 + 8 * 88  # fixed size, however much was written
    log.close()
    assert OpLog(str(tmp_path / "default")).capacity == CAPACITY
    assert os.path.getsize(tmp_path / "default") < 400 * 1024  # bounded: ~350 KB a rank


def test_a_sigkilled_writer_leaves_its_log_behind(tmp_path):
    path = str(tmp_path / "ops")
    code = textwrap.dedent(f"""
        import os, signal
        from pytest_ddpfault.rank.oplog import OpLog
        log = OpLog({path!r})
        log.end(log.begin(1, "all_reduce", 1, "default", 16, 1, 1.0), 2.0)
        log.begin(1, "broadcast", 1, "default", 8, 0, 3.0)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGKILL
    records, _ = read_oplog(path)
    assert [(r["name"], r["end"], r["source"], r["bytes"]) for r in records] == [
        ("all_reduce", 2.0, "c++", 16), ("broadcast", None, "python", 8)]


# -- real runs ---------------------------------------------------------------------------------

@pytest.mark.ddp(world_size=2, timeout=30)
def test_every_rank_logs_its_ops_without_a_plan(ddp):
    res = ddp.run(ddp_train, 3)
    res.assert_all_ok()
    for r in res:
        names = [op.name for op in r.ops]
        assert names[0] == "init" and names[-1] == "all_reduce"
        reducer = [op for op in r.ops if op.name == "all_reduce" and op.source == "c++"]
        assert len(reducer) == 3 and all(op.bytes == GRAD_BYTES for op in reducer)  # one bucket a step
        assert [op.seq for op in r.ops if op.name == "all_reduce"] == [1, 2, 3, 4]  # as triggers count
        assert {op.name for op in r.ops if op.source == "c++"} >= {"all_reduce", "broadcast"}
        assert not any(op.in_flight for op in r.ops)
        assert all(0 <= op.start <= op.end <= r.end_time for op in r.ops)
        assert [s.seq for s in r.steps] == [1, 2, 3]
        last = r.last_op
        assert (last.name, last.seq, last.source, last.bytes, last.group) == ("all_reduce", 4, "python", 16, "default")
        assert not last.in_flight and last.since == last.start
    assert "every rank got to all_reduce #4" in res.progress()


def test_with_the_log_off_nothing_is_logged():
    res = run_group(ddp_train, 1, world_size=2, timeout=30, oplog=False)
    res.assert_all_ok()
    assert all(r.ops == [] and r.steps == [] and r.last_op is None for r in res)
    assert "where each rank was" not in res.report()


@pytest.mark.ddp(world_size=3, fault="kill_rank(rank=1, at=all_reduce#2)", timeout=30)
def test_a_killed_rank_never_entered_the_op_its_peers_wait_in(ddp):
    res = ddp.run(ddp_train, 3)
    assert res[1].killed_by(signal.SIGKILL)
    killed = res[1].last_op  # what it finished before: DDP broadcasts between steps
    assert not killed.in_flight and [op.seq for op in res[1].ops if op.name == "all_reduce"] == [1]
    for r in res.survivors:
        assert r.status == "raised"
        last = r.last_op  # DDP's gradient all_reduce, issued from C++: it failed when the peer died
        assert (last.name, last.seq, last.source, last.failed) == ("all_reduce", 2, "c++", True)
        # the log learns that from the work's future: torch's deprecated Work::exception()
        # would print its warning into the failing rank's stderr, as if from the user's code
        assert "API is being deprecated" not in r.stderr, r.stderr
    progress = res.progress()
    assert ("ranks 0, 2 failed in all_reduce #2; rank 1 never entered it: kill_rank at all_reduce#2; "
            f"died of SIGKILL; last op {killed}") in progress, progress
    assert re.search(r"^0 +raised +\d+ +in all_reduce #2 \(c\+\+, default\) from t=\d\.\d\ds until it failed at t=",
                     progress, re.M), progress
    report = res.report()
    assert report.index("fired: kill_rank") < report.index("where each rank was")  # next to the table


@pytest.mark.ddp(world_size=2, fault="hang_rank(rank=1, at=step#2)", timeout=3)
def test_a_hang_runs_to_the_deadline_in_the_log_the_timeline_and_the_trace(ddp, tmp_path):
    res = ddp.run(ddp_train, 3)
    assert [r.status for r in res] == ["hung", "hung"]
    waiting = res[0].last_op  # a DDP op issued from C++ that rank 1 never joined
    assert waiting.in_flight and waiting.source == "c++"
    assert not any(op.name == waiting.name and op.seq >= waiting.seq for op in res[1].ops)
    assert not res[1].last_op.in_flight
    assert [s.seq for s in res[1].steps] == [1, 2]  # frozen at its second step, nothing after
    assert f"rank 0 waits in {waiting}; rank 1 never entered it: hang_rank at step#2" in res.progress()

    page = Path(res.timeline(tmp_path / "run.html")).read_text()
    assert 'data-lanes="2"' in page and page.count('<g class="lane ') == 2
    assert 'data-status="hung"' in page and 'class="op inflight"' in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    assert "hang_rank on rank 1 at step#2" in page  # the fault marker's tooltip
    frozen = page.split('<g class="lane ')[2]  # rank 1's lane: frozen from the fault to the deadline
    assert 'class="fault span-frozen"' in frozen and ">hang_rank to the end</text>" in frozen

    trace = json.loads(Path(res.trace(tmp_path / "run.trace.json")).read_text())["traceEvents"]
    ops = [ev for ev in trace if ev["ph"] == "X" and ev.get("cat") in ("python", "c++")]
    assert {ev["pid"] for ev in ops} == {0, 1}
    stuck = [ev for ev in ops if ev["pid"] == 0 and ev["args"]["state"] == "in flight"]
    assert [(ev["args"]["profiling_name"], ev["args"]["collective_seq_id"]) for ev in stuck] == [
        (f"gloo:{waiting.name}", waiting.seq)]
    assert (stuck[0]["ts"] + stuck[0]["dur"]) / 1e6 >= 2.9  # drawn to the deadline
    assert any(ev["ph"] == "i" and ev["name"] == "fault: hang_rank" and ev["pid"] == 1 for ev in trace)
    [freeze] = [ev for ev in trace if ev["ph"] == "X" and ev.get("cat") == "fault"]  # on its "faults" thread
    assert freeze["pid"] == 1 and freeze["name"] == "hang_rank to the end"
    assert (freeze["ts"] + freeze["dur"]) / 1e6 == pytest.approx(res[1].end_time, abs=1e-3)
    assert {ev["args"]["name"] for ev in trace if ev["name"] == "thread_name"} >= {"group default"}


# -- the plugin --------------------------------------------------------------------------------

def test_a_failing_tests_report_shows_the_progress_table_and_its_timeline(pytester, tmp_path):
    pytester.makepyfile(test_it='''
        import pytest

        def two_reduces():  # torch only in the ranks: an in-process run must not import it here
            import torch, torch.distributed as dist
            dist.init_process_group("gloo")
            for _ in range(2):
                dist.all_reduce(torch.ones(2))
            dist.destroy_process_group()

        @pytest.mark.ddp(world_size=2, fault="crash_rank(rank=1, at=all_reduce#2)", timeout=20)
        def test_fails(ddp):
            ddp.run(two_reduces).assert_all_ok()

        @pytest.mark.ddp(world_size=2, timeout=20)
        def test_passes(ddp):
            ddp.run(two_reduces).assert_all_ok()
    ''')
    out = tmp_path / "timelines"
    result = pytester.runpytest("-p", "no:cacheprovider", "--ddp-timeline", str(out))
    result.assert_outcomes(passed=1, failed=1)
    text = result.stdout.str()
    assert "where each rank was:" in text
    assert "rank 0 failed in all_reduce #2; rank 1 never entered it: crash_rank at all_reduce#2" in text
    [page] = out.glob("*test_it.py_test_fails.html")  # named after the test's node id
    assert f"timeline: {page}" in text
    assert [p.name for p in out.glob("*.trace.json")] == [page.name.replace(".html", ".trace.json")]
    assert not list(out.glob("*test_passes*"))

    result = pytester.runpytest("-p", "no:cacheprovider", "--ddp-timeline", str(out), "--ddp-timeline-all",
                                "-k", "passes")
    result.assert_outcomes(passed=1)
    assert len(list(out.glob("*test_it.py_test_passes.html"))) == 1


# -- torchrun ----------------------------------------------------------------------------------

def test_torchrun_workers_log_their_ops_per_attempt(tmp_path):
    args = ("--ckpt-dir", str(tmp_path / "ck"), "--out", str(tmp_path / "w.json"), "--steps", "6",
            "--ckpt-every", "2")
    res = run_torchrun(TRAIN, *args, nproc=2, max_restarts=1, faults="kill_rank(rank=1, at=step#5)", timeout=240)
    res.assert_ok()
    first, final = res.attempt(0), res.final
    assert first[1].killed_by(signal.SIGKILL)
    assert [s.seq for s in first[1].steps] == [1, 2, 3, 4, 5]
    assert first[1].last_op is not None and not first[1].last_op.in_flight  # killed before its next op
    assert all(w.ops and w.ops[0].name == "init" for w in res.workers)
    assert all(not any(op.in_flight for op in w.ops) for w in final)
    progress = res.progress()
    assert "attempt 0: where each rank was:" in progress and "attempt 1: where each rank was:" in progress
    page = Path(res.timeline(tmp_path / "tr.html")).read_text()
    assert page.count('<g class="lane ') == 4 and "attempt 1 · rank 0" in page
    trace = json.loads(Path(res.trace(tmp_path / "tr.json")).read_text())["traceEvents"]
    assert {ev["pid"] for ev in trace if ev["ph"] == "X"} == {0, 1, 100, 101}
