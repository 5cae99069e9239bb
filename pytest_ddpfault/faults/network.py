"""Network faults through Toxiproxy: ``block_port`` (the proxy disabled), ``partition``
(nothing gets through, held back or refused) and one kind per Toxiproxy toxic.

Without a scope they act on the store's path: the run's store proxy
(``toxiproxy.client.StoreProxy``). With ``ranks=(...)`` or ``nodes=(...)`` they act on
the gloo data plane: on every rank-to-rank link between that set and the ranks outside
it, both ways, through one Toxiproxy proxy per such link (``links.LinkProxies``, made by
the harness before the ranks start; the ranks route their gloo connections through them).

When: ``at=init`` (in place before the ranks start) or ``at=t=S`` (the harness, on the
run's clock); a scoped fault also takes an in-rank trigger (``step#N``, ``OP#N``): the
counting rank (``rank=``, else the lowest of the set) puts it in place itself before that
call proceeds. ``duration=S`` removes it S seconds after it came (the harness does).
"""
from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from pytest_ddpfault.errors import FaultSpecError
from pytest_ddpfault.faults._words import more_nodes
from pytest_ddpfault.links import cut_off_nodes
from pytest_ddpfault.rank.netns import NodeRoutes
from pytest_ddpfault.faults.base import (
    HarnessSide,
    InRank,
    RunAction,
    RunControl,
    register,
)
from pytest_ddpfault.faults.params import (
    DURATION,
    MS,
    RANK,
    STREAM,
    TOXICITY,
    Choice,
    Fuzz,
    IndexSet,
    Number,
    Param,
    at_param,
)

if TYPE_CHECKING:
    from pytest_ddpfault.faults.spec import Fault

NET_AT = at_param("init", "init", "time", "op", "step")
IN_RANK_FORMS = frozenset({"op", "step"})
SCOPE = (Param("ranks", IndexSet("rank"), None, "act on the links between these ranks and all others"),
         Param("nodes", IndexSet("node"), None, "act on the links between these nodes' ranks and all others"))
SCOPED_RANK = Param("rank", RANK.type, None, "the rank that counts an in-rank trigger (default: the set's lowest)")
# Which traffic a scoped fault acts on (with virtual nodes the store lives on node 0).
PLANE = Param("plane", Choice("all", "store", "data"), "all",
              "with a scope: all (the gloo links and the store paths of the nodes it cuts off from node 0), "
              "store (those store paths only: the control plane down, gloo up), data (the gloo links only: "
              "a firewall that lets MASTER_PORT through)", Fuzz.never())
# partition(mode=drop) holds the bytes back with a latency toxic longer than any run, and a
# peer's close behind them with a slow_close as long (a rank that gave up must not tell the
# other side through the cut): when they are removed, Toxiproxy (and the embedded server)
# deliver what they held, none lost.
HOLD_MS = 24 * 3600 * 1000
HOLD_TOXICS = (("latency", {"latency": HOLD_MS, "jitter": 0}), ("slow_close", {"delay": HOLD_MS}))
BOTH_STREAMS = ("upstream", "downstream")


def scope_of(fault: Fault) -> tuple[str, tuple[int, ...]] | None:
    """``("ranks", (...))`` or ``("nodes", (...))`` for a scoped fault, else None."""
    for key in ("ranks", "nodes"):
        if key in fault.definition.keys and fault.get(key) is not None:
            return key, fault.get(key)
    return None


def in_rank_trigger(fault: Fault) -> bool:
    at = fault.resolved_at()
    return at is not None and at.kind in IN_RANK_FORMS


def removal_trigger(fault: Fault) -> str:
    """The trigger of the event that records the fault's removal ``duration`` after it came."""
    return f"duration={fault.get('duration')}"


class OnProxies(RunAction):
    """Applied at ``init`` or ``t=S`` by the harness, or in the counting rank (which tells the
    harness); removed ``duration`` seconds after it came, by the harness."""

    def proxies(self) -> list:
        if scope_of(self.fault) is None:
            return [self.run.store_proxy]
        # the "namespaces" engine's node routes (rank/netns.py), else the link proxies
        return (getattr(self.run, "namespaces", None) or self.run.link_proxies).of_fault(self.fault)

    def before_launch(self) -> None:
        at = self.fault.resolved_at()
        if at is None or at.kind == "init":
            self._apply(trigger="init", start=0.0)

    def after_ranks(self) -> None:
        at = self.fault.resolved_at()
        if at is not None and at.kind == "time":
            self.run.at(at.seconds, lambda: self._apply(trigger=str(at), start=at.seconds))

    def fired_in_rank(self, seconds_from_start: float) -> None:
        """The counting rank put it in place at that time (an in-rank trigger)."""
        self._remove_after(seconds_from_start)

    def _apply(self, trigger: str, start: float) -> None:
        proxies = self.proxies()
        for proxy in proxies:
            self.fault.definition.apply(self.fault, proxy)
        self.fire(detail=self.fault.definition.where(self.fault, proxies), trigger=trigger)
        self._remove_after(start)

    def _remove_after(self, start: float) -> None:
        duration = self.fault.get("duration")
        if duration:
            self.run.at(start + duration, self._remove)

    def _remove(self) -> None:
        for proxy in self.proxies():
            self.fault.definition.remove(self.fault, proxy)
        self.fire(detail="removed", trigger=removal_trigger(self.fault))


class _Network(HarnessSide, InRank):
    needs_proxy = True
    needs_harness = True   # the harness makes the proxies; a plan in DDPFAULT_PLAN has none
    reports_when_in_place = True  # the harness removes it ``duration`` after it is in place
    refused: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.params = (*SCOPE, SCOPED_RANK, NET_AT, *cls.own_params(), DURATION, PLANE)

    @classmethod
    def own_params(cls) -> tuple[Param, ...]:
        return ()

    # -- the spec ----------------------------------------------------------------
    def check(self, values: Mapping[str, Any]) -> None:
        scoped = [k for k in ("ranks", "nodes") if k in values]
        at = values.get("at")
        if len(scoped) == 2:
            raise FaultSpecError(f"{self.name}: give ranks= or nodes=, not both")
        if not scoped:
            if at is not None and at.kind in IN_RANK_FORMS:
                raise FaultSpecError(f"{self.name}: an in-rank trigger (at={at}) needs a scope, ranks=(...) or "
                                     f"nodes=(...); on the store's path use at=init or at=t=SECONDS")
            if "plane" in values:
                raise FaultSpecError(f"{self.name}: plane= chooses the traffic of a scoped fault (ranks= or "
                                     f"nodes=); without a scope the fault acts on the store proxy only")
            if "rank" in values:
                raise FaultSpecError(f"{self.name}: rank= names the rank that counts an in-rank trigger of a "
                                     f"scoped fault; without ranks= or nodes= the fault acts on the store proxy, "
                                     f"which carries every rank's store traffic")
        elif "rank" in values and (at is None or at.kind not in IN_RANK_FORMS):
            raise FaultSpecError(f"{self.name}: rank= names the rank that counts an in-rank trigger "
                                 f"(step#N, OP#N); at={at or 'init'} is the harness's")

    def check_group(self, fault: Fault, world_size: int, nodes: int) -> None:
        super().check_group(fault, world_size, nodes)
        scope = scope_of(fault)
        if scope is None:
            return
        key, items = scope
        size = world_size if key == "ranks" else nodes
        outside = [i for i in items if i >= size]
        if outside:
            fix = f": {more_nodes(max(items), world_size, 'ranks=(...)')}" if key == "nodes" else ""
            raise FaultSpecError(f"{key}={items} names {key[:-1]} {outside[0]}, outside the group ({key[:-1]}s "
                                 f"0..{size - 1}){fix} (in fault spec {str(fault)!r})")
        side = self.scope_ranks(fault, world_size, nodes)
        if len(side) == world_size:
            raise FaultSpecError(f"{key}={items} holds every rank: no link crosses from it to another rank; "
                                 f"leave some out (in fault spec {str(fault)!r})")
        if fault.get("plane") == "store" and not cut_off_nodes(side, world_size, nodes):
            raise FaultSpecError(f"plane=store cuts the store paths of the nodes a fault separates from node 0 "
                                 f"(the store's host); {key}={items} separates no whole node from node 0"
                                 f"{' (the group has one node: add nodes=N to the marker)' if nodes == 1 else ''}: "
                                 f"scope it by nodes=(...) (in fault spec {str(fault)!r})")

    def proxies_store(self, fault: Fault) -> bool:
        return scope_of(fault) is None

    def acts_for(self, fault: Fault, trigger: str) -> float | None:
        if fault.get("duration") and trigger == removal_trigger(fault):
            return 0.0  # the event of its removal
        return fault.get("duration")

    def scope_ranks(self, fault: Fault, world_size: int, nodes: int) -> frozenset[int]:
        """The ranks on the faulted side of the cut (empty for the store's path)."""
        scope = scope_of(fault)
        if scope is None:
            return frozenset()
        key, items = scope
        if key == "ranks":
            return frozenset(items)
        per_node = world_size // nodes
        return frozenset(r for n in items for r in range(n * per_node, (n + 1) * per_node))

    def acting_rank(self, fault: Fault, world_size: int, nodes: int) -> int | None:
        if not in_rank_trigger(fault):
            return None  # the harness puts it in place
        rank = fault.get("rank")
        return min(self.scope_ranks(fault, world_size, nodes)) if rank is None else rank

    # -- the action ----------------------------------------------------------------
    def action(self, fault: Fault, run: RunControl) -> RunAction:
        return OnProxies(fault, run)

    def routes_reason(self, fault: Fault, world_size: int, nodes: int) -> str | None:
        """Why the "namespaces" engine (kernel routes between node namespaces) cannot do this
        fault, so that its run needs the proxies; None when it can."""
        return f"{self.name} has no kernel route for it here (no netem, no iptables): it needs the Toxiproxy proxies"

    def proxies_reason(self, fault: Fault) -> str | None:
        """Why the proxies engine cannot do this fault; None when it can."""
        return None

    def fire_in_rank(self, fault: Fault) -> None:
        table = _installed_table()
        if table is None:
            raise RuntimeError(f"{fault} acts on the gloo links between ranks, which only the ddp.run "
                               f"harness proxies; this process has none")
        for proxy in table.of_fault(fault):
            self.apply(fault, proxy)

    def event_fields(self, fault: Fault) -> dict[str, Any]:
        table = _installed_table()
        return {"detail": self.where(fault, table.of_fault(fault))} if table is not None else {}

    def where(self, fault: Fault, proxies: list) -> str:
        if scope_of(fault) is None:
            return f"proxy {proxies[0].name}"
        return f"{len(proxies)} link{'s' if len(proxies) != 1 else ''}: " + \
            ", ".join(p.link for p in proxies[:8]) + (", ..." if len(proxies) > 8 else "")

    def streams(self, fault: Fault) -> tuple[str, ...]:
        return BOTH_STREAMS if scope_of(fault) is not None else (fault.get("stream"),)

    def toxic_name(self, fault: Fault, stream: str) -> str:
        """The same in every process (a rank adds it, the harness removes it)."""
        return f"ddpfault_{self.name}_{stream}_{zlib.crc32(str(fault).encode()):08x}"

    def apply(self, fault: Fault, proxy) -> None:
        raise NotImplementedError

    def remove(self, fault: Fault, proxy) -> None:
        raise NotImplementedError


def _installed_table():
    """This rank's node namespaces (the "namespaces" engine), else its link proxies."""
    from pytest_ddpfault import links
    from pytest_ddpfault.rank import netns

    return netns.installed() or links.installed()


class _Disables(_Network):
    def apply(self, fault: Fault, proxy) -> None:
        proxy.set_enabled(False)

    def remove(self, fault: Fault, proxy) -> None:
        proxy.set_enabled(True)


@register
class BlockPort(_Disables):
    name = "block_port"
    doc = "the proxy is disabled: its port refuses connections, open ones are closed"


@register
class Partition(_Network):
    name = "partition"
    doc = ("nothing gets through, either way: mode=drop holds the bytes back (none lost; they flow "
           "again after `duration`), mode=reject closes the connections and refuses new ones")

    @classmethod
    def own_params(cls) -> tuple[Param, ...]:
        return (Param("mode", Choice("drop", "reject"), "drop",
                      "drop: held back, none lost; reject: reset and refused", Fuzz.of("drop", "reject")),
                Param("direction", Choice("both", "out", "in"), "both",
                      "with a scope: both, out (nothing from the set reaches the rest), in (nothing from the "
                      "rest reaches the set)", Fuzz.never()))

    def check(self, values: Mapping[str, Any]) -> None:
        super().check(values)
        if values.get("direction", "both") != "both" and "ranks" not in values and "nodes" not in values:
            raise FaultSpecError(f"{self.name}: direction= is one side of a cut: give ranks=(...) or nodes=(...)")

    def check_group(self, fault: Fault, world_size: int, nodes: int) -> None:
        super().check_group(fault, world_size, nodes)
        if fault.get("direction") == "both" or scope_of(fault) is None:
            return
        per_node = world_size // nodes
        side = self.scope_ranks(fault, world_size, nodes)
        inside = sorted({a // per_node for a in side if any(b // per_node == a // per_node and b not in side
                                                            for b in range(world_size))})
        if inside:
            raise FaultSpecError(f"direction={fault.get('direction')} needs a cut between whole nodes: {fault} "
                                 f"also cuts links inside node {inside[0]}, where which rank connects (and so "
                                 f"which way a stream runs) is gloo's choice; scope it by nodes=(...) (with "
                                 f"nodes=N on the marker) or use direction=both")

    def routes_reason(self, fault: Fault, world_size: int, nodes: int) -> str | None:
        if scope_of(fault) is None:
            return f"{fault} acts on the store proxy"
        if fault.get("plane") != "all":
            return f"{fault} cuts one plane (plane={fault.get('plane')}); routes cannot tell ports apart"
        per_node = world_size // nodes
        side = self.scope_ranks(fault, world_size, nodes)
        if any((r // per_node) * per_node + i not in side for r in side for i in range(per_node)):
            return f"{fault} cuts through a node; routes act between nodes"
        return None

    def proxies_reason(self, fault: Fault) -> str | None:
        if fault.get("mode") == "reject" and fault.get("direction") != "both":
            return (f"{fault}: a proxy refuses a connection both ways (mode=reject); one way it can only "
                    f"hold bytes back (mode=drop)")
        return None

    def _streams(self, fault: Fault, proxy) -> tuple[str, ...]:
        """The proxy's streams the cut holds back: both, or the one from (out) or to (in) the set."""
        direction = fault.get("direction")
        if direction == "both":
            return BOTH_STREAMS
        out = proxy.stream_from(self.scope_ranks(fault, *proxy.group))  # links.LinkProxies.of_fault
        return (out,) if direction == "out" else tuple(s for s in BOTH_STREAMS if s != out)

    def apply(self, fault: Fault, proxy) -> None:
        if isinstance(proxy, NodeRoutes):
            proxy.cut()
            return
        if fault.get("mode") == "reject":
            proxy.set_enabled(False)
            return
        for stream in self._streams(fault, proxy):  # the bytes, then a close behind them: neither gets through
            for toxic, attributes in HOLD_TOXICS:
                proxy.add_toxic({"name": f"{self.toxic_name(fault, stream)}_{toxic}", "type": toxic,
                                 "stream": stream, "toxicity": 1.0, "attributes": attributes})

    def remove(self, fault: Fault, proxy) -> None:
        if isinstance(proxy, NodeRoutes):
            proxy.heal()
            return
        if fault.get("mode") == "reject":
            proxy.set_enabled(True)
            return
        for stream in self._streams(fault, proxy):
            for toxic, _ in HOLD_TOXICS:
                proxy.remove_toxic(f"{self.toxic_name(fault, stream)}_{toxic}")


class _Toxic(_Network):
    attributes: ClassVar[tuple[Param, ...]] = ()

    @classmethod
    def own_params(cls) -> tuple[Param, ...]:
        return (*cls.attributes, STREAM, TOXICITY)

    def check(self, values: Mapping[str, Any]) -> None:
        super().check(values)
        if "stream" in values and ("ranks" in values or "nodes" in values):
            raise FaultSpecError(f"{self.name}: a scoped fault acts on each link both ways; stream= chooses "
                                 f"a direction on the store proxy only: remove it")

    def toxic_attributes(self, fault: Fault) -> dict[str, Any]:
        return {p.name: fault.get(p.name) for p in self.attributes}

    def toxic(self, fault: Fault, name: str | None = None, stream: str | None = None) -> dict[str, Any]:
        """The body of Toxiproxy's POST /proxies/{p}/toxics (also add_toxic's kwargs)."""
        stream = stream or fault.get("stream")
        return {"name": name or f"ddpfault_{self.name}_{stream}", "type": self.toxic_type,
                "stream": stream, "toxicity": fault.get("toxicity"),
                "attributes": self.toxic_attributes(fault)}

    def apply(self, fault: Fault, proxy) -> None:
        for stream in self.streams(fault):
            proxy.add_toxic(self.toxic(fault, name=self.toxic_name(fault, stream), stream=stream))

    def remove(self, fault: Fault, proxy) -> None:
        for stream in self.streams(fault):
            proxy.remove_toxic(self.toxic_name(fault, stream))


@register
class Blackhole(_Toxic):
    name, toxic_type = "blackhole", "timeout"
    doc = "connections open but data vanishes"
    attributes = (Param("timeout", MS, 0, "ms until the connection is closed; 0 = never", Fuzz.between(0, 500)),)


@register
class Latency(_Toxic):
    name = toxic_type = "latency"
    doc = "each chunk is delayed"
    attributes = (Param("latency", MS, 1000, "ms added", Fuzz.between(0, 300)),
                  Param("jitter", MS, 0, "ms, +-", Fuzz.between(0, 50)))


@register
class Bandwidth(_Toxic):
    name = toxic_type = "bandwidth"
    doc = "rate limit; 0 stalls the stream"
    attributes = (Param("rate", Number(int, unit="KB/s"), 0, "KB/s", Fuzz.between(0, 1000)),)


@register
class ResetPeer(_Toxic):
    name = toxic_type = "reset_peer"
    doc = "after the first data, waits `timeout` then closes with RST"
    attributes = (Param("timeout", MS, 0, "ms before the reset", Fuzz.between(0, 500)),)


@register
class SlowClose(_Toxic):
    name = toxic_type = "slow_close"
    doc = "the close after EOF is delayed"
    attributes = (Param("delay", MS, 1000, "ms", Fuzz.between(0, 300)),)


@register
class LimitData(_Toxic):
    name = toxic_type = "limit_data"
    doc = "forwards `bytes` per connection and stream, then closes"
    attributes = (Param("bytes", Number(int, unit="bytes"), 0, "bytes", Fuzz.between(0, 4096)),)
