"""Busy polling (`API.BusyPollUs`): after each request and each response, the HTTP process keeps
its event loop polling its sockets for a while instead of sleeping, as long as the machine has a
core to spare.

Why: at low load every step of a request wakes a sleeping process. On a VM, waking a process
whose virtual CPU has halted costs tens of microseconds before any code runs, and the HTTP
process sleeps twice per request: waiting for the answer, then for the client's next request.
A process that is still polling when the data arrives pays neither wake-up, and the processes
that send to it (Redis, the client) no longer have to wake it either. Measured on the project's
2-core VM (benchmarks/README.md): SHA256 echo at 1 connection, p50 0.73 → 0.55 ms.

The price is CPU: at a steady trickle of requests the process polls a whole core. So it is off
by default, and when on it polls only while the other processes on this machine leave at least
one core idle, measured from /proc/stat every SAMPLE_S: on a loaded machine the cores go to the
model, never to polling. A container's CPU quota (cgroup v2 `cpu.max`) counts as its cores, so a
process limited to one core never polls.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

# How often the machine's idle cores are measured, and how much of a core the other processes
# must leave idle beyond the one the polling takes.
SAMPLE_S = 0.1
MARGIN_CORES = 0.25

_CPU_MAX = "/sys/fs/cgroup/cpu.max"
_PROC_STAT = "/proc/stat"


def usable_cores(cpu_max_path: str = _CPU_MAX) -> float:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 quota."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every core counts
    cores = float(len(affinity(0)) if affinity else os.cpu_count() or 1)
    try:
        with open(cpu_max_path) as cpu_max:
            quota, period = cpu_max.read().split()[:2]
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return min(cores, int(quota) / int(period))


def machine_busy_s(stat_path: str = _PROC_STAT) -> float | None:
    """Seconds of CPU the whole machine has spent busy since boot (None where /proc/stat is not)."""
    try:
        with open(stat_path, "rb") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    # steal (8th) is time the hypervisor ran someone else: not a core this machine could use.
    steal = fields[7] if len(fields) > 7 else 0
    return (sum(fields[:8]) - idle - steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class _Sample:
    wall_s: float
    busy_s: float
    own_s: float


class SpareCore:
    """Whether the other processes leave a core idle for this one to poll on.

    Others' load = (the machine's busy CPU - this process's) / wall time, over the last
    SAMPLE_S; polling is allowed while it is at most `cores` - 1 - MARGIN_CORES.
    """

    def __init__(self, cores: float | None = None,
                 machine_busy: Callable[[], float | None] = machine_busy_s,
                 own_cpu: Callable[[], float] = own_cpu_s,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limit = (usable_cores() if cores is None else cores) - 1.0 - MARGIN_CORES
        self._machine_busy, self._own_cpu, self._clock = machine_busy, own_cpu, clock
        self._last: _Sample | None = None
        self._allowed = False

    def allowed(self) -> bool:
        now = self._clock()
        if self._last is None or now - self._last.wall_s >= SAMPLE_S:
            self._resample(now)
        return self._allowed

    def _resample(self, now: float) -> None:
        busy = self._machine_busy()
        if busy is None or self._limit < 0:  # nothing to measure by, or no core to spare
            self._allowed = busy is None and self._limit >= 0
            return
        sample = _Sample(now, busy, self._own_cpu())
        last, self._last = self._last, sample
        if last is None or sample.wall_s <= last.wall_s:
            return  # the first sample: the previous decision (no polling) stands
        others = (sample.busy_s - last.busy_s - (sample.own_s - last.own_s)) / (sample.wall_s - last.wall_s)
        self._allowed = others <= self._limit


class BusyPoll:
    """Keeps the event loop polling for `window_s` after each `touch`, while `allowed()` says a
    core is spare (SpareCore's, unless told otherwise)."""

    def __init__(self, window_s: float, allowed: Callable[[], bool] | None = None) -> None:
        self.window_s = window_s
        self._allowed = allowed or SpareCore().allowed
        self._until = 0.0
        self._touched: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.polls = 0  # event-loop turns spent polling (for tests and curiosity)

    def touch(self) -> None:
        """A request came or a response went: poll for the next window_s."""
        self._until = time.monotonic() + self.window_s
        touched = self._touched
        if touched is not None and not touched.is_set():
            touched.set()

    def start(self) -> None:
        self._touched = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(self._touched), name="goinfer-busy-poll")

    async def stop(self) -> None:
        task, self._task, self._touched = self._task, None, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def _run(self, touched: asyncio.Event) -> None:
        while True:
            await touched.wait()
            touched.clear()
            while time.monotonic() < self._until and self._allowed():
                # A ready task makes the loop poll its sockets without blocking, then come back.
                await asyncio.sleep(0)
                self.polls += 1
