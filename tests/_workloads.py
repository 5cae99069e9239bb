"""Functions the fault tests run inside ranks, shared by more than one test file.

Importable by name in the ranks (tests/ is on sys.path), so they are sent by reference.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

import pytest_ddpfault

PG = 2.0        # process-group timeout where a timeout is not the point of the test
SHORT_PG = 1.0  # process-group timeout where the outcome is that timeout
# What gloo says, at once, to the peers of a rank that died.
CLOSED = r"Connection closed by peer|reset by peer|Read error"
INJECTED = "crash_rank injected by pytest-ddpfault"


def init_group(pg_timeout: float = PG) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=pg_timeout))


def ddp_training(steps=5, pg_timeout=PG):
    """A real DistributedDataParallel loop on a tiny model (the loop calls no all_reduce
    itself: DDP's Reducer does, from C++); returns the weights' sum."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    init_group(pg_timeout)
    torch.manual_seed(0)
    model = DDP(torch.nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(1, steps + 1):
        pytest_ddpfault.step()
        print(f"step {step} start", flush=True)
        opt.zero_grad()
        model(torch.ones(8, 4) * (dist.get_rank() + 1)).sum().backward()
        opt.step()
        print(f"step {step} done", flush=True)
    total = model.module.weight.detach().sum().item()
    # Drop DDP before the group: a DDP model freed right after destroy_process_group()
    # can deadlock in gloo's teardown (see rank._let_gloo_threads_drop_their_work).
    del model, opt
    dist.destroy_process_group()
    return total
