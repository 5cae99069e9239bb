"""Marginal cost of one 4-rank init + all_reduce + destroy test, two ways, one invocation.

    python bench/bench_per_test.py [--short N] [--long N] [--mptc-short N] [--mptc-long N]

For each way it runs pytest on a generated file with a few tests and on one with more,
and reports (T_long - T_short) / (N_long - N_short): the cost a test adds, without
pytest's and the zygote's start-up. Ways: this plugin's ``ddp`` fixture, and torch's own
``MultiProcessTestCase`` (needs ``expecttest``) doing the same work. The machine is
shared and noisy, so the two are measured in the same invocation and compared as a ratio.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time

PLUGIN_TEST = '''
import pytest, torch, torch.distributed as dist

def allreduce_once():
    dist.init_process_group("gloo")
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()

@pytest.mark.parametrize("i", range({n}))
@pytest.mark.ddp(world_size=4)
def test_allreduce(ddp, i):
    assert ddp.run(allreduce_once).values == [10.0] * 4
'''

MPTC_TEST = '''
import torch, torch.distributed as dist
from torch.testing._internal.common_distributed import MultiProcessTestCase

class AllReduce(MultiProcessTestCase):
    @property
    def world_size(self):
        return 4

    def setUp(self):
        super().setUp()
        self._spawn_processes()

    def _work(self):
        store = dist.FileStore(self.file_name, self.world_size)
        dist.init_process_group("gloo", store=store, rank=self.rank, world_size=self.world_size)
        t = torch.ones(1) * (self.rank + 1)
        dist.all_reduce(t)
        dist.destroy_process_group()
        self.assertEqual(t.item(), 10.0)

{methods}
'''


def _pytest(path: str, extra: list[str]) -> float:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path, *extra],
                          capture_output=True, text=True, timeout=1800)
    took = time.monotonic() - start
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed ({path}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return took


def marginal(write, n_short: int, n_long: int, extra: list[str]) -> tuple[float, float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        short, long_ = os.path.join(tmp, "test_short.py"), os.path.join(tmp, "test_long.py")
        write(short, n_short)
        write(long_, n_long)
        t_short = _pytest(short, extra)
        t_long = _pytest(long_, extra)
    return t_short, t_long, (t_long - t_short) / (n_long - n_short)


def write_plugin(path: str, n: int) -> None:
    with open(path, "w") as f:
        f.write(PLUGIN_TEST.format(n=n))


def write_mptc(path: str, n: int) -> None:
    methods = "\n".join(f"    def test_allreduce_{i}(self):\n        self._work()\n" for i in range(n))
    with open(path, "w") as f:
        f.write(MPTC_TEST.format(methods=methods))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=2)
    ap.add_argument("--long", type=int, default=22)
    ap.add_argument("--mptc-short", type=int, default=1)
    ap.add_argument("--mptc-long", type=int, default=3)
    args = ap.parse_args()
    ps, pl, pm = marginal(write_plugin, args.short, args.long, ["-p", "ddpfault"])
    ms, ml, mm = marginal(write_mptc, args.mptc_short, args.mptc_long, ["-p", "no:ddpfault"])
    print(textwrap.dedent(f"""\
        4-rank init + all_reduce + destroy, marginal cost per test (same invocation):
          pytest-ddpfault        {pm:7.3f} s   ({args.short} tests {ps:.1f} s, {args.long} tests {pl:.1f} s)
          MultiProcessTestCase   {mm:7.3f} s   ({args.mptc_short} tests {ms:.1f} s, {args.mptc_long} tests {ml:.1f} s)
          ratio                  {mm / pm:7.1f}x"""))


if __name__ == "__main__":
    main()
