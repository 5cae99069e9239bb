"""Several runs side by side on one zygote: a reader thread routes the zygote's replies.

A ``ZygoteLauncher`` is one control socket; a run reads it for its own children's exits
and drops the others'. Runs in threads (a sweep's) would steal each other's exits, so
while they run one reader thread owns the socket (``SharedZygote``): it hands each
"spawned" reply to the run that asked and each "exited" to the run that owns the pid,
and wakes that run through a pipe of its own (``RunView.selectables``). A run sees a
``RunView`` with the launcher's API; sends go through one lock (a spawn frame holds a
pickled job, larger than one ``send``).

Use::

    with SharedZygote(get_launcher(...)) as shared:
        ...  # in each thread: a run whose launcher is shared.view()
"""
from __future__ import annotations

import os
import select
import threading

from pytest_ddpfault import ipc
from pytest_ddpfault.deadline import Deadline
from pytest_ddpfault.parent.launcher import ChildExit, LauncherError, ZygoteLauncher

READ_TICK = 0.5      # the reader thread looks at its stop pipe at least this often
STOP_BUDGET = 10.0   # for the reader thread to end once told


class SharedZygote:
    """Owns the zygote's control socket while runs share it from threads."""

    def __init__(self, launcher: ZygoteLauncher) -> None:
        self.launcher = launcher
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()             # the routing tables
        self._by_id: dict[int, RunView] = {}      # spawn request id -> the view that sent it
        self._by_pid: dict[int, RunView] = {}     # child pid -> the view whose run owns it
        self._early: dict[int, ChildExit] = {}    # exits of pids no view claims (yet)
        self.error: Exception | None = None       # the zygote died or spoke nonsense
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._read_loop, name="ddpfault-zygote-reader", daemon=True)

    def __enter__(self) -> SharedZygote:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(STOP_BUDGET)
        os.close(self._stop_r)
        os.close(self._stop_w)
        if self._thread.is_alive():  # blocked in a read: the zygote hung mid-frame
            raise LauncherError(f"the zygote's reader thread did not stop within {STOP_BUDGET:g} s")
        with self._lock:  # exits nobody claimed go back to the launcher, as if never read here
            self.launcher._exits.extend(self._early.values())
            self._early.clear()

    def view(self) -> RunView:
        if self.error is not None:
            raise LauncherError(str(self.error))
        return RunView(self)

    # -- the reader thread ----------------------------------------------------------
    def _read_loop(self) -> None:
        sock = self.launcher.sock
        while True:
            ready, _, _ = select.select([sock, self._stop_r], [], [], READ_TICK)
            if self._stop_r in ready:
                return
            if sock not in ready:
                continue
            try:
                frames = self.launcher._read_frames(Deadline(0))
            except Exception as exc:  # LauncherError, a bad frame: every run is told
                self._fail(exc)
                return
            exits, self.launcher._exits = self.launcher._exits, []
            for msg in frames:  # "spawned" first: a child can exit in the same batch
                if msg["type"] == "spawned":
                    with self._lock:
                        view = self._by_id.pop(msg["id"], None)
                        if view is not None:
                            self._by_pid[msg["pid"]] = view
                    if view is not None:
                        view._spawned_reply(msg)
            for ex in exits:
                with self._lock:
                    view = self._by_pid.pop(ex.pid, None)
                    if view is None:
                        self._early[ex.pid] = ex
                if view is not None:
                    view._exited(ex)

    def _fail(self, exc: Exception) -> None:
        with self._lock:
            self.error = exc
            views = set(self._by_id.values()) | set(self._by_pid.values())
        for view in views:
            view._wake()

    # -- for views --------------------------------------------------------------------
    def _send(self, frames: bytes) -> None:
        with self._send_lock:
            self.launcher.sock.sendall(frames)

    def _spawn(self, view: RunView, jobs: list) -> list[int]:
        with self._send_lock:  # ids in the order they are sent
            ids = [next(self.launcher._ids) for _ in jobs]
            with self._lock:
                for i in ids:
                    self._by_id[i] = view
            self.launcher.sock.sendall(b"".join(ipc.encode_frame(ipc.message("spawn", id=i, job=j))
                                                for i, j in zip(ids, jobs)))
        return ids

    def _forget(self, view: RunView) -> None:
        with self._lock:
            for table in (self._by_id, self._by_pid):
                for key in [k for k, v in table.items() if v is view]:
                    del table[key]


class RunView:
    """One run's launcher while runs share a zygote: the ``ZygoteLauncher`` API."""

    method = "forkserver"

    def __init__(self, shared: SharedZygote) -> None:
        self.shared = shared
        self._cond = threading.Condition()
        self._started: dict[int, tuple[int, float]] = {}
        self._exits: list[ChildExit] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closed = False   # its pipe is closed: its fd numbers may belong to others now

    # -- from the reader thread ----------------------------------------------------
    def _spawned_reply(self, msg: dict) -> None:
        with self._cond:
            self._started[msg["id"]] = (msg["pid"], msg["time"])
            self._cond.notify_all()

    def _exited(self, ex: ChildExit) -> None:
        with self._cond:
            self._exits.append(ex)
        self._wake()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()
            if self._closed:
                return
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:  # full: it is woken already
                pass

    def _check(self) -> None:
        if self.shared.error is not None:
            raise LauncherError(f"the zygote failed while runs shared it: {self.shared.error}")

    # -- the launcher API ----------------------------------------------------------------
    def launch_many(self, jobs: list, deadline: Deadline) -> list[tuple[int, float]]:
        ids = self.shared._spawn(self, jobs)
        with self._cond:
            while not all(i in self._started for i in ids):
                self._check()
                if deadline.expired():
                    raise LauncherError(f"the zygote did not start {sum(i not in self._started for i in ids)} "
                                        f"of {len(ids)} processes in time")
                self._cond.wait(deadline.remaining())
            return [self._started.pop(i) for i in ids]

    def selectables(self) -> list:
        return [self._wake_r]

    def has_pending_exits(self) -> bool:
        with self._cond:
            return bool(self._exits) or self.shared.error is not None

    def exits(self, deadline: Deadline | None = None) -> list[ChildExit]:
        if deadline is not None and not deadline.expired():
            select.select([self._wake_r], [], [], deadline.remaining())
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._check()
        with self._cond:
            out, self._exits = self._exits, []
        return out

    def signal(self, pid: int, sig: int, group: bool = True) -> None:
        try:
            self.shared._send(ipc.encode_frame(ipc.message("signal", pid=pid, sig=int(sig), group=group)))
        except OSError:
            pass  # zygote gone: its children died with it (PDEATHSIG)

    def end_run(self) -> None:
        self.shared._forget(self)
        with self._cond:
            if not self._closed:
                self._closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)
