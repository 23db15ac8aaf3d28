"""Priority lanes: live-request latency through `goinfer http`, alone and beside a batch backlog.

    python -m benchmarks.priority                   # ~1 minute on a 2-core machine
    python -m benchmarks.priority --duration 20 --rows 50000 --row-ms 20 --live-connections 2

One private redis-server, one dispatcher (`goinfer server 0`, MaxWorkers `--workers`) serving
`SleepFor` (its infer sleeps the request's `sleep` seconds) and one HTTP tier. Phase 1: for
`--duration` seconds, `--live-connections` clients send signed live requests (`--live-ms` of
inference each) back to back through the tier, nothing else queued. Phase 2: `--rows` batch rows
of `--row-ms` each are put on the low lane directly with ENQUEUE_SCRIPT (as `goinfer batch`
sends them; more than the phase can drain), and the same live load runs again while the workers
serve them. Prints live p50/p99 of each phase, their ratio, and the low rows served per second
during phase 2. The ideal live p50 beside the backlog is the p50 alone plus about half a row:
a live request waits at most for the row its worker holds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from goinfer.models.echo import Echo
from goinfer.queue import ENQUEUE_SCRIPT, JOB_FIELD, PRIORITY_LOW, Job, lane_stream, reply_key, stream_name
from goinfer.testing import TEST_CREDENTIALS, ProcessFactory, settings_of, start_redis, url_of, write_settings

ROOT = Path(__file__).resolve().parents[1]
API = "/api/sleep-for"


class SleepFor(Echo):
    """A model whose inference takes `params["sleep"]` seconds of wall time."""

    api_path = API

    def infer(self, request_id: str, params: dict[str, Any]) -> dict[str, Any]:
        time.sleep(float(params.get("sleep", 0)))
        return {"slept": params.get("sleep", 0)}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def live_load(url: str, connections: int, duration: float, live_s: float) -> list[float]:
    """Latencies (s) of signed live requests sent back to back by `connections` clients."""
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = time.perf_counter() + duration

    def user() -> None:
        client = TEST_CREDENTIALS.client(url)
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            client.call(API, {"sleep": live_s})
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=user) for _ in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def queue_rows(client: Any, stream: str, rows: int, row_s: float, replies: str) -> None:
    """Batch rows on the low lane, as `goinfer batch` sends them (pipelined ENQUEUE_SCRIPT)."""
    lane = lane_stream(stream, PRIORITY_LOW)
    deadline = time.time() + 3600
    for start in range(0, rows, 1000):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(rows, start + 1000)):
            pipe.eval(ENQUEUE_SCRIPT, 1, lane, rows + 1, Job(f"row-{i}", API, {"sleep": row_s}, replies,
                                                             deadline).encode(), 0, JOB_FIELD)
        pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of live load per phase")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--live-connections", type=int, default=2)
    parser.add_argument("--live-ms", type=float, default=20.0)
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--row-ms", type=float, default=20.0)
    args = parser.parse_args()

    redis = start_redis()
    folder = Path(tempfile.mkdtemp(prefix="goinfer-priority-"))
    factory = ProcessFactory(folder, python_path=[ROOT])
    try:
        settings = write_settings(folder, redis.address, Server={"MaxWorkers": args.workers, "MessageTimeout": 30},
                                  Models=["benchmarks.priority:SleepFor"])
        factory.server(settings)
        factory.http(settings)
        url = url_of(settings)
        client = redis.client()
        stream = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
        replies = reply_key("benchmark-priority", 0)
        live_s, row_s = args.live_ms / 1000, args.row_ms / 1000

        live_load(url, args.live_connections, 2.0, live_s)  # warm up
        alone = live_load(url, args.live_connections, args.duration, live_s)
        queue_rows(client, stream, args.rows, row_s, replies)
        time.sleep(1.0)  # the workers are busy with rows
        served_before = client.llen(replies)
        started = time.perf_counter()
        beside = live_load(url, args.live_connections, args.duration, live_s)
        rows_per_s = (client.llen(replies) - served_before) / (time.perf_counter() - started)
        left = client.xlen(lane_stream(stream, PRIORITY_LOW))

        print(f"Dispatcher: {args.workers} workers; live: {args.live_connections} connections back to back through "
              f"goinfer http, {args.live_ms:g} ms of inference each, {args.duration:g} s per phase; batch rows: "
              f"{args.rows} of {args.row_ms:g} ms on the low lane (queued directly with ENQUEUE_SCRIPT).")
        print(f"{'phase':<28}{'requests':>10}{'p50 ms':>10}{'p99 ms':>10}")
        for name, values in (("live alone", alone), ("live beside batch backlog", beside)):
            print(f"{name:<28}{len(values):>10}{statistics.median(values) * 1000:>10.1f}"
                  f"{percentile(values, 0.99) * 1000:>10.1f}")
        print(f"p50 ratio (beside / alone): {statistics.median(beside) / statistics.median(alone):.2f}; "
              f"p99 ratio: {percentile(beside, 0.99) / percentile(alone, 0.99):.2f}")
        print(f"batch rows served meanwhile: {rows_per_s:.0f} rows/s; {left} rows still queued at the end")
    finally:
        factory.cleanup()
        redis.stop()


if __name__ == "__main__":
    main()
