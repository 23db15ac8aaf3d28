"""JSON as go-infer's Go server reads and writes it, for building the exact string it signs.

go-infer decodes a request with `json.Unmarshal` into `map[string]interface{}` and re-encodes
`data` with `json.Marshal` before checking the signature, so a signature is valid over *Go's*
spelling of the request: every number as a float64, HTML characters and U+2028/9 escaped, bad
UTF-8 replaced byte by byte. Python's json module differs on each point; this module bridges
them, fast when a request holds nothing that Go would spell differently.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from decimal import Decimal
from typing import Any

import orjson


def _go_utf8_replace(exc: UnicodeError) -> tuple[str, int]:
    """Go's decoder replaces every byte of an invalid UTF-8 sequence with U+FFFD, one per byte."""
    if not isinstance(exc, UnicodeDecodeError):  # used for decoding only
        raise exc
    return "\ufffd" * (exc.end - exc.start), exc.end


codecs.register_error("goinfer-go-utf8", _go_utf8_replace)

_EXACT_INT_LIMIT = 2**53
_NUMBER_TYPES = (float, int)  # exact types: bool is not a number here
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NEEDS_GO_ESCAPES = re.compile("\\\\[bf]|[<>&\u2028\u2029]")
_ESCAPE_TOKEN = re.compile("\\\\(?:u[0-9a-fA-F]{4}|.)|[<>&\u2028\u2029]")
# json.dumps(value, **options) is JSONEncoder(**options).encode(value), with an encoder built per
# call (~1 us) unless every option is the default: these are built once.
_SORTED_COMPACT = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))
_UNICODE = json.JSONEncoder(ensure_ascii=False)
_GO_ESCAPES = {
    "\\b": "\\u0008",
    "\\f": "\\u000c",
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}


class GoJsonError(ValueError):
    """The body is JSON that Go's decoder refuses (or nested past our documented limit)."""


class ParsedBody:
    """A decoded request: Python values for the models, plus what the signature check needs."""

    __slots__ = ("value", "go_numbers_differ")

    def __init__(self, value: Any, go_numbers_differ: bool) -> None:
        self.value = value
        # True when some number would be spelled differently by Go (a float, -0, or an integer
        # beyond 2**53): then `go_marshal` must walk the values instead of using json.dumps.
        self.go_numbers_differ = go_numbers_differ


def parse_request_body(body: bytes, max_depth: int) -> ParsedBody:
    """Decode a body as Go's json.Unmarshal would accept it; raise GoJsonError otherwise.

    The usual request (strings and integers below 2**53) is read by orjson, ~2.5x sooner than
    the json module with its number hooks; on the HTTP tier's event loop, per request, that is
    ~10 us in a loaded process. orjson refuses everything the json module would read otherwise
    here (invalid UTF-8, lone surrogates, NaN, a BOM), and a body that holds -0, a float or a
    large integer is not taken from it: each of those goes to `parse_request_body_as_go`, for
    its verdict, its message and Go's numbers.
    """
    if b"-0" not in body and body.count(b"[") + body.count(b"{") <= max_depth:
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            if _numbers_exact(value):
                return ParsedBody(value, False)
    return parse_request_body_as_go(body, max_depth)


def _numbers_exact(value: Any) -> bool:
    """Whether every number in `value` is an integer below 2**53, which Go spells as Python does."""
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        if kind is dict:
            stack.extend(item.values())
        elif kind is list:
            stack.extend(item)
        elif kind is float or (kind is int and not -_EXACT_INT_LIMIT < item < _EXACT_INT_LIMIT):
            return False
    return True


def parse_request_body_as_go(body: bytes, max_depth: int) -> ParsedBody:
    """parse_request_body for every body: the json module, with Go's number and UTF-8 rules."""
    text = body.decode("utf-8", "goinfer-go-utf8")
    if text.count("[") + text.count("{") > max_depth:
        _check_depth(text, max_depth)
    differ = False

    def on_float(literal: str) -> float:
        nonlocal differ
        value = float(literal)
        if math.isinf(value):
            raise GoJsonError(f"number {literal[:40]} is out of range for a float64")
        differ = True
        return value

    def on_int(literal: str) -> int | float:
        nonlocal differ
        if literal == "-0":
            differ = True
            return -0.0
        value = int(literal)
        if -_EXACT_INT_LIMIT < value < _EXACT_INT_LIMIT:
            return value
        if math.isinf(float(literal)):
            raise GoJsonError(f"number {literal[:40]}... is out of range for a float64")
        differ = True
        return value

    def on_constant(name: str) -> Any:
        raise GoJsonError(f"invalid character in JSON: {name} is not a JSON value")

    try:
        value = json.loads(text, parse_float=on_float, parse_int=on_int, parse_constant=on_constant)
    except GoJsonError:
        raise
    except RecursionError:
        # Python's recursion limit, not max_depth, stopped it (MaxJsonDepth may be set up to
        # 10000 but ~970 levels is what json.loads reaches here): don't blame max_depth.
        raise GoJsonError("JSON nested too deeply for this server to decode") from None
    except ValueError as exc:  # JSONDecodeError and int() digit limits
        raise GoJsonError(f"invalid JSON: {exc}") from None
    if _LONE_SURROGATE_ESCAPE.search(text):
        value = _replace_lone_surrogates(value)
    # The flag describes the value, not the text: a float under a key spelled again later (the
    # last one wins, as in Go) is not in it, and orjson's path would rightly say False.
    return ParsedBody(value, differ and not _numbers_exact(value))


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse nesting beyond the limit before handing the text to a recursive parser."""
    brackets = _STRING_LITERAL.sub("", text)
    depth = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            if depth > max_depth:
                raise GoJsonError(f"JSON nested deeper than {max_depth} levels")
        elif char in "]}":
            depth -= 1


def _replace_lone_surrogates(value: Any) -> Any:
    """Go decodes an unpaired \\ud800 escape to U+FFFD; Python keeps an unencodable surrogate.

    Iterative, in place on the freshly decoded value: a recursive walk (two Python frames per
    level on 3.11) hit RecursionError at ~495 levels, inside MaxJsonDepth, and answered 500.
    """
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    stack = [value] if isinstance(value, (list, dict)) else []
    while stack:
        container = stack.pop()
        if isinstance(container, list):
            for index, item in enumerate(container):
                if isinstance(item, str):
                    container[index] = _SURROGATE.sub("\ufffd", item)
                elif isinstance(item, (list, dict)):
                    stack.append(item)
        else:
            items = list(container.items())
            container.clear()
            for key, item in items:  # keys that become equal: the last one wins, as in Go
                if isinstance(item, str):
                    item = _SURROGATE.sub("\ufffd", item)
                elif isinstance(item, (list, dict)):
                    stack.append(item)
                container[_SURROGATE.sub("\ufffd", key)] = item
    return value


def go_marshal(value: Any, numbers_differ: bool = True) -> str:
    """The text Go's json.Marshal writes for a decoded value (sorted keys, Go escapes)."""
    if numbers_differ:
        out = _marshal_walk(value)
    else:
        out = sorted_compact(value)
    return go_escapes(out)


def sorted_compact(value: Any) -> str:
    """json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")) for decoded
    JSON without floats (orjson writes those otherwise), from orjson: the same text, ~1 us sooner
    per request (the json module builds its C encoder on every call)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode("utf-8")
    except orjson.JSONEncodeError:  # nested past orjson's limit, a lone surrogate: the json module's verdict
        return _SORTED_COMPACT.encode(value)


def go_escapes(encoded: str) -> str:
    """Turn Python's JSON string escapes into Go's (HTML-safe, \\u0008 for \\b as Go 1.19)."""
    if not _NEEDS_GO_ESCAPES.search(encoded):
        return encoded
    return _ESCAPE_TOKEN.sub(lambda m: _GO_ESCAPES.get(m.group(0), m.group(0)), encoded)


def _marshal_walk(value: Any) -> str:
    # Iterative: the recursive walk (a frame plus a generator frame per level) raised
    # RecursionError from ~330 levels of nesting holding a float, well inside MaxJsonDepth (512),
    # and the HTTP tier answered 500 with a traceback. Work items are (is_text, item).
    out: list[str] = []
    work: list[tuple[bool, Any]] = [(False, value)]
    while work:
        is_text, item = work.pop()
        if is_text:
            out.append(item)
        elif isinstance(item, dict):
            items = sorted(item.items())
            work.append((True, "}"))
            for index in range(len(items) - 1, -1, -1):
                key, child = items[index]
                work.append((False, child))
                work.append((True, ("," if index else "") + _string(key) + ":"))
            work.append((True, "{"))
        elif isinstance(item, list):
            # A vector of numbers (checked on the first item before all of them): no walk per number.
            if (not item or type(item[0]) in _NUMBER_TYPES) and all(type(x) in _NUMBER_TYPES for x in item):
                out.append("[" + ",".join([go_json_number(float(x)) for x in item]) + "]")
                continue
            work.append((True, "]"))
            for index in range(len(item) - 1, -1, -1):
                work.append((False, item[index]))
                if index:
                    work.append((True, ","))
            work.append((True, "["))
        elif isinstance(item, str):
            out.append(_string(item))
        elif item is True:
            out.append("true")
        elif item is False:
            out.append("false")
        elif item is None:
            out.append("null")
        else:
            out.append(go_json_number(float(item)))
    return "".join(out)


def _string(text: str) -> str:
    return _UNICODE.encode(text)


def _shortest_digits(value: float) -> tuple[str, int]:
    """The shortest round-trip digits of |value| and its decimal exponent (d.ddd x 10^exp)."""
    sign, digits, exponent = Decimal(repr(abs(value))).normalize().as_tuple()
    assert isinstance(exponent, int)  # a finite float: not 'n', 'N' or 'F'
    text = "".join(map(str, digits))
    return text, len(text) - 1 + exponent


def _scientific(value: float, cleanup: bool) -> str:
    digits, exp = _shortest_digits(value)
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    exponent = f"{'-' if exp < 0 else '+'}{abs(exp):02d}"
    if cleanup and exponent[0] == "-" and len(exponent) == 3 and exponent[1] == "0":
        exponent = "-" + exponent[2]  # encoding/json writes e-7, not e-07
    return f"{'-' if value < 0 else ''}{mantissa}e{exponent}"


def _fixed(value: float) -> str:
    return format(Decimal(repr(value)).normalize(), "f")


def go_json_number(value: float) -> str:
    """A float64 as Go's encoding/json writes it ('f' format, 'e' below 1e-6 or from 1e21).

    Both Go and Python's repr write the shortest digits that round-trip, so repr's text is
    reused where the notations agree (most numbers): the general path via Decimal costs ~3x
    more, and a body of floats is the costliest thing a client can make the tier check.
    """
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    text = repr(value)
    if "e" not in text:  # 1e-4 <= |value| < 1e16: Go's 'f' spelling, less repr's ".0"
        return text[:-2] if text.endswith(".0") else text
    magnitude = abs(value)
    if magnitude < 1e-6 or magnitude >= 1e21:  # 'e' in both, with Go's exponent cleanup (e-07 -> e-7)
        mantissa, _, exponent = text.partition("e")
        if len(exponent) == 3 and exponent[0] == "-" and exponent[1] == "0":
            exponent = "-" + exponent[2]
        return f"{mantissa}e{exponent}"
    return _fixed(value)


def go_format_g(value: float) -> str:
    """strconv.FormatFloat(v, 'g', -1, 64): how go-infer writes top-level numbers."""
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    _, exp = _shortest_digits(value)
    if exp < -4 or exp >= 6:  # Go uses precision 6 for this choice when printing shortest
        return _scientific(value, cleanup=False)
    return _fixed(value)
