"""DDPFAULT_PLAN: the import hook that arms processes the harness did not start.

Pure unit tests for plans with attempts and the event file; real interpreters (started
with the environment a user would set) for the .pth hook: what it costs when the variable
is unset, that a bad plan stops the process, and which faults fire in which attempt, with
the plan installed eagerly (RANK in the environment, as under torchrun) and lazily (the
rank given to init_process_group, as under mp.spawn).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_ddpfault.ipc import LineSink, UnknownMessage
from pytest_ddpfault.rank.env_plan import (
    ENV_ATTEMPT, ENV_EVENTS, ENV_PLAN, PTH_NAME, EnvPlanError, ScopedFault,
    current_attempt, format_env_plan, hook_path, parse_env_plan, read_events, stack_path,
    validate_env_plan,
)
from pytest_ddpfault.faults import Fault, FaultSpecError

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 120  # seconds for one interpreter that imports torch, on a loaded 2-core machine


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DDPFAULT_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE")}
    env.update(extra)
    return env


def python(code: str, env: dict, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)


# --- plans with attempts -------------------------------------------------------------------

def test_attempt_defaults_to_the_first_and_round_trips():
    plan = parse_env_plan("kill_rank(rank=1, at=step#3); delay(rank=0, seconds=0.5, attempt=*);"
                          " crash_rank(attempt=2)")
    assert [p.attempt for p in plan] == [0, None, 2]
    assert plan[0].fault == Fault.parse("kill_rank(rank=1, at=step#3)")
    text = format_env_plan(plan)
    assert text == ("kill_rank(rank=1, at=step#3); delay(rank=0, seconds=0.5, attempt=*); "
                    "crash_rank(attempt=2)")
    assert parse_env_plan(text) == plan
    assert [p.applies_to(0) for p in plan] == [True, True, False]
    assert [p.applies_to(2) for p in plan] == [False, True, True]


def test_plans_accept_faults_and_lists():
    f = Fault("hang_rank", rank=0)
    assert parse_env_plan(f) == (ScopedFault(f, 0),)
    assert parse_env_plan([f, "delay(attempt=1)", ScopedFault(f, None)]) == (
        ScopedFault(f, 0), ScopedFault(Fault("delay"), 1), ScopedFault(f, None))
    assert parse_env_plan(None) == parse_env_plan("") == parse_env_plan(" ; ") == ()


@pytest.mark.parametrize("spec, message", [
    ("kill_rank(attempt=first)", "attempt=first.*whole number >= 0.*or \\*"),
    ("kill_rank(attempt=-1)", "attempt=-1"),
    ("kil_rank(rank=1)", "did you mean 'kill_rank'"),
    ("kill_rank(rank=1, at=stpe#2)", "unknown op 'stpe'.*in fault spec"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(EnvPlanError, match=message):
        parse_env_plan(spec)


def test_only_in_rank_kinds_can_come_from_the_environment():
    with pytest.raises(EnvPlanError, match="store_down is applied by the ddp.run harness.*"
                                           "in-rank kinds are: crash_rank, delay, hang_rank, io_error, kill_rank, slow_io, torn_save"):
        validate_env_plan("store_down(at=t=1.0)")
    with pytest.raises(EnvPlanError, match="kill_node is applied by the ddp.run harness"):
        validate_env_plan("kill_node(node=0)")  # the harness signals the node's ranks together
    with pytest.raises(EnvPlanError, match="resume_after.*nothing resumes"):
        validate_env_plan("hang_rank(resume_after=1.0)")
    with pytest.raises(FaultSpecError, match="rank 3 is outside the group \\(world_size=2\\)"):
        validate_env_plan("kill_rank(rank=3)", world_size=2)


def test_attempt_comes_from_ddpfault_then_torchelastic():
    assert current_attempt({}) == 0
    assert current_attempt({"TORCHELASTIC_RESTART_COUNT": "2"}) == 2
    assert current_attempt({"TORCHELASTIC_RESTART_COUNT": "2", ENV_ATTEMPT: "1"}) == 1
    with pytest.raises(EnvPlanError, match="DDPFAULT_ATTEMPT='x'"):
        current_attempt({ENV_ATTEMPT: "x"})


# --- the event file ------------------------------------------------------------------------

def test_concurrent_writers_leave_whole_lines(tmp_path):
    path = str(tmp_path / "events.jsonl")
    code = f"""
        import sys
        from pytest_ddpfault.ipc import LineSink
        sink = LineSink({path!r}, attempt=int(sys.argv[1]))
        for i in range(300):
            sink.send("fault", i=i, pad="x" * 500)
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(a)]) for a in range(3)]
    for p in procs:
        assert p.wait(RUN_TIMEOUT) == 0
    events = read_events(path)
    assert len(events) == 900 == len(Path(path).read_text().splitlines())
    for attempt, p in enumerate(procs):
        mine = [e for e in events if e["pid"] == p.pid]
        assert [e["i"] for e in mine] == list(range(300))
        assert {e["attempt"] for e in mine} == {attempt}
        assert all("time" in e and "wall" in e for e in mine)


def test_read_events_skips_a_torn_line_and_rejects_a_bad_whole_one(tmp_path):
    path = tmp_path / "events.jsonl"
    LineSink(str(path), attempt=0).send("fault")
    with open(path, "a") as f:
        f.write('{"type": "fau')
    assert [e["type"] for e in read_events(str(path))] == ["fault"]
    assert read_events(str(tmp_path / "missing")) == []
    with open(path, "a") as f:
        f.write('\n')  # the torn line is now whole, and not a message: said loudly
    with pytest.raises(UnknownMessage, match="not JSON"):
        read_events(str(path))


# --- the .pth hook ---------------------------------------------------------------------------

def test_the_hook_is_installed_with_the_package():
    installed = hook_path()
    assert installed is not None, f"{PTH_NAME} is not on sys.path: reinstall with pip install -e ."
    assert Path(installed).read_text() == (REPO / PTH_NAME).read_text()


def test_without_the_variable_the_hook_imports_nothing():
    res = python("""
        import sys
        print(sorted(m for m in sys.modules if m.startswith(("pytest_ddpfault", "torch"))))
    """, clean_env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_with_an_empty_plan_torch_is_still_not_imported(tmp_path):
    events = str(tmp_path / "ev.jsonl")
    res = python("""
        import sys
        print("torch" in sys.modules, "pytest_ddpfault.rank.env_plan" in sys.modules)
    """, clean_env(**{ENV_PLAN: "", ENV_EVENTS: events}))
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "True"]
    [start, end] = read_events(events)
    assert (start["type"], end["type"]) == ("process", "exit")
    assert os.path.exists(stack_path(events, start["pid"]))


def test_a_bad_plan_stops_the_process_and_says_why():
    res = python("print('ran')", clean_env(**{ENV_PLAN: "kil_rank(rank=1)"}))
    assert res.returncode == 2
    assert "ran" not in res.stdout
    assert "DDPFAULT_PLAN='kil_rank(rank=1)' cannot be used" in res.stderr
    assert "did you mean 'kill_rank'" in res.stderr
    res = python("print('ran')", clean_env(**{ENV_PLAN: "", ENV_EVENTS: "/nonexistent/ev.jsonl"}))
    assert (res.returncode, res.stdout) == (2, "")
    assert "DDPFAULT_EVENTS='/nonexistent/ev.jsonl' cannot be written" in res.stderr


# A one-rank gloo group on an in-process store (no port): four all_reduce calls, then a
# crash that only the plan can cause. Faults are scoped to attempts 0, 1 and every attempt.
# With RANK in the environment the plan is in before the script runs (torchrun); without,
# it goes in inside init_process_group, from its arguments (mp.spawn).
SCOPED_PLAN = ("delay(rank=0, at=all_reduce#1, seconds=0); "
               "delay(rank=0, at=all_reduce#2, seconds=0, attempt=1); "
               "delay(rank=0, at=all_reduce#3, seconds=0, attempt=*); "
               "crash_rank(rank=0, at=step#1, exc=KeyError, message=injected, attempt=1)")
ONE_RANK = """
    import os, sys
    import torch, torch.distributed as dist
    import pytest_ddpfault
    print("armed at import", getattr(dist.all_reduce, "__ddpfault_wrapped__", False), flush=True)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    for _ in range(4):
        dist.all_reduce(torch.ones(1))
    print("backend", dist.get_backend(), flush=True)
    pytest_ddpfault.step()
    dist.destroy_process_group()
"""


@pytest.mark.parametrize("attempt, eager", [(0, True), (1, False)], ids=["attempt0-rank-from-env",
                                                                          "attempt1-rank-from-init"])
def test_faults_fire_in_their_attempt(tmp_path, attempt, eager):
    events = str(tmp_path / "ev.jsonl")
    env = clean_env(**{ENV_PLAN: SCOPED_PLAN, ENV_EVENTS: events, ENV_ATTEMPT: str(attempt)})
    if eager:
        env.update(RANK="0", WORLD_SIZE="1")
    res = python(ONE_RANK, env)
    assert "backend gloo" in res.stdout, res.stderr  # what users observe stays gloo
    assert f"armed at import {eager}" in res.stdout
    fired = [(e["kind"], e["trigger"], e["attempt"]) for e in read_events(events) if e["type"] == "fault"]
    armed = [e for e in read_events(events) if e["type"] == "armed"]
    assert [(e["rank"], e["world_size"]) for e in armed] == [(0, 1)]
    if attempt == 0:
        assert res.returncode == 0, res.stderr
        assert fired == [("delay", "all_reduce#1", 0), ("delay", "all_reduce#3", 0)]
    else:
        assert res.returncode == 1
        assert "KeyError: 'injected'" in res.stderr
        assert fired == [("delay", "all_reduce#2", 1), ("delay", "all_reduce#3", 1),
                         ("crash_rank", "step#1", 1)]
        [exc] = [e for e in read_events(events) if e["type"] == "exception"]
        assert (exc["exc_type"], exc["rank"], exc["attempt"]) == ("KeyError", 0, 1)


def test_a_rank_with_no_fault_due_is_armed_and_says_what_did_not_fire(tmp_path):
    """issue 10 §5: armed means the same in every rank (its calls are counted) whether or not
    a fault is due in it in this attempt; at its exit it says which of its faults never
    fired, and why."""
    events = str(tmp_path / "ev.jsonl")
    nothing_due = clean_env(**{ENV_PLAN: "crash_rank(rank=0, attempt=1)", ENV_EVENTS: events,
                               "RANK": "0", "WORLD_SIZE": "1"})
    res = python(ONE_RANK, nothing_due)
    assert res.returncode == 0, res.stderr
    assert "armed at import True" in res.stdout
    [armed] = [e for e in read_events(events) if e["type"] == "armed"]
    assert (armed["rank"], armed["faults"]) == (0, [])

    events = str(tmp_path / "ev2.jsonl")
    never = clean_env(**{ENV_PLAN: "delay(rank=0, at=all_reduce#9, seconds=0); kill_rank(rank=0, at=t=600)",
                         ENV_EVENTS: events})
    res = python(ONE_RANK, never)  # the rank from init_process_group, as under mp.spawn
    assert res.returncode == 0, res.stderr
    [end] = [e for e in read_events(events) if e["type"] == "exit"]
    [late, timed] = end["unfired"]
    assert late == {"spec": "delay(rank=0, at=all_reduce#9, seconds=0.0)",
                    "why": "the trigger never came: all_reduce was called 4 times, at=all_reduce#9 needs 9"}
    assert timed["spec"] == "kill_rank(rank=0, at=t=600.0)"
    assert timed["why"].startswith("the trigger never came: the process ended ")
    assert timed["why"].endswith("s after it started, before t=600.0")


def test_a_node_fault_for_every_attempt_is_skipped_where_its_node_is_gone(tmp_path):
    """After a node is lost, the survivors' group has fewer nodes: a fault of every attempt
    (attempt=*) naming the lost node does not stop them; one for this attempt does."""
    events = tmp_path / "events.jsonl"
    code = "import torch.distributed; print('trained')"
    group = {"DDPFAULT_NODE": "0", "GROUP_WORLD_SIZE": "1", "RANK": "0", "WORLD_SIZE": "1",
             "DDPFAULT_EVENTS": str(events)}
    every = python(code, clean_env(DDPFAULT_PLAN="kill_node(node=1, at=step#1, attempt=*)", **group))
    assert every.returncode == 0 and "trained" in every.stdout, every.stderr
    [armed] = [e for e in map(json.loads, events.read_text().splitlines()) if e["type"] == "armed"]
    assert armed["faults"] == []
    this = python(code, clean_env(DDPFAULT_PLAN="kill_node(node=1, at=step#1)", **group))
    assert this.returncode != 0 and "node 1 is outside the group (nodes=1)" in this.stderr


def test_an_armed_process_gets_the_gloo_teardown_workaround():
    """As ddp.run's ranks: destroy_process_group releases the GIL around itself (a DDP model
    freed right after it could otherwise deadlock the process on gloo's run-loop thread)."""
    code = """
        import torch.distributed as dist
        print(hasattr(dist.destroy_process_group, "__wrapped__"))
    """
    armed = python(code, clean_env(DDPFAULT_PLAN="delay(rank=0, seconds=0.01)", RANK="0", WORLD_SIZE="1"))
    assert armed.returncode == 0 and armed.stdout.split() == ["True"], armed.stderr
    plain = python(code, clean_env())
    assert plain.stdout.split() == ["False"], plain.stderr
