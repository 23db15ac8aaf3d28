"""A dispatcher still loading its models is told apart from none at all: /ready, /goinfer/status, `goinfer up`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

from conftest import process_env, url_of, wait_until, write_settings

SLOW = {"SLOW_INIT_S": "6"}


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def goinfer_status(settings) -> list[str]:
    """`goinfer status`, as an operator runs it: the lines it prints."""
    result = subprocess.run([sys.executable, "-m", "goinfer", "status", "--yaml", str(settings)], env=process_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def slow_settings(tmp_path, redis_server):
    return write_settings(tmp_path, redis_server.address, Models=["sample_models:SlowInit"],
                          Server={"HeartbeatIntervalS": 0.5})


def test_ready_says_loading_until_the_dispatcher_serves(tmp_path, redis_server, processes):
    settings = slow_settings(tmp_path, redis_server)
    url = url_of(settings)
    processes.http(settings)
    status, absent = get_json(url + "/goinfer/status")
    assert absent["waiting_for"] == ["queue 0: no dispatcher"] and absent["dispatchers"] == []
    status, ready = get_json(url + "/ready")
    assert status == 503 and "loading_queues" not in ready

    server = processes.server(settings, wait=False, env=SLOW)
    server.wait_for_output("slow init started", 60)
    status, ready = get_json(url + "/ready")
    assert status == 503 and ready["ready"] is False
    assert ready["loading_queues"] == ready["missing_queues"]
    assert ready["waiting_for"][0].startswith("queue 0: loading, 0/2 workers ready, "), ready
    _, loading = get_json(url + "/goinfer/status")
    [beat] = loading["dispatchers"]
    assert beat["state"] == "loading" and beat["summary"].startswith("loading, 0/2 workers ready")
    assert loading["waiting_for"][0].startswith("queue 0: loading")
    shown = goinfer_status(settings)
    assert any(line.startswith(f"dispatcher {beat['host']}:{beat['pid']} queue 0: loading, 0/2 workers ready")
               for line in shown), shown
    assert any(line.startswith("waiting: queue 0: loading") for line in shown), shown

    wait_until(lambda: get_json(url + "/ready")[0] == 200, 60, "the dispatcher to serve")
    assert get_json(url + "/ready")[1] == {"ready": True, "redis": True, "missing_queues": []}
    _, serving = get_json(url + "/goinfer/status")
    [beat] = serving["dispatchers"]
    assert beat["state"] == "serving" and beat["summary"].startswith("serving, 2/2 workers")
    assert serving["waiting_for"] == []


def test_up_shows_what_it_waits_for_until_ready(tmp_path, redis_server, processes):
    settings = slow_settings(tmp_path, redis_server)
    up = processes.start("up", "--yaml", str(settings), env=SLOW)
    up.wait_for_output("waiting for dispatcher 0: loading, ", 60)
    up.wait_for_output(f"goinfer up: ready on {url_of(settings)}", 60)
    output = up.output
    assert output.index("slow init started") < output.index("goinfer up: ready")
    assert "Traceback" not in output


def test_status_without_a_tier_is_one_line_and_exit_1(tmp_path, redis_server):
    settings = slow_settings(tmp_path, redis_server)
    result = subprocess.run([sys.executable, "-m", "goinfer", "status", "--yaml", str(settings)], env=process_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    expected = f"goinfer: error: cannot reach {url_of(settings)}: Connection refused"
    assert result.stderr.strip() == expected, result.stderr
    assert "Traceback" not in result.stderr
