"""The queue between the tiers and the dispatchers behind it, with real processes."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from goinfer.client import Client, GoinferError
from goinfer.queue import stream_name

from conftest import APP_ID, APP_SECRET, settings_of, url_of, wait_until, write_settings

RECORDING_MODELS = ["sample_models:Recorder", "sample_models:CustomQueued", "goinfer.models.echo:Echo"]


def client(url: str) -> Client:
    return Client(url, APP_ID, APP_SECRET, sign_type="SHA256")


def executions(redis_server, settings) -> list[str]:
    key = settings_of(settings)["Server"]["QueueName"] + "executions"
    return [item.decode() for item in redis_server.client().lrange(key, 0, -1)]


def test_two_dispatchers_on_one_queue_run_each_request_exactly_once(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=RECORDING_MODELS)
    processes.http(settings)
    processes.server(settings, env={"GOINFER_TEST_TAG": "A"})
    processes.server(settings, env={"GOINFER_TEST_TAG": "B"})
    api = client(url_of(settings))
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda i: api.call("/api/record", {"i": i, "sleep": 0.005}), range(200)))
    request_ids = [a["requestId"] for a in answers]
    assert all(a["request_id"] == a["requestId"] for a in answers)
    assert len(set(request_ids)) == 200
    ran = executions(redis_server, settings)
    assert sorted(ran) == sorted(request_ids)  # each once: no loss, no duplicate
    tags = Counter(a["tag"] for a in answers)
    assert set(tags) == {"A", "B"}, tags


def test_request_sent_before_any_dispatcher_is_served(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=RECORDING_MODELS,
                              Server={"MessageTimeout": 30})
    processes.http(settings)
    result: dict = {}

    def call() -> None:
        try:
            result["data"] = client(url_of(settings)).call("/api/record", {"early": True})
        except GoinferError as exc:
            result["error"] = exc

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(1.0)
    assert caller.is_alive(), "the request must wait for a dispatcher, not fail"
    processes.server(settings)
    caller.join(30)
    assert "error" not in result, result
    assert result["data"]["request_id"] == result["data"]["requestId"]
    assert executions(redis_server, settings) == [result["data"]["requestId"]]


def test_requests_spread_over_two_queues(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=RECORDING_MODELS,
                              Server={"RequestQueueAmount": 2})
    processes.http(settings)
    processes.server(settings, 0, env={"GOINFER_TEST_TAG": "q0"})
    processes.server(settings, 1, env={"GOINFER_TEST_TAG": "q1"})
    api = client(url_of(settings))
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: api.call("/api/record", {"i": i}), range(60)))
    tags = Counter(a["tag"] for a in answers)
    assert set(tags) == {"q0", "q1"}, tags
    assert len(executions(redis_server, settings)) == 60


def test_custom_queue(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=RECORDING_MODELS)
    processes.http(settings)
    processes.server(settings)
    data = client(url_of(settings)).call("/api/custom", {"x": 7})
    assert (data["served"], data["x"]) == ("custom", 7)
    info = redis_server.client().xinfo_groups(stream_name("goinfer-test-custom-queue-", 0))
    assert info and info[0]["last-delivered-id"] != b"0-0"
    default_stream = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
    assert redis_server.client().xinfo_groups(default_stream)[0]["last-delivered-id"] == b"0-0"


def test_killed_worker_is_restarted(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=RECORDING_MODELS,
                              Server={"MaxWorkers": 1})
    processes.http(settings)
    server = processes.server(settings)
    api = client(url_of(settings))
    pid = api.call("/api/record", {})["pid"]
    os.kill(pid, signal.SIGKILL)
    server.wait_for_output("died with exit code -9; restarting it")
    wait_until(lambda: api.call("/api/record", {})["pid"] not in (pid,), 30, "a restarted worker to answer")


def test_init_failure_stops_the_dispatcher(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=["sample_models:BrokenInit"])
    server = processes.server(settings, wait=False)
    assert server.process.wait(60) == 1
    assert "weights file /nonexistent/model.bin not found" in server.output
    assert "could not initialise the models" in server.output


def test_sigterm_stops_both_tiers_cleanly(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address)
    http = processes.http(settings)
    server = processes.server(settings)
    assert client(url_of(settings)).call("/api/echo", {"a": 1})["a"] == 1
    assert server.stop(signal.SIGTERM) == 0
    assert http.stop(signal.SIGINT) == 0
    assert "dispatcher for queue 0 stopped" in server.output
    assert "Traceback" not in server.output + http.output


def test_http_workers_share_the_port_and_are_restarted(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address)
    http = processes.start("http", "--workers", "2", "--yaml", str(settings))
    processes.server(settings)
    api = client(url_of(settings))
    wait_until(lambda: http.output.count("HTTP tier on") == 2, 30, "two HTTP processes")
    wait_until(lambda: _answers(api), 30, "the HTTP processes to answer")
    pids = sorted(int(line.split("[")[1].split("]")[0]) for line in http.output.splitlines()
                  if "HTTP tier on" in line)
    assert len(set(pids)) == 2
    with ThreadPoolExecutor(16) as pool:
        assert all(a["a"] == i for i, a in enumerate(pool.map(lambda i: api.call("/api/echo", {"a": i}), range(64))))
    os.kill(pids[0], signal.SIGKILL)
    http.wait_for_output("restarting it")
    wait_until(lambda: http.output.count("HTTP tier on") == 3, 30, "a restarted HTTP process")
    assert all(api.call("/api/echo", {"a": i})["a"] == i for i in range(20))
    assert http.stop(signal.SIGTERM) == 0


def _answers(api: Client) -> bool:
    try:
        return api.call("/api/echo", {"a": 0})["a"] == 0
    except OSError:
        return False
