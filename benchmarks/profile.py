"""Where a request's CPU goes: py-spy on every goinfer process under load, and Redis's commandstats.

    python -m benchmarks.profile                               # SHA256 echo, 64 connections, 10 s
    python -m benchmarks.profile --sign SM2 --connections 256 --top 25
    python -m benchmarks.profile --model benchmarks.models:Sleep10ms --workers 8 --api /api/sleep
    python -m benchmarks.profile --embedding --gil                # the embedding example, batching on

Starts Redis, `goinfer server 0` and `goinfer http` as benchmarks.run does, drives load with wrk
(or the asyncio generator), and meanwhile samples each process with `py-spy record --format raw`
(CPU samples only: threads waiting in epoll or on a socket are not counted). Prints, per process
kind, its CPU ms per request (from /proc) and the functions that hold most of it, by own time and
by time including callees; then each Redis command's calls and microseconds per request, from
`INFO commandstats` reset before the run. py-spy pauses a process for each sample, so a profiled
run is a few percent slower than a plain one: compare its shares, not its requests/s.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.run import (
    EMBEDDING_BATCHING,
    EMBEDDING_PROGRAM,
    SHORT_TEXT,
    body_for,
    cpu_seconds,
    drive,
    embedding_settings,
    redis_service,
    wait_http,
    write_settings,
)


def collapsed_profile(path: Path) -> tuple[Counter[str], Counter[str], int]:
    """(own samples per function, samples including callees per function, total samples) of a
    py-spy raw file: one line per distinct stack, `frame;frame;... count`."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in frame else frame for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames[1:]):  # the first frame is the process/thread label
            inclusive[frame] += count
    return own, inclusive, total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--sign", default="SHA256", choices=["SHA256", "SM2", "plain"])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--model", default="goinfer.models.echo:Echo")
    parser.add_argument("--api", default="/api/echo")
    parser.add_argument("--workers", type=int, default=2, help="MaxWorkers")
    parser.add_argument("--top", type=int, default=15, help="functions listed per process kind")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--embedding", action="store_true",
                        help="the embedding example as benchmarks.run's embedding-short-batch-on (short text, "
                             "batching on); --model, --api and --workers do not apply")
    parser.add_argument("--gil", action="store_true",
                        help="only samples holding the GIL: Python's own CPU, not waits py-spy mistakes for work")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        sys.exit("benchmarks.profile: py-spy is not installed (pip install py-spy)")

    with redis_service() as service:
        program: list[str] | None = None
        data: dict[str, Any]
        if args.embedding:
            program = EMBEDDING_PROGRAM
            settings, port = embedding_settings(service, "profile-embedding", EMBEDDING_BATCHING["on"])
            args.api, data = "/api/embedding", {"text": SHORT_TEXT}
        else:
            settings, port = write_settings(service, "profile", [args.model], MaxWorkers=args.workers)
            data = {"text": "测试测试", "image": ""} if args.api == "/api/echo" else {"n": 1}
        service.start("server", "0", "--yaml", str(settings), program=program, log_name="server")
        service.start("http", "--yaml", str(settings), program=program, log_name="http")
        url = f"http://127.0.0.1:{port}{args.api}"
        body = body_for(data, args.sign)
        wait_http(port, args.api, body, timeout=300)
        drive(service, "warm-up", url, body, args.connections, 2)
        kinds = service.pids_by_kind()
        broker = service.redis.client()
        broker.config_resetstat()
        cpu_before = {kind: cpu_seconds(pids) for kind, pids in kinds.items()}
        samplers = []
        for kind, pids in kinds.items():
            if kind == "redis":
                continue
            for pid in pids:
                out = service.folder / f"profile-{kind}-{pid}.txt"
                samplers.append((kind, out, subprocess.Popen(
                    [py_spy, "record", *(["--gil"] if args.gil else []), "--format", "raw", "--rate", str(args.rate),
                     "--duration",
                     str(round(args.duration)), "--pid", str(pid), "--output", str(out)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
        time.sleep(0.5)  # py-spy attaches
        name = "embedding-short" if args.embedding else f"echo-{args.sign.lower()}"
        point = drive(service, name, url, body, args.connections, args.duration)
        for _, _, sampler in samplers:
            sampler.wait(timeout=60)
        requests = point.requests
        stats = broker.info("commandstats")
        print(f"\n{point.requests} requests, {point.rps:.0f} req/s, p50 {point.p50_ms:.2f} ms, "
              f"CPU {point.cpu_ms:.3f} ms/request (all processes; profiled, so slower than a plain run)")
        for kind, pids in kinds.items():
            cpu_ms = (cpu_seconds(pids) - cpu_before[kind]) * 1000 / max(1, requests)
            print(f"\n## {kind}: {cpu_ms:.3f} ms CPU per request ({len(pids)} process(es))")
            own: Counter[str] = Counter()
            inclusive: Counter[str] = Counter()
            total = 0
            for sampled_kind, out, _ in samplers:
                if sampled_kind == kind and out.exists():
                    o, i, t = collapsed_profile(out)
                    own.update(o)
                    inclusive.update(i)
                    total += t
            if not total:
                continue
            print(f"{total} samples on CPU; own time | including callees")
            for (name, count), (iname, icount) in zip(own.most_common(args.top), inclusive.most_common(args.top),
                                                      strict=False):
                print(f"  {count / total:6.1%} {name[:70]:<70} | {icount / total:6.1%} {iname[:70]}")
        print("\n## redis commands per request")
        total_usec = 0.0
        rows = sorted(stats.items(), key=lambda kv: -kv[1]["usec"])
        for name, row in rows:
            total_usec += row["usec"]
            print(f"  {name.removeprefix('cmdstat_'):<28} {row['calls'] / requests:6.2f} calls  "
                  f"{row['usec'] / requests:7.2f} us")
        print(f"  {'all':<28} {sum(r['calls'] for r in stats.values()) / requests:6.2f} calls  "
              f"{total_usec / requests:7.2f} us")


if __name__ == "__main__":
    main()
