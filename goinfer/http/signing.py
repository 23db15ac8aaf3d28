"""go-infer's `checkSign`: who sent a request, and is its signature good.

The checks run in go-infer's order with go-infer's codes, over the string go-infer builds, so
every request go-infer accepts is accepted here and vice versa. One deliberate difference:
a request signed by go-infer's own Python client (`gen_param_str`) that go-infer refuses only
because Go spells its JSON differently (`<`, `1.0`, big integers, ...) is accepted too, by also
checking the signature over the string that client built.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from goinfer.crypto.gobase64 import go_std_b64decode_lenient
from goinfer.crypto.gojson import GoJsonError, ParsedBody, parse_request_body
from goinfer.crypto.sign_string import go_sign_string, python_client_sign_string
from goinfer.settings import ApiSettings


class SignatureVerifier(Protocol):
    """Verifies SM3withSM2 signatures against the server's one public key."""

    def verify(self, message: bytes, signature: bytes) -> bool: ...


class SignCheckFailure(Exception):
    """A refused request: `code_name` is the ErrCode entry (SignFail1...), `detail` what failed."""

    def __init__(self, code_name: str, detail: str = "") -> None:
        super().__init__(code_name, detail)
        self.code_name = code_name
        self.detail = detail


@dataclass(frozen=True)
class SignedRequest:
    """A request whose signature checked out."""

    app_id: str
    data: dict[str, Any]
    sign_type: str
    # The signature in one canonical spelling (what replay protection keys on): go-infer decodes
    # SM2 signData leniently (CR/LF anywhere, garbage after the padding, zero bytes before s), so
    # one captured SM2 signature could be re-sent under endless spellings, each a new replay key.
    sign_data: str


class SignatureChecker:
    """Holds the keys and runs go-infer's checkSign over request bodies."""

    def __init__(
        self,
        api: ApiSettings,
        sm2_verifier: SignatureVerifier | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secrets = dict(api.app_id_secret)
        self._allow_plain = frozenset(api.allow_sign_plain)
        self._max_diff = api.request_timestamp_diff
        self._max_depth = api.max_json_depth
        self._sm2 = sm2_verifier
        self._clock = clock

    def now(self) -> float:
        """The time request timestamps are checked against (a check made elsewhere is given it)."""
        return self._clock()

    def check(self, body: bytes, now: float | None = None) -> SignedRequest:
        """Return the request's appId and data, or raise SignCheckFailure."""
        try:
            parsed = parse_request_body(body, self._max_depth)
        except GoJsonError as exc:
            raise SignCheckFailure("SignFail1", str(exc)) from None
        fields = parsed.value
        if fields is None:
            fields = {}  # Go unmarshals `null` into an empty map; the field checks then fail
        if not isinstance(fields, dict):
            raise SignCheckFailure("SignFail1", "request body must be a JSON object")

        app_id = _field(fields, "appId", str, "appid")
        version = fields.get("version")
        if not isinstance(version, str):
            version = "1"  # go-infer only type-asserts version; anything else counts as "1"
        sign_type = _field(fields, "signType", str, "sign_type")
        sign_data = _field(fields, "signData", str, "sign_data")
        timestamp = _field(fields, "timestamp", (int, float), "timestamp")
        data = _field(fields, "data", dict, "data")

        timestamp_int = math.trunc(timestamp)
        current = int(self._clock() if now is None else now)
        if abs(current - timestamp_int) > self._max_diff:
            raise SignCheckFailure("SignFail2")
        secret = self._secrets.get(app_id)
        if secret is None:
            raise SignCheckFailure("SignFail5")
        if version != "1":
            raise SignCheckFailure("SignFail6")

        if sign_type == "plain" and app_id in self._allow_plain:
            return SignedRequest(app_id, data, sign_type, sign_data)
        if sign_type not in ("SHA256", "SM2"):
            raise SignCheckFailure("SignFail3")
        try:
            for sign_string in _strings_to_sign(fields, parsed, timestamp_int, secret):
                if self._signature_matches(sign_type, sign_string.encode("utf-8"), sign_data):
                    return SignedRequest(app_id, data, sign_type, _canonical_signature(sign_type, sign_data))
        except RecursionError:
            # json.dumps (C, but counted against the recursion limit) re-encodes what the parser
            # just accepted, a few frames deeper: with MaxJsonDepth set near 1000 a body at the
            # edge raised here and answered 500. Refuse it as too deep, as the parser would.
            raise SignCheckFailure("SignFail1", "JSON nested too deeply to check") from None
        raise SignCheckFailure("SignFail")

    def _signature_matches(self, sign_type: str, message: bytes, sign_data: str) -> bool:
        if sign_type == "SHA256":
            expected = base64.b64encode(hashlib.sha256(message).hexdigest().encode("ascii"))
            return hmac.compare_digest(expected, sign_data.encode("utf-8"))
        if self._sm2 is None:
            return False  # no SM2PrivateKey configured: no SM2 signature can be valid
        return self._sm2.verify(message, go_std_b64decode_lenient(sign_data))


def _canonical_signature(sign_type: str, sign_data: str) -> str:
    """A verified signature's one spelling: SM2 as base64 of r||s, 32 bytes each."""
    if sign_type != "SM2":
        return sign_data  # SHA256 signData is compared exactly: it has one spelling already
    raw = go_std_b64decode_lenient(sign_data)
    r, s = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big")  # < n: it verified
    return base64.b64encode(r.to_bytes(32, "big") + s.to_bytes(32, "big")).decode("ascii")


def _field(fields: dict, name: str, kind: type | tuple, label: str) -> Any:
    value = fields.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise SignCheckFailure("SignFail1", label)
    return value


def _strings_to_sign(fields: dict, parsed: ParsedBody, timestamp: int, secret: str):
    """Go's string first; then, if it differs, the one go-infer's Python client signs."""
    go_string = go_sign_string(fields, parsed.go_numbers_differ, timestamp, secret)
    yield go_string
    client_string = python_client_sign_string(fields, secret)
    if client_string != go_string:
        yield client_string
