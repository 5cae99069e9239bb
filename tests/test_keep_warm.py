"""``--ddp-keep-warm``: a zygote that outlives the pytest process (DESIGN 4.5).

Real sessions in real subprocesses (``runpytest_subprocess``), real daemons on real Unix
sockets. Every test's daemons live in a runtime directory of the module's own
(``XDG_RUNTIME_DIR``), and are stopped and removed at the end: nothing is left behind.
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap

import pytest

from _helpers import children_of, is_alive, poll, start_time
from pytest_ddpfault.parent import warm

GONE_WITHIN = 10.0

# Each rank returns its parent's pid: the zygote that forked it.
TEST_FILE = '''
import os
import pytest

VALUE = {value}

def whoami():
    return (os.getppid(), VALUE)

@pytest.mark.ddp(world_size=2)
def test_{name}(ddp):
    res = ddp.run(whoami)
    res.assert_all_ok()
    with open(os.path.join({out!r}, "{name}.txt"), "w") as f:
        f.write("%d %d" % res.values[0])
'''


@pytest.fixture(scope="module")
def runtime_dir():
    """A private XDG_RUNTIME_DIR for the module's daemons; they are stopped at the end."""
    path = tempfile.mkdtemp(prefix="ddpkw-", dir="/tmp")  # short: Unix socket paths are limited
    old = os.environ.get("XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = path
    try:
        yield path
    finally:
        stopped = warm.stop_all(os.path.join(path, "ddpfault")) if os.path.isdir(os.path.join(path, "ddpfault")) else []
        if old is None:
            del os.environ["XDG_RUNTIME_DIR"]
        else:
            os.environ["XDG_RUNTIME_DIR"] = old
        shutil.rmtree(path, ignore_errors=True)
        assert all(not is_alive(pid) for pid in stopped)


def _run(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ddp-keep-warm", *args)


def _written(out, name) -> tuple[int, int]:
    ppid, value = (out / f"{name}.txt").read_text().split()
    return int(ppid), int(value)


def _no_children(pid: int) -> bool:
    return poll(lambda: not children_of(pid), GONE_WITHIN) or not children_of(pid)


def test_later_sessions_and_xdist_workers_fork_from_one_warm_zygote_and_run_edited_code(pytester, runtime_dir):
    out = pytester.mkdir("out")
    pytester.makepyfile(test_a=TEST_FILE.format(value=1, name="a", out=str(out)))
    first = _run(pytester)
    first.assert_outcomes(passed=1)
    first.stdout.fnmatch_lines(["*kept-warm zygote*"])
    zygote, value = _written(out, "a")
    assert value == 1
    assert is_alive(zygote), "the kept-warm zygote left with its first session"
    assert _no_children(zygote), f"ranks left behind: {children_of(zygote)}"
    directory = warm.private_dir(create=False)
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    [sock] = [n for n in os.listdir(directory) if n.endswith(".sock")]
    assert stat.S_IMODE(os.stat(os.path.join(directory, sock)).st_mode) & 0o077 == 0

    # the test file edited: the warm zygote runs the new code; two xdist workers share it
    pytester.makepyfile(test_a=TEST_FILE.format(value=2, name="a", out=str(out)),
                        test_b=TEST_FILE.format(value=2, name="b", out=str(out)))
    second = _run(pytester, "-n", "2")
    second.assert_outcomes(passed=2)
    assert _written(out, "a") == (zygote, 2)
    assert _written(out, "b") == (zygote, 2)
    assert _no_children(zygote), f"ranks left behind: {children_of(zygote)}"


HOLD = textwrap.dedent('''\
    import os, sys, threading
    from pytest_ddpfault import run_group
    from pytest_ddpfault.parent import launcher

    def hold(pid_dir):
        tmp = os.path.join(pid_dir, "rank%s.tmp" % os.environ["RANK"])
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, tmp[:-4] + ".pid")
        threading.Event().wait()

    if __name__ == "__main__":
        launcher.configure_keep_warm(600)
        run_group(hold, sys.argv[1], world_size=2, timeout=120)
''')


def test_a_client_killed_mid_run_takes_its_ranks_along_and_the_zygote_stays(tmp_path, runtime_dir):
    (tmp_path / "hold.py").write_text(HOLD)
    pids = tmp_path / "pids"
    pids.mkdir()
    proc = subprocess.Popen([sys.executable, str(tmp_path / "hold.py"), str(pids)], cwd=tmp_path,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        up = poll(lambda: len(list(pids.glob("*.pid"))) == 2 or proc.poll() is not None, 120, interval=0.05)
        assert up and proc.poll() is None, proc.stderr.read().decode()[-3000:]
        ranks = {int(p.read_text()) for p in pids.glob("*.pid")}
        [zygote] = {int(open(f"/proc/{r}/stat").read().rsplit(")", 1)[1].split()[1]) for r in ranks}
        watched = {pid: start_time(pid) for pid in ranks | children_of(zygote)}
        assert len(watched) == 3, f"two ranks and a store host: {watched}"
        proc.kill()
        proc.wait(10)
        assert poll(lambda: not [p for p, t in watched.items() if is_alive(p, t)], GONE_WITHIN), (
            f"ranks of a dead client still alive: {[p for p, t in watched.items() if is_alive(p, t)]}")
        assert is_alive(zygote), "the kept-warm zygote died with one of its clients"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stderr.close()


def test_a_changed_preload_module_replaces_the_zygote_which_then_leaves_when_idle(pytester, runtime_dir):
    out = pytester.mkdir("out")
    pytester.makepyfile(warm_helper_ddpkw="X = 1\n",
                        test_a=TEST_FILE.format(value=1, name="a", out=str(out)))
    _run(pytester, "--ddp-preload=warm_helper_ddpkw").assert_outcomes(passed=1)
    old, _ = _written(out, "a")
    pytester.makepyfile(warm_helper_ddpkw="X = 22  # edited\n")
    second = _run(pytester, "--ddp-preload=warm_helper_ddpkw", "--ddp-keep-warm-idle=1")
    second.assert_outcomes(passed=1)
    second.stdout.fnmatch_lines(["*replaced a stale one: *warm_helper_ddpkw.py changed on disk*"])
    new, _ = _written(out, "a")
    assert new != old
    assert poll(lambda: not is_alive(old), GONE_WITHIN), "the stale zygote did not leave"
    # started with --ddp-keep-warm-idle=1: it leaves a second after its last client
    assert poll(lambda: not is_alive(new), GONE_WITHIN), "the idle zygote did not leave"


def test_a_directory_others_can_enter_is_not_used_a_fresh_zygote_runs_the_test(pytester, monkeypatch):
    path = tempfile.mkdtemp(prefix="ddpkw-", dir="/tmp")
    try:
        os.mkdir(os.path.join(path, "ddpfault"), 0o755)
        os.chmod(os.path.join(path, "ddpfault"), 0o755)
        monkeypatch.setenv("XDG_RUNTIME_DIR", path)
        out = pytester.mkdir("out")
        pytester.makepyfile(test_a=TEST_FILE.format(value=1, name="a", out=str(out)))
        result = _run(pytester, "-W", "always")
        result.assert_outcomes(passed=1, warnings=1)
        result.stdout.fnmatch_lines(["*--ddp-keep-warm: *ddpfault is open to other users (mode 755*"])
        assert os.listdir(os.path.join(path, "ddpfault")) == []
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_keep_warm_settings_name_their_source(pytester, monkeypatch):
    monkeypatch.setenv("DDPFAULT_KEEP_WARM", "maybe")
    result = pytester.runpytest("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*'maybe' from $DDPFAULT_KEEP_WARM: expected one of 1, true*"])
    monkeypatch.delenv("DDPFAULT_KEEP_WARM")
    result = pytester.runpytest("-p", "no:cacheprovider", "--ddp-keep-warm-idle=-3")
    result.stderr.fnmatch_lines(["*keep-warm idle time '-3' from --ddp-keep-warm-idle: must be a positive*"])


def test_stop_option_stops_the_users_warm_zygotes(pytester, runtime_dir):
    directory = warm.private_dir()
    before = [warm.owner_pid(directory, n[:-5]) for n in os.listdir(directory) if n.endswith(".lock")]
    running = [p for p in before if p and is_alive(p)]
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ddp-keep-warm-stop")
    result.stdout.fnmatch_lines(["ddpfault: stopped kept-warm zygote(s) *" if running else
                                 "ddpfault: no kept-warm zygote to stop*"])
    assert not [p for p in running if is_alive(p)]
    assert not [n for n in os.listdir(directory) if n.endswith(".sock")]

