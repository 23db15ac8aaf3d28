"""What `Server.EnqueueReplicas` costs: echo with EnqueueReplicas 0 and 1, one master and one replica.

    python -m benchmarks.replicas                    # 1, 16 and 64 connections, 3 rounds of 10 s
    python -m benchmarks.replicas --duration 5 --connections 16 --rounds 5

With EnqueueReplicas 1 each enqueue round trip ends with WAIT 1 <EnqueueReplicasTimeoutMs>: the
request counts as queued once the replica has acknowledged it. Both settings run side by side on
one master with one replica (their own queues, dispatchers and HTTP tiers), and are measured in
turn at each concurrency, round after round, so the two share the machine's state; the table
gives each point's median over the rounds. Load as in benchmarks/run.py (wrk if installed, else
its asyncio generator); a non-zero code is an error.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import redis

from benchmarks.run import ROOT, Point, Service, body_for, drive, wait_http, write_settings
from goinfer.redis_server import RedisServer, RedisServerError
from goinfer.testing import ProcessFactory, start_redis, wait_until

SETTINGS = (0, 1)  # EnqueueReplicas
WAIT_TIMEOUT_MS = 100


def start_master_and_replica() -> tuple[RedisServer, RedisServer]:
    """Two private redis-servers, the second a replica of the first, in sync."""
    master = start_redis()
    replica = start_redis()
    client: redis.Redis = replica.client()
    try:
        client.replicaof(master.host, master.port)
        wait_until(lambda: client.info("replication").get("master_link_status") == "up", 30, "the replica to sync")
    except BaseException:
        replica.stop()
        master.stop()
        raise
    finally:
        client.close()
    return master, replica


def median_points(points: list[Point]) -> list[Point]:
    """One point per scenario and concurrency: the median of each measure over the rounds."""
    groups: dict[tuple[str, int], list[Point]] = {}
    for point in points:
        groups.setdefault((point.scenario, point.connections), []).append(point)
    return [Point(scenario, connections, statistics.median(p.rps for p in group),
                  statistics.median(p.p50_ms for p in group), statistics.median(p.p99_ms for p in group),
                  sum(p.requests for p in group), sum(p.errors for p in group), f"{len(group)} rounds")
            for (scenario, connections), group in groups.items()]


def report(points: list[Point], duration: float, rounds: int) -> str:
    lines = [
        f"EnqueueReplicas cost, {time.strftime('%Y-%m-%d %H:%M')} — {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load from {'wrk' if shutil.which('wrk') else 'asyncio generator'}, "
        f"median of {rounds} rounds of {duration:g} s per point; one master + one replica on this machine, "
        f"WAIT timeout {WAIT_TIMEOUT_MS} ms",
        "",
        "| scenario | conns | req/s | p50 ms | p99 ms | requests (all rounds) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {p.scenario} | {p.connections} | {p.rps:.0f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | {p.requests} | "
              f"{p.errors} |" for p in points]
    by = {(p.scenario, p.connections): p for p in points}
    lines += ["", "| conns | req/s, 1 / 0 | p50, 1 − 0 (ms) |", "|---:|---:|---:|"]
    for connections in sorted({p.connections for p in points}):
        off, on = by.get(("echo-replicas-0", connections)), by.get(("echo-replicas-1", connections))
        if off and on:
            lines.append(f"| {connections} | {on.rps / off.rps:.2f} | {on.p50_ms - off.p50_ms:+.2f} |")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point (default 10)")
    parser.add_argument("--connections", default="1,16,64", help="concurrency levels (default 1,16,64)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each point (default 3)")
    parser.add_argument("--output", help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.connections.split(",")]
    try:
        master, replica = start_master_and_replica()
    except RedisServerError as exc:
        sys.exit(f"benchmarks: {exc}")
    folder = Path(tempfile.mkdtemp(prefix="goinfer-bench-replicas-"))
    service = Service(folder, master, ProcessFactory(folder, python_path=[ROOT], env={"GOINFER_LOG_LEVEL": "WARNING"}))
    data = {"text": "测试测试", "image": ""}
    body = body_for(data, "SHA256")
    points: list[Point] = []
    shortfalls = waits = 0
    try:
        ports = {}
        tiers = []
        for replicas in SETTINGS:
            name = f"echo-replicas-{replicas}"
            settings, port = write_settings(service, name, ["goinfer.models.echo:Echo"], MaxWorkers=2,
                                            EnqueueReplicas=replicas, EnqueueReplicasTimeoutMs=WAIT_TIMEOUT_MS)
            service.start("server", "0", "--yaml", str(settings), log_name=f"server-{replicas}")
            tiers.append(service.start("http", "--yaml", str(settings), log_name=f"http-{replicas}"))
            ports[replicas] = port
        for port in ports.values():
            wait_http(port, "/api/echo", body)
        for connections in levels:
            for _ in range(args.rounds):
                for replicas, port in ports.items():
                    points.append(drive(service, f"echo-replicas-{replicas}", f"http://127.0.0.1:{port}/api/echo",
                                        body, connections, args.duration))
        # A WAIT that came back short is logged (a WARNING): then the replica did not keep up.
        shortfalls = sum(tier.output.count("reach fewer replicas") for tier in tiers)
        with master.client() as client:
            waits = client.info("commandstats").get("cmdstat_wait", {}).get("calls", 0)
    finally:
        service.stop_tiers()
        replica.stop()
        master.stop()
        shutil.rmtree(folder, ignore_errors=True)
    text = report(median_points(points), args.duration, args.rounds)
    print(f"WAITs run by the master: {waits}; short WAITs logged: {shortfalls}", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
