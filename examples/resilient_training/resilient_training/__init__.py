"""A small, realistic DDP training job that survives faults: store-level init retry,
timeouts, a checkpoint every K steps and resume from the latest one."""
from resilient_training.train import TrainConfig, init_distributed, train

__all__ = ["TrainConfig", "init_distributed", "train"]
