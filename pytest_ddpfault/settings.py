"""Settings of a run, resolved once with a stated precedence: ini < env < CLI < marker.

Kept apart from plugin.py so that validation can be used (and tested) without pytest.
"""
from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

from pytest_ddpfault.links import NODE_NET, node_address  # noqa: F401  (where they are used from)
from pytest_ddpfault import faults as _faults
from pytest_ddpfault.errors import SettingsError

START_METHODS = ("forkserver", "spawn")
DEFAULT_TIMEOUT = 60.0
DEFAULT_KEEP_WARM_IDLE = 600.0
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")
DEFAULT_WORLD_SIZE = 2
MARKER_SIGNATURE = ("ddp(world_size, nodes=1, fault=None, timeout=60.0, backend='gloo', proxy=False, "
                    "allow_unfired=False)")
MARKER_KEYS = ("world_size", "nodes", "fault", "timeout", "backend", "proxy", "allow_unfired")


def check_timeout(value, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise SettingsError(f"timeout {value!r} from {source}: must be a positive number of seconds")
    return float(value)


def parse_timeout(text, source: str) -> float:
    try:
        return check_timeout(float(text), source)
    except (TypeError, ValueError):  # SettingsError too: quote the text as given, not the float
        raise SettingsError(f"timeout {text!r} from {source}: must be a positive number of seconds") from None


def check_world_size(value, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingsError(f"world_size {value!r} from {source}: must be an int >= 1")
    return value


def check_nodes(value, world_size: int, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or world_size % value:
        raise SettingsError(f"nodes {value!r} from {source}: must be an int >= 1 that divides "
                            f"world_size={world_size}")
    return value


def parse_flag(value, source: str) -> bool:
    """A switch from ini or env: 1/true/yes/on or 0/false/no/off (a bool as it is)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise SettingsError(f"{value!r} from {source}: expected one of 1, true, yes, on, 0, false, no, off")


def parse_idle(text, source: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(f"keep-warm idle time {text!r} from {source}: must be a positive number of seconds")
    return value


def check_start_method(value: str, source: str) -> str:
    if value not in START_METHODS:
        raise SettingsError(f"start method {value!r} from {source}: allowed: {', '.join(START_METHODS)}")
    return value


def parse_preload(text: str | None) -> tuple[str, ...]:
    return tuple(m.strip() for m in (text or "").split(",") if m.strip())


def check_preload(modules: tuple[str, ...], source: str) -> tuple[str, ...]:
    """Fail early on a module that cannot exist. Only the top-level package is looked up:
    finding a submodule would import its parents (torch) into the pytest process; the
    zygote reports a failing submodule import at the first run."""
    for name in modules:
        top = name.split(".", 1)[0]
        if not top.isidentifier() or importlib.util.find_spec(top) is None:
            raise SettingsError(f"preload module {name!r} from {source}: no module named {top!r} "
                                f"(expected comma-separated importable module names)")
    return modules


@dataclass(frozen=True)
class SessionSettings:
    """From ini, env and the command line; the same for every test of a session."""

    timeout: float = DEFAULT_TIMEOUT
    start_method: str = "forkserver"
    preload: tuple = ()
    max_procs: int | None = None
    toxiproxy_url: str | None = None
    keep_warm: bool = False                        # the zygote outlives the session (--ddp-keep-warm)
    keep_warm_idle: float = DEFAULT_KEEP_WARM_IDLE  # seconds it waits for a client before it leaves
    network: str = "auto"                          # the network engine (--ddp-network; pytest_ddpfault/netns.py)


@dataclass(frozen=True)
class MarkerSettings:
    """One test's ``@pytest.mark.ddp(...)``, validated."""

    world_size: int = DEFAULT_WORLD_SIZE
    faults: tuple = ()
    timeout: float = DEFAULT_TIMEOUT
    backend: str = "gloo"
    proxy: bool = False
    nodes: int = 1
    allow_unfired: bool = False   # a fault that never fired only warns (else the test fails at teardown)


def marker_settings(args: tuple, kwargs: dict, session: SessionSettings) -> MarkerSettings:
    """Validate a ddp marker's arguments; ``SettingsError`` names the bad value."""
    source = "@pytest.mark." + MARKER_SIGNATURE.split("(")[0]
    if len(args) > 1:
        raise SettingsError(f"{source} takes at most one positional argument (world_size), got {len(args)}: "
                            f"signature is {MARKER_SIGNATURE}")
    values = dict(kwargs)
    if args:
        if "world_size" in values:
            raise SettingsError(f"{source}: world_size given both positionally and as a keyword")
        values["world_size"] = args[0]
    unknown = sorted(set(values) - set(MARKER_KEYS))
    if unknown:
        raise SettingsError(f"{source}: unknown keyword {unknown[0]!r}; allowed: {', '.join(MARKER_KEYS)}")
    world_size = check_world_size(values.get("world_size", DEFAULT_WORLD_SIZE), f"{source}(world_size=...)")
    nodes = check_nodes(values.get("nodes", 1), world_size, f"{source}(nodes=...)")
    timeout = (check_timeout(values["timeout"], "marker") if "timeout" in values else session.timeout)
    backend = values.get("backend", "gloo")
    if not isinstance(backend, str) or not backend:
        raise SettingsError(f"backend {backend!r} from marker: must be a backend name such as 'gloo'")
    proxy = values.get("proxy", False)
    if not isinstance(proxy, bool):
        raise SettingsError(f"proxy {proxy!r} from marker: must be True or False")
    allow_unfired = check_allow_unfired(values.get("allow_unfired", False), "marker")
    try:
        plan = _faults.parse_plan(values.get("fault"))
        _faults.validate_plan(plan, world_size, nodes)
    except _faults.FaultSpecError as exc:
        raise SettingsError(f"fault {values.get('fault')!r} from marker: {exc}") from None
    return MarkerSettings(world_size, tuple(plan), timeout, backend, proxy, nodes, allow_unfired)


def check_allow_unfired(value, source: str) -> bool:
    if not isinstance(value, bool):
        raise SettingsError(f"allow_unfired {value!r} from {source}: must be True (a fault that never fired "
                            f"only warns) or False (it fails the test)")
    return value


def check_run_keywords(fn, args: tuple, kwargs: dict, harness: dict, source: str) -> None:
    """Refuse a run whose keywords would not reach ``fn``, before any rank starts.

    ``harness``: the run's own keywords the caller gave (name -> value), which the harness
    takes; where ``fn`` also takes one of them by keyword (and neither ``args`` nor a
    ``functools.partial`` already gives it), ``fn`` would silently get its default.
    ``fault=`` in ``kwargs`` where ``fn`` takes no ``fault`` (a typo of ``faults=``) would make
    every rank raise ``TypeError``. Both are a ``SettingsError`` naming the way out. ``fn``
    whose signature cannot be read (some builtins) is let through. ``source`` names the call
    (``"ddp.run"``)."""
    import functools
    import inspect

    bound_by_partial: set = set()
    inner = fn
    while isinstance(inner, functools.partial):
        bound_by_partial.update(inner.keywords)
        inner = inner.func
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    by_keyword = {name for name, p in params.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    try:  # a parameter the positional arguments already fill is not lost
        given = set(sig.bind_partial(*args).arguments)
    except TypeError:
        given = set()
    name = getattr(inner, "__name__", None) or repr(inner)
    for key, value in harness.items():
        if key in by_keyword and key not in bound_by_partial and key not in given:
            lost = ("would get its default" if params[key].default is not params[key].empty
                    else "would be called without it")
            raise SettingsError(
                f"{source}({key}={value!r}): {name}() takes a parameter {key!r} too, but {key}= is "
                f"{source}'s own and would never reach it ({name} {lost}). To give it to "
                f"{name}: {source}(functools.partial({name}, {key}={value!r}), ...); to keep both, bind "
                f"{name}'s with functools.partial and pass {source}'s {key}= beside it")
    if "fault" in kwargs and "fault" not in by_keyword \
            and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise fault_typo(source, kwargs["fault"], f"{name}() takes no parameter 'fault'")


def fault_typo(source: str, value, why: str) -> SettingsError:
    """The error for ``fault=`` given to a run that takes ``faults=`` (the plan)."""
    return SettingsError(f"{source}(fault={value!r}): {why}; did you mean faults= (the run's fault plan)?")
