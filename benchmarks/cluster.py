"""Echo throughput with one Redis against a three-primary Redis Cluster, in one run.

    python -m benchmarks.cluster                          # 10 s per point, 16 and 64 connections
    python -m benchmarks.cluster --duration 5 --connections 64

Both setups run the same service: RequestQueueAmount 3, one dispatcher per queue with
--echo-workers workers, one HTTP process, SHA256-signed echo requests, load as in
benchmarks/run.py (wrk when installed, else its asyncio generator). The cluster is three
primaries with one replica each, joined by `redis-cli --cluster create` (tests/redis_cluster.py),
so the queues {q0}, {q1}, {q2} land on three different primaries; the same cluster without
replicas is measured too, to tell what replication costs from what sharding costs.

Besides requests/s and latency, each point says where the CPU went (milliseconds of CPU per
request in the HTTP process, the dispatchers and their workers, and the Redis servers, from
/proc), and for Redis how the commands spread over the nodes, how many connections each node
holds, and how many commands were redirected (MOVED). Everything shares this machine's cores:
compare the two setups within a run, not with numbers from elsewhere.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from benchmarks.run import ROOT, STOP_GRACE_S, Point, body_for, children_of, cpu_seconds, drive, wait_http
from goinfer.redis_server import RedisServerError
from goinfer.testing import ProcessFactory, free_port, settings_of, start_redis
from goinfer.testing import write_settings as write_settings_file

sys.path.insert(0, str(ROOT / "tests"))
from redis_cluster import start_cluster  # noqa: E402 - the tests' cluster harness, shared

QUEUES = 3


@dataclass
class Nodes:
    """The Redis servers of one setup: their pids and plain clients, to read their counters."""

    pids: list[int]
    clients: list[redis.Redis]

    def stats(self) -> list[dict[str, int]]:
        found = []
        for client in self.clients:
            info = client.info("all")
            calls = sum(int(value.get("calls", 0)) for name, value in info.items() if name.startswith("cmdstat_"))
            moved = int(info.get("errorstat_MOVED", {}).get("count", 0))
            found.append({"calls": calls, "moved": moved, "clients": int(info.get("connected_clients", 0)),
                          "primary": int(info.get("role") == "master")})
        return found


@dataclass
class Result:
    point: Point
    cpu_ms: dict[str, float]  # per request: http, dispatchers, redis
    commands: list[float] = field(default_factory=list)  # per primary, per request
    connections: list[int] = field(default_factory=list)  # per primary, at the end of the point
    moved: int = 0


def run_setup(name: str, address: str, nodes: Nodes, cluster: bool, args: Any, folder: Path) -> list[Result]:
    settings = write_settings_file(
        folder, address, name=f"{name}.yaml", Models=["goinfer.models.echo:Echo"],
        API={"HttpWorkers": args.http_workers},
        Server={"QueueName": f"bench-{name}-", "MessageTimeout": 30, "RequestQueueAmount": QUEUES,
                "MaxWorkers": args.echo_workers, "RedisCluster": cluster},
    )
    port = int(settings_of(settings)["API"]["Port"])
    processes = ProcessFactory(folder, python_path=[ROOT], env={"GOINFER_LOG_LEVEL": "WARNING"})
    results = []
    try:
        dispatchers = [processes.start("server", str(index), "--yaml", str(settings), log_name=f"{name}-server")
                       for index in range(QUEUES)]
        http = processes.start("http", "--yaml", str(settings), log_name=f"{name}-http")
        url = f"http://127.0.0.1:{port}/api/echo"
        body = body_for({"text": "测试测试", "image": ""}, "SHA256")
        wait_http(port, "/api/echo", body)
        time.sleep(1.0)
        groups = {
            "http": [http.pid, *children_of(http.pid)],
            "dispatchers": [pid for proc in dispatchers for pid in (proc.pid, *children_of(proc.pid))],
            "redis": nodes.pids,
        }
        holder = _Folder(folder, [pid for pids in groups.values() for pid in pids])
        for connections in args.connections:
            before = {group: cpu_seconds(pids) for group, pids in groups.items()}
            stats_before = nodes.stats()
            point = drive(holder, name, url, body, connections, args.duration,
                          f"{QUEUES} queues, {args.echo_workers} worker(s) each, {args.http_workers} HTTP proc")
            stats_after = nodes.stats()
            requests = max(1, point.requests)
            cpu = {group: (cpu_seconds(pids) - before[group]) * 1000 / requests for group, pids in groups.items()}
            primaries = [(b, a) for b, a in zip(stats_before, stats_after, strict=True) if a["primary"]]
            results.append(Result(point, cpu, [round((a["calls"] - b["calls"]) / requests, 2) for b, a in primaries],
                                  [a["clients"] for _, a in primaries],
                                  sum(a["moved"] - b["moved"] for b, a in primaries)))
    finally:
        processes.cleanup(STOP_GRACE_S)
    return results


@dataclass
class _Folder:
    """What benchmarks.run.drive needs of its service: where wrk's files go, and whose CPU counts."""

    folder: Path
    processes: list[int]

    def pids(self) -> list[int]:
        return self.processes


def report(results: list[Result], args: Any) -> str:
    lines = [
        f"goinfer cluster benchmark, {time.strftime('%Y-%m-%d %H:%M')} — {platform.machine()}, {os.cpu_count()} "
        f"cores, Python {platform.python_version()}, load from "
        f"{'wrk' if shutil.which('wrk') else 'asyncio generator'}, {args.duration:g} s per point, all processes "
        "on this one machine",
        "",
        "| setup | conns | req/s | p50 ms | p99 ms | errors | CPU ms/req: HTTP | dispatchers | Redis | Redis "
        "commands/req per primary | connections per primary | MOVED |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in results:
        p = r.point
        lines.append(f"| {p.scenario} | {p.connections} | {p.rps:.0f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | {p.errors} | "
                     f"{r.cpu_ms['http']:.3f} | {r.cpu_ms['dispatchers']:.3f} | {r.cpu_ms['redis']:.3f} | "
                     f"{' / '.join(f'{c:g}' for c in r.commands)} | {' / '.join(map(str, r.connections))} | "
                     f"{r.moved} |")
    by = {(r.point.scenario, r.point.connections): r.point for r in results}
    ratios = [f"| {name} / one Redis, {c} conns | {by[name, c].rps / by['one-redis', c].rps:.2f} |"
              for name in ("cluster", "cluster-no-replicas") for c in args.connections
              if (name, c) in by and ("one-redis", c) in by]
    if ratios:
        lines += ["", "| ratio (req/s) | value |", "|---|---:|", *ratios]
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point (default 10)")
    parser.add_argument("--connections", default="16,64", help="concurrency levels (default 16,64)")
    parser.add_argument("--http-workers", type=int, default=1, help="goinfer http --workers (default 1)")
    parser.add_argument("--echo-workers", type=int, default=1, help="MaxWorkers of each dispatcher (default 1)")
    parser.add_argument("--output", help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    args.connections = [int(c) for c in args.connections.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="goinfer-bench-cluster-"))
    results: list[Result] = []
    try:
        try:
            single = start_redis(free_port())
        except RedisServerError as exc:
            sys.exit(f"benchmarks: {exc}")
        try:
            nodes = Nodes([single.process.pid], [single.client()])
            results += run_setup("one-redis", single.address, nodes, False, args, folder)
        finally:
            single.stop()
        for name, replicas in (("cluster-no-replicas", 0), ("cluster", 1)):
            with start_cluster(replicas=replicas) as cluster:
                nodes = Nodes([node.process.pid for node in cluster.nodes if node.process is not None],
                              [node.client() for node in cluster.nodes])
                results += run_setup(name, cluster.address, nodes, True, args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = report(results, args)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
