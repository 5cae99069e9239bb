"""What the job's tests share: its configuration, and the weights of an unfaulted run."""
import pytest

from resilient_training import TrainConfig, train


@pytest.fixture
def cfg(tmp_path):
    return TrainConfig(steps=6, ckpt_every=2, ckpt_dir=str(tmp_path / "ckpt"), pg_timeout=2.0)


@pytest.fixture
def reference(ddp, tmp_path):
    """The final weights of an unfaulted run."""
    res = ddp.run(train, TrainConfig(steps=6, ckpt_every=2, ckpt_dir=str(tmp_path / "ref"), pg_timeout=2.0),
                  faults=None)
    res.assert_all_ok()
    return res.values[0]["weights"]
