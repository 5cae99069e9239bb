"""The property a user wants: whatever rank fault hits it, the job never hangs and
every surviving rank either finishes or fails with an error."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_ddpfault import run_group
from pytest_ddpfault.strategies import fault_plans
from resilient_training import TrainConfig, train

STEPS = 6


def config(directory) -> TrainConfig:
    return TrainConfig(steps=STEPS, ckpt_every=1, ckpt_dir=str(directory), pg_timeout=2.0)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """One run without faults: the calls the job makes, rank by rank (its op logs). Plans
    drawn with reachable=clean only trigger on those calls, so every drawn fault fires."""
    res = run_group(train, config(tmp_path_factory.mktemp("clean")), world_size=3, timeout=30)
    res.assert_all_ok()
    return res


# The whole property's limit (pytest-timeout): a failing example makes Hypothesis shrink,
# each try a run of up to the marker's 30 s, for up to 5 minutes more.
@pytest.mark.timeout(300)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
@pytest.mark.ddp(world_size=3, timeout=30)
def test_training_finishes_or_fails_cleanly(ddp, clean, data, tmp_path_factory):
    plan = data.draw(fault_plans(3, kinds=["kill_rank", "crash_rank", "hang_rank", "delay", "torn_save"],
                                 reachable=clean), label="plan")
    res = ddp.run(train, config(tmp_path_factory.mktemp("ckpt")), faults=plan)
    for r in res.survivors:
        assert r.status in ("ok", "raised"), res.summary()
    # one fault at most, drawn where the clean run went: a fault that did not fire would
    # be an example that tested nothing
    assert not res.unfired, res.report()
    if not plan:
        res.assert_all_ok()
