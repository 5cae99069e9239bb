"""Sweeping every point: the job's restart path proven at every step, not at one.

``train_with_restarts`` is what an in-job restart does (torchrun's ``max_restarts`` without
new processes): when a step fails, every rank leaves the group, joins a new one and trains
on from the latest checkpoint. ``ddp.sweep`` crashes each rank at each step of a real
run and judges every run against a fault-free one: the final weights must be the same.
A resume that forgets to load the weights is caught as ``wrong`` at every step after the
first checkpoint, with the spec that replays it.
"""
import dataclasses
import importlib
import os
import shutil

import pytest
import torch
import torch.distributed as dist

from resilient_training import TrainConfig, train


def train_with_restarts(cfg: TrainConfig, attempts: int = 3) -> dict:
    """Train; on a failure leave the group and train again from the latest checkpoint."""
    # Each run of a sweep gets checkpoints of its own: MASTER_PORT is the run's store, and no
    # rank of this run has saved yet (the first save comes after collectives all ranks joined).
    run_dir = os.path.join(cfg.ckpt_dir, os.environ["MASTER_PORT"])
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = dataclasses.replace(cfg, ckpt_dir=run_dir)
    for attempt in range(attempts):
        os.environ["TORCHELASTIC_RESTART_COUNT"] = str(attempt)  # a new store prefix per attempt (init_distributed)
        try:
            return train(cfg)
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            if dist.is_initialized():
                dist.destroy_process_group()
    raise AssertionError("unreachable")


def train_with_restarts_forgetting_the_weights(cfg: TrainConfig) -> dict:
    """The bug: the resume reads the step from the checkpoint but not the weights."""
    job = importlib.import_module("resilient_training.train")

    def step_only(cfg, model, opt) -> int:
        path = os.path.join(cfg.ckpt_dir, "latest.pt")
        return int(torch.load(path, weights_only=True)["step"]) if os.path.exists(path) else 0

    job.load_checkpoint = step_only   # in this rank only: each run's ranks are fresh processes
    return train_with_restarts(cfg)


def same_weights(reference: dict, got: dict) -> bool:
    return got["weights"] == reference["weights"]   # resumed_from differs, and should


@pytest.mark.ddp(world_size=2, timeout=30)
def test_a_crash_at_any_step_of_any_rank_resumes_to_the_same_weights(ddp, cfg):
    sweep = ddp.sweep(train_with_restarts, cfg, kinds=["crash_rank"], ops=["step"], compare=same_weights)
    assert sweep.points == [f"step#{n}" for n in range(1, cfg.steps + 1)]
    assert len(sweep) == 2 * cfg.steps
    sweep.assert_all("recovered")
    resumed = {r.point: r.result[1 - r.target].value["resumed_from"] for r in sweep}
    assert resumed == {"step#1": 0, "step#2": 0, "step#3": 2, "step#4": 2, "step#5": 4, "step#6": 4}


@pytest.mark.ddp(world_size=2, timeout=30)
def test_the_sweep_catches_a_resume_that_forgets_the_weights(ddp, cfg):
    sweep = ddp.sweep(train_with_restarts_forgetting_the_weights, cfg, kinds=["crash_rank"], ranks=[1],
                      ops=["step"], compare=same_weights)
    wrong = sweep.by_outcome()["wrong"]
    assert [r.point for r in wrong] == ["step#3", "step#4", "step#5", "step#6"]  # once a checkpoint exists
    with pytest.raises(AssertionError, match=r"crash_rank\(rank=1, at=step#3\): wrong"):
        sweep.assert_never("wrong")
    replay = ddp.run(train_with_restarts_forgetting_the_weights, cfg, faults=wrong[0].fault)
    assert sweep.judge(replay) == "wrong"
