"""The zygote: a warm, single-threaded process that forks ranks on request.

Importing torch costs ~2 s a process; forking it from a process that already has it
costs milliseconds. The zygote imports the preload modules, starts no thread, and then
serves messages (``ipc`` frames) from its clients:

- ``("spawn", {"id", "job"})`` -> forks; replies ``("spawned", {"id", "pid", "time"})``
- ``("signal", {"pid", "sig", "group"})`` -> signals a child of that client it has not reaped yet
- ``("shutdown", None)`` or EOF -> kills every live child of that client's process groups

and reports each child's end to the client that asked for it as
``("exited", {"pid", "status", "time"})``. Because the zygote is the ranks' parent, only
it can reap them and see their exit status; and since it signals only children it has
not reaped, a signal can never hit a recycled pid.

Two ways to run it:

- per pytest process (``python -m pytest_ddpfault.rank.zygote SOCKFD PARENTPID MODULE...``):
  one client on an inherited socket; it ends with that parent (PDEATHSIG, SIGTERM) and when
  the client goes. If that process died (SIGKILL, or ``os._exit`` as pytest-timeout's thread
  method ends a test), the zygote removes the run dirs and log it left (``tmpfiles``);
- kept warm (``python -m pytest_ddpfault.rank.zygote --serve DIR KEY IDLE MODULE...``,
  ``--ddp-keep-warm``): a daemon on a Unix socket ``DIR/KEY.sock`` in a directory only its
  user can enter, serving any number of clients (later pytest runs, xdist workers) of that
  user. It owns ``DIR/KEY.lock`` (flock) while it serves, so two never serve one key. A
  client's ranks die when that client's connection closes (it died, or it is done), and
  the temp files of a client that died go once it is gone; the ranks die with the zygote
  (PDEATHSIG). A client first says ``("hello", {"key"})`` and gets
  ``("ready", {...})``, or ``("stale", {"reason"})`` once a file the zygote imported changed
  on disk: it then takes no more clients (its socket's name and lock go to a successor)
  and leaves as soon as it has none. It also leaves after ``IDLE`` seconds without a
  client, and on SIGTERM (its pid is in the lock file: ``parent.warm.stop_all``).
"""
from __future__ import annotations

import fcntl
import functools
import importlib
import os
import selectors
import signal
import socket
import struct
import sys
import time
import traceback

from pytest_ddpfault import ipc
from pytest_ddpfault.procfs import start_ticks
from pytest_ddpfault.rank.bootstrap import die_with_parent, run_job
from pytest_ddpfault.tmpfiles import remove_owned

STALE_CHECK_EVERY = 2.0   # seconds between checks of the imported files while serving
SEND_TIMEOUT = 10.0       # a client that reads nothing for this long is dropped (its ranks killed)
# Exit codes of a kept-warm zygote's start.
EXIT_BUSY = 3             # another zygote owns the key
PARENT_EXIT_WAIT = 2.0    # a client that closed its socket without "shutdown": how long to wait for its end
_PEERCRED = struct.Struct("3i")


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


class _Client:
    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.reader = ipc.FrameReader()
        self.live: set[int] = set()
        self.greeted = False
        self.handlers: dict = {}
        self.pid: int | None = None           # a kept-warm zygote's client: its process (SO_PEERCRED)
        self.ticks: int | None = None         # and that process's start time


class ImportedFiles:
    """What the zygote imported, as it was on disk: ``changed()`` names a file that differs."""

    def __init__(self) -> None:
        self.files: dict[str, tuple] = {}
        for module in list(sys.modules.values()):
            path = getattr(module, "__file__", None)
            if isinstance(path, str) and path not in self.files:
                self.files[path] = self._stat(path)

    @staticmethod
    def _stat(path: str):
        try:
            st = os.stat(path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def changed(self) -> str | None:
        for path, seen in self.files.items():
            if self._stat(path) != seen:
                return path
        return None


class Zygote:
    def __init__(self, sock: socket.socket | None = None) -> None:
        self.clients: dict[socket.socket, _Client] = {}
        self.owner: dict[int, _Client] = {}   # live child pid -> the client that asked for it
        self.private_fds: list[int] = []      # closed in every child (besides the sockets)
        self.sel = selectors.DefaultSelector()
        self.single = sock is not None        # one client; the zygote ends with it
        self.listener: socket.socket | None = None
        self.handlers = {"spawn": self.spawn, "signal": self.signal}  # and "shutdown"
        self.extra: dict = {}                 # handled before the rest (a kept-warm zygote's hello)
        self.needs_hello = False              # spawn and signal only after a hello
        self.shutdown_asked = False           # a client said "shutdown" (it did not die)
        self.leaving = False                  # set by a signal: serve() returns
        self.departed: dict[int, tuple] = {}  # client pid -> (start ticks, left at): see remove_leftovers
        if sock is not None:
            self._add_client(sock, "the harness")

    def _add_client(self, sock: socket.socket, name: str) -> _Client:
        client = self.clients[sock] = _Client(sock, name)
        client.handlers = {kind: functools.partial(handler, client=client) for kind, handler in self.handlers.items()}
        self.sel.register(sock, selectors.EVENT_READ, client)
        return client

    @property
    def live(self) -> set[int]:
        return set(self.owner)

    # -- children -------------------------------------------------------------
    def _child_fds(self) -> list[int]:
        fds = [c.sock.fileno() for c in self.clients.values()] + self.private_fds + [self.sel.fileno()]
        if self.listener is not None:
            fds.append(self.listener.fileno())
        return fds

    def spawn(self, req: dict, client: _Client) -> None:
        zygote_pid = os.getpid()
        job = req["job"]
        job.started = time.monotonic()  # before the fork: the child may run before this process does
        pid = os.fork()
        if pid == 0:  # child: forget the zygote's world, become the job
            try:
                os.setpgid(0, 0)
                for fd in self._child_fds():
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            finally:
                run_job(job, expected_parent=zygote_pid)
        try:
            os.setpgid(pid, pid)  # also from this side: no window where the group is unset
        except OSError:
            pass
        client.live.add(pid)
        self.owner[pid] = client
        self._send(client, "spawned", id=req["id"], pid=pid, time=job.started)

    def signal(self, req: dict, client: _Client) -> None:
        pid = req["pid"]
        if pid not in client.live:
            return
        try:
            if req.get("group", True):
                os.killpg(pid, req["sig"])
            else:
                os.kill(pid, req["sig"])
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self) -> None:
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return
            if info is None:
                return
            pid = info.si_pid
            # The leader is a zombie, so its pid (= the group id) cannot be reused yet:
            # kill whatever it left behind in its group, then reap it.
            _killpg(pid)
            _, status = os.waitpid(pid, 0)
            client = self.owner.pop(pid, None)
            if client is not None:
                client.live.discard(pid)
                if client.sock in self.clients:
                    self._send(client, "exited", pid=pid, status=status, time=time.monotonic())

    def kill_all(self) -> None:
        for pid in list(self.owner):
            _killpg(pid)

    # -- clients ----------------------------------------------------------------
    def _send(self, client: _Client, type_: str, **payload) -> None:
        try:
            ipc.send_frame(client.sock, type_, **payload)
        except OSError:  # gone, or reads nothing (timeout): it gets nothing more, its ranks die
            self.drop(client)

    def drop(self, client: _Client) -> None:
        """The client is gone (or done): kill its children, forget it."""
        for pid in list(client.live):
            _killpg(pid)
        if client.pid is not None and client.sock in self.clients:
            self.departed[client.pid] = (client.ticks, time.monotonic())
        if client.sock in self.clients:
            del self.clients[client.sock]
            self.sel.unregister(client.sock)
            client.sock.close()

    def _on_data(self, client: _Client) -> bool:
        """Read what the client sent; False when the zygote must end."""
        try:
            data = client.sock.recv(1 << 16)
        except OSError:
            data = b""
        if not data:
            self.drop(client)
            return not self.single
        try:
            frames = client.reader.feed(data)
        except ipc.UnknownMessage as exc:
            self._send(client, "error", message=str(exc))
            self.drop(client)
            return not self.single
        for msg in frames:
            kind = msg.get("type") if isinstance(msg, dict) else None
            if kind == "shutdown":
                self.shutdown_asked = True
                self.drop(client)
                return not self.single
            if kind in self.extra:
                if self.extra[kind](msg, client) is False:
                    return False
                continue
            if self.needs_hello and not client.greeted:
                self._send(client, "error", message=f"{kind!r} before hello")
                self.drop(client)
                break
            try:
                ipc.dispatch(msg, client.handlers, client.name)
            except ipc.UnknownMessage as exc:
                self._send(client, "error", message=str(exc))
            if client.sock not in self.clients:
                break
        return True

    # -- loop -----------------------------------------------------------------
    def serve(self, tick=None) -> None:
        """Serve until the (single) client goes, or ``tick()`` (called at least every
        ``STALE_CHECK_EVERY`` s) or a handler says to stop."""
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
        self.private_fds += [wake_r, wake_w]
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self.leaving:
                for key, _ in self.sel.select(None if tick is None else STALE_CHECK_EVERY):
                    if key.data == "wake":
                        try:
                            os.read(wake_r, 4096)
                        except BlockingIOError:
                            pass
                        self.reap()
                    elif key.data == "listen":
                        self._accept()
                    elif key.fileobj in self.clients and not self._on_data(key.data):
                        return
                self.reap()  # a SIGCHLD may land between select and read
                if tick is not None and tick() is False:
                    return
        finally:
            self.kill_all()

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        if uid != os.getuid():  # the directory keeps others out; this is the second lock
            sock.close()
            return
        sock.setblocking(True)
        sock.settimeout(SEND_TIMEOUT)
        client = self._add_client(sock, f"client pid {pid}")
        client.pid, client.ticks = pid, start_ticks(pid)

    def remove_leftovers(self, keep_watching: float = 60.0) -> None:
        """Remove the temp files of clients whose process has ended since they left (it died
        without cleaning up: SIGKILL, ``os._exit``); forget one still alive after
        ``keep_watching`` seconds (it closed the connection and cleans up itself)."""
        now = time.monotonic()
        for pid, (ticks, left) in list(self.departed.items()):
            if start_ticks(pid) != ticks:  # gone, a zombie, or the pid is another process's now
                remove_owned(lambda owner: owner == pid)
            elif now - left < keep_watching:
                continue
            del self.departed[pid]


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _preload(modules: list[str]) -> tuple[dict, float]:
    started = time.monotonic()
    errors = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException:
            errors[name] = traceback.format_exc()
    from pytest_ddpfault.rank.store_host import quiet_c10d_name_lookups
    quiet_c10d_name_lookups()  # no reverse DNS in c10d for every process forked from here
    return errors, time.monotonic() - started


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve":
        return serve_warm(argv[1], argv[2], float(argv[3]), argv[4:])
    fd, parent, preload = int(argv[0]), int(argv[1]), argv[2:]
    sock = socket.socket(fileno=fd)
    zygote = Zygote(sock)
    # SIGTERM, not SIGKILL: on the parent's death this zygote still kills its ranks and
    # removes what the parent could not (the handler raises nothing: the loop sees it)
    signal.signal(signal.SIGTERM, lambda *_: setattr(zygote, "leaving", True))
    die_with_parent(parent, signal.SIGTERM)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the pytest process's to handle
    try:
        errors, seconds = _preload(preload)
        ipc.send_frame(sock, "ready", pid=os.getpid(), preload_seconds=seconds, errors=errors,
                       threads=_thread_count())
        zygote.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    except BaseException:
        traceback.print_exc()
    finally:
        zygote.kill_all()
        if not zygote.shutdown_asked and _gone(parent, PARENT_EXIT_WAIT):
            remove_owned(lambda owner: owner == parent)
        os._exit(0)


def _gone(pid: int, wait: float) -> bool:
    """Whether process ``pid`` has ended (or ends within ``wait`` seconds)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd (old kernel): only what /proc says now
        return start_ticks(pid) is None
    sel = selectors.DefaultSelector()
    try:
        sel.register(fd, selectors.EVENT_READ)  # a pidfd is readable once its process ended
        return bool(sel.select(wait))
    finally:
        sel.close()
        os.close(fd)


# -- kept warm ----------------------------------------------------------------------------

class WarmZygote(Zygote):
    """The daemon of ``--ddp-keep-warm`` (see the module's docstring)."""

    def __init__(self, directory: str, key: str, idle: float, lock_fd: int, ready: dict) -> None:
        super().__init__()
        self.directory, self.key, self.idle = directory, key, idle
        self.path = os.path.join(directory, f"{key}.sock")
        self.lock_fd: int | None = lock_fd
        self.ready = ready
        self.files = ImportedFiles()
        self.stale: str | None = None
        self.idle_since = time.monotonic()
        self.next_check = time.monotonic() + STALE_CHECK_EVERY
        self.clients_served = 0
        self.extra = {"hello": self.hello}
        self.needs_hello = True
        self.private_fds.append(lock_fd)

    def listen(self) -> None:
        """Bind under a temporary name, then rename: a client never finds a half-made socket."""
        tmp = f"{self.path}.{os.getpid()}"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            listener.bind(tmp)
        finally:
            os.umask(old)
        listener.listen(64)
        listener.setblocking(False)
        os.replace(tmp, self.path)
        self.inode = os.stat(self.path).st_ino
        self.listener = listener
        self.sel.register(listener, selectors.EVENT_READ, "listen")

    def retire(self, why: str) -> None:
        """Take no more clients: give the socket's name and the key's lock to a successor."""
        if self.stale is None:
            self.stale = why
            print(f"pytest-ddpfault kept-warm zygote {os.getpid()}: retiring: {why}", flush=True)
        if self.listener is not None:
            try:
                if os.stat(self.path).st_ino == self.inode:
                    os.unlink(self.path)
            except OSError:
                pass
            self.sel.unregister(self.listener)
            self.listener.close()
            self.listener = None
        if self.lock_fd is not None:
            self.private_fds.remove(self.lock_fd)
            os.close(self.lock_fd)
            self.lock_fd = None

    def hello(self, msg: dict, client: _Client):
        if self.stale is None:
            changed = self.files.changed()
            if changed:
                self.retire(f"{changed} changed on disk")
        if self.stale is not None or msg.get("key") != self.key:
            self._send(client, "stale", reason=self.stale or f"key {msg.get('key')!r} is not {self.key!r}")
            self.drop(client)
            return True
        client.greeted = True
        self.clients_served += 1
        self._send(client, "ready", **self.ready, clients_served=self.clients_served, threads=_thread_count())
        return True

    def tick(self):
        now = time.monotonic()
        self.remove_leftovers()
        if self.clients:
            self.idle_since = now
        if self.stale is None and now >= self.next_check:
            self.next_check = now + STALE_CHECK_EVERY
            changed = self.files.changed()
            if changed:
                self.retire(f"{changed} changed on disk")
        if self.stale is not None and not self.clients:
            return False
        if not self.clients and now - self.idle_since >= self.idle:
            self.retire(f"no client for {self.idle:g} s")
            return False
        return True


def serve_warm(directory: str, key: str, idle: float, preload: list[str]) -> None:
    """Entry of a kept-warm zygote (started by ``parent.warm``); never returns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The lock first, then detach: the starter, once this process exited 0, knows that a
    # zygote owns the key (the lock belongs to the open file, which the daemon keeps).
    lock_fd = os.open(os.path.join(directory, f"{key}.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os._exit(EXIT_BUSY)
    pid = os.fork()
    if pid != 0:  # the starter reaps this at once: the daemon is nobody's child
        os.ftruncate(lock_fd, 0)
        os.pwrite(lock_fd, str(pid).encode(), 0)
        os._exit(0)
    try:
        os.ftruncate(1, 0)  # the log is the key's: this zygote's own from here on
    except OSError:
        pass
    errors, seconds = _preload(preload)
    os.chdir("/")  # hold no directory of the first client's
    zygote = WarmZygote(directory, key, idle, lock_fd,
                        {"pid": os.getpid(), "preload_seconds": seconds, "errors": errors,
                         "started": time.time()})
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    zygote.listen()
    print(f"pytest-ddpfault kept-warm zygote {os.getpid()}: serving {zygote.path} "
          f"(imports took {seconds:.1f} s; {len(zygote.files.files)} files watched)", flush=True)
    try:
        zygote.serve(tick=lambda: not stopped and zygote.tick())
    finally:
        zygote.retire(zygote.stale or "stopped")
        for client in list(zygote.clients.values()):
            client.sock.close()
    os._exit(0)


if __name__ == "__main__":
    main()
