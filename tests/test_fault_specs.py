"""Fault specs: parse/format round trips, errors that say what to do, trigger counting.

Pure unit tests: no torch, no rank processes (a few tiny subprocesses show the in-rank
actions for real: a signal, os._exit, SIGSTOP).
"""
from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_ddpfault.faults import (
    CAPABILITIES, COLLECTIVE_OPS, FAULT_KIND_NAMES, KINDS, KNOWN_OPS, Fault, FaultSpecError,
    Trigger, TriggerCounter, faulted_ranks, format_plan, kinds_with, parse_plan, rank_faults,
    validate_plan,
)

REPO = Path(__file__).resolve().parents[1]


class ModuleLevelError(Exception):
    pass


# One spec per kind with every param given (canonical form), and one with none.
FULL_SPECS = {
    "kill_rank": "kill_rank(rank=2, at=all_reduce#3, signal=SIGTERM)",
    "kill_node": "kill_node(node=1, at=step#2, signal=SIGTERM)",
    "crash_rank": "crash_rank(rank=0, at=step#2, exc=ValueError, message='boom, (really); \"x\"')",
    "hang_rank": "hang_rank(rank=1, at=t=1.5, resume_after=2.0)",
    "delay": "delay(rank=0, at=send#1, seconds=0.25, every=true)",
    "torn_save": "torn_save(rank=1, at=save#2, fraction=0.25)",
    "io_error": "io_error(rank=0, at=load#1, errno=EDQUOT)",
    "slow_io": "slow_io(rank=1, at=save#3, seconds=2.5)",
    "port_collision": "port_collision(mode=bind, hold_for=0.5)",
    "store_down": "store_down(at=t=2.0)",
    "block_port": "block_port(at=t=0.5, duration=1.0)",
    "blackhole": "blackhole(at=init, timeout=100, stream=upstream, toxicity=0.5, duration=3.0)",
    "latency": "latency(at=t=0.0, latency=500, jitter=20, stream=downstream, toxicity=1.0, duration=2.5)",
    "bandwidth": "bandwidth(rate=10, stream=upstream)",
    "reset_peer": "reset_peer(timeout=50, toxicity=0.25)",
    "slow_close": "slow_close(delay=300)",
    "limit_data": "limit_data(bytes=1024, duration=0.1)",
    "partition": "partition(ranks=(2, 3), rank=3, at=step#3, mode=reject, duration=1.5, plane=data)",
    "misconfig": "misconfig(node=1, master_port=1)",
}


def test_every_kind_has_a_full_example():
    assert sorted(FULL_SPECS) == list(FAULT_KIND_NAMES)
    for name, spec in FULL_SPECS.items():
        assert Fault.parse(spec).kind == name


@pytest.mark.parametrize("kind", FAULT_KIND_NAMES)
def test_round_trip_without_params(kind):
    f = Fault(kind)
    assert str(f) == kind
    assert Fault.parse(str(f)) == f == Fault.parse(f"  {kind} ( ) ")
    assert f.params == {}


@pytest.mark.parametrize("kind", FAULT_KIND_NAMES)
def test_round_trip_with_params(kind):
    f = Fault.parse(FULL_SPECS[kind])
    assert str(f) == FULL_SPECS[kind]  # the examples are written canonically
    assert Fault.parse(str(f)) == f
    assert Fault(kind, **f.params) == f
    assert pickle.loads(pickle.dumps(f)) == f
    assert copy.deepcopy(f) == f


@pytest.mark.parametrize("spec, canonical", [
    ("  kill_rank ( rank = 2 ,at = t = 2 ) ", "kill_rank(rank=2, at=t=2.0)"),
    ("kill_rank(at=all_reduce)", "kill_rank(at=all_reduce#1)"),
    ("kill_rank(at=all_reduce # 3)", "kill_rank(at=all_reduce#3)"),
    ("kill_rank(signal=9)", "kill_rank(signal=SIGKILL)"),
    ("kill_rank(signal=term)", "kill_rank(signal=SIGTERM)"),
    ("kill_rank(signal=SIGIOT)", "kill_rank(signal=SIGABRT)"),
    ("kill_rank(signal=SIGTERM, rank=1)", "kill_rank(rank=1, signal=SIGTERM)"),
    ("kill_rank(rank='1', )", "kill_rank(rank=1)"),
    ("delay(every=YES, seconds=1)", "delay(seconds=1.0, every=true)"),
    ("delay(seconds=-0.0)", "delay(seconds=0.0)"),
    ("crash_rank(message=hello world)", "crash_rank(message='hello world')"),
    ("crash_rank(message=\"it's\")", "crash_rank(message=\"it's\")"),
    ("crash_rank(exc=torch.distributed.DistNetworkError)",
     "crash_rank(exc=torch.distributed.DistNetworkError)"),
    ("crash_rank(code=3, message='bye')", "crash_rank(message='bye', code=3)"),
    ("hang_rank(at=step)", "hang_rank(at=step#1)"),
    ("store_down(at=t=1e-3)", "store_down(at=t=0.001)"),
    ("latency(stream=upstream, latency=5)", "latency(latency=5, stream=upstream)"),
])
def test_normalised_form(spec, canonical):
    f = Fault.parse(spec)
    assert str(f) == canonical
    assert Fault.parse(canonical) == f


def test_python_construction_validates_and_normalises():
    by_python = Fault("kill_rank", rank=2, at="all_reduce#1", signal=signal.SIGTERM)
    assert by_python == Fault.parse("kill_rank(rank=2, at=all_reduce#1, signal=SIGTERM)")
    assert Fault("kill_rank", signal=15) == Fault("kill_rank", signal="SIGTERM")
    assert Fault("kill_rank", at=Trigger.parse("t=2")) == Fault.parse("kill_rank(at=t=2.0)")
    assert Fault("kill_rank", rank=None, at=None) == Fault("kill_rank")  # None = not given
    assert Fault("delay", seconds=2, every=True).params == {"seconds": 2.0, "every": True}
    assert str(Fault("crash_rank", exc=KeyError)) == "crash_rank(exc=KeyError)"
    custom = Fault("crash_rank", exc=ModuleLevelError)
    assert custom.get("exc") == f"{ModuleLevelError.__module__}.ModuleLevelError"
    assert Fault.parse(str(custom)) == custom


def test_accessors_and_defaults():
    f = Fault("kill_rank")
    assert (f.kind, f.rank, f.at) == ("kill_rank", None, None)
    assert f.get("signal") == "SIGKILL"
    assert f.resolved_rank(4) == 3 and f.resolved_rank(1) == 0
    assert f.resolved_at() == Trigger("op", op="collective", n=1)
    assert Fault("kill_rank", rank=1, at="barrier#2").resolved_rank(4) == 1
    crash = Fault("crash_rank")
    assert crash.get("exc") == "RuntimeError" and crash.get("code") is None
    assert crash.get("message") == "crash_rank injected by pytest-ddpfault"
    assert Fault("delay").get("seconds") == 1.0 and Fault("delay").get("every") is False
    assert str(Fault("store_down").resolved_at()) == "t=1.0"
    assert Fault("latency").resolved_at() == Trigger("init")
    assert Fault("latency").get("latency") == 1000 and Fault("latency").get("stream") == "downstream"
    pc = Fault("port_collision")
    assert (pc.resolved_at(), pc.resolved_rank(4), pc.get("mode")) == (None, None, "listen")
    assert f.definition is KINDS["kill_rank"]
    with pytest.raises(FaultSpecError, match=r"kill_rank does not take 'bogus'.*takes: rank, at, signal"):
        f.get("bogus")


def test_params_are_read_only_and_faults_immutable():
    f = Fault.parse("kill_rank(rank=1)")
    with pytest.raises(TypeError):
        f.params["rank"] = 2  # type: ignore[index]
    with pytest.raises(AttributeError):
        f.kind = "crash_rank"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del f.kind


def test_equality_and_hash():
    a = Fault.parse("kill_rank(rank=2, at=all_reduce#1)")
    b = Fault("kill_rank", at="all_reduce", rank=2)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Fault.parse("kill_rank(rank=1, at=all_reduce#1)")
    assert a != Fault.parse("crash_rank(rank=2, at=all_reduce#1)")
    assert a != "kill_rank(rank=2, at=all_reduce#1)"
    # explicit params are part of the value: same behaviour, different spec
    assert Fault("delay") != Fault("delay", seconds=1.0)
    assert repr(a) == "Fault.parse('kill_rank(rank=2, at=all_reduce#1)')"


# --- hypothesis: every valid fault round-trips ------------------------------------------

_POSITIVE = st.floats(min_value=0, exclude_min=True, allow_infinity=False)
_VALUES = {
    "rank": st.integers(0, 63),
    "node": st.integers(0, 63),
    "signal": st.sampled_from(list(signal.Signals)) | st.sampled_from(["SIGTERM", "usr1", "9"]),
    "exc": st.sampled_from(["RuntimeError", "KeyboardInterrupt", "torch.distributed.DistError",
                            ValueError, ModuleLevelError]),
    "message": st.text(),
    "code": st.integers(0, 255),
    "resume_after": _POSITIVE, "hold_for": _POSITIVE, "duration": _POSITIVE,
    "seconds": st.floats(min_value=0, allow_infinity=False),
    "every": st.booleans() | st.sampled_from(["true", "no"]),
    "agent_only": st.booleans() | st.sampled_from(["true", "no"]),
    "mode": st.sampled_from(["listen", "bind"]),
    "stream": st.sampled_from(["upstream", "downstream"]),
    "toxicity": st.floats(0, 1),
    "timeout": st.integers(0, 2**31), "latency": st.integers(0, 10**6),
    "jitter": st.integers(0, 10**6), "rate": st.integers(0, 10**9), "delay": st.integers(0, 10**6),
    "bytes": st.integers(0, 2**40),
    "fraction": st.floats(0, 1), "errno": st.sampled_from(["ENOSPC", "eio", "EROFS", "EDQUOT"]),
    "ranks": st.sets(st.integers(0, 64), min_size=1).map(tuple) | st.integers(0, 64) | st.just("(2, 3)"),
    "nodes": st.sets(st.integers(0, 8), min_size=1).map(sorted) | st.just("(1,)"),
    "plane": st.sampled_from(["all", "store", "data"]),
    "direction": st.sampled_from(["both", "out", "in"]),
    "world_size": st.integers(1, 10**4),
    "master_addr": st.sampled_from(["127.0.9.9", "127.255.0.1", "127.0.0.2"]),
    "master_port": st.integers(1, 65535),
}
_KIND_VALUES = {("partition", "mode"): st.sampled_from(["drop", "reject", "DROP"])}


def _triggers(forms):
    options = {
        "init": st.just("init"),
        "op": st.builds(lambda op, n: f"{op}#{n}", st.sampled_from(sorted(KNOWN_OPS)), st.integers(1, 10**6)),
        "step": st.integers(1, 10**6).map(lambda n: Trigger("step", n=n)),
        "time": st.floats(min_value=0, allow_infinity=False).map(lambda s: f"t={s}"),
        "save": st.integers(1, 10**6).map(lambda n: f"save#{n}"),
        "load": st.integers(1, 10**6).map(lambda n: Trigger("load", n=n)),
    }
    return st.one_of([options[f] for f in sorted(forms)])


@st.composite
def faults(draw):
    kind = KINDS[draw(st.sampled_from(FAULT_KIND_NAMES))]
    params = {}
    for key in kind.keys:
        if draw(st.booleans()):
            values = _KIND_VALUES.get((kind.name, key), _VALUES.get(key))
            params[key] = draw(_triggers(kind.trigger_forms) if key == "at" else values)
    if "exc" in params and "code" in params:  # crash_rank takes one of them
        del params[draw(st.sampled_from(["exc", "code"]))]
    wrong = [k for k in ("world_size", "master_addr", "master_port") if k in params]
    for key in wrong[1:]:  # misconfig sets one variable wrongly
        del params[key]
    if "rank" in params and "node" in params and "world_size" in kind.keys:  # misconfig: one rank or a node
        del params[draw(st.sampled_from(["rank", "node"]))]
    if "ranks" in kind.keys:  # a network kind: a scope (one of two) decides what else it takes
        if "ranks" in params and "nodes" in params:
            del params[draw(st.sampled_from(["ranks", "nodes"]))]
        in_rank = "at" in params and Trigger.parse(params["at"]).kind in ("op", "step")
        if "ranks" in params or "nodes" in params:
            params.pop("stream", None)
        else:
            params.pop("plane", None)
            params.pop("direction", None)
        if "ranks" in params or "nodes" in params:
            if not in_rank:
                params.pop("rank", None)
        else:
            params.pop("rank", None)
            if in_rank:
                del params["at"]
    return Fault(kind.name, **params)


@settings(max_examples=400, deadline=None)
@given(faults())
def test_every_fault_round_trips(f):
    spec = str(f)
    assert Fault.parse(spec) == f
    assert str(Fault.parse(spec)) == spec
    assert hash(Fault.parse(spec)) == hash(f)
    assert pickle.loads(pickle.dumps(f)) == f


@settings(max_examples=150, deadline=None)
@given(st.lists(faults(), max_size=5))
def test_every_plan_round_trips(plan):
    text = format_plan(plan)
    assert parse_plan(text) == tuple(plan)
    assert format_plan(parse_plan(text)) == text


# --- errors: each quotes the bad fragment and says what would be valid -----------------

@pytest.mark.parametrize("spec, expected", [
    ("kil_rank(rank=1)", ["unknown fault kind 'kil_rank'", "did you mean 'kill_rank'?",
                          "kinds: bandwidth, blackhole", "in fault spec 'kil_rank(rank=1)'"]),
    ("kill_rank(sig=9)", ["kill_rank does not take 'sig'", "did you mean 'signal'?",
                          "kill_rank takes: rank, at, signal"]),
    ("latency(jiter=3)", ["did you mean 'jitter'?", "latency takes: ranks, nodes, rank, at, latency, jitter, stream"]),
    ("kill_rank(rank=two)", ["bad value in 'rank=two'", "expected a whole number >= 0"]),
    ("kill_rank(rank=1.5)", ["bad value in 'rank=1.5'", "expected a whole number >= 0"]),
    ("delay(seconds=fast)", ["bad value in 'seconds=fast'", "a number of seconds >= 0"]),
    ("delay(seconds=-1)", ["bad value in 'seconds=-1'", "a number of seconds >= 0"]),
    ("delay(seconds=nan)", ["bad value in 'seconds=nan'"]),
    ("hang_rank(resume_after=0)", ["bad value in 'resume_after=0'", "a number of seconds > 0"]),
    ("delay(every=maybe)", ["bad value in 'every=maybe'", "expected one of true, false"]),
    ("latency(toxicity=1.5)", ["bad value in 'toxicity=1.5'", "from 0 to 1"]),
    ("latency(stream=upstram)", ["expected one of upstream, downstream", "did you mean 'upstream'?"]),
    ("crash_rank(code=256)", ["bad value in 'code=256'", "from 0 to 255"]),
    ("kill_rank(signal=SIGTRM)", ["bad value in 'signal=SIGTRM'", "signal name such as SIGTERM",
                                  "did you mean 'SIGTERM'?"]),
    ("kill_rank(signal=999)", ["bad value in 'signal=999'"]),
    ("crash_rank(exc=RuntimError)", ["bad value in 'exc=RuntimError'", "did you mean 'RuntimeError'?"]),
    ("crash_rank(exc=not.a-module)", ["bad value in 'exc=not.a-module'", "module.ExceptionName"]),
    ("crash_rank(exc=ValueError, code=3)", ["exclude each other", "give one of them"]),
    ("port_collision(rank=1)", ["port_collision takes no rank", "remove 'rank=1'",
                                "port_collision takes: mode, hold_for"]),
    ("store_down(rank=0)", ["store_down takes no rank", "remove 'rank=0'"]),
    ("latency(rank=0)", ["rank= names the rank that counts an in-rank trigger of a scoped fault",
                         "the fault acts on the store proxy, which carries every rank's store traffic"]),
    ("port_collision(at=t=1)", ["port_collision takes no at", "before the ranks start",
                                "remove 'at=t=1'", "hold_for"]),
    ("store_down(at=all_reduce#1)", ["store_down: bad value in 'at=all_reduce#1'", "expected t=SECONDS"]),
    ("block_port(at=step#1)", ["an in-rank trigger (at=step#1) needs a scope, ranks=(...) or nodes=(...)",
                               "use at=init or at=t=SECONDS"]),
    ("partition(ranks=(1,), nodes=(1,))", ["give ranks= or nodes=, not both"]),
    ("latency(ranks=(1,), stream=upstream)", ["acts on each link both ways", "remove it"]),
    ("partition(ranks=(1,), rank=0)", ["rank= names the rank that counts an in-rank trigger (step#N, OP#N)"]),
    ("partition(ranks=(a,))", ["bad value in 'ranks=(a,)'", "expected a tuple of rank indexes such as (1,)"]),
    ("partition(mode=drp)", ["bad value in 'mode=drp'", "did you mean 'drop'?"]),
    ("delay(at=t=1)", ["bad value in 'at=t=1'", "expected init or OP or OP#N"]),
    ("kill_rank(at=t=-1)", ["bad trigger 't=-1'", "SECONDS must be a number >= 0"]),
    ("kill_rank(at=t=soon)", ["bad trigger 't=soon'", "e.g. t=1.5"]),
    ("kill_rank(at=all_reduce#0)", ["bad trigger 'all_reduce#0'", "calls count from 1",
                                    "the first call is all_reduce#1"]),
    ("kill_rank(at=step#0)", ["bad trigger 'step#0'", "the first call is step#1"]),
    ("kill_rank(at=barrier#-1)", ["bad trigger 'barrier#-1'", "whole number >= 1, e.g. barrier#1"]),
    ("kill_rank(at=init#2)", ["bad trigger 'init#2'", "write at=init, without a call number"]),
    ("kill_rank(at=all_reduc#2)", ["bad trigger 'all_reduc#2'", "unknown op 'all_reduc'",
                                   "did you mean 'all_reduce'?", "OP is one of: all_gather"]),
    ("kill_rank(rank=1", ["unbalanced parentheses in 'kill_rank(rank=1'", "missing ')'"]),
    ("kill_rank(rank=(1)", ["unbalanced parentheses", "missing ')'"]),
    ("kill_rank(rank=1))", ["unbalanced parentheses in 'kill_rank(rank=1))'", "unexpected ')'"]),
    ("kill_rank)", ["unbalanced parentheses in 'kill_rank)'", "unexpected ')'"]),
    ("", ["empty fault spec", "expected kind or kind(key=value, ...)", "kinds: bandwidth"]),
    ("   ", ["empty fault spec"]),
    ("(rank=1)", ["does not start with a kind name"]),
    ("kill_rank rank=1", ["unexpected 'rank=1' after 'kill_rank'", "kill_rank(key=value, ...)"]),
    ("kill_rank; delay", ["separate faults with ';' in a plan"]),
    ("kill_rank(2)", ["'2' in 'kill_rank(2)' is not key=value", "e.g. rank=2"]),
    ("kill_rank(rank=)", ["rank= has no value"]),
    ("kill_rank(rank=1,,at=init)", ["empty argument", "remove the extra ','"]),
    ("kill_rank(rank=1, rank=2)", ["rank is given twice"]),
    ("crash_rank(message=it's)", ["unterminated quoted string", "add the closing '"]),
    ("crash_rank(message='a'b)", ["bad quoted value \"'a'b\"", "quote the whole value"]),
])
def test_parse_errors_name_the_fragment_and_the_fix(spec, expected):
    with pytest.raises(FaultSpecError) as info:
        Fault.parse(spec)
    for part in expected:
        assert part in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("call, expected", [
    (lambda: Fault("kill_rank", rank="two"), "kill_rank: bad value in 'rank=two'"),
    (lambda: Fault("kill_rank", rank=True), "bad value in 'rank=True'"),
    (lambda: Fault("crash_rank", message=3), "bad value in 'message=3': expected text"),
    (lambda: Fault("crash_rank", exc=int), "bad value in \"exc=<class 'int'>\""),
    (lambda: Fault("kill_rank", at=3), "expected a trigger"),
    (lambda: Fault("nope"), "unknown fault kind 'nope'"),
    (lambda: Fault(3), "unknown fault kind '3'"),
    (lambda: Fault.parse(3), "expected a fault spec string or a Fault, got int 3"),
    (lambda: Trigger("op", op="all_reduce", n=0), "calls count from 1"),
    (lambda: Trigger("time", seconds=-1), "SECONDS must be a number >= 0"),
    (lambda: Trigger("sometime"), "not a trigger"),
    (lambda: Trigger("op", op="all_reduce"), "not a trigger"),
])
def test_python_errors(call, expected):
    with pytest.raises(FaultSpecError) as info:
        call()
    assert expected in str(info.value)


def test_exception_class_defined_in_a_function_is_refused():
    class Local(Exception):
        pass

    with pytest.raises(FaultSpecError, match="define it at module level"):
        Fault("crash_rank", exc=Local)


def test_validate_rank_range():
    f = Fault.parse("kill_rank(rank=4)")
    with pytest.raises(FaultSpecError) as info:
        f.validate(4)
    assert str(info.value).startswith("rank 4 is outside the group (world_size=4): allowed 0..3")
    assert "kill_rank(rank=4)" in str(info.value)
    assert f.validate(5) is f
    with pytest.raises(FaultSpecError, match="outside the group"):
        f.resolved_rank(2)
    with pytest.raises(FaultSpecError, match="world_size must be a whole number >= 1, got 0"):
        Fault("kill_rank").validate(0)


# --- plans ------------------------------------------------------------------------------

def test_parse_plan_forms():
    kill, delay = Fault("kill_rank"), Fault("delay", rank=0)
    assert parse_plan(None) == () == parse_plan("") == parse_plan([]) == parse_plan(" ; ")
    assert parse_plan("kill_rank; delay(rank=0);") == (kill, delay)
    assert parse_plan(kill) == (kill,)
    assert parse_plan(["kill_rank", delay]) == (kill, delay)
    assert parse_plan(("kill_rank; delay(rank=0)", kill)) == (kill, delay, kill)
    assert parse_plan(f for f in [kill]) == (kill,)
    assert parse_plan("crash_rank(message='a; b')")[0].get("message") == "a; b"
    assert format_plan([kill, "delay(rank=0)"]) == "kill_rank; delay(rank=0)"
    assert format_plan(None) == ""


def test_parse_plan_errors():
    with pytest.raises(FaultSpecError, match="plan item 1 is int 3: expected a fault spec string or a Fault"):
        parse_plan(["kill_rank", 3])
    with pytest.raises(FaultSpecError, match="expected a fault plan"):
        parse_plan(3.5)
    with pytest.raises(FaultSpecError, match="did you mean 'delay'"):
        parse_plan("kill_rank; dealy")


def test_validate_plan():
    plan = validate_plan("kill_rank; crash_rank(rank=0); latency", 2)
    assert [f.kind for f in plan] == ["kill_rank", "crash_rank", "latency"]
    with pytest.raises(FaultSpecError, match=r"rank 2 is outside the group \(world_size=2\): allowed 0..1"):
        validate_plan(["delay(rank=2)"], 2)
    with pytest.raises(FaultSpecError, match="world_size must be a whole number >= 1"):
        validate_plan(None, 0)
    with pytest.raises(FaultSpecError, match="a plan may hold one port_collision only, got 2"):
        validate_plan("port_collision; port_collision(mode=bind)", 2)


def test_faulted_and_rank_faults():
    plan = parse_plan("kill_rank; delay(rank=0); crash_rank(rank=1); store_down; hang_rank(rank=3)")
    assert faulted_ranks(plan, 4) == {1, 3}
    assert [f.kind for f in rank_faults(plan, 3, 4)] == ["kill_rank", "hang_rank"]
    assert [f.kind for f in rank_faults(plan, 0, 4)] == ["delay"]
    assert rank_faults(plan, 2, 4) == ()


# --- kinds and capabilities -------------------------------------------------------------

def test_capabilities():
    network = ("bandwidth", "blackhole", "block_port", "latency", "limit_data", "partition", "reset_peer",
               "slow_close")
    assert kinds_with("targets_rank") == ("crash_rank", "hang_rank", "io_error", "kill_node", "kill_rank",
                                          "misconfig", "torn_save")
    # network kinds act in a rank too: a scoped one with an in-rank trigger (the harness does the rest)
    assert kinds_with("acts_in_rank") == tuple(sorted(("crash_rank", "delay", "hang_rank", "io_error", "kill_node",
                                                       "kill_rank", "slow_io", "torn_save", *network)))
    assert kinds_with("needs_harness") == tuple(sorted(("kill_node", *network)))
    # kill_node counts in its node's first rank: it takes a node, not a rank; misconfig (harness-side)
    # takes the rank it starts wrongly
    assert kinds_with("takes_rank") == tuple(sorted({*kinds_with("acts_in_rank"), "misconfig"} - {"kill_node"}))
    assert kinds_with("needs_proxy") == network
    assert kinds_with("is_toxic") == tuple(k for k in network if k not in ("block_port", "partition"))
    assert kinds_with("before_ranks") == ("port_collision",)
    assert set(kinds_with("harness_side")) == set(FAULT_KIND_NAMES) - set(kinds_with("acts_in_rank")) | set(network)
    assert "port_collision" not in kinds_with("takes_at")
    for cap in CAPABILITIES:
        assert set(kinds_with(cap)) <= set(FAULT_KIND_NAMES)
    with pytest.raises(FaultSpecError, match="unknown capability 'needs_proxi' .did you mean 'needs_proxy'"):
        kinds_with("needs_proxi")


def test_trigger_forms_and_defaults_per_kind():
    assert KINDS["kill_rank"].trigger_forms == {"init", "op", "step", "time", "save", "load"}
    assert KINDS["delay"].trigger_forms == {"init", "op", "step", "save", "load"}
    assert KINDS["torn_save"].trigger_forms == {"save"}
    assert KINDS["io_error"].trigger_forms == KINDS["slow_io"].trigger_forms == {"save", "load"}
    assert KINDS["store_down"].trigger_forms == {"time"}
    assert KINDS["blackhole"].trigger_forms == {"init", "time", "op", "step"}  # op, step: with a scope
    assert KINDS["port_collision"].trigger_forms == frozenset()
    assert str(KINDS["crash_rank"].default_at) == "collective#1"
    assert KINDS["port_collision"].default_at is None


@pytest.mark.parametrize("kind, toxic_type, attributes", [
    ("blackhole", "timeout", {"timeout": 0}),
    ("latency", "latency", {"latency": 1000, "jitter": 0}),
    ("bandwidth", "bandwidth", {"rate": 0}),
    ("reset_peer", "reset_peer", {"timeout": 0}),
    ("slow_close", "slow_close", {"delay": 1000}),
    ("limit_data", "limit_data", {"bytes": 0}),
])
def test_toxic_kinds(kind, toxic_type, attributes):
    definition = KINDS[kind]
    assert definition.toxic_type == toxic_type
    assert definition.toxic_attributes(Fault(kind)) == attributes
    body = definition.toxic(Fault(kind, stream="upstream", toxicity=0.5), name="t1")
    assert body == {"name": "t1", "type": toxic_type, "stream": "upstream", "toxicity": 0.5,
                    "attributes": attributes}
    assert definition.toxic(Fault(kind))["name"] == f"ddpfault_{kind}_downstream"


def test_latency_attributes_given():
    f = Fault.parse("latency(latency=250, jitter=5)")
    assert f.definition.toxic_attributes(f) == {"latency": 250, "jitter": 5}
    assert KINDS["block_port"].toxic_type is None


# --- triggers ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, kind, op, n, seconds, canonical", [
    ("init", "init", None, None, None, "init"),
    ("all_reduce", "op", "all_reduce", 1, None, "all_reduce#1"),
    (" isend#12 ", "op", "isend", 12, None, "isend#12"),
    ("collective#2", "op", "collective", 2, None, "collective#2"),
    ("step#3", "step", None, 3, None, "step#3"),
    ("t=2", "time", None, None, 2.0, "t=2.0"),
    ("t = 0.5", "time", None, None, 0.5, "t=0.5"),
])
def test_trigger_parse(text, kind, op, n, seconds, canonical):
    t = Trigger.parse(text)
    assert (t.kind, t.op, t.n, t.seconds) == (kind, op, n, seconds)
    assert str(t) == canonical and Trigger.parse(canonical) == t
    assert hash(t) == hash(Trigger.parse(canonical))
    assert Trigger.parse(t) is t


def test_known_ops():
    for op in ("all_reduce", "broadcast", "barrier", "all_gather", "reduce_scatter", "send", "recv",
               "isend", "irecv", "reduce", "gather", "scatter", "all_to_all", "all_gather_into_tensor",
               "reduce_scatter_tensor", "batch_isend_irecv", "new_group", "collective"):
        assert op in KNOWN_OPS
    assert "collective" not in COLLECTIVE_OPS and "new_group" not in COLLECTIVE_OPS
    with pytest.raises(FaultSpecError, match="did you mean 'init'"):
        Trigger.parse("int")


# --- TriggerCounter: the one place that decides "due" and "fires once" -------------------

def _due(counter, *names):
    return [[str(f) for f in counter.record(name)] for name in names]


def test_counter_fires_once_at_the_nth_call():
    c = TriggerCounter("kill_rank(at=all_reduce#2)")
    assert _due(c, "all_reduce", "broadcast", "all_reduce", "all_reduce") == \
        [[], [], ["kill_rank(at=all_reduce#2)"], []]
    assert c.count("all_reduce") == 3 and c.count("collective") == 4
    assert c.pending() == ()


def test_collective_counts_every_op_but_new_group():
    c = TriggerCounter("crash_rank(at=collective#3)")
    assert _due(c, "barrier", "new_group", "send", "step", "all_gather") == \
        [[], [], [], [], ["crash_rank(at=collective#3)"]]
    assert c.count("collective") == 3
    default = TriggerCounter("kill_rank")  # default trigger: the first collective
    assert _due(default, "init", "recv") == [[], ["kill_rank"]]


def test_step_and_init_triggers():
    c = TriggerCounter("hang_rank(at=step#2); delay(at=init)")
    assert _due(c, "init", "step", "all_reduce", "step", "step") == \
        [["delay(at=init)"], [], [], ["hang_rank(at=step#2)"], []]


def test_delay_every_fires_on_each_call_from_the_trigger_on():
    c = TriggerCounter("delay(at=all_reduce#2, every=true); delay(at=collective#1, seconds=0.5)")
    every, once = c.faults
    assert [list(c.record(n)) for n in ["all_reduce", "broadcast", "all_reduce", "all_reduce"]] == \
        [[once], [], [every], [every]]
    assert c.pending() == ()


def test_equal_faults_fire_separately():
    c = TriggerCounter("kill_rank(at=barrier#1); kill_rank(at=barrier#1)")
    assert len(c.record("barrier")) == 2


def test_time_triggers():
    c = TriggerCounter("kill_rank(at=t=1.5); store_down; block_port; crash_rank(at=t=0.5)")
    assert c.next_time() == 0.5
    assert c.due_at(0.1) == ()
    assert [f.kind for f in c.due_at(1.0)] == ["store_down", "crash_rank"]
    assert c.next_time() == 1.5
    assert [f.kind for f in c.due_at(10)] == ["kill_rank"]
    assert c.due_at(20) == () and c.next_time() is None
    assert [f.kind for f in c.record("init")] == ["block_port"]  # network default: at=init
    assert c.pending() == ()


def test_counter_for_one_rank():
    plan = "kill_rank(at=barrier#1); delay(rank=0, at=barrier#1); store_down"
    assert [f.kind for f in TriggerCounter(plan, rank=3, world_size=4).record("barrier")] == ["kill_rank"]
    assert [f.kind for f in TriggerCounter(plan, rank=0, world_size=4).faults] == ["delay"]
    assert TriggerCounter(plan, rank=1, world_size=4).record("barrier") == ()
    with pytest.raises(TypeError, match="needs world_size"):
        TriggerCounter(plan, rank=1)


# --- in-rank actions: performed for real ----------------------------------------------

def test_delay_sleeps():
    start = time.monotonic()
    Fault("delay", seconds=0.05).fire_in_rank()
    assert time.monotonic() - start >= 0.05


def test_crash_rank_raises():
    with pytest.raises(RuntimeError, match="^crash_rank injected by pytest-ddpfault$"):
        Fault("crash_rank").fire_in_rank()
    with pytest.raises(ValueError, match="^boom$"):
        Fault.parse("crash_rank(exc=ValueError, message=boom)").fire_in_rank()
    with pytest.raises(ModuleLevelError, match="custom"):
        Fault("crash_rank", exc=ModuleLevelError, message="custom").fire_in_rank()
    import http.client
    with pytest.raises(http.client.HTTPException):
        Fault("crash_rank", exc="http.client.HTTPException").fire_in_rank()


def test_harness_kinds_do_not_fire_in_rank():
    with pytest.raises(TypeError, match="store_down is applied by the harness"):
        Fault("store_down").fire_in_rank()


def _python(code):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    script = "from pytest_ddpfault.faults import Fault\n" + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", script], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_kill_rank_and_crash_code_in_a_process():
    killed = _python("Fault.parse('kill_rank(signal=SIGTERM)').fire_in_rank()\nprint('survived')")
    out, _ = killed.communicate(timeout=30)
    assert killed.returncode == -signal.SIGTERM and "survived" not in out
    exited = _python("print('before')\nFault('crash_rank', code=3, message='gone').fire_in_rank()")
    out, err = exited.communicate(timeout=30)
    assert exited.returncode == 3 and "before" in out and "gone" in err


def test_hang_rank_stops_the_process():
    proc = _python("Fault('hang_rank').fire_in_rank()\nprint('resumed')")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
            if pid:
                break
            time.sleep(0.01)
        assert pid and os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=30)
        assert "resumed" in out and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


def test_module_imports_neither_torch_nor_pytest():
    proc = _python("import sys\nassert 'torch' not in sys.modules and 'pytest' not in sys.modules, "
                   "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pytest'))")
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err


def test_port_collision_cannot_share_a_plan_with_kinds_that_need_the_harness_store():
    from pytest_ddpfault.faults import validate_plan

    for other in ("store_down", "block_port", "latency(latency=10)"):
        with pytest.raises(FaultSpecError, match=r"port_collision cannot be combined with .*rank 0 hosts the store"):
            validate_plan(f"port_collision; {other}", 2)
    validate_plan("port_collision; kill_rank(rank=1)", 2)   # in-rank kinds are fine
