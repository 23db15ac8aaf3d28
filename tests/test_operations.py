"""Operations endpoints with real processes: health, readiness, metrics, status, access log."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from goinfer.cli_options import EXIT_CONFIG
from goinfer.client import Client, GoinferError
from goinfer.http.server import build_app
from goinfer.models.echo import Echo
from goinfer.models.registry import ModelRegistry
from goinfer.queue import stream_name, with_lanes
from goinfer.settings import load_settings

from conftest import (
    APP_ID,
    APP_SECRET,
    SM2_PRIVATE_KEY,
    free_port,
    post_raw,
    settings_of,
    url_of,
    wait_until,
    write_settings,
)

HEARTBEAT_S = 0.5  # the key lives 3 intervals: 2 s (rounded up)
TTL_S = 2
OPS_MODELS = ["goinfer.models.echo:Echo", "sample_models:Recorder"]


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    status, body = get(url)
    return status, json.loads(body)


def client(url: str) -> Client:
    return Client(url, APP_ID, APP_SECRET, sign_type="SHA256")


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in Prometheus text, or None."""
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else None


def ops_settings(tmp_path, redis_server, **server: Any):
    return write_settings(tmp_path, redis_server.address, Models=OPS_MODELS,
                          Server={"MaxWorkers": 1, "HeartbeatIntervalS": HEARTBEAT_S, **server})


def test_ready_follows_the_dispatchers(tmp_path, redis_server, processes):
    metrics_port = free_port()
    settings = ops_settings(tmp_path, redis_server, MessageTimeout=1, MetricsPort=metrics_port)
    queue = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
    http = processes.http(settings)
    url = url_of(settings)
    assert get_json(url + "/health") == (200, {"status": "ok"})
    assert get_json(url + "/ready") == (503, {"ready": False, "redis": True, "missing_queues": [queue]})

    # A request no dispatcher took in time is answered QueueTimeout, then dropped by the worker.
    with pytest.raises(GoinferError) as timed_out:
        client(url).call("/api/echo", {"late": True})
    assert timed_out.value.code == 9997
    # TMPDIR: the metrics folder of a dispatcher killed with SIGKILL stays in the test's folder.
    server = processes.server(settings, env={"TMPDIR": str(tmp_path)})
    assert get_json(url + "/ready") == (200, {"ready": True, "redis": True, "missing_queues": []})
    wait_until(lambda: sample(get(url + "/metrics")[1].decode(), "goinfer_queue_deadline_dropped_total",
                              queue=queue) == 1.0, 10, "the dropped request in /metrics")
    dispatcher = get(f"http://127.0.0.1:{metrics_port}/metrics")[1].decode()
    assert sample(dispatcher, "goinfer_dispatcher_deadline_dropped_total", queue=queue) == 1.0

    server.kill_group()  # SIGKILL: the heartbeat key expires
    killed = time.monotonic()
    wait_until(lambda: get(url + "/ready")[0] == 503, TTL_S + 3, "readiness to fail after SIGKILL")
    assert time.monotonic() - killed <= TTL_S + 2
    assert get_json(url + "/ready")[1]["missing_queues"] == [queue]

    server = processes.server(settings)
    assert get(url + "/ready")[0] == 200
    assert server.stop(signal.SIGTERM) == 0  # a clean stop deletes the key at once
    assert get_json(url + "/ready") == (503, {"ready": False, "redis": True, "missing_queues": [queue]})
    assert "Traceback" not in server.output + http.output


@pytest.mark.parametrize("command", [["http"], ["http", "--workers", "2"], ["up"]], ids=" ".join)
def test_a_port_another_program_holds_stops_the_tier_with_one_line_and_exit_2(tmp_path, redis_server, processes,
                                                                            command):
    """Restarting an HTTP process (under --workers or `up`) cannot free the port: every command
    stops, with the settings problem's status and no traceback, instead of retrying for ever."""
    settings = write_settings(tmp_path, redis_server.address)
    port = settings_of(settings)["API"]["Port"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        tier = processes.start(*command, "--yaml", str(settings))
        assert tier.process.wait(60) == EXIT_CONFIG, tier.output
    errors = [line for line in tier.output.splitlines() if line.startswith("goinfer: error:")]
    assert errors == [f"goinfer: error: {settings}: API.Port: cannot listen on 127.0.0.1:{port}: "
                      "address already in use"], tier.output
    assert "Traceback" not in tier.output


def test_a_second_multi_process_tier_does_not_join_the_port_of_a_running_one(tmp_path, redis_server, processes):
    """SO_REUSEPORT would let it in, and the kernel would give it half the first one's clients."""
    settings = write_settings(tmp_path, redis_server.address)
    first = processes.start("http", "--yaml", str(settings), "--workers", "2")
    first.wait_while_running(lambda: first.output.count("HTTP tier on") == 2, 60, "both processes listening")
    second = processes.start("http", "--yaml", str(settings), "--workers", "2")
    assert second.process.wait(60) == EXIT_CONFIG, second.output
    port = settings_of(settings)["API"]["Port"]
    assert f"API.Port: cannot listen on 127.0.0.1:{port}: address already in use" in second.output
    assert "HTTP tier on" not in second.output and "Traceback" not in second.output
    assert first.process.poll() is None


def test_ready_fails_when_redis_is_unreachable(tmp_path, processes):
    settings = write_settings(tmp_path, f"127.0.0.1:{free_port()}")
    url = url_of(settings)
    processes.http(settings)
    assert get_json(url + "/health") == (200, {"status": "ok"})
    status, body = get_json(url + "/ready")
    assert status == 503 and body["ready"] is False and body["redis"] is False
    assert sample(get(url + "/metrics")[1].decode(), "goinfer_redis_up") == 0.0
    assert get_json(url + "/goinfer/status")[1]["redis"] is False


def test_metrics_status_and_access_log(tmp_path, redis_server, processes):
    metrics_port = free_port()
    settings = ops_settings(tmp_path, redis_server, MetricsPort=metrics_port)
    queue = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
    http = processes.http(settings)
    server = processes.server(settings)
    url = url_of(settings)
    api = client(url)
    ids = [api.call("/api/echo", {"i": i})["requestId"] for i in range(3)]
    pid = api.call("/api/record", {})["pid"]
    status, _ = post_raw(url + "/api/echo", json.dumps({"appId": APP_ID}).encode())  # refused: 9801
    assert status == 200
    assert post_raw(url + "/no/such/path", b"{}")[0] == 404

    text = get(url + "/metrics")[1].decode()
    assert sample(text, "goinfer_http_requests_total", api_path="/api/echo", code="0") == 3.0
    assert sample(text, "goinfer_http_requests_total", api_path="/api/echo", code="9801") == 1.0
    assert sample(text, "goinfer_http_requests_total", api_path="unrouted", code="9709") == 1.0
    assert sample(text, "goinfer_http_request_duration_seconds_bucket", api_path="/api/echo", le="+Inf") == 4.0
    assert sample(text, "goinfer_http_queue_wait_seconds_count", api_path="/api/echo") == 3.0
    assert sample(text, "goinfer_http_infer_seconds_count", api_path="/api/echo") == 3.0
    assert sample(text, "goinfer_queue_length", queue=queue) == 0.0
    assert sample(text, "goinfer_queue_pending", queue=queue) == 0.0
    assert sample(text, "goinfer_queue_dispatchers", queue=queue) == 1.0
    assert sample(text, "goinfer_http_in_flight_requests") == 0.0
    assert sample(text, "goinfer_redis_up") == 1.0

    status, body = get_json(url + "/goinfer/status")
    assert status == 200 and body["redis"] is True and body["missing_queues"] == []
    mine = [d for d in body["dispatchers"] if d["pid"] == server.process.pid]
    assert len(mine) == 1, body["dispatchers"]
    assert mine[0]["live_workers"] == 1 and mine[0]["max_workers"] == 1
    assert mine[0]["streams"] == with_lanes([queue]) and mine[0]["models"] == OPS_MODELS  # live, jobs, batch
    assert set(mine[0]["apis"]) == {"/api/echo", "/api/record"}
    assert [q["name"] for q in body["queues"]] == [queue, f"{queue}:normal", f"{queue}:low"]
    raw = json.dumps(body)
    assert APP_SECRET not in raw and SM2_PRIVATE_KEY not in raw and "AppIdSecret" not in raw

    access = [line for line in http.output.splitlines() if "goinfer.access" in line]
    assert any(f"POST /api/echo appId={APP_ID} code=0 " in line and f"requestId={ids[0]}" in line
               for line in access), access
    assert any("code=9801" in line for line in access)
    assert any("POST /no/such/path appId= code=9709" in line for line in access)

    dispatcher = f"http://127.0.0.1:{metrics_port}/metrics"
    text = get(dispatcher)[1].decode()
    assert sample(text, "goinfer_dispatcher_live_workers", queue_index="0") == 1.0
    assert sample(text, "goinfer_dispatcher_worker_restarts_total", queue_index="0") == 0.0
    assert sample(text, "goinfer_dispatcher_infer_seconds_count", api_path="/api/echo") == 3.0
    os.kill(pid, signal.SIGKILL)
    server.wait_for_output("restarting it")
    wait_until(lambda: api.call("/api/record", {})["pid"] != pid, 30, "a restarted worker")
    text = get(dispatcher)[1].decode()
    assert sample(text, "goinfer_dispatcher_worker_restarts_total", queue_index="0") == 1.0
    assert sample(text, "goinfer_dispatcher_live_workers", queue_index="0") == 1.0
    # The dead worker's series still count: counters never go back.
    assert sample(text, "goinfer_dispatcher_infer_seconds_count", api_path="/api/echo") == 3.0
    assert sample(text, "goinfer_dispatcher_infer_seconds_count", api_path="/api/record") == 2.0
    wait_until(lambda: sample(get(url + "/metrics")[1].decode(), "goinfer_cluster_worker_restarts_total",
                              dispatcher=f"{mine[0]['host']}:{mine[0]['pid']}", queue_index="0") == 1.0,
               5, "the restart in the HTTP tier's metrics (from the heartbeat)")


def test_access_log_can_be_switched_off(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, API={"AccessLog": False})
    http = processes.http(settings)
    assert post_raw(url_of(settings) + "/api/echo", b"{}")[1]["code"] == 9801
    assert post_raw(url_of(settings) + "/nothing", b"{}")[0] == 404
    text = get(url_of(settings) + "/metrics")[1].decode()
    assert sample(text, "goinfer_http_requests_total", api_path="/api/echo", code="9801") == 1.0
    assert "goinfer.access" not in http.output


def test_http_workers_share_their_metrics(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address)
    http = processes.start("http", "--workers", "2", "--yaml", str(settings))
    url = url_of(settings)
    wait_until(lambda: http.output.count("HTTP tier on") == 2, 30, "two HTTP processes")
    wait_until(lambda: _serving(url), 30, "the HTTP processes to answer")
    for _ in range(20):  # new connections: SO_REUSEPORT spreads them over both processes
        assert post_raw(url + "/api/echo", b"{}")[1]["code"] == 9801
    pids = {get_json(url + "/goinfer/status")[1]["http"]["pid"] for _ in range(20)}
    assert len(pids) == 2, "scrapes should reach both processes"
    for _ in range(6):  # whichever process answers, it shows the sum of both
        text = get(url + "/metrics")[1].decode()
        assert sample(text, "goinfer_http_requests_total", api_path="/api/echo", code="9801") == 20.0
    assert http.stop(signal.SIGTERM) == 0


def _serving(url: str) -> bool:
    try:
        return get(url + "/health", timeout=1)[0] == 200
    except OSError:
        return False


def test_dead_letters_and_restarts_are_counted(tmp_path, redis_server, processes):
    metrics_port = free_port()
    settings = write_settings(tmp_path, redis_server.address, Models=["sample_models:Crasher"],
                              Server={"MaxWorkers": 1, "MaxDeliveries": 1, "ClaimIdleMs": 500,
                                      "MetricsPort": metrics_port, "HeartbeatIntervalS": HEARTBEAT_S})
    queue = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
    processes.http(settings)
    server = processes.server(settings)
    url = url_of(settings)
    with pytest.raises(GoinferError) as poisoned:
        client(url).call("/api/crash", {"crash": True})
    assert poisoned.value.code == 9705
    text = get(url + "/metrics")[1].decode()
    assert sample(text, "goinfer_queue_dead_lettered_total", queue=queue) == 1.0
    assert sample(text, "goinfer_queue_dead_letter_length", queue=queue) == 1.0
    dispatcher = get(f"http://127.0.0.1:{metrics_port}/metrics")[1].decode()
    assert sample(dispatcher, "goinfer_dispatcher_dead_lettered_total", queue=queue) == 1.0
    assert sample(dispatcher, "goinfer_dispatcher_worker_restarts_total", queue_index="0") == 1.0
    assert get_json(url + "/goinfer/status")[1]["queues"][0]["dead_lettered"] == 1
    assert "Traceback" not in server.output


class HealthModel(Echo):
    """A model that claims /health: the model keeps the path."""

    api_path = "/health"


def test_a_model_path_wins_over_an_operations_endpoint(tmp_path, redis_server):
    settings = load_settings(str(write_settings(tmp_path, redis_server.address, Models=[])))
    port = free_port()

    async def scenario() -> tuple[int, int, int]:
        runner = web.AppRunner(build_app(settings, ModelRegistry([HealthModel])))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/health") as health:
                    async with session.post(f"http://127.0.0.1:{port}/health", data=b"{}") as posted:
                        async with session.get(f"http://127.0.0.1:{port}/ready") as ready:
                            return health.status, (await posted.json())["code"], ready.status
        finally:
            await runner.cleanup()

    # GET is the model's wrong method (405), POST reaches its signature check; /ready still served.
    assert asyncio.run(scenario()) == (405, 9801, 503)
