"""A worker that ``hang_rank`` froze outside ``ddp.run`` (issue 20 §6): it dies with its
launcher whatever signal ends it, and its stacks leave out the plugin's own frames.

The first test runs the real torchrun with no harness around it (``DDPFAULT_PLAN`` alone,
as a user's CI would), SIGKILLs the agent and watches the frozen worker through /proc.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from pytest_ddpfault.frames import ENV_SHOW, PACKAGE_DIR, hide_in_stack
from pytest_ddpfault.procfs import start_ticks
from pytest_ddpfault.procfs import state as process_state
from pytest_ddpfault.rank.env_plan import ENV_EVENTS, ENV_PLAN, read_events

from _helpers import poll

START_TIMEOUT = 120.0  # a bound for torch's import in two workers and an agent on a loaded machine
# A stopped process that SIGKILL reaches is gone at once (or a zombie, where nobody reaps).
GONE_WITHIN = 10.0

# Three all_reduce calls; argv[1]: the process group timeout (s).
ALL_REDUCES = '''
import sys
from datetime import timedelta
import torch, torch.distributed as dist

dist.init_process_group("gloo", timeout=timedelta(seconds=float(sys.argv[1])))
for _ in range(3):
    dist.all_reduce(torch.ones(1))
dist.destroy_process_group()
'''


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _gone(pid: int) -> bool:
    return process_state(pid) in (None, "Z", "X")


def _frozen_pid(events_path: Path, agent: subprocess.Popen) -> int | None:
    """The pid of the worker that announced its freeze, once it has (None while the agent runs)."""
    if not events_path.exists():
        return None
    for ev in read_events(str(events_path)):
        if ev["type"] == "fault" and ev.get("freezes"):
            return ev["pid"]
    assert agent.poll() is None, f"the agent ended (exit code {agent.returncode}) and nothing froze"
    return None


def test_a_frozen_worker_dies_with_its_agent_killed_hard(tmp_path):
    """Plain torchrun, the plan in the environment, no harness: the agent killed with SIGKILL
    (``timeout -k``) leaves no stopped worker behind (it would sit in state T under init
    forever: a stopped process never acts on a SIGTERM, its parent's or anyone's)."""
    script = tmp_path / "all_reduces.py"
    script.write_text(ALL_REDUCES)
    events = tmp_path / "events"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DDPFAULT_")}
    env.update({ENV_PLAN: "hang_rank(rank=1, at=all_reduce#2)", ENV_EVENTS: str(events)})
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                              str(script), "600"], env=env, cwd=tmp_path, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "agent.err", "wb"))
    try:
        frozen = poll(lambda: _frozen_pid(events, agent), START_TIMEOUT)
        assert frozen, f"no worker froze within {START_TIMEOUT} s: {(tmp_path / 'agent.err').read_text()[-2000:]}"
        assert poll(lambda: process_state(frozen) in ("T", "t"), GONE_WITHIN), process_state(frozen)
        assert _ppid(frozen) == agent.pid

        agent.kill()
        agent.wait(timeout=GONE_WITHIN)

        assert poll(lambda: _gone(frozen), GONE_WITHIN), (
            f"the frozen worker {frozen} outlived its agent: state {process_state(frozen)}, parent {_ppid(frozen)}")
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(timeout=GONE_WITHIN)
        # rank 0, not frozen, waits in all_reduce #2 for the frozen one: not this test's subject
        started = [(e["pid"], e["start_ticks"]) for e in read_events(str(events)) if e["type"] == "process"] \
            if events.exists() else []
        for pid, ticks in started:
            if ticks is not None and start_ticks(pid) == ticks:
                os.kill(pid, signal.SIGKILL)


FAULTHANDLER_DUMP = f'''frozen by hang_rank(rank=1, at=all_reduce#2) at all_reduce#2 (stacks as it froze itself):
Current thread 0x00007f (most recent call first):
  File "{PACKAGE_DIR}rank/env_plan.py", line 427 in dump_stacks
  File "{PACKAGE_DIR}rank/hooks.py", line 181 in fire
  File "/site-packages/torch/distributed/distributed_c10d.py", line 2800 in all_reduce
  File "/home/user/train.py", line 9 in <module>
'''


def test_a_stack_dump_leaves_out_the_plugins_frames_unless_asked(monkeypatch):
    monkeypatch.delenv(ENV_SHOW, raising=False)
    shown = hide_in_stack(FAULTHANDLER_DUMP)
    assert PACKAGE_DIR not in shown
    assert shown.splitlines()[0].startswith("frozen by hang_rank") and "train.py" in shown and "all_reduce" in shown

    monkeypatch.setenv(ENV_SHOW, "1")  # what --ddp-show-internal-frames sets
    assert hide_in_stack(FAULTHANDLER_DUMP) == FAULTHANDLER_DUMP
