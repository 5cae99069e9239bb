"""The zygote: a warm, single-threaded process that forks ranks on request.

Importing torch costs ~2 s a process; forking it from a process that already has it
costs milliseconds. The zygote is started once per pytest process
(``python -m pytest_ddpfault.rank.zygote SOCKFD PARENTPID MODULE...``), imports the preload
modules, starts no thread, and then serves messages (``ipc`` frames) on its socket:

- ``("spawn", {"id", "job"})`` -> forks; replies ``("spawned", {"id", "pid", "time"})``
- ``("signal", {"pid", "sig", "group"})`` -> signals a child it has not reaped yet
- ``("shutdown", None)`` or EOF -> kills every live child's process group and exits

and reports each child's end as ``("exited", {"pid", "status", "time"})``. Because the
zygote is the ranks' parent, only it can reap them and see their exit status; and since
it signals only children it has not reaped, a signal can never hit a recycled pid.
"""
from __future__ import annotations

import importlib
import os
import selectors
import signal
import socket
import sys
import time
import traceback

from pytest_ddpfault import ipc
from pytest_ddpfault.rank.bootstrap import die_with_parent, run_job


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


class Zygote:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.live: set[int] = set()
        self.reader = ipc.FrameReader()
        self.private_fds: list[int] = []  # closed in every child
        self.handlers = {"spawn": self.spawn, "signal": self.signal}  # and "shutdown"

    # -- children -------------------------------------------------------------
    def spawn(self, req: dict) -> None:
        zygote_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # child: forget the zygote's world, become the job
            try:
                os.setpgid(0, 0)
                self.sock.close()
                for fd in self.private_fds:
                    os.close(fd)
            finally:
                run_job(req["job"], expected_parent=zygote_pid)
        try:
            os.setpgid(pid, pid)  # also from this side: no window where the group is unset
        except OSError:
            pass
        self.live.add(pid)
        ipc.send_frame(self.sock, "spawned", id=req["id"], pid=pid, time=time.monotonic())

    def signal(self, req: dict) -> None:
        pid = req["pid"]
        if pid not in self.live:
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
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            _, status = os.waitpid(pid, 0)
            self.live.discard(pid)
            ipc.send_frame(self.sock, "exited", pid=pid, status=status, time=time.monotonic())

    def kill_all(self) -> None:
        for pid in list(self.live):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # -- loop -----------------------------------------------------------------
    def serve(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd is written
        sel = selectors.DefaultSelector()
        self.private_fds = [wake_r, wake_w, sel.fileno()]
        sel.register(self.sock, selectors.EVENT_READ, "sock")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        try:
            while True:
                for key, _ in sel.select():
                    if key.data == "wake":
                        try:
                            os.read(wake_r, 4096)
                        except BlockingIOError:
                            pass
                        self.reap()
                        continue
                    data = self.sock.recv(1 << 16)
                    if not data:
                        return
                    for msg in self.reader.feed(data):
                        if msg.get("type") == "shutdown":
                            return
                        try:
                            ipc.dispatch(msg, self.handlers, "the harness")
                        except ipc.UnknownMessage as exc:
                            ipc.send_frame(self.sock, "error", message=str(exc))
                self.reap()  # a SIGCHLD may land between select and read
        finally:
            self.kill_all()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    fd, parent, preload = int(argv[0]), int(argv[1]), argv[2:]
    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the pytest process's to handle
    sock = socket.socket(fileno=fd)
    started = time.monotonic()
    errors = {}
    for name in preload:
        try:
            importlib.import_module(name)
        except BaseException:
            errors[name] = traceback.format_exc()
    from pytest_ddpfault.rank.store_host import quiet_c10d_name_lookups
    quiet_c10d_name_lookups()  # no reverse DNS in c10d for every process forked from here
    zygote = Zygote(sock)
    ipc.send_frame(sock, "ready", pid=os.getpid(), preload_seconds=time.monotonic() - started, errors=errors,
                   threads=_thread_count())
    try:
        zygote.serve()
    except (BrokenPipeError, ConnectionResetError):
        pass
    os._exit(0)


if __name__ == "__main__":
    main()
