"""Toxiproxy for the harness: which server, a safe API client, the store proxy.

The network fault kinds themselves (what they do to the proxy) are in ``faults/network.py``.

Server selection: a URL (``--toxiproxy-url`` / ``TOXIPROXY_URL``); else ``toxiproxy-server``
on PATH, started on loopback port 0; else the embedded server (``toxiproxy/``).

The plugin talks to the server through ``ToxiproxyAPI`` (stdlib HTTP, a timeout on
every call, and a non-2xx answer raised as a ``ToxiproxyError`` that says what was
asked and what the server said), shielding users from toxiproxy-python's defects (no
timeouts; a 500 surfacing as ``KeyError('name')``). What users get as
``ddp.store_proxy`` is still a genuine toxiproxy-python ``Proxy``.
"""
from __future__ import annotations

import atexit
import itertools
import os
import shutil
import subprocess
import threading
import types

from pytest_ddpfault.deadline import Deadline
from pytest_ddpfault.procfs import listening_port_of
from pytest_ddpfault.proxy_calls import ProxyHandle, ToxiproxyError
from pytest_ddpfault.proxy_calls import ToxiproxyAPI as CallsAPI

SERVER_START_TIMEOUT = 20.0


class ToxiproxyAPI(CallsAPI):
    """The Toxiproxy HTTP API (``proxy_calls.ToxiproxyAPI``), plus toxiproxy-python objects for users."""

    def client(self):
        """A toxiproxy-python ``Toxiproxy`` pointed at this server (its state is global)."""
        from toxiproxy import Toxiproxy

        client = Toxiproxy()
        client.update_api_consumer(self.host, self.port)
        return client

    def client_proxy(self, info: dict):
        """toxiproxy-python's ``Proxy`` for ``info``, talking to this server; None when the
        client is not installed. No class-level state of toxiproxy-python is changed."""
        proxy_class = _bound_proxy_class(self.host, self.port)
        if proxy_class is None:
            return None
        return proxy_class(**{**info, "api_consumer": proxy_class.api_consumer})


_bound_classes: dict = {}


def _bound_proxy_class(host: str, port: int):
    """A private subclass of toxiproxy-python's ``Proxy`` bound to one server.

    ``Proxy``'s methods call the class ``APIConsumer`` of their module, whose ``host`` and
    ``port`` are class attributes shared by every user of the library. Setting them would
    redirect a user's own ``Toxiproxy()`` client. Instead, each method that uses
    ``APIConsumer`` is copied with a globals mapping in which that name is a private
    ``APIConsumer`` subclass carrying this server's address; the library is left untouched.
    """
    key = (host, port)
    if key in _bound_classes:
        return _bound_classes[key]
    try:
        import toxiproxy.proxy as proxy_module
        from toxiproxy.api import APIConsumer
        from toxiproxy.proxy import Proxy
    except ImportError:
        return None
    consumer = type("DDPFaultAPIConsumer", (APIConsumer,), {"host": host, "port": port})
    namespace = {**vars(proxy_module), "APIConsumer": consumer}
    methods = {}
    for name, fn in vars(Proxy).items():
        if isinstance(fn, types.FunctionType) and "APIConsumer" in fn.__code__.co_names:
            bound = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
            bound.__doc__, bound.__qualname__ = fn.__doc__, fn.__qualname__
            methods[name] = bound
    cls = type("Proxy", (Proxy,), {**methods, "api_consumer": consumer, "__module__": __name__,
                                   "__doc__": Proxy.__doc__})
    _bound_classes[key] = cls
    return cls


# -- servers ---------------------------------------------------------------------

class ToxiproxyServer:
    """A running server the plugin may use; ``stop()`` ends it if the plugin started it."""

    def __init__(self, api: ToxiproxyAPI, kind: str, stop=None) -> None:
        self.api, self.kind, self._stop = api, kind, stop

    @property
    def url(self) -> str:
        return self.api.url

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None

    def __repr__(self) -> str:
        return f"<ToxiproxyServer {self.kind} at {self.url}>"


def _start_binary(path: str) -> ToxiproxyServer:
    proc = subprocess.Popen([path, "-host", "127.0.0.1", "-port", "0"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = Deadline.after(SERVER_START_TIMEOUT)
    port = None
    while port is None and not deadline.expired() and proc.poll() is None:
        port = listening_port_of(proc.pid)
        if port is None:
            try:
                proc.wait(0.05)  # a poll with a deadline: the server reports nothing else
            except subprocess.TimeoutExpired:
                pass

    def stop():
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    if port is None:
        stop()
        raise ToxiproxyError(f"{path} did not start listening within {SERVER_START_TIMEOUT:g} s")
    return ToxiproxyServer(ToxiproxyAPI(f"http://127.0.0.1:{port}"), f"toxiproxy-server ({path})", stop)


def start_server(url: str | None = None) -> ToxiproxyServer:
    """The server to use: ``url``, else toxiproxy-server on PATH, else the embedded one."""
    if url:
        api = ToxiproxyAPI(url)
        api.version()  # fail now, clearly, if nothing answers there
        return ToxiproxyServer(api, "external")
    binary = shutil.which("toxiproxy-server")
    if binary:
        return _start_binary(binary)
    from pytest_ddpfault.toxiproxy import EmbeddedToxiproxy

    server = EmbeddedToxiproxy("127.0.0.1", 0).start(SERVER_START_TIMEOUT)
    return ToxiproxyServer(ToxiproxyAPI(server.url), "embedded", server.stop)


_default_lock = threading.Lock()
_default: ToxiproxyServer | None = None


def default_server() -> ToxiproxyServer:
    """A process-wide server for runs outside pytest (``TOXIPROXY_URL`` is honoured)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = start_server(os.environ.get("TOXIPROXY_URL"))
            atexit.register(_default.stop)
        return _default


def resolve_api(source) -> ToxiproxyAPI:
    """``RunConfig.toxiproxy`` -> an API: None (default server), a URL, a server, an API or a
    callable returning one of those."""
    if callable(source) and not isinstance(source, (ToxiproxyAPI, ToxiproxyServer)):
        source = source()
    if source is None:
        return default_server().api
    if isinstance(source, str):
        return ToxiproxyAPI(source)
    if isinstance(source, ToxiproxyServer):
        return source.api
    if isinstance(source, ToxiproxyAPI):
        return source
    raise TypeError(f"toxiproxy={source!r}: expected a URL, a ToxiproxyServer or a ToxiproxyAPI")


# -- the run's store proxy --------------------------------------------------------

_names = itertools.count()


class StoreProxy(ProxyHandle):
    """A proxy in front of the run's store: listen ``host``:0, upstream the store on ``host``
    (127.0.0.1; node 0's address with virtual nodes, where MASTER_ADDR is).

    What the network fault kinds do to it waits no longer than ``deadline`` (the run's,
    set by the run): a fault's request never holds the run past its end."""

    def __init__(self, api: ToxiproxyAPI, store_port: int, deadline: Deadline | None = None,
                 host: str = "127.0.0.1") -> None:
        self.api = api
        self.deadline = deadline
        self.name = f"ddpfault_store_{os.getpid()}_{next(_names)}"
        self.info = api.create_proxy(self.name, f"{host}:{store_port}", listen=f"{host}:0")
        self.port = int(self.info["listen"].rsplit(":", 1)[1])
