"""Hints for error messages, shared by every part of the spec grammar."""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def missing_hash(word: str, counted: Iterable[str]) -> str:
    """``step3`` / ``all_reduce2``: the call number without its ``#``."""
    m = re.fullmatch(r"(\w*?)_?(\d+)", word)
    if m and m.group(1) in set(counted):
        return f" (did you mean '{m.group(1)}#{m.group(2)}'?)"
    return ""


def show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)



def more_nodes(node: int, world_size: int, instead: str) -> str:
    """How ``node`` becomes a node of the group: the fewest virtual nodes that hold it and
    divide ``world_size``, on the marker (``ddp.torchrun``: ``nnodes=``); or ``instead``, the
    kind's way to name ranks."""
    count = next((n for n in range(node + 1, world_size + 1) if world_size % n == 0), None)
    if count is None:
        return f"world_size={world_size} makes at most {world_size} nodes: name ranks instead, {instead}"
    per_node = world_size // count
    return (f"add nodes={count} to the marker (@pytest.mark.ddp(world_size={world_size}, nodes={count}): {count} "
            f"nodes of {per_node} rank{'s' if per_node > 1 else ''}; ddp.torchrun(..., nnodes={count})), "
            f"or name ranks instead, {instead}")
