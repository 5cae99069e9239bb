"""Network faults on the store's path, through a Toxiproxy proxy in front of the store:
``block_port`` (the proxy disabled) and one kind per Toxiproxy toxic.

Applied at ``init`` (before the ranks start) or at ``t=S``, removed after ``duration``.
The run's ``store_proxy`` is the client side (``toxiproxy.client.StoreProxy``): it
speaks to the embedded server or a real one alike, and no request of it outlives the run's
deadline.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pytest_ddpfault.faults.base import HarnessSide, RunAction, RunControl, register
from pytest_ddpfault.faults.params import DURATION, MS, STREAM, TOXICITY, Fuzz, Number, Param, at_param

if TYPE_CHECKING:
    from pytest_ddpfault.faults.spec import Fault

NET_AT = at_param("init", "init", "time")


class OnStoreProxy(RunAction):
    """Applied at ``init`` or ``t=S`` to the run's store proxy; removed after ``duration``."""

    def before_launch(self) -> None:
        at = self.fault.resolved_at()
        if at is None or at.kind == "init":
            self._apply(trigger="init")

    def after_ranks(self) -> None:
        at = self.fault.resolved_at()
        if at is not None and at.kind == "time":
            self.run.at(at.seconds, lambda: self._apply(trigger=str(at)))

    def _apply(self, trigger: str) -> None:
        proxy = self.run.store_proxy
        self.fault.definition.apply(self, proxy)
        self.fire(detail=f"proxy {proxy.name}", trigger=trigger)
        duration = self.fault.get("duration")
        if duration:
            start = 0.0 if trigger == "init" else self.fault.resolved_at().seconds
            self.run.at(start + duration, lambda: self._remove(proxy))

    def _remove(self, proxy) -> None:
        self.fault.definition.remove(self, proxy)
        self.fire(detail="removed", trigger=f"duration={self.fault.get('duration')}")


class _Network(HarnessSide):
    needs_proxy = True
    refused = {"rank": "the proxy carries the store traffic of every rank"}

    def action(self, fault: Fault, run: RunControl) -> RunAction:
        return OnStoreProxy(fault, run)

    def apply(self, action: RunAction, proxy) -> None:
        raise NotImplementedError

    def remove(self, action: RunAction, proxy) -> None:
        raise NotImplementedError


@register
class BlockPort(_Network):
    name = "block_port"
    doc = "the store proxy is disabled: its port refuses connections, open ones are closed"
    params = (NET_AT, DURATION)

    def apply(self, action: RunAction, proxy) -> None:
        proxy.set_enabled(False)

    def remove(self, action: RunAction, proxy) -> None:
        proxy.set_enabled(True)


class _Toxic(_Network):
    attributes: ClassVar[tuple[Param, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.params = (NET_AT, *cls.attributes, STREAM, TOXICITY, DURATION)

    def toxic_attributes(self, fault: Fault) -> dict[str, Any]:
        return {p.name: fault.get(p.name) for p in self.attributes}

    def toxic(self, fault: Fault, name: str | None = None) -> dict[str, Any]:
        """The body of Toxiproxy's POST /proxies/{p}/toxics (also add_toxic's kwargs)."""
        stream = fault.get("stream")
        return {"name": name or f"ddpfault_{self.name}_{stream}", "type": self.toxic_type,
                "stream": stream, "toxicity": fault.get("toxicity"),
                "attributes": self.toxic_attributes(fault)}

    def apply(self, action: RunAction, proxy) -> None:
        action.toxic_name = proxy.toxic_name(self.name)  # unique per run
        proxy.add_toxic(self.toxic(action.fault, name=action.toxic_name))

    def remove(self, action: RunAction, proxy) -> None:
        proxy.remove_toxic(action.toxic_name)


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
