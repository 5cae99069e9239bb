"""issue 20 §1 and §3: a green test means the fault happened, and no argument vanishes.

§1: under pytest, a ``ddp.run`` / ``ddp.torchrun`` whose plan had a fault that never fired
fails the test at the ``ddp`` fixture's teardown (after the body's own asserts), naming each
unfired fault and why; ``allow_unfired=True`` (marker or call) keeps today's warning.
``run_group``, ``run_torchrun`` and ``run_script`` (no pytest) warn and return ``.unfired``.

§3: a keyword that ``ddp.run`` takes for itself and ``fn`` takes too (``timeout=``...) would
never reach ``fn``; ``fault=`` that ``fn`` does not take is a typo of ``faults=``. Both are
refused before any rank starts.
"""
from __future__ import annotations

import functools
import inspect
import re

import pytest

import pytest_ddpfault
from pytest_ddpfault.launchers.torchrun import run_script
from pytest_ddpfault.settings import SettingsError, check_run_keywords

from _helpers import assert_nothing_left
from test_first_contact import allreduce_once_no_steps

# the pytester files below define the same function in their own module
NO_STEPS = "import pytest\n\nimport pytest_ddpfault\n\n\n" + inspect.getsource(allreduce_once_no_steps)
HANG_AT_STEP_3 = "hang_rank(rank=1, at=step#3)"
WHY_STEP_3 = ("hang_rank(rank=1, at=step#3) never fired: the trigger step#3 never came in rank 1, which returned "
              "first: pytest_ddpfault.step() was called 0 times, at=step#3 needs 3")


def _sections(text: str, header: str) -> dict[str, str]:
    parts = re.split(rf"^_+ {header}(\S+) _+$", text, flags=re.M)
    return {name: body.split("\n===")[0] for name, body in zip(parts[1::2], parts[2::2])}


# -- §1 under pytest ----------------------------------------------------------------------------
def test_an_unfired_fault_fails_at_teardown_after_the_body_and_can_be_allowed(pytester):
    pytester.makepyfile(test_u=NO_STEPS + f'''
ORDER = []


@pytest.mark.ddp(world_size=2, fault="{HANG_AT_STEP_3}", timeout=20)
def test_unfired(ddp):
    res = ddp.run(allreduce_once_no_steps)
    res.assert_all_ok()
    ORDER.append("body done")


def test_the_body_ran_to_its_end_first():
    assert ORDER == ["body done"]


@pytest.mark.ddp(world_size=2, fault="{HANG_AT_STEP_3}", timeout=20)
def test_body_fails_too(ddp):
    ddp.run(allreduce_once_no_steps)
    assert 1 == 2, "the body's own assert"


@pytest.mark.ddp(world_size=2, fault="{HANG_AT_STEP_3}", timeout=20, allow_unfired=True)
def test_marker_allows(ddp):
    with pytest.warns(pytest_ddpfault.UnfiredFaultWarning, match=r"hang_rank\\(rank=1, at=step#3\\) never fired"):
        ddp.run(allreduce_once_no_steps).assert_all_ok()


@pytest.mark.ddp(world_size=2, fault="{HANG_AT_STEP_3}", timeout=20)
def test_call_allows(ddp):
    with pytest.warns(pytest_ddpfault.UnfiredFaultWarning, match=r"hang_rank\\(rank=1, at=step#3\\)"):
        ddp.run(allreduce_once_no_steps, allow_unfired=True).assert_all_ok()


@pytest.mark.ddp(world_size=2, timeout=20, allow_unfired=True)
def test_call_overrides_the_marker(ddp):
    ddp.run(allreduce_once_no_steps, faults="delay(rank=0, at=all_reduce#1, seconds=0.01)", allow_unfired=False)
    ddp.run(allreduce_once_no_steps, faults="kill_rank(rank=0, at=all_reduce#2)", allow_unfired=False)
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    out = result.stdout.str()
    result.assert_outcomes(passed=5, failed=1, errors=3)
    errors = _sections(out, "ERROR at teardown of ")
    assert set(errors) == {"test_unfired", "test_body_fails_too", "test_call_overrides_the_marker"}, out
    body = errors["test_unfired"]
    assert "ddp.run (run 1 of this test at test_u.py:" in body and WHY_STEP_3 in body, body
    assert "allow_unfired=True" in body and "Traceback" not in body and "plugin.py" not in body, body
    # the body's own failure is reported as such; the unfired fault beside it
    failures = _sections(out, "")
    assert "the body's own assert" in failures["test_body_fails_too"], out
    assert WHY_STEP_3 in errors["test_body_fails_too"], out
    # only the run that did not fire is named (the first one fired)
    third = errors["test_call_overrides_the_marker"]
    assert "run 2 of this test" in third and "run 1 of" not in third, third
    assert "kill_rank(rank=0, at=all_reduce#2) never fired" in third and "delay" not in third, third


def test_ddp_torchrun_fails_on_a_fault_that_never_fired(pytester, tmp_path):
    """issue 20 §6: a script that never calls all_reduce, with kill_rank at all_reduce#1,
    exited 0 silently."""
    script = tmp_path / "no_collectives.py"
    script.write_text("import torch.distributed  # arms the worker\nprint('no collective here')\n")
    pytester.makepyfile(test_t=f'''
import pytest
import pytest_ddpfault

SCRIPT = {str(script)!r}


@pytest.mark.ddp(world_size=2, timeout=120)
def test_not_allowed(ddp):
    res = ddp.torchrun(SCRIPT, faults="kill_rank(rank=1, at=all_reduce#1)")
    res.assert_ok()


@pytest.mark.ddp(world_size=2, timeout=120)
def test_allowed(ddp):
    with pytest.warns(pytest_ddpfault.UnfiredFaultWarning, match=r"kill_rank\\(rank=1, at=all_reduce#1\\)"):
        ddp.torchrun(SCRIPT, faults="kill_rank(rank=1, at=all_reduce#1)", allow_unfired=True).assert_ok()
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    out = result.stdout.str()
    result.assert_outcomes(passed=2, errors=1)
    body = _sections(out, "ERROR at teardown of ")["test_not_allowed"]
    assert "ddp.torchrun (run 1 of this test at test_t.py:" in body, body
    assert "kill_rank(rank=1, at=all_reduce#1) in attempt 0 never fired: " in body, body


# -- §1 without pytest's fixture ------------------------------------------------------------------
def test_run_group_warns_and_returns_what_did_not_fire():
    with pytest.warns(pytest_ddpfault.UnfiredFaultWarning) as caught:
        res = pytest_ddpfault.run_group(allreduce_once_no_steps, world_size=2, timeout=20, faults=HANG_AT_STEP_3)
    res.assert_all_ok()
    [unfired] = res.unfired
    assert (unfired.spec, unfired.rank) == (HANG_AT_STEP_3, 1)
    [warning] = caught
    assert WHY_STEP_3 in str(warning.message)
    assert warning.filename == __file__  # attributed to the line that called run_group


def test_run_script_warns_of_a_fault_that_never_fired(tmp_path):
    script = tmp_path / "plain.py"
    script.write_text("import sys\nimport torch.distributed as dist\n"
                      "dist.init_process_group('gloo', init_method='file://' + sys.argv[1], rank=0, world_size=1)\n"
                      "dist.barrier()\ndist.destroy_process_group()\n")
    with pytest.warns(pytest_ddpfault.UnfiredFaultWarning,
                      match=r"kill_rank\(rank=0, at=all_reduce#1\) in attempt 0 never fired: .*all_reduce was "
                            r"called 0 times"):
        res = run_script(script, tmp_path / "init", faults="kill_rank(rank=0, at=all_reduce#1)", timeout=60)
    res.assert_ok()
    assert [u.spec for u in res.unfired] == ["kill_rank(rank=0, at=all_reduce#1)"]
    assert_nothing_left(res)


# -- §3 arguments never vanish ---------------------------------------------------------------------
def train(steps, timeout=30.0, *, init=None):
    return steps


def train_any(steps, **options):
    return steps


@pytest.mark.parametrize("keyword", ["timeout", "init"])
def test_a_run_keyword_that_fn_also_takes_is_refused_with_the_way_out(keyword):
    with pytest.raises(SettingsError) as err:
        check_run_keywords(train, (3,), {}, {keyword: 5.0}, "ddp.run")
    assert str(err.value) == (
        f"ddp.run({keyword}=5.0): train() takes a parameter {keyword!r} too, but {keyword}= is ddp.run's own and "
        f"would never reach it (train would get its default). To give it to train: "
        f"ddp.run(functools.partial(train, {keyword}=5.0), ...); to keep both, bind train's with "
        f"functools.partial and pass ddp.run's {keyword}= beside it")


def test_a_required_parameter_of_the_same_name_is_refused_too():
    with pytest.raises(SettingsError, match=r"\(needs_faults would be called without it\)"):
        check_run_keywords(needs_faults, (), {}, {"faults": "kill_rank"}, "ddp.run")


def needs_faults(faults):
    return faults


def test_what_fn_gets_otherwise_is_not_refused():
    check_run_keywords(train, (3,), {}, {"faults": "kill_rank", "allow_unfired": True}, "ddp.run")
    check_run_keywords(functools.partial(train, timeout=5.0), (3,), {}, {"timeout": 9.0}, "ddp.run")
    check_run_keywords(train, (3, 5.0), {}, {"timeout": 9.0}, "ddp.run")   # fn's comes positionally
    check_run_keywords(train_any, (3,), {"fault": 1}, {"timeout": 9.0}, "ddp.run")  # **options: fn's own
    check_run_keywords(max, (1, 2), {"fault": 1}, {"timeout": 9.0}, "ddp.run")   # no signature: let through
    check_run_keywords(lambda fault: fault, (), {"fault": 1}, {}, "ddp.run")


def test_fault_singular_is_a_typo_of_faults():
    with pytest.raises(SettingsError, match=r"^ddp\.run\(fault='kill_rank'\): train\(\) takes no parameter "
                                            r"'fault'; did you mean faults= \(the run's fault plan\)\?$"):
        check_run_keywords(train, (3,), {"fault": "kill_rank"}, {}, "ddp.run")


@pytest.mark.ddp(world_size=2, timeout=20)
def test_ddp_run_and_torchrun_refuse_before_any_rank_starts(ddp):
    with pytest.raises(SettingsError, match=r"functools\.partial\(train, timeout=5\.0\)"):
        ddp.run(train, 3, timeout=5.0)
    with pytest.raises(SettingsError, match="did you mean faults="):
        ddp.run(train, 3, fault="kill_rank(rank=1)")
    with pytest.raises(SettingsError, match=r"^ddp\.torchrun\(fault='kill_rank'\): .*did you mean faults="):
        ddp.torchrun("no_such_module_ddpf", fault="kill_rank")
    with pytest.raises(SettingsError, match="allow_unfired 'yes' from ddp.run"):
        ddp.run(train, 3, allow_unfired="yes")
    assert ddp.results == []
