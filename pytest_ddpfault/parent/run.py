"""One run of a function in a real process group: store, ranks, deadline, results.

Usable without pytest::

    from pytest_ddpfault.parent.run import run_group
    res = run_group(fn, world_size=4, faults="kill_rank(rank=2)", timeout=30)

A run owns one absolute deadline that starts when its ranks exist. Every inner wait
uses the smaller of its own bound and what is left; clean-up has its own small budget
after it. Whatever happens (a failure, Ctrl-C), no process and no listening socket of
the run outlives ``run_group``.
"""
from __future__ import annotations

import heapq
import itertools
import os
import pickle
import selectors
import shutil
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

from pytest_ddpfault import faults as _faults
from pytest_ddpfault.deadline import Deadline
from pytest_ddpfault import ipc
from pytest_ddpfault.ipc import EventInbox
from pytest_ddpfault.links import scopes
from pytest_ddpfault.netns import check_network, choose as choose_network, unprivileged as netns_unprivileged
from pytest_ddpfault.frames import hide_in_stack
from pytest_ddpfault.parent.shipping import dumps_call
from pytest_ddpfault.rank.bootstrap import ChildJob
from pytest_ddpfault.rank.hooks import NODE_ADDR_ENV
from pytest_ddpfault.errors import HarnessError, HarnessWarning, warn_unfired
from pytest_ddpfault.parent.launcher import RUN_DIR_PREFIX, get_launcher
from pytest_ddpfault.parent.reaping import (CLEANUP_BUDGET, STACK_DUMP_BUDGET, read_tail, short_tmp, signals_held,
                                            wait_for_stacks)
from pytest_ddpfault.rank.oplog import read_oplog
from pytest_ddpfault.results import FaultEvent, GroupResult, RankResult, UnfiredFault, ops_from_log
from pytest_ddpfault.settings import check_nodes, check_timeout, check_world_size, node_address

# Before the run's clock starts: waiting for rank slots (other runs hold them), the
# zygote's start and the store's, each inner wait also bounded by its own budget.
SETUP_BUDGET = 600.0
ZYGOTE_START_BUDGET = 180.0  # importing torch on a loaded 2-core machine can take ~10 s
STORE_START_BUDGET = 60.0
# After it: one clean-up budget for stack dumps, kills and reaping (parent/reaping.py).


@dataclass(frozen=True)
class RunConfig:
    world_size: int = 2
    faults: tuple = ()
    nodes: int = 1             # virtual nodes: rank r lives on node r // (world_size // nodes)
    timeout: float = 60.0
    backend: str = "gloo"
    init: bool = False
    proxy: bool = False
    start_method: str = "forkserver"
    preload: tuple = ()
    env: dict = field(default_factory=dict)
    toxiproxy: object = None   # where network faults find Toxiproxy (see network.resolve_api)
    slots: object = None       # slots.ProcessSlots capping rank processes across workers
    oplog: bool = True         # every rank logs its ops (RankResult.ops); False: no log, no counting
    network: str = "auto"      # the network engine: auto, namespaces or proxies (pytest_ddpfault/netns.py)

    def __post_init__(self) -> None:
        check_world_size(self.world_size, "RunConfig")
        check_timeout(self.timeout, "RunConfig")
        check_nodes(self.nodes, self.world_size, "RunConfig")
        object.__setattr__(self, "faults", _faults.validate_plan(self.faults, self.world_size, self.nodes))

    @property
    def per_node(self) -> int:
        return self.world_size // self.nodes

    def node_of(self, rank: int) -> int:
        return rank // self.per_node


@dataclass
class _Proc:
    name: str
    pid: int
    started: float
    stdout_path: str
    stderr_path: str
    stack_path: str
    result_path: str = ""
    rank: int | None = None
    exit: object = None           # ChildExit once gone
    ended_by_harness: str = ""    # why the harness killed it ("" = it was not)
    ended_at: float = 0.0         # when the harness decided to end it
    frozen: bool = False          # stopped by hang_rank and not resumed
    resumes: bool = False         # a resume_after SIGCONT is scheduled for it
    oplog_path: str = ""          # its operation log (rank/oplog.py), "" = none


class GroupRun:
    """The state of one run; ``run()`` drives it from start to clean-up."""

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, config: RunConfig) -> None:
        self.fn, self.args, self.kwargs, self.config = fn, args, kwargs, config
        self.plan: tuple = config.faults   # parsed and checked by RunConfig
        self.dir = ""
        self.inbox: EventInbox | None = None
        self.launcher = None
        self.store: _Proc | None = None
        self.store_proxy = None           # network.StoreProxy when the store is proxied
        self.link_proxies = None          # links.LinkProxies when a network fault is scoped
        self.network = "proxies"          # the engine that runs (netns.choose)
        self.namespaces = None            # rank.netns.NamespaceCuts under the "namespaces" engine
        self.netns_holder: _Proc | None = None
        self.ranks: list[_Proc] = []
        self.by_pid: dict[int, _Proc] = {}
        self._fired: list[tuple] = []     # (kind, rank, trigger, monotonic time, spec, detail, node)
        self.start = 0.0
        self.deadline = Deadline(float("inf"))
        self.master_port: int | None = None
        self.use_agent_store = True       # False: rank 0 hosts the store (plain env://)
        self._timers: list = []
        self.setup = Deadline.after(SETUP_BUDGET)
        self._ending: Deadline | None = None  # the one clean-up budget, from the first kill on
        self._handlers = {"store_ready": self._on_store_ready, "fault": self._on_fault,
                          "netns_ready": self._on_netns_ready, "netns_failed": self._on_netns_failed}
        self._seq = itertools.count()
        self._store_port: int | None = None
        self.actions: list = []
        self.on_proxy: Callable | None = None  # told the run's store Proxy, when it has one
        self._instead: dict[int, dict] = {}    # rank -> {spec: what it did instead} for unfired faults
        self._env_overrides: dict[int, dict] = {}  # rank -> what a misconfig fault changes in its env

    # -- public ---------------------------------------------------------------
    def run(self) -> GroupResult:
        self.setup = Deadline.after(SETUP_BUDGET)
        if self.config.slots is None:
            return self._run()
        with self.config.slots.hold(self.config.world_size + 1, self.setup):  # ranks + the store host
            return self._run()

    def _run(self) -> GroupResult:
        try:
            self.dir = tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-", dir=short_tmp())
            self.inbox = EventInbox(os.path.join(self.dir, "ev"))
            self.actions = [f.definition.action(f, self) for f in self.plan if f.definition.harness_side]
            self.network = choose_network(self.config.network, self.plan, self.config.world_size, self.config.nodes,
                                          self.config.proxy)
            self.launcher = self._launcher()
            setup = self.setup.within(STORE_START_BUDGET)
            if self.network == "namespaces":
                self._start_namespaces(setup)
            for action in self.actions:
                action.before_ranks(setup)
            if self.master_port is None:
                self._start_store(setup)
                if self.config.proxy or any(f.definition.proxies_store(f) for f in self.plan):
                    self._start_proxy()
            self._start_link_proxies(setup)
            for action in self.actions:
                action.before_launch()
            self._start_ranks(setup)
            for action in self.actions:
                action.after_ranks()
            self._wait()
            return self._collect()
        finally:
            self._cleanup()

    def _launcher(self):
        """What starts this run's processes (a sweep gives each of its concurrent runs its own
        view of the shared zygote: see parent/multiplex.py)."""
        return get_launcher(self.config.start_method, tuple(self.config.preload), self.setup.within(ZYGOTE_START_BUDGET))

    # -- timers (harness-side faults) --------------------------------------------
    def at(self, seconds_from_start: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` at that time on the run's clock (which starts with the ranks)."""
        heapq.heappush(self._timers, (seconds_from_start, next(self._seq), callback))

    def record(self, kind: str, rank: int | None, trigger: str, spec: str = "", detail: str = "",
               when: float | None = None, node: int | None = None) -> None:
        """Record a fired fault; one fired before the ranks exist counts as t=0."""
        when = time.monotonic() if when is None else when
        self._fired.append((kind, rank, trigger, when, spec, detail, node))

    # -- what harness-side fault actions may do (faults.base.RunControl) --------------
    def host_store_in_rank0(self, port: int) -> None:
        """No harness store: rank 0 hosts it on ``port``, as a plain env:// script does."""
        self.master_port, self.use_agent_store = port, False

    @property
    def world_size(self) -> int:
        return self.config.world_size

    @property
    def nodes(self) -> int:
        return self.config.nodes

    def override_env(self, ranks: list[int], env: dict[str, str]) -> None:
        """These ranks start with ``env`` over what the harness would give them."""
        for rank in ranks:
            self._env_overrides.setdefault(rank, {}).update(env)

    def stop_store(self) -> None:
        if self.store is not None and self.store.exit is None:
            self.store.ended_by_harness = "stopped by a fault"
            self.launcher.signal(self.store.pid, signal.SIGKILL)

    # -- start ------------------------------------------------------------------
    def _paths(self, stem: str) -> dict:
        return {k: os.path.join(self.dir, f"{stem}.{k}") for k in ("out", "err", "stack", "result", "ops")}

    def _start_helper(self, attr: str, name: str, target: str, opts: dict, setup: Deadline,
                      namespaces: tuple = ()) -> _Proc:
        """Start one of the run's own processes (the store host, the namespace holder) as
        ``self.<attr>``."""
        p = self._paths(attr)
        job = ChildJob(name, target, pickle.dumps(opts), self._base_env(), os.getcwd(), list(_sys_path()),
                       p["out"], p["err"], p["stack"], namespaces=namespaces)
        with signals_held():  # a process started is a process the clean-up knows
            [(pid, started)] = self.launcher.launch_many([job], setup)
            proc = _Proc(name, pid, started, p["out"], p["err"], p["stack"])
            setattr(self, attr, proc)
            self.by_pid[pid] = proc
        return proc

    def _start_store(self, setup: Deadline) -> None:
        opts = {"world_size": self.config.world_size, "events_path": self.inbox.path,
                "timeout": max(self.config.timeout, 1.0), "host": self.master_addr}
        self._start_helper("store", "store host", "pytest_ddpfault.rank.store_host:store_main", opts, setup,
                           namespaces=self._join(0))
        while self._store_port is None:
            if setup.expired():
                raise HarnessError(f"the store host did not start in time{self._output_of(self.store)}")
            self._pump(setup)
            if self.store.exit is not None:
                raise HarnessError(f"the store host died at start-up{self._output_of(self.store)}")
        self.master_port = self._store_port

    def _start_namespaces(self, setup: Deadline) -> None:
        """The "namespaces" engine: one holder process makes a network namespace per node
        (rank/netns.py) before the store host and the ranks start inside them."""
        opts = {"nodes": self.config.nodes, "events_path": self.inbox.path, "user": netns_unprivileged()}
        self._start_helper("netns_holder", "namespace holder", "pytest_ddpfault.rank.netns:hold_main", opts, setup)
        while self.namespaces is None:
            if setup.expired():
                raise HarnessError(f"the node namespaces were not made in time{self._output_of(self.netns_holder)}")
            self._pump(setup)
            if self.namespaces is None and self.netns_holder.exit is not None:
                raise HarnessError(f"the namespace holder died at start-up{self._output_of(self.netns_holder)}")

    def _on_netns_ready(self, ev: dict) -> None:
        from pytest_ddpfault.rank.netns import Holders, NamespaceCuts

        self.namespaces = NamespaceCuts(Holders(tuple(ev["pids"]), bool(ev["user"])), self.config.world_size,
                                        self.config.nodes)

    def _on_netns_failed(self, ev: dict) -> None:
        raise HarnessError(f"the node namespaces could not be made: {ev['why']}")

    def _join(self, node: int) -> tuple:
        """What a process of ``node`` joins first (its node's namespace), if anything."""
        return self.namespaces.holders.join_list(node) if self.namespaces is not None else ()

    def _start_proxy(self) -> None:
        from pytest_ddpfault.toxiproxy.client import StoreProxy, resolve_api

        api = resolve_api(self.config.toxiproxy)
        self.store_proxy = StoreProxy(api, self.master_port, self.setup, host=self.master_addr)
        self.master_port = self.store_proxy.port
        if self.on_proxy is not None:
            self.on_proxy(api.client_proxy(self.store_proxy.info))

    def _start_link_proxies(self, setup: Deadline) -> None:
        """One proxy per link a scoped network fault crosses (none without one: no cost)."""
        from pytest_ddpfault.links import LinkProxies
        from pytest_ddpfault.toxiproxy.client import resolve_api

        ws, nodes = self.config.world_size, self.config.nodes
        if self.namespaces is None and any(f.definition.scope_ranks(f, ws, nodes) for f in self.plan):
            # the store lives on node 0: a node cut off from it reaches it through its own path
            store = f"{self.master_addr}:{self.master_port}" if nodes > 1 and self.use_agent_store else None
            self.link_proxies = LinkProxies.create(resolve_api(self.config.toxiproxy), self.plan, ws, nodes, setup,
                                                   store=store)

    def _base_env(self) -> dict:
        env = dict(os.environ)
        env.pop("DDPFAULT_PLAN", None)  # ranks of ddp.run get their plan directly
        env.update({"OMP_NUM_THREADS": "1", "MASTER_ADDR": self.master_addr})
        env.update(self.config.env)
        return env

    def rank_env(self, rank: int) -> dict:
        ws, per_node, node = self.config.world_size, self.config.per_node, self.config.node_of(rank)
        env = self._base_env()
        env.update({
            "RANK": str(rank), "WORLD_SIZE": str(ws), "LOCAL_RANK": str(rank % per_node),
            "LOCAL_WORLD_SIZE": str(per_node), "GROUP_RANK": str(node), "GROUP_WORLD_SIZE": str(self.config.nodes),
            "ROLE_RANK": str(rank), "ROLE_WORLD_SIZE": str(ws), "MASTER_PORT": str(self._master_port_of(node)),
            "TORCHELASTIC_RESTART_COUNT": "0",
        })
        # the node's own loopback address: its ranks' gloo devices bind to it (link proxies
        # listen below it, see links.PROXY_HOST)
        if self.config.nodes > 1 or self.link_proxies is not None:
            env[NODE_ADDR_ENV] = node_address(node)
        else:
            env.pop(NODE_ADDR_ENV, None)
        if self.use_agent_store:
            env["TORCHELASTIC_USE_AGENT_STORE"] = "True"
        else:
            env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        env.update(self._env_overrides.get(rank, {}))
        return env

    @property
    def master_addr(self) -> str:
        """Where the store is: node 0's address with virtual nodes (as multi-node torchrun has
        it), else 127.0.0.1."""
        return node_address(0) if self.config.nodes > 1 else "127.0.0.1"

    def _master_port_of(self, node: int) -> int:
        """Node 0's ranks reach the store directly; a node some fault may cut off from node 0
        through its own path (``links.StorePath``), which that fault also cuts."""
        own = self.link_proxies.store_port(node) if self.link_proxies is not None else None
        return self.master_port if own is None else own

    def _start_ranks(self, setup: Deadline) -> None:
        from pytest_ddpfault.rank.task import RankTask

        try:
            blob = dumps_call(self.fn, self.args, self.kwargs)
        except Exception as exc:
            raise HarnessError(f"cannot send {self.fn!r} to the ranks: {type(exc).__name__}: {exc}") from exc
        specs = tuple(str(f) for f in self.plan)
        jobs, paths = [], []
        for rank in range(self.config.world_size):
            p = self._paths(f"rank{rank}")
            task = RankTask(rank, self.config.world_size, blob, self.config.init, self.config.backend,
                            specs, p["result"], self.inbox.path, p["ops"] if self.config.oplog else "",
                            nodes=self.config.nodes,
                            links=self.link_proxies.to_wire() if self.link_proxies is not None else None,
                            netns=self.namespaces.to_wire() if self.namespaces is not None else None)
            jobs.append(ChildJob(f"rank {rank}", "pytest_ddpfault.rank.task:rank_main", pickle.dumps(task),
                                 self.rank_env(rank), os.getcwd(), list(_sys_path()),
                                 p["out"], p["err"], p["stack"], namespaces=self._join(self.config.node_of(rank))))
            paths.append(p)
        with signals_held():  # a process started is a process the clean-up knows
            started = self.launcher.launch_many(jobs, setup)
            for rank, ((pid, t), p) in enumerate(zip(started, paths)):
                proc = _Proc(f"rank {rank}", pid, t, p["out"], p["err"], p["stack"], p["result"], rank,
                             oplog_path=p["ops"] if self.config.oplog else "")
                self.ranks.append(proc)
                self.by_pid[pid] = proc
        # The run's clock starts as its first rank is started (the zygote's start is not in it):
        # no rank's t= trigger, counted from its own start, comes before its time on this clock.
        self.start = min(t for _, t in started)
        self.deadline = Deadline(self.start + self.config.timeout)
        if self.store_proxy is not None:
            self.store_proxy.deadline = self.deadline
        if self.link_proxies is not None:
            self.link_proxies.set_deadline(self.deadline)

    # -- waiting ----------------------------------------------------------------
    def _pump(self, until: Deadline) -> None:
        """Wait for one batch of exits or events (or ``until``), and handle them."""
        sel = selectors.DefaultSelector()
        try:
            for obj in self.launcher.selectables():
                sel.register(obj, selectors.EVENT_READ)
            sel.register(self.inbox, selectors.EVENT_READ)
            # an exit read earlier (between "spawned" replies) wakes nothing: don't wait for it
            sel.select(0 if self.launcher.has_pending_exits() else until.remaining())
        finally:
            sel.close()
        for ex in self.launcher.exits():
            proc = self.by_pid.get(ex.pid)
            if proc is not None and proc.exit is None:
                proc.exit = ex
        for ev in self.inbox.drain():
            self._on_event(ev)

    def _on_event(self, ev: dict) -> None:
        try:
            ipc.dispatch(ev, self._handlers, "a process of the run")
        except ipc.UnknownMessage as exc:
            raise HarnessError(str(exc)) from None

    def _on_store_ready(self, ev: dict) -> None:
        self._store_port = int(ev["port"])

    def _on_fault(self, ev: dict) -> None:
        rank = ev.get("rank")
        node = self.config.node_of(rank) if ev.get("signals_node") and rank is not None else None
        self.record(ev["kind"], rank, ev.get("trigger", ""), ev.get("spec", ""),
                    ev.get("detail", ""), when=ev.get("time"), node=node)
        if node is not None:
            self._signal_node(node, int(ev["signals_node"]))
        for action in self.actions:  # a harness-side fault that its rank put in place
            if str(action.fault) == ev.get("spec"):
                action.fired_in_rank(max(0.0, ev["time"] - self.start))
        if ev.get("freezes") and rank is not None:
            self.ranks[rank].frozen = True
            resume = ev.get("resume_after")
            if resume:
                self.ranks[rank].resumes = True
                self.at(max(0.0, ev["time"] - self.start) + resume, lambda r=rank: self._resume(r))

    def _signal_node(self, node: int, sig: int) -> None:
        """Every rank of ``node`` gets ``sig`` at once (a node fault fired in its first rank).

        The signals go out one after the other: all the node's ranks are stopped first, so
        none of them runs on (sees a peer of its node die and raises) before its own signal
        comes; a stopped rank gets a pending signal before it runs again on SIGCONT."""
        per_node = self.config.per_node
        procs = [p for p in self.ranks[node * per_node:(node + 1) * per_node] if p.exit is None]
        for proc in procs:
            self.launcher.signal(proc.pid, signal.SIGSTOP)
        for proc in procs:
            self.launcher.signal(proc.pid, sig)
        if sig != signal.SIGSTOP:
            for proc in procs:
                self.launcher.signal(proc.pid, signal.SIGCONT)

    def _resume(self, rank: int) -> None:
        proc = self.ranks[rank]
        proc.resumes = False
        if proc.exit is None and proc.frozen:
            proc.frozen = False
            self.launcher.signal(proc.pid, signal.SIGCONT)
            self.record("resume", rank, "resume_after", detail="SIGCONT")

    def _live(self) -> list[_Proc]:
        return [p for p in self.ranks if p.exit is None]

    def _wait(self) -> None:
        while True:
            live = self._live()
            if not live:
                return
            if all(p.frozen and not p.resumes for p in live):
                # Nothing else can happen: reap the frozen ranks now, not at the deadline.
                self._end(live, "frozen by hang_rank; ended once every other rank had finished")
                return
            now = time.monotonic()
            while self._timers and self.start + self._timers[0][0] <= now:
                _, _, callback = heapq.heappop(self._timers)
                callback()
            if self.deadline.expired():
                self._end(live, f"still running at the harness deadline ({self.config.timeout:g} s)")
                return
            next_timer = self.start + self._timers[0][0] if self._timers else float("inf")
            until = Deadline(min(self.deadline.at, next_timer))
            self._pump(until)

    def _end(self, procs: list[_Proc], why: str) -> None:
        """Dump each process's stacks (C-level faulthandler), then kill its whole group."""
        now = time.monotonic()
        for p in procs:
            p.ended_by_harness, p.ended_at = why, now
            self.launcher.signal(p.pid, signal.SIGUSR1, group=False)
            self.launcher.signal(p.pid, signal.SIGCONT)  # a stopped rank handles it on resume
        wait_for_stacks(lambda: [p.stack_path for p in procs if p.exit is None],
                        self.cleanup_deadline().within(STACK_DUMP_BUDGET), lambda: self._pump(Deadline.after(0.02)))
        for p in procs:
            self.launcher.signal(p.pid, signal.SIGKILL)
        self._reap(procs)

    def cleanup_deadline(self) -> Deadline:
        """The run's one clean-up budget, started by the first thing that ends processes."""
        if self._ending is None:
            self._ending = Deadline.after(CLEANUP_BUDGET)
        return self._ending

    def _reap(self, procs: list[_Proc]) -> None:
        until = self.cleanup_deadline()
        while any(p.exit is None for p in procs) and not until.expired():
            self._pump(until)
        left = [p for p in procs if p.exit is None]
        if left:
            warnings.warn(HarnessWarning(
                f"pytest-ddpfault: {', '.join(f'{p.name} (pid {p.pid})' for p in left)} did not end within the "
                f"clean-up budget ({CLEANUP_BUDGET:g} s) after SIGKILL; it may be stuck in the kernel"), stacklevel=2)

    # -- results ----------------------------------------------------------------
    def _collect(self) -> GroupResult:
        results = [self._rank_result(p) for p in self.ranks]
        faulted = _faults.faulted_ranks(self.plan, self.config.world_size, self.config.nodes)
        scope = scopes(self.plan, self.config.world_size, self.config.nodes)
        events = sorted((FaultEvent(kind, rank, trigger, round(max(0.0, when - self.start), 4), spec, detail, node,
                                    scope.get(spec, ()))
                         for kind, rank, trigger, when, spec, detail, node in self._fired), key=lambda e: e.time)
        duration = round(time.monotonic() - self.start, 4)
        return GroupResult(results, events, faulted, duration, _faults.format_plan(self.plan),
                           self._unfired(events, results, duration), network=self.network,
                           network_note=self._network_note())

    def _network_note(self) -> str:
        """What the scoped network faults of the plan could cut (nothing to say without one)."""
        if self.namespaces is not None:
            return (f"Linux network namespaces, one per node ({self.config.nodes}): a partition is kernel routes "
                    f"between them and cuts every socket between the nodes (gloo, the store, the user's own)")
        table = self.link_proxies
        if table is None:
            return ""
        nodes = table.store_path_nodes()
        paths = (f" and the store paths of node{'s' if len(nodes) > 1 else ''} "
                 f"{', '.join(map(str, nodes))}") if nodes else ""
        return (f"Toxiproxy proxies on the gloo links{paths}; other sockets between the nodes "
                f"(the user's own) are not cut")

    def _unfired(self, events: list[FaultEvent], results: list[RankResult], duration: float) -> list:
        """The plan's faults that never fired: their trigger did not come before the run ended."""
        fired = {ev.spec for ev in events}
        out = []
        for f in self.plan:
            if str(f) in fired:
                continue
            rank = f.resolved_rank(self.config.world_size, self.config.nodes)
            at = f.resolved_at()
            when = f"{at}" if at is not None else "its moment"
            if rank is not None and rank < len(results):
                r = results[rank]
                ended = "returned" if r.ok else f"{r.status} ({r.detail()})"
                reason = f"the trigger {when} never came in rank {rank}, which {ended} first"
                instead = self._instead.get(rank, {}).get(str(f))
                if instead:  # the rank's own count (a rank that was killed or froze has none)
                    reason += f": {instead}"
            else:
                reason = f"the trigger {when} never came before the run ended at t={duration:.2f}s"
            out.append(UnfiredFault(str(f), rank, reason))
        return out

    def _rank_result(self, p: _Proc) -> RankResult:
        r = RankResult(rank=p.rank, status="hung", node=self.config.node_of(p.rank))
        r.stdout, r.stderr = read_tail(p.stdout_path), read_tail(p.stderr_path)
        end = p.exit.time if p.exit is not None else time.monotonic()
        record = ipc.read_file(p.result_path, ("result",)) if p.result_path else None
        if record is not None and p.ended_by_harness and record["end"] >= p.ended_at:
            record = None  # written while being ended (a frozen rank resumed for its stack dump)
        if record is not None:
            end = record["end"]
            self._instead[p.rank] = record.get("unfired") or {}
            if record["status"] == "ok":
                r.status = "ok"
                try:
                    r.value = pickle.loads(record["value_blob"])
                except Exception as exc:
                    r.status, r.exc_type = "raised", "pytest_ddpfault.ResultError"
                    r.message = f"rank {p.rank}'s return value could not be unpickled here: {exc}"
            else:
                r.status = "raised"
                r.exc_type, r.exc_mro = record["exc_type"], tuple(record["exc_mro"])
                r.message, r.traceback = record["message"], record["traceback"]
                if record["exc_blob"] is not None:
                    try:
                        r.exc = pickle.loads(record["exc_blob"])
                    except Exception:
                        r.exc = None
        elif p.ended_by_harness:
            r.status, r.note = "hung", p.ended_by_harness
            r.stack = hide_in_stack(read_tail(p.stack_path)) or None
        elif p.exit is not None and p.exit.signal is not None:
            r.status = "killed"
        else:
            r.status = "exited"
        if p.exit is not None:
            r.signal, r.exit_code = p.exit.signal, p.exit.exit_code
        if p.oplog_path:
            r.ops, r.steps, r.ops_dropped = ops_from_log(*read_oplog(p.oplog_path), self.start,
                                                         until=p.ended_at if p.ended_by_harness else None)
        r.duration = round(end - p.started, 4)
        r.end_time = round(max(0.0, end - self.start), 4)  # a rank can end before the last one exists
        return r

    def _output_of(self, p: _Proc) -> str:
        text = (read_tail(p.stdout_path) + read_tail(p.stderr_path)).strip()
        return f"; its output:\n{text[-4000:]}" if text else ""

    # -- clean-up ---------------------------------------------------------------
    def _cleanup(self) -> None:
        """Every step runs even if an earlier one raised; the first error is raised last.
        A signal whose handler raises (pytest-timeout's SIGALRM, Ctrl-C) waits until the
        clean-up, bounded by its budget, is done: no rank, proxy or run dir is left."""
        with signals_held():
            self._cleanup_steps()

    def _cleanup_steps(self) -> None:
        steps = [self._kill_leftovers, *(action.cleanup for action in self.actions)]
        if self.store_proxy is not None:
            steps.append(lambda: self.store_proxy.close(self.cleanup_deadline()))
        if self.link_proxies is not None:
            steps.append(lambda: self.link_proxies.close(self.cleanup_deadline()))
        if self.inbox is not None:
            steps.append(self.inbox.close)
        if self.dir:
            steps.append(lambda: shutil.rmtree(self.dir, ignore_errors=True))
        first = None
        for step in steps:
            try:
                step()
            except BaseException as exc:  # the next steps still run
                first = first or exc
        if first is not None:
            raise first

    def _kill_leftovers(self) -> None:
        procs = [p for p in [*self.ranks, self.store, self.netns_holder] if p is not None and p.exit is None]
        if self.launcher is None:
            return
        for p in procs:
            self.launcher.signal(p.pid, signal.SIGCONT)
            self.launcher.signal(p.pid, signal.SIGKILL)
        try:
            self._reap(procs)
        finally:
            self.launcher.end_run()


def _sys_path() -> list:
    return list(sys.path)


def run_group(fn: Callable, *args, world_size: int = 2, nodes: int = 1, faults=None, timeout: float = 60.0,
              init: bool = False, backend: str = "gloo", proxy: bool = False,
              start_method: str = "forkserver", preload: tuple = (), env: dict | None = None,
              toxiproxy=None, oplog: bool = True, network: str = "auto", **kwargs) -> GroupResult:
    """Run ``fn(*args, **kwargs)`` once in each of ``world_size`` ranks; wait for all of them.
    Faults of the plan that never fired are in the result's ``.unfired`` and warned of
    (``UnfiredFaultWarning``)."""
    check_world_size(world_size, "run_group(world_size=...)")
    check_timeout(timeout, "run_group(timeout=...)")
    check_nodes(nodes, world_size, "run_group(nodes=...)")
    config = RunConfig(world_size=world_size, nodes=nodes, faults=faults, timeout=timeout,
                       backend=backend, init=init, proxy=proxy, start_method=start_method,
                       preload=tuple(preload), env=dict(env or {}), toxiproxy=toxiproxy, oplog=oplog,
                       network=check_network(network, "run_group(network=...)"))
    result = GroupRun(fn, args, kwargs, config).run()
    warn_unfired(result.unfired)
    return result
