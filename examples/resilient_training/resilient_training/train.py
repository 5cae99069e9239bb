"""Training loop with checkpoint/resume, written as a user would for gloo on CPU.

Runs under torchrun (``python -m torch.distributed.run --nproc-per-node 2 -m
resilient_training.train --ckpt-dir D``) or under pytest-ddpfault's ``ddp.run``.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

try:  # marks steps for step#N fault triggers; a no-op outside the plugin
    from pytest_ddpfault import step as mark_step
except ImportError:  # pragma: no cover - the job runs without the test plugin too
    def mark_step() -> None:
        pass


@dataclass
class TrainConfig:
    steps: int = 8
    ckpt_every: int = 2
    ckpt_dir: str = "checkpoints"
    pg_timeout: float = 5.0        # seconds: how long a collective may wait for a peer
    store_timeout: float = 1.0     # seconds per store connection attempt
    store_tries: int = 30
    seed: int = 0
    lr: float = 0.05


def init_distributed(cfg: TrainConfig) -> None:
    """Rendezvous with a store-level retry, then init_process_group(store=...).

    Retrying init_process_group itself after EADDRINUSE never recovers: each failed
    attempt moves that rank to a new group prefix and ranks wait for each other forever.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    last_error: Exception | None = None
    for _ in range(cfg.store_tries):
        try:
            store = dist.TCPStore(host, port, world, is_master=(rank == 0 and not agent_store),
                                  timeout=datetime.timedelta(seconds=cfg.store_timeout),
                                  wait_for_workers=False)
            break
        except (RuntimeError, dist.DistError) as exc:
            last_error = exc
            time.sleep(0.2)  # back off before the next rendezvous attempt
    else:
        raise RuntimeError(f"rank {rank}: no store at {host}:{port} after {cfg.store_tries} tries") from last_error
    if agent_store:  # under torchrun's agent: keep each restart's keys apart
        store = dist.PrefixStore(f"/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=cfg.pg_timeout))


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)   # deterministic per step and rank
    x = torch.randn(16, 8, generator=g)
    return x, x.sum(dim=1, keepdim=True)


def _ckpt_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.ckpt_dir, "latest.pt")


def load_checkpoint(cfg: TrainConfig, model, opt) -> int:
    path = _ckpt_path(cfg)
    if not os.path.exists(path):
        return 0
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    return int(state["step"])


def save_checkpoint(cfg: TrainConfig, model, opt, step: int) -> None:
    """Never in place: write a temp file, fsync it, rename it over the last one, fsync the
    directory. A save torn half-way (killed, power lost) or failing (ENOSPC, EIO) leaves the
    last complete checkpoint as it was (tests/test_recovery.py: torn_save, io_error)."""
    os.makedirs(cfg.ckpt_dir, exist_ok=True)
    tmp = _ckpt_path(cfg) + ".tmp"
    with open(tmp, "wb") as f:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, f)
        f.flush()
        os.fsync(f.fileno())           # the bytes are on disk before the rename makes them "latest"
    os.replace(tmp, _ckpt_path(cfg))   # atomic: "latest" is the old file or the new one, never half
    fd = os.open(cfg.ckpt_dir, os.O_RDONLY)
    try:
        os.fsync(fd)                   # the rename itself survives a power loss
    finally:
        os.close(fd)


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().numpy().tobytes())
    return h.hexdigest()[:16]


def train(cfg: TrainConfig | None = None) -> dict:
    """Train to ``cfg.steps``, resuming from the latest checkpoint; return a summary."""
    cfg = cfg or TrainConfig()
    init_distributed(cfg)
    rank = dist.get_rank()
    model = make_model(cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    start = load_checkpoint(cfg, model, opt)
    ddp_model = DistributedDataParallel(model)  # broadcasts rank 0's weights to all
    for step in range(start, cfg.steps):
        mark_step()
        x, y = batch(step, rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(ddp_model(x), y).backward()
        opt.step()
        if (step + 1) % cfg.ckpt_every == 0:
            if rank == 0:
                save_checkpoint(cfg, model, opt, step + 1)
            dist.barrier()   # nobody runs ahead of a checkpoint that might be needed
    digest = weights_digest(model)
    dist.destroy_process_group()
    return {"rank": rank, "resumed_from": start, "steps": cfg.steps, "weights": digest}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="train with checkpoints (run under torchrun)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ckpt-every", type=int, default=2)
    ap.add_argument("--ckpt-dir", default="checkpoints")
    ap.add_argument("--pg-timeout", type=float, default=5.0)
    args = ap.parse_args(argv)
    summary = train(TrainConfig(steps=args.steps, ckpt_every=args.ckpt_every, ckpt_dir=args.ckpt_dir,
                                pg_timeout=args.pg_timeout))
    print(f"rank {summary['rank']}: resumed_from={summary['resumed_from']} weights={summary['weights']}",
          flush=True)


if __name__ == "__main__":
    main()
