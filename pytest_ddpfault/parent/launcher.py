"""Parent side of process start: the zygote client and the spawn fallback.

Both launchers start a ``ChildJob`` in a new process group, report each child's end
as a ``ChildExit`` and signal only children they have not reaped yet. The harness
selects on ``selectables()`` and then calls ``exits()``.
"""
from __future__ import annotations

import atexit
import dataclasses
import itertools
import os
import pickle
import select
import signal as _signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

from pytest_ddpfault import ipc
from pytest_ddpfault.deadline import Deadline
from pytest_ddpfault.parent import warm
from pytest_ddpfault.rank.bootstrap import ChildJob
from pytest_ddpfault.tmpfiles import RUN_DIR_PREFIX, ZYGOTE_LOG_PREFIX, remove_owned  # noqa: F401

# What DDP needs, imported once in the zygote: constructing DistributedDataParallel
# lazily imports torch._dynamo (~800 modules, 2-4 s a rank otherwise).
DEFAULT_PRELOAD = (
    "torch",
    "torch.distributed",
    "torch.nn.parallel",
    "torch._dynamo",
    "cloudpickle",
    "pytest",
    "pytest_ddpfault.rank.task",
    "pytest_ddpfault.rank.store_host",
)
ZYGOTE_START_TIMEOUT = 180.0  # importing torch on a loaded 2-core machine can take ~10 s
# Keep BLAS/OpenMP pools from starting threads at import: the zygote must fork thread-free.
SINGLE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def sweep_stale_files(tmp: str | None = None) -> None:
    """Remove run dirs and zygote logs of processes that died without cleaning up
    (a SIGKILLed pytest cannot, nor could its zygote): their names carry the owner's pid."""
    remove_owned(lambda owner: not os.path.exists(f"/proc/{owner}"), tmp)


class LauncherError(RuntimeError):
    pass


@dataclass(frozen=True)
class ChildExit:
    pid: int
    exit_code: int | None   # set when the child exited
    signal: int | None      # set when a signal ended it
    time: float             # time.monotonic() of its end


def child_python_env() -> dict:
    """Env for a fresh interpreter that must import what this one imports."""
    env = dict(os.environ)
    env.update(SINGLE_THREAD_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def _decode_status(pid: int, status: int, when: float) -> ChildExit:
    if os.WIFSIGNALED(status):
        return ChildExit(pid, None, os.WTERMSIG(status), when)
    return ChildExit(pid, os.waitstatus_to_exitcode(status), None, when)


_FROM_ZYGOTE = ("ready", "spawned", "exited", "error")


class ZygoteLauncher:
    """Client of one zygote process (see ``zygote.py``), started for this process."""

    method = "forkserver"
    kept_warm = False

    def __init__(self, preload: tuple[str, ...]) -> None:
        self._init_client(preload)
        sweep_stale_files()
        self._log = tempfile.NamedTemporaryFile(prefix=f"{ZYGOTE_LOG_PREFIX}{os.getpid()}-", suffix=".log",
                                                delete=False)
        self._log_path = self._log.name
        parent_sock, child_sock = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pytest_ddpfault.rank.zygote", str(child_sock.fileno()),
                 str(os.getpid()), *self.preload],
                pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL,
                stdout=self._log, stderr=self._log, env=child_python_env(),
                start_new_session=True,  # Ctrl-C is for the pytest process; it cleans up
            )
        finally:
            child_sock.close()
        self.sock = parent_sock

    def _init_client(self, preload: tuple[str, ...]) -> None:
        self.preload = tuple(dict.fromkeys(DEFAULT_PRELOAD + tuple(preload)))
        self._ids = itertools.count()
        self._reader = ipc.FrameReader()
        self._exits: list[ChildExit] = []
        self._ready: dict | None = None
        self._warned = False
        self.started_at = time.monotonic()
        self.start_seconds: float | None = None   # from start to ready
        self.waited_seconds = 0.0                 # how long a run blocked waiting for it

    @property
    def pid(self) -> int:
        return self.proc.pid

    # -- wire ------------------------------------------------------------------
    def _read_frames(self, deadline: Deadline) -> list[dict]:
        ready, _, _ = select.select([self.sock], [], [], deadline.remaining())
        if not ready:
            return []
        data = self.sock.recv(1 << 16)
        if not data:
            self._gone()
            raise LauncherError(f"the zygote (pid {self.pid}) died{self._log_tail()}")
        frames = [ipc.check_type(m, _FROM_ZYGOTE, "the zygote") for m in self._reader.feed(data)]
        for msg in frames:
            if msg["type"] == "exited":
                self._exits.append(_decode_status(msg["pid"], msg["status"], msg["time"]))
            elif msg["type"] == "error":
                raise LauncherError(f"zygote: {msg['message']}")
        return [m for m in frames if m["type"] not in ("exited", "error")]

    def _gone(self) -> None:
        """The zygote closed the connection."""

    def _log_tail(self) -> str:
        try:
            with open(self._log_path, errors="replace") as f:
                text = f.read()[-4000:]
        except OSError:
            return ""
        return f"; its output:\n{text}" if text.strip() else ""

    def wait_ready(self, deadline: Deadline) -> dict:
        waiting_since = time.monotonic()
        while self._ready is None:
            if deadline.expired():
                raise LauncherError(
                    f"the zygote did not get ready within its start-up budget (preload {', '.join(self.preload)})"
                    f"{self._log_tail()}")
            for msg in self._read_frames(deadline):
                if msg["type"] == "ready":
                    self._ready = msg
                    now = time.monotonic()
                    self.start_seconds, self.waited_seconds = now - self.started_at, now - waiting_since
        if self._ready["errors"]:
            bad = "\n".join(f"--- {m}:\n{tb}" for m, tb in self._ready["errors"].items())
            raise LauncherError(f"--ddp-preload: these modules failed to import in the zygote:\n{bad}")
        if self._ready["threads"] > 1 and not self._warned:
            self._warned = True
            warnings.warn(f"pytest-ddpfault: the zygote runs {self._ready['threads']} threads after importing "
                          f"{', '.join(self.preload)}; forking a threaded process can deadlock ranks. "
                          f"Drop the module that starts threads from --ddp-preload, or use "
                          f"--ddp-start-method spawn.", RuntimeWarning, stacklevel=2)
        return self._ready

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    # -- launcher API -----------------------------------------------------------
    def launch_many(self, jobs: list[ChildJob], deadline: Deadline) -> list[tuple[int, float]]:
        """Start every job; return ``(pid, start time)`` in the same order."""
        self.wait_ready(deadline)
        ids = [next(self._ids) for _ in jobs]
        self.sock.sendall(b"".join(ipc.encode_frame(ipc.message("spawn", id=i, job=j)) for i, j in zip(ids, jobs)))
        started: dict[int, tuple[int, float]] = {}
        while len(started) < len(ids):
            if deadline.expired():
                raise LauncherError(f"the zygote did not start {len(ids) - len(started)} of {len(ids)} processes in time")
            for msg in self._read_frames(deadline):
                if msg["type"] == "spawned":
                    started[msg["id"]] = (msg["pid"], msg["time"])
        return [started[i] for i in ids]

    def selectables(self) -> list:
        return [self.sock]

    def has_pending_exits(self) -> bool:
        """Exits already read (while waiting for something else) but not handed out."""
        return bool(self._exits)

    def exits(self, deadline: Deadline | None = None) -> list[ChildExit]:
        """Exits reported so far; reads what the socket has (waiting at most until ``deadline``)."""
        self._read_frames(deadline or Deadline(0))
        out, self._exits = self._exits, []
        return out

    def signal(self, pid: int, sig: int, group: bool = True) -> None:
        try:
            ipc.send_frame(self.sock, "signal", pid=pid, sig=int(sig), group=group)
        except OSError:
            pass  # zygote gone: its children died with it (PDEATHSIG)

    def end_run(self) -> None:
        """Nothing to do: the zygote serves the next run."""

    def close(self, timeout: float = 5.0) -> None:
        try:
            ipc.send_frame(self.sock, "shutdown")
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
        self.sock.close()
        self._log.close()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass


class _Remote:
    """A kept-warm zygote, as ``ZygoteLauncher.proc``: not this process's child."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid


class WarmZygoteLauncher(ZygoteLauncher):
    """Client of a kept-warm zygote (``--ddp-keep-warm``, see ``warm.py``): it connects to
    the one serving this key, or starts it. Closing the connection (this process ends,
    or dies) makes the zygote kill this client's processes; the zygote stays."""

    kept_warm = True
    HANDSHAKE_TIMEOUT = 10.0   # a serving zygote answers a hello in milliseconds
    REPLACED_AT_MOST = 3       # stale zygotes replaced in a row before giving up

    def __init__(self, preload: tuple[str, ...], idle: float) -> None:
        self._init_client(preload)
        self.idle = idle
        self.dir = warm.private_dir()
        self.key = warm.zygote_key(self.preload)
        self._log_path = warm.paths(self.dir, self.key)["log"]
        self.proc = _Remote(None)
        self.sock = None
        self._dead = False
        self.started_here = False
        self.replaced: list[str] = []   # why stale zygotes were not used
        self.clients_served = 0
        # Start it now if nobody owns the key, so that its imports overlap collection.
        if warm.owner_pid(self.dir, self.key) is None:
            self.started_here = warm.start(self.dir, self.key, idle, self.preload, child_python_env(),
                                           Deadline.after(ZYGOTE_START_TIMEOUT))

    @property
    def alive(self) -> bool:
        return not self._dead

    def _gone(self) -> None:
        self._dead = True

    def _reply(self, deadline: Deadline) -> dict | None:
        """The zygote's answer to hello; None if it closed the connection (retiring)."""
        reader = ipc.FrameReader()
        while not deadline.expired():
            ready, _, _ = select.select([self.sock], [], [], deadline.remaining())
            if not ready:
                break
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            for msg in reader.feed(data):
                return ipc.check_type(msg, ("ready", "stale"), f"the kept-warm zygote ({self.dir})")
        raise warm.WarmUnavailable(f"the kept-warm zygote behind {warm.paths(self.dir, self.key)['sock']} did not "
                                   f"answer within {self.HANDSHAKE_TIMEOUT:g} s")

    def _connect(self, deadline: Deadline) -> None:
        waiting_since = time.monotonic()
        for _ in range(self.REPLACED_AT_MOST):
            self.sock, started = warm.connect_or_start(self.dir, self.key, self.idle, self.preload,
                                                       child_python_env(), deadline)
            self.started_here |= started
            ipc.send_frame(self.sock, "hello", key=self.key, pid=os.getpid())
            msg = self._reply(deadline.within(self.HANDSHAKE_TIMEOUT))
            if msg is not None and msg["type"] == "ready":
                peer, _ = warm.peer_uid(self.sock)
                if peer != msg["pid"]:
                    raise warm.WarmUnavailable(f"the kept-warm zygote says it is pid {msg['pid']}, "
                                               f"its socket says pid {peer}")
                now = time.monotonic()
                self._ready, self.proc = msg, _Remote(msg["pid"])
                self.clients_served = msg.get("clients_served", 0)
                self.start_seconds, self.waited_seconds = now - self.started_at, now - waiting_since
                return
            self.replaced.append(msg["reason"] if msg is not None else "it closed the connection")
            self.sock.close()
            self.sock = None
        raise warm.WarmUnavailable(f"kept-warm zygotes were stale {self.REPLACED_AT_MOST} times in a row: "
                                   f"{'; '.join(self.replaced)}")

    def wait_ready(self, deadline: Deadline) -> dict:
        if self._ready is None:
            self._connect(deadline)
        return super().wait_ready(deadline)

    def end_run(self) -> None:
        """Nothing to do: the zygote serves the next run."""

    def close(self, timeout: float = 5.0) -> None:
        """The zygote kills what this client left and stays warm for the next."""
        if self.sock is not None:
            self.sock.close()
        self._dead = True


class SpawnLauncher:
    """Each child is a fresh interpreter (``--ddp-start-method spawn``): slow, but no zygote."""

    method = "spawn"

    def __init__(self, preload: tuple[str, ...] = ()) -> None:
        self.preload = tuple(preload)   # the user's --ddp-preload, imported in each child first
        self._procs: dict[int, tuple[subprocess.Popen, int]] = {}
        self._exits: list[ChildExit] = []

    def launch_many(self, jobs: list[ChildJob], deadline: Deadline) -> list[tuple[int, float]]:
        out = []
        for job in jobs:
            job_file = job.stack_path.rsplit(".", 1)[0] + ".job" if job.stack_path else job.stdout_path + ".job"
            started = time.monotonic()  # the child's own origin too (ChildJob.started)
            with open(job_file, "wb") as f:
                pickle.dump(dataclasses.replace(job, preload=self.preload, started=started), f)
            proc = subprocess.Popen(
                [sys.executable, "-m", "pytest_ddpfault.rank.bootstrap", job_file, str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=child_python_env(), start_new_session=True)
            self._procs[proc.pid] = (proc, os.pidfd_open(proc.pid))
            out.append((proc.pid, started))
        return out

    def selectables(self) -> list:
        return [fd for _, fd in self._procs.values()]

    def has_pending_exits(self) -> bool:
        return bool(self._exits)

    def exits(self, deadline: Deadline | None = None) -> list[ChildExit]:
        fds = {fd: pid for pid, (_, fd) in self._procs.items()}
        if fds:
            ready, _, _ = select.select(list(fds), [], [], (deadline or Deadline(0)).remaining())
            for fd in ready:
                pid = fds[fd]
                proc, _ = self._procs.pop(pid)
                os.close(fd)
                code = proc.wait()
                when = time.monotonic()
                self._exits.append(ChildExit(pid, None, -code, when) if code < 0 else ChildExit(pid, code, None, when))
        out, self._exits = self._exits, []
        return out

    def signal(self, pid: int, sig: int, group: bool = True) -> None:
        entry = self._procs.get(pid)
        if entry is None or entry[0].returncode is not None:
            return  # reaped: its pid may belong to someone else now
        try:
            os.killpg(pid, sig) if group else os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def end_run(self) -> None:
        self.close()

    def close(self, timeout: float = 5.0) -> None:
        for pid in list(self._procs):
            self.signal(pid, _signal.SIGKILL)
        self.exits(Deadline.after(timeout))


_lock = threading.Lock()
_zygotes: dict[tuple[str, ...], ZygoteLauncher] = {}
_warm_zygotes: dict[tuple[str, ...], WarmZygoteLauncher] = {}
_keep_warm: float | None = None     # idle seconds of a kept-warm zygote; None: one per process
_fallbacks: list[str] = []
_fell_back: set[tuple[str, ...]] = set()  # preload sets whose kept-warm zygote could not be used


def configure_keep_warm(idle: float | None) -> float | None:
    """``--ddp-keep-warm``: zygotes outlive this process (``idle``: seconds they wait for a
    client); None: one zygote per process. Returns the previous setting."""
    global _keep_warm
    previous, _keep_warm = _keep_warm, idle
    return previous


def _fall_back(preload: tuple[str, ...], exc: Exception) -> ZygoteLauncher:
    """A kept-warm zygote cannot be used: say why, and start one for this process."""
    _fallbacks.append(str(exc))
    _fell_back.add(preload)
    warnings.warn(f"pytest-ddpfault: --ddp-keep-warm: {exc}; starting a zygote for this process instead",
                  RuntimeWarning, stacklevel=3)
    _warm_zygotes.pop(preload, None)
    z = _zygotes.get(preload)
    if z is None or not z.alive:
        z = _zygotes[preload] = ZygoteLauncher(preload)
    return z


def _current(preload: tuple[str, ...]) -> ZygoteLauncher:
    """The live launcher for ``preload``, created (not waited for) if there is none."""
    warm_wanted = _keep_warm is not None and preload not in _fell_back  # one try per process
    z = (_warm_zygotes if warm_wanted else _zygotes).get(preload)
    if z is not None and not z.alive:
        z.close()
        z = None
    if z is None and warm_wanted:
        try:
            z = _warm_zygotes[preload] = WarmZygoteLauncher(preload, _keep_warm)
        except (warm.WarmUnavailable, OSError) as exc:
            z = _fall_back(preload, exc)
    elif z is None:
        z = _zygotes[preload] = ZygoteLauncher(preload)
    return z


def prestart(preload: tuple[str, ...] = ()) -> None:
    """Start the zygote now (without waiting), so its start-up overlaps other work."""
    with _lock:
        _current(preload)


def get_launcher(method: str = "forkserver", preload: tuple[str, ...] = (), deadline: Deadline | None = None):
    """The launcher for ``method``; the zygote is shared by every run of this process.
    Waits for the zygote to be ready until ``deadline`` (default: its start-up budget)."""
    if method == "spawn":
        return SpawnLauncher(preload)
    if method != "forkserver":
        raise LauncherError(f"start method {method!r} is not one of: forkserver, spawn")
    deadline = deadline or Deadline.after(ZYGOTE_START_TIMEOUT)
    with _lock:
        z = _current(preload)
        if z.kept_warm:
            # a part of the budget: what is left is the fallback's, which imports torch itself
            try:
                z.wait_ready(Deadline(time.monotonic() + 0.6 * deadline.remaining()))
                return z
            except (warm.WarmUnavailable, ipc.UnknownMessage, pickle.UnpicklingError, OSError) as exc:
                z.close()
                z = _fall_back(preload, exc)
    z.wait_ready(deadline)
    return z


def start_report() -> str:
    """One line on the zygotes' start-up, for the end of a pytest session ("" if none started)."""
    parts = []
    for z in list(_warm_zygotes.values()):
        if z.start_seconds is None:
            continue
        if z.started_here:
            parts.append(f"started a kept-warm zygote (pid {z.pid}) in {z.start_seconds:.1f} s; later runs "
                         f"reuse it until it has had no client for {z.idle:g} s")
        else:
            age = time.time() - z._ready.get("started", time.time())
            parts.append(f"ranks forked from the kept-warm zygote (pid {z.pid}, up {age:.0f} s, "
                         f"client {z.clients_served}), reached in {z.start_seconds:.2f} s")
        if z.replaced:
            parts[-1] += f" (replaced a stale one: {'; '.join(z.replaced)})"
    for reason in _fallbacks:
        parts.append(f"--ddp-keep-warm fell back to a zygote of this process: {reason}")
    for z in list(_zygotes.values()):
        if z.start_seconds is None:
            continue
        parts.append(f"the rank zygote started in {z.start_seconds:.1f} s (importing torch and the preload set)")
        if z.waited_seconds >= 0.05:
            parts[-1] += (f"; the first test that ran ranks waited {z.waited_seconds:.1f} s for it, "
                          "and its duration includes that wait")
    return "; ".join(parts)


def shutdown_all() -> None:
    with _lock:
        for z in [*_zygotes.values(), *_warm_zygotes.values()]:
            z.close()
        _zygotes.clear()
        _warm_zygotes.clear()


atexit.register(shutdown_all)
