"""Which network engine a run gets: ``"namespaces"`` or ``"proxies"`` (``--ddp-network``).

- ``namespaces`` (``rank/netns.py``): each virtual node its own Linux network namespace with
  its node address, joined to the others by veth links; the store host lives in node 0's, each
  rank in its node's. A scoped ``partition`` is kernel routes, so it cuts every socket between
  the nodes, whoever opened it: gloo, the store, the user's own servers and heartbeats.
- ``proxies``: today's Toxiproxy link proxies (``links.py``) on the gloo links and the store
  paths; other sockets between nodes are not cut.

``auto`` (the default) picks ``namespaces`` for a run with ``nodes > 1`` whose plan has a
scoped fault, every one of which the kernel here can do (a ``partition`` between whole nodes
over all planes), when the machine permits namespaces (root, or unprivileged user
namespaces, with ``ip``, ``nsenter`` and ``unshare`` at hand); otherwise ``proxies``. A run
without a scoped fault has nothing to cut and keeps the cheaper engine. Asking for
``namespaces`` where the machine or the plan does not allow it is a ``SettingsError`` that
says why, never a silent fallback. A multi-node ``ddp.torchrun`` follows the same rule
(``launchers.torchrun.network_engine``): each node's agent and workers in its node's
namespace, the rendezvous store in node 0's.
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterable
from typing import Any

from pytest_ddpfault.errors import SettingsError

NETWORK_ENGINES = ("auto", "namespaces", "proxies")
PROBE_BUDGET = 10.0
HELP_NETWORK = ("how scoped network faults between virtual nodes act: namespaces (a Linux network namespace "
                "per node; a partition cuts every socket between nodes), proxies (Toxiproxy on the gloo links "
                "and store paths) or auto (namespaces where permitted and the plan allows, else proxies; "
                "default). Env DDPFAULT_NETWORK.")


def check_network(value, source: str) -> str:
    if value not in NETWORK_ENGINES:
        raise SettingsError(f"network {value!r} from {source}: must be one of {', '.join(NETWORK_ENGINES)}")
    return value


USERNS_ENV = "DDPFAULT_NETNS_USERNS"  # "1": the user-namespace way even as root (as unprivileged users get)


def unprivileged() -> bool:
    """Whether the namespaces go in a user namespace of their own (not root, or asked to)."""
    return os.geteuid() != 0 or os.environ.get(USERNS_ENV) == "1"


@functools.lru_cache(maxsize=None)
def not_permitted() -> str | None:
    """Why this machine cannot give each node a network namespace; None when it can."""
    missing = [tool for tool in ("ip", "nsenter", "unshare") if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not installed (util-linux, iproute2)"
    argv = ["unshare", "-Urn" if unprivileged() else "-n", "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=PROBE_BUDGET)
    except subprocess.TimeoutExpired:
        return f"`{' '.join(argv)}` did not finish within {PROBE_BUDGET:g} s"
    if done.returncode != 0:
        return (f"`{' '.join(argv)}` failed here ({done.stderr.strip() or f'exit {done.returncode}'}): "
                f"{'unprivileged user namespaces are off' if unprivileged() else 'no CAP_SYS_ADMIN'}")
    return None


def _scoped(plan: Iterable[Any], world_size: int, nodes: int) -> list:
    return [f for f in plan if f.definition.scope_ranks(f, world_size, nodes)]


def plan_reasons(plan: Iterable[Any], world_size: int, nodes: int, proxy: bool) -> list[str]:
    """Why routes between node namespaces cannot do this plan (empty: they can)."""
    out = ["proxy=True puts the store behind a Toxiproxy proxy in the root namespace"] if proxy else []
    for fault in plan:
        if getattr(fault.definition, "needs_proxy", False):
            why = fault.definition.routes_reason(fault, world_size, nodes)
            if why:
                out.append(why)
    return out


def proxies_reasons(plan: Iterable[Any]) -> list[str]:
    """Why the proxies cannot do this plan (empty: they can)."""
    return [why for f in plan if getattr(f.definition, "needs_proxy", False)
            for why in [f.definition.proxies_reason(f)] if why]


def choose(requested: str, plan: tuple, world_size: int, nodes: int, proxy: bool = False) -> str:
    """The engine a run gets (``"namespaces"`` or ``"proxies"``); SettingsError when the one
    asked for (or, under ``auto``, either) cannot do the plan, saying why."""
    check_network(requested, "the run's network=")
    if requested != "proxies":
        why = [] if requested == "auto" and not _scoped(plan, world_size, nodes) else \
            plan_reasons(plan, world_size, nodes, proxy)
        machine = not_permitted()
        if requested == "namespaces" and (machine or why):
            raise SettingsError(f"network='namespaces' cannot run this plan: {machine or '; '.join(why)}; "
                                f"use network='auto' or 'proxies' (--ddp-network, DDPFAULT_NETWORK)")
        if requested == "namespaces" or (not why and not machine and nodes > 1 and _scoped(plan, world_size, nodes)):
            return "namespaces"
    why = proxies_reasons(plan)
    if why:
        alt = "" if requested == "proxies" else \
            f"; namespaces could not: {not_permitted() or '; '.join(plan_reasons(plan, world_size, nodes, proxy))}"
        raise SettingsError(f"the proxies network engine cannot run this plan: {'; '.join(why)}{alt}")
    return "proxies"
