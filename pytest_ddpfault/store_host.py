"""Runs in the store-host process: the run's c10d TCPStore, bound to port 0.

Every rank, rank 0 included, connects to it as a client (torchrun's agent-store
layout), so no port is ever probed, closed and handed out. The harness ends the
store by killing this process: the kernel then closes every client connection, which
is also exactly how ``store_down`` takes it away mid-run.
"""
from __future__ import annotations

import pickle
import signal
from datetime import timedelta

from pytest_ddpfault._events import EventSink


def store_main(job) -> int:
    opts = pickle.loads(job.payload)
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, opts["world_size"], is_master=True,
                     wait_for_workers=False, timeout=timedelta(seconds=opts["timeout"]))
    EventSink(opts["events_path"]).send({"type": "store_ready", "port": store.port})
    while True:  # until the harness kills this process
        signal.pause()
