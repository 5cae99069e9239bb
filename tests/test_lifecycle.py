"""Ranks die with the process that runs them: a script using ``run_group`` is killed
(SIGKILL: no clean-up code of its own runs) or interrupted (Ctrl-C), and its zygote,
its store host and every rank must be gone within a few seconds.

Each test runs a separate Python process on purpose: that process is what dies.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from _helpers import children_of, is_alive, poll, start_time

WORLD_SIZE = 2
START_BUDGET = 90.0   # a fresh interpreter imports torch and starts its zygote
GONE_WITHIN = 5.0

SCRIPT = textwrap.dedent("""\
    import os
    import sys
    import threading

    import pytest_ddpfault


    def hold(pid_dir):
        rank = os.environ["RANK"]
        tmp = os.path.join(pid_dir, f"rank{rank}.tmp")
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, os.path.join(pid_dir, f"rank{rank}.pid"))
        threading.Event().wait()


    if __name__ == "__main__":
        res = pytest_ddpfault.run_group(hold, sys.argv[1], world_size=%d, timeout=60)
        print(res.summary())
""" % WORLD_SIZE)


def _ctrl_c_as_a_terminal_gives_it() -> None:
    # A pytest started in the background (``&``, nohup) ignores SIGINT, and a child would
    # inherit that: Python then installs no KeyboardInterrupt handler and Ctrl-C does nothing.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def group_script(tmp_path):
    """Start the script; yield (process, its zygote pid, every pid the run started)."""
    script = tmp_path / "hold_group.py"
    script.write_text(SCRIPT)
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    run_tmp = tempfile.mkdtemp(prefix="ddpft-", dir="/tmp")  # short: the run's Unix socket lives there
    env = dict(os.environ, TMPDIR=run_tmp)
    stderr = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, str(script), str(pid_dir)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=stderr, env=env, cwd=tmp_path,
                            preexec_fn=_ctrl_c_as_a_terminal_gives_it)
    started: dict[int, int] = {}
    try:
        ranks_up = poll(lambda: len(list(pid_dir.glob("*.pid"))) == WORLD_SIZE or proc.poll() is not None,
                        START_BUDGET, interval=0.05)
        assert ranks_up and proc.poll() is None, f"the script did not get its ranks up: {_text(stderr)}"
        rank_pids = {int(p.read_text()) for p in pid_dir.glob("*.pid")}
        [zygote] = children_of(proc.pid)
        run_pids = children_of(zygote)
        assert rank_pids <= run_pids, f"ranks {rank_pids} are not the zygote's children {run_pids}"
        assert len(run_pids) == WORLD_SIZE + 1, f"expected {WORLD_SIZE} ranks and a store host: {run_pids}"
        for pid in (zygote, *run_pids):
            started[pid] = start_time(pid)
        yield proc, zygote, run_pids, stderr, run_tmp
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        stderr.close()
        for pid, t in started.items():  # never leave anything behind, even on failure
            if is_alive(pid, t):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(run_tmp, ignore_errors=True)


def _text(f) -> str:
    f.flush()
    f.seek(0)
    return f.read()[-3000:]


def _still_alive(pids_started: dict[int, int]) -> list[int]:
    return [pid for pid, t in pids_started.items() if is_alive(pid, t)]


def _run_files(run_tmp: str) -> list[str]:
    return [n for n in os.listdir(run_tmp) if n.startswith(("ddpf-", "ddpfault-"))]


def test_sigkill_of_the_harness_process_takes_zygote_and_ranks_along(group_script):
    proc, zygote, run_pids, _, run_tmp = group_script
    watched = {pid: start_time(pid) for pid in (zygote, *run_pids)}
    assert not any(t is None for t in watched.values())
    assert _run_files(run_tmp), "the run has a directory and the zygote a log"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    assert poll(lambda: not _still_alive(watched), GONE_WITHIN), (
        f"still alive {GONE_WITHIN}s after the harness process was killed: {_still_alive(watched)}")
    # the zygote outlives it long enough to remove the run's directory and its own log
    assert poll(lambda: not _run_files(run_tmp), GONE_WITHIN), _run_files(run_tmp)


def test_ctrl_c_ends_the_run_promptly_and_cleans_up(group_script):
    proc, zygote, run_pids, stderr, run_tmp = group_script
    watched = {pid: start_time(pid) for pid in (zygote, *run_pids)}
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code = proc.wait(15)
    took = time.monotonic() - t0
    assert took < GONE_WITHIN, f"Ctrl-C took {took:.1f}s to end the script"
    assert code != 0
    assert "KeyboardInterrupt" in _text(stderr)
    assert poll(lambda: not _still_alive(watched), GONE_WITHIN), (
        f"still alive {GONE_WITHIN}s after Ctrl-C: {_still_alive(watched)}")
    # Ctrl-C runs the harness's clean-up: the run's directory and the zygote's log are gone.
    # (torch's own caches, such as torchinductor_<user>, may stay: they are not the run's)
    assert _run_files(run_tmp) == []
