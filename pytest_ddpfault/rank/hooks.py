"""The one place that wraps torch's functions inside a process (``wrap``): the plan's
triggers, the gloo teardown-race workaround, and what the ``DDPFAULT_PLAN`` hook watches
(the first ``init_process_group``, ``mp.spawn`` workers, ``multiprocessing`` children).

Triggers count torch.distributed calls and fire the plan's faults. Two layers see the
calls, so user code needs no change:

- the Python functions of ``torch.distributed`` (``all_reduce``, ``isend``, ...) are
  wrapped; a call made from inside another wrapped call (``all_gather_object`` calling
  ``all_gather``) is not counted again;
- the default group's backend is a Python ``ProcessGroup`` that wraps the real gloo one,
  because DDP's Reducer issues its gradient all_reduce and parameter broadcasts from C++
  straight on the ProcessGroup. Only calls that did not come through the first layer
  are counted there. ``dist.get_backend()`` still says "gloo".

``init`` fires inside ``init_process_group``; ``step#N`` through ``pytest_ddpfault.step()``;
``t=S`` from a timer thread, S seconds after the rank started. A fault fires at most
once, before the call it is due on runs. Used by ``rank/task.py`` and by the
``DDPFAULT_PLAN`` import hook; it imports nothing from the parent side.
"""
from __future__ import annotations

import ctypes
import functools
import os
import threading
import time

from pytest_ddpfault import links
from pytest_ddpfault.faults import KNOWN_OPS, Fault, TriggerCounter
from pytest_ddpfault.rank import oplog, steps
from pytest_ddpfault.rank.gloo_addresses import gloo_arguments, routed_gloo_class

_WRAPPED_BACKEND = "ddpfault_gloo"
# The rank's virtual node's loopback address (ddp.run with nodes > 1): its gloo device binds
# to it and advertises it to the peers.
NODE_ADDR_ENV = "DDPFAULT_NODE_ADDR"
# ProcessGroup method -> the torch.distributed op name a user knows it by.
_PG_OPS = {
    "allreduce": "all_reduce", "allreduce_coalesced": "all_reduce_coalesced",
    "allgather": "all_gather", "_allgather_base": "all_gather_into_tensor",
    "allgather_coalesced": "all_gather_coalesced",
    "allgather_into_tensor_coalesced": "all_gather_into_tensor",
    "broadcast": "broadcast", "barrier": "barrier", "monitored_barrier": "monitored_barrier",
    "reduce": "reduce", "gather": "gather", "scatter": "scatter",
    "reduce_scatter": "reduce_scatter", "_reduce_scatter_base": "reduce_scatter_tensor",
    "reduce_scatter_tensor_coalesced": "reduce_scatter_tensor",
    "alltoall": "all_to_all", "alltoall_base": "all_to_all_single",
    "send": "send", "recv": "recv", "recv_anysource": "recv",
    # ProcessGroup-only entry points (not on the gloo Backend): the base class sends them
    # on to the registered gloo backend
    "all_gather_single": "all_gather_into_tensor", "all_gather_single_coalesced": "all_gather_into_tensor",
    "reduce_scatter_single": "reduce_scatter_tensor",
    "reduce_scatter_single_coalesced": "reduce_scatter_tensor", "all_to_all_single": "all_to_all_single",
}
_local = threading.local()
_MAX_PENDING = 256  # async works watched for their end at once
_TIMER_START_WAIT = 5.0  # the most the t= timer waits for the thread that started it to go on


def wrap(owners, name: str, make):
    """Replace ``name`` with ``make(original)`` in every owner (module or class) that holds
    the same object — torch compares some by identity (``P2POp(dist.isend, ...)``) — once:
    a function this package wrapped already is left alone. Returns the wrapper, or None."""
    original = getattr(owners[-1], name, None)
    if original is None or getattr(original, "__ddpfault_wrapped__", False):
        return None
    wrapper = functools.wraps(original)(make(original))
    wrapper.__ddpfault_wrapped__ = True
    for owner in owners:
        if getattr(owner, name, None) is original:
            setattr(owner, name, wrapper)
    return wrapper


def unwrap(owners, name: str, wrapper) -> None:
    """Put back what ``wrapper`` replaced, where it is still in place."""
    for owner in owners:
        if getattr(owner, name, None) is wrapper:
            setattr(owner, name, wrapper.__wrapped__)


class FaultFirer:
    """Counts this rank's calls and fires the faults that come due."""

    def __init__(self, plan, rank: int, world_size: int, events, started: float, oplog=None,
                 nodes: int = 1) -> None:
        self.rank = rank
        self.counter = TriggerCounter(plan, rank=rank, world_size=world_size, nodes=nodes)
        self.events = events
        self.started = started
        self.main_thread = threading.main_thread().ident
        self.oplog = oplog            # rank/oplog.OpLog: every counted call, or None
        self._pending: list = []      # (log index, Work) of async ops not seen done yet
        self._tensor = self._group_class = None

    def on_call(self, name: str, source: int = 0, args: tuple = (), kwargs: dict | None = None,
                group=None) -> int:
        """Count the call and fire what is due; then log it (after the faults: a rank
        frozen or killed at its trigger never entered the op). Returns its log index."""
        if self._pending:  # before the faults: what a frozen rank had finished shows as finished
            self.settle()
        due = self.counter.record(name)
        if name == "step" and self.oplog is not None:  # a mark: the rank got to it, whatever fires there
            now = time.monotonic()
            self.oplog.begin(oplog.STEP, name, self.counter.count(name), "", 0, source, now, now, oplog.DONE)
        for fault in due:
            self.fire(fault, f"{name}#{self.counter.count(name)}" if name != "init" else "init")
        if self.oplog is None or name == "step":
            return -1
        now = time.monotonic()
        group_name = self._group_name(group, args, kwargs) if name in KNOWN_OPS else ""  # not a collective
        return self.oplog.begin(oplog.OP, name, self.counter.count(name), group_name, self._nbytes(args, kwargs),
                                source, now)

    def on_return(self, index: int, result=None, failed: bool = False) -> None:
        """The logged call ``index`` returned ``result`` (or raised): an async ``Work`` ends
        when it is seen completed (``settle``), anything else now."""
        if index < 0:
            return
        if not failed and hasattr(result, "is_completed"):
            self._pending.append((index, result))
            if len(self._pending) > _MAX_PENDING:  # never seen done: stays "in flight" in the log
                del self._pending[0]
            return
        self.oplog.end(index, time.monotonic(), oplog.FAILED if failed else oplog.DONE)

    def settle(self, now: float | None = None) -> None:
        """Mark the async works seen completed as ended (at the next counted call, a
        ``step()`` or the rank's end: cheap, and an upper bound of their end)."""
        now = time.monotonic() if now is None else now
        still = []
        for index, work in self._pending:
            state = _work_state(work)
            if state is None:
                still.append((index, work))
            else:
                self.oplog.end(index, now, state)
        self._pending = still

    def _group_name(self, group, args: tuple, kwargs: dict | None) -> str:
        if group is None:
            if self._group_class is None:
                import torch.distributed as dist
                self._group_class = dist.ProcessGroup
            group = (kwargs or {}).get("group") or next((a for a in args if isinstance(a, self._group_class)), None)
        if group is None:
            return "default"
        from torch.distributed import distributed_c10d as c10d
        if group is c10d.GroupMember.WORLD:
            return "default"
        return str(getattr(group, "group_name", "") or "group")

    def _nbytes(self, args: tuple, kwargs: dict | None) -> int:
        """Bytes of the tensors the call was given (top level and in lists)."""
        if self._tensor is None:
            import torch
            self._tensor = torch.Tensor
        tensor, total = self._tensor, 0
        for value in (*args, *(kwargs.values() if kwargs else ())):
            if isinstance(value, tensor):
                total += value.numel() * value.element_size()
            elif isinstance(value, (list, tuple)):
                for item in value:
                    if isinstance(item, tensor):
                        total += item.numel() * item.element_size()
                    elif isinstance(item, (list, tuple)):
                        total += sum(t.numel() * t.element_size() for t in item if isinstance(t, tensor))
        return total

    def start_timer(self) -> None:
        """Fire the plan's ``t=`` faults from a timer thread, from now on. Started where the
        rank's own code begins: a fault due already (a rank slower to start than its ``t=``)
        fires at once, and what it raises in the main thread lands in that code."""
        if self.counter.next_time() is not None:
            _start_timer(self)

    def on_time(self) -> None:
        for fault in self.counter.due_at(time.monotonic() - self.started):
            self.fire(fault, str(fault.resolved_at()), from_timer=True)

    def fire(self, fault: Fault, trigger: str, from_timer: bool = False) -> None:
        kind = fault.definition

        def report() -> None:
            self.events.send("fault", kind=fault.kind, rank=self.rank, trigger=trigger, spec=str(fault),
                             time=time.monotonic(), **kind.event_fields(fault))

        if not kind.reports_when_in_place:
            report()
        if from_timer and threading.get_ident() != self.main_thread:
            try:
                kind.fire_in_rank(fault)
            except BaseException as exc:  # an exception is meant for the rank's main thread
                _raise_in_main(self.main_thread, exc)
                return
        else:
            kind.fire_in_rank(fault)
        if kind.reports_when_in_place:
            report()


def _work_state(work) -> int | None:
    """A work's end as the log says it (``oplog.DONE``, ``oplog.FAILED``), None while it runs.
    How it ended is read from the work's future (which DDP's Reducer waits on, and which gloo
    completes a moment before the work says it is completed), never from ``Work.exception()``
    or ``is_success()``: torch deprecates those with a warning in the rank's stderr, where a
    user would look for it in their own code."""
    try:
        completed = work.is_completed()
    except Exception:  # a work torch no longer knows
        return None
    try:
        future = work.get_future()
    except Exception:  # a work without a future: it ended, how is not known
        return oplog.DONE if completed else None
    if not future.done():
        return oplog.DONE if completed else None
    try:
        future.value()
    except Exception:  # the error the op ended with
        return oplog.FAILED
    return oplog.DONE


def _raise_in_main(thread_id: int, exc: BaseException) -> None:
    """Raise ``exc`` in the main thread at its next bytecode (a t= crash_rank).

    The C API takes a class, not an instance: a subclass that builds itself with
    ``exc``'s arguments and carries the original's names, so it prints, matches
    and pickles as the original type.
    """
    base = type(exc)
    timed = type(base.__name__, (base,), {
        "__init__": lambda self, *args: base.__init__(self, *(args or exc.args)),
        "__reduce__": lambda self: (base, self.args),   # pickles as the original
        "__module__": base.__module__, "__qualname__": base.__qualname__,
    })
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(timed))


def _count_calls(modules, name: str, firer: FaultFirer) -> None:
    """Count the calls of ``name``; one made inside another counted call is not counted again."""
    def make(original):
        def wrapper(*args, **kwargs):
            if getattr(_local, "depth", 0):
                return original(*args, **kwargs)
            _local.depth = 1
            try:
                index = firer.on_call(name, oplog.PYTHON, args, kwargs)
                try:
                    result = original(*args, **kwargs)
                except BaseException:
                    firer.on_return(index, failed=True)
                    raise
                firer.on_return(index, result)
                return result
            finally:
                _local.depth = 0
        return wrapper

    wrap(modules, name, make)


def _make_process_group_class(firer: FaultFirer):
    import torch
    import torch.distributed as dist
    from torch._C._distributed_c10d import ProcessGroupGloo

    class FaultInjectingGloo(dist.ProcessGroup):
        """gloo, with every op reported to the firer first (DDP's C++ calls included)."""

        def __init__(self, store, rank, size, timeout):
            super().__init__(rank, size)
            # on the node's own address (bound to, advertised to the peers), crossed links
            # through their proxies
            args, kwargs = gloo_arguments(store, rank, size, timeout, os.environ.get(NODE_ADDR_ENV), links.installed())
            self.inner = ProcessGroupGloo(*args, **kwargs)
            # what torch looks up by device (DDP's logger, ops not overridden here)
            self._register_backend(torch.device("cpu"), dist.ProcessGroup.BackendType.GLOO, self.inner)
            if hasattr(self, "_set_default_backend"):  # torch >= 2.3; 2.2 has no default backend
                self._set_default_backend(dist.ProcessGroup.BackendType.GLOO)

        def getBackendName(self):
            return "gloo"

        def name(self):
            return "gloo"

    def forward(method: str, op: str):
        on_inner = hasattr(ProcessGroupGloo, method)

        def call(self, *args, **kwargs):
            if getattr(_local, "depth", 0):  # counted (and logged) by the Python wrapper
                index = -1
            else:
                index = firer.on_call(op, oplog.CPP, args, kwargs, group=self)
            try:
                if on_inner:
                    result = getattr(self.inner, method)(*args, **kwargs)
                else:
                    result = getattr(dist.ProcessGroup, method)(self, *args, **kwargs)
            except BaseException:
                firer.on_return(index, failed=True)
                raise
            firer.on_return(index, result)
            return result
        call.__name__ = method
        return call

    for method, op in _PG_OPS.items():
        if hasattr(dist.ProcessGroup, method) or hasattr(ProcessGroupGloo, method):
            setattr(FaultInjectingGloo, method, forward(method, op))
    return FaultInjectingGloo


def _gloo_only(backend, device_id) -> bool:
    """Whether torch would run every device of the group on gloo: only then is the group
    given the wrapped gloo. Whatever else torch would choose (NCCL for CUDA when
    ``init_process_group()`` has no backend on a GPU machine or a CUDA ``device_id``,
    ``"cpu:gloo,cuda:nccl"``, a custom backend) is left to torch as it is: the wrapper
    replaces the whole group, so it cannot keep another backend beside itself."""
    import warnings

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    if backend is None and device_id is not None:
        return False  # torch picks the device's own backend (2.6+)
    try:
        with warnings.catch_warnings():  # torch warns again itself, if at all
            warnings.simplefilter("ignore")
            chosen = c10d.BackendConfig(dist.Backend(backend or "undefined")).get_device_backend_map()
    except Exception:  # torch says what is wrong with it
        return False
    return bool(chosen) and all(str(b) == dist.Backend.GLOO for b in chosen.values())


def _install_backend(firer: FaultFirer) -> None:
    """Route ``init_process_group`` to the wrapping backend where torch would use gloo
    alone; fire ``init`` in it."""
    import inspect

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    pg_class = _make_process_group_class(firer)
    dist.Backend.register_backend(_WRAPPED_BACKEND, lambda store, rank, size, timeout:
                                  pg_class(store, rank, size, timeout), devices=["cpu"])
    signature = inspect.signature(c10d.init_process_group)

    def make(original):
        def init_process_group(*args, **kwargs):
            return _init_on_wrapped_gloo(original, signature, firer, args, kwargs)
        return init_process_group

    wrap((dist, c10d), "init_process_group", make)
    _route_new_groups()


def _route_new_groups() -> None:
    """A gloo ``new_group`` is built on the same node device and through the same link
    proxies as the default group (``routed_gloo_class``), where the run gives them; torch
    builds it as it would otherwise."""
    from torch.distributed import distributed_c10d as c10d

    def make(original):
        def _new_process_group_helper(group_size, group_rank, global_ranks_in_group, *args, **kwargs):
            address, table = os.environ.get(NODE_ADDR_ENV), links.installed()
            if not global_ranks_in_group or not (address or table):
                return original(group_size, group_rank, global_ranks_in_group, *args, **kwargs)
            real = c10d.ProcessGroupGloo
            c10d.ProcessGroupGloo = routed_gloo_class(address, table, list(global_ranks_in_group))
            try:
                return original(group_size, group_rank, global_ranks_in_group, *args, **kwargs)
            finally:
                c10d.ProcessGroupGloo = real
        return _new_process_group_helper

    wrap((c10d,), "_new_process_group_helper", make)


def _init_on_wrapped_gloo(original, signature, firer: FaultFirer, args: tuple, kwargs: dict):
    """``init`` fires (and is logged) here; the group gets the wrapped gloo where torch would
    use gloo alone."""
    index = firer.on_call("init")
    try:
        result = _init_group(original, signature, args, kwargs)
    except BaseException:
        firer.on_return(index, failed=True)
        raise
    firer.on_return(index)
    return result


def _init_group(original, signature, args: tuple, kwargs: dict):
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    try:
        call = signature.bind(*args, **kwargs)
    except TypeError:  # torch says what is wrong with the call
        return original(*args, **kwargs)
    backend = call.arguments.get("backend")
    if not _gloo_only(backend, call.arguments.get("device_id")):
        return original(*args, **kwargs)
    # what torch records for the call (and users observe) stays what it would be
    recorded = dist.Backend(backend or "undefined")
    call.arguments["backend"] = _WRAPPED_BACKEND
    result = original(*call.args, **call.kwargs)
    pg = c10d._get_default_group()
    entry = c10d._world.pg_map.get(pg)
    if entry is not None:
        c10d._world.pg_map[pg] = (recorded, *entry[1:])
    if getattr(c10d, "_backend", None) == _WRAPPED_BACKEND:
        c10d._backend = recorded
    if pg in c10d._world.pg_backend_config:
        c10d._world.pg_backend_config[pg] = str(c10d.BackendConfig(recorded))
    return result


def _start_timer(firer: FaultFirer) -> None:
    started = threading.Event()

    def loop():
        # not before the starting thread is out of Thread.start(): an exception a fault raises
        # there (one due at once) would land in threading's own clean-up, not in the rank's code
        started.wait(_TIMER_START_WAIT)
        while True:
            nxt = firer.counter.next_time()
            if nxt is None:
                return
            wait = firer.started + nxt - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # a timer thread: sleeping until its own time is its whole job
            firer.on_time()

    threading.Thread(target=loop, name="ddpfault-timer", daemon=True).start()
    started.set()


def install_plan(plan, rank: int, world_size: int, events, started: float | None = None,
                 count_without_faults: bool = False, oplog=None, nodes: int = 1, timer: bool = True) -> FaultFirer:
    """Install the plan's in-rank faults for ``rank`` in this process (and count its calls
    even when none is for this rank, with ``count_without_faults`` or an ``oplog``, the
    ``rank/oplog.OpLog`` every counted call is written to). ``t=`` faults count from
    ``started``; with ``timer=False`` their timer waits for ``FaultFirer.start_timer()``."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    firer = FaultFirer(plan, rank, world_size, events, time.monotonic() if started is None else started,
                       oplog=oplog, nodes=nodes)
    if not firer.counter.faults and not count_without_faults and oplog is None:
        return firer
    _install_backend(firer)
    for name in sorted(KNOWN_OPS):
        _count_calls((dist, c10d), name, firer)
    count_storage_calls(firer)
    steps.hook = functools.partial(firer.on_call, "step")
    if timer:
        firer.start_timer()
    return firer


def release_the_gil_around_destroy() -> None:
    """Work around a gloo teardown race in torch (seen with 2.13).

    A finished gloo work can be released last by gloo's run-loop thread, whose
    destructor then needs the GIL (the work captured Python objects in its thread-local
    state). If the main thread destroys the process group at that moment, it joins
    the run-loop thread while holding the GIL, and the rank deadlocks. That happens
    when a DDP model is freed right after ``destroy_process_group()``. Releasing the
    GIL around it lets the run-loop threads finish first.
    """
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    def make(original):
        def destroy_process_group(*args, **kwargs):
            time.sleep(0.002)  # not a synchronisation: a GIL release the run-loop can use
            try:
                return original(*args, **kwargs)
            finally:
                time.sleep(0.002)
        return destroy_process_group

    wrap((dist, c10d), "destroy_process_group", make)


def on_first_init(callback) -> None:
    """Call ``callback(args, kwargs)`` inside the first ``init_process_group`` of the
    process (then the original is back in place); it may install the plan, whose own
    ``init_process_group`` then runs the call."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    owners = (dist, c10d)

    def make(original):
        def init_process_group(*args, **kwargs):
            unwrap(owners, "init_process_group", wrapper)
            callback(args, kwargs)
            return c10d.init_process_group(*args, **kwargs)
        return init_process_group

    wrapper = wrap(owners, "init_process_group", make)


def watch_children(on_spawned, on_exception, on_child_exit, on_child_signal) -> None:
    """What becomes of this process's ``multiprocessing`` children and ``mp.spawn`` workers.

    ``mp.spawn`` runs each worker in ``_wrap``, which catches the worker's exception,
    hands its text to the parent and calls ``sys.exit(1)``: the interpreter never sees the
    exception. Its ``_wrap`` is replaced (by name: the parent pickles it by name and the
    child looks it up after torch has been imported, i.e. after this ran) with one that
    reports the exception first (``on_spawned(index)``, ``on_exception(exc)``). The
    parent's ``Popen`` reports each child's exit code (or signal) when it reaps it
    (``on_child_exit(pid, code)``), and each signal it sends (``on_child_signal(pid, sig)``:
    ``terminate()``, ``kill()``).
    """
    import importlib
    from multiprocessing import popen_fork

    try:  # the module: torch.multiprocessing.spawn, the attribute, is the function
        tspawn = importlib.import_module("torch.multiprocessing.spawn")
    except ImportError:
        tspawn = None

    def make_wrap(original):
        def _wrap(fn, i, *rest):
            on_spawned(i)

            def reported(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                except Exception as exc:
                    on_exception(exc)
                    raise
            return original(reported, i, *rest)
        return _wrap

    if tspawn is not None:
        wrap((tspawn,), "_wrap", make_wrap)

    def make_poll(poll):
        def recording_poll(self, *args, **kwargs):
            before = self.returncode
            code = poll(self, *args, **kwargs)
            if before is None and self.returncode is not None:
                on_child_exit(self.pid, self.returncode)
            return code
        return recording_poll

    def make_send_signal(send_signal):
        def recording_send_signal(self, sig):
            if self.returncode is None:
                on_child_signal(self.pid, int(sig))
            return send_signal(self, sig)
        return recording_send_signal

    wrap((popen_fork.Popen,), "poll", make_poll)
    wrap((popen_fork.Popen,), "_send_signal", make_send_signal)


# --- checkpoint saves and loads: save#N, load#N ------------------------------------------

def count_storage_calls(firer: FaultFirer) -> None:
    """Count checkpoint saves and loads (``save``: torch.save, dcp save and async_save;
    ``load``: torch.load, dcp load) and let the faults due on one act on it (``StorageCall``).

    A call torch makes itself (DCP writes its items with torch.save, async_save runs save
    in a thread) is not counted again. DCP is wrapped when it is imported already or a
    fault of this rank is due on a save or load (importing it costs ~0.1 s a rank).
    """
    import sys

    import torch
    from torch import serialization

    from pytest_ddpfault.faults import STORAGE_FORMS

    _wrap_storage((torch, serialization), "save", "save", "torch.save", _TorchFileCall, firer)
    _wrap_storage((torch, serialization), "load", "load", "torch.load", _TorchFileCall, firer)
    due = any(f.resolved_at() is not None and f.resolved_at().kind in STORAGE_FORMS for f in firer.counter.faults)
    if not due and "torch.distributed.checkpoint" not in sys.modules:
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict_loader, state_dict_saver

    _wrap_storage((dcp, state_dict_saver), "save", "save", "dcp.save", _DcpCall, firer)
    _wrap_storage((dcp, state_dict_saver), "async_save", "save", "dcp.async_save", _DcpCall, firer)
    _wrap_storage((dcp, state_dict_loader), "load", "load", "dcp.load", _DcpCall, firer)


def _wrap_storage(owners, name: str, op: str, api: str, call_class, firer: FaultFirer) -> None:
    import inspect
    import sys

    from pytest_ddpfault.faults import storage_call

    def make(original):
        signature = inspect.signature(original)

        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__") or ""
            if caller.startswith("torch."):  # torch's own call inside a counted one
                return original(*args, **kwargs)
            call = call_class(op, api, original, signature, args, kwargs)
            with storage_call(call):
                index = firer.on_call(op)
            ended = getattr(firer, "on_return", None)  # the operation log, where there is one
            try:
                result = call.run()
            except BaseException:
                if ended is not None:
                    ended(index, failed=True)
                raise
            if ended is not None:
                ended(index)
            return result
        return wrapper

    wrap(owners, name, make)


def _durable(f) -> None:
    import io
    import os

    f.flush()
    try:
        os.fsync(f.fileno())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):  # no file behind it
        pass


class _TorchFileCall:
    """A torch.save or torch.load call, as a storage fault sees it (``StorageCall``)."""

    def __init__(self, op: str, api: str, original, signature, args: tuple, kwargs: dict) -> None:
        import os

        self.op, self.api, self.original = op, api, original
        self.bound = signature.bind(*args, **kwargs)
        self.f = self.bound.arguments.get("f")
        self.path = os.fspath(self.f) if isinstance(self.f, (str, os.PathLike)) else None
        self.target = self.path or "<file object>"
        self.done = False

    def run(self):
        if self.done:  # a torn save stopped here (and its rank did not die)
            return None
        return self.original(*self.bound.args, **self.bound.kwargs)

    def _saved_bytes(self) -> bytes:
        """This save's bytes, exactly: saved to a file of the same name elsewhere (the
        archive inside is named after the file) or to memory for a file object."""
        import io
        import os
        import tempfile

        bound = self.bound.signature.bind(*self.bound.args, **self.bound.kwargs)
        if self.path is None:
            bound.arguments["f"] = buf = io.BytesIO()
            self.original(*bound.args, **bound.kwargs)
            return buf.getvalue()
        with tempfile.TemporaryDirectory(prefix="ddpfault-torn-") as d:
            bound.arguments["f"] = os.path.join(d, os.path.basename(self.path))
            self.original(*bound.args, **bound.kwargs)
            with open(bound.arguments["f"], "rb") as src:
                return src.read()

    def write_prefix(self, fraction: float, then) -> None:
        if self.op != "save":
            raise TypeError(f"{self.api} writes nothing: a torn save acts on a save")
        data = self._saved_bytes()
        data = data[:int(len(data) * fraction)]
        if self.path is None:
            self.f.write(data)
            _durable(self.f)
        else:
            with open(self.path, "wb") as out:
                out.write(data)
                _durable(out)
        self.done = True
        then()

    def fail(self, exc: OSError, opened: bool) -> None:
        if self.path is not None:
            exc.filename = self.path
            if opened and self.op == "save":
                open(self.path, "wb").close()  # open() creates or empties it; the write then fails
        raise exc


class _DcpCall:
    """A torch.distributed.checkpoint save, async_save or load, as a storage fault sees it:
    it acts through the call's storage writer or reader, so that DCP handles it as its own
    (a failure reaches every rank through DCP's collectives)."""

    def __init__(self, op: str, api: str, original, signature, args: tuple, kwargs: dict) -> None:
        self.op, self.api, self.original = op, api, original
        self.bound = signature.bind(*args, **kwargs)
        self.key = "storage_writer" if op == "save" else "storage_reader"
        component = self.bound.arguments.get(self.key)
        where = getattr(component, "path", None) or self.bound.arguments.get("checkpoint_id")
        self.target = str(where) if where is not None else "<storage>"

    def run(self):
        return self.original(*self.bound.args, **self.bound.kwargs)

    def _component(self):
        """The call's writer (or reader); made here as DCP would from ``checkpoint_id``
        when the call did not pass one, and passed to the call."""
        component = self.bound.arguments.get(self.key)
        if component is None:
            import torch.distributed.checkpoint as dcp

            checkpoint_id = self.bound.arguments.get("checkpoint_id")
            if checkpoint_id is None:
                raise TypeError(f"{self.api} without checkpoint_id or {self.key}: nothing to act on")
            make = dcp.FileSystemWriter if self.op == "save" else dcp.FileSystemReader
            component = make(checkpoint_id)
            self.bound.arguments[self.key] = component
        return component

    def write_prefix(self, fraction: float, then) -> None:
        if self.op != "save":
            raise TypeError(f"{self.api} writes nothing: a torn save acts on a save")
        writer = self._component()
        write_data = writer.write_data

        def torn_write_data(plan, planner):
            results = write_data(plan, planner).wait()
            _cut_files(getattr(writer, "path", None), results, fraction)
            then()  # before the results go back, so no rank ever writes .metadata
            raise RuntimeError(f"{self.api}: torn after {fraction:.0%} of its bytes")  # then() came back

        writer.write_data = torn_write_data

    def fail(self, exc: OSError, opened: bool) -> None:
        component = self._component()
        method = "write_data" if self.op == "save" else "read_data"

        def failing(*args, **kwargs):
            raise exc

        setattr(component, method, failing)


def _cut_files(root, results, fraction: float) -> None:
    """Keep the first ``fraction`` of the bytes of the files a DCP writer wrote, in the order
    it named them; cut the file at the mark, remove the later ones; make it durable."""
    import os
    import re

    names = {getattr(r.storage_data, "relative_path", None) for r in results}
    if root is None or None in names:
        return  # a writer that does not name files: the save still never finishes
    order = sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
    paths = [os.path.join(os.fspath(root), n) for n in order]
    keep = int(sum(os.path.getsize(p) for p in paths) * fraction)
    for path in paths:
        size = os.path.getsize(path)
        if keep <= 0:
            os.remove(path)
            continue
        if keep < size:
            os.truncate(path, keep)
        with open(path, "rb+") as f:
            _durable(f)
        keep -= size
