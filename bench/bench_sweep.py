"""Throughput of a sweep: a 4-rank function with 6 all_reduces, ``kill_rank`` on every rank
at every all_reduce (24 runs), against the same 24 runs written as 24 pytest tests.

    python bench/bench_sweep.py [--rounds 2] [--max-procs N]

Reported: runs per minute of ``sweep_group`` (its wall time, the reference run included),
the reference run's share of it, and the cost of the same runs as separate tests: the
summed durations of 24 ``ddp.run`` tests in a pytest subprocess (after a first one that
takes pytest's and the zygote's start-up). The zygote is warmed first.
The machine is shared and noisy, so both are measured in one invocation; the best round
of each counts (noise only ever adds time). ``--max-procs``: the rank-process cap the
sweep fits its side-by-side runs in (default: the plugin's, max(8, 4 x CPUs); a 4-rank
run holds 5 processes with its store host).
"""
from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import time
from xml.etree import ElementTree

import torch
import torch.distributed as dist

from pytest_ddpfault import run_group, sweep_group

WORLD_SIZE = 4
ALL_REDUCES = 6


def six_all_reduces() -> float:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
    t = torch.ones(1) * (dist.get_rank() + 1)
    for _ in range(ALL_REDUCES):
        dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


TESTS = '''
import datetime, pytest, torch, torch.distributed as dist

def six_all_reduces():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=2))
    t = torch.ones(1) * (dist.get_rank() + 1)
    for _ in range({all_reduces}):
        dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()

@pytest.mark.parametrize("spec", {specs!r})
@pytest.mark.ddp(world_size={world_size}, timeout=20)
def test_killed_rank(ddp, spec):
    res = ddp.run(six_all_reduces, faults=spec)
    res.assert_survivors_raised(RuntimeError)
'''


def as_tests(specs: list[str]) -> float:
    """Seconds of ``len(specs)`` pytest tests, one run each: the sum of their own durations
    (set-up, call, tear-down, from pytest's JUnit XML) after a first test that takes the
    zygote's start-up and pytest's warm-up."""
    with tempfile.TemporaryDirectory() as tmp:
        path, xml = os.path.join(tmp, "test_runs.py"), os.path.join(tmp, "report.xml")
        with open(path, "w") as f:
            f.write(TESTS.format(all_reduces=ALL_REDUCES, specs=specs[:1] + specs, world_size=WORLD_SIZE))
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                               path], capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            sys.exit(f"benchmark tests failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        cases = ElementTree.parse(xml).getroot().iter("testcase")
        return sum(float(case.get("time")) for case in list(cases)[1:])


def one_sweep(max_procs: int | None):
    start = time.monotonic()
    sweep = sweep_group(six_all_reduces, world_size=WORLD_SIZE, kinds=["kill_rank"], timeout=20, max_procs=max_procs)
    wall = time.monotonic() - start
    assert len(sweep) == WORLD_SIZE * ALL_REDUCES, sweep.table()
    sweep.assert_all("failed")
    return sweep, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-procs", type=int, default=None)
    args = ap.parse_args()
    run_group(six_all_reduces, world_size=WORLD_SIZE, timeout=60).assert_all_ok()   # the zygote is up
    sweeps, tests = [], []
    for _ in range(args.rounds):
        sweeps.append(one_sweep(args.max_procs))
        specs = [run.fault for run in sweeps[-1][0]]
        tests.append(as_tests(specs))
    sweep, wall = min(sweeps, key=lambda s: s[1])
    per_test = min(tests)
    n = len(sweep)
    print(f"{WORLD_SIZE}-rank function, {ALL_REDUCES} all_reduces, kill_rank on every rank at every all_reduce "
          f"(torch {torch.__version__}, {os.cpu_count()} CPUs, {datetime.date.today()}, best of {args.rounds}):")
    print(f"  sweep_group          {n} runs in {wall:6.2f} s = {60 * n / wall:6.1f} runs/min "
          f"({sweep.lanes} side by side)")
    print(f"  reference run        {sweep.reference_seconds:6.2f} s = {100 * sweep.reference_seconds / wall:4.1f} % "
          f"of the sweep")
    print(f"  as {n} pytest tests   {per_test:6.2f} s         = {60 * n / per_test:6.1f} runs/min")
    print(f"  ratio                {per_test / wall:6.1f}x (tests / sweep)")


if __name__ == "__main__":
    main()
