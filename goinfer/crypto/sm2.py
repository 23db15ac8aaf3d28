"""SM2 signatures (SM3withSM2) with go-infer's verification semantics, fast in pure Python.

go-infer's server checks every SM2-signed request against one fixed public key, so the hot path
is ``SM2Verifier.verify``.  It precomputes, once per process and key, fixed-base window tables for
both the generator G and the public key P (26 windows of 10 bits, 1023 affine points each, about
4 MB per table and 0.1-0.2 s to build).  A verification is then ``s*G + t*P`` as a plain sum of at
most 52 table entries, using mixed Jacobian+affine additions and no doublings, plus a final
comparison that avoids an inversion.  (8-bit windows need 64 additions: 20 % slower; 12-bit
windows gain another 5 % for a table four times the size.)

Arithmetic uses gmpy2 when it is importable (about 2x faster) and Python ints otherwise;
``BACKEND`` says which, and ``GOINFER_SM2_BACKEND=int|gmpy2|auto`` forces it.

Side channels: verification only handles public values (G, the public key, the signature and
the message), so none of it needs to be constant-time.  ``sign`` reuses the same variable-time
table code with the secret nonce; it is meant for clients, tests and tools, not for a service
that signs attacker-chosen messages with a long-lived key.

Semantics follow go-infer's ``http/sm2.go`` over tjfoc/gmsm v1.4.1:

* a signature is raw bytes ``r || s`` with ``r = sig[0:32]`` and ``s = sig[32:]`` (all the rest,
  any length); fewer than 64 bytes is a failure;
* ``1 <= r, s < n``; ``Z = SM3(ENTL || uid || a || b || Gx || Gy || Px || Py)`` with the
  default uid ``1234567812345678``; ``e = SM3(Z || msg)``; ``t = (r + s) mod n != 0``;
  accept iff ``(e + x(s*G + t*P)) mod n == r``.

One deliberate difference, in cases only the private key can produce: if ``s*G + t*P`` is the
point at infinity we reject, as the SM2 standard intends, and if ``s*G == t*P`` we use the true
sum ``2*s*G``.  In the tjfoc source we read, both cases come out of its point addition with
Z = 0, which its affine conversion turns into (0, 0), so it would accept exactly when
``r == e mod n``.  Reaching either case needs ``s = -r*d/(1+d)`` or ``s = r*d/(1-d) mod n``,
i.e. knowledge of d, so no client without the key can observe the difference.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import threading
from collections.abc import Iterable, Sequence
from typing import Any

from goinfer.crypto.gobase64 import go_std_b64decode

__all__ = [
    "BACKEND",
    "AVAILABLE_BACKENDS",
    "SM2_DEFAULT_UID",
    "SM3_BACKEND",
    "SM2Verifier",
    "generate_keypair",
    "private_key_from_b64",
    "public_key_from_hex",
    "public_key_from_private_b64",
    "public_key_to_hex",
    "sign",
    "sm3",
]

# sm2p256v1, GB/T 32918.5-2017.
P = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
A = P - 3
B = 0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93
N = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
GX = 0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7
GY = 0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0

SM2_DEFAULT_UID: bytes = b"1234567812345678"
# ENTL is the uid's length in *bits* in two bytes; tjfoc refuses uids of 8192 bytes or more.
_MAX_UID_LEN = 8191

Point = tuple[int, int]

# --------------------------------------------------------------------------------------------
# SM3


def _openssl_has_sm3() -> bool:
    try:
        hashlib.new("sm3")
    except ValueError:
        return False
    return True


if _openssl_has_sm3():
    SM3_BACKEND = "hashlib"

    def sm3(data: bytes) -> bytes:
        """SM3 digest via OpenSSL (microseconds; gmssl's pure-Python SM3 costs milliseconds per KB)."""
        return hashlib.new("sm3", data).digest()

else:  # pragma: no cover - depends on how OpenSSL was built
    from gmssl import sm3 as _gmssl_sm3

    SM3_BACKEND = "gmssl"

    def sm3(data: bytes) -> bytes:
        """SM3 digest via gmssl, for OpenSSL builds without SM3."""
        return bytes.fromhex(_gmssl_sm3.sm3_hash(list(data)))


# --------------------------------------------------------------------------------------------
# Arithmetic backend

try:
    import gmpy2 as _gmpy2
except ImportError:  # pragma: no cover - depends on the environment
    _gmpy2 = None

AVAILABLE_BACKENDS: tuple[str, ...] = ("int", "gmpy2") if _gmpy2 is not None else ("int",)


def _resolve_backend(name: str | None) -> str:
    """Pick the backend: explicit name, else GOINFER_SM2_BACKEND, else gmpy2 when installed.

    An explicit request for gmpy2 without gmpy2 installed fails loudly rather than silently
    running 2x slower than the operator asked for.
    """
    if name is None:
        name = os.environ.get("GOINFER_SM2_BACKEND", "auto")
    name = name.strip().lower() or "auto"
    if name == "auto":
        return "gmpy2" if _gmpy2 is not None else "int"
    if name == "int":
        return "int"
    if name == "gmpy2":
        if _gmpy2 is None:
            raise ImportError("GOINFER_SM2_BACKEND=gmpy2 but gmpy2 is not installed (pip install gmpy2)")
        return "gmpy2"
    raise ValueError(f"unknown SM2 arithmetic backend {name!r}: use 'int', 'gmpy2' or 'auto'")


BACKEND: str = _resolve_backend(None)


def _converter(backend: str) -> Any:
    """The number type for a backend; all table entries and constants share it so that every
    product in the hot loop stays in one fast type."""
    return _gmpy2.mpz if backend == "gmpy2" else int


# --------------------------------------------------------------------------------------------
# Generic point arithmetic (Jacobian coordinates, a = -3).  Values are ints or mpz, always
# reduced into [0, P) so that equality of coordinates can be tested directly.  Infinity is any
# point with Z == 0.  Only public values go through here on the verification path, so none of
# it needs to be constant-time.

JacobianPoint = tuple[Any, Any, Any]


def _double(X: Any, Y: Any, Z: Any) -> JacobianPoint:
    """Doubling for a = -3 (dbl-2001-b); only used while building tables and in rare cases."""
    if not Z or not Y:
        return X, Y, Z * 0
    delta = Z * Z % P
    gamma = Y * Y % P
    beta = X * gamma % P
    alpha = 3 * (X - delta) * (X + delta) % P
    X3 = (alpha * alpha - 8 * beta) % P
    Z3 = ((Y + Z) * (Y + Z) - gamma - delta) % P
    Y3 = (alpha * (4 * beta - X3) - 8 * gamma * gamma) % P
    return X3, Y3, Z3


def _add_mixed(X1: Any, Y1: Any, Z1: Any, x2: Any, y2: Any) -> JacobianPoint:
    """Jacobian + affine, correct in every case (infinity, equal points, opposite points)."""
    if not Z1:
        return x2, y2, Z1 + 1
    zz = Z1 * Z1 % P
    u2 = x2 * zz % P
    s2 = y2 * zz * Z1 % P
    if u2 == X1:
        if s2 == Y1:
            return _double(x2, y2, Z1 * 0 + 1)
        return X1, Y1, Z1 * 0
    h = u2 - X1
    r = s2 - Y1
    hh = h * h % P
    hhh = h * hh % P
    v = X1 * hh % P
    X3 = (r * r - hhh - 2 * v) % P
    Y3 = (r * (v - X3) - Y1 * hhh) % P
    return X3, Y3, Z1 * h % P


def _sum_affine(points: Iterable[tuple[Any, Any]], one: Any) -> JacobianPoint:
    """Sum of affine points, handling every special case; the fast loop's fallback."""
    X, Y, Z = one, one, one * 0
    for x, y in points:
        X, Y, Z = _add_mixed(X, Y, Z, x, y)
    return X, Y, Z


def _batch_to_affine(points: Sequence[JacobianPoint]) -> list[tuple[Any, Any]]:
    """Jacobian -> affine for many points with one field inversion (Montgomery's trick).

    None of the points may be infinity (true for the table entries, all of which are
    j * 2**(WINDOW_BITS*i) * Q with 1 <= j <= 2**WINDOW_BITS and Q of prime order n > j).
    """
    prefix = []
    acc = points[0][2] * 0 + 1
    for _, _, z in points:
        acc = acc * z % P
        prefix.append(acc)
    inv = pow(acc, -1, P)  # Python ints: ~15 us, vs ~90 us for Fermat
    invs: list[Any] = [None] * len(points)
    for k in range(len(points) - 1, 0, -1):
        invs[k] = inv * prefix[k - 1] % P
        inv = inv * points[k][2] % P
    invs[0] = inv
    out = []
    for (X, Y, _), zi in zip(points, invs, strict=True):
        zi2 = zi * zi % P
        out.append((X * zi2 % P, Y * zi2 * zi % P))
    return out


# Bits per window of the fixed-base tables: a scalar below 2**256 is WINDOWS digits.
WINDOW_BITS = 10
WINDOWS = -(-256 // WINDOW_BITS)
_DIGIT_MASK = (1 << WINDOW_BITS) - 1
_DIGIT_SHIFTS = tuple(range(0, WINDOWS * WINDOW_BITS, WINDOW_BITS))


def _build_window_table(qx: int, qy: int, backend: str) -> list[list[Any]]:
    """table[i][b] = b * 2**(WINDOW_BITS*i) * Q as an affine (x, y), for i < WINDOWS and
    1 <= b < 2**WINDOW_BITS.

    Each window costs 2**WINDOW_BITS mixed additions and one batched inversion; the last
    multiple is the next window's base.  Only public points are ever tabulated for verification.
    """
    num = _converter(backend)
    one = num(1)
    bx, by = num(qx), num(qy)
    tables: list[list[Any]] = []
    for _ in range(WINDOWS):
        jac: list[JacobianPoint] = [(bx, by, one)]
        X, Y, Z = _double(bx, by, one)
        jac.append((X, Y, Z))
        for _j in range(3, _DIGIT_MASK + 2):
            X, Y, Z = _add_mixed(X, Y, Z, bx, by)
            jac.append((X, Y, Z))
        affine = _batch_to_affine(jac)
        tables.append([None] + affine[:_DIGIT_MASK])
        bx, by = affine[_DIGIT_MASK]
    return tables


def _entries(table: list[list[Any]], k: int) -> list[tuple[Any, Any]]:
    """The table entries whose sum is k * Q (0 <= k < 2**256): one per non-zero digit of k."""
    return [row[digit] for row, shift in zip(table, _DIGIT_SHIFTS, strict=True)
            if (digit := (k >> shift) & _DIGIT_MASK)]


_G_TABLES: dict[str, list[list[Any]]] = {}
_G_TABLES_LOCK = threading.Lock()


def _g_table(backend: str) -> list[list[Any]]:
    """The generator's table, built once per process and backend and shared by every key."""
    table = _G_TABLES.get(backend)
    if table is None:
        with _G_TABLES_LOCK:
            table = _G_TABLES.get(backend)
            if table is None:
                table = _build_window_table(GX, GY, backend)
                _G_TABLES[backend] = table
    return table


def _table_mult(table: list[list[Any]], k: int) -> Point | None:
    """k * Q from Q's table (0 <= k < 2**256), as affine ints, None for infinity."""
    pts = _entries(table, k)
    if not pts:
        return None
    one = pts[0][0] * 0 + 1
    X, Y, Z = _sum_affine(pts, one)
    if not Z:
        return None
    zi = pow(Z, -1, P)
    zi2 = zi * zi % P
    return int(X * zi2 % P), int(Y * zi2 * zi % P)


def _base_mult(k: int) -> Point | None:
    return _table_mult(_g_table(BACKEND), k)


# --------------------------------------------------------------------------------------------
# Keys


def _is_on_curve(point: Point) -> bool:
    x, y = point
    return 0 <= x < P and 0 <= y < P and (y * y - (x * x * x + A * x + B)) % P == 0


def _check_uid(uid: bytes) -> bytes:
    """tjfoc substitutes the default uid for an empty one; mirror it so that callers get what
    a Go peer computes."""
    uid = bytes(uid)
    if not uid:
        return SM2_DEFAULT_UID
    if len(uid) > _MAX_UID_LEN:
        raise ValueError(f"SM2 uid too long: {len(uid)} bytes (at most {_MAX_UID_LEN})")
    return uid


def _za(public_key: Point, uid: bytes) -> bytes:
    """Z_A = SM3(ENTL || uid || a || b || Gx || Gy || Px || Py), every coordinate 32 bytes."""
    uid = _check_uid(uid)
    px, py = public_key
    data = b"".join(
        (
            (8 * len(uid)).to_bytes(2, "big"),
            uid,
            A.to_bytes(32, "big"),
            B.to_bytes(32, "big"),
            GX.to_bytes(32, "big"),
            GY.to_bytes(32, "big"),
            px.to_bytes(32, "big"),
            py.to_bytes(32, "big"),
        )
    )
    return sm3(data)


def private_key_from_b64(private_b64: str) -> int:
    """d from go-infer's ``SM2PrivateKey`` setting: standard base64 of big-endian d, decoded
    as Go's ``base64.StdEncoding.DecodeString`` (whose error go-infer does not ignore here)."""
    try:
        raw = go_std_b64decode(private_b64)
    except ValueError as exc:
        raise ValueError(f"SM2PrivateKey is not valid standard base64: {exc}") from None
    d = int.from_bytes(raw, "big")
    if not 1 <= d <= N - 1:
        raise ValueError("SM2PrivateKey is out of range: the key must be an integer in [1, n-1]")
    return d


def public_key_from_private_b64(private_b64: str) -> tuple[int, int]:
    """The public key d*G for go-infer's ``SM2PrivateKey`` setting (the server verifies with it)."""
    d = private_key_from_b64(private_b64)
    point = _base_mult(d)
    assert point is not None  # d in [1, n-1]
    return point


def public_key_to_hex(public_key: Point, prefix: bool = False) -> str:
    """128 hex chars x||y (gmssl's form), or with ``prefix`` the uncompressed "04"||x||y."""
    x, y = public_key
    return ("04" if prefix else "") + f"{x:064x}{y:064x}"


def public_key_from_hex(public_hex: str) -> tuple[int, int]:
    """Parse x||y (128 hex chars) or 04||x||y (130), checking the point is on the curve."""
    h = public_hex.strip()
    if len(h) == 130 and h[:2] == "04":
        h = h[2:]
    if len(h) != 128:
        raise ValueError("SM2 public key must be 128 hex chars (x||y) or 130 starting with 04")
    try:
        point = (int(h[:64], 16), int(h[64:], 16))
    except ValueError:
        raise ValueError("SM2 public key is not hexadecimal") from None
    if not _is_on_curve(point):
        raise ValueError("SM2 public key is not a point on the SM2 curve")
    return point


def generate_keypair() -> tuple[str, str]:
    """A new key: (private key as go-infer's ``SM2PrivateKey`` base64, public key hex x||y).

    d is drawn from [1, n-2] because d = n-1 makes 1+d non-invertible, so it could not sign.
    Prefix the public key with "04" for tools wanting the uncompressed point encoding.
    """
    d = secrets.randbelow(N - 2) + 1
    point = _base_mult(d)
    assert point is not None
    return base64.b64encode(d.to_bytes(32, "big")).decode("ascii"), public_key_to_hex(point)


# --------------------------------------------------------------------------------------------
# Signing (clients, tests, key tools: not the server's hot path)


def _parse_go_infer_signature(signature: bytes) -> tuple[int, int] | None:
    """go-infer's parse: r = first 32 bytes, s = *all* the rest; under 64 bytes is a failure."""
    if len(signature) < 64:
        return None
    return int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")


def _sign_with_k(d: int, public_key: Point, message: bytes, k: int, uid: bytes) -> bytes | None:
    """One signing attempt with nonce k; None when k is unusable (r == 0, r + k == n, s == 0)."""
    e = int.from_bytes(sm3(_za(public_key, uid) + bytes(message)), "big")
    kg = _base_mult(k)
    if kg is None:
        return None
    r = (e + kg[0]) % N
    if r == 0 or r + k == N:
        return None
    s = pow(1 + d, -1, N) * (k - r * d) % N
    if s == 0:
        return None
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def sign(private_key: int, message: bytes, uid: bytes = SM2_DEFAULT_UID) -> bytes:
    """SM3withSM2 signature as 64 bytes r||s, each 32-byte big-endian (what gmssl sends).

    Go's signer writes ``R.Bytes()||S.Bytes()`` without padding, which go-infer itself then
    misparses 1 time in 256; fixed width avoids that.
    """
    d = private_key
    if not 1 <= d <= N - 2:
        raise ValueError("SM2 private key must be in [1, n-2] to sign")
    public_key = _base_mult(d)
    assert public_key is not None
    while True:
        sig = _sign_with_k(d, public_key, message, secrets.randbelow(N - 1) + 1, uid)
        if sig is not None:
            return sig


# --------------------------------------------------------------------------------------------
# Verification


def _x_matches(X: Any, Z: Any, r: int, e: int) -> bool:
    """(e + x) mod n == r for the affine x = X / Z^2 of a finite Jacobian point, without the
    inversion: x must be c = (r - e) mod n or, since x < p < 2n, c + n."""
    zz = Z * Z % P
    c = (r - e) % N
    if X == c * zz % P:
        return True
    c += N
    return c < P and X == c * zz % P


class SM2Verifier:
    """Verifies SM3withSM2 signatures for one public key, as go-infer's server does.

    Construction builds the public key's window table (and, the first time in a process, the
    generator's): do it once at startup, before forking workers, then share the instance.
    ``verify`` is thread-safe (it only reads the tables).
    """

    def __init__(self, public_key: tuple[int, int], uid: bytes = SM2_DEFAULT_UID, *,
                 backend: str | None = None) -> None:
        point = (int(public_key[0]), int(public_key[1]))
        if not _is_on_curve(point):
            raise ValueError("SM2 public key is not a point on the SM2 curve")
        self.public_key: Point = point
        self.uid: bytes = _check_uid(uid)
        self.backend: str = _resolve_backend(backend)
        self._z = _za(point, self.uid)
        self._one = _converter(self.backend)(1)
        self._g_table = _g_table(self.backend)
        self._p_table = _build_window_table(point[0], point[1], self.backend)

    def _combination(self, s: int, t: int) -> JacobianPoint:
        """s*G + t*P in Jacobian coordinates (Z == 0 for infinity), 0 <= s, t < 2**256.

        The hot loop is the mixed addition written out inline; whenever it would need a special
        case (the running sum equal to, or opposite to, the next table entry) it hands the whole
        sum to the careful generic code.  For a valid key that happens only for signatures built
        with the private key, and never by chance.
        """
        pts = _entries(self._g_table, s) + _entries(self._p_table, t)
        if not pts:
            return self._one, self._one, self._one * 0
        p = P
        it = iter(pts)
        X, Y = next(it)
        Z = self._one
        # Fewer reductions than _add_mixed: Z*Z and X*hh stay unreduced (the next products
        # reduce them), which saves two of its eleven big-number operations per addition.
        for x2, y2 in it:
            zz = Z * Z
            h = x2 * zz % p - X
            if not h:  # x2 * Z**2 == X: the next entry is the running sum or its opposite
                return _sum_affine(pts, self._one)
            r = y2 * zz * Z % p - Y
            hh = h * h % p
            hhh = h * hh % p
            v = X * hh
            X = (r * r - hhh - 2 * v) % p
            Y = (r * (v - X) - Y * hhh) % p
            Z = Z * h % p
        return X, Y, Z

    def verify(self, message: bytes, signature: bytes) -> bool:
        """go-infer's verdict on ``signature`` (raw bytes, already base64-decoded) over ``message``."""
        parsed = _parse_go_infer_signature(signature)
        if parsed is None:
            return False
        r, s = parsed
        if not (0 < r < N and 0 < s < N):
            return False
        t = (r + s) % N
        if t == 0:
            return False
        e = int.from_bytes(sm3(self._z + message), "big")
        X, _, Z = self._combination(s, t)
        if not Z:
            return False  # infinity: see the module docstring for how tjfoc differs
        return _x_matches(X, Z, r, e)


# --------------------------------------------------------------------------------------------
# Reference implementation: slow, textbook, for cross-checking the fast path in tests.


def _ref_add(p1: Point | None, p2: Point | None) -> Point | None:
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    x1, y1 = p1
    x2, y2 = p2
    if x1 == x2:
        if (y1 + y2) % P == 0:
            return None
        lam = (3 * x1 * x1 + A) * pow(2 * y1, -1, P) % P
    else:
        lam = (y2 - y1) * pow(x2 - x1, -1, P) % P
    x3 = (lam * lam - x1 - x2) % P
    return x3, (lam * (x1 - x3) - y1) % P


def _ref_mult(k: int, point: Point | None) -> Point | None:
    result: Point | None = None
    addend = point
    while k:
        if k & 1:
            result = _ref_add(result, addend)
        addend = _ref_add(addend, addend)
        k >>= 1
    return result


def _verify_reference(public_key: Point, message: bytes, signature: bytes, uid: bytes = SM2_DEFAULT_UID) -> bool:
    """go-infer's verification, written as plainly as possible (affine double-and-add)."""
    parsed = _parse_go_infer_signature(signature)
    if parsed is None:
        return False
    r, s = parsed
    if not (1 <= r <= N - 1 and 1 <= s <= N - 1):
        return False
    e = int.from_bytes(sm3(_za(public_key, uid) + bytes(message)), "big")
    t = (r + s) % N
    if t == 0:
        return False
    point = _ref_add(_ref_mult(s, (GX, GY)), _ref_mult(t, public_key))
    if point is None:
        return False
    return (e + point[0]) % N == r
