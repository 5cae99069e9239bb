"""A tiny data-parallel training job that survives a restart.

    torchrun --standalone --nproc-per-node=2 --max-restarts=1 train.py --ckpt-dir CK --out W.json
    python train.py --spawn 2 --ckpt-dir CK --out W.json      # the same job, as an mp.spawn script

Each rank trains the same linear model on its own shard of data; the gradients are averaged
with one all_reduce per step (what DDP does, without DDP's start-up cost). Rank 0 saves a
checkpoint every --ckpt-every steps and every rank resumes from the latest one on start, so
a group that torchrun's agent restarts continues where it was and ends with the same
weights as a run that never failed. Each step is marked with ``pytest_ddpfault.step()``
(a no-op without a fault plan) so that ``at=step#N`` faults can target it.

Under torchrun (torch >= 2.5) the agent hosts the store (TORCHELASTIC_USE_AGENT_STORE=True)
and keeps it, keys and all, across restarts (pytorch#135712). A restarted group that calls
plain ``init_process_group("gloo")`` uses the same keys as the attempt that died, and fails
now and then with "Gloo connectFullMesh failed ... Connection refused" (a rank connecting to
its peer's address of the dead attempt) or hangs until the process-group timeout. Two
remedies, each enough: ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` in the environment (the
workers get a store of their own each attempt; ``ddp.torchrun`` sets it unless told
otherwise), or, as here when the agent's store is shared, a key prefix per attempt.
``--shared-keys`` turns the prefix off.
"""
from __future__ import annotations

import argparse
import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

try:
    from pytest_ddpfault import step as mark_step
except ImportError:  # runs without the plugin too
    def mark_step() -> None:
        pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-dir", required=True, help="where checkpoints go (and are resumed from)")
    p.add_argument("--out", required=True, help="rank 0 writes the final weights here (JSON)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--pg-timeout", type=float, default=5.0, help="process group timeout, seconds")
    p.add_argument("--spawn", type=int, default=0, help="run N ranks with mp.spawn instead of torchrun")
    p.add_argument("--shared-keys", action="store_true",
                   help="under torchrun, use the agent's store without a per-attempt key prefix")
    return p.parse_args(argv)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's data for this step: the same on every run, whatever restarted."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 4, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(16, 1, generator=g)
    return x, y


def checkpoint_path(args) -> str:
    return os.path.join(args.ckpt_dir, "checkpoint.pt")


def train(args, rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    start = 0
    if os.path.exists(checkpoint_path(args)):
        state = torch.load(checkpoint_path(args))
        model.load_state_dict(state["model"])
        start = state["step"]
    print(f"rank {rank}: starting at step {start + 1}", flush=True)
    params = list(model.parameters())
    for step in range(start + 1, args.steps + 1):
        mark_step()
        x, y = batch(step, rank)
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(grads)
        grads /= world_size
        with torch.no_grad():
            offset = 0
            for p in params:
                p -= args.lr * grads[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
        if step % args.ckpt_every == 0:
            if rank == 0:
                tmp = checkpoint_path(args) + ".tmp"
                torch.save({"step": step, "model": model.state_dict()}, tmp)
                os.replace(tmp, checkpoint_path(args))  # a rank killed mid-save leaves the last one
            dist.barrier()  # every rank goes on only once the checkpoint is there
    if rank == 0:
        weights = [v for p in params for v in p.detach().reshape(-1).tolist()]
        with open(args.out, "w") as f:
            json.dump({"weights": [w.hex() for w in weights], "resumed_from": start,
                       "attempt": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))}, f)


def init_from_torchrun(args) -> tuple[int, int]:
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timedelta(seconds=args.pg_timeout)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and not args.shared_keys:
        agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                    is_master=False, timeout=timeout)
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"attempt_{attempt}/", agent_store)
        print(f"rank {rank}: the agent's store, keys prefixed attempt_{attempt}/", flush=True)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
        print(f"rank {rank}: plain init_process_group", flush=True)
        dist.init_process_group("gloo", timeout=timeout)
    return rank, world_size


def spawned(rank: int, args, port: int) -> None:
    timeout = timedelta(seconds=args.pg_timeout)
    store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=args.spawn, timeout=timeout)
    try:
        train(args, rank, args.spawn)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.ckpt_dir, exist_ok=True)
    if args.spawn:
        import torch.multiprocessing as mp

        # This process hosts the store on a port the OS picks; the ranks connect to it.
        store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=args.pg_timeout))
        mp.spawn(spawned, args=(args, store.port), nprocs=args.spawn)
        return
    rank, world_size = init_from_torchrun(args)
    try:
        train(args, rank, world_size)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
