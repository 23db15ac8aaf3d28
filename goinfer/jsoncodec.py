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
import re
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
# orjson's two spellings of a float that the json module (float.__repr__) spells otherwise:
# one-digit negative exponents (1.5e-7 for 1.5e-07) and 0.0000ddd for 1e-05 <= |x| < 1e-04.
_SMALL_DECIMAL = re.compile(rb"0\.0000(\d)(\d*)(?![.e])")
_DIGIT_OR_POINT = frozenset(b"0123456789.")
_DIGITS = frozenset(b"0123456789")
_SHORT_TEXT = 512  # bytes: an answer this short is scanned whole for small floats first
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


def dumps_sorted(value: Any, default: Callable[[Any], Any] | None = None) -> bytes | None:
    """json.dumps(value, ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":"),
    default=default) + "\\n" in UTF-8, byte for byte, from orjson (small floats respelled); None
    when they may differ otherwise (the caller then uses the json module)."""
    try:
        text = orjson.dumps(value, default=default, option=_SORTED)
    except orjson.JSONEncodeError:
        return None
    if b"null" in text:  # NaN or Infinity perhaps
        return None
    if len(text) < _SHORT_TEXT and b"e-" not in text and b"0.0000" not in text:
        return text  # (two scans of a short text: sooner than _repr_floats's own)
    return _repr_floats(text)


def _repr_floats(text: bytes) -> bytes | None:
    """orjson's `text` with its floats spelled as the json module spells them; None when a
    string holds a quote (then the caller uses the json module).

    Both write the shortest digits that read back as the float: only where the exponent goes
    and how it is padded differ. The embedding's answers (384 floats) come here about one time
    in two, with one or two such floats each: they are found with bytes.find and fixed one by
    one (~6 us for a 5 KB answer; the regular expressions this replaced took ~26 us, and the
    json module's whole text ~125 us). Without an escaped quote every quote delimits a string,
    so a spot is outside strings when an even number of quotes comes before it.
    """
    if b"\\" in text and b'\\"' in text:  # (a backslash is found by memchr, a 2-byte needle ~1 ns a byte)
        return None
    fixes = [(at + 2, at + 2, b"0") for at in _outside_strings(text, b"e-", rare_first_byte=True)
             if _one_digit_exponent(text, at + 2)]
    for start in _outside_strings(text, b"0.0000", rare_first_byte=False):
        match = _SMALL_DECIMAL.match(text, start)
        if match is not None and not (start and text[start - 1] in _DIGIT_OR_POINT):
            first, rest = match.groups()
            fixes.append((start, match.end(), first + (b"." + rest if rest else b"") + b"e-05"))
    if not fixes:
        return text
    fixes.sort()
    pieces: list[bytes] = []
    done = 0
    for start, end, replacement in fixes:
        pieces += (text[done:start], replacement)
        done = end
    pieces.append(text[done:])
    return b"".join(pieces)


def _outside_strings(text: bytes, needle: bytes, rare_first_byte: bool) -> list[int]:
    """Where `needle` starts outside strings, left to right, matches not overlapping.

    With `rare_first_byte`, its first byte is looked for alone (memchr) and the rest checked
    after it: "e-" as a whole needle is found at ~1 ns a byte in a list of negative numbers,
    "e" alone at a fraction of that. A frequent first byte (the "0" of 0.0000) is not.
    """
    found: list[int] = []
    quotes = counted = 0
    sought = needle[:1] if rare_first_byte else needle
    at = text.find(sought)
    while at != -1:
        if not text.startswith(needle, at):  # only the first byte was sought
            at = text.find(sought, at + 1)
            continue
        quotes += text.count(b'"', counted, at)
        counted = at
        if not quotes % 2:
            found.append(at)
        at = text.find(sought, at + len(needle))
    return found


def _one_digit_exponent(text: bytes, end: int) -> bool:
    """Whether e- (ending at `end`) is followed by exactly one digit: 1.5e-7, not 1.5e-07 or 1e-10."""
    return end < len(text) and text[end] in _DIGITS and not (end + 1 < len(text) and text[end + 1] in _DIGITS)


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
