"""The pytest side: marker, options, collection errors, failure reports, start methods
and pytest-xdist, through ``pytester``.

In-process ``pytester.runpytest()`` reuses this process's warm zygote and is fast; a
subprocess run (a fresh interpreter importing torch) is used only where a separate
process is the point.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

MARKER_LINE = ("@pytest.mark.ddp(world_size, nodes=1, fault=None, timeout=60.0, backend='gloo', proxy=False, "
               "allow_unfired=False)")

ALLREDUCE = '''
import os

import pytest


def allreduce_once():
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()
'''


def _sections(text: str, header: str) -> dict[str, str]:
    """Split pytest's output into ``{name: body}`` at lines like ``____ <header> name ____``."""
    parts = re.split(rf"^_+ {header}(\S+) _+$", text, flags=re.M)
    return {name: body for name, body in zip(parts[1::2], parts[2::2])}


# -- loading ------------------------------------------------------------------------
def test_markers_lists_the_ddp_marker_with_its_signature(pytester):
    result = pytester.runpytest("--markers")
    assert result.ret == 0
    result.stdout.fnmatch_lines([f"{MARKER_LINE}:*"])


def test_importing_the_plugin_does_not_import_torch():
    code = ("import sys, pytest_ddpfault, pytest_ddpfault.plugin; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'cloudpickle'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_session_without_ddp_tests_starts_no_zygote(pytester):
    pytester.makepyfile(test_plain='''
        import sys

        def test_plain():
            assert "torch" not in sys.modules
            assert "pytest_ddpfault.parent.launcher" not in sys.modules
    ''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


# -- marker validation: found at collection, each fails its own test --------------------------------------------------
BAD_MARKERS = {
    "ws_zero": ("world_size=0", "world_size 0"),
    "ws_negative": ("world_size=-1", "world_size -1"),
    "ws_string": ('world_size="4"', "world_size '4'"),
    "ws_positional_zero": ("0", "world_size 0"),
    "unknown_keyword": ("world_size=2, retries=3", "unknown keyword 'retries'"),
    "timeout_zero": ("world_size=2, timeout=0", "timeout 0"),
    "timeout_string": ('world_size=2, timeout="x"', "timeout 'x'"),
    "timeout_negative": ("world_size=2, timeout=-1", "timeout -1"),
    "unknown_kind": ('world_size=4, fault="kil_rank"', "'kil_rank'"),
    "unparsable": ('world_size=4, fault="kill_rank(rank="', "'kill_rank(rank='"),
    "rank_outside": ('world_size=4, fault="kill_rank(rank=4)"', "rank 4"),
    "nodes_not_dividing": ("world_size=4, nodes=3", "nodes 3"),
    "node_outside": ('world_size=4, nodes=2, fault="kill_node(node=2)"', "node 2 is outside"),
    "allow_unfired_string": ('world_size=2, allow_unfired="yes"', "allow_unfired 'yes' from marker"),
    "partition_node_without_nodes": ('world_size=4, fault="partition(nodes=(1,))"', "add nodes=2 to the marker"),
}


def test_each_bad_marker_fails_its_own_test_naming_test_and_value(pytester):
    # all in one file, with a good test among them: one run reports every mistake
    tests = "\n".join(f'''
@pytest.mark.ddp({args})
def test_{name}(ddp):
    pass
''' for name, (args, _) in BAD_MARKERS.items())
    pytester.makepyfile(test_markers=f'''
import pytest
{tests}

@pytest.mark.ddp(world_size=2, fault="kill_rank(rank=1)", timeout=5)
def test_good(ddp):
    pass
''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=len(BAD_MARKERS))
    errors = _sections(result.stdout.str(), "ERROR at setup of ")
    assert set(errors) == {f"test_{name}" for name in BAD_MARKERS}, result.stdout.str()
    for name, (_, bad) in BAD_MARKERS.items():
        body = errors[f"test_{name}"]
        assert f"test_markers.py::test_{name}" in body, body
        assert bad in body, f"{name}: {bad!r} not in {body!r}"
        assert "Traceback" not in body and "plugin.py" not in body, body
    assert "kill_rank" in errors["test_unknown_kind"]  # suggests the nearest kind


def test_bad_markers_are_listed_at_collection(pytester):
    pytester.makepyfile(test_two='''
        import pytest

        @pytest.mark.ddp(world_size=0)
        def test_a(ddp):
            pass

        @pytest.mark.ddp(world_size=2, fault="kil_rank")
        def test_b(ddp):
            pass
    ''')
    result = pytester.runpytest("--collect-only", "-p", "no:cacheprovider")
    assert result.ret == 0
    result.stdout.fnmatch_lines(["*2 test(s) with a bad @pytest.mark.ddp*",
                                 "*test_two.py::test_a: world_size 0*",
                                 "*test_two.py::test_b: fault 'kil_rank'*"])


def test_a_bad_fault_in_a_class_method_names_the_method(pytester):
    pytester.makepyfile(test_cls='''
        import pytest

        class TestGroup:
            @pytest.mark.ddp(world_size=2, fault="crash_rank(rank=2)")
            def test_m(self, ddp):
                pass
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*test_cls.py::TestGroup::test_m*rank 2*"])


# -- options ---------------------------------------------------------------------------
def test_ddp_timeout_option_sets_the_default_deadline(pytester):
    pytester.makepyfile(test_sleep='''
        import threading

        def sleep_forever():
            threading.Event().wait()

        def test_sleep(ddp):
            assert ddp.timeout == 1.5
            res = ddp.run(sleep_forever)
            assert [r.status for r in res] == ["hung", "hung"]
            assert 1.5 <= res.duration < 4
            assert all("sleep_forever" in r.stack for r in res)
    ''')
    start = time.monotonic()
    result = pytester.runpytest("--ddp-timeout=1.5", "-p", "no:cacheprovider")
    assert time.monotonic() - start < 10
    result.assert_outcomes(passed=1)


def test_timeout_precedence_ini_env_cli_marker(pytester, monkeypatch):
    pytester.makeini("[pytest]\nddp_timeout = 7\n")
    pytester.makepyfile(test_t='''
        import os
        import pytest

        def test_default(ddp):
            assert ddp.timeout == float(os.environ["EXPECTED_TIMEOUT"])

        @pytest.mark.ddp(world_size=2, timeout=2)
        def test_marker_wins(ddp):
            assert ddp.timeout == 2.0
    ''')
    for expected, env, cli in [("7", None, ()), ("5", "5", ()), ("3", "5", ("--ddp-timeout", "3"))]:
        monkeypatch.setenv("EXPECTED_TIMEOUT", expected)
        if env is None:
            monkeypatch.delenv("DDPFAULT_TIMEOUT", raising=False)
        else:
            monkeypatch.setenv("DDPFAULT_TIMEOUT", env)
        result = pytester.runpytest(*cli, "-p", "no:cacheprovider")
        result.assert_outcomes(passed=2)


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_bad_ddp_timeout_is_a_usage_error_naming_the_option(pytester, value):
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest(f"--ddp-timeout={value}", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*timeout '{value}' from --ddp-timeout*"])


def test_bad_start_method_is_a_usage_error(pytester):
    result = pytester.runpytest("--ddp-start-method=fork", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--ddp-start-method*fork*"])


def test_bad_preload_module_is_a_clear_error(pytester):
    pytester.makepyfile(test_p=ALLREDUCE + '''

def test_run(ddp):
    ddp.run(allreduce_once)
''')
    # a module that cannot exist: a usage error before anything starts
    result = pytester.runpytest_subprocess("--ddp-preload=no_such_module_ddpf", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*preload module 'no_such_module_ddpf' from --ddp-preload: no module named*"])
    # a submodule that fails to import is found by the zygote: the run says which and why
    result = pytester.runpytest_subprocess("--ddp-preload=json.no_such_sub_ddpf", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "--ddp-preload" in out
    assert "json.no_such_sub_ddpf" in out
    assert "ModuleNotFoundError" in out


def test_spawn_start_method_runs_a_group(pytester):
    pytester.makepyfile(test_spawn=ALLREDUCE + '''

def spawned():
    return allreduce_once(), os.getppid()


@pytest.mark.ddp(world_size=2, timeout=120)
def test_spawned(ddp):
    assert ddp.start_method == "spawn"
    res = ddp.run(spawned)
    res.assert_all_ok()
    # spawned by this very process, not forked by a zygote
    assert res.values == [(3.0, os.getpid()), (3.0, os.getpid())]
''')
    result = pytester.runpytest("--ddp-start-method", "spawn", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


# -- what a failing test shows ---------------------------------------------------------
def test_failure_report_shows_the_rank_table_and_stacks(pytester):
    pytester.makepyfile(test_fail='''
        import os
        import threading

        import pytest


        def rank1_sleeps():
            if os.environ["RANK"] == "1":
                threading.Event().wait()
            return "fine"


        def rank0_raises():
            if os.environ["RANK"] == "0":
                raise KeyError("no such key")
            return "fine"


        @pytest.mark.ddp(world_size=2, timeout=1.5)
        def test_assert_all_ok(ddp):
            ddp.run(rank1_sleeps).assert_all_ok()


        @pytest.mark.ddp(world_size=2, timeout=1.5)
        def test_plain_assert(ddp):
            res = ddp.run(rank1_sleeps)
            assert res.ok


        @pytest.mark.ddp(world_size=2)
        def test_two_runs(ddp):
            ddp.run(rank0_raises)
            ddp.run(rank0_raises)
            assert False, "after two runs"


        def test_passing_runs_add_nothing(ddp):
            assert ddp.run(rank0_raises)[1].value == "fine"
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=3, passed=1)
    failures = _sections(result.stdout.str(), "")
    assert set(failures) == {"test_assert_all_ok", "test_plain_assert", "test_two_runs"}

    table = (r"rank\s+status\s+time\s+what happened\n(E\s+)?0\s+ok\s+\S+\s+returned 'fine'\n"
             r"(E\s+)?1\s+hung\s+\S+\s+still running at the harness deadline")
    own = failures["test_assert_all_ok"]
    assert re.search(table, own), own
    assert "in rank1_sleeps" in own          # the hung rank's stack
    assert "- ddp ranks -" not in own        # the assertion already shows the table

    plain = failures["test_plain_assert"]
    assert re.search(r"-+ ddp ranks -+", plain), plain
    assert re.search(table, plain)
    assert "in rank1_sleeps" in plain

    two = failures["test_two_runs"]
    assert "ddp ranks (run 1 of 2)" in two and "ddp ranks (run 2 of 2)" in two
    assert "KeyError: 'no such key'" in two


# -- where fn comes from ----------------------------------------------------------------
def test_functions_and_exceptions_from_a_test_file_under_importlib_mode(pytester):
    pytester.makepyfile(test_imported='''
        import os

        import pytest

        FACTOR = 2


        class FileLocalError(LookupError):
            pass


        def helper(x):
            return x * FACTOR


        def local_fn(x):
            if os.environ["RANK"] == "1":
                raise FileLocalError(f"rank 1 got {x}")
            return helper(x)


        @pytest.mark.ddp(world_size=2)
        def test_from_this_file(ddp):
            res = ddp.run(local_fn, 21)
            assert res[0].status == "ok" and res[0].value == 42
            r = res[1]
            assert r.status == "raised", res.report()
            assert r.message == "rank 1 got 21"
            assert r.exc_type.endswith("FileLocalError")
            assert r.raised(FileLocalError) and r.raised(LookupError) and not r.raised(ValueError)
            assert isinstance(r.exc, FileLocalError)
            assert res.values == [42, None]
    ''')
    result = pytester.runpytest("--import-mode=importlib", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


# -- pytest-xdist -------------------------------------------------------------------------
def test_xdist_workers_never_collide(pytester):
    pytester.makepyfile(test_many=ALLREDUCE + '''

@pytest.mark.parametrize("i", range(16))
@pytest.mark.ddp(world_size=4)
def test_group(ddp, i):
    res = ddp.run(allreduce_once)
    res.assert_all_ok()
    assert res.values == [10.0] * 4
''')
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=16)
    assert result.ret == 0


# -- what the terminal says --------------------------------------------------------------
def test_help_names_the_environment_variables_and_defaults(pytester):
    result = pytester.runpytest("--help")
    out = result.stdout.str()
    for name in ("DDPFAULT_TIMEOUT", "DDPFAULT_START_METHOD", "DDPFAULT_PRELOAD", "DDPFAULT_MAX_PROCS",
                 "TOXIPROXY_URL", "DDPFAULT_PLAN", "DDPFAULT_SHOW_INTERNAL_FRAMES"):
        assert name in out, name
    assert "default max(8, 4 x CPUs)" in " ".join(out.split())


def test_the_session_says_where_the_zygote_start_went(pytester):
    pytester.makepyfile(test_one='''
        import pytest

        @pytest.mark.ddp(world_size=2)
        def test_it(ddp):
            ddp.run(int).assert_all_ok()
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["ddpfault: ranks fork from a warm zygote*first ddp test's duration*",
                                 "pytest-ddpfault: the rank zygote started in * s*"])


def test_internal_frames_option_shows_the_harness_frames(pytester, monkeypatch):
    pytester.makepyfile(test_one='''
        import os
        import pytest

        def crash():
            raise ValueError("mine")

        @pytest.mark.ddp(world_size=1)
        def test_it(ddp):
            res = ddp.run(crash)
            assert res[0].raised(ValueError)
            shown = "pytest_ddpfault" in res[0].traceback
            assert shown == (os.environ["EXPECT_INTERNAL"] == "1"), res[0].traceback
    ''')
    monkeypatch.setenv("EXPECT_INTERNAL", "0")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    monkeypatch.setenv("EXPECT_INTERNAL", "1")  # a subprocess: the option sets its environment
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "--ddp-show-internal-frames").assert_outcomes(passed=1)
