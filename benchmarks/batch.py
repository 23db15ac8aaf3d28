"""`goinfer batch` against the same rows sent as synchronous requests, on one Redis and dispatcher.

    python -m benchmarks.batch                     # echo 10,000 rows, the 10 ms model 2,000 rows
    python -m benchmarks.batch --rows 20000 --sleep-rows 4000 --workers 4 --concurrency 16,64,256

For each model, the same rows ({"x": i}) go through the same dispatcher twice: once as
synchronous requests through `goinfer http` (bodies signed SHA256 beforehand, so the client
costs little; an asyncio client at each concurrency, the best one reported), once as a
`goinfer batch` run in direct mode (its own rows/s, from its summary, and its wall time with
the process's start). Every answer is checked; a row that is not code 0 counts as an error.
All numbers come from one run on one machine: compare them with each other, not across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import tempfile
import time
from pathlib import Path

from goinfer.client import signed_body
from goinfer.testing import TEST_CREDENTIALS, ProcessFactory, start_redis, url_of, wait_for_answer, write_settings

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"echo": "/api/echo", "sleep10ms": "/api/sleep"}


def sync_rows_per_s(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, int]:
    """Send every body once, `concurrency` at a time; (rows/s, errors)."""
    import aiohttp

    bad = 0

    async def user(session: aiohttp.ClientSession, queue: asyncio.Queue[bytes]) -> None:
        nonlocal bad
        while not queue.empty():
            body = queue.get_nowait()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                text = await response.read()
            if response.status != 200 or b'"code":0,' not in text:
                bad += 1

    async def main() -> float:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for body in bodies:
            queue.put_nowait(body)
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            started = time.perf_counter()
            await asyncio.gather(*(user(session, queue) for _ in range(concurrency)))
            return time.perf_counter() - started

    elapsed = asyncio.run(main())
    return len(bodies) / elapsed, bad


def batch_run(processes: ProcessFactory, settings: Path, api: str, source: Path, output: Path,
              concurrency: int) -> tuple[float, float, str]:
    """(rows/s the run reports, rows/s over its wall time with start-up, its summary)."""
    started = time.perf_counter()
    proc = processes.start("batch", str(source), "--api", api, "--output", str(output), "--yaml", str(settings),
                           "--concurrency", str(concurrency), "--no-progress", log_name="batch")
    proc.process.wait()
    wall = time.perf_counter() - started
    if proc.process.returncode != 0:
        raise SystemExit(f"goinfer batch failed ({proc.process.returncode}):\n{proc.output}")
    rows = sum(1 for _ in open(output))
    errors = sum('"error"' in line for line in open(output))
    if errors:
        raise SystemExit(f"goinfer batch wrote {errors} error rows:\n{proc.output}")
    found = re.search(r"([0-9.]+) rows/s over", proc.output)
    return (float(found.group(1)) if found else 0.0), rows / wall, proc.output.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000, help="rows for the echo model")
    parser.add_argument("--sleep-rows", type=int, default=2_000, help="rows for the 10 ms model")
    parser.add_argument("--workers", type=int, default=2, help="the dispatcher's MaxWorkers")
    parser.add_argument("--concurrency", default="16,64,256", help="synchronous client concurrencies to try")
    parser.add_argument("--batch-concurrency", type=int, default=64, help="goinfer batch --concurrency")
    args = parser.parse_args(argv)
    levels = [int(level) for level in args.concurrency.split(",")]

    print(f"# goinfer batch vs synchronous requests ({platform.python_version()}, {platform.machine()}, "
          f"MaxWorkers {args.workers}, one dispatcher, one HTTP process)")
    with tempfile.TemporaryDirectory(prefix="goinfer-bench-batch-") as folder, start_redis() as redis_server:
        work = Path(folder)
        settings = write_settings(work, redis_server.address,
                                  Models=["goinfer.models.echo:Echo", "benchmarks.models:Sleep10ms"],
                                  Server={"MaxWorkers": args.workers, "MaxQueueLength": 1_000_000},
                                  API={"AccessLog": False})
        processes = ProcessFactory(work, python_path=[ROOT])
        try:
            processes.server(settings)
            processes.http(settings)
            url = url_of(settings)
            for name, api in MODELS.items():
                count = args.rows if name == "echo" else args.sleep_rows
                wait_for_answer(url + api, TEST_CREDENTIALS.body({"x": -1}))
                bodies = [signed_body({"x": i}, app_id=TEST_CREDENTIALS.app_id,
                                      app_secret=TEST_CREDENTIALS.app_secret, sign_type="SHA256")
                          for i in range(count)]
                sync = {}
                for level in levels:
                    rate, bad = sync_rows_per_s(url + api, bodies, level)
                    sync[level] = rate
                    print(f"{name:10s} synchronous  concurrency {level:4d}: {rate:8.1f} rows/s"
                          + (f" ({bad} errors)" if bad else ""))
                best = max(sync, key=lambda level: sync[level])
                source = work / f"{name}.jsonl"
                source.write_text("".join(json.dumps({"id": i, "data": {"x": i}}) + "\n" for i in range(count)))
                reported, wall, summary = batch_run(processes, settings, api, source, work / f"{name}.out.jsonl",
                                                    args.batch_concurrency)
                print(f"{name:10s} goinfer batch concurrency {args.batch_concurrency:4d}: {reported:8.1f} rows/s "
                      f"({wall:.1f} rows/s with its start-up); best synchronous {sync[best]:.1f} rows/s at "
                      f"{best}: batch/sync = {reported / sync[best]:.2f}")
                for line in summary.splitlines():
                    print(f"{'':10s}   {line}")
        finally:
            processes.cleanup()


if __name__ == "__main__":
    main()
