"""``GET /metrics``: Prometheus text exposition, as Toxiproxy 2.8's ``-proxy-metrics`` and
``-runtime-metrics`` flags enable it.

Proxy metrics keep Toxiproxy's names and labels (``collectors/proxy.go``):
``toxiproxy_proxy_received_bytes_total`` and ``toxiproxy_proxy_sent_bytes_total``, labelled
``direction``, ``listener``, ``proxy``, ``upstream``. Toxiproxy adds a link's bytes when the
link ends; these counters grow as the bytes move.

Runtime metrics: Toxiproxy's Go collectors export ``go_*`` (the Go runtime) and
``process_*``. This server is Python, so it exports the same ``process_*`` gauges (names
and help texts of the Prometheus process collector, read from ``/proc`` where there is
one) and, in place of ``go_*``, the ``python_*`` metrics of the official Python client.
Families are sorted by name and samples by label values, numbers printed as Go prints
them, like ``promhttp``.
"""

from __future__ import annotations

import collections
import decimal
import gc
import math
import os
import platform
import resource
from typing import Iterator, NamedTuple

__all__ = ["CONTENT_TYPE", "Metrics", "Counter", "go_float"]

#: what ``promhttp`` answers a client that asks for no particular format
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

PROXY_LABELS = ("direction", "listener", "proxy", "upstream")


class Counter:
    """One sample of a counter; proxies hold it and add to it as bytes move."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


class _Family(NamedTuple):
    name: str
    kind: str  # counter, gauge
    help: str
    samples: list[tuple[tuple[tuple[str, str], ...], float]]


class Metrics:
    """What ``/metrics`` exports for one server; ``enabled`` is False when it has no route."""

    def __init__(self, proxy: bool = False, runtime: bool = False) -> None:
        self.proxy = proxy
        self.runtime = runtime
        self._received: dict[tuple[str, ...], Counter] = collections.defaultdict(Counter)
        self._sent: dict[tuple[str, ...], Counter] = collections.defaultdict(Counter)

    @property
    def enabled(self) -> bool:
        return self.proxy or self.runtime

    def link_counters(self, direction: str, proxy: str, listener: str,
                      upstream: str) -> tuple[Counter, Counter] | None:
        """``(received, sent)`` counters of one link, or None without proxy metrics."""
        if not self.proxy:
            return None
        labels = (direction, listener, proxy, upstream)
        return self._received[labels], self._sent[labels]

    def render(self) -> bytes:
        families: list[_Family] = []
        if self.proxy:
            families += [
                _counter_family("toxiproxy_proxy_received_bytes_total",
                                "Bytes received from the source of a proxy link.", self._received),
                _counter_family("toxiproxy_proxy_sent_bytes_total",
                                "Bytes sent to the destination of a proxy link.", self._sent),
            ]
        if self.runtime:
            families += list(_runtime_families())
        return "".join(_format(f) for f in sorted(families) if f.samples).encode("utf-8")


def _counter_family(name: str, help: str, counters: dict[tuple[str, ...], Counter]) -> _Family:
    samples = [(tuple(zip(PROXY_LABELS, labels)), float(counter.value))
               for labels, counter in sorted(counters.items())]
    return _Family(name, "counter", help, samples)


# --- runtime ----------------------------------------------------------------------------


def _gauge(name: str, help: str, value: float | None, kind: str = "gauge") -> _Family:
    return _Family(name, kind, help, [] if value is None else [((), float(value))])


def _runtime_families() -> Iterator[_Family]:
    yield from _process_families()
    version = platform.python_version_tuple()
    yield _Family("python_info", "gauge", "Python platform information", [(
        (("implementation", platform.python_implementation()), ("major", version[0]),
         ("minor", version[1]), ("patchlevel", version[2]),
         ("version", platform.python_version())), 1.0)])
    stats = gc.get_stats()
    for name, key, help in (
            ("python_gc_objects_collected_total", "collected", "Objects collected during gc"),
            ("python_gc_objects_uncollectable_total", "uncollectable",
             "Uncollectable objects found during GC"),
            ("python_gc_collections_total", "collections",
             "Number of times this generation was collected")):
        yield _Family(name, "counter", help, [((("generation", str(generation)),),
                                               float(stat[key]))
                                              for generation, stat in enumerate(stats)])


def _process_families() -> Iterator[_Family]:
    times = os.times()
    yield _gauge("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.",
                 times.user + times.system, "counter")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield _gauge("process_max_fds", "Maximum number of open file descriptors.",
                 None if soft == resource.RLIM_INFINITY else soft)
    yield _gauge("process_open_fds", "Number of open file descriptors.", _count_fds())
    vsize, rss, start = _proc_stat()
    yield _gauge("process_resident_memory_bytes", "Resident memory size in bytes.", rss)
    yield _gauge("process_start_time_seconds",
                 "Start time of the process since unix epoch in seconds.", start)
    yield _gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", vsize)
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    yield _gauge("process_virtual_memory_max_bytes",
                 "Maximum amount of virtual memory available in bytes.",
                 -1 if soft == resource.RLIM_INFINITY else soft)


def _count_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


def _proc_stat() -> tuple[int | None, int | None, float | None]:
    """``(virtual bytes, resident bytes, start time)`` from ``/proc``; Nones elsewhere."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return None, None, None
    # fields[0] is field 3 of proc(5): starttime is 22, vsize 23, rss 24
    ticks = os.sysconf("SC_CLK_TCK")
    start = boot + int(fields[19]) / ticks
    return int(fields[20]), int(fields[21]) * resource.getpagesize(), start


# --- text format ------------------------------------------------------------------------


def _format(family: _Family) -> str:
    help = family.help.replace("\\", "\\\\").replace("\n", "\\n")
    lines = [f"# HELP {family.name} {help}", f"# TYPE {family.name} {family.kind}"]
    for labels, value in family.samples:
        text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels)
        lines.append(f"{family.name}{{{text}}} {go_float(value)}" if labels
                     else f"{family.name} {go_float(value)}")
    return "\n".join(lines) + "\n"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def go_float(value: float) -> str:
    """``value`` as Go's ``strconv.FormatFloat(v, 'g', -1, 64)`` (what ``expfmt`` writes)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    sign = "-" if value < 0 else ""
    digits_tuple, exponent = decimal.Decimal(repr(abs(value))).normalize().as_tuple()[1:]
    digits = "".join(map(str, digits_tuple))
    point = len(digits) + exponent  # the decimal point sits after this many digits
    exp = point - 1
    if exp < -4 or exp >= 6:  # Go's threshold for the shortest 'g' form
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{sign}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if point <= 0:
        return f"{sign}0.{'0' * -point}{digits}"
    if point >= len(digits):
        return sign + digits + "0" * (point - len(digits))
    return f"{sign}{digits[:point]}.{digits[point:]}"

