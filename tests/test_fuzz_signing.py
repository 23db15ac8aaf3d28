"""Property-based fuzzing of the body parser, Go's number spelling and the signature check.

Pure functions, in process: whatever bytes arrive, `parse_request_body` returns or raises
GoJsonError and `SignatureChecker.check` returns a SignedRequest or raises SignCheckFailure with
one of go-infer's code names, never anything else (anything else is a 500 in the HTTP tier).
The authoritative Go oracle is tests/data/goinfer-vectors (tests/test_vectors.py); here the
oracles are Go's documented rules, numpy's shortest float formatting, and go-infer's Python
client string where Go's JSON and Python's agree.
"""

from __future__ import annotations

import base64
import json
import math
import re
import time
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from goinfer.client import signed_body
from goinfer.crypto.gobase64 import go_std_b64decode_lenient
from goinfer.crypto.gojson import (
    GoJsonError,
    go_format_g,
    go_json_number,
    go_marshal,
    parse_request_body,
    parse_request_body_as_go,
    sorted_compact,
)
from goinfer.crypto.sign_string import go_sign_string, python_client_sign_string
from goinfer.crypto.sm2 import SM2Verifier, public_key_from_private_b64
from goinfer.http.signing import SignatureChecker, SignCheckFailure, SignedRequest
from goinfer.settings import ApiSettings

from conftest import APP_ID, APP_SECRET, PLAIN_APP_ID, PLAIN_APP_SECRET, SM2_PRIVATE_KEY

MAX_DEPTH = 512
NOW = 1_700_000_000
CODE_NAMES = {"SignFail", "SignFail1", "SignFail2", "SignFail3", "SignFail4", "SignFail5", "SignFail6"}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CHECKER = SignatureChecker(
    ApiSettings(app_id_secret={APP_ID: APP_SECRET, PLAIN_APP_ID: PLAIN_APP_SECRET},
                allow_sign_plain=(PLAIN_APP_ID,), request_timestamp_diff=300, max_json_depth=MAX_DEPTH),
    SM2Verifier(public_key_from_private_b64(SM2_PRIVATE_KEY)),
    clock=lambda: NOW,
)


def check(body: bytes) -> SignedRequest | SignCheckFailure:
    """The checker's verdict; any exception other than SignCheckFailure fails the test."""
    try:
        return CHECKER.check(body, now=NOW)
    except SignCheckFailure as refused:
        assert refused.code_name in CODE_NAMES, refused.code_name
        return refused


def parse(body: bytes) -> Any:
    try:
        return parse_request_body(body, MAX_DEPTH)
    except GoJsonError:
        return None


def sign(data: dict, sign_type: str = "SHA256") -> bytes:
    return signed_body(data, app_id=APP_ID, app_secret=APP_SECRET, sign_type=sign_type,
                       sm2_private_key=SM2_PRIVATE_KEY, timestamp=NOW)


# --- strategies --------------------------------------------------------------------------------

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
# Integers Go can hold as a float64 (beyond ~1.8e308 Go's decoder refuses them; so do we).
go_ints = st.integers(min_value=-(2**1000), max_value=2**1000) | st.sampled_from(
    [2**53 - 1, 2**53, 2**53 + 1, -(2**53) - 1, 2**63, 10**21, 10**22 + 1])
# Text that can be sent as UTF-8 (lone surrogates get their own tests: a client cannot send them).
texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12) | st.sampled_from(
    ["<script>&amp;", "\u2028\u2029", "\b\f\n\r\t\x00\x1f\x7f", "测试", "\"\\/", "😀", ""])
scalars = st.none() | st.booleans() | go_ints | finite_floats | texts
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=25,
)
data_dicts = st.dictionaries(texts, json_values, max_size=6)

# Raw JSON text, valid or nearly so, with the spellings Python and Go treat differently.
number_literals = st.from_regex(r"\A-?(0|[1-9][0-9]{0,25})(\.[0-9]{1,20})?([eE][-+]?[0-9]{1,4})?\Z") | \
    st.sampled_from(["1e999", "-1e999", "1e-999", "-0", "-0.0", "9" * 400, "1" + "0" * 5000, "NaN",
                     "Infinity", "-Infinity", "01", "1.", ".5", "+1", "0x10", "1e", "--1"])
escapes = st.sampled_from(["\\ud800", "\\udc00", "\\uD83D\\uDE00", "\\ud83d", "\\u0000", "\\u2028",
                           "\\b", "\\f", "\\/", "\\x", "\\u12", "\\", "\\\\", "\\\""])
string_literals = st.lists(st.one_of(escapes, st.text(max_size=4)), max_size=5).map(
    lambda parts: '"' + "".join(p.replace('"', '\\"') if not p.startswith("\\") else p for p in parts) + '"')
json_text = st.recursive(
    st.one_of(number_literals, string_literals, st.sampled_from(["true", "false", "null", "nul", "tru"])),
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda items: "[" + ",".join(items) + "]"),
        st.lists(st.tuples(string_literals, children), max_size=4).map(
            lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"),
    ),
    max_leaves=20,
)


def _mutate(body: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    for kind, position, chunk in edits:
        at = position % (len(body) + 1)
        if kind == 0:
            body = body[:at] + chunk + body[at:]      # insert
        elif kind == 1:
            body = body[:at] + body[at + len(chunk) + 1:]  # delete
        elif kind == 2:
            body = body[:at]                          # truncate
        else:
            body = body[:at] + chunk + body[at + len(chunk):]  # overwrite
    return body


edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 10**6),
                           st.binary(min_size=1, max_size=4) | st.sampled_from(
                               [b"[", b"{", b'"', b"\\", b"\xff", b"\xed\xa0\x80", b"1e999", b"\\ud800",
                                b"null", b",", b":", b"}", b"]"])), min_size=1, max_size=4)


# --- the parser ----------------------------------------------------------------------------------

@FUZZ
@given(st.binary(max_size=300))
@example(b"\xef\xbb\xbf{}")  # BOM: Go refuses it
@example(b'{"a":' * 600)
@example(b"[" * 100_000)
@example(b'"' + b"[" * 100_000 + b'"')
@example(b'{"a":"\\ud800"}' + b"]" * 10)
def test_parser_on_arbitrary_bytes(body):
    parse(body)


@FUZZ
@given(json_text)
@example("1" + "0" * 5000)  # int() digit limit: an error, not a crash
@example('{"a":' + "[" * 511 + '"\\ud800"' + "]" * 511 + "}")
def test_parser_on_json_text(text):
    parsed = parse(text.encode("utf-8", "surrogatepass"))
    if parsed is None:
        return
    # What parses is what Go would decode: no lone surrogate, no infinity, no NaN.
    encoded = json.dumps(parsed.value, ensure_ascii=False, allow_nan=False)
    assert not re.search("[\ud800-\udfff]", encoded)


def _outcome(parser: Any, body: bytes) -> tuple[Any, ...]:
    """What a parser makes of `body`, in a form that tells 1 from 1.0 and 0.0 from -0.0."""
    try:
        parsed = parser(body, MAX_DEPTH)
    except GoJsonError as exc:
        return ("refused", str(exc))
    return ("parsed", _typed(parsed.value), parsed.go_numbers_differ)


def _typed(value: Any) -> Any:
    if isinstance(value, dict):
        return ("dict", [(key, _typed(item)) for key, item in value.items()])
    if isinstance(value, list):
        return ("list", [_typed(item) for item in value])
    return (type(value).__name__, repr(value))


@FUZZ
@given(json_text | data_dicts.map(json.dumps), edits | st.just([]))
@example('{"a":-0}', [])
@example('{"a":9007199254740992}', [])
@example('{"a":9007199254740991,"b":[-9007199254740991]}', [])
@example('{"a":1,"b":2,"a":3}', [])
@example('{"":0,"":0.0,"":""}', [])  # a float under a key spelled again: not in the value, no flag
@example('{"a":"x","a":1.5}', [])
@example('{"a":"2026-01-01"}', [])
def test_fast_parser_is_the_go_parser(text, mutations):
    """The orjson path of parse_request_body gives what the json-module path gives, value for
    value (types, key order, duplicate keys), number flag included, and the same refusals."""
    body = _mutate(text.encode("utf-8", "surrogatepass"), mutations) if mutations else \
        text.encode("utf-8", "surrogatepass")
    assert _outcome(parse_request_body, body) == _outcome(parse_request_body_as_go, body)


NESTED_PAST_ORJSON: Any = 1
for _level in range(300):
    NESTED_PAST_ORJSON = [NESTED_PAST_ORJSON]
no_float_values = st.recursive(
    st.none() | st.booleans() | go_ints | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=25,
)


@FUZZ
@given(no_float_values)
@example({"a": "\ud800"})  # a lone surrogate: orjson refuses it, the json module writes it
@example({"a": 2**64})  # beyond orjson's integers
@example({"k": NESTED_PAST_ORJSON})  # deeper than orjson writes
def test_sorted_compact_is_the_json_modules(value):
    """The string-to-sign's `data` for bodies without floats: orjson's text is the json module's."""
    assert sorted_compact(value) == json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


@FUZZ
@given(data_dicts, edits, st.sampled_from(["SHA256", "SM2"]))
def test_mutated_valid_bodies(data, mutations, sign_type):
    body = _mutate(sign(data, sign_type), mutations)
    parse(body)
    verdict = check(body)
    if isinstance(verdict, SignedRequest):  # only an edit that changes nothing Go signs
        assert verdict.app_id == APP_ID


@FEW
@given(st.integers(0, 1200), st.sampled_from(["1.5", '"\\ud800"', "1", '"x"', "9007199254740993", "{}"]),
       st.booleans())
# Hypothesis raises the recursion limit while it runs a test, so it cannot see RecursionError
# bugs; the plain tests below pin those down. These examples keep the boundaries covered.
@example(400, "1.5", False)
@example(505, '"\\ud800"', True)
@example(510, "1.5", False)
@example(511, "1", False)
def test_nesting_at_any_depth(depth, leaf, objects):
    inner = leaf
    for _ in range(depth):
        inner = '{"k":' + inner + "}" if objects else "[" + inner + "]"
    body = (f'{{"appId":"{APP_ID}","version":"1","signType":"SHA256","timestamp":{NOW:d},"signData":"x",'
            f'"data":{{"a":{inner}}}}}').encode()
    verdict = check(body)
    assert isinstance(verdict, SignCheckFailure)
    within = depth + 2 + (leaf == "{}") <= MAX_DEPTH
    assert verdict.code_name == ("SignFail" if within else "SignFail1")


@pytest.mark.parametrize("leaf", [1.5, 2**60, "<&>"])
def test_signed_request_nested_to_the_limit_verifies(leaf):
    """Regression: the Go-spelling walk was recursive and raised RecursionError (a 500) from
    about 330 levels holding a float, inside MaxJsonDepth."""
    nested: Any = [leaf]
    for _ in range(MAX_DEPTH - 3):  # + the body object, `data` and the innermost list
        nested = [nested]
    for sign_type in ("SHA256", "SM2"):
        verdict = check(sign({"a": nested}, sign_type))
        assert isinstance(verdict, SignedRequest), verdict


def test_any_depth_with_max_json_depth_at_its_cap():
    """MaxJsonDepth may be set to 10000, past what Python's recursion limit lets json reach: every
    depth must still be an answer (it was a RecursionError, a 500, where json.dumps re-encoded
    a body the parser had just accepted)."""
    checker = SignatureChecker(ApiSettings(app_id_secret={APP_ID: APP_SECRET}, max_json_depth=10000), None)
    for depth in range(850, 1010):
        for leaf in ("1", "1.5", '"\\ud800"'):
            nested = "[" * depth + leaf + "]" * depth
            body = (f'{{"appId":"{APP_ID}","version":"1","signType":"SHA256","timestamp":{NOW:d},"signData":"x",'
                    f'"data":{{"a":{nested}}}}}').encode()
            with pytest.raises(SignCheckFailure) as refused:
                checker.check(body, now=NOW)
            assert refused.value.code_name in ("SignFail", "SignFail1"), (depth, leaf)


def test_lone_surrogate_escapes_verify_as_go_decodes_them():
    """Go decodes \\ud800 to U+FFFD and signs that; so does goinfer, at any depth within limit."""
    nested: Any = ["\ufffd", {"\ufffd": "a\ufffdb"}]
    for _ in range(MAX_DEPTH - 4):
        nested = [nested]
    fields = {"appId": APP_ID, "version": "1", "signType": "SHA256", "encType": "plain",
              "timestamp": NOW, "data": {"a": nested}}
    message = go_sign_string(fields, True, NOW, APP_SECRET).encode()
    import hashlib
    fields["signData"] = base64.b64encode(hashlib.sha256(message).hexdigest().encode()).decode()
    body = json.dumps(fields).replace("\\ufffd", "\\ud800").encode()
    verdict = check(body)
    assert isinstance(verdict, SignedRequest), verdict
    assert json.dumps(verdict.data) == json.dumps(fields["data"])


# --- the signature check -----------------------------------------------------------------------

@FUZZ
@given(st.one_of(st.binary(max_size=200), json_text.map(lambda t: t.encode("utf-8", "surrogatepass")),
                 st.dictionaries(st.sampled_from(["appId", "version", "signType", "signData", "timestamp",
                                                  "data", "encType", "x"]), json_values, max_size=7)
                 .map(lambda d: json.dumps(d).encode())))
def test_checker_on_arbitrary_bodies(body):
    verdict = check(body)
    assert isinstance(verdict, SignCheckFailure)  # nothing random is a valid SHA256/SM2 request


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object"}[type(value)]


def _candidates(fields: dict) -> set[str]:
    """The strings the server may verify for these fields (Go's, then go-infer's Python client's)."""
    parsed = parse_request_body(json.dumps(fields).encode(), MAX_DEPTH)
    ts = fields.get("timestamp")
    ts = math.trunc(ts) if isinstance(ts, (int, float)) and not isinstance(ts, bool) else 0
    return {go_sign_string(parsed.value, parsed.go_numbers_differ, ts, APP_SECRET),
            python_client_sign_string(parsed.value, APP_SECRET)}


REQUIRED = {"appId", "signType", "signData", "timestamp", "data"}


@FUZZ
@given(data_dicts, st.sampled_from(["SHA256", "SM2"]),
       st.sampled_from(["appId", "version", "signType", "encType", "timestamp", "data", "signData", "new"]),
       st.sampled_from(["remove", "other-type", "string"]), json_values, texts, st.data())
def test_any_field_tampered(data, sign_type, name, how, other, text, draw):
    fields = json.loads(sign(data, sign_type))
    original = dict(fields)
    signed_string = go_sign_string(
        parse_request_body(json.dumps(original).encode(), MAX_DEPTH).value, True, NOW, APP_SECRET)
    if name == "new":
        name = draw.draw(texts.filter(lambda k: k not in fields), label="new key")
        how = "string" if how == "remove" else how
    if how == "remove":
        assume(name in fields)
        del fields[name]
    elif how == "other-type":
        assume(name not in original or _json_type(other) != _json_type(original[name]))
        fields[name] = other
    else:
        fields[name] = text
    untouched = fields == original
    verdict = check(json.dumps(fields, ensure_ascii=False).encode())

    if untouched:
        assert isinstance(verdict, SignedRequest)
        return
    if name in REQUIRED and (how == "remove" or (how == "other-type")) or \
            (how == "string" and name in ("timestamp", "data")):
        expected = "SignFail1"
    elif name == "appId":
        expected = "SignFail5"
    elif name == "version" and isinstance(fields.get("version"), str) and fields["version"] != "1":
        expected = "SignFail6"
    elif name == "signType":
        expected = "SignFail" if text in ("SHA256", "SM2") else "SignFail3"
    elif name == "signData":
        same = (go_std_b64decode_lenient(text) == go_std_b64decode_lenient(original["signData"])
                if sign_type == "SM2" else text == original["signData"])
        expected = None if same else "SignFail"
    else:
        # version/encType/a new field: accepted exactly when the server verifies the signed string.
        expected = None if signed_string in _candidates(fields) else "SignFail"
    if expected is None:
        assert isinstance(verdict, SignedRequest), verdict
        assert verdict.data == json.loads(json.dumps(original["data"]))
    else:
        assert isinstance(verdict, SignCheckFailure) and verdict.code_name == expected, \
            (name, how, fields.get(name), verdict)


@FUZZ
@given(data_dicts, st.sampled_from(["SHA256", "SM2"]),
       st.one_of(st.text(max_size=100), st.binary(min_size=0, max_size=100).map(
           lambda b: base64.b64encode(b).decode()),
           st.binary(min_size=64, max_size=80).map(lambda b: base64.b64encode(b).decode()),
           st.from_regex(r"\A[A-Za-z0-9+/=\r\n]{0,120}\Z")))
def test_signdata_replaced(data, sign_type, sign_data):
    fields = json.loads(sign(data, sign_type))
    original = fields["signData"]
    fields["signData"] = sign_data
    verdict = check(json.dumps(fields).encode())
    same = (go_std_b64decode_lenient(sign_data) == go_std_b64decode_lenient(original)
            if sign_type == "SM2" else sign_data == original)
    assert isinstance(verdict, SignedRequest) == same, verdict
    if not same:
        assert verdict.code_name == "SignFail"


def test_signdata_go_lenient_spellings_of_the_same_signature():
    """go-infer ignores DecodeString's error: CR/LF and trailing garbage keep the same bytes."""
    fields = json.loads(sign({"a": 1}, "SM2"))
    good = fields["signData"]
    raw = base64.b64decode(good)
    zero_before_s = base64.b64encode(raw[:32] + b"\0\0" + raw[32:]).decode()  # s is "all the rest"
    for spelling in (good, good[:10] + "\r\n" + good[10:], good + "garbage!", good + "\n", zero_before_s):
        fields["signData"] = spelling
        verdict = check(json.dumps(fields).encode())
        assert isinstance(verdict, SignedRequest), spelling
        # One signature, one spelling for replay protection (each spelling was a new replay key).
        assert verdict.sign_data == good, spelling
    fields["signData"] = good[:-4]  # a quantum short: r||s loses bytes
    assert check(json.dumps(fields).encode()).code_name == "SignFail"


def test_top_level_values_go_leaves_unsigned():
    """go-infer signs no top-level bool, null or list: adding one keeps a request valid (as Go)."""
    fields = json.loads(sign({"a": 1}))
    for extra in (True, None, [1, 2], []):
        tampered = dict(fields, extra=extra)
        assert isinstance(check(json.dumps(tampered).encode()), SignedRequest), extra
    assert check(json.dumps(dict(fields, extra="x")).encode()).code_name == "SignFail"


# --- round trip: the client's signing and the server's check ------------------------------------

@FUZZ
@given(data_dicts, st.sampled_from(["SHA256", "SM2"]))
def test_client_signature_always_verifies(data, sign_type):
    verdict = check(sign(data, sign_type))
    assert isinstance(verdict, SignedRequest), verdict
    assert verdict.data == json.loads(json.dumps(data))  # big ints exact, floats exact


def _go_and_python_agree(value: Any) -> bool:
    """True where Go's json.Marshal and Python's json.dumps spell `value` alike."""
    if isinstance(value, float):
        return False
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) < 2**53
    if isinstance(value, str):
        return not re.search("[<>&\u2028\u2029\b\f]", value)
    if isinstance(value, list):
        return all(map(_go_and_python_agree, value))
    if isinstance(value, dict):
        return all(_go_and_python_agree(k) and _go_and_python_agree(v) for k, v in value.items())
    return True


# Data that Go's json.Marshal and Python's json.dumps spell alike (no floats, no HTML characters...).
agreeing_texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<>&\u2028\u2029\b\f"),
                         max_size=12)
agreeing_data = st.dictionaries(agreeing_texts, st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | agreeing_texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(agreeing_texts, children, max_size=4),
    max_leaves=25), max_size=6)


@FUZZ
@given(agreeing_data)
def test_go_string_equals_go_infer_python_clients_where_spellings_agree(data):
    """An independent oracle for go_sign_string: go-infer's own Python client's string."""
    assert _go_and_python_agree(data)
    fields = json.loads(sign(data))
    parsed = parse_request_body(json.dumps(fields).encode(), MAX_DEPTH)
    go_string = go_sign_string(parsed.value, parsed.go_numbers_differ, NOW, APP_SECRET)
    assert go_string == python_client_sign_string(fields, APP_SECRET)
    assert go_marshal(data, True) == go_marshal(data, False)  # the walk and json.dumps agree


def _reference_go_marshal(value: Any) -> str:
    """Go's json.Marshal, written from its rules (recursive: fine for these shallow values)."""
    if isinstance(value, dict):
        return "{" + ",".join(_go_string(k) + ":" + _reference_go_marshal(value[k])
                              for k in sorted(value, key=lambda k: k.encode())) + "}"
    if isinstance(value, list):
        return "[" + ",".join(map(_reference_go_marshal, value)) + "]"
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return _reference_go_float(float(value))


def _go_string(text: str) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif char in "\n\r\t":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char])
        elif code < 0x20 or char in "<>&\u2028\u2029":
            out.append(f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out) + '"'


def _reference_go_float(value: float) -> str:
    np = pytest.importorskip("numpy")
    magnitude = abs(value)
    if magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21):
        text = np.format_float_scientific(value, unique=True, trim="-", exp_digits=2)
        return re.sub(r"e-0(\d)$", r"e-\1", text)  # encoding/json: e-7, not e-07
    text = np.format_float_positional(value, unique=True, trim="-")
    return "-0" if text == "-0" else text


@FUZZ
@given(data_dicts)
def test_go_marshal_against_an_independent_reference(data):
    assert go_marshal(data, True) == _reference_go_marshal(data)


# --- Go's number spellings ----------------------------------------------------------------------

JSON_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _significant_digits(text: str) -> str:
    mantissa = text.lstrip("-").split("e")[0].replace(".", "")
    return mantissa.strip("0") or "0"


@FUZZ
@given(finite_floats)
@example(1e21)
@example(1e-6)
@example(9.999999999999999e20)
@example(9.999999999999999e-7)
@example(5e-324)
@example(-0.0)
@example(1.7976931348623157e308)
def test_go_json_number(value):
    text = go_json_number(value)
    assert JSON_NUMBER.fullmatch(text), text
    assert float(text) == value and math.copysign(1, float(text)) == math.copysign(1, value)
    magnitude = abs(value)
    uses_exponent = "e" in text
    assert uses_exponent == (magnitude != 0 and (magnitude < 1e-6 or magnitude >= 1e21)), text
    if uses_exponent:
        assert re.fullmatch(r"-?\d(\.\d*[1-9])?e(\+\d{2,3}|-[1-9]\d{0,2})", text), text
    else:
        assert not re.search(r"\.\d*0$", text) and not text.endswith("."), text
    # Shortest round-trip digits, as Go's strconv (-1 precision) and Python's repr both choose.
    assert _significant_digits(text) == _significant_digits(repr(value).replace("e+", "e"))


@FUZZ
@given(finite_floats)
@example(1e6)
@example(999999.0)
@example(123456.7)
@example(1e-4)
@example(9.9e-5)
@example(1e21)
@example(-0.0)
def test_go_format_g(value):
    """strconv.FormatFloat(v, 'g', -1, 64): %e when exp < -4 || exp >= 6 (shortest uses eprec 6)."""
    text = go_format_g(value)
    assert float(text) == value and math.copysign(1, float(text)) == math.copysign(1, value)
    exponent = Decimal(repr(abs(value))).adjusted() if value else 0
    if exponent < -4 or exponent >= 6:
        assert re.fullmatch(r"-?\d(\.\d*[1-9])?e[-+]\d{2,3}", text), text  # Go's %e: 2+ digits
    else:
        assert "e" not in text and JSON_NUMBER.fullmatch(text), text
    assert _significant_digits(text) == _significant_digits(repr(value).replace("e+", "e"))


def test_go_format_g_known_values():
    """Spellings from go-infer's vectors and Go's strconv documentation."""
    assert go_format_g(1234567.0) == "1.234567e+06"
    assert go_format_g(123456789.0) == "1.23456789e+08"
    assert go_format_g(100.0) == "100"
    assert go_format_g(1.234567) == "1.234567"
    assert go_format_g(0.0001) == "0.0001"
    assert go_format_g(0.00001) == "1e-05"
    assert go_format_g(1e100) == "1e+100"
    assert go_json_number(1e-7) == "1e-7"
    assert go_json_number(1e21) == "1e+21"
    assert go_json_number(1e20) == "100000000000000000000"
    assert go_json_number(1e-100) == "1e-100"


@FEW
@given(finite_floats)
def test_go_json_number_matches_numpy_shortest(value):
    assert go_json_number(value) == _reference_go_float(value)


def test_parse_is_fast_on_hostile_inputs():
    """Nothing here may be quadratic: each at most a fraction of a second for ~1 MB."""
    bodies = [b"[" * 1_000_000, b'"' * 1_000_000, b'["\\' + b"\\\\" * 500_000, b"\xff" * 1_000_000,
              b'{"a":"' + b"[" * 1_000_000 + b'"}', b"1" * 1_000_000, b'["\\ud800",' * 100_000]
    for body in bodies:
        started = time.perf_counter()
        parse(body)
        check(body)
        assert time.perf_counter() - started < 2, body[:20]
