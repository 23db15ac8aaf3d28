"""Take-ahead: a worker facing a backlog takes several requests of a fast model per read and
answers them in one round trip; a slow model's requests are still taken one at a time.

Counted on a Redis of the test's own (INFO commandstats): XACK is sent once per round trip, so
the acknowledgements say how many round trips served the backlog. Every request must still be
answered once and executed once.
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from goinfer.client import Client, GoinferError
from goinfer.dispatcher.batching import TAKE_AHEAD_LIMIT, CallTimes
from goinfer.queue import stream_name
from goinfer.testing import FaultProxy

from conftest import APP_ID, APP_SECRET, settings_of, start_redis, stop_redis, url_of, wait_until, write_settings


def _call(api: Client, i: int, sleep: float) -> dict[str, Any] | GoinferError:
    try:
        return api.call("/api/record-file", {"i": i, "sleep": sleep})
    except GoinferError as exc:
        return exc


@pytest.mark.parametrize(("requests", "sleep", "take_ahead_ms", "round_trips"), [
    (120, 0.0, 20, "few"),        # a fast model: several requests per round trip
    (120, 0.0, 0, "one each"),    # TakeAheadMs 0: one at a time, as before
    (30, 0.03, 20, "one each"),   # 30 ms per call is past the 20 ms budget: one at a time
])
def test_a_backlog_of_a_fast_model_is_answered_in_few_round_trips(tmp_path: Path, processes, requests: int,
                                                                  sleep: float, take_ahead_ms: float,
                                                                  round_trips: str) -> None:
    redis_server = start_redis()
    try:
        executions = tmp_path / "executions.txt"
        settings = write_settings(tmp_path, redis_server.address, Models=["sample_models:FileRecorder"],
                                  Server={"MaxWorkers": 1, "MessageTimeout": 120, "TakeAheadMs": take_ahead_ms},
                                  Customer={"ExecutionsFile": str(executions)})
        processes.http(settings)
        client = redis_server.client()
        stream = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
        api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256", timeout=180)
        with ThreadPoolExecutor(requests) as pool:
            # The backlog builds while no dispatcher runs; then one worker serves all of it.
            futures = [pool.submit(_call, api, i, sleep) for i in range(requests)]
            wait_until(lambda: client.xlen(stream) == requests, 60, f"{requests} requests queued")
            client.config_resetstat()
            processes.server(settings)
            answers = [future.result(150) for future in futures]
        assert [getattr(answer, "code", None) if isinstance(answer, GoinferError) else 0 for answer in answers] \
            == [0] * requests, answers
        ran = executions.read_text().split()
        assert len(ran) == requests and len(set(ran)) == requests  # each executed once
        wait_until(lambda: client.xlen(stream) == 0, 10, "every entry acknowledged and deleted")
        stats = client.info("commandstats")
        acks = stats["cmdstat_xack"]["calls"]
        if round_trips == "few":
            # 1 until the model's first call is timed, then up to TAKE_AHEAD_LIMIT per round trip.
            assert acks <= requests // 2, stats
        else:
            assert acks == requests, stats
    finally:
        stop_redis(redis_server)


def test_answers_sent_while_the_next_calls_run_survive_connection_resets(tmp_path: Path, processes) -> None:
    """A backlog of a quick model is served with each round trip in flight while the next calls
    run (the overlap); resetting the dispatcher's connections again and again must lose no
    answer and run no request twice, whatever round trip the reset cuts."""
    requests = 400
    redis_server = start_redis()
    try:
        with FaultProxy.to(redis_server) as proxy:
            executions = tmp_path / "executions.txt"
            options = {"MaxWorkers": 2, "MessageTimeout": 120, "TakeAheadMs": 5, "QueueName": "overlap-"}
            customer = {"ExecutionsFile": str(executions)}
            tier = write_settings(tmp_path, redis_server.address, name="tier.yaml",
                                  Models=["sample_models:FileRecorder"], Server=options, Customer=customer)
            behind = write_settings(tmp_path, proxy.address, name="dispatcher.yaml",
                                    Models=["sample_models:FileRecorder"], Server=options, Customer=customer)
            processes.http(tier)
            client = redis_server.client()
            stream = stream_name("overlap-", 0)
            api = Client(url_of(tier), APP_ID, APP_SECRET, sign_type="SHA256", timeout=180)
            with ThreadPoolExecutor(64) as pool:
                futures = [pool.submit(_call, api, i, 0.01) for i in range(requests)]
                wait_until(lambda: client.xlen(stream) >= 64, 60, "a backlog queued")
                processes.server(behind)
                wait_until(lambda: executions.exists(), 60, "the dispatcher serving")
                resets = 0
                for _ in range(20):
                    time.sleep(0.1)
                    resets += proxy.reset()
                answers = [future.result(150) for future in futures]
        codes = [answer.code if isinstance(answer, GoinferError) else 0 for answer in answers]
        assert codes == [0] * requests, Counter(codes)
        ran = Counter(executions.read_text().split())
        assert len(ran) == requests and max(ran.values()) == 1, [r for r, n in ran.items() if n > 1]
        assert resets > 0
    finally:
        stop_redis(redis_server)


def test_call_times_take_ahead_only_what_fits_in_the_budget() -> None:
    calls = CallTimes(["/api/fast", "/api/slow"], budget_s=0.001)
    assert calls.take() == 1  # nothing timed yet: a model may be slow
    calls.observe("/api/fast", 0.00005)
    assert calls.take() == 1  # /api/slow is still unknown
    assert calls.may_hold("/api/fast", 0.0) and not calls.may_hold("/api/slow", 0.0)
    calls.observe("/api/slow", 0.0002)
    assert calls.take() == 5  # the slowest model's calls that fit in 1 ms
    assert calls.may_hold("/api/slow", 0.0007) and not calls.may_hold("/api/slow", 0.0009)
    for _ in range(30):
        calls.observe("/api/slow", 0.010)
    assert calls.take() == 1  # the estimate follows a model that became slow
    fast_only = CallTimes(["/api/fast"], budget_s=0.001)
    fast_only.observe("/api/fast", 1e-7)
    assert fast_only.take() == TAKE_AHEAD_LIMIT
    off = CallTimes(["/api/fast"], budget_s=0.0)
    off.observe("/api/fast", 1e-7)
    assert off.take() == 1 and not off.may_hold("/api/fast", 0.0)
