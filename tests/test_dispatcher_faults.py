"""`goinfer server N` when things go wrong around it, with real processes: Redis absent or going
away, Redis refusing the credentials, a model that kills its worker, a stop while workers start."""

from __future__ import annotations

import os
import re
import signal
import sys
import uuid
from collections import Counter
from datetime import datetime
from pathlib import Path

import pytest

from goinfer.client import Client, GoinferError
from goinfer.queue import Job, stream_name

from conftest import (
    APP_ID,
    APP_SECRET,
    free_port,
    settings_of,
    start_redis,
    stop_redis,
    url_of,
    wait_until,
    write_settings,
)

PASSWORD = "Dispatcher-Test-Password-41"
LIMITED_USER, LIMITED_PASSWORD = "goinfer-limited", "Limited-User-Password-77"

# One back-off step of a Redis outage, as the dispatcher logs it.
STEP = re.compile(r"^(?P<at>\S+ \S+) WARNING \S+\[(?P<pid>\d+)\]: redis at \S+ unavailable \(.*\); "
                  r"(?P<who>.+) retrying in (?P<delay>[\d.]+)s$", re.M)


def client(url: str) -> Client:
    return Client(url, APP_ID, APP_SECRET, sign_type="SHA256", timeout=30)


def answers(api: Client) -> bool:
    try:
        return api.call("/api/echo", {"a": 1})["a"] == 1
    except (GoinferError, OSError):
        return False


def logged_at(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")


def test_a_dispatcher_waits_for_redis_quietly_and_serves_when_it_comes(tmp_path, processes):
    port = free_port()
    settings = write_settings(tmp_path, f"127.0.0.1:{port}", Server={"MaxWorkers": 2})
    server = processes.server(settings, wait=False)
    wait_until(lambda: len(STEP.findall(server.output)) >= 4, 60, "four back-off steps")
    assert "ready" not in server.output
    redis = start_redis(port)
    try:
        server.wait_for_output("dispatcher for queue 0 ready", 60)
        output = server.output
        steps = list(STEP.finditer(output))
        # one line per step for the whole dispatcher, on the back-off, before Redis came
        assert [float(s["delay"]) for s in steps] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0][:len(steps)]
        assert len(steps) <= 8 and {s["who"] for s in steps} == {"dispatcher"}
        assert output.index("answers again") < output.index("dispatcher for queue 0 ready")
        assert "Traceback" not in output and "died" not in output
        processes.http(settings)
        api = client(url_of(settings))
        assert answers(api)

        # Redis goes away later: the workers wait, one of them says so, nobody restarts.
        before = len(server.output)
        stop_redis(redis)
        wait_until(lambda: len(STEP.findall(server.output[before:])) >= 3, 60, "three back-off steps")
        redis = start_redis(port)  # empty: the groups are created again
        wait_until(lambda: answers(api), 60, "the dispatcher to serve again")
        later = server.output[before:]
        reporters = Counter(s["pid"] for s in STEP.finditer(later))
        assert all(s["who"].startswith("worker ") for s in STEP.finditer(later))
        # Two workers that see the outage at the same instant may both log its first step.
        assert sorted(reporters.values())[:-1] in ([], [1]), later
        assert "Traceback" not in server.output and "died" not in server.output
        assert server.process.poll() is None
    finally:
        stop_redis(redis)


@pytest.fixture(scope="module")
def locked_redis():
    server = start_redis(password=PASSWORD)
    # A user that may connect but not use streams: what a too-narrow ACL looks like.
    server.client().execute_command("ACL", "SETUSER", LIMITED_USER, "on", f">{LIMITED_PASSWORD}", "~*",
                                    "+@connection")
    yield server
    stop_redis(server)


@pytest.mark.parametrize("case", ["wrong password", "no password", "acl user"])
def test_redis_refusing_the_dispatcher_is_one_line_and_exit_2(tmp_path, locked_redis, processes, case):
    address = f"127.0.0.1:{locked_redis.port}"
    server_settings = {
        "wrong password": {"RedisServer": address, "RedisPasswd": "Wrong-Password-" + uuid.uuid4().hex},
        "no password": {"RedisServer": address, "RedisPasswd": ""},
        "acl user": {"RedisServer": f"redis://{LIMITED_USER}:{LIMITED_PASSWORD}@{address}", "RedisPasswd": ""},
    }[case]
    settings = write_settings(tmp_path, address, Server=server_settings)
    server = processes.server(settings, wait=False)
    assert server.process.wait(60) == 2, server.output
    output = server.output
    [error] = [line for line in output.splitlines() if "error" in line.lower()]
    expected = {"wrong password": "refuses Server.RedisPasswd: ",
                "no password": "requires a password and Server.RedisPasswd is empty",
                "acl user": "to the user of Server.RedisServer (check its ACL): NOPERM "}[case]
    assert error.startswith(f"goinfer: error: redis at {address} ") and expected in error, output
    assert "Traceback" not in output and "WARNING" not in output
    for secret in (PASSWORD, LIMITED_PASSWORD, server_settings["RedisPasswd"] or PASSWORD):
        assert secret not in output


def test_a_worker_that_keeps_dying_stops_the_dispatcher(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=["sample_models:Suicidal"],
                              Server={"MaxWorkers": 1, "MaxDeliveries": 100, "WorkerRestartLimit": 3,
                                      "WorkerRestartWindowS": 600})
    server = processes.server(settings)
    stream = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
    request = Job(f"20260101{uuid.uuid4().hex}", "/api/suicide", {}, "test-reply-" + uuid.uuid4().hex, 4102444800.0)
    redis_server.client().xadd(stream, {"m": request.encode()})  # each restarted worker runs it again, and dies
    assert server.process.wait(120) == 1, server.output
    output = server.output
    deaths = re.findall(r"^(\S+ \S+) ERROR \S+: worker 0 \(pid \d+\) died with exit code 1(?:; restarting it in "
                        r"([\d.]+)s)?$", output, re.M)
    assert [delay for _, delay in deaths] == ["0.1", "0.2", "0.4", ""], output
    for (at, delay), (next_at, _) in zip(deaths, deaths[1:], strict=False):  # the restarts wait their back-off
        assert (logged_at(next_at) - logged_at(at)).total_seconds() >= float(delay)
    assert "dispatcher stopping: 4 worker deaths within 600s, more than Server.WorkerRestartLimit (3" in output
    assert "Traceback" not in output


SLOW_MAIN = '''
"""A user's program whose module is slow to import (as with TensorFlow at the top), in workers too:
`spawn` imports the parent's main module again in every worker, before any goinfer code runs there."""
import os
import time

import goinfer.cli

if __name__ != "__main__":
    print(f"slow import started in {os.getpid()}", flush=True)
    time.sleep(60)

if __name__ == "__main__":
    goinfer.cli.main()
'''


@pytest.mark.parametrize("stage, how", [("import", "ctrl-c"), ("init", "ctrl-c"), ("init", "sigterm")])
def test_stopping_while_workers_start_is_quiet(tmp_path, redis_server, processes, stage, how):
    if stage == "import":
        program = Path(tmp_path) / "slow_main.py"
        program.write_text(SLOW_MAIN)
        settings = write_settings(tmp_path, redis_server.address, Server={"MaxWorkers": 2})
        server = processes.start("server", "0", "--yaml", str(settings), program=[sys.executable, str(program)])
        marker = "slow import started"
    else:
        settings = write_settings(tmp_path, redis_server.address, Models=["sample_models:SlowInit"],
                                  Server={"MaxWorkers": 2})
        server = processes.server(settings, wait=False)
        marker = "slow init started"
    wait_until(lambda: server.output.count(marker) == 2 or server.process.poll() is not None, 60,
               f"both workers in their slow {stage}")
    if how == "ctrl-c":
        os.killpg(server.process.pid, signal.SIGINT)  # what a terminal does: the whole process group
    else:
        server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0, server.output
    output = server.output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert "dispatcher for queue 0 stopped" in output and "ready" not in output
