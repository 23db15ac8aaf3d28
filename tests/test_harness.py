"""The shared harness itself: goinfer.redis_server (also `goinfer up`'s private Redis) and goinfer.testing."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import pytest
import redis

from goinfer.redis_server import RedisServerError, find_redis_server, start_redis_server
from goinfer.testing import (
    TEST_CREDENTIALS,
    Credentials,
    HarnessError,
    ProcessFactory,
    free_port,
    merge_settings,
    url_of,
    wait_until,
)

from conftest import start_redis, stop_redis, write_settings


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_private_redis_requires_its_password_and_keeps_it_off_the_command_line():
    password = 'a pass "word" with \\ and spaces'
    server = start_redis_server(free_port(), password=password)
    try:
        assert server.client().ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        command_line = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert b"pass" not in command_line  # `ps` shows every user the command line
        assert server.client().config_get("save") == {"save": ""}  # no persistence
    finally:
        server.stop()
    assert not _port_open(server.port)
    assert not os.path.exists(server.folder)


def test_a_port_another_redis_holds_is_an_error_not_a_start(redis_server):
    with pytest.raises(RedisServerError) as failed:
        start_redis_server(redis_server.port)
    message = str(failed.value)
    assert f"did not start on 127.0.0.1:{redis_server.port}" in message and "\n" not in message
    assert "in use" in message  # redis-server's own reason
    assert redis_server.client().ping()


def test_no_redis_server_anywhere_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    if find_redis_server() is not None:
        pytest.skip("the goinfer[redis] extra's redis-server is installed")
    with pytest.raises(RedisServerError, match=r"no redis-server found: install one .* 'goinfer\[redis\]'"):
        start_redis_server(free_port())


def test_up_starts_its_redis_with_the_password_of_a_redis_url(tmp_path, processes):
    """RedisServer may carry the password in the URL: the private server must require that one."""
    port = free_port()
    settings = write_settings(tmp_path, f"redis://:url%20pw@127.0.0.1:{port}", Server={"RedisPasswd": ""})
    up = processes.start("up", "--yaml", str(settings))
    up.wait_for_output("started a private redis-server", 30)
    api = TEST_CREDENTIALS.client(url_of(settings))
    up.wait_while_running(lambda: _echo_answers(api), 60, "answering")
    assert redis.Redis(host="127.0.0.1", port=port, password="url pw").ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port).ping()
    assert up.stop(signal.SIGTERM, timeout=60) == 0
    assert not _port_open(port)
    assert "url pw" not in up.output and "url%20pw" not in up.output


def _echo_answers(api) -> bool:
    try:
        return api.call("/api/echo", {"a": 1})["a"] == 1
    except OSError:
        return False


def test_up_does_not_start_a_plain_redis_for_a_tls_address(tmp_path, processes):
    settings = write_settings(tmp_path, f"rediss://127.0.0.1:{free_port()}")
    up = processes.start("up", "--yaml", str(settings))
    assert up.process.wait(60) == 1
    assert "not TLS (rediss://)" in up.output
    assert "started a private redis-server" not in up.output and "Traceback" not in up.output


@pytest.mark.parametrize("address", ["redis+sentinel://127.0.0.1:{port}/mymaster", "redis+cluster://127.0.0.1:{port}"])
def test_up_does_not_start_a_plain_redis_for_a_sentinel_or_cluster_address(tmp_path, processes, address):
    settings = write_settings(tmp_path, address.format(port=free_port()))
    up = processes.start("up", "--yaml", str(settings))
    assert up.process.wait(60) == 1, up.output
    assert "not for a Sentinel service or a Cluster" in up.output
    assert "started a private redis-server" not in up.output and "Traceback" not in up.output


def test_up_stops_with_one_line_and_status_2_when_redis_refuses_the_password(tmp_path, processes):
    """A Redis that answers but refuses RedisPasswd is a settings problem: no private Redis, no
    children left retrying, one line naming the setting (never the password)."""
    locked = start_redis(password="the-right-one")
    try:
        settings = write_settings(tmp_path, locked.address, Server={"RedisPasswd": "a-wrong-one"})
        up = processes.start("up", "--yaml", str(settings))
        assert up.process.wait(60) == 2, up.output
        errors = [line for line in up.output.splitlines() if line.startswith("goinfer: error:")]
        assert len(errors) == 1 and f"redis at {locked.address} refuses Server.RedisPasswd" in errors[0], up.output
        assert "Traceback" not in up.output and "started a private redis-server" not in up.output
        assert "a-wrong-one" not in up.output and "the-right-one" not in up.output
    finally:
        stop_redis(locked)


def test_a_process_that_exits_early_fails_the_wait_with_its_output(tmp_path):
    factory = ProcessFactory(tmp_path)
    try:
        proc = factory.start(program=[sys.executable, "-c", "print('bad settings'); raise SystemExit(3)"])
        with pytest.raises(HarnessError, match=r"exited \(3\) before printing 'ready':\nbad settings"):
            proc.wait_for_output("ready", timeout=30)
    finally:
        factory.cleanup()


def test_a_wait_that_times_out_shows_what_the_process_printed_while_it_waited(tmp_path):
    """The message is read at the timeout: output printed during the wait is in it."""
    factory = ProcessFactory(tmp_path)
    try:
        proc = factory.start(program=[sys.executable, "-c",
                                      "import time; time.sleep(0.5); print('late line', flush=True); time.sleep(600)"])
        assert "late line" not in proc.output
        with pytest.raises(HarnessError, match=r"timed out after 2s waiting for answering from .*\nlate line"):
            proc.wait_while_running(lambda: False, 2, "answering")
    finally:
        factory.cleanup()


def test_cleanup_stops_what_the_factory_started_and_the_children_it_left(tmp_path):
    factory = ProcessFactory(tmp_path)
    # A parent that ignores SIGTERM and has a child: cleanup must not leave either behind.
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
              "print(child.pid, flush=True); time.sleep(600)")
    proc = factory.start(program=[sys.executable, "-c", script])
    child_pid = int(wait_until(lambda: proc.output.strip(), 30, "the child's pid"))
    factory.cleanup(grace_s=0.5)
    assert proc.process.poll() is not None
    wait_until(lambda: not _alive(child_pid), 10, "the orphaned child to be killed")


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in status


def test_merge_settings_updates_sections_and_replaces_the_rest():
    base = {"API": {"Port": 1, "Addr": "127.0.0.1"}, "Models": ["a:A"]}
    merged = merge_settings(base, {"API": {"Port": 2}, "Models": ["b:B"], "ErrCode": {"X": 1}})
    assert merged == {"API": {"Port": 2, "Addr": "127.0.0.1"}, "Models": ["b:B"], "ErrCode": {"X": 1}}
    assert base["API"] == {"Port": 1, "Addr": "127.0.0.1"}  # the defaults are not changed


def test_fresh_credentials_are_new_and_sign(tmp_path, redis_server, processes):
    fresh = Credentials.fresh()
    assert fresh != Credentials.fresh() and fresh.app_id != TEST_CREDENTIALS.app_id
    settings = write_settings(tmp_path, redis_server.address, Models=["goinfer.models.echo:Echo"],
                              API={"AppIdSecret": {fresh.app_id: fresh.app_secret},
                                   "SM2PrivateKey": fresh.sm2_private_key})
    processes.http(settings)
    processes.server(settings)
    assert fresh.client(url_of(settings), sign_type="SM2").call("/api/echo", {"n": 7})["n"] == 7
