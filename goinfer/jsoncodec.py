"""JSON for what goinfer sends between its tiers and to its clients: orjson's speed, the json module's results.

Per request the HTTP process writes a Job, reads a Reply and writes an answer, and a worker reads
the Job and writes the Reply; orjson does each 5-10x faster than the json module (measured: ~10 us
less CPU per request in the HTTP process, ~4 us in a worker). It is no drop-in replacement,
though: it reads integers beyond 64 bits as floats, writes NaN and Infinity as null, spells some
small floats differently (1e-7 for 1e-07, 0.00001 for 1e-05), and reads or writes nothing else
differently for the plain values JSON carries. So each function here takes orjson's result only
where none of that can have happened, and otherwise returns exactly what the json module
returns, or raises what it raises.

Beyond plain values: what the json module refuses, orjson's passthrough options send back to it
(dataclasses, dates, subclasses of str, int, dict and list), except UUIDs and enum members, which
orjson always writes (as their string and value): both paths write them so (`_also_orjsons`).
"""

from __future__ import annotations

import enum
import json
import uuid
from collections.abc import Callable
from typing import Any

import orjson

_PASSTHROUGH = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS
_SORTED = _PASSTHROUGH | orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE
# A 64-bit integer has at most 19 digits and one beyond has at least 19: any number with fewer
# digits in a row is read alike by both. (Digits are mapped to "0" to find such a run in one scan.)
_DIGITS_AS_ZERO = bytes.maketrans(b"0123456789", b"0" * 10)
_LONG_NUMBER = b"0" * 19
# The json module's encoders, built once: json.dumps builds one per call when given options.
_ENCODERS: dict[Callable[[Any], Any] | None, json.JSONEncoder] = {}


def loads(raw: bytes | str) -> Any:
    """json.loads(raw): the same value, or the same exception (RecursionError included)."""
    if isinstance(raw, bytes) and _LONG_NUMBER not in raw.translate(_DIGITS_AS_ZERO):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass  # NaN, a lone surrogate, 1e400, not UTF-8...: json's own verdict below
    return json.loads(raw)


def dumps(value: Any, default: Callable[[Any], Any] | None = None) -> str:
    """Compact, strict JSON (no NaN or Infinity) of `value`, that reads back as json.dumps(value,
    ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=default) does; floats may
    be spelled differently. Raises what json.dumps raises (ValueError, TypeError, RecursionError)."""
    try:
        text = orjson.dumps(value, default=default, option=_PASSTHROUGH)
    except orjson.JSONEncodeError:
        pass  # a lone surrogate, an integer beyond 64 bits, deep nesting...: json's own verdict below
    else:
        if b"null" not in text:  # else NaN or Infinity may have been written as null
            return text.decode("utf-8")
    encoder = _ENCODERS.get(default)
    if encoder is None:
        encoder = _ENCODERS[default] = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                                                        default=_also_orjsons(default))
    return encoder.encode(value)


def dumps_sorted(value: Any) -> bytes | None:
    """json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":"))
    + "\\n" in UTF-8, byte for byte, from orjson; None when orjson's bytes may differ (the caller
    then uses the json module)."""
    try:
        text = orjson.dumps(value, option=_SORTED)
    except orjson.JSONEncodeError:
        return None
    # null: NaN or Infinity perhaps; "e-" or "0.0000": a float whose spelling may differ.
    if b"null" in text or b"e-" in text or b"0.0000" in text:
        return None
    return text


def _also_orjsons(default: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    """`default` for the json module that first writes what orjson writes natively and the json
    module refuses: a UUID as its string, an enum member as its value."""

    def convert(value: Any) -> Any:
        if isinstance(value, uuid.UUID):
            return str(value)
        if isinstance(value, enum.Enum):
            return value.value
        if default is None:
            raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
        return default(value)

    return convert
