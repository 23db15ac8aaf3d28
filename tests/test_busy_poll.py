"""API.BusyPollUs: the HTTP tier polls for a while after each request and response instead of
sleeping, only while the machine has a core to spare, and answers exactly as without it."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from benchmarks.run import cpu_seconds
from goinfer.client import Client
from goinfer.http.busy_poll import (
    MARGIN_CORES,
    SAMPLE_S,
    BusyPoll,
    SpareCore,
    machine_busy_s,
    own_cpu_s,
    usable_cores,
)
from goinfer.settings import SettingsError, load_settings

from conftest import APP_ID, APP_SECRET, url_of, write_settings


class Machine:
    """What SpareCore reads: a clock, the machine's busy CPU and this process's, moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.busy = 0.0
        self.own = 0.0

    def spare(self, cores: float) -> SpareCore:
        return SpareCore(cores, machine_busy=lambda: self.busy, own_cpu=lambda: self.own, clock=lambda: self.now)

    def run_for(self, seconds: float, others_cores: float, own_cores: float) -> None:
        self.now += seconds + 1e-6  # a step of SAMPLE_S is a sample even where the sum rounds down
        self.own += seconds * own_cores
        self.busy += seconds * (others_cores + own_cores)


def test_polling_is_allowed_only_while_the_others_leave_a_core_idle() -> None:
    machine = Machine()
    spare = machine.spare(cores=2)
    assert not spare.allowed()  # one sample says nothing about load yet
    machine.run_for(SAMPLE_S, others_cores=0.5, own_cores=1.0)  # polling a whole core is not held against it
    assert spare.allowed()
    machine.run_for(SAMPLE_S, others_cores=2 - 1 - MARGIN_CORES + 0.05, own_cores=0.2)
    assert not spare.allowed()
    machine.run_for(SAMPLE_S / 2, others_cores=0.0, own_cores=0.0)
    assert not spare.allowed()  # decided once per SAMPLE_S
    machine.run_for(SAMPLE_S / 2, others_cores=0.0, own_cores=0.0)
    assert spare.allowed()


def test_one_core_is_never_polled_on_and_an_unmeasurable_machine_is_trusted() -> None:
    machine = Machine()
    one = machine.spare(cores=1.2)  # a CPU quota of 1.2 cores: no whole core beside the margin
    for _ in range(3):
        machine.run_for(SAMPLE_S, others_cores=0.0, own_cores=0.0)
        assert not one.allowed()
    unmeasured = SpareCore(2, machine_busy=lambda: None)
    assert unmeasured.allowed()
    assert not SpareCore(1, machine_busy=lambda: None).allowed()


def test_the_cores_come_from_the_affinity_and_the_cgroup_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("50000 100000\n")
    assert usable_cores(str(quota)) == min(affinity, 0.5)
    quota.write_text("max 100000\n")
    assert usable_cores(str(quota)) == affinity
    assert usable_cores(str(tmp_path / "missing")) == affinity


def test_the_machine_s_busy_time_leaves_out_idle_iowait_and_steal(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat.write_text("cpu  300 20 100 5000 70 5 5 40 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    assert machine_busy_s(str(stat)) == pytest.approx(430 / os.sysconf("SC_CLK_TCK"))
    assert machine_busy_s(str(tmp_path / "missing")) is None
    real = machine_busy_s()
    assert real is not None and real > 0


def test_the_loop_polls_for_the_window_after_a_touch_then_sleeps() -> None:
    async def scenario() -> tuple[int, float, int, float]:
        poll = BusyPoll(0.2, allowed=lambda: True)
        poll.start()
        try:
            await asyncio.sleep(0.05)
            assert poll.polls == 0  # never touched: asleep
            started = own_cpu_s()
            poll.touch()
            await asyncio.sleep(0.15)
            polling = (poll.polls, own_cpu_s() - started)
            await asyncio.sleep(0.15)  # past the window
            settled, started = poll.polls, own_cpu_s()
            await asyncio.sleep(0.2)
            return *polling, poll.polls - settled, own_cpu_s() - started
        finally:
            await poll.stop()

    polls, cpu_polling, polls_after, cpu_after = asyncio.run(scenario())
    assert polls > 100 and cpu_polling > 0.05, (polls, cpu_polling)
    assert polls_after == 0 and cpu_after < 0.05, (polls_after, cpu_after)


def test_nothing_is_polled_while_no_core_is_spare() -> None:
    async def scenario() -> int:
        poll = BusyPoll(0.2, allowed=lambda: False)
        poll.start()
        poll.touch()
        await asyncio.sleep(0.1)
        await poll.stop()
        return poll.polls

    assert asyncio.run(scenario()) == 0


def test_busy_poll_us_is_checked(tmp_path: Path) -> None:
    assert load_settings(str(write_settings(tmp_path, "127.0.0.1:1"))).api.busy_poll_us == 0
    for bad in (-1, 1_000_001, "fast"):
        path = write_settings(tmp_path, "127.0.0.1:1", name=f"bad-{bad}.yaml", API={"BusyPollUs": bad})
        with pytest.raises(SettingsError, match="API.BusyPollUs"):
            load_settings(str(path))


def test_a_tier_that_polls_answers_as_before_and_polls_after_each_request(tmp_path, redis_server, processes) -> None:
    settings = write_settings(tmp_path, redis_server.address, API={"BusyPollUs": 1_000_000})
    http = processes.http(settings)
    processes.server(settings)
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256", timeout=30)
    for i in range(20):
        assert api.call("/api/echo", {"text": f"poll {i}"})["text"] == f"poll {i}"
    time.sleep(1.5)  # past the window: asleep
    idle_from = cpu_seconds([http.pid])
    time.sleep(0.8)
    idle = cpu_seconds([http.pid]) - idle_from
    assert idle < 0.1, idle
    if usable_cores() - 1 - MARGIN_CORES < 0.5:
        pytest.skip(f"{usable_cores():g} cores: the tier polls only where one is spare beside the others' load")
    api.call("/api/echo", {"text": "wake"})
    busy_from = cpu_seconds([http.pid])
    time.sleep(0.8)
    assert cpu_seconds([http.pid]) - busy_from > 0.2  # polling most of that time
