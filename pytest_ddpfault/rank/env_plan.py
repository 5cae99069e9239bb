"""Fault plans from the environment, for processes the harness did not start.

``DDPFAULT_PLAN="kill_rank(rank=1, at=step#3); delay(rank=0, at=all_reduce#2)"`` installs the
plan in every Python process that imports ``torch.distributed``, with no change to the
script: torchrun's workers, ``mp.spawn`` children, plain ``python script.py`` processes.
The faults and triggers are the ones of ``ddp.run`` (``hooks.install_plan``).

How it gets in: the package installs ``pytest-ddpfault.pth`` into site-packages. Its one
line checks whether ``DDPFAULT_PLAN`` is in the environment and, only then, imports this
module and calls ``activate()``. Without the variable nothing else runs: no import, no torch.

``activate()`` does no torch work either. It puts a finder on ``sys.meta_path`` that waits
for ``torch`` and ``torch.distributed`` to finish importing (``import torch`` imports
``torch.distributed`` half-way through, so the plan goes in once ``torch`` is complete):

- with ``RANK`` and ``WORLD_SIZE`` in the environment then (torchrun), the plan is installed
  right away, before the script's own code runs;
- otherwise (``mp.spawn`` and other launchers that pass the rank as an argument) it is
  installed inside the first ``init_process_group`` call, from its ``rank``/``world_size``
  arguments or the environment at that moment.

Restart attempts. A fault may name the attempt it fires in: ``attempt=N`` (default 0: only
the first attempt, so a restarted job can recover) or ``attempt=*`` (every attempt). The
attempt is ``DDPFAULT_ATTEMPT``, else torchrun's ``TORCHELASTIC_RESTART_COUNT``, else 0.

Events. With ``DDPFAULT_EVENTS=PATH`` each process appends JSON lines to PATH (one write
each, ``O_APPEND``): ``process`` when it starts, ``armed`` when the plan is installed,
``fault`` for every fault that fires (``triggers``' event plus ``attempt`` and ``pid``),
``exception`` for an uncaught exception and ``exit`` at a normal interpreter exit. It also
registers ``faulthandler`` on SIGUSR1 into ``PATH.stack.<pid>``, so whoever watches the run
can ask for every thread's stack, at C level, before killing a hung process.

Imported in every such process: stdlib and ``pytest_ddpfault.faults`` only until torch is there.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pytest_ddpfault import faults as _faults
from pytest_ddpfault import ipc
from pytest_ddpfault.faults import Fault, FaultSpecError
from pytest_ddpfault.frames import exception_fields
from pytest_ddpfault.procfs import start_ticks
from pytest_ddpfault.rank.bootstrap import register_stack_dump, set_parent_death_signal

__all__ = [
    "AGENTS_ONLY", "ENV_ATTEMPT", "ENV_DIE_WITH_PARENT", "ENV_EVENTS", "ENV_NODE", "ENV_OPLOG", "ENV_PLAN", "PTH_NAME", "EnvPlanError",
    "ScopedFault", "activate", "current_attempt", "format_env_plan", "hook_path",
    "checked_events", "oplog_path", "parse_env_plan", "read_events", "stack_path", "validate_env_plan",
]

ENV_PLAN = "DDPFAULT_PLAN"
ENV_ATTEMPT = "DDPFAULT_ATTEMPT"
ENV_EVENTS = "DDPFAULT_EVENTS"
# A directory: each armed process logs its ops to oplog.<pid> there (rank/oplog.py).
ENV_OPLOG = "DDPFAULT_OPLOG"
# Set by ddp.torchrun: each process dies with its parent (PR_SET_PDEATHSIG), so a killed
# launcher cannot leave workers behind.
ENV_DIE_WITH_PARENT = "DDPFAULT_DIE_WITH_PARENT"
# ENV_DIE_WITH_PARENT's value when only the torchrun agents die with the launcher and
# their workers may outlive their agent (a plan that kills an agent alone).
AGENTS_ONLY = "agents"
# Set by a multi-node ddp.torchrun in each agent's environment: the agent's virtual node.
# Its events carry it, and the launcher then completes the faults that act on a whole node.
ENV_NODE = "DDPFAULT_NODE"
# Set by a multi-node ddp.torchrun whose plan holds a scoped network fault: the table of the
# run's link proxies (links.LinkProxies.to_wire(), as JSON) the workers' gloo goes through.
ENV_LINKS = "DDPFAULT_LINKS"
# Set by a multi-node ddp.torchrun on the "namespaces" engine: the run's node namespaces
# (rank.netns.NamespaceCuts.to_wire(), as JSON), where a worker's in-rank partition puts its routes.
ENV_NETNS = "DDPFAULT_NETNS"
# torchrun gives group ranks in the order of its agents' addresses as text: 127.0.7.1 ..
# 127.0.7.9 are nodes 0..8 in order, but 127.0.7.10 (node 9) sorts before 127.0.7.2. A fault
# that signals node N counts in group rank N, so beyond this it would signal another node.
# (Scoped network faults find their links by address, not by group rank: not limited.)
MAX_NODES_SIGNALLED = 9
ELASTIC_ATTEMPT = "TORCHELASTIC_RESTART_COUNT"
PTH_NAME = "pytest-ddpfault.pth"
ANY_ATTEMPT = "*"
BAD_PLAN_EXIT = 2          # exit code of a process whose plan (or event file) cannot be used


class EnvPlanError(FaultSpecError):
    """A ``DDPFAULT_PLAN``/``DDPFAULT_ATTEMPT`` value that cannot be used; the message says why."""


# --- plans with attempts ----------------------------------------------------------------

@dataclass(frozen=True)
class ScopedFault:
    """A fault and the restart attempt it fires in (None: every attempt)."""

    fault: Fault
    attempt: int | None = 0

    def applies_to(self, attempt: int) -> bool:
        return self.attempt is None or self.attempt == attempt

    def __str__(self) -> str:
        spec = str(self.fault)
        if self.attempt == 0:
            return spec
        scope = f"attempt={ANY_ATTEMPT if self.attempt is None else self.attempt}"
        return f"{spec[:-1]}, {scope})" if spec.endswith(")") else f"{spec}({scope})"


def _parse_attempt(value: Any, where: str) -> int | None:
    text = str(value).strip()
    if text == ANY_ATTEMPT:
        return None
    if text.isdecimal():
        return int(text)
    raise EnvPlanError(f"bad value in 'attempt={text}'{where}: expected a whole number >= 0 "
                       f"(the restart attempt, from 0) or {ANY_ATTEMPT} for every attempt")


def _parse_one(spec: str) -> ScopedFault:
    try:
        kind, args = _faults.split_spec(spec.strip())
        attempt = _parse_attempt(args.pop("attempt"), f" in {spec.strip()!r}") if "attempt" in args else 0
        return ScopedFault(Fault(kind, **args), attempt)
    except EnvPlanError:
        raise
    except FaultSpecError as e:
        raise EnvPlanError(f"{e} (in fault spec {spec.strip()!r})") from None


def parse_env_plan(spec: Any) -> tuple[ScopedFault, ...]:
    """A plan with attempt scopes: a spec string (``;``-separated, each fault may add
    ``attempt=N`` or ``attempt=*``), a ``Fault``, a ``ScopedFault``, or an iterable of those."""
    if isinstance(spec, ScopedFault):
        return (spec,)
    if isinstance(spec, str):
        pieces = _faults.split_top_level(spec, ";", spec, strict=False)
        return tuple(_parse_one(p) for p in pieces if p.strip())
    if isinstance(spec, Iterable) and not isinstance(spec, (bytes, Mapping)):
        return tuple(scoped for item in spec for scoped in parse_env_plan(item))
    return tuple(ScopedFault(f) for f in _faults.parse_plan(spec))  # None, a Fault; else its error


def format_env_plan(plan: Any) -> str:
    """The ``DDPFAULT_PLAN`` value of a plan; parses back to an equal plan."""
    return "; ".join(str(f) for f in parse_env_plan(plan))


def validate_env_plan(plan: Any, world_size: int | None = None, nodes: int | None = None) -> tuple[ScopedFault, ...]:
    """Parse, and check that every fault can act from inside a process (and fits the group).

    ``nodes``: the plan runs under a multi-node ``ddp.torchrun``, whose launcher completes the
    kinds that need a harness (``needs_harness``: it signals a whole node)."""
    scoped = parse_env_plan(plan)
    in_rank = ", ".join(k for k in _faults.kinds_with("acts_in_rank") if not _faults.KINDS[k].needs_harness)
    for item in scoped:
        fault = item.fault
        if not fault.definition.acts_in_rank or (fault.definition.needs_harness and not nodes):
            where = ("the ddp.run harness or a multi-node ddp.torchrun (nnodes > 1)" if fault.definition.acts_in_rank
                     else "the ddp.run harness")
            raise EnvPlanError(f"{fault.kind} is applied by {where} and cannot come from "
                               f"{ENV_PLAN} otherwise (in fault spec {str(item)!r}); in-rank kinds are: {in_rank}")
        if nodes and fault.definition.proxies_store(fault):
            raise EnvPlanError(f"{fault.kind} without ranks= or nodes= acts on the store's path, which only the "
                               f"ddp.run harness proxies; under ddp.torchrun give it a scope, e.g. nodes=(1,) "
                               f"(in fault spec {str(item)!r})")
        if "resume_after" in fault.definition.keys and fault.get("resume_after") is not None:
            raise EnvPlanError(f"hang_rank(resume_after=...) needs the ddp.run harness to send SIGCONT; "
                               f"under {ENV_PLAN} nothing resumes the rank: remove resume_after "
                               f"(in fault spec {str(item)!r})")
        if nodes and nodes > MAX_NODES_SIGNALLED and "node" in fault.definition.keys:  # it acts on node=N
            raise EnvPlanError(f"{fault.kind} under ddp.torchrun works with up to {MAX_NODES_SIGNALLED} nodes, "
                               f"got nnodes={nodes}: torchrun numbers its agents by their addresses as text "
                               f"(127.0.7.10 before 127.0.7.2), so past {MAX_NODES_SIGNALLED} node N is not group "
                               f"rank N (in fault spec {str(item)!r}); use nnodes <= {MAX_NODES_SIGNALLED} or ddp.run")
        if world_size is not None:
            fault.validate(world_size, nodes or 1)
    return scoped


def current_attempt(environ: Mapping[str, str] | None = None) -> int:
    """``DDPFAULT_ATTEMPT``, else ``TORCHELASTIC_RESTART_COUNT``, else 0."""
    env = os.environ if environ is None else environ
    for name in (ENV_ATTEMPT, ELASTIC_ATTEMPT):
        text = env.get(name, "").strip()
        if text:
            if not text.isdecimal():
                raise EnvPlanError(f"{name}={text!r}: expected a whole number >= 0")
            return int(text)
    return 0


# --- events ------------------------------------------------------------------------------

class _NoSink:
    def send(self, type_: str, **payload) -> None:
        pass


# What the armed processes of a run write to DDPFAULT_EVENTS.
EVENT_TYPES = ("process", "armed", "fault", "exception", "exit", "spawned", "child_exit", "child_signal")


def checked_events(messages: list[dict], path: str) -> list[dict]:
    """``messages``, each of a known type (else ``ipc.UnknownMessage``)."""
    return [ipc.check_type(m, EVENT_TYPES, path) for m in messages]


def read_events(path: str) -> list[dict]:
    """The events of a ``DDPFAULT_EVENTS`` file, in file order (a torn last line is skipped)."""
    return checked_events(ipc.read_lines(path), path)


def stack_path(events_path: str, pid: int) -> str:
    """Where process ``pid`` dumps its stacks on SIGUSR1 (it exists once registered)."""
    return f"{events_path}.stack.{pid}"


def oplog_path(directory: str, pid: int) -> str:
    """Where process ``pid`` logs its ops under ``DDPFAULT_OPLOG=directory``."""
    return os.path.join(directory, f"oplog.{pid}")


def hook_path() -> str | None:
    """The installed ``pytest-ddpfault.pth`` on this interpreter's path, or None."""
    import site

    dirs = [*sys.path, *getattr(site, "getsitepackages", lambda: [])()]
    if getattr(site, "ENABLE_USER_SITE", False):
        dirs.append(site.getusersitepackages())
    for d in dirs:
        candidate = os.path.join(d or ".", PTH_NAME)
        if os.path.isfile(candidate):
            return candidate
    return None


# --- activation: the .pth hook's entry point ------------------------------------------

_state: _Activation | None = None


def activate(environ: Mapping[str, str] | None = None) -> None:
    """Arm this process with ``DDPFAULT_PLAN`` (called by the .pth line; idempotent).

    A plan that does not parse ends the process with exit code 2 and a message: a test
    that asked for faults must not pass because none were injected.
    """
    global _state
    if _state is not None:
        return
    env = os.environ if environ is None else environ
    text = env.get(ENV_PLAN, "")
    try:
        attempt = current_attempt(env)
        plan = validate_env_plan(text, nodes=1 if env.get(ENV_NODE) else None)
        _state = _Activation(plan, attempt, env)
    except FaultSpecError as e:
        _refuse(f"{ENV_PLAN}={text!r} cannot be used: {e}")
    except OSError as e:
        _refuse(f"{ENV_EVENTS}={env.get(ENV_EVENTS)!r} cannot be written: {e}")
    _state.start()


def _refuse(why: str) -> None:
    sys.stderr.write(f"pytest-ddpfault: {why}\n")
    sys.stderr.flush()
    os._exit(BAD_PLAN_EXIT)


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "").strip()
    return int(text) if text.lstrip("-").isdecimal() else None


class _Activation:
    """One process's armed state: the plan for its attempt, the event sink, the import watch."""

    def __init__(self, plan: tuple[ScopedFault, ...], attempt: int, env: Mapping[str, str]) -> None:
        self.started = time.monotonic()
        self.attempt = attempt
        self.plan = plan
        self.faults = tuple(item.fault for item in plan if item.applies_to(attempt))
        self.events_path = env.get(ENV_EVENTS) or None
        self.node = _env_int(env, ENV_NODE)   # under a multi-node ddp.torchrun
        stamp = {"attempt": attempt, **({"node": self.node} if self.node is not None else {})}
        self.events = ipc.LineSink(self.events_path, **stamp) if self.events_path else _NoSink()
        self.env = env
        self.env_rank = _env_int(env, "RANK")
        self.rank: int | None = None      # set once the plan is installed
        self.installed = False
        self.firer = None                 # the installed plan's FaultFirer
        self._stack_file = None
        self.ppid = os.getppid()          # the process that started it (its launcher)
        die = env.get(ENV_DIE_WITH_PARENT)
        # AGENTS_ONLY: a torchrun agent has no RANK (the launcher takes it out), its workers do.
        self._die_with_parent = die == "1" or (die == AGENTS_ONLY and self.env_rank is None)

    def start(self) -> None:
        if self._die_with_parent:
            set_parent_death_signal()
        if self.events_path:
            self._register_stack_dump()
            self.events.send("process", ppid=os.getppid(), rank=self.env_rank,
                             local_rank=_env_int(self.env, "LOCAL_RANK"), world_size=_env_int(self.env, "WORLD_SIZE"),
                             start_ticks=start_ticks(), time=self.started)
            self._watch_exit()
        # Armed means the same in every process, whether or not one of its faults is due in
        # this attempt: its calls are counted (and its rank, its end are recorded).
        _TorchWatch(self.on_torch_distributed).arm()

    # -- stacks and the end of the process --------------------------------------------
    def _register_stack_dump(self) -> None:
        try:
            self._stack_file = register_stack_dump(stack_path(self.events_path, os.getpid()))
        except (OSError, RuntimeError, ValueError):
            self._stack_file = None

    def _watch_exit(self) -> None:
        import atexit

        previous = sys.excepthook

        def excepthook(exc_type, exc, tb):
            if exc is not None:
                if exc.__traceback__ is None:
                    exc.__traceback__ = tb
                self.record_exception(exc)
            previous(exc_type, exc, tb)

        sys.excepthook = excepthook
        atexit.register(self._send_exit)

    def record_exception(self, exc: BaseException) -> None:
        """An exception that ends the process's work (excepthook, or one that ``mp.spawn``
        catches and turns into ``sys.exit(1)``)."""
        self.events.send("exception", rank=self.current_rank(), **exception_fields(exc))

    def _send_exit(self) -> None:
        if self.firer is not None and self.firer.oplog is not None:
            self.firer.settle()
        self.events.send("exit", rank=self.current_rank(),
                         **({"unfired": self.unfired()} if self.firer is not None else {}))

    def unfired(self) -> list[dict]:
        """This process's faults that have not fired, and why: the trigger never came."""
        return [{"spec": str(fault), "why": f"the trigger never came: {why}"}
                for fault, why in self.firer.counter.unfired(time.monotonic() - self.started)]

    def current_rank(self) -> int | None:
        return self.rank if self.rank is not None else self.env_rank

    # -- installing the plan ----------------------------------------------------------
    def on_torch_distributed(self) -> None:
        """torch and torch.distributed have finished importing."""
        if self.events_path:
            _watch_children(self)
        rank, world_size = _env_int(os.environ, "RANK"), _env_int(os.environ, "WORLD_SIZE")
        if rank is not None and world_size is not None:
            self.install(rank, world_size)
        else:
            self._install_on_init()

    def install(self, rank: int, world_size: int) -> None:
        from pytest_ddpfault.rank.hooks import install_plan, release_the_gil_around_destroy

        if self.installed:
            return
        self.installed, self.rank = True, rank
        # Under a multi-node ddp.torchrun: the nodes of this attempt (a node's faults count in
        # the first worker of group rank N; torchrun orders its agents by address, which is
        # the node order for up to MAX_NODES_SIGNALLED nodes, past which kill_node is refused).
        nodes = (_env_int(self.env, "GROUP_WORLD_SIZE") or 1) if self.node is not None else 1
        table = self.env.get(ENV_LINKS)
        if table:  # gloo's links that a scoped fault crosses go through their proxies
            from pytest_ddpfault import links

            installed = links.LinkProxies.from_wire(json.loads(table))
            links.install(installed)
            per_node, local = _env_int(self.env, "LOCAL_WORLD_SIZE"), _env_int(self.env, "LOCAL_RANK")
            if self.node is not None and per_node is not None and local is not None:
                # a node a fault may cut off from node 0 reaches the store through its path
                links.route_store(installed, self.node * per_node + local, os.environ)
        cuts = self.env.get(ENV_NETNS)
        if cuts:
            from pytest_ddpfault.rank import netns

            netns.install(netns.NamespaceCuts.from_wire(json.loads(cuts)))
        try:
            fitting = []
            for item in self.plan:
                if not item.applies_to(self.attempt):
                    continue
                try:
                    item.fault.validate(world_size, nodes)
                except FaultSpecError:
                    if item.attempt is not None:
                        raise
                    # attempt=*: a later attempt's smaller group (a node lost) may lack its place;
                    # it is skipped there (and reported as not fired), not a reason to stop
                    continue
                fitting.append(item.fault)
            self.faults = tuple(fitting)
            # Every rank counts, with or without a fault due in it in this attempt.
            firer = install_plan(self.faults, rank, world_size, _FreezeAware(self), started=self.started,
                                 count_without_faults=True, oplog=self._open_oplog(), nodes=nodes)
        except FaultSpecError as e:
            raise EnvPlanError(f"{ENV_PLAN} does not fit this group (rank {rank} of {world_size}): "
                               f"{e}") from None
        self.firer = firer
        release_the_gil_around_destroy()   # the gloo teardown race, as in ddp.run's ranks
        self.events.send("armed", rank=rank, world_size=world_size, faults=[str(f) for f in firer.counter.faults])

    def _open_oplog(self):
        directory = self.env.get(ENV_OPLOG)
        if not directory:
            return None
        from pytest_ddpfault.rank.oplog import OpLog

        try:
            return OpLog(oplog_path(directory, os.getpid()))
        except OSError as e:  # no log is no reason to fail the process
            sys.stderr.write(f"pytest-ddpfault: {ENV_OPLOG}={directory!r}: cannot log ops: {e}\n")
            return None

    def dump_stacks(self, why: str) -> None:
        """Every thread's stack, now, into this process's stack file (before it freezes:
        a stopped process cannot dump them when asked)."""
        if self._stack_file is None:
            return
        import faulthandler

        try:
            self._stack_file.write(f"{why}\n")
            self._stack_file.flush()
            faulthandler.dump_traceback(file=self._stack_file, all_threads=True)
        except (OSError, ValueError):
            pass

    def die_with_parent_while_frozen(self) -> None:
        """Before this process stops itself (``hang_rank``): SIGKILL it when its parent dies,
        whatever ends the parent. A stopped process acts on no other signal (the SIGTERM of a
        launcher stopping its workers, or of ``PR_SET_PDEATHSIG`` left at its default), so a
        launcher killed hard (``timeout -k``, SIGKILL) would leave it stopped forever, an
        orphan. Its parent already gone, freezing would leave it so at once: it is killed.
        Not where workers are to outlive their agent (``AGENTS_ONLY``): ddp.torchrun ends them."""
        if self.env.get(ENV_DIE_WITH_PARENT) == AGENTS_ONLY:
            return
        set_parent_death_signal()
        if os.getppid() != self.ppid:
            os.kill(os.getpid(), signal.SIGKILL)

    def _install_on_init(self) -> None:
        """No rank yet: install inside the first ``init_process_group`` call."""
        import inspect

        from torch.distributed import distributed_c10d as c10d

        from pytest_ddpfault.rank.hooks import on_first_init

        signature = inspect.signature(c10d.init_process_group)

        def install_from_call(args: tuple, kwargs: dict) -> None:
            rank, world_size = _rank_from_call(signature, args, kwargs)
            # The ddp.run harness takes DDPFAULT_PLAN out of its ranks' environment and
            # gives them their plan itself: a rank forked from an armed zygote is not ours.
            if rank is not None and world_size is not None and ENV_PLAN in os.environ:
                self.install(rank, world_size)
            elif rank is None or world_size is None:
                sys.stderr.write(f"pytest-ddpfault: {ENV_PLAN} is set but this process's rank is "
                                 "unknown (no rank/world_size argument, no RANK/WORLD_SIZE in the "
                                 "environment): its faults are not installed\n")

        on_first_init(install_from_call)


class _FreezeAware:
    """The event sink given to the plan: before a fault that freezes the process
    (``hang_rank``) is announced, the process's stacks go into its stack file; once it
    is, the process is made to die with its parent even while stopped."""

    def __init__(self, state: _Activation) -> None:
        self.state = state

    def send(self, type_: str, **payload) -> None:
        freezes = type_ == "fault" and payload.get("freezes")
        if freezes:
            self.state.dump_stacks(f"frozen by {payload.get('spec')} at {payload.get('trigger')} "
                                   "(stacks as it froze itself):")
        self.state.events.send(type_, **payload)
        if freezes:
            self.state.die_with_parent_while_frozen()


def _watch_children(state: _Activation) -> None:
    """Record how this process's ``multiprocessing`` children end, and what a
    ``torch.multiprocessing.spawn`` worker raised (see ``hooks.watch_children``)."""
    from pytest_ddpfault.rank.hooks import watch_children

    watch_children(
        on_spawned=lambda i: state.events.send("spawned", index=i, rank=state.current_rank()),
        on_exception=state.record_exception,
        on_child_exit=lambda pid, code: state.events.send("child_exit", child=pid, code=code),
        on_child_signal=lambda pid, sig: state.events.send("child_signal", child=pid, signal=sig))


def _rank_from_call(signature, args: tuple, kwargs: dict) -> tuple[int | None, int | None]:
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        bound = kwargs
    rank, world_size = bound.get("rank", -1), bound.get("world_size", -1)
    if not isinstance(rank, int) or rank < 0:
        rank = _env_int(os.environ, "RANK")
    if not isinstance(world_size, int) or world_size < 0:
        world_size = _env_int(os.environ, "WORLD_SIZE")
    return rank, world_size


class _TorchWatch:
    """A ``sys.meta_path`` finder that calls ``ready()`` once ``torch`` and
    ``torch.distributed`` have both finished executing, then takes itself off the path.

    It finds nothing itself: it asks the finders after it, and hooks ``exec_module`` of the
    loader instance they return for these two modules (a loader instance per module, so
    nothing else is touched; the hook removes itself after the module has run).
    """

    WATCHED = ("torch", "torch.distributed")

    def __init__(self, ready) -> None:
        self.ready = ready
        self.done: set[str] = {m for m in self.WATCHED if m in sys.modules}
        self._searching = False

    def arm(self) -> None:
        if self._check():
            return
        sys.meta_path.insert(0, self)

    def _check(self) -> bool:
        if len(self.done) < len(self.WATCHED):
            return False
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        self.ready()
        return True

    def find_spec(self, name, path=None, target=None):
        if name not in self.WATCHED or name in self.done or self._searching:
            return None
        self._searching = True
        try:
            spec = None
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(name, path, target)
                if spec is not None:
                    break
        finally:
            self._searching = False
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_watch(module):
            try:
                exec_module(module)
            finally:
                try:
                    del loader.exec_module
                except AttributeError:
                    pass
            self.done.add(name)
            self._check()

        loader.exec_module = exec_and_watch
        return spec
