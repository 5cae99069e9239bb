"""Fault-fuzzing throughput: examples per minute of a 3-rank, 4-step DDP training
property under random fault plans, against the same runs with no fault, one invocation.

    python bench/bench_fuzz.py [--examples 30]

Each hypothesis example is one ``run_group`` of the training loop with the drawn plan;
a fault that makes peers wait costs them the process-group timeout (1 s here), so the
plans' own cost is reported apart from the harness's.
"""
from __future__ import annotations

import argparse
import datetime
import time

import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, given, settings

import pytest_ddpfault
from pytest_ddpfault import run_group
from pytest_ddpfault.strategies import fault_plans, triggers

PG_TIMEOUT = datetime.timedelta(seconds=1)


def train_steps(steps=4):
    dist.init_process_group("gloo", timeout=PG_TIMEOUT)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        pytest_ddpfault.step()
        opt.zero_grad()
        model(torch.randn(8, 8)).sum().backward()
        opt.step()
    dist.destroy_process_group()
    return "done"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=30)
    args = ap.parse_args()
    run_group(train_steps, world_size=3, timeout=20)  # warm the zygote outside the timing

    start = time.monotonic()
    for _ in range(args.examples):
        run_group(train_steps, world_size=3, timeout=20).assert_all_ok()
    clean = time.monotonic() - start

    stats = {"runs": 0, "run_seconds": 0.0}

    @settings(max_examples=args.examples, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(plan=fault_plans(3, kinds=["kill_rank", "crash_rank", "hang_rank", "delay"],
                            triggers=triggers(ops=["collective", "all_reduce"], forms=("op", "step"),
                                              max_call=4)))
    def prop(plan):
        res = run_group(train_steps, world_size=3, timeout=20, faults=plan)
        stats["runs"] += 1
        stats["run_seconds"] += res.duration
        assert all(r.status in ("ok", "raised") for r in res.survivors), res.summary()

    start = time.monotonic()
    prop()
    fuzz = time.monotonic() - start
    n = stats["runs"]
    print(f"3 ranks, 4 DDP steps, {args.examples} examples each (same invocation):")
    print(f"  no fault:      {clean / args.examples:6.3f} s/example  {60 * args.examples / clean:7.1f} examples/min")
    print(f"  random plans:  {fuzz / n:6.3f} s/example  {60 * n / fuzz:7.1f} examples/min")
    print(f"  of which the runs' own time (ranks up to last rank done, incl. pg timeouts): "
          f"{stats['run_seconds'] / n:.3f} s/example; harness + hypothesis overhead "
          f"{(fuzz - stats['run_seconds']) / n:.3f} s/example")


if __name__ == "__main__":
    main()
