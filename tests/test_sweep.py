"""Sweeps (``ddp.sweep``, ``sweep_group``): every point of a real fault-free run tried with a
fault, each run judged against the reference. Real ranks, real gloo; small groups and few
ops so that a sweep of a dozen runs takes seconds."""
from __future__ import annotations

import datetime
import os
import re

import pytest
import torch
import torch.distributed as dist

import pytest_ddpfault
from pytest_ddpfault import SettingsError, SweepError, run_group, sweep_group
from pytest_ddpfault.sweep import first_difference, same_value

from _workloads import ddp_training
from test_timeline_browser import chromium, run_chromium  # noqa: F401  (a fixture)

PG = 3.0   # the process-group timeout (init under load included); a dead peer is seen at once anyway
ALL_REDUCES = 3


def _init() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=PG))


def _destroy_quietly() -> None:
    try:
        dist.destroy_process_group()
    except Exception:  # a group that lost a peer may fail to close; the value is what counts
        pass


def swallows_errors(n: int = ALL_REDUCES) -> float:
    """The bug: a failed all_reduce is ignored and the loop goes on with its stale tensor."""
    _init()
    t = torch.ones(1) * (dist.get_rank() + 1)
    for _ in range(n):
        try:
            dist.all_reduce(t)
        except RuntimeError:
            pass
    _destroy_quietly()
    return t.item()


def raises_errors(n: int = ALL_REDUCES) -> float:
    """The same loop without the bug: a failed all_reduce ends the rank with its error."""
    _init()
    t = torch.ones(1) * (dist.get_rank() + 1)
    for _ in range(n):
        dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


def mixed_ops() -> dict:
    """A few kinds of op and step marks, values in a container (tensors inside)."""
    _init()
    rank = dist.get_rank()
    t = torch.arange(3.0) + rank
    for _ in range(2):
        pytest_ddpfault.step()
        dist.all_reduce(t)
    dist.broadcast(t, src=0)
    dist.barrier()
    dist.destroy_process_group()
    return {"t": t, "rank": rank}


def fewer_ops_after_first(marker: str) -> float:
    """Not the same twice: the first run (the reference) does two all_reduces, later ones one."""
    _init()
    t = torch.ones(1)
    first = not os.path.exists(marker)
    dist.barrier()
    if first and dist.get_rank() == 0:
        open(marker, "w").close()
    for _ in range(2 if first else 1):
        dist.all_reduce(t)
    dist.destroy_process_group()
    return 1.0


# --- outcomes ----------------------------------------------------------------------------

@pytest.mark.ddp(world_size=3, timeout=20)
def test_a_swallowed_error_is_wrong_at_every_all_reduce_and_assert_never_names_them(ddp):
    sweep = ddp.sweep(swallows_errors, kinds=["kill_rank"])
    assert sweep.points == [f"all_reduce#{n}" for n in range(1, ALL_REDUCES + 1)]
    assert len(sweep) == 3 * ALL_REDUCES
    assert [r.outcome for r in sweep] == ["wrong"] * len(sweep), sweep.table()
    assert {(r.point, r.target) for r in sweep} == {(f"all_reduce#{n}", rank)
                                                    for n in range(1, ALL_REDUCES + 1) for rank in range(3)}
    with pytest.raises(AssertionError) as caught:
        sweep.assert_never("wrong")
    message = str(caught.value)
    assert f"{len(sweep)} of {len(sweep)} runs were wrong" in message
    for run in sweep:
        assert run.fault in message
    # the first differing value: a survivor's stale sum against the reference's 54
    assert re.search(r"rank \d returned \d+\.0, the reference 54\.0", message)
    assert "W  W  W" in sweep.table()


@pytest.mark.ddp(world_size=3, timeout=20)
def test_the_same_loop_without_the_bug_fails_loudly_everywhere(ddp):
    sweep = ddp.sweep(raises_errors, kinds=["kill_rank"], ranks=[0, 2])
    assert len(sweep) == 2 * ALL_REDUCES
    sweep.assert_all("failed")
    sweep.assert_never("wrong", "hung")
    assert set(sweep.by_outcome()) >= {"wrong", "hung", "failed", "recovered"}
    assert len(sweep.by_outcome()["failed"]) == len(sweep)
    for run in sweep:  # the killed rank is not judged: a survivor's error is the reason
        assert run.target not in (int(m) for m in re.findall(r"rank (\d)", run.why))
        assert "RuntimeError" in run.why


@pytest.mark.ddp(world_size=2, timeout=20)
def test_a_small_delay_is_recovered_everywhere(ddp):
    sweep = ddp.sweep(raises_errors, kinds=["delay(seconds=0.05)"])
    sweep.assert_all("recovered")
    assert {r.fault for r in sweep} == {f"delay(rank={rank}, at=all_reduce#{n}, seconds=0.05)"
                                        for rank in range(2) for n in range(1, ALL_REDUCES + 1)}
    for run in sweep:  # each fault fired where the sweep said
        [event] = run.result.fault_events
        assert (event.rank, event.trigger) == (run.target, run.point)


@pytest.mark.ddp(world_size=3, timeout=20)
def test_every_reported_spec_replays_to_the_same_outcome(ddp):
    sweep = ddp.sweep(swallows_errors, kinds=["kill_rank", "delay(seconds=0.05)"], ranks=[1])
    assert {r.outcome for r in sweep} == {"wrong", "recovered"}
    for run in sweep.runs[::2]:
        replay = ddp.run(swallows_errors, faults=run.fault)
        assert sweep.judge(replay) == run.outcome, (run.fault, replay.summary())


@pytest.mark.ddp(world_size=2, timeout=20)
def test_the_points_are_the_ops_and_steps_the_reference_logged(ddp):
    sweep = ddp.sweep(mixed_ops, kinds=["delay(seconds=0.01)"], ranks=[1], max_runs=1)
    logged = {f"{op.name}#{op.seq}" for r in sweep.reference for op in r.ops if op.name != "init"}
    logged |= {f"step#{s.seq}" for r in sweep.reference for s in r.steps}
    assert set(sweep.points) == logged
    assert set(sweep.points) == {"step#1", "step#2", "all_reduce#1", "all_reduce#2", "broadcast#1", "barrier#1"}
    assert sweep.points.index("step#1") < sweep.points.index("all_reduce#1") < sweep.points.index("step#2")
    assert len(sweep) == 1 and "1 runs of 6" in sweep.table()
    only = ddp.sweep(mixed_ops, kinds=["delay(seconds=0.01)"], ranks=[1], ops=["step", "broadcast"])
    assert only.points == ["step#1", "step#2", "broadcast#1"]
    assert [r.point for r in only] == only.points
    only.assert_all("recovered")


@pytest.mark.ddp(world_size=2, timeout=30)
def test_ddp_cxx_collectives_are_points_too(ddp):
    sweep = ddp.sweep(ddp_training, 2, kinds=["delay(seconds=0.01)"], ranks=[0], ops=["all_reduce", "broadcast"],
                      max_runs=2)
    cxx = {f"{op.name}#{op.seq}" for op in sweep.reference[0].ops
           if op.source == "c++" and op.name in ("all_reduce", "broadcast")}
    assert cxx and cxx <= set(sweep.points)
    assert len(sweep) == 2
    sweep.assert_all("recovered")


def test_max_runs_takes_an_even_spread_of_the_points():
    sweep = sweep_group(raises_errors, 6, world_size=2, kinds=["delay(seconds=0.01)"], ranks=[0], max_runs=3,
                        timeout=20)
    assert [r.point for r in sweep] == ["all_reduce#1", "all_reduce#4", "all_reduce#6"]
    assert sweep.planned == 6 and len(sweep) == 3
    assert "3 runs of 6" in sweep.table() and sweep.table().count(" -") >= 3


def test_a_fault_that_did_not_fire_is_an_error_of_the_sweep(tmp_path):
    with pytest.raises(SweepError, match=r"1 of 2 faults never fired") as caught:
        sweep_group(fewer_ops_after_first, str(tmp_path / "seen"), world_size=2, kinds=["delay(seconds=0.01)"],
                    ranks=[1], ops=["all_reduce"], timeout=20)
    sweep = caught.value.sweep
    assert [r.outcome for r in sweep] == ["recovered", "unfired"]
    assert "delay(rank=1, at=all_reduce#2, seconds=0.01)" in str(caught.value)
    assert "!" in sweep.table()


def test_a_reference_that_fails_is_an_error_that_shows_its_table():
    with pytest.raises(SweepError, match=r"(?s)reference run of raises_errors.*rank\s+status"):
        sweep_group(raises_errors, "three", world_size=2, timeout=20)


# --- the picture --------------------------------------------------------------------------

def test_the_html_links_each_cell_to_its_runs_timeline(tmp_path):
    sweep = sweep_group(swallows_errors, 2, world_size=3, kinds=["kill_rank"], ranks=[0, 2], timeout=20)
    page = sweep.html(tmp_path / "sweep.html")
    text = open(page).read()
    assert text.count('<td class="cell ') == len(sweep) == 4
    links = re.findall(r'<a href="(sweep\.runs/run\d+\.html)">', text)
    assert len(links) == len(sweep)
    for link in links:
        assert (tmp_path / link).is_file()
    assert (tmp_path / "sweep.runs" / "reference.html").is_file()
    for run in sweep:
        assert f'data-fault="{run.fault}"' in text


@pytest.mark.skipif(os.environ.get("DDPFAULT_REQUIRE_BROWSER") != "1",
                    reason="headless Chromium check: set DDPFAULT_REQUIRE_BROWSER=1 (CI does)")
def test_the_html_opens_in_chromium_with_one_cell_per_run(chromium, tmp_path):  # noqa: F811
    sweep = sweep_group(raises_errors, 2, world_size=2, kinds=["kill_rank", "delay(seconds=0.01)"], ranks=[1],
                        timeout=20)
    page = sweep.html(tmp_path / "sweep.html")
    done = run_chromium(chromium, tmp_path / "profile", "--dump-dom", f"file://{page}")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert dom.count('<td class="cell ') == len(sweep) == 4
    assert dom.count('data-outcome="failed"') == 2 and dom.count('data-outcome="recovered"') == 2


# --- the report under pytest ----------------------------------------------------------------

def test_a_failing_sweeps_report_carries_the_matrix_and_its_page(pytester):
    pytester.makepyfile(test_it=f"""
        import datetime, pytest, torch, torch.distributed as dist

        def swallows():
            dist.init_process_group("gloo", timeout=datetime.timedelta(seconds={PG}))
            t = torch.ones(1) * (dist.get_rank() + 1)
            try:
                dist.all_reduce(t)
            except RuntimeError:
                pass
            try:
                dist.destroy_process_group()
            except Exception:
                pass
            return t.item()

        @pytest.mark.ddp(world_size=2, timeout=20)
        def test_sweep(ddp):
            sweep = ddp.sweep(swallows, kinds=["kill_rank"], ranks=[1])
            assert len(sweep) == 1   # fails after the sweep: the report shows its matrix
            assert sweep.runs[0].outcome == "recovered"
    """)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", f"--ddp-timeline={pytester.path / 'tl'}")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "ddp sweep" in out and "all_reduce#1  W" in out
    pages = list((pytester.path / "tl").glob("*-sweep.html"))
    assert len(pages) == 1 and "kill_rank(rank=1, at=all_reduce#1)" in pages[0].read_text()


# --- bad inputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"kinds": ["nope"]}, r"unknown fault kind 'nope'"),
    ({"kinds": []}, r"kinds=\[\]: name at least one fault kind"),
    ({"kinds": ["kill_rank(rank=1)"]}, r"gives rank=; the sweep sets it"),
    ({"kinds": ["delay(at=step#1)"]}, r"gives at=; the sweep sets it"),
    ({"kinds": ["store_down"]}, r"store_down cannot fire at a point of the run"),
    ({"kinds": ["port_collision"]}, r"port_collision cannot fire at a point"),
    ({"ranks": [5]}, r"ranks=\[5\]: 5 is not a rank of the group; allowed 0..1"),
    ({"ranks": []}, r"ranks=\[\]: name at least one rank"),
    ({"nodes": [0]}, r"nodes=\[0\]: none of the kinds takes a node"),
    ({"kinds": ["kill_node"]}, r"kill_node on node 0 targets every rank of the group"),
    ({"ops": ["allreduce"]}, r"ops: 'allreduce' is not an op \(did you mean 'all_reduce'\?\)"),
    ({"max_runs": 0}, r"max_runs=0: expected a whole number >= 1"),
    ({"compare": 3}, r"compare=3: expected a function"),
    ({"timeout": -1}, r"timeout -1 from ddp.sweep\(timeout=...\)"),
])
def test_bad_input_is_refused_before_any_rank_starts(ddp, options, message):
    with pytest.raises(SettingsError, match=message):
        ddp.sweep(raises_errors, **options)
    assert ddp.results == [] and ddp.sweeps == []


def test_a_keyword_of_the_sweep_that_fn_takes_too_is_refused(ddp):
    def takes_ranks(ranks=None):
        return ranks

    with pytest.raises(SettingsError, match=r"ddp.sweep\(ranks=\[0\]\): takes_ranks\(\) takes a parameter 'ranks'"):
        ddp.sweep(takes_ranks, ranks=[0])


def test_an_op_the_reference_never_reached_is_named():
    with pytest.raises(SettingsError, match=r"reached no point to sweep named by ops=\['save'\].*all_reduce"):
        sweep_group(raises_errors, 1, world_size=2, ops=["save"], timeout=20)


# --- comparing values ----------------------------------------------------------------------------

def test_values_are_compared_exactly_tensors_and_containers_too():
    assert same_value({"a": [torch.ones(2), 1.0]}, {"a": [torch.ones(2), 1.0]})
    assert first_difference({"a": [torch.ones(2), 1.0]}, {"a": [torch.ones(2) + 1e-7, 1.0]})[0] == "['a'][0]"
    assert not same_value(torch.ones(2), torch.ones(2, dtype=torch.float64))
    assert not same_value(torch.ones(2), torch.ones(1, 2))
    assert not same_value((1, 2), [1, 2])
    assert not same_value(1, 1.0)
    assert same_value(float("nan"), float("nan"))
    assert first_difference([1, 2, 3], [1, 2, 4]) == ("[2]", 3, 4)


def test_a_custom_compare_decides(ddp):
    def stale_is_fine(ref, got):
        return True

    sweep = ddp.sweep(swallows_errors, 1, kinds=["kill_rank"], ranks=[1], compare=stale_is_fine)
    sweep.assert_all("recovered")


# --- targets, by what each kind takes ------------------------------------------------------------

def test_each_kind_is_moved_over_what_it_takes():
    from pytest_ddpfault.sweep import _columns, _kind_list

    def targets(kinds, world_size, nodes, ranks=None, target_nodes=None):
        return [(c.kind, c.key, c.target) for c in _columns(_kind_list(kinds), ranks, target_nodes, world_size, nodes)]

    assert targets(["kill_rank"], 3, 1) == [("kill_rank", "rank", r) for r in range(3)]
    assert targets(["kill_rank"], 3, 1, ranks=[2]) == [("kill_rank", "rank", 2)]
    assert targets(["kill_node"], 4, 2) == [("kill_node", "node", 0), ("kill_node", "node", 1)]
    assert targets(["partition(mode=reject)"], 4, 2) == [("partition(mode=reject)", "nodes", (n,)) for n in (0, 1)]
    assert targets(["latency(latency=20)"], 3, 1) == [("latency(latency=20)", "ranks", (r,)) for r in range(3)]
    assert targets(["partition"], 4, 2, ranks=[3]) == [("partition", "ranks", (3,))]
    assert targets(["partition(ranks=(0, 1))"], 4, 1) == [("partition(ranks=(0, 1))", "", None)]


def node_loop(n: int = 1) -> float:
    return raises_errors(n)


def test_node_kinds_and_scoped_network_kinds_on_virtual_nodes():
    sweep = sweep_group(node_loop, world_size=2, nodes=2, kinds=["kill_node", "partition(mode=reject, duration=0.5)"],
                        timeout=20)
    assert [(r.fault, r.outcome) for r in sweep] == [
        ("kill_node(node=0, at=all_reduce#1)", "failed"), ("kill_node(node=1, at=all_reduce#1)", "failed"),
        ("partition(nodes=(0,), at=all_reduce#1, mode=reject, duration=0.5)", "failed"),
        ("partition(nodes=(1,), at=all_reduce#1, mode=reject, duration=0.5)", "failed")]
    for run in sweep:  # a node kind's node is not judged; a partition targets no rank: both are
        judged = {r.rank for r in run.result if r.rank not in run.result.faulted_ranks}
        assert judged == ({1 - run.target} if run.kind == "kill_node" else {0, 1})
