"""Finding, starting and stopping kept-warm zygotes (``--ddp-keep-warm``).

A kept-warm zygote (``rank/zygote.py``, ``serve_warm``) outlives the pytest process that
started it and serves later runs and every xdist worker of the same user, interpreter,
torch version and preload set: that is its *key*, part of its socket's name. Its socket
lives in a directory only its user can enter (0700; ``$XDG_RUNTIME_DIR/ddpfault`` or
``/tmp/ddpfault-<uid>``), and a client checks, before it sends anything, that the
directory is its own and private and that the process on the other end runs as its user
(``SO_PEERCRED``). Anything wrong here is a ``WarmUnavailable``: the launcher then warns
and starts a zygote of its own, as without the option.

Files of a key in the directory: ``KEY.sock`` (while it serves), ``KEY.lock`` (flocked by
the zygote that owns the key; holds its pid), ``KEY.log`` (its output).
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import os
import select
import signal
import socket
import stat
import struct
import subprocess
import sys

from pytest_ddpfault.deadline import Deadline

DEFAULT_IDLE = 600.0
STOP_WAIT = 10.0
_PEERCRED = struct.Struct("3i")
_ZYGOTE_MODULE = "pytest_ddpfault.rank.zygote"


class WarmUnavailable(RuntimeError):
    """No kept-warm zygote can be used (the caller falls back to a zygote of its own)."""


def base_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime) and os.path.isdir(runtime):
        return os.path.join(runtime, "ddpfault")
    return f"/tmp/ddpfault-{os.getuid()}"


def private_dir(create: bool = True) -> str:
    """The user's directory of kept-warm zygotes, checked: a directory (not a link), owned
    by this user, entered by nobody else."""
    path = base_dir()
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise WarmUnavailable(f"cannot create {path}: {exc}") from None
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise WarmUnavailable(f"cannot use {path}: {exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise WarmUnavailable(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise WarmUnavailable(f"{path} belongs to uid {st.st_uid}, not to this user ({os.getuid()})")
    if st.st_mode & 0o077:
        raise WarmUnavailable(f"{path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}, "
                              f"expected 700): remove it, or chmod 700 it")
    return path


def _origin(module: str) -> str:
    top = module.split(".", 1)[0]
    try:
        spec = importlib.util.find_spec(top)  # a top-level lookup imports nothing
    except (ImportError, ValueError):
        return "?"
    return str(spec.origin if spec is not None else None)


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "?"


def zygote_key(preload: tuple[str, ...]) -> str:
    """User, interpreter, torch version, the preload set and where its packages come from.
    (What the zygote imported changing on disk is its own check.)"""
    parts = (os.getuid(), os.path.realpath(sys.executable), sys.version, _torch_version(), tuple(preload),
             tuple(_origin(m) for m in preload), _origin(_ZYGOTE_MODULE))
    return "z" + hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def paths(directory: str, key: str) -> dict[str, str]:
    return {kind: os.path.join(directory, f"{key}.{kind}") for kind in ("sock", "lock", "log")}


def log_tail(directory: str, key: str, limit: int = 4000) -> str:
    try:
        with open(paths(directory, key)["log"], errors="replace") as f:
            return f.read()[-limit:]
    except OSError:
        return ""


def owner_pid(directory: str, key: str) -> int | None:
    """The pid of the zygote that holds the key's lock (serving or still starting); None if none."""
    try:
        fd = os.open(paths(directory, key)["lock"], os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1   # -1: locked, pid not written yet
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def start(directory: str, key: str, idle: float, preload: tuple[str, ...], env: dict,
          deadline: Deadline) -> bool:
    """Start a kept-warm zygote for the key; False if another one owns it already."""
    with open(paths(directory, key)["log"], "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", _ZYGOTE_MODULE, "--serve", directory, key, f"{idle:g}",
                                 *preload], stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                start_new_session=True)  # Ctrl-C of a client is not for it
    try:  # it takes the key's lock, forks the daemon and exits: a ~0.1 s wait
        code = proc.wait(max(deadline.remaining(), 0.01))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise WarmUnavailable("the kept-warm zygote's starter did not finish in time") from None
    if code not in (0, 3):  # 3: zygote.EXIT_BUSY
        raise WarmUnavailable(f"the kept-warm zygote's starter exited {code}: {log_tail(directory, key)}")
    return code == 0


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    return pid, uid


def connect(directory: str, key: str, deadline: Deadline) -> socket.socket | None:
    """A connection to the key's zygote, its peer checked; None if none serves it now."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(max(deadline.remaining(), 0.01))
    try:
        sock.connect(paths(directory, key)["sock"])
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except OSError as exc:
        sock.close()
        raise WarmUnavailable(f"cannot connect to {paths(directory, key)['sock']}: {exc}") from None
    pid, uid = peer_uid(sock)
    if uid != os.getuid():
        sock.close()
        raise WarmUnavailable(f"the process behind {paths(directory, key)['sock']} (pid {pid}) runs as uid {uid}, "
                              f"not as this user ({os.getuid()}): not using it")
    return sock


def connect_or_start(directory: str, key: str, idle: float, preload: tuple[str, ...], env: dict,
                     deadline: Deadline) -> tuple[socket.socket, bool]:
    """Connect to the key's zygote, starting one if none owns the key; wait for one that is
    starting (importing) until ``deadline``. Returns the socket and whether this call started it."""
    started = 0
    pause = deadline.backoff()
    while True:
        sock = connect(directory, key, deadline)
        if sock is not None:
            return sock, started > 0
        if owner_pid(directory, key) is None:
            if started >= 2:
                raise WarmUnavailable(f"the kept-warm zygote died at start-up; its output:\n"
                                      f"{log_tail(directory, key)}")
            started += start(directory, key, idle, preload, env, deadline)
            continue
        if deadline.expired():
            raise WarmUnavailable(f"the kept-warm zygote (pid {owner_pid(directory, key)}) did not take "
                                  f"clients in time{_with_log(directory, key)}")
        pause.wait()  # it is importing (seconds): nothing to wait on but its socket's name appearing


def _with_log(directory: str, key: str) -> str:
    tail = log_tail(directory, key).strip()
    return f"; its output:\n{tail}" if tail else ""


def _process_is_zygote(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().split(b"\0")
        return os.stat(f"/proc/{pid}").st_uid == os.getuid() and _ZYGOTE_MODULE.encode() in cmd
    except OSError:
        return False


def stop_all(directory: str | None = None, timeout: float = STOP_WAIT) -> list[int]:
    """Stop every kept-warm zygote of this user (serving or starting): SIGTERM, and SIGKILL
    what is left at ``timeout``. Returns their pids; they are gone when it returns."""
    try:
        directory = directory or private_dir(create=False)
    except WarmUnavailable:
        return []
    deadline = Deadline.after(timeout)
    pidfds: dict[int, int] = {}
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".lock"):
            continue
        pid = owner_pid(directory, name[:-len(".lock")])
        if pid is None or pid <= 0 or not _process_is_zygote(pid):
            continue
        try:
            pidfds[pid] = os.pidfd_open(pid)
            os.kill(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pidfds.pop(pid, None)
    waiting, killed = dict(pidfds), False
    while waiting:
        ready, _, _ = select.select(list(waiting.values()), [], [], deadline.remaining())
        if not ready and killed:
            break  # SIGKILL not done in time either: nothing more to do
        if not ready:
            for fd in waiting.values():
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            deadline, killed = Deadline.after(timeout), True
        for pid in [p for p, fd in waiting.items() if fd in ready]:
            del waiting[pid]
    for fd in pidfds.values():
        os.close(fd)
    return sorted(pidfds)
