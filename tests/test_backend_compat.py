"""Which backend an armed rank gets: the wrapped gloo only where torch itself would run
every device of the group on gloo; anything else torch would choose (NCCL for CUDA when
``init_process_group()`` has no backend on a GPU machine, a ``cuda:...`` entry in a
``"cpu:gloo,cuda:..."`` string) is left to torch exactly as it is.

Each test compares an armed run (a plan whose faults never fire, or that fires on the
call under test) with a plain one, in real ranks with real gloo, on whatever torch is
installed; the outcome is the same whether torch succeeds or fails (a CUDA build of
torch 2.2 on a machine without a GPU picks NCCL for ``init_process_group()`` and fails;
armed, it must fail the same way, not run on gloo instead).
"""
from __future__ import annotations

import datetime
import warnings

import pytest
import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from _workloads import INJECTED, PG

NEVER = "kill_rank(rank=0, at=step#99)"   # armed, never fires
pytestmark = pytest.mark.filterwarnings("ignore:these faults never fired")
OTHER_DEVICE_BACKEND = "ddpft_other"       # a real second backend, for "cuda" only


def _torch_chooses_gloo_only(backend: str) -> bool:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chosen = c10d.BackendConfig(dist.Backend(backend)).get_device_backend_map()
    return set(map(str, chosen.values())) == {"gloo"}


# -- functions run in the ranks ------------------------------------------------------
def _register_other_device_backend() -> None:
    """A custom backend that torch uses for "cuda" tensors: real gloo underneath, so the
    group is real on a machine without a GPU."""
    from torch._C._distributed_c10d import ProcessGroupGloo

    if OTHER_DEVICE_BACKEND.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(
            OTHER_DEVICE_BACKEND,
            lambda store, rank, size, timeout: ProcessGroupGloo(store, rank, size, timeout=timeout),
            devices=["cuda"])


def _init(backend) -> None:
    """init_process_group, with no backend argument at all when ``backend`` is None."""
    if backend is not None and OTHER_DEVICE_BACKEND in backend:
        _register_other_device_backend()
    timeout = datetime.timedelta(seconds=PG)
    if backend is None:
        dist.init_process_group(timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)


def what_a_group_looks_like(backend=None):
    """init_process_group, one all_reduce; what the user can observe about the group."""
    _init(backend)
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    seen = {"backend": str(dist.get_backend()), "config": dist.get_backend_config(),
            "name": dist.group.WORLD.name(), "module_backend": str(c10d._backend),
            "sum": t.item()}
    dist.destroy_process_group()
    return seen


def allreduce_on_the_process_group(backend=None):
    """An all_reduce issued on the ProcessGroup itself, as DDP's Reducer does from C++:
    only the wrapped backend sees it (the Python functions are not called)."""
    _init(backend)
    try:
        dist.group.WORLD.allreduce([torch.ones(1)]).wait()
        return "not counted"
    except RuntimeError as exc:
        if INJECTED not in str(exc):
            raise
        return "counted"
    finally:
        dist.destroy_process_group()


def _without_name(seen):
    """ProcessGroup.name() aside: torch's plain group says "undefined" where its version
    sets no default backend (no backend argument on 2.3-2.4, "cpu:gloo" strings); the
    wrapped one always says "gloo"."""
    return {k: v for k, v in seen.items() if k != "name"} if isinstance(seen, dict) else seen


def _outcomes(res):
    return [(r.status, _without_name(r.value) if r.status == "ok" else (r.exc_type, r.message))
            for r in res]


# -- init_process_group() with no backend ------------------------------------------------
@pytest.mark.ddp(world_size=2, fault=NEVER, timeout=20, allow_unfired=True)
def test_no_backend_armed_sees_what_torch_chose_unarmed(ddp):
    plain = ddp.run(what_a_group_looks_like, faults=[])
    armed = ddp.run(what_a_group_looks_like)
    assert _outcomes(armed) == _outcomes(plain), f"plain:\n{plain.summary()}\narmed:\n{armed.summary()}"
    if plain.ok:  # a CPU machine (or a build without NCCL): torch chose gloo
        assert armed.values[0]["sum"] == 3.0


@pytest.mark.ddp(world_size=1, fault="crash_rank(rank=0, at=all_reduce#1)", timeout=20)
def test_no_backend_is_wrapped_where_torch_chooses_gloo(ddp):
    if not _torch_chooses_gloo_only("undefined"):
        pytest.skip("this torch picks a non-gloo backend for init_process_group() here "
                    "(see test_no_backend_armed_sees_what_torch_chose_unarmed)")
    res = ddp.run(allreduce_on_the_process_group)
    res.assert_all_ok()
    assert res.values == ["counted"]


# -- backend strings ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo", "cpu:gloo,cuda:gloo"])
@pytest.mark.ddp(world_size=1, fault="crash_rank(rank=0, at=all_reduce#1)", timeout=20)
def test_gloo_on_every_device_is_wrapped(ddp, backend):
    res = ddp.run(allreduce_on_the_process_group, backend)
    res.assert_all_ok()
    assert res.values == ["counted"]


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo", "cpu:gloo,cuda:gloo",
                                     f"cpu:gloo,cuda:{OTHER_DEVICE_BACKEND}"])
@pytest.mark.ddp(world_size=2, fault=NEVER, timeout=20, allow_unfired=True)
def test_armed_group_looks_like_the_plain_one(ddp, backend):
    plain = ddp.run(what_a_group_looks_like, backend, faults=[])
    plain.assert_all_ok()
    armed = ddp.run(what_a_group_looks_like, backend)
    armed.assert_all_ok()
    assert _outcomes(armed) == _outcomes(plain)
    assert armed.values[0]["sum"] == 3.0


@pytest.mark.ddp(world_size=2, fault=NEVER, timeout=20, allow_unfired=True)
def test_another_backend_for_another_device_is_kept(ddp):
    backend = f"cpu:gloo,cuda:{OTHER_DEVICE_BACKEND}"
    res = ddp.run(what_a_group_looks_like, backend)
    res.assert_all_ok()
    assert f"cuda:{OTHER_DEVICE_BACKEND}" in res.values[0]["config"]
    assert "cpu:gloo" in res.values[0]["config"]


@pytest.mark.ddp(world_size=1, fault="crash_rank(rank=0, at=all_reduce#1)", timeout=20)
def test_a_group_left_to_torch_still_counts_the_python_calls(ddp):
    # not wrapped (another backend for cuda): an op from C++ is not seen, dist.all_reduce is
    backend = f"cpu:gloo,cuda:{OTHER_DEVICE_BACKEND}"
    res = ddp.run(allreduce_on_the_process_group, backend, allow_unfired=True)  # not counted: never fires
    res.assert_all_ok()
    assert res.values == ["not counted"] and len(res.unfired) == 1
    res = ddp.run(what_a_group_looks_like, backend)
    assert res[0].raised(RuntimeError, match=INJECTED), res.summary()
    assert [str(e) for e in res.fault_events] and res.fault_events[0].trigger == "all_reduce#1"
