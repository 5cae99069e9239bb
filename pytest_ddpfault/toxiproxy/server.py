"""The embedded Toxiproxy server: the API and its proxies on one asyncio loop in one thread."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from types import TracebackType

from . import toxics
from .api import READ_TIMEOUT, VERSION, ApiServer
from .errors import ApiError
from .metrics import Metrics

__all__ = ["EmbeddedToxiproxy", "ConfigError"]

log = logging.getLogger("pytest_ddpfault.toxiproxy")

#: bound, inside ``stop()``'s own timeout, for the loop's last tasks to finish
_DRAIN_TIMEOUT = 1.0


class ConfigError(ValueError):
    """The ``config`` file cannot be read, or its proxies cannot be created."""


class EmbeddedToxiproxy:
    """A Toxiproxy 2.x compatible server running in a daemon thread of this process.

    >>> with EmbeddedToxiproxy() as server:            # doctest: +SKIP
    ...     Toxiproxy().update_api_consumer(server.host, server.port)

    ``port=0`` lets the OS pick a free port; ``host``/``port``/``url`` tell the real one
    once :meth:`start` has returned. The other arguments are toxiproxy-server's flags:

    - ``config``: a JSON file of proxies to create at start, a list of
      ``{"name", "listen", "upstream", "enabled"}`` as ``POST /populate`` takes
      (``-config``). Unlike Toxiproxy, which logs a bad file and goes on, :meth:`start`
      raises :class:`ConfigError`.
    - ``seed``: seeds the toxics' randomness (``-seed``); it is one per process, as
      Toxiproxy's is. None leaves it as it is.
    - ``proxy_metrics`` / ``runtime_metrics``: serve ``GET /metrics`` (Prometheus text)
      with the proxies' byte counters / process and runtime metrics
      (``-proxy-metrics`` / ``-runtime-metrics``).
    - ``read_timeout``: seconds a request may take to arrive once it has begun (Go's
      ``ReadTimeout``, 15 s); an incomplete request is then answered 400.
    """

    version = VERSION

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *,
                 config: str | os.PathLike[str] | None = None, seed: int | None = None,
                 proxy_metrics: bool = False, runtime_metrics: bool = False,
                 read_timeout: float = READ_TIMEOUT) -> None:
        self.host = host
        self.port = port
        self.config = config
        self.seed = seed
        self.proxy_metrics = proxy_metrics
        self.runtime_metrics = runtime_metrics
        self.read_timeout = read_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> "EmbeddedToxiproxy":
        """Start the loop thread; return once the API listens (raise if it cannot)."""
        if self._thread is not None:
            raise RuntimeError(f"{self!r} was already started; create a new one")
        if self.seed is not None:
            toxics.seed(self.seed)
        self._thread = threading.Thread(target=self._main, name="ddpfault-toxiproxy",
                                        daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.stop()
            raise TimeoutError(f"embedded toxiproxy did not start listening within {timeout} s")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close the API, every proxy listener and connection; join the thread (bounded)."""
        thread, loop = self._thread, self._loop
        if thread is None or not thread.is_alive():
            return
        deadline = time.monotonic() + timeout
        if loop is not None and self._stopping is not None:
            try:
                loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop closed meanwhile
                pass
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("%r: loop thread still alive %.1f s after stop()", self, timeout)

    def __enter__(self) -> "EmbeddedToxiproxy":
        return self.start() if self._thread is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"EmbeddedToxiproxy({self.url}, {state})"

    # --- the loop thread -----------------------------------------------------------------

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start(); the thread must end cleanly
            self._error = self._error or exc
            self._ready.set()
        finally:
            try:
                loop.run_until_complete(_cancel_leftovers(loop))
            finally:
                loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        api = ApiServer(read_timeout=self.read_timeout,
                        metrics=Metrics(proxy=self.proxy_metrics, runtime=self.runtime_metrics))
        try:
            try:
                self.host, self.port = await api.start(self.host, self.port)
            except OSError as exc:
                self._error = OSError(exc.errno, f"embedded toxiproxy cannot listen on "
                                                 f"{self.host}:{self.port}: {exc.strerror or exc}")
                return
            if self.config is not None:
                try:
                    await api.populate_from(_read_config(self.config))
                except ApiError as exc:
                    self._error = ConfigError(f"config {os.fspath(self.config)}: {exc.message}")
                    return
                except ConfigError as exc:
                    self._error = exc
                    return
            self._ready.set()
            await self._stopping.wait()
        finally:
            self._ready.set()
            await api.close()


def _read_config(path: str | os.PathLike[str]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"config {os.fspath(path)}: {exc.strerror or exc}") from None


async def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=_DRAIN_TIMEOUT)
    await asyncio.sleep(0)  # let aborted transports run their connection_lost callbacks
