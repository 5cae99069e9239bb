"""JSON the way Toxiproxy's Go server reads and writes it.

Reading follows ``encoding/json``'s ``Decoder.Decode`` into a typed struct: the first JSON
value of the body is decoded (anything after it is ignored), keys match field names
case-insensitively, unknown keys are ignored, ``null`` leaves a field as it was, and a
value of the wrong type is an error worded like Go's ("json: cannot unmarshal string into
Go struct field LatencyToxic.attributes.latency of type int64"). A lone surrogate escape
(``"\\ud800"``) becomes U+FFFD, as in Go, so every decoded string is valid Unicode.

Writing follows ``json.Marshal``: compact, keys in the given order, ``<``, ``>`` and ``&``
escaped, floats (toxicity is a Go ``float32``) printed in their shortest form.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any, Iterable, NamedTuple

__all__ = [
    "BadJSON",
    "json_kind",
    "Field",
    "decode_first",
    "decode_struct",
    "dumps",
    "float32",
]

_INT_RANGES = {"int64": (-(2**63), 2**63 - 1), "int": (-(2**63), 2**63 - 1)}
_FLOAT32_MAX = 3.4028234663852886e38


class BadJSON(ValueError):
    """The body is not the JSON the endpoint wants; ``str()`` is Go's wording."""


class _Float(float):
    """A JSON number written with a fraction or an exponent; keeps its literal for errors."""

    literal: str

    def __new__(cls, literal: str) -> "_Float":
        self = super().__new__(cls, literal)
        self.literal = literal
        return self


def _no_constants(name: str) -> Any:
    raise ValueError(f"invalid character {name[0]!r} looking for beginning of value")


_DECODER = json.JSONDecoder(parse_float=_Float, parse_constant=_no_constants)


def decode_first(body: bytes) -> Any:
    """Decode the first JSON value in ``body`` as Go's ``json.Decoder`` does.

    Raises :class:`BadJSON` with Go-like wording (``EOF``, ``unexpected EOF``,
    ``invalid character ...``) for an empty, truncated or malformed body.
    """
    text = body.decode("utf-8", "replace")
    start = len(text) - len(text.lstrip(" \t\r\n"))
    if start == len(text):
        raise BadJSON("EOF")
    try:
        value, _ = _DECODER.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip(" \t\r\n")):
            raise BadJSON("unexpected EOF") from None
        raise BadJSON(f"invalid character {text[exc.pos]!r} ({exc.msg})") from None
    except ValueError as exc:  # NaN / Infinity literals, which Go rejects
        raise BadJSON(str(exc)) from None
    except RecursionError:
        raise BadJSON("exceeded max depth") from None
    return _valid_unicode(value)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(value: Any) -> Any:
    """Replace lone surrogates (left by ``\\ud800``-style escapes) with U+FFFD, like Go.

    Python's decoder joins a valid escaped pair into one character, so any surrogate
    still in a string is a lone one.
    """
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_valid_unicode(item) for item in value]
    if isinstance(value, dict):
        return {_valid_unicode(key): _valid_unicode(item) for key, item in value.items()}
    return value


def json_kind(value: Any) -> str:
    """Go's word for a JSON value's kind in ``cannot unmarshal <kind>``."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _literal(value: Any) -> str:
    return value.literal if isinstance(value, _Float) else str(value)


def float32(value: float) -> float:
    """Round ``value`` to the nearest IEEE single, as Go stores a ``float32``."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _convert(value: Any, gotype: str, where: str) -> Any:
    """Check one decoded JSON value against a Go field type; return the Python value."""
    kind = json_kind(value)
    wrong = BadJSON(f"json: cannot unmarshal {kind} into {where} of type {gotype}")
    if gotype == "string":
        if kind != "string":
            raise wrong
        return value
    if gotype == "bool":
        if kind != "bool":
            raise wrong
        return value
    if kind != "number":
        raise wrong
    if gotype in _INT_RANGES:
        low, high = _INT_RANGES[gotype]
        if isinstance(value, float) or not low <= value <= high:
            raise BadJSON(
                f"json: cannot unmarshal number {_literal(value)} into {where} of type {gotype}"
            )
        return int(value)
    # float32
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not abs(number) <= _FLOAT32_MAX:
        raise BadJSON(
            f"json: cannot unmarshal number {_literal(value)} into {where} of type {gotype}"
        )
    return float32(number)


class Field(NamedTuple):
    """One field of a Go struct: its JSON name and Go type (string, bool, int, int64, float32)."""

    name: str
    gotype: str


def decode_struct(
    value: Any,
    fields: Iterable[Field],
    into: dict[str, Any],
    *,
    struct_name: str,
    path: str = "",
    top_type: str | None = None,
) -> dict[str, Any]:
    """Decode a JSON object into ``into`` (updated in place and returned), Go-style.

    ``struct_name`` and ``path`` only shape the error message
    (``Go struct field <struct_name>.<path><field>``); ``top_type`` names the Go type
    when ``value`` is the whole body (``Go value of type <top_type>``).
    """
    if value is None:
        return into
    if not isinstance(value, dict):
        where = f"Go value of type {top_type}" if top_type else f"Go struct field {struct_name}.{path.rstrip('.')}"
        gotype = "" if top_type else f" of type {struct_name}"
        raise BadJSON(f"json: cannot unmarshal {json_kind(value)} into {where}{gotype}")
    by_lower = {f.name.lower(): f for f in fields}
    exact = {f.name: f for f in by_lower.values()}
    for key, raw in value.items():
        field = exact.get(key) or by_lower.get(key.lower())
        if field is None or raw is None:
            continue
        where = f"Go struct field {struct_name}.{path}{field.name}"
        into[field.name] = _convert(raw, field.gotype, where)
    return into


def _go_number(value: float) -> float | int:
    """A float as Go prints a ``float32``: shortest round-tripping digits, no ``.0``."""
    value = float32(value)
    for digits in range(1, 10):
        text = f"{value:.{digits}g}"
        if float32(float(text)) == value:
            break
    number = float(text)
    return int(number) if number.is_integer() and abs(number) < 1e21 else number


def _go_floats(o: Any) -> Any:
    if isinstance(o, float):
        return _go_number(o)
    if isinstance(o, dict):
        return {k: _go_floats(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_go_floats(v) for v in o]
    return o


_HTML_ESCAPES = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                 ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def dumps(obj: Any) -> bytes:
    """Encode like Go's ``json.Marshal`` (compact, HTML-safe, Go float formatting)."""
    text = json.dumps(_go_floats(obj), separators=(",", ":"), ensure_ascii=False)
    for char, escaped in _HTML_ESCAPES:
        text = text.replace(char, escaped)
    return _SURROGATE.sub("\ufffd", text).encode("utf-8")  # never fails to encode
