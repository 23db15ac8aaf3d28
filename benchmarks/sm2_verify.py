"""How long one SM2 (SM3withSM2) signature check takes, for every verifier we could use.

Run from the repository root:  .venv/bin/python benchmarks/sm2_verify.py [-n ITERATIONS]

All numbers come from the same run on the same key, message and signature: the fast table
verifier on each available arithmetic backend, the textbook double-and-add reference, and
gmssl's ``verify_with_sm3`` (what go-infer's Python example client uses).  Each figure is the
best and the median of 5 timed batches, in microseconds per verification, after one warm-up call.
"""

from __future__ import annotations

import argparse
import base64
import functools
import os
import platform
import ssl
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gmssl.sm2 import CryptSM2  # noqa: E402

from goinfer.crypto import sm2  # noqa: E402
from goinfer.crypto.gobase64 import go_std_b64decode_lenient  # noqa: E402

REPEATS = 5

# A realistic string-to-sign: go-infer's documented example request.
MESSAGE = (
    'appId=3EA25569454745D01219080B779F021F&data={"image":"","text":"测试测试"}'
    "&encType=plain&signType=SM2&timestamp=1658716494&version=1&key=41DF0E6AE27B5282C07EF5124642A352"
).encode()


def per_call_us(fn: Callable[[], object], iterations: int) -> tuple[float, float]:
    """(best, median) microseconds per call over REPEATS batches of ``iterations`` calls."""
    fn()
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        samples.append((time.perf_counter() - start) / iterations * 1e6)
    return min(samples), statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--iterations", type=int, default=1000, help="calls per batch for the fast verifier")
    parser.add_argument("--slow-iterations", type=int, default=10, help="calls per batch for the reference and gmssl")
    args = parser.parse_args()

    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gmpy2_version = "not installed"
    if "gmpy2" in sm2.AVAILABLE_BACKENDS:
        import gmpy2

        gmpy2_version = gmpy2.version()
    print("SM2 verify benchmark")
    print(f"  machine: {platform.machine()}, nproc={nproc}, {platform.platform()}")
    print(f"  python {platform.python_version()} ({platform.python_implementation()}), {ssl.OPENSSL_VERSION}")
    print(f"  gmpy2: {gmpy2_version}; SM3 via {sm2.SM3_BACKEND}; default backend: {sm2.BACKEND}")
    print(f"  timing: best / median of {REPEATS} batches; {args.iterations} calls per batch (fast),"
          f" {args.slow_iterations} (reference, gmssl); message {len(MESSAGE)} bytes")
    print()

    priv_b64, pub_hex = sm2.generate_keypair()
    d = sm2.private_key_from_b64(priv_b64)
    pub = sm2.public_key_from_hex(pub_hex)
    sig = sm2.sign(d, MESSAGE)
    sig_b64 = base64.b64encode(sig).decode()

    print("table precomputation (once per process; G's table is shared by all keys):")
    verifiers = {}
    for backend in sm2.AVAILABLE_BACKENDS:
        start = time.perf_counter()
        sm2._build_window_table(sm2.GX, sm2.GY, backend)
        g_s = time.perf_counter() - start
        sm2._g_table(backend)  # make sure the cached one exists, so the next line times P only
        start = time.perf_counter()
        verifiers[backend] = sm2.SM2Verifier(pub, backend=backend)
        p_s = time.perf_counter() - start
        print(f"  {backend:>5}: G table {g_s * 1e3:7.1f} ms, public-key table {p_s * 1e3:7.1f} ms")
    print()

    results: list[tuple[str, float, float]] = []
    for backend, verifier in verifiers.items():
        assert verifier.verify(MESSAGE, sig)
        best, median = per_call_us(functools.partial(verifier.verify, MESSAGE, sig), args.iterations)
        results.append((f"fast table verifier ({backend})", best, median))
    fast = verifiers[sm2.BACKEND]
    best, median = per_call_us(
        lambda: fast.verify(MESSAGE, go_std_b64decode_lenient(sig_b64)), args.iterations
    )
    results.append((f"fast ({sm2.BACKEND}) + Go-base64 decode", best, median))

    assert sm2._verify_reference(pub, MESSAGE, sig)
    best, median = per_call_us(lambda: sm2._verify_reference(pub, MESSAGE, sig), args.slow_iterations)
    results.append(("reference double-and-add (int)", best, median))

    gm = CryptSM2(private_key=f"{d:064x}", public_key=pub_hex)
    if pub_hex.startswith("04"):
        print("  (gmssl skipped: it mangles public keys whose hex starts with '04'; run again)")
    else:
        assert gm.verify_with_sm3(sig.hex(), MESSAGE)
        best, median = per_call_us(lambda: gm.verify_with_sm3(sig.hex(), MESSAGE), args.slow_iterations)
        results.append(("gmssl 3.2 verify_with_sm3", best, median))

    print(f"verification, microseconds per call (and relative to the {results[0][0]}):")
    width = max(len(name) for name, _, _ in results)
    base = results[0][1]
    for name, best, median in results:
        print(f"  {name:<{width}}  best {best:10.1f}  median {median:10.1f}  ({best / base:6.1f}x)")


if __name__ == "__main__":
    main()
