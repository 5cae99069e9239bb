"""``--ddp-keep-warm`` against the default, in one invocation (the machine is shared and noisy).

    python bench/bench_keep_warm.py [--rounds N] [--tests N]

1. A one-test session (one 4-rank init + all_reduce + destroy test), wall time from
   starting ``python -m pytest`` to its exit: cold (a zygote per pytest process, as
   without the option) and warm (``--ddp-keep-warm`` with a zygote already warm), the
   two interleaved for ``--rounds`` rounds. The session that first starts the kept-warm
   zygote is reported on its own.
2. ``-n 2`` with ``--tests`` such tests: the peak total PSS (proportional set size: shared
   pages split between their users, so forked ranks are not counted twice) of every
   process of the session plus the kept-warm zygote and its ranks, sampled every 50 ms.

The kept-warm zygote lives in a private runtime directory of this benchmark and is
stopped at the end.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from pytest_ddpfault.parent import warm
from pytest_ddpfault.procfs import descendants

TEST = '''
import pytest

def allreduce_once():
    import torch, torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()

@pytest.mark.ddp(world_size=4)
def test_{i}(ddp):
    res = ddp.run(allreduce_once)
    res.assert_all_ok()
'''

SESSION_LIMIT = 600.0   # seconds one measured pytest session may take


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def session(folder: str, env: dict, *args: str, sample: bool = False) -> tuple[float, int]:
    """Wall time of one pytest session; with ``sample``, its peak PSS in kB (and the kept-warm
    zygote's, with its ranks)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peak = 0
    if sample:
        directory = os.path.join(env["XDG_RUNTIME_DIR"], "ddpfault")
        while proc.poll() is None and time.monotonic() - t0 < SESSION_LIMIT:  # communicate() then times out
            pids = [proc.pid, *descendants(proc.pid)]
            for name in os.listdir(directory) if os.path.isdir(directory) else ():
                owner = warm.owner_pid(directory, name[:-5]) if name.endswith(".lock") else None
                if owner and owner > 0:
                    pids += [owner, *descendants(owner)]
            peak = max(peak, sum(pss_kb(p) for p in set(pids)))
            time.sleep(0.05)
    out, _ = proc.communicate(timeout=SESSION_LIMIT)
    took = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.decode()[-3000:]}")
    return took, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tests", type=int, default=8)
    opts = ap.parse_args()
    runtime = tempfile.mkdtemp(prefix="ddpkwb-", dir="/tmp")
    work = tempfile.mkdtemp(prefix="ddpkwb-work-")
    env = dict(os.environ, XDG_RUNTIME_DIR=runtime)
    env.pop("DDPFAULT_KEEP_WARM", None)
    try:
        one = os.path.join(work, "one")
        many = os.path.join(work, "many")
        os.makedirs(one)
        os.makedirs(many)
        with open(os.path.join(one, "test_one.py"), "w") as f:
            f.write(TEST.format(i=0))
        with open(os.path.join(many, "test_many.py"), "w") as f:
            f.write("".join(TEST.format(i=i) for i in range(opts.tests)))

        first, _ = session(one, env, "--ddp-keep-warm")
        cold, hot = [], []
        for _ in range(opts.rounds):
            cold.append(session(one, env)[0])
            hot.append(session(one, env, "--ddp-keep-warm")[0])
        c, h = statistics.median(cold), statistics.median(hot)
        print(f"one-test session, {opts.rounds} rounds, median wall time from start to exit:")
        print(f"  cold (a zygote per pytest process): {c:.2f} s   {' '.join(f'{x:.2f}' for x in cold)}")
        print(f"  warm (--ddp-keep-warm, zygote up):  {h:.2f} s   {' '.join(f'{x:.2f}' for x in hot)}")
        print(f"  first --ddp-keep-warm session (starts the zygote): {first:.2f} s")
        print(f"  warm / cold: {h / c:.2f} ({c / h:.1f}x faster)")

        t_without, m_without = session(many, env, "-n", "2", sample=True)
        t_with, m_with = session(many, env, "-n", "2", "--ddp-keep-warm", sample=True)
        print(f"-n 2, {opts.tests} tests, peak PSS of the session's processes (+ the kept-warm zygote):")
        print(f"  without: {m_without / 1024:.0f} MiB in {t_without:.1f} s")
        print(f"  with --ddp-keep-warm: {m_with / 1024:.0f} MiB in {t_with:.1f} s")
        print(f"  with / without: memory {m_with / m_without:.2f}, time {t_with / t_without:.2f}")
    finally:
        directory = os.path.join(runtime, "ddpfault")
        if os.path.isdir(directory):
            warm.stop_all(directory)
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
