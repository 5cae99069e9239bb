"""Benchmark scoped network faults (the gloo data plane through per-link proxies).

    python bench/bench_data_plane.py [--repeats 3] [--steps 30]

Two comparisons, each against a baseline run in the same invocation, alternated so that
the machine's noise hits both alike; medians and ratios are printed:

1. A 4-rank, 2-node DDP training run whose plan holds a scoped fault that is not active
   yet (``partition(nodes=(1,), at=step#100000)``: every crossing link goes through its
   Toxiproxy proxy, nothing is cut) against the same run with no fault (no proxies).
   The ratio is what routing gloo's traffic through the proxies costs while a fault waits.
2. A 16-rank, 4-node test end to end: a partition of node 1 at step 2, healed after
   0.5 s (48 link proxies), against the same test with no fault.

Bounded run time: about a minute on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from pytest_ddpfault import run_group  # noqa: E402


def train(steps: int):
    """A small DDP model trained for ``steps`` steps; the time the loop took."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import pytest_ddpfault

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 8)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 64), torch.randn(32, 8)
    dist.barrier()
    start = time.monotonic()
    for _ in range(steps):
        pytest_ddpfault.step()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    took = time.monotonic() - start
    dist.destroy_process_group()
    return took


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.monotonic()
    res = run_group(fn, *args, **kwargs)
    wall = time.monotonic() - start
    res.assert_all_ok()
    return wall, res


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)

    timed(train, 2, world_size=4, nodes=2, timeout=120)  # the zygote's start is no one's cost
    waiting = "partition(nodes=(1,), at=step#100000)"
    loop = {"plain": [], "scoped": []}
    wall4 = {"plain": [], "scoped": []}
    for _ in range(args.repeats):
        for name, faults in (("plain", None), ("scoped", waiting)):
            wall, res = timed(train, args.steps, world_size=4, nodes=2, faults=faults, timeout=120)
            loop[name].append(max(res.values))
            wall4[name].append(wall)
    wall16 = {"plain": [], "partition": []}
    for _ in range(args.repeats):
        for name, faults in (("plain", None), ("partition", "partition(nodes=(1,), at=step#2, duration=0.5)")):
            wall, _ = timed(train, 4, world_size=16, nodes=4, faults=faults, timeout=180)
            wall16[name].append(wall)

    def row(label, base, other):
        b, o = statistics.median(base), statistics.median(other)
        print(f"{label:<52}{b:>10.3f}{o:>10.3f}{o / b:>8.2f}")

    print(f"{'median seconds':<52}{'baseline':>10}{'scoped':>10}{'ratio':>8}")
    row(f"4 ranks, 2 nodes: {args.steps} DDP steps (loop)", loop["plain"], loop["scoped"])
    row("4 ranks, 2 nodes: the whole run (wall)", wall4["plain"], wall4["scoped"])
    row("16 ranks, 4 nodes: partition 0.5 s at step 2 (wall)", wall16["plain"], wall16["partition"])
    print(f"({args.repeats} repeats each, alternated; {os.cpu_count()} CPUs; scoped 4-rank plan: {waiting})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
