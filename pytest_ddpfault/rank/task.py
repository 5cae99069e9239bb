"""Runs inside a rank: the user's function, the fault plan's triggers, the result.

Imports nothing from the pytest side. The result goes to a file (atomically, so a
rank killed half-way leaves none rather than a torn one); events go to the harness's
inbox as they happen.
"""
from __future__ import annotations

import os
import pickle
import sys
import time
from dataclasses import dataclass

import cloudpickle

from pytest_ddpfault import ipc, links
from pytest_ddpfault.frames import exception_fields
from pytest_ddpfault.ipc import EventSink
from pytest_ddpfault.rank import netns
from pytest_ddpfault.rank.hooks import install_plan, release_the_gil_around_destroy
from pytest_ddpfault.rank.oplog import OpLog


@dataclass
class RankTask:
    rank: int
    world_size: int
    fn_blob: bytes            # cloudpickle of (fn, args, kwargs)
    init: bool
    backend: str
    faults: tuple             # the whole plan, as spec strings; each rank picks its own
    result_path: str
    events_path: str
    oplog_path: str = ""      # where the rank logs its ops (rank/oplog.py); "" = no log
    nodes: int = 1            # virtual nodes: with more than one, the wrapped gloo binds to the node's address
    links: dict | None = None  # links.LinkProxies.to_wire(): the proxies of the links scoped faults cross
    netns: dict | None = None  # netns.NamespaceCuts.to_wire(): the node namespaces (the "namespaces" engine)


def exception_record(exc: BaseException) -> dict:
    try:
        blob = cloudpickle.dumps(exc)
        pickle.loads(blob)  # only keep what can be rebuilt
    except Exception:
        blob = None
    return {"status": "raised", "exc_blob": blob, **exception_fields(exc)}


def value_record(value, rank: int) -> dict:
    try:
        return {"status": "ok", "value_blob": cloudpickle.dumps(value)}
    except Exception as exc:
        err = TypeError(f"rank {rank} returned a value that cannot be pickled "
                        f"({type(value).__name__}): {exc}")
        return exception_record(err)


def write_result(path: str, record: dict) -> None:
    ipc.write_file(path, "result", **record, end=time.monotonic())


def _call_user(task: RankTask):
    fn, args, kwargs = cloudpickle.loads(task.fn_blob)
    if not task.init:
        return fn(*args, **kwargs)
    import torch.distributed as dist

    dist.init_process_group(task.backend)
    try:
        return fn(*args, **kwargs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def rank_main(job) -> int:
    """``ChildJob`` target of every rank; returns the process exit code."""
    # t= triggers count from the moment the launcher started this process, the origin of its
    # duration in the report (a forked rank can run before its zygote took a later time)
    job_started = job.started or time.monotonic()
    task: RankTask = pickle.loads(job.payload)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    events = EventSink(task.events_path)
    release_the_gil_around_destroy()
    firer = None
    # with the log on, every rank counts and logs its calls; with nodes or links, the wrapped
    # gloo binds each rank's device to its node's address (and routes crossed links via proxies)
    if task.links:
        links.install(links.LinkProxies.from_wire(task.links))
    if task.netns:
        netns.install(netns.NamespaceCuts.from_wire(task.netns))
    if task.faults or task.oplog_path or task.nodes > 1:
        log = OpLog(task.oplog_path) if task.oplog_path else None
        firer = install_plan(task.faults, task.rank, task.world_size, events, started=job_started, oplog=log,
                             nodes=task.nodes, count_without_faults=task.nodes > 1 or bool(task.links),
                             timer=False)
    try:
        if firer is not None:  # here: a t= crash_rank raises in the user's code, never before it
            firer.start_timer()
        value = _call_user(task)
    except SystemExit as exc:  # the user's own exit: the process exits, no result
        if firer is not None and firer.oplog is not None:
            firer.settle()
        sys.stdout.flush()
        sys.stderr.flush()
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:
        record = exception_record(exc)
    else:
        record = value_record(value, task.rank)
    if firer is not None and firer.oplog is not None:
        firer.settle()  # async works that completed since the last call
    if firer is not None:  # what this rank did instead of what an unfired fault waited for
        record["unfired"] = {str(f): why for f, why in firer.counter.unfired(time.monotonic() - job_started)}
    write_result(task.result_path, record)
    return 0
