"""Unmodified scripts under a real launcher, with a fault plan: ``ddp.torchrun(...)``.

::

    res = ddp.torchrun("train.py", "--steps", "8", nproc=2, max_restarts=1,
                       faults="kill_rank(rank=1, at=step#5)", timeout=120)
    res.assert_ok()
    assert res.restarts == 1

runs ``python -m torch.distributed.run --standalone`` as a subprocess in its own session.
``--standalone`` is c10d rendezvous on ``localhost:0``: the agent binds its store to a port
the OS picks and hands that to its workers, so there is no port to race for. The plan
travels in ``DDPFAULT_PLAN`` and every worker arms itself through the import hook
(``env_plan``); what fired, in which attempt, comes back through ``DDPFAULT_EVENTS``.

``nnodes > 1`` runs one agent per virtual node instead, each on its node's loopback
address (``--local-addr``), with ``--nnodes=min_nodes:nnodes`` and a c10d rendezvous
endpoint the harness owns (``rendezvous.RendezvousEndpoint``): a store no node hosts, so
losing a node loses no rendezvous state. Each agent's environment names its node
(``DDPFAULT_NODE``): its workers' events carry it, and a fault on a whole node that fires
in the node's first worker asks this launcher (through the events) to signal that node's
agent and workers at once. On the "namespaces" network engine (``network_engine``) each
agent starts in its node's network namespace (``nsenter``) and the rendezvous store in node
0's, on node 0's address (``link_faults.LaunchedNamespaces``).

``run_script`` does the same for a plain ``python script.py`` (``mp.spawn`` and friends).

The run owns one deadline, counted from the launchers' start (torchrun's own start-up,
rendezvous and restarts are in it). At the deadline every process of the run that
registered the hook's stack dump gets SIGUSR1 (faulthandler, C level), then the launcher
is stopped, and every process of its tree and every process the hook recorded is killed
with its process group. Whatever happens, no process of the run outlives the call.
"""
from __future__ import annotations

import glob
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

from pytest_ddpfault import ipc
from pytest_ddpfault.rank import env_plan
from pytest_ddpfault.deadline import Deadline
from pytest_ddpfault.faults import FaultSpecError
from pytest_ddpfault.frames import hide_in_stack
from pytest_ddpfault.launchers.link_faults import LaunchedLinkFaults, LaunchedNamespaces
from pytest_ddpfault.links import scopes
from pytest_ddpfault.launchers.rendezvous import RendezvousEndpoint, format_rdzv_conf, parse_rdzv_conf
from pytest_ddpfault.procfs import descendants, pending_signals, start_ticks
from pytest_ddpfault.procfs import state as process_state
from pytest_ddpfault.errors import HarnessWarning, SettingsError, TorchrunError, warn_unfired
from pytest_ddpfault.parent.reaping import (
    CLEANUP_BUDGET, STACK_DUMP_BUDGET, kill_and_wait, kill_with_group, read_tail, short_tmp, signal_group, signal_pid,
    wait_for_stacks,
)
from pytest_ddpfault.parent.launcher import RUN_DIR_PREFIX
from pytest_ddpfault.results import (
    AttemptFaultEvent, NodeResult, TorchrunResult, UnfiredFault, WorkerResult, ops_from_log, signal_name,
)
from pytest_ddpfault.rank.hooks import NODE_ADDR_ENV
from pytest_ddpfault.rank.oplog import read_oplog
from pytest_ddpfault.links import node_address
from pytest_ddpfault.settings import DEFAULT_TIMEOUT, check_timeout

__all__ = ["AttemptFaultEvent", "NodeResult", "TorchrunError", "TorchrunResult", "UnfiredFault", "WorkerResult",
           "check_nnodes", "launch_torchrun", "run_script", "run_torchrun"]

_PAUSE = 0.02               # the longest a deadline-bounded wait blocks before looking again
_WATCH = 0.05               # how often a run's events and frozen workers are looked at
# ddp.torchrun's default (env= overrides it): the workers' store is not the agent's, whose keys
# survive a restart (pytorch#135712; see README, "Restarts and the agent's store").
SHARE_RDZV_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
# Signals that ask a process to stop: one of these pending in a process that hang_rank froze
# means its launcher is stopping the workers (it would wait out its grace period in vain).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
AGENT_STOPPED = "stopped by the torchrun agent after another worker failed"
# What the parent environment must not pass to the launcher: it makes its own group.
_GROUP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
              "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_OWN_ENV = (env_plan.ENV_PLAN, env_plan.ENV_ATTEMPT, env_plan.ENV_EVENTS, env_plan.ENV_DIE_WITH_PARENT,
            env_plan.ENV_OPLOG, env_plan.ENV_NODE, NODE_ADDR_ENV)
# The agent's log lines (torch.distributed.elastic.multiprocessing.api): a worker's end.
_AGENT_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) \(pid: (\d+)\)")
_AGENT_STOPPED = re.compile(r"Sending process (\d+) closing signal (SIG[A-Z0-9]+)")
# The agent's own uncaught exception: a traceback from the start of a line (the workers' lines
# teed into its output carry a "[default0]:" prefix), its last unindented line "module.Error: message".
_TRACEBACK = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"(?:[A-Za-z_]\w*\.)*([A-Za-z_]\w*)(?::\s*(.*))?")


# --- entry points --------------------------------------------------------------------------

def run_torchrun(script_or_module: str | os.PathLike, *args, **options) -> TorchrunResult:
    """Run ``script_or_module`` (a ``.py`` path, else a module name) under
    ``python -m torch.distributed.run --standalone --nproc-per-node=nproc``, with the plan;
    with ``nnodes > 1``, under one agent per virtual node (``nproc`` workers each).
    ``toxiproxy``: where scoped network faults find Toxiproxy (as ``run_group``'s).
    Options as ``launch_torchrun``'s; faults of the plan that never fired are in the result's
    ``.unfired`` and warned of (``UnfiredFaultWarning``)."""
    res = launch_torchrun(script_or_module, *args, **options)
    warn_unfired(res.unfired)
    return res


def launch_torchrun(script_or_module: str | os.PathLike, *args, nproc: int = 2, max_restarts: int = 0,
                    faults=None, timeout: float = DEFAULT_TIMEOUT, env: dict | None = None,
                    cwd: str | os.PathLike | None = None, torchrun_args: tuple = (), nnodes: int = 1,
                    min_nodes: int | None = None, rdzv_conf=None, toxiproxy=None,
                    network: str = "auto") -> TorchrunResult:
    """``run_torchrun`` without the warning of unfired faults (``ddp.torchrun`` settles them).
    ``network``: the engine of scoped network faults between nodes (``netns.py``; see
    ``network_engine``)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise SettingsError(f"nproc must be a whole number >= 1, got {nproc!r}")
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise SettingsError(f"max_restarts must be a whole number >= 0, got {max_restarts!r}")
    min_nodes = check_nnodes(nnodes, min_nodes)
    conf = parse_rdzv_conf(rdzv_conf)
    plan = env_plan.validate_env_plan(faults, nproc * nnodes, nodes=nnodes if nnodes > 1 else None)
    engine = network_engine(network, plan, nproc, nnodes)
    target, is_module = _target(script_or_module)
    script = [*map(str, torchrun_args), *(["--module"] if is_module else []), target, *map(str, args)]
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    sizes = [f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}"]
    if nnodes == 1:
        run = _LaunchRun(plan, timeout, env, cwd, defaults={SHARE_RDZV_STORE_ENV: "1"})
        extra = [f"--rdzv-conf={format_rdzv_conf(conf, client=False)}"] if conf else []
        agent = _Agent(None, [*torchrun, "--standalone", "--nnodes=1", *sizes, f"--log-dir={run.log_dir}",
                              "--tee=3", *extra, *script])
        return run.run(lambda: [agent], max_restarts)
    # An agent alone may die only where the plan kills one: otherwise every worker dies with its agent.
    alone = any(item.fault.definition.orphans_workers(item.fault) for item in plan)
    run = _LaunchRun(plan, timeout, env, cwd, defaults={SHARE_RDZV_STORE_ENV: "1"},
                     die_with_parent=env_plan.AGENTS_ONLY if alone else "1")
    run.network = engine
    size = f"{min_nodes}:{nnodes}" if min_nodes != nnodes else str(nnodes)

    def agents() -> list[_Agent]:
        namespaces = run.open_namespaces(nproc, nnodes) if engine == "namespaces" else None
        if namespaces is not None:  # the store with node 0, each agent in its node's namespace
            endpoint = run.open_endpoint(namespaces.nsenter(0), node_address(0))
            faults = None
        else:
            endpoint = run.open_endpoint()
            faults = run.open_link_faults(nproc, nnodes, toxiproxy)
        out = []
        for node in range(nnodes):
            log_dir = os.path.join(run.log_dir, f"node{node}")
            rdzv = faults.rendezvous_endpoint(node, endpoint) if faults is not None else endpoint
            inside = namespaces.nsenter(node) if namespaces is not None else []
            argv = [*inside, *torchrun, f"--nnodes={size}", *sizes, "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv}",
                    f"--rdzv-id={os.path.basename(run.dir)}", f"--rdzv-conf={format_rdzv_conf(conf)}",
                    f"--local-addr={node_address(node)}", f"--log-dir={log_dir}", "--tee=3", *script]
            out.append(_Agent(node, argv, {env_plan.ENV_NODE: str(node), NODE_ADDR_ENV: node_address(node)},
                              log_dir))
        return out
    return run.run(agents, max_restarts)


def network_engine(network: str, plan: tuple, nproc: int, nnodes: int) -> str:
    """The engine a multi-node run gets, as ``netns.choose`` picks it for ``ddp.run``:
    ``"namespaces"`` where asked for (a ``SettingsError`` saying why where the machine or
    the plan does not allow it) or, under ``auto``, for a plan whose scoped faults are all
    partitions between whole nodes the kernel does, where permitted; else ``"proxies"``."""
    from pytest_ddpfault.netns import check_network, choose

    check_network(network, "ddp.torchrun(network=...)")
    if network == "proxies" or (network == "auto" and nnodes == 1):
        return "proxies"
    if nnodes == 1:
        raise SettingsError("network='namespaces' under ddp.torchrun needs nnodes > 1 (a namespace per node's "
                            "agent); with nnodes=1 use network='auto' or 'proxies' (--ddp-network, DDPFAULT_NETWORK)")
    return choose(network, tuple(item.fault for item in plan), nproc * nnodes, nnodes)


def check_nnodes(nnodes, min_nodes) -> int:
    """``nnodes``: a whole number >= 1; ``min_nodes``: None (= nnodes) or 1..nnodes. Returns min_nodes."""
    if isinstance(nnodes, bool) or not isinstance(nnodes, int) or nnodes < 1:
        raise SettingsError(f"nnodes must be a whole number >= 1 (one torchrun agent per virtual node), got {nnodes!r}")
    if min_nodes is None:
        return nnodes
    if isinstance(min_nodes, bool) or not isinstance(min_nodes, int) or not 1 <= min_nodes <= nnodes:
        raise SettingsError(f"min_nodes must be a whole number from 1 to nnodes={nnodes} (the fewest nodes the job "
                         f"goes on with), got {min_nodes!r}")
    return min_nodes


def run_script(script_or_module: str | os.PathLike, *args, faults=None, timeout: float = DEFAULT_TIMEOUT,
               env: dict | None = None, cwd: str | os.PathLike | None = None,
               attempt: int | None = None) -> TorchrunResult:
    """Run ``python script.py *args`` (or ``python -m module``) with the plan in its
    environment: every Python process it starts (``mp.spawn``...) arms itself.
    ``attempt`` sets ``DDPFAULT_ATTEMPT``. Faults of the plan that never fired are in the
    result's ``.unfired`` and warned of (``UnfiredFaultWarning``)."""
    plan = env_plan.validate_env_plan(faults)
    target, is_module = _target(script_or_module)
    extra = {} if attempt is None else {env_plan.ENV_ATTEMPT: str(attempt)}
    run = _LaunchRun(plan, timeout, {**extra, **(env or {})}, cwd)
    agent = _Agent(None, [sys.executable, *(["-m"] if is_module else []), target, *map(str, args)])
    res = run.run(lambda: [agent], 0)
    warn_unfired(res.unfired)
    return res


def _target(script_or_module) -> tuple[str, bool]:
    text = os.fspath(script_or_module)
    if isinstance(script_or_module, os.PathLike) or text.endswith(".py") or os.sep in text:
        if not os.path.isfile(text):
            raise TorchrunError(f"no such script: {text!r} (from {os.getcwd()})")
        return os.path.abspath(text), False
    if not all(part.isidentifier() for part in text.split(".")):
        raise TorchrunError(f"{text!r} is neither a .py script nor a module name")
    return text, True


# --- one run ---------------------------------------------------------------------------------

@dataclass
class _Agent:
    """One launcher process of the run: the torchrun agent of a node, or the single launcher."""

    node: int | None          # None: the run's only launcher (nnodes=1, run_script)
    argv: list
    env: dict | None = None   # what this agent's environment adds (its node)
    log_dir: str | None = None
    proc: subprocess.Popen | None = None
    pidfd: int | None = None
    out_path: str = ""
    err_path: str = ""
    lost: dict | None = None  # the plan's event that signalled this node (a machine or agent lost)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class _LaunchRun:
    def __init__(self, plan: tuple, timeout, env: dict | None, cwd, defaults: dict | None = None,
                 die_with_parent: str = "1") -> None:
        self.plan = plan
        self.defaults = dict(defaults or {})
        self.die_with_parent = die_with_parent
        self.timeout = check_timeout(timeout, "timeout")
        self.user_env = dict(env or {})
        self.cwd = os.fspath(cwd) if cwd is not None else os.getcwd()
        if env_plan.hook_path() is None:
            raise TorchrunError(
                f"the {env_plan.ENV_PLAN} import hook ({env_plan.PTH_NAME}) is not installed for "
                f"{sys.executable}: install the package (pip install pytest-ddpfault, or pip install -e . "
                "from a checkout) rather than putting it on PYTHONPATH")
        # The owner's pid in the name: launcher.sweep_stale_files removes it if the owner
        # died without cleaning up.
        self.dir = tempfile.mkdtemp(prefix=f"{RUN_DIR_PREFIX}{os.getpid()}-run-", dir=short_tmp())
        self.log_dir = os.path.join(self.dir, "logs")
        self.events_path = os.path.join(self.dir, "events.jsonl")
        self.agents: list[_Agent] = []
        self.endpoint: RendezvousEndpoint | None = None
        self.start = 0.0
        self.timed_out = False
        self._ending: Deadline | None = None   # the one clean-up budget, from the first kill on
        self.ended: set[int] = set()       # pids ended at the deadline
        self.ended_at = 0.0
        self.tail: ipc.LineTail | None = None
        self.watched: dict[int, int] = {}  # pidfd -> pid of each recorded process still running
        self.gone_at: dict[int, float] = {}  # pid -> when it was seen to end (monotonic)
        self.frozen: dict[int, dict] = {}  # pid -> the fault event of the hang_rank that froze it
        self.released: dict[int, tuple[float, int]] = {}  # frozen pid -> (when killed, the stop signal)
        self.node_of: dict[int, int] = {}  # pid -> the node of each recorded process (nnodes > 1)
        self.link_faults: LaunchedLinkFaults | LaunchedNamespaces | None = None  # scoped network faults (nnodes > 1)
        self.network = "proxies"               # the engine of scoped network faults (network_engine)

    def env(self) -> dict:
        env = self.base_env()
        for key, value in self.defaults.items():
            env.setdefault(key, value)
        env.update({env_plan.ENV_PLAN: env_plan.format_env_plan(self.plan),
                    env_plan.ENV_EVENTS: self.events_path, env_plan.ENV_DIE_WITH_PARENT: self.die_with_parent,
                    env_plan.ENV_OPLOG: self.dir})
        if self.link_faults is not None:
            env.update(self.link_faults.env())
        env.update({k: str(v) for k, v in self.user_env.items()})
        return env

    @staticmethod
    def base_env() -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in _GROUP_ENV and k not in _OWN_ENV and not k.startswith("TORCHELASTIC_")}
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def open_endpoint(self, inside: list[str] | None = None, host: str = "127.0.0.1") -> str:
        """Start the run's rendezvous store (stopped with the run); its ``host:port``.
        ``inside``: the prefix that starts it in node 0's namespace, on ``host``."""
        self.endpoint = RendezvousEndpoint(self.base_env(), os.path.join(self.dir, "rdzv.out"), inside, host,
                                           Deadline(self.start + self.timeout))
        return self.endpoint.address

    def open_namespaces(self, nproc: int, nnodes: int) -> LaunchedNamespaces:
        """The node namespaces (the "namespaces" engine; gone with the run)."""
        self.link_faults = LaunchedNamespaces(self.plan, nproc, nnodes, self.dir, self.base_env(),
                                              Deadline(self.start + self.timeout))
        return self.link_faults

    def open_link_faults(self, nproc: int, nnodes: int, toxiproxy) -> LaunchedLinkFaults | None:
        """The proxies of the plan's scoped network faults (closed with the run); None without one."""
        self.link_faults = LaunchedLinkFaults.for_plan(self.plan, nproc, nnodes, toxiproxy,
                                                       Deadline(self.start + self.timeout))
        return self.link_faults

    @property
    def roots(self) -> list[int]:
        """The pids of the launchers still running."""
        return [a.proc.pid for a in self.agents if a.running]

    def run(self, make_agents, max_restarts: int) -> TorchrunResult:
        try:
            self.start = time.monotonic()
            deadline = Deadline(self.start + self.timeout)
            self.agents = make_agents()
            env = self.env()
            if self.link_faults is not None:
                self.link_faults.before_launch()   # at=init: in place before any agent starts
                self.link_faults.started(self.start, deadline)
            for agent in self.agents:
                name = "launcher" if agent.node is None else f"agent{agent.node}"
                agent.out_path, agent.err_path = (os.path.join(self.dir, f"{name}.{x}") for x in ("out", "err"))
                with open(agent.out_path, "wb") as out, open(agent.err_path, "wb") as err:
                    agent.proc = subprocess.Popen(agent.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                                  env={**env, **(agent.env or {})}, cwd=self.cwd,
                                                  start_new_session=True)
                agent.pidfd = os.pidfd_open(agent.proc.pid)
            self.tail = ipc.LineTail(self.events_path)
            if not self._wait(deadline):
                self.timed_out = True
                self._end_at_deadline()
            duration = time.monotonic() - self.start
            self._kill_leftovers()
            return self._collect(max_restarts, duration)
        finally:
            self._cleanup()

    def _wait(self, until: Deadline) -> bool:
        """Wait for every launcher to exit; False when ``until`` came first. Meanwhile, note
        when each recorded process ends, signal the nodes the plan asks for, and release
        the workers hang_rank froze once something asks them to stop."""
        while any(a.running for a in self.agents):
            if until.expired():
                return False
            self._watch()
            wait = min(until.remaining(), _WATCH)
            if self.link_faults is not None:
                self.link_faults.tick()
                nxt = self.link_faults.next_timer()
                wait = wait if nxt is None else max(0.0, min(wait, nxt - time.monotonic()))
            live = [a.pidfd for a in self.agents if a.running]
            ready, _, _ = select.select([*live, *self.watched], [], [], wait)
            self._note_gone(ready)
        self._watch()
        return True

    def _watch(self) -> None:
        for ev in env_plan.checked_events(self.tail.read(), self.events_path):
            pid = ev.get("pid")
            if ev.get("type") == "process" and pid and ev.get("start_ticks") is not None:
                self._watch_process(pid, ev["start_ticks"])
                if ev.get("node") is not None:
                    self.node_of[pid] = ev["node"]
            elif ev.get("type") == "fault" and ev.get("freezes") and pid:
                self.frozen[pid] = ev
            elif ev.get("type") == "fault" and (ev.get("signals_node") or ev.get("signals_agent")):
                self._signal_node(ev)
            elif ev.get("type") == "fault" and self.link_faults is not None:
                self.link_faults.on_event(ev)
        for pid in self.frozen:
            if pid in self.released or pid in self.gone_at:
                continue
            stop = next((s for s in _STOP_SIGNALS if int(s) in pending_signals(pid)), None)
            if stop is not None and process_state(pid) in ("T", "t"):
                # Stopped, it cannot act on the signal: whoever sent it would wait out its
                # grace period (torchrun's agent: 30 s) for nothing.
                self.released[pid] = (time.monotonic(), stop)
                kill_with_group(pid)

    def _signal_node(self, ev: dict) -> None:
        """A fault on a whole node fired in the node's first worker: its agent and every
        process under it (or the agent alone) get the signal at once. All are stopped first,
        so that none runs on (sees a peer of its node die) before its own signal comes."""
        agent = next((a for a in self.agents if a.node is not None and a.node == ev.get("node")), None)
        if agent is None or agent.lost is not None or not agent.running:
            return
        agent.lost = ev
        root = agent.proc.pid
        if ev.get("signals_agent"):
            signal_group(root, int(ev["signals_agent"]))
            return
        sig = int(ev["signals_node"])
        node_pids = [pid for pid, node in self.node_of.items() if node == agent.node and pid not in self.gone_at]
        pids = list(dict.fromkeys([root, *descendants(root), *node_pids]))
        for pid in pids:
            signal_group(pid, signal.SIGSTOP)
        for pid in pids:
            signal_group(pid, sig)
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            for pid in pids:
                signal_group(pid, signal.SIGCONT)

    def _watch_process(self, pid: int, ticks: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            self.gone_at.setdefault(pid, time.monotonic())  # by now, at the latest
            return
        if start_ticks(pid) != ticks:  # gone already (or the pid is someone else's)
            os.close(fd)
            self.gone_at.setdefault(pid, time.monotonic())  # by now, at the latest
            return
        self.watched[fd] = pid

    def _note_gone(self, ready: list) -> None:
        now = time.monotonic()
        for fd in ready:
            pid = self.watched.pop(fd, None)
            if pid is not None:
                self.gone_at.setdefault(pid, now)
                os.close(fd)

    # -- the deadline ----------------------------------------------------------------------
    def _end_at_deadline(self) -> None:
        """Stacks first (where the hook registered them), then kill the whole tree."""
        roots = self.roots
        self.ended_at = time.monotonic()
        self._watch()
        # the launchers' trees, and what the hook recorded that is still there (orphans)
        tree = list(dict.fromkeys([*(p for root in roots for p in (root, *descendants(root))),
                                   *self.watched.values()]))
        dumping: dict[int, str] = {}   # pid -> its stack file
        for pid in tree:
            path = env_plan.stack_path(self.events_path, pid)
            # A stopped process (hang_rank froze it) stays stopped until it is killed: waking
            # it would let its user code run on past the deadline. Its stacks were taken as
            # it froze itself.
            if os.path.exists(path) and process_state(pid) not in ("T", "t"):
                signal_pid(pid, signal.SIGUSR1)   # registered: SIGUSR1 dumps stacks instead of killing it
                dumping[pid] = path
        self.ended.update(tree)

        def pause() -> None:
            # Returns at once if a launcher has just died; the dumps are given _PAUSE anyway.
            live = [a.pidfd for a in self.agents if a.running]
            select.select(live if len(live) == len(roots) else [], [], [], _PAUSE)

        wait_for_stacks(lambda: [path for pid, path in dumping.items() if start_ticks(pid) is not None],
                        self.cleanup_deadline().within(STACK_DUMP_BUDGET), pause)
        # Freeze the launchers so that they start nothing new, then kill what they have.
        for root in roots:
            signal_group(root, signal.SIGSTOP)
        for root in roots:
            for pid in descendants(root):
                self.ended.add(pid)
                kill_with_group(pid)
        for root in roots:
            kill_with_group(root)
        self._wait_launchers()

    def _wait_launchers(self) -> None:
        for agent in self.agents:
            if agent.proc is not None:
                try:
                    agent.proc.wait(self.cleanup_deadline().remaining())
                except subprocess.TimeoutExpired:  # SIGKILLed: _kill_leftovers warns of what stays
                    pass

    def _kill_leftovers(self) -> None:
        """Every process the hook recorded that is still alive (orphaned workers): killed."""
        for root in self.roots:
            kill_with_group(root)
        self._wait_launchers()
        alive = {}
        for ev in env_plan.read_events(self.events_path):
            pid, ticks = ev.get("pid"), ev.get("start_ticks")
            if ev.get("type") == "process" and pid and ticks is not None \
                    and start_ticks(pid) == ticks:
                alive[pid] = ticks
        left = kill_and_wait(alive, self.cleanup_deadline())
        if left:
            warnings.warn(HarnessWarning(f"pytest-ddpfault: processes {left} of the launched run did not end within "
                                         f"the clean-up budget ({CLEANUP_BUDGET:g} s) after SIGKILL"), stacklevel=2)

    def cleanup_deadline(self) -> Deadline:
        """The run's one clean-up budget, started by the first thing that ends processes."""
        if self._ending is None:
            self._ending = Deadline.after(CLEANUP_BUDGET)
        return self._ending

    def _cleanup(self) -> None:
        if self.roots:  # an error or Ctrl-C on the way
            for root in self.roots:
                for pid in [*descendants(root), root]:
                    kill_with_group(pid)
            self._wait_launchers()
            try:
                self._kill_leftovers()
            except OSError:
                pass
        if self.endpoint is not None:
            self.endpoint.stop(self.cleanup_deadline())
        if self.link_faults is not None:
            self.link_faults.close(self.cleanup_deadline())
        for agent in self.agents:
            if agent.pidfd is not None:
                os.close(agent.pidfd)
                agent.pidfd = None
        for fd in self.watched:
            os.close(fd)
        self.watched.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- results ---------------------------------------------------------------------------
    def _collect(self, max_restarts, duration) -> TorchrunResult:
        events = env_plan.read_events(self.events_path)
        outputs = {id(a): (read_tail(a.out_path), read_tail(a.err_path)) for a in self.agents}
        multi = self.agents[0].node is not None
        if multi:
            stdout = "".join(f"--- node {a.node} agent ---\n{outputs[id(a)][0]}" for a in self.agents)
            stderr = "".join(f"--- node {a.node} agent ---\n{outputs[id(a)][1]}" for a in self.agents)
        else:
            stdout, stderr = outputs[id(self.agents[0])]
        code = self._job_code()
        res = TorchrunResult(command=list(self.agents[0].argv), exit_code=code if code >= 0 else None,
                             signal=-code if code < 0 else None, stdout=stdout, stderr=stderr,
                             timed_out=self.timed_out, duration=round(duration, 4),
                             plan=env_plan.format_env_plan(self.plan), max_restarts=max_restarts,
                             events=events, network=self.network)
        if self.link_faults is not None:  # what the launcher itself put in place and removed
            events = [*events, *self.link_faults.fired]
        if self.link_faults is None:
            scope = {}
        else:
            scope = scopes(self.link_faults.faults, self.link_faults.world_size, self.link_faults.nodes)
        res.fault_events = sorted((AttemptFaultEvent(
            ev["kind"], ev.get("rank"), ev.get("trigger", ""), round(max(0.0, ev["time"] - self.start), 4),
            ev.get("spec", ""), ev.get("detail", ""), node=ev.get("node"), scope=scope.get(ev.get("spec"), ()),
            attempt=ev.get("attempt", 0), pid=ev.get("pid")) for ev in events if ev.get("type") == "fault"),
            key=lambda e: e.time)
        res.workers = self._workers(events, stdout + stderr)
        res.restarts = max((w.attempt for w in res.workers), default=0)
        res.unfired = self._unfired(events, res.workers, res.restarts)
        if multi:
            res.nodes = [self._node_result(a, outputs[id(a)], res.workers) for a in self.agents]
        if self.timed_out:
            stacks = [(a, hide_in_stack(read_tail(env_plan.stack_path(self.events_path, a.proc.pid))))
                      for a in self.agents]
            res.launcher_stack = "\n".join((f"--- node {a.node} agent:\n{text}" if multi else text)
                                           for a, text in stacks if text) or None
        return res

    def _job_code(self) -> int:
        """The launchers' end as one exit code (negative: a signal): the first launcher the
        plan did not signal that failed, else 0; where the plan signalled every one, the first's."""
        def code(a: _Agent) -> int:  # None: it outlived the clean-up budget after SIGKILL
            return -signal.SIGKILL if a.proc.returncode is None else a.proc.returncode

        survivors = [a for a in self.agents if a.lost is None]
        failed = next((a for a in survivors if code(a) != 0), None)
        if failed is not None:
            return code(failed)
        return 0 if survivors else code(self.agents[0])

    def _node_result(self, agent: _Agent, output: tuple[str, str], workers: list) -> NodeResult:
        code = agent.proc.returncode
        code = -signal.SIGKILL if code is None else code
        lost = None
        if agent.lost is not None:
            lost = f"{agent.lost.get('spec')} at {agent.lost.get('trigger')} in attempt {agent.lost.get('attempt', 0)}"
        stack = (hide_in_stack(read_tail(env_plan.stack_path(self.events_path, agent.proc.pid)))
                 if self.timed_out else "")
        return NodeResult(node=agent.node, address=node_address(agent.node),
                          exit_code=code if code >= 0 else None, signal=-code if code < 0 else None,
                          restarts=max((w.attempt for w in workers if w.node == agent.node), default=0),
                          lost=lost, pid=agent.proc.pid, stdout=output[0], stderr=output[1],
                          timed_out=self.timed_out and agent.proc.pid in self.ended, stack=stack or None,
                          reason=agent_failure(output[1]) if code > 0 else "")

    def _workers(self, events: list, launcher_output: str) -> list[WorkerResult]:
        by_pid: dict[int, list] = {}
        for ev in events:
            by_pid.setdefault(ev.get("pid"), []).append(ev)
        failed = {int(pid): int(code) for code, _, pid in _AGENT_FAILED.findall(launcher_output)}
        stopped = {int(pid): sig for pid, sig in _AGENT_STOPPED.findall(launcher_output)}
        # What a spawning parent (mp.spawn) saw of its children: exit codes and signals it sent.
        child_exit = {ev["child"]: ev["code"] for ev in events if ev.get("type") == "child_exit"}
        child_signal = {ev["child"]: (ev["signal"], ev.get("pid")) for ev in events
                        if ev.get("type") == "child_signal"}
        launchers = {a.proc.pid for a in self.agents}
        workers = []
        for pid, evs in by_pid.items():
            spawned = _first(evs, "spawned")
            rank = next((ev["rank"] for ev in evs if ev.get("rank") is not None),
                        spawned.get("index") if spawned else None)
            start = next((ev for ev in evs if ev.get("type") == "process"), None)
            if rank is None or start is None or pid in launchers:
                continue  # a launcher itself, or a process that never knew its rank
            code = failed.get(pid, child_exit.get(pid))
            workers.append(self._worker(pid, rank, start, evs, code, stopped.get(pid), child_signal.get(pid),
                                        spawned))
        return sorted(workers, key=lambda w: (w.attempt, w.rank, w.pid))

    def _worker(self, pid, rank, start, evs, code, stopped_by, parent_signal, spawned) -> WorkerResult:
        """How one worker ended. ``code``: its exit code as its launcher reported it (the
        agent's log, or the spawning parent's record; negative: the signal)."""
        attempt, local_rank, node = start.get("attempt", 0), start.get("local_rank"), start.get("node")
        if local_rank is None and spawned is not None:
            local_rank = spawned.get("index")
        w = WorkerResult(rank=rank, status="exited", attempt=attempt, local_rank=local_rank, pid=pid, node=node or 0)
        lost = next((a.lost for a in self.agents if node is not None and a.node == node and a.lost
                     and a.lost.get("signals_node")), None)
        exc, exited = _first(evs, "exception"), _first(evs, "exit")
        killer = next((ev for ev in evs if ev.get("type") == "fault" and ev.get("kills_with")), None)
        frozen = self.frozen.get(pid) or _first(evs, "fault", freezes=True)
        gone = self.gone_at.get(pid)
        stack_file = env_plan.stack_path(self.events_path, pid)
        end = None
        if local_rank is not None and start.get("local_rank") is not None:
            w.stdout, w.stderr = (read_tail(p) for p in self._worker_logs(node, attempt, local_rank))
            w.error_file = self._error_file(node, attempt, local_rank)
        if code is not None:
            w.exit_code, w.signal = (code, None) if code >= 0 else (None, -code)
        # The first sign of its end; after the deadline, an end does not count as finishing.
        seen_end = min((t for t in (exc and exc.get("time"), exited and exited.get("time"), gone)
                        if t is not None), default=None)
        finished = seen_end is not None and (not self.timed_out or seen_end <= self.ended_at)
        if frozen is not None and exc is None and exited is None:
            w.status, w.exit_code, w.signal = "hung", None, None
            froze = f"frozen by {frozen.get('spec') or 'hang_rank'} at {frozen.get('trigger')} (the plan)"
            if pid in self.released:
                end, sig = self.released[pid]
                w.note = (f"{froze}; killed by the harness when its launcher sent {signal_name(sig)}, "
                          "which a stopped process cannot act on")
            elif self.timed_out and not finished:
                w.note, end = f"{froze} until the harness deadline", self.ended_at
            else:
                w.note, end = f"{froze} until it was killed", gone
            w.stack = hide_in_stack(read_tail(stack_file)) or None
        elif self.timed_out and not finished:  # in the tree at the deadline, or orphaned
            w.status, w.exit_code, w.signal, end = "hung", None, None, self.ended_at
            w.note = "still running at the harness deadline"
            if seen_end is not None:
                w.note += (f" (it ended {seen_end - self.ended_at:.2f}s later, while the run was being "
                           "stopped)")
            w.stack = hide_in_stack(read_tail(stack_file)) or None
        elif exc is not None:
            w.status, w.exc_type, w.exc_mro = "raised", exc.get("exc_type"), tuple(exc.get("exc_mro", ()))
            w.message, w.traceback, end = exc.get("message"), exc.get("traceback"), exc.get("time")
        elif w.error_file is not None:
            w.status, (w.exc_type, w.message, w.traceback) = "raised", _read_error_file(w.error_file)
        elif code is not None and code != 0:
            w.status = "killed" if code < 0 else "exited"
            if stopped_by is not None and code == -int(getattr(signal, stopped_by, signal.SIGTERM)):
                w.note = AGENT_STOPPED
            elif parent_signal is not None and (code == -parent_signal[0] or code < 0):
                w.note = (f"its parent (pid {parent_signal[1]}) sent it {signal_name(parent_signal[0])}, "
                          "as mp.spawn does to the others once a worker failed")
            elif killer is not None and code < 0:
                w.note = f"by the plan: {killer.get('spec')}"
            end = gone
        elif killer is not None and exited is None:  # no launcher report: its agent went with it (kill_node)
            w.status, w.signal, end = "killed", killer["kills_with"], killer.get("time")
            w.note = f"by the plan: {killer.get('spec')}"
        elif lost is not None and exited is None and attempt == lost.get("attempt", 0):
            w.status, w.signal = "killed", int(lost["signals_node"])
            w.note, end = f"by the plan: {lost.get('spec')} (its node was lost)", gone
        elif stopped_by is not None and exited is None:
            w.status, w.signal = "killed", int(getattr(signal, stopped_by, signal.SIGTERM))
            w.note, end = AGENT_STOPPED, gone
        elif exited is not None or code == 0:
            w.status, w.exit_code = "ok", None
        else:
            w.note = "ended without a record of how (no exception, no exit, no launcher report)"
            end = gone
        for source in (exited, killer):
            if end is None and source is not None:
                end = source.get("time")
        if end is None:
            end = gone
        if end is not None:
            w.duration = round(end - start["time"], 4)
            w.end_time = round(end - self.start, 4)
        until = self.ended_at if w.status == "hung" and self.timed_out else None
        w.ops, w.steps, w.ops_dropped = ops_from_log(*read_oplog(env_plan.oplog_path(self.dir, pid)), self.start,
                                                     until=until)
        return w

    def _unfired(self, events: list, workers: list, restarts: int) -> list[UnfiredFault]:
        """The plan's faults that did not fire in an attempt where they applied, and why."""
        fired = {(ev.get("attempt", 0), ev.get("spec"), ev.get("rank"))
                 for ev in events if ev.get("type") == "fault"}
        world: dict[int, int] = {}
        nodes: dict[int, set] = {}     # attempt -> the nodes whose workers armed in it (nnodes > 1)
        why_in_rank: dict[tuple, str] = {}
        for ev in events:
            a = ev.get("attempt", 0)
            if ev.get("type") == "armed" and ev.get("world_size"):
                world[a] = max(world.get(a, 0), ev["world_size"])
                if ev.get("node") is not None:
                    nodes.setdefault(a, set()).add(ev["node"])
            if ev.get("type") == "exit":
                for item in ev.get("unfired") or ():
                    why_in_rank[(a, item.get("spec"), ev.get("rank"))] = item.get("why", "")
        last = {(w.attempt, w.rank): w for w in workers}
        out = []
        for item in self.plan:
            spec = str(item.fault)
            for a in ([item.attempt] if item.attempt is not None else range(restarts + 1)):
                if a > restarts:
                    plural = "" if restarts == 1 else "s"
                    out.append(UnfiredFault(spec, item.fault.rank, f"attempt {a} never ran (the run "
                                                                      f"made {restarts} restart{plural})",
                                            attempt=a))
                    continue
                try:
                    rank = item.fault.resolved_rank(world[a], len(nodes.get(a, ())) or 1) if a in world \
                        else item.fault.rank
                except FaultSpecError as e:  # the attempt's group (fewer nodes after a loss) has no such place
                    out.append(UnfiredFault(spec, item.fault.rank, f"it does not fit attempt {a}'s group: {e}",
                                            attempt=a))
                    continue
                if (a, spec, rank) in fired:
                    continue
                why = why_in_rank.get((a, spec, rank))
                if why is None:
                    w = last.get((a, rank))
                    if w is None:
                        why = (f"no process of attempt {a} armed as rank {rank} (none imported "
                               "torch.distributed, or none learnt its rank)")
                    else:
                        why = f"rank {rank} ended before its trigger came ({w.status}: {w.detail()})"
                out.append(UnfiredFault(spec, rank, why, attempt=a))
        return out

    def _attempt_dir(self, node: int | None, attempt: int, local_rank: int) -> str | None:
        log_dir = next((a.log_dir for a in self.agents if a.node == node and a.log_dir), self.log_dir)
        found = glob.glob(os.path.join(glob.escape(log_dir), "*", f"attempt_{attempt}", str(local_rank)))
        return found[0] if found else None

    def _worker_logs(self, node: int | None, attempt: int, local_rank: int) -> tuple[str, str]:
        d = self._attempt_dir(node, attempt, local_rank) or os.devnull
        return os.path.join(d, "stdout.log"), os.path.join(d, "stderr.log")

    def _error_file(self, node: int | None, attempt: int, local_rank: int) -> str | None:
        d = self._attempt_dir(node, attempt, local_rank)
        path = d and os.path.join(d, "error.json")
        return path if path and os.path.isfile(path) else None


def _first(events: list, type_: str, **match) -> dict | None:
    return next((ev for ev in events if ev.get("type") == type_
                 and all(ev.get(k) == v for k, v in match.items())), None)


def _read_error_file(path: str) -> tuple[str | None, str, str]:
    """(exception type, message, traceback) of a torchrun error file (written by ``@record``)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None, f"unreadable torchrun error file {path}", ""
    message = data.get("message", "") if isinstance(data, dict) else ""
    info = {}
    if isinstance(message, dict):
        info, message = message.get("extraInfo") or {}, message.get("message", "")
    message = str(message)
    exc_type, _, text = message.partition(": ")
    exc_type = exc_type if exc_type.replace(".", "").replace("_", "").isalnum() else None
    return exc_type, (text if exc_type else message), str(info.get("py_callstack", ""))


def agent_failure(output: str, limit: int = 100) -> str:
    """Why a torchrun agent failed, from its own output: the last exception it raised, by
    its class name and the first line of its message (``RendezvousTimeoutError``,
    ``ChildFailedError: train.py FAILED``); "" when its output shows none."""
    lines = output.splitlines()
    start = max((i for i, line in enumerate(lines) if line.startswith(_TRACEBACK)), default=None)
    if start is None:
        return ""
    at = next((i for i in range(start + 1, len(lines)) if lines[i][:1].strip()), None)
    m = at is not None and _EXCEPTION_LINE.fullmatch(lines[at].rstrip())
    if not m:
        return ""
    name, message = m.group(1), (m.group(2) or "").strip()
    if not message and lines[at + 1:at + 2] and lines[at + 1].startswith("="):  # ChildFailedError: under a rule
        message = next((line.strip() for line in lines[at + 2:at + 4] if any(c.isalnum() for c in line)), "")
    text = f"{name}: {message}" if message else name
    return text if len(text) <= limit else text[: limit - 3] + "..."
