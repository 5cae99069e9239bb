"""pytest-ddpfault: pytest hooks, options, the ``ddp`` marker and fixtures.

Loading this module must stay cheap: no torch. The harness and the zygote are
imported on first use; the zygote is started as soon as collection finds a test that
uses ``ddp``, so its start-up (seconds) overlaps collection instead of a test's clock.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from pytest_ddpfault.frames import ENV_SHOW as ENV_SHOW_INTERNAL_FRAMES
from pytest_ddpfault.netns import HELP_NETWORK, NETWORK_ENGINES, check_network
from pytest_ddpfault.settings import (
    DEFAULT_KEEP_WARM_IDLE, DEFAULT_TIMEOUT, MARKER_SIGNATURE, START_METHODS, SessionSettings, SettingsError,
    check_preload, check_start_method, marker_settings, parse_flag, parse_idle, parse_preload, parse_timeout,
)

HELP_TIMEOUT = ("deadline in seconds for one ddp.run when the marker sets none "
                f"(default {DEFAULT_TIMEOUT:g}; env DDPFAULT_TIMEOUT)")
HELP_START_METHOD = ("how rank processes start: forkserver (warm zygote, default) or spawn "
                     "(env DDPFAULT_START_METHOD)")
HELP_PRELOAD = "comma-separated modules to import in the zygote before ranks fork (env DDPFAULT_PRELOAD)"
HELP_MAX_PROCS = ("cap on rank processes running at once across pytest-xdist workers "
                  "(default max(8, 4 x CPUs); env DDPFAULT_MAX_PROCS)")
HELP_TOXIPROXY_URL = ("use the Toxiproxy server at this URL (else toxiproxy-server on PATH, else the "
                      "embedded one; env TOXIPROXY_URL)")
HELP_INTERNAL_FRAMES = (f"keep pytest-ddpfault's own frames in rank tracebacks and stacks "
                        f"(env {ENV_SHOW_INTERNAL_FRAMES}=1)")
HELP_KEEP_WARM = ("keep the rank zygote warm after this session: later runs and every xdist worker of this "
                  "user, interpreter, torch version and preload set fork from it (env DDPFAULT_KEEP_WARM=1)")
HELP_KEEP_WARM_IDLE = (f"seconds a kept-warm zygote waits for a client before it leaves "
                       f"(default {DEFAULT_KEEP_WARM_IDLE:g}; env DDPFAULT_KEEP_WARM_IDLE)")
HELP_KEEP_WARM_STOP = "stop this user's kept-warm zygotes first (their running ranks too)"
HELP_TIMELINE = ("write each failing ddp test's runs to DIR as an HTML timeline and a Chrome/Perfetto trace "
                 "(ini ddp_timeline); the report names the files")
HELP_TIMELINE_ALL = "with --ddp-timeline: write them for every ddp test, passing ones too"
MARKER_HELP = (f"{MARKER_SIGNATURE}: run the test's ddp.run calls in a group of world_size "
               "ranks with the given fault plan (spec string, Fault or list) and deadline.")

GROUP_HELP = ("fault injection for torch.distributed (pytest-ddpfault); settings: ini < env < "
              "option < marker; DDPFAULT_PLAN in a process's environment arms it (see ddp.torchrun)")

_settings_key = pytest.StashKey["SessionSettings"]()
_results_key = pytest.StashKey[list]()
_final_runs_key = pytest.StashKey[list]()  # a hypothesis test: the runs of each final replay (ranges)
_marker_error_key = pytest.StashKey[str]()
_marker_key = pytest.StashKey["MarkerSettings"]()
_slots_key = pytest.StashKey[object]()
_test_limit_key = pytest.StashKey[tuple]()  # pytest-timeout's limit of the test: (monotonic end, seconds)
_stopped_key = pytest.StashKey[list]()  # pids --ddp-keep-warm-stop stopped
_keep_warm_key = pytest.StashKey[object]()  # the launcher's keep-warm setting before this session's
_SLOTS_INPUT = "ddpfault_slots_dir"
_REPORTED_RUNS = 3


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ddpfault", GROUP_HELP)
    group.addoption("--ddp-timeout", dest="ddp_timeout", default=None, help=HELP_TIMEOUT)
    group.addoption("--ddp-start-method", dest="ddp_start_method", default=None,
                    choices=START_METHODS, help=HELP_START_METHOD)
    group.addoption("--ddp-preload", dest="ddp_preload", default=None, help=HELP_PRELOAD)
    group.addoption("--ddp-max-procs", dest="ddp_max_procs", default=None, type=int, help=HELP_MAX_PROCS)
    group.addoption("--toxiproxy-url", dest="toxiproxy_url", default=None, help=HELP_TOXIPROXY_URL)
    group.addoption("--ddp-network", dest="ddp_network", default=None, choices=NETWORK_ENGINES, help=HELP_NETWORK)
    group.addoption("--ddp-keep-warm", dest="ddp_keep_warm", action="store_const", const=True, default=None,
                    help=HELP_KEEP_WARM)
    group.addoption("--ddp-keep-warm-idle", dest="ddp_keep_warm_idle", default=None, help=HELP_KEEP_WARM_IDLE)
    group.addoption("--ddp-keep-warm-stop", dest="ddp_keep_warm_stop", action="store_true", default=False,
                    help=HELP_KEEP_WARM_STOP)
    group.addoption("--ddp-show-internal-frames", dest="ddp_show_internal_frames", action="store_true",
                    default=False, help=HELP_INTERNAL_FRAMES)
    group.addoption("--ddp-timeline", dest="ddp_timeline", default=None, metavar="DIR", help=HELP_TIMELINE)
    group.addoption("--ddp-timeline-all", dest="ddp_timeline_all", action="store_true", default=False,
                    help=HELP_TIMELINE_ALL)
    parser.addini("ddp_timeout", HELP_TIMEOUT, default=None)
    parser.addini("ddp_start_method", HELP_START_METHOD, default=None)
    parser.addini("ddp_preload", HELP_PRELOAD, default=None)
    parser.addini("ddp_max_procs", HELP_MAX_PROCS, default=None)
    parser.addini("toxiproxy_url", HELP_TOXIPROXY_URL, default=None)
    parser.addini("ddp_network", HELP_NETWORK, default=None)
    parser.addini("ddp_keep_warm", HELP_KEEP_WARM, default=None)
    parser.addini("ddp_keep_warm_idle", HELP_KEEP_WARM_IDLE, default=None)
    parser.addini("ddp_timeline", HELP_TIMELINE, default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    if config.getoption("ddp_show_internal_frames"):
        os.environ[ENV_SHOW_INTERNAL_FRAMES] = "1"  # ranks inherit the environment
    try:
        settings = config.stash[_settings_key] = _session_settings(config)
    except SettingsError as exc:
        raise pytest.UsageError(f"pytest-ddpfault: {exc}") from None
    config.stash[_slots_key] = None
    workerinput = getattr(config, "workerinput", None)
    if config.getoption("ddp_keep_warm_stop") and workerinput is None:
        from pytest_ddpfault.parent import warm

        config.stash[_stopped_key] = warm.stop_all()
    if settings.keep_warm and settings.start_method == "forkserver":
        from pytest_ddpfault.parent import launcher

        config.stash[_keep_warm_key] = launcher.configure_keep_warm(settings.keep_warm_idle)
    if workerinput is not None and workerinput.get(_SLOTS_INPUT):
        # an xdist worker: share the controller's slots with every other worker
        from pytest_ddpfault.parent.slots import ProcessSlots, default_max_procs

        config.stash[_slots_key] = ProcessSlots(workerinput[_SLOTS_INPUT],
                                                settings.max_procs or default_max_procs())
    elif workerinput is None and config.pluginmanager.hasplugin("xdist") and _xdist_workers(config):
        config.pluginmanager.register(_XdistController(tempfile.mkdtemp(prefix="ddpfault-slots-")),
                                      "ddpfault-xdist-controller")


def _xdist_workers(config: pytest.Config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) or getattr(config.option, "tx", None)


class _XdistController:
    """Hands every xdist worker the directory of the session's rank slots."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def pytest_configure_node(self, node) -> None:
        node.workerinput[_SLOTS_INPUT] = self.directory

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def _session_settings(config: pytest.Config) -> SessionSettings:
    """ini < env < CLI; each error names where the bad value came from."""
    def pick(name: str, env: str):
        cli = config.getoption(name)
        if cli is not None:
            return cli, f"--{name.replace('_', '-')}"
        if os.environ.get(env):
            return os.environ[env], f"${env}"
        ini = config.getini(name)
        return (ini, f"ini {name}") if ini else (None, "")

    timeout, src = pick("ddp_timeout", "DDPFAULT_TIMEOUT")
    method, msrc = pick("ddp_start_method", "DDPFAULT_START_METHOD")
    preload, presrc = pick("ddp_preload", "DDPFAULT_PRELOAD")
    max_procs, psrc = pick("ddp_max_procs", "DDPFAULT_MAX_PROCS")
    url, _ = pick("toxiproxy_url", "TOXIPROXY_URL")
    keep_warm, ksrc = pick("ddp_keep_warm", "DDPFAULT_KEEP_WARM")
    idle, isrc = pick("ddp_keep_warm_idle", "DDPFAULT_KEEP_WARM_IDLE")
    network, nsrc = pick("ddp_network", "DDPFAULT_NETWORK")
    if max_procs is not None:
        try:
            max_procs = int(max_procs)
            if max_procs < 1:
                raise ValueError
        except ValueError:
            raise SettingsError(f"max procs {max_procs!r} from {psrc}: must be an int >= 1") from None
    return SessionSettings(
        timeout=parse_timeout(timeout, src) if timeout is not None else DEFAULT_TIMEOUT,
        start_method=check_start_method(method, msrc) if method is not None else "forkserver",
        preload=check_preload(parse_preload(preload), presrc),
        max_procs=max_procs,
        toxiproxy_url=url or None,
        keep_warm=parse_flag(keep_warm, ksrc) if keep_warm is not None else False,
        keep_warm_idle=parse_idle(idle, isrc) if idle is not None else DEFAULT_KEEP_WARM_IDLE,
        network=check_network(network.strip(), nsrc) if network is not None else "auto",
    )


def _marker(node):
    return node.get_closest_marker("ddp")


def pytest_itemcollected(item: pytest.Item) -> None:
    """Bad marker arguments are found at collection, naming the test and the value; the
    test then fails on its own (at set-up), so one bad marker neither stops the rest of
    its file nor hides the next bad one."""
    marker = _marker(item)
    if marker is None:
        return
    try:  # resolved once, here; the fixture takes it from the item
        item.stash[_marker_key] = marker_settings(marker.args, marker.kwargs, item.config.stash[_settings_key])
    except SettingsError as exc:
        item.stash[_marker_error_key] = f"{item.nodeid}: {exc}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    error = item.stash.get(_marker_error_key, None)
    if error is not None:
        pytest.fail(error, pytrace=False)


@pytest.hookimpl(hookwrapper=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings):
    """pytest-timeout's limit of the whole test (``@pytest.mark.timeout(N)``, ``--timeout``):
    once it has passed, ``ddp`` starts no more runs (see ``DDP.test_limit``)."""
    if settings.timeout:
        item.stash[_test_limit_key] = (time.monotonic() + settings.timeout, settings.timeout)
    yield


@pytest.hookimpl(hookwrapper=True, optionalhook=True)
def pytest_timeout_cancel_timer(item: pytest.Item):
    if _test_limit_key in item.stash:
        del item.stash[_test_limit_key]
    yield


def pytest_collection_finish(session: pytest.Session) -> None:
    bad = [item.stash[_marker_error_key] for item in session.items if _marker_error_key in item.stash]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if bad and reporter is not None:
        reporter.write_line(f"pytest-ddpfault: {len(bad)} test(s) with a bad @pytest.mark.ddp "
                            "(each fails at set-up):", yellow=True)
        for line in bad:
            reporter.write_line(f"  {line}", yellow=True)
    settings = session.config.stash[_settings_key]
    if settings.start_method != "forkserver" or session.config.option.collectonly:
        return
    if any("ddp" in getattr(item, "fixturenames", ()) for item in session.items):
        from pytest_ddpfault.parent import launcher

        launcher.prestart(settings.preload)


@pytest.fixture
def ddp(request: pytest.FixtureRequest):
    """Runs functions in a real gloo group: ``ddp.run(fn, *args, **kwargs) -> GroupResult``.

    Configured by ``@pytest.mark.ddp(...)``; without it: world_size=2, no fault. A run whose
    plan had a fault that never fired fails the test here, at teardown (after the body's own
    asserts), unless allowed (``allow_unfired=True`` on the marker or the call).
    """
    from pytest_ddpfault.api import DDP

    settings = request.config.stash[_settings_key]
    ms = request.node.stash.get(_marker_key, None) or marker_settings((), {}, settings)
    runner = DDP(world_size=ms.world_size, nodes=ms.nodes, faults=ms.faults, timeout=ms.timeout, backend=ms.backend,
                 proxy=ms.proxy, start_method=settings.start_method, preload=settings.preload,
                 toxiproxy=_toxiproxy_factory(request), slots=request.config.stash[_slots_key],
                 allow_unfired=ms.allow_unfired, network=settings.network)
    request.node.stash[_results_key] = runner.results
    runner.max_procs = settings.max_procs   # a sweep's side-by-side runs fit in --ddp-max-procs
    runner.test_limit = lambda: request.node.stash.get(_test_limit_key, None)
    yield runner
    unfired = runner.unfired_report()
    if unfired is not None:
        pytest.fail(unfired, pytrace=False)


def _toxiproxy_factory(request: pytest.FixtureRequest):
    """Network faults need a Toxiproxy server; start the session's lazily, only then."""
    def get():
        return request.getfixturevalue("ddpfault_toxiproxy_server")
    return get


@pytest.fixture(scope="session")
def ddpfault_toxiproxy_server(request: pytest.FixtureRequest):
    """The session's Toxiproxy: --toxiproxy-url / $TOXIPROXY_URL, else toxiproxy-server on
    PATH (loopback, port 0), else the embedded server."""
    from pytest_ddpfault.toxiproxy.client import start_server

    server = start_server(request.config.stash[_settings_key].toxiproxy_url)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def toxiproxy(ddpfault_toxiproxy_server):
    """A toxiproxy-python ``Toxiproxy`` client for the session's server."""
    return ddpfault_toxiproxy_server.api.client()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _keep_warm_key in config.stash:  # in-process pytester runs: leave the process as it was
        from pytest_ddpfault.parent import launcher

        launcher.configure_keep_warm(config.stash[_keep_warm_key])


def pytest_report_header(config: pytest.Config) -> str:
    s = config.stash[_settings_key]
    if s.start_method == "spawn":
        how = "ranks start with spawn"
    elif s.keep_warm:
        how = (f"ranks fork from a kept-warm zygote shared across runs (it leaves after {s.keep_warm_idle:g} s "
               f"without a client; --ddp-keep-warm-stop stops it)")
    else:
        how = ("ranks fork from a warm zygote started once per pytest process (its start-up counts "
               "in the first ddp test's duration)")
    stopped = config.stash.get(_stopped_key, None)
    if stopped is not None:
        how = (f"stopped kept-warm zygote(s) {', '.join(map(str, stopped))}; " if stopped
               else "no kept-warm zygote to stop; ") + how
    return f"ddpfault: {how}; timeout {s.timeout:g} s"


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    import sys

    launcher = sys.modules.get("pytest_ddpfault.parent.launcher")  # loaded only if ranks ran
    line = launcher.start_report() if launcher is not None else ""
    if line:
        terminalreporter.write_line(f"pytest-ddpfault: {line}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """A hypothesis test: note which runs each final replay of a falsifying example made
    (hypothesis replays it once more, last, to report it); the report shows those runs."""
    test = getattr(item, "obj", None)
    handle = getattr(test, "hypothesis", None)
    results = item.stash.get(_results_key, None)
    if results is None or handle is None or not getattr(test, "is_hypothesis_test", False):
        yield
        return
    import functools

    from hypothesis.control import current_build_context
    from hypothesis.errors import InvalidArgument

    inner = handle.inner_test
    finals = item.stash[_final_runs_key] = []

    @functools.wraps(inner)
    def noting_the_final_replay(*args, **kwargs):
        first = len(results)
        try:
            return inner(*args, **kwargs)
        finally:
            try:
                final = current_build_context().is_final
            except InvalidArgument:  # called outside an example
                final = False
            if final:
                finals.append(range(first, len(results)))

    handle.inner_test = noting_the_final_replay  # hypothesis' documented hook for wrapping plugins
    try:
        yield
    finally:
        handle.inner_test = inner


def _reported_runs(item: pytest.Item, results: list) -> list:
    """(title, result) of the runs a failing test's report shows: a hypothesis test's
    falsifying example(s), as replayed last (else its last run); otherwise the last few
    failed runs."""
    finals = [r for r in item.stash.get(_final_runs_key, []) if r]
    if finals:
        out = []
        for k, runs in enumerate(finals):
            example = "falsifying example" + (f" {k + 1} of {len(finals)}" if len(finals) > 1 else "")
            for j, i in enumerate(runs):
                out.append((f"ddp ranks ({example}" + (f", run {j + 1} of {len(runs)})" if len(runs) > 1 else ")"),
                            results[i]))
        return out
    if getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        return [("ddp ranks (the last run)", results[-1])]
    failed = [(i, r) for i, r in enumerate(results) if not r.ok][-_REPORTED_RUNS:] or [(len(results) - 1, results[-1])]
    return [("ddp ranks" if len(results) == 1 else f"ddp ranks (run {i + 1} of {len(results)})", r) for i, r in failed]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    results = item.stash.get(_results_key, None)
    if results and report.failed and call.when == "call":
        # longrepr prefixes the exception's lines with "E   ": look at the message itself too
        shown = str(report.longrepr) + (str(call.excinfo.value) if call.excinfo is not None else "")
        for title, res in _reported_runs(item, results):
            if res.summary() in shown:  # our own assertion already shows it
                continue
            report.sections.append((title, res.report()))
    if results and call.when == "call":
        directory = item.config.getoption("ddp_timeline") or item.config.getini("ddp_timeline")
        if directory and (report.failed or item.config.getoption("ddp_timeline_all")):
            report.sections.append(("ddp timeline", _write_timelines(directory, item.nodeid, results)))
    if call.when == "call":
        _report_sweeps(item, call, report)


def _write_timelines(directory: str, nodeid: str, results: list) -> str:
    """Each run of the test as ``<test>[-run<N>].html`` and ``.trace.json`` in ``directory``."""
    import re

    os.makedirs(directory, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", nodeid).strip("_")[-150:]
    lines = []
    for i, res in enumerate(results):
        name = stem if len(results) == 1 else f"{stem}-run{i + 1}"
        page = res.timeline(os.path.join(directory, f"{name}.html"))
        trace = res.trace(os.path.join(directory, f"{name}.trace.json"))
        lines.append(f"timeline: {os.path.abspath(page)}\ntrace (ui.perfetto.dev, chrome://tracing): "
                     f"{os.path.abspath(trace)}")
    return "\n".join(lines)


def _report_sweeps(item: pytest.Item, call: pytest.CallInfo, report) -> None:
    """A failing test's sweeps (``ddp.sweep``): each one's matrix; with ``--ddp-timeline DIR``
    each one's HTML page too (every test's with ``--ddp-timeline-all``)."""
    runner = getattr(item, "funcargs", {}).get("ddp")
    sweeps = getattr(runner, "sweeps", None)
    if not sweeps:
        return
    if report.failed:
        shown = str(report.longrepr) + (str(call.excinfo.value) if call.excinfo is not None else "")
        for i, sweep in enumerate(sweeps):
            if sweep.table() not in shown:  # assert_never/assert_all already show it
                report.sections.append(("ddp sweep" if len(sweeps) == 1 else f"ddp sweep {i + 1} of {len(sweeps)}",
                                        sweep.table()))
    directory = item.config.getoption("ddp_timeline") or item.config.getini("ddp_timeline")
    if directory and (report.failed or item.config.getoption("ddp_timeline_all")):
        import re

        os.makedirs(directory, exist_ok=True)
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid).strip("_")[-150:]
        pages = [sweep.html(os.path.join(directory, f"{stem}-sweep{'' if len(sweeps) == 1 else i + 1}.html"))
                 for i, sweep in enumerate(sweeps)]
        report.sections.append(("ddp sweep timeline", "\n".join(f"sweep: {os.path.abspath(p)}" for p in pages)))
