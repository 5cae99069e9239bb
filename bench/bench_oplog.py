"""Overhead of the operation log: a 4-rank DDP training test with the log on (the
default) against the same test with it off (``run_group(..., oplog=False)``: no log and,
with no fault plan, no counting either), interleaved in one invocation because the
machine is shared and noisy.

    python bench/bench_oplog.py [--rounds 16] [--steps 60]

Reported: the training loop's time as each rank measures it (the slowest rank of a run),
as the ratio of the fastest rounds on/off and the median of each round's on/off ratio
(noise on a shared machine only ever adds time), and the whole ``run_group`` time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist

import pytest_ddpfault
from pytest_ddpfault import run_group

WORLD_SIZE = 4


def train(steps: int) -> float:
    """DDP training as a test would run it: init, a small MLP, ``steps`` steps with step() marks."""
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10)))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = torch.randn(32, 64)
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        pytest_ddpfault.step()
        opt.zero_grad()
        model(data).sum().backward()
        opt.step()
    took = time.perf_counter() - started
    del model
    dist.destroy_process_group()
    return took


def one(steps: int, oplog: bool) -> tuple[float, float, int]:
    t = time.perf_counter()
    res = run_group(train, steps, world_size=WORLD_SIZE, timeout=120, oplog=oplog)
    wall = time.perf_counter() - t
    res.assert_all_ok()
    return max(res.values), wall, sum(len(r.ops) for r in res)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=16)
    p.add_argument("--steps", type=int, default=60)
    a = p.parse_args()
    one(2, True)  # the zygote's start, outside the figures
    on, off, on_wall, off_wall, ops = [], [], [], [], 0
    for i in range(a.rounds):
        for flag in ((True, False) if i % 2 == 0 else (False, True)):
            loop, wall, n = one(a.steps, flag)
            (on if flag else off).append(loop)
            (on_wall if flag else off_wall).append(wall)
            ops = max(ops, n) if flag else ops
    paired = statistics.median(x / y for x, y in zip(on, off))  # each round's on and off ran back to back
    print(f"{WORLD_SIZE}-rank DDP training, {a.steps} steps, {a.rounds} rounds interleaved; "
          f"{ops} ops logged per run with the log on")
    print(f"training loop, slowest rank: fastest round on {min(on) * 1000:.1f} ms, off {min(off) * 1000:.1f} ms "
          f"(ratio {min(on) / min(off):.3f}); median of the rounds' on/off ratios {paired:.3f}")
    print(f"whole run_group, median: on {statistics.median(on_wall):.3f} s, off {statistics.median(off_wall):.3f} s "
          f"(ratio {statistics.median(on_wall) / statistics.median(off_wall):.3f})")

if __name__ == "__main__":
    main()
