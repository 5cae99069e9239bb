"""Checkpoint and storage faults (DESIGN 4.3) against real torch.save, torch.load and
torch.distributed.checkpoint, in real gloo groups: what each fault leaves on disk, what
torch does on the next load, and which save patterns survive.

Nothing is mocked: files are real files under tmp_path, groups are real gloo groups.
Process-group timeouts are 1-2 s, so a wait costs seconds.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from _workloads import CLOSED, PG, SHORT_PG, init_group
from pytest_ddpfault import Fault
from pytest_ddpfault.faults import COLLECTIVE_OPS, FaultSpecError, Trigger, TriggerCounter, kinds_with

STATE = {"w": torch.arange(4096, dtype=torch.float32), "step": 3}


# -- save patterns, as users write them (run in the ranks) ----------------------------
def save_in_place(path, step):
    torch.save({**STATE, "step": step}, path)


def save_atomically(path, step):
    """temp file + fsync + os.replace + fsync of the directory."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save({**STATE, "step": step}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def two_saves(path, pattern):
    """Step 1 is saved; the fault hits the save of step 2."""
    pattern(path, 1)
    pattern(path, 2)


def load_step(path):
    return torch.load(path, weights_only=True)["step"]


def rank0_saves_then_barrier(path, pattern, pg_timeout=PG):
    init_group(pg_timeout)
    started = time.monotonic()
    try:
        if dist.get_rank() == 0:
            pattern(path, 1)
        dist.barrier()
    finally:
        took = time.monotonic() - started
        print(f"took {took:.2f}", flush=True)
    dist.destroy_process_group()
    return round(took, 2)


def dcp_save(directory, pg_timeout=PG, use_async=False):
    init_group(pg_timeout)
    sd = {"w": torch.arange(4096, dtype=torch.float32), f"own{dist.get_rank()}": torch.ones(512) * dist.get_rank()}
    try:
        if use_async:
            dcp.async_save(sd, checkpoint_id=directory).result()
        else:
            dcp.save(sd, checkpoint_id=directory)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    return "saved"


def dcp_load(directory, pg_timeout=PG):
    init_group(pg_timeout)
    sd = {"w": torch.zeros(4096), f"own{dist.get_rank()}": torch.zeros(512)}
    try:
        dcp.load(sd, checkpoint_id=directory)
    finally:
        dist.destroy_process_group()
    return float(sd["w"].sum())


def dcp_load_here(directory):
    sd = {"w": torch.zeros(4096), "own0": torch.zeros(512), "own1": torch.zeros(512)}
    dcp.load(sd, checkpoint_id=directory, no_dist=True)
    return sd


# -- the spec side: triggers and kinds -------------------------------------------------
def test_save_and_load_triggers_parse_print_and_count_apart_from_collectives():
    for spec in ["kill_rank(rank=1, at=save#2)", "crash_rank(at=load#1)", "hang_rank(at=save#1)",
                 "delay(at=load#3, seconds=0.5)", "torn_save(rank=0, at=save#2, fraction=0.25)",
                 "io_error(at=load#1, errno=EIO)", "slow_io(at=save#1, seconds=2.0)"]:
        assert str(Fault.parse(spec)) == spec
    assert Fault.parse("io_error(errno=erofs)").get("errno") == "EROFS"
    assert Trigger.parse("save").counted == ("save", 1)
    assert not {"save", "load"} & COLLECTIVE_OPS
    counter = TriggerCounter("kill_rank(rank=0, at=save#2); delay(rank=0, at=collective#1)", rank=0, world_size=1)
    assert counter.record("save") == () and counter.count("collective") == 0
    assert [f.kind for f in counter.record("save")] == ["kill_rank"]
    assert set(kinds_with("acts_on_storage")) == {"torn_save", "io_error", "slow_io"}


def test_storage_kinds_act_in_rank_0_unless_told():
    # rank 0 is the usual saver; the other kinds keep the last rank
    for kind in kinds_with("acts_on_storage"):
        assert Fault.parse(kind).resolved_rank(4) == 0
        assert Fault.parse(f"{kind}(rank=3)").resolved_rank(4) == 3
    assert Fault.parse("kill_rank(at=save#1)").resolved_rank(4) == 3


@pytest.mark.ddp(world_size=3, fault="torn_save", timeout=20)
def test_a_torn_save_without_a_rank_hits_the_rank_0_saver(ddp, tmp_path):
    res = ddp.run(rank0_saves_then_barrier, str(tmp_path / "ck.pt"), save_in_place)
    assert res[0].killed_by(signal.SIGKILL) and [r.rank for r in res.faulted] == [0]
    [ev] = res.fault_events
    assert (ev.kind, ev.rank, ev.trigger) == ("torn_save", 0, "save#1")
    res.assert_survivors_raised(RuntimeError, match=CLOSED, within=2.0)
    assert "\n0*" in res.summary() and "(* = targeted by torn_save: not a survivor)" in res.summary(), res.summary()


@pytest.mark.parametrize("spec, says", [
    ("torn_save(at=load#1)", "expected save#N"),
    ("io_error(errno=EPERM)", "one of ENOSPC, EIO, EROFS, EDQUOT"),
    ("torn_save(fraction=1.5)", "from 0 to 1"),
    ("slow_io(at=all_reduce#1)", "expected save#N or load#N"),
    ("kill_rank(at=sav#1)", "did you mean 'save'"),
])
def test_bad_storage_specs_say_what_is_allowed(spec, says):
    with pytest.raises(FaultSpecError, match=says):
        Fault.parse(spec)


# -- torn_save ------------------------------------------------------------------------
@pytest.mark.ddp(world_size=1, fault="torn_save(rank=0, at=save#2)", timeout=20)
def test_torn_save_in_place_leaves_a_truncated_zip_that_torch_load_refuses(ddp, tmp_path):
    path = str(tmp_path / "ck.pt")
    res = ddp.run(two_saves, path, save_in_place)
    assert res[0].killed_by(signal.SIGKILL)
    [ev] = res.fault_events
    assert (ev.kind, ev.trigger) == ("torn_save", "save#2")
    (tmp_path / "ref").mkdir()
    whole = tmp_path / "ref" / "ck.pt"            # same name: the archive inside is named after it
    save_in_place(str(whole), 2)
    assert os.path.getsize(path) == os.path.getsize(whole) // 2   # the first half of that save's bytes
    with pytest.raises(OSError) as exc:                             # step 1 is gone too
        load_step(path)
    assert exc.value.errno == errno.EINVAL                          # torch's zip reader: "Invalid argument"


@pytest.mark.ddp(world_size=1, fault="torn_save(rank=0, at=save#2, fraction=0.9)", timeout=20)
def test_torn_save_of_an_atomic_save_leaves_the_last_checkpoint_whole(ddp, tmp_path):
    path = str(tmp_path / "ck.pt")
    res = ddp.run(two_saves, path, save_atomically)
    assert res[0].killed_by(signal.SIGKILL)
    assert load_step(path) == 1                                      # the previous one survives
    assert os.path.exists(path + ".tmp")                             # the torn one is the temp file
    with pytest.raises(OSError, match="Invalid argument"):
        load_step(path + ".tmp")


@pytest.mark.ddp(world_size=1, fault="torn_save(rank=0, at=save#1, fraction=0)", timeout=20)
def test_torn_save_at_zero_leaves_an_empty_file(ddp, tmp_path):
    path = str(tmp_path / "ck.pt")
    ddp.run(save_in_place, path, 1)
    assert os.path.getsize(path) == 0
    with pytest.raises(EOFError):                                    # not a zip: torch tries legacy pickle
        load_step(path)


@pytest.mark.parametrize("fraction, error, says", [
    (0.0, EOFError, "^$"), (0.1, RuntimeError, "failed finding central directory"),
    (0.5, OSError, "Invalid argument"), (0.99, OSError, "Invalid argument")])
def test_what_torch_load_raises_depends_on_where_the_save_was_cut(tmp_path, fraction, error, says):
    whole = tmp_path / "whole.pt"
    save_in_place(str(whole), 1)
    data = whole.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(error, match=says):
        load_step(str(tmp_path / "cut.pt"))


@pytest.mark.ddp(world_size=2, fault="torn_save(rank=1, at=save#1)", timeout=20)
def test_torn_dcp_save_has_no_metadata_and_dcp_load_says_so(ddp, tmp_path):
    d = str(tmp_path / "dcp")
    res = ddp.run(dcp_save, d)
    assert res[1].killed_by(signal.SIGKILL)
    assert res[0].raised(RuntimeError, match=CLOSED)                 # rank 0 learns at the gather
    assert ".metadata" not in os.listdir(d)
    assert os.path.getsize(os.path.join(d, "__1_0.distcp")) > 0      # some of rank 1's bytes
    # torch 2.13 names the missing file; torch 2.9 fails its assertion that metadata was read
    with pytest.raises(dcp.api.CheckpointException,
                       match=r"No such file or directory: .*metadata|assert metadata is not None"):
        dcp_load_here(d)


@pytest.mark.ddp(world_size=2, timeout=30)
def test_torn_dcp_save_into_the_last_checkpoints_directory_breaks_it(ddp, tmp_path):
    d = str(tmp_path / "dcp")
    ddp.run(dcp_save, d, faults=None).assert_all_ok()
    res = ddp.run(dcp_save, d, faults="torn_save(rank=1, at=save#1, fraction=0.3)")
    assert res[1].killed_by(signal.SIGKILL)
    assert ".metadata" in os.listdir(d)                              # the old metadata, new torn data
    with pytest.raises(dcp.api.CheckpointException):
        dcp_load_here(d)


@pytest.mark.ddp(world_size=2, fault="torn_save(rank=0, at=save#1)", timeout=20)
def test_torn_async_dcp_save_dies_in_its_writer_thread(ddp, tmp_path):
    d = str(tmp_path / "dcp")
    res = ddp.run(dcp_save, d, use_async=True)
    assert res[0].killed_by(signal.SIGKILL)
    assert res[1].raised(RuntimeError, match=CLOSED)
    assert ".metadata" not in os.listdir(d)


# -- io_error ---------------------------------------------------------------------------
@pytest.mark.ddp(world_size=2, fault="io_error(rank=0, at=save#1, errno=ENOSPC)", timeout=20)
def test_enospc_in_rank_0_raises_there_and_the_peer_learns_when_rank_0_ends(ddp, tmp_path):
    res = ddp.run(rank0_saves_then_barrier, str(tmp_path / "ck.pt"), save_in_place)
    assert res[0].raised(OSError)
    assert res[0].exc.errno == errno.ENOSPC and res[0].exc.filename == str(tmp_path / "ck.pt")
    # the error ends rank 0's process: its peer, in the barrier, sees the connection close
    res.assert_survivors_raised(RuntimeError, match=CLOSED, within=1.0)
    assert os.path.getsize(tmp_path / "ck.pt") == 0                  # open() emptied it


def catch_enospc_and_go_on(path, pg_timeout=SHORT_PG):
    """Rank 0 catches the save error and goes on to the barrier, late (a retry, a log)."""
    init_group(pg_timeout)
    if dist.get_rank() == 0:
        try:
            save_in_place(path, 1)
        except OSError:
            time.sleep(2 * pg_timeout)  # rank 0 handles it slowly: longer than the pg timeout
    started = time.monotonic()
    try:
        dist.barrier()
    finally:
        print(f"waited {time.monotonic() - started:.2f}", flush=True)
    dist.destroy_process_group()


@pytest.mark.ddp(world_size=2, fault="io_error(rank=0, at=save#1)", timeout=20)
def test_enospc_handled_slower_than_the_pg_timeout_times_the_peer_out(ddp, tmp_path):
    res = ddp.run(catch_enospc_and_go_on, str(tmp_path / "ck.pt"))
    assert res[1].raised(RuntimeError, match="Timed out")
    waited = float(res[1].stdout.split("waited ")[1].split()[0])
    assert SHORT_PG * 0.9 <= waited < SHORT_PG + 1.5


def two_saves_catching(path, pattern):
    pattern(path, 1)
    try:
        pattern(path, 2)
    except OSError as exc:
        return exc.errno, load_step(path) if os.path.getsize(path) else None


@pytest.mark.ddp(world_size=1, fault="io_error(rank=0, at=save#2, errno=EDQUOT)", timeout=20)
@pytest.mark.parametrize("pattern, left", [(save_in_place, None), (save_atomically, 1)])
def test_a_failed_write_loses_the_last_checkpoint_only_in_place(ddp, tmp_path, pattern, left):
    res = ddp.run(two_saves_catching, str(tmp_path / "ck.pt"), pattern)
    res.assert_all_ok()
    assert res.values[0] == (errno.EDQUOT, left)


@pytest.mark.ddp(world_size=1, fault="io_error(rank=0, at=save#2, errno=EROFS)", timeout=20)
def test_erofs_refuses_the_open_and_touches_nothing(ddp, tmp_path):
    res = ddp.run(two_saves_catching, str(tmp_path / "ck.pt"), save_in_place)
    assert res.values[0] == (errno.EROFS, 1)


@pytest.mark.ddp(world_size=2, fault="io_error(rank=1, at=save#1, errno=ENOSPC)", timeout=20)
def test_enospc_in_one_rank_of_a_dcp_save_reaches_every_rank_at_once(ddp, tmp_path):
    res = ddp.run(dcp_save, str(tmp_path / "dcp"))
    for r in res:
        assert r.raised(dcp.api.CheckpointException, match="No space left on device")
        assert r.duration < 2.0                                      # DCP gathers the error: no timeout
    assert ".metadata" not in os.listdir(tmp_path / "dcp")


def save_then_load(path):
    save_in_place(path, 1)
    return load_step(path)


@pytest.mark.ddp(world_size=1, fault="io_error(rank=0, at=load#1, errno=EIO)", timeout=20)
def test_eio_on_torch_load(ddp, tmp_path):
    res = ddp.run(save_then_load, str(tmp_path / "ck.pt"))
    assert res[0].raised(OSError, match="Input/output error")
    assert res[0].exc.errno == errno.EIO
    assert load_step(str(tmp_path / "ck.pt")) == 1                   # the file itself is fine


@pytest.mark.ddp(world_size=2, fault="io_error(rank=0, at=load#1, errno=EIO)", timeout=30)
def test_eio_on_dcp_load_reaches_every_rank(ddp, tmp_path):
    d = str(tmp_path / "dcp")
    ddp.run(dcp_save, d, faults=None).assert_all_ok()
    res = ddp.run(dcp_load, d)
    for r in res:
        assert r.raised(dcp.api.CheckpointException, match="Input/output error")


# -- slow_io ----------------------------------------------------------------------------
@pytest.mark.ddp(world_size=2, timeout=20)
@pytest.mark.parametrize("seconds, outcome", [(0.3, "ok"), (2.5, "timed out")])
def test_slow_save_against_the_process_group_timeout(ddp, tmp_path, seconds, outcome):
    res = ddp.run(rank0_saves_then_barrier, str(tmp_path / "ck.pt"), save_in_place, SHORT_PG,
                  faults=f"slow_io(rank=0, at=save#1, seconds={seconds})")
    if outcome == "ok":
        res.assert_all_ok()
        assert min(res.values) >= seconds
    else:
        assert res[1].raised(RuntimeError, match="Timed out")        # the peer waited at the barrier
        assert load_step(str(tmp_path / "ck.pt")) == 1                # the slow save itself completed


# -- existing kinds at save#N / load#N, and what is counted -----------------------------
@pytest.mark.ddp(world_size=1, fault="kill_rank(rank=0, at=save#2)", timeout=20)
def test_kill_rank_at_the_second_save_dies_before_it_writes(ddp, tmp_path):
    res = ddp.run(two_saves, str(tmp_path / "ck.pt"), save_in_place)
    assert res[0].killed_by(signal.SIGKILL)
    assert load_step(str(tmp_path / "ck.pt")) == 1


@pytest.mark.ddp(world_size=2, fault="crash_rank(rank=0, at=save#2)", timeout=20, allow_unfired=True)
def test_dcps_own_torch_saves_are_not_counted(ddp, tmp_path):
    # one dcp.save writes its items with torch.save inside: still one save
    res = ddp.run(dcp_save, str(tmp_path / "dcp"))
    res.assert_all_ok()
    assert [u.spec for u in res.unfired] == ["crash_rank(rank=0, at=save#2)"]


def save_to_file_object(path):
    with open(path, "wb") as f:
        torch.save({**STATE, "step": 1}, f)


@pytest.mark.ddp(world_size=1, fault="torn_save(rank=0, fraction=0.25)", timeout=20)
def test_torn_save_to_a_file_object(ddp, tmp_path):
    res = ddp.run(save_to_file_object, str(tmp_path / "ck.pt"))
    assert res[0].killed_by(signal.SIGKILL)
    whole = tmp_path / "whole.pt"
    save_to_file_object(str(whole))
    assert os.path.getsize(tmp_path / "ck.pt") == os.path.getsize(whole) // 4


# -- what a real full disk does (no injection: /dev/full answers ENOSPC) -----------------
def test_a_real_full_disk_is_an_oserror_for_a_file_object_but_a_runtimeerror_for_a_path():
    with pytest.raises(RuntimeError, match="unexpected pos"):
        torch.save(STATE, "/dev/full")                 # torch's own zip writer: no errno
    with open("/dev/full", "wb", buffering=0) as f, pytest.raises(OSError) as exc:
        torch.save(STATE, f)
    assert exc.value.errno == errno.ENOSPC


# -- through DDPFAULT_PLAN, in a process the harness did not start -----------------------
SCRIPT = """
import sys, torch
path = sys.argv[1]
torch.save({"step": 1, "w": torch.ones(1000)}, path)
torch.save({"step": 2, "w": torch.ones(1000)}, path)
print("not reached", flush=True)
"""


def test_torn_save_from_the_environment_plan(tmp_path):
    path = tmp_path / "ck.pt"
    env = {**os.environ, "DDPFAULT_PLAN": "torn_save(rank=0, at=save#2, fraction=0.5)",
           "DDPFAULT_EVENTS": str(tmp_path / "events.jsonl"), "RANK": "0", "WORLD_SIZE": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "not reached" not in proc.stdout
    assert 0 < path.stat().st_size
    assert '"trigger": "save#2"' in (tmp_path / "events.jsonl").read_text()
    with pytest.raises(RuntimeError, match="failed finding central directory"):
        torch.load(path, weights_only=True)


# -- fuzzing: the strategies draw the new kinds and triggers from their declarations -------
def test_strategies_draw_storage_kinds_and_save_load_triggers():
    from hypothesis import find

    from pytest_ddpfault.strategies import fault_plans, faults, triggers

    for kind in ("torn_save", "io_error", "slow_io"):
        plan = find(fault_plans(2, kinds=[kind]), lambda p: len(p) == 1)
        assert plan[0].kind == kind and plan[0].resolved_at().kind in ("save", "load")
    assert find(faults("io_error", 2), lambda f: f.resolved_at().kind == "load" and f.get("errno") == "EROFS")
    assert find(faults("torn_save", 2), lambda f: f.get("fraction") == 0.9)
    kill = find(faults("kill_rank", 2, triggers(forms=("save", "load"))), lambda f: f.at is not None)
    assert kill.at.kind in ("save", "load")
    # a loop may never save: other kinds draw save#N/load#N only when asked
    with pytest.raises(Exception, match="No examples found"):
        find(faults("kill_rank", 2), lambda f: f.at is not None and f.at.kind in ("save", "load"))
