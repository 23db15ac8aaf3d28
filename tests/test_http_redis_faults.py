"""The HTTP tier against a Redis that goes away or refuses its credentials, with real processes.

An outage is temporary: requests get SendMsgFail (9702) meanwhile, the log says "unreachable"
once and "back" once, and the tier serves again by itself. Refused credentials are permanent:
`goinfer http` stops with one line naming the setting and exit status 2, never a traceback and
never the password, at start or when Redis starts refusing later, with or without --workers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from goinfer.client import Client, GoinferError

from conftest import (
    APP_ID,
    APP_SECRET,
    GoinferProcess,
    ProcessFactory,
    RedisServer,
    start_redis,
    stop_redis,
    url_of,
    wait_until,
    write_settings,
)

MODELS = ["goinfer.models.echo:Echo"]
RIGHT_PASSWORD = "right-Pa55-7f3c9e"
WRONG_PASSWORD = "wrong-Pa55-d41b8a"
EXIT_CONFIG = 2
START_TIMEOUT_S = 60  # process start-up on a loaded 2-core machine


def api(settings: Path) -> Client:
    return Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256", timeout=30)


def code_of(client: Client, data: dict) -> int:
    try:
        client.call("/api/echo", data)
    except GoinferError as exc:
        return exc.code
    return 0


def exit_status(proc: GoinferProcess, timeout: float = START_TIMEOUT_S) -> int:
    wait_until(lambda: proc.process.poll() is not None, timeout, f"{proc.args} to exit")
    return proc.process.returncode


def assert_one_refusal_line(output: str, redis: RedisServer, reason: str) -> None:
    errors = [line for line in output.splitlines() if line.startswith("goinfer: error:")]
    assert len(errors) == 1, output
    assert f"redis at {redis.address} {reason}" in errors[0], errors[0]
    assert "Traceback" not in output, output
    assert RIGHT_PASSWORD not in output and WRONG_PASSWORD not in output, output


@pytest.fixture
def locked_redis():
    server = start_redis(password=RIGHT_PASSWORD)
    yield server
    stop_redis(server)


@pytest.mark.parametrize("password, reason", [(WRONG_PASSWORD, "refuses Server.RedisPasswd:"),
                                              ("", "requires a password and Server.RedisPasswd is empty (NOAUTH)")])
@pytest.mark.parametrize("workers", [1, 2])
def test_refused_password_at_start_is_one_line_and_exit_2(tmp_path, processes, locked_redis, password, reason,
                                                          workers):
    settings = write_settings(tmp_path, locked_redis.address, Models=MODELS, Server={"RedisPasswd": password})
    http = processes.start("http", "--yaml", str(settings), "--workers", str(workers))
    assert exit_status(http) == EXIT_CONFIG, http.output
    assert_one_refusal_line(http.output, locked_redis, reason)
    assert str(settings) in http.output  # the line names the settings file too


def serving_tier(tmp_path: Path, processes: ProcessFactory, redis: RedisServer,
                 workers: int) -> tuple[Path, GoinferProcess]:
    settings = write_settings(tmp_path, redis.address, Models=MODELS, Server={"RedisPasswd": RIGHT_PASSWORD})
    http = processes.http(settings) if workers == 1 else processes.start("http", "--yaml", str(settings),
                                                                         "--workers", str(workers))
    processes.server(settings)

    def answers() -> bool:
        try:
            return code_of(api(settings), {"warm": True}) == 0
        except OSError:  # --workers: not listening yet
            return False

    wait_until(answers, START_TIMEOUT_S, "the tier to answer", interval=0.5)
    return settings, http


@pytest.mark.parametrize("workers", [1, 2])
def test_password_refused_later_stops_the_tier_with_exit_2(tmp_path, processes, locked_redis, workers):
    settings, http = serving_tier(tmp_path, processes, locked_redis, workers)
    admin = locked_redis.client()
    admin.config_set("requirepass", WRONG_PASSWORD)  # the tier's password is now the wrong one
    admin.execute_command("CLIENT", "KILL", "TYPE", "normal")  # its connections log in again
    assert exit_status(http) == EXIT_CONFIG, http.output
    assert "Traceback" not in http.output, http.output
    assert RIGHT_PASSWORD not in http.output and WRONG_PASSWORD not in http.output, http.output
    assert f"redis at {locked_redis.address} refuses Server.RedisPasswd:" in http.output, http.output
    if workers == 1:
        assert_one_refusal_line(http.output, locked_redis, "refuses Server.RedisPasswd:")


def test_acl_refusal_of_an_enqueue_answers_9702_and_stops_the_tier(tmp_path, processes, locked_redis):
    settings, http = serving_tier(tmp_path, processes, locked_redis, workers=1)
    admin = locked_redis.client()
    admin.execute_command("ACL", "SETUSER", "default", "-evalsha")  # the enqueue script is refused: NOPERM
    assert code_of(api(settings), {"refused": True}) == 9702
    assert exit_status(http) == EXIT_CONFIG, http.output
    assert_one_refusal_line(http.output, locked_redis, "denies a command goinfer needs to the user of "
                                                       "Server.RedisPasswd (check its ACL): NOPERM")
    assert "NOPERM" in http.output


def test_redis_outage_is_logged_once_and_the_tier_recovers(tmp_path, processes):
    redis = start_redis()
    try:
        settings = write_settings(tmp_path, redis.address, Models=MODELS)
        http = processes.http(settings)
        processes.server(settings)
        client = api(settings)
        assert code_of(client, {"before": True}) == 0

        stop_redis(redis)
        during: list[int] = []
        stop = threading.Event()

        def trickle() -> None:
            while not stop.is_set():
                during.append(code_of(client, {"during": True}))
                time.sleep(0.2)

        thread = threading.Thread(target=trickle)
        thread.start()
        time.sleep(6)
        stop.set()
        thread.join(60)
        redis = start_redis(redis.port)

        assert len(during) >= 5 and set(during) == {9702}, during
        wait_until(lambda: code_of(client, {"after": True}) == 0, 30, "requests to succeed after Redis is back")
        time.sleep(2.5)  # a reader retry in flight would log by now (its back-off is at most 2 s)
        output = http.output
        assert output.count("is unreachable") == 1, output
        assert f"redis at {redis.address} is unreachable" in output, output
        assert output.count(f"redis at {redis.address} is back") == 1, output
        assert "reading replies failed" not in output and "cannot queue request" not in output, output
        assert http.process.poll() is None and "Traceback" not in output, output
    finally:
        stop_redis(redis)
