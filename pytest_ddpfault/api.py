"""The object behind the ``ddp`` fixture; usable without pytest as well."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

from pytest_ddpfault import faults as _faults
from pytest_ddpfault.deadline import Deadline
from pytest_ddpfault.errors import SettingsError, TestTimeLimitPassed, unfired_lines, user_frame, warn_unfired
from pytest_ddpfault.results import GroupResult
from pytest_ddpfault.settings import (
    DEFAULT_TIMEOUT, check_allow_unfired, check_nodes, check_run_keywords, check_timeout, check_world_size, fault_typo,
)

_UNSET = object()
_REPORTED_UNFIRED = 5   # runs with unfired faults shown in full by unfired_report (a property makes many)
ALLOW_UNFIRED_HINT = ("Make the trigger come (an op the code reaches, pytest_ddpfault.step() in its loop), or allow "
                      "it: @pytest.mark.ddp(..., allow_unfired=True) or ddp.run(..., allow_unfired=True)")


def _given(**keywords) -> dict:
    """The keywords the caller gave (not left at their default)."""
    return {k: v for k, v in keywords.items() if v is not _UNSET}


class DDP:
    """Runs functions in real process groups of ``world_size`` ranks.

    ``faults`` is the default plan (the marker's); ``run(..., faults=...)`` overrides it.
    ``allow_unfired``: what a run whose plan had a fault that never fired does (each call may
    override it): True warns (``UnfiredFaultWarning``); False records it for
    ``unfired_report()``, which fails the test at the ``ddp`` fixture's teardown.
    """

    def __init__(self, world_size: int = 2, faults=None, timeout: float = DEFAULT_TIMEOUT,
                 backend: str = "gloo", proxy: bool = False, start_method: str = "forkserver",
                 preload: tuple = (), toxiproxy=None, slots=None, nodes: int = 1,
                 allow_unfired: bool = True, network: str = "auto") -> None:
        from pytest_ddpfault.netns import check_network

        self.world_size = check_world_size(world_size, "DDP(world_size=...)")
        self.nodes = check_nodes(nodes, world_size, "DDP(nodes=...)")
        self.faults: tuple = tuple(_faults.parse_plan(faults))
        _faults.validate_plan(self.faults, world_size, self.nodes)
        self.timeout = timeout
        self.backend = backend
        self.proxy = proxy
        self.start_method = start_method
        self.preload = tuple(preload)
        self.toxiproxy = toxiproxy      # where network faults find Toxiproxy (see network.resolve_api)
        self.network = check_network(network, "DDP(network=...)")  # auto, namespaces or proxies (netns.py)
        self.slots = slots              # slots.ProcessSlots: a cap on rank processes across workers
        self.store_proxy = None         # the toxiproxy-python Proxy of the current/last proxied run
        self.results: list[GroupResult] = []
        self.allow_unfired = check_allow_unfired(allow_unfired, "DDP(allow_unfired=...)")
        self._unfired: list[tuple[str, object]] = []   # (which call, its result): unfired and not allowed

    def run(self, fn: Callable, *args, faults=_UNSET, timeout=_UNSET, init=_UNSET, allow_unfired=_UNSET,
            **kwargs) -> GroupResult:
        """Run ``fn(*args, **kwargs)`` once in each rank and wait for all of them.

        ``init`` (default False): the harness calls ``init_process_group`` around ``fn``.
        A keyword of the run's own that ``fn`` also takes, or ``fault=`` that ``fn`` does
        not take, is refused before any rank starts (``SettingsError``).
        """
        from pytest_ddpfault.parent.run import GroupRun, RunConfig

        self._check_test_limit("ddp.run")
        check_run_keywords(fn, args, kwargs, _given(faults=faults, timeout=timeout, init=init,
                                                     allow_unfired=allow_unfired), "ddp.run")
        allow = self._allow(allow_unfired, "ddp.run")
        init = False if init is _UNSET else init
        plan = self.faults if faults is _UNSET else faults   # RunConfig checks it against the group
        limit = self.timeout if timeout is _UNSET else check_timeout(timeout, "ddp.run(timeout=...)")
        config = RunConfig(world_size=self.world_size, nodes=self.nodes, faults=plan, timeout=limit, backend=self.backend,
                           init=init, proxy=self.proxy, start_method=self.start_method,
                           preload=self.preload, toxiproxy=self.toxiproxy, slots=self.slots, network=self.network)
        run = GroupRun(fn, args, kwargs, config)
        run.on_proxy = self._set_proxy
        result = run.run()
        self.results.append(result)
        self._settle_unfired(result, allow, "ddp.run")
        return result

    def torchrun(self, script_or_module, *args, nnodes: int = 1, nproc: int | None = None,
                 min_nodes: int | None = None, max_restarts: int = 0, faults=_UNSET, timeout=_UNSET,
                 env: dict | None = None, rdzv_conf=None, allow_unfired=_UNSET, **options):
        """Run a script (``.py`` path) or module under torchrun with the plan in its
        environment (``DDPFAULT_PLAN``); see ``pytest_ddpfault.launchers.torchrun``.

        ``nnodes=1``: one ``torchrun --standalone`` agent, ``nproc`` workers (default
        ``world_size``). ``nnodes > 1``: one agent per virtual node on the node's address,
        ``nproc`` workers each (default ``world_size // nnodes``), ``--nnodes=min_nodes:nnodes``
        (elastic when ``min_nodes < nnodes``) and a rendezvous endpoint the harness owns;
        ``rdzv_conf`` (a dict or ``"k=v,k=v"``) goes to ``--rdzv-conf``. ``faults`` and
        ``timeout`` default to the marker's; ``allow_unfired`` as in ``run``. Returns a
        ``TorchrunResult``.
        """
        from pytest_ddpfault.parent.run import SETUP_BUDGET
        from pytest_ddpfault.launchers.torchrun import check_nnodes, launch_torchrun

        if "fault" in options:
            raise fault_typo("ddp.torchrun", options["fault"], "ddp.torchrun takes no 'fault' keyword (the "
                             "script's own arguments go positionally)")
        allow = self._allow(allow_unfired, "ddp.torchrun")
        self._check_test_limit("ddp.torchrun")

        limit = self.timeout if timeout is _UNSET else check_timeout(timeout, "ddp.torchrun(timeout=...)")
        check_nnodes(nnodes, min_nodes)
        if nproc is None:
            if self.world_size % nnodes:
                raise SettingsError(f"nnodes={nnodes} does not divide world_size={self.world_size}: give nproc "
                                 f"(workers per node) or a world_size that nnodes divides")
            nproc = self.world_size // nnodes
        elif nnodes > 1 and nproc * nnodes != self.world_size:
            raise SettingsError(f"nproc={nproc} workers on each of nnodes={nnodes} nodes make {nproc * nnodes} "
                             f"workers, not world_size={self.world_size}: leave nproc out (world_size // nnodes)")
        with self._slots(nnodes * (nproc + 1), Deadline.after(SETUP_BUDGET)):  # the workers and the agents
            result = launch_torchrun(script_or_module, *args, nproc=nproc, max_restarts=max_restarts,
                                     faults=self.faults if faults is _UNSET else faults, timeout=limit, env=env,
                                     nnodes=nnodes, min_nodes=min_nodes, rdzv_conf=rdzv_conf,
                                     **{"toxiproxy": self.toxiproxy, "network": self.network, **options})
        self.results.append(result)
        self._settle_unfired(result, allow, "ddp.torchrun")
        return result

    def unfired_report(self) -> str | None:
        """Why the test must fail, or None: the runs whose plan had faults that never fired
        (where not allowed), each fault with the reason its trigger did not come. The ``ddp``
        fixture's teardown fails the test with it."""
        if not self._unfired:
            return None
        shown = self._unfired[:_REPORTED_UNFIRED]
        lines = []
        for call, result in shown:
            n = len(result.unfired)
            lines.append(f"{call}: {n} fault{'s' if n > 1 else ''} of its plan never fired (the test did not "
                         f"test {'them' if n > 1 else 'it'}):")
            lines += [f"  {line}" for line in unfired_lines(result.unfired)]
        if len(self._unfired) > len(shown):
            lines.append(f"...and {len(self._unfired) - len(shown)} more runs with faults that never fired")
        return "\n".join(lines + [ALLOW_UNFIRED_HINT])

    # () -> (monotonic end, seconds) of the test's pytest-timeout limit, or None (the fixture's)
    test_limit: Callable | None = None

    def _check_test_limit(self, call: str) -> None:
        """Past the whole test's limit no run starts: pytest-timeout's signal method raised
        in the run that was going on, and a caller that catches that (Hypothesis) must not
        go on making runs until the last of its examples."""
        limit = self.test_limit() if self.test_limit is not None else None
        if limit is not None and time.monotonic() >= limit[0]:
            raise TestTimeLimitPassed(f"{call}: this test's time limit ({limit[1]:g} s, pytest-timeout) has passed; "
                                      "no more runs start")

    def _allow(self, value, call: str) -> bool:
        return self.allow_unfired if value is _UNSET else check_allow_unfired(value, f"{call}(allow_unfired=...)")

    def _settle_unfired(self, result, allow: bool, call: str) -> None:
        """A run with faults that never fired: warn where allowed, else keep it for unfired_report."""
        if not result.unfired:
            return
        if allow:
            warn_unfired(result.unfired)
            return
        _, frame = user_frame()
        where = f" at {os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}" if frame is not None else ""
        self._unfired.append((f"{call} (run {len(self.results)} of this test{where})", result))

    def _slots(self, n: int, deadline: Deadline):
        return self.slots.hold(n, deadline) if self.slots is not None else contextlib.nullcontext()

    def _set_proxy(self, proxy) -> None:
        self.store_proxy = proxy

    def __repr__(self) -> str:
        plan = _faults.format_plan(self.faults) or "no fault"
        nodes = f" nodes={self.nodes}" if self.nodes > 1 else ""
        return f"<ddp world_size={self.world_size}{nodes} {plan} timeout={self.timeout:g}s>"

    # -- sweeps (pytest_ddpfault/sweep.py) ---------------------------------------------
    max_procs: int | None = None    # the cap on rank processes at once (--ddp-max-procs); sweeps fit in it

    @property
    def sweeps(self) -> list:
        """The ``SweepResult`` of each ``ddp.sweep`` of this test, in order (a failing test's report shows them)."""
        return self.__dict__.setdefault("_sweeps", [])

    def sweep(self, fn: Callable, *args, kinds=_UNSET, ranks=_UNSET, nodes=_UNSET, ops=_UNSET, compare=_UNSET,
              max_runs=_UNSET, timeout=_UNSET, init=_UNSET, **kwargs):
        """One fault at every point a fault-free run reached, each run judged against it.

        A reference run without fault (it must be all ok) gives the points: each rank's
        ``OP#N``, ``step#N``, ``save#N``, ``load#N`` (``ops``: the op names to keep). Then one
        run per kind (``kinds``: names or partial specs without rank/node/at, e.g.
        ``"delay(seconds=0.05)"``) x target (``ranks``, default all; ``nodes`` for node kinds
        and scoped network kinds) x point, side by side within ``--ddp-max-procs``, each with
        ``timeout`` (default the marker's). Outcomes, judged on the ranks the fault did not
        target: ``wrong`` (a value differs from the reference's by ``compare(ref, got)``,
        default exact equality), ``hung``, ``failed``, ``recovered``. ``max_runs``: an even
        spread of the points. Returns a ``SweepResult``; a fault that never fired raises
        ``SweepError``. See ``pytest_ddpfault.sweep``.
        """
        from pytest_ddpfault.sweep import ddp_sweep

        given = {k: v for k, v in dict(kinds=kinds, ranks=ranks, nodes=nodes, ops=ops, compare=compare,
                                       max_runs=max_runs, timeout=timeout, init=init).items() if v is not _UNSET}
        return ddp_sweep(self, fn, args, kwargs, given)
