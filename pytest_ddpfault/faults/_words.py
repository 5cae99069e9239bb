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
