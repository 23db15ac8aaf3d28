"""Durable queues: what a Redis restart does to requests queued while no dispatcher runs.

With Redis's append-only file (appendfsync everysec) they survive a restart and are all served,
each once; without persistence they are gone, and their clients are answered QueueTimeout (9997)
when MessageTimeout runs out. `goinfer up --data-dir` gives its private Redis the former, and
`goinfer up` starts its private Redis again when it dies.

Executions are recorded in a file (sample_models.FileRecorder), outside the Redis under test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
from click.testing import CliRunner

from goinfer.cli import main as goinfer_main
from goinfer.client import Client, GoinferError
from goinfer.dispatcher.stream import READ_BLOCK_MS
from goinfer.queue import stream_name
from goinfer.redis_server import RedisServer, find_redis_server, start_redis_server

from conftest import APP_ID, APP_SECRET, ROOT, free_port, settings_of, start_redis, url_of, wait_until, write_settings

REQUESTS = 100
API_PATH = "/api/record-file"


def _settings(tmp_path: Path, address: str, message_timeout: float, **server: Any) -> Path:
    return write_settings(tmp_path, address, Models=["sample_models:FileRecorder"],
                          Server={"MessageTimeout": message_timeout, **server},
                          Customer={"ExecutionsFile": str(tmp_path / "executions.txt")})


def _config(client: redis.Redis, *names: str) -> dict[str, str]:
    return {name: str(client.config_get(name)[name]) for name in names}


def _executions(tmp_path: Path) -> Counter[str]:
    path = tmp_path / "executions.txt"
    return Counter(path.read_text().split()) if path.exists() else Counter()


def _stream(settings: Path) -> str:
    return stream_name(settings_of(settings)["Server"]["QueueName"], 0)


def _call(api: Client, i: int, sleep: float = 0) -> tuple[dict[str, Any] | GoinferError, float]:
    """The answer (or the error) to request number `i`, and the seconds it took."""
    started = time.monotonic()
    try:
        answer: dict[str, Any] | GoinferError = api.call(API_PATH, {"i": i, "sleep": sleep})
    except GoinferError as exc:
        answer = exc
    return answer, time.monotonic() - started


def _queue_requests(pool: ThreadPoolExecutor, settings: Path, client: redis.Redis,
                    ) -> list[Future[tuple[dict[str, Any] | GoinferError, float]]]:
    """REQUESTS signed requests in flight, returned once Redis holds every one of them."""
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256", timeout=180)
    futures = [pool.submit(_call, api, i) for i in range(REQUESTS)]
    stream = _stream(settings)
    wait_until(lambda: client.xlen(stream) == REQUESTS, 60, f"{REQUESTS} requests queued in {stream}")
    assert not any(future.done() for future in futures), "no dispatcher runs: nothing can be answered yet"
    return futures


def _restart(server: RedisServer, data_dir: Path | None) -> RedisServer:
    """SIGTERM, then a new redis-server on the same port (and data folder)."""
    server.stop()
    assert server.process.returncode == 0, "redis-server stops cleanly on SIGTERM"
    return start_redis_server(server.port, data_dir=data_dir)


def test_queued_requests_survive_a_redis_restart_with_an_append_only_file(tmp_path, processes):
    data_dir = tmp_path / "redis-data"
    server = start_redis_server(free_port(), data_dir=data_dir)
    try:
        assert _config(server.client(), "appendonly", "appendfsync", "save", "dir") == {
            "appendonly": "yes", "appendfsync": "everysec", "save": "", "dir": str(data_dir.resolve())}
        settings = _settings(tmp_path, server.address, 90)
        http = processes.http(settings)
        with ThreadPoolExecutor(REQUESTS) as pool:
            futures = _queue_requests(pool, settings, server.client())
            server = _restart(server, data_dir)
            assert server.client().xlen(_stream(settings)) == REQUESTS, "the append-only file kept the queue"
            processes.server(settings)
            results = [future.result() for future in futures]
        answers = [answer for answer, _ in results]
        errors = [answer for answer in answers if isinstance(answer, GoinferError)]
        assert not errors, errors[:5]
        # every client got its own answer, and every request ran exactly once
        assert [answer["i"] for answer in answers] == list(range(REQUESTS))  # type: ignore[index]
        assert all(answer["request_id"] == answer["requestId"] for answer in answers)  # type: ignore[index]
        ran = _executions(tmp_path)
        assert set(ran) == {answer["requestId"] for answer in answers}  # type: ignore[index]
        assert set(ran.values()) == {1}, [request for request, count in ran.items() if count > 1]
        # the HTTP tier saw Redis go and come back, and kept waiting without a traceback
        assert "is unreachable" in http.output and "is back" in http.output, http.output
        assert "Traceback" not in http.output
    finally:
        processes.cleanup()  # before Redis goes: the tiers stop promptly while it answers
        server.stop()


def test_without_persistence_queued_requests_are_lost_and_answered_queue_timeout(tmp_path, processes):
    message_timeout = 8.0
    server = start_redis()  # as the tests' Redis: appendonly no, save ""
    try:
        assert _config(server.client(), "appendonly", "save") == {"appendonly": "no", "save": ""}
        settings = _settings(tmp_path, server.address, message_timeout)
        processes.http(settings)
        with ThreadPoolExecutor(REQUESTS) as pool:
            futures = _queue_requests(pool, settings, server.client())
            server = _restart(server, None)
            assert not server.client().exists(_stream(settings)), "the restart emptied Redis"
            processes.server(settings)
            results = [future.result() for future in futures]
        # every client is answered, with QueueTimeout, once its MessageTimeout has run out
        assert Counter(answer.code if isinstance(answer, GoinferError) else 0 for answer, _ in results) == {
            9997: REQUESTS}
        assert min(seconds for _, seconds in results) >= message_timeout - 1.0
        # nothing ran, though the dispatcher serves the queue
        api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256", timeout=60)
        after = api.call(API_PATH, {"i": -1})
        assert _executions(tmp_path) == Counter({after["requestId"]: 1})
    finally:
        processes.cleanup()  # before Redis goes: the tiers stop promptly while it answers
        server.stop()


def test_the_sample_persistence_config_keeps_what_redis_holds_across_a_restart(tmp_path):
    """deploy/redis-durable.conf, included as its header says, gives what the tests above rely on."""
    port = free_port()
    config = tmp_path / "redis.conf"
    config.write_text(f'port {port}\nbind 127.0.0.1\ndir "{tmp_path}"\n'
                      f'include "{ROOT / "deploy" / "redis-durable.conf"}"\n')
    executable = find_redis_server()
    assert executable, "tests/run.sh installs redis-server"
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen([executable, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(lambda: _pings(client) or process.poll() is not None, 30, "redis-server to answer")
        assert process.poll() is None, "redis-server refused deploy/redis-durable.conf"
        return process

    process = start()
    try:
        assert _config(client, "appendonly", "appendfsync", "maxmemory-policy") == {
            "appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"}
        entry = client.xadd("queued", {"m": "a request"})
        process.terminate()
        assert process.wait(30) == 0
        process = start()
        assert client.xrange("queued") == [(entry, {b"m": b"a request"})]
    finally:
        process.terminate()
        process.wait(30)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _answers(api: Client) -> bool:
    try:
        return api.call(API_PATH, {"i": 0})["i"] == 0
    except (OSError, GoinferError):  # not listening yet, or Redis not back yet (9702)
        return False


def test_up_with_a_data_dir_keeps_its_redis_data_across_restarts(tmp_path, processes):
    port = free_port()
    data_dir = tmp_path / "up-data"
    settings = _settings(tmp_path, f"127.0.0.1:{port}", 10, MaxWorkers=1)
    probe = stream_name(settings_of(settings)["Server"]["QueueName"] + "probe-", 0)  # no dispatcher reads it
    client = redis.Redis(host="127.0.0.1", port=port)

    up = processes.start("up", "--yaml", str(settings), "--data-dir", str(data_dir))
    up.wait_for_output("started a private redis-server", 30)
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256")
    up.wait_while_running(lambda: _answers(api), 60, "answering")
    assert _config(client, "appendonly", "appendfsync", "dir") == {
        "appendonly": "yes", "appendfsync": "everysec", "dir": str(data_dir.resolve())}
    entry = client.xadd(probe, {"kept": "yes"})
    assert up.stop(signal.SIGTERM, timeout=60) == 0
    assert not _port_open(port)
    assert (data_dir / "appendonlydir").is_dir()

    again = processes.start("up", "--yaml", str(settings), "--data-dir", str(data_dir))
    again.wait_for_output("started a private redis-server", 30)
    assert f"data in {data_dir.resolve()}: append-only file, fsync every second" in again.output
    assert client.xrange(probe) == [(entry, {b"kept": b"yes"})]
    assert again.stop(signal.SIGTERM, timeout=60) == 0
    assert "Traceback" not in up.output + again.output


def test_up_refuses_a_data_dir_it_cannot_use_in_one_line(tmp_path, processes):
    (tmp_path / "a-file").write_text("")
    port = free_port()
    settings = _settings(tmp_path, f"127.0.0.1:{port}", 10)
    up = processes.start("up", "--yaml", str(settings), "--data-dir", str(tmp_path / "a-file" / "data"))
    assert up.process.wait(60) == 2, up.output
    errors = [line for line in up.output.splitlines() if line.startswith("goinfer: error:")]
    assert errors == [f"goinfer: error: cannot keep Redis's data in {tmp_path / 'a-file' / 'data'}: "
                      "Not a directory"], up.output
    assert "Traceback" not in up.output and not _port_open(port)


def test_up_says_that_a_redis_already_running_keeps_its_own_data(tmp_path, redis_server, processes):
    settings = _settings(tmp_path, redis_server.address, 10, MaxWorkers=1)
    up = processes.start("up", "--yaml", str(settings), "--data-dir", str(tmp_path / "unused"))
    up.wait_for_output(f"--data-dir {tmp_path / 'unused'} is not used: redis at {redis_server.address} already "
                       "answers", 60)
    assert up.stop(signal.SIGTERM, timeout=60) == 0
    assert not (tmp_path / "unused").exists()


def test_up_help_says_what_is_kept():
    result = CliRunner().invoke(goinfer_main, ["up", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "--data-dir DIR" in text and "append-only file, fsynced every second" in text
    assert "Without --data-dir it persists nothing" in text


def _let_the_worker_go_idle() -> None:
    """Wait until the worker that answered last is back in its plain blocking read: a worker
    reads on in the round trip that answers (blocking up to READ_BLOCK_MS), and the restart
    tests mean to restart Redis under an idle worker, not during that read (which
    test_an_answered_request_does_not_run_again_after_a_redis_restart covers).
    """
    time.sleep(READ_BLOCK_MS / 1000 + 0.5)


def test_up_starts_its_redis_again_after_a_crash_and_serves_what_was_queued(tmp_path, processes):
    """kill -9 of the private redis-server while requests wait in it: `up` starts it again from
    the data folder, the tiers reconnect by themselves, and every request is served."""
    port = free_port()
    # ClaimIdleMs above the outage, so that no request is taken for abandoned and run again
    settings = _settings(tmp_path, f"127.0.0.1:{port}", 60, MaxWorkers=1, ClaimIdleMs=15000)
    client = redis.Redis(host="127.0.0.1", port=port)
    up = processes.start("up", "--yaml", str(settings), "--data-dir", str(tmp_path / "up-data"))
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256", timeout=120)
    up.wait_while_running(lambda: _answers(api), 60, "answering")
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_call, api, i, 1.0) for i in range(1, 7)]  # one worker: 6 s of work
        # every request queued (a request still on its way when Redis dies rightly gets 9702,
        # "not queued"): the answered ones have left the stream, the others wait in it
        wait_until(lambda: client.xlen(_stream(settings)) + sum(f.done() for f in futures) >= 6, 30,
                   "all six requests queued in Redis")
        os.kill(int(client.info("server")["process_id"]), signal.SIGKILL)
        results = [future.result() for future in futures]
    answers = [answer for answer, _ in results]
    assert not [answer for answer in answers if isinstance(answer, GoinferError)], up.output
    assert [answer["i"] for answer in answers] == list(range(1, 7))  # type: ignore[index]
    ran = _executions(tmp_path)
    counts = [ran[answer["requestId"]] for answer in answers]  # type: ignore[index]
    # at-least-once: the request running when Redis died may run again, the waiting ones run once
    assert min(counts) == 1 and sum(counts) <= len(counts) + 1, counts
    assert "the private redis-server (pid" in up.output and "was killed by signal 9 (SIGKILL)" in up.output
    assert "starting the private redis-server again, with the queue its append-only file kept" in up.output
    assert up.stop(signal.SIGTERM, timeout=60) == 0
    assert "Traceback" not in up.output


def test_up_without_a_data_dir_starts_an_empty_redis_again_and_gives_up_on_one_that_keeps_dying(tmp_path, processes):
    port = free_port()
    settings = _settings(tmp_path, f"127.0.0.1:{port}", 10, MaxWorkers=1)
    client = redis.Redis(host="127.0.0.1", port=port)
    up = processes.start("up", "--yaml", str(settings))
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256")
    up.wait_while_running(lambda: _answers(api), 60, "answering")
    _let_the_worker_go_idle()

    def kill_redis(nth: int) -> None:
        """SIGKILL the nth redis-server `up` started, once `up` has seen it answer."""
        wait_until(lambda: up.output.count("started a private redis-server") >= nth, 30,
                   f"goinfer up to start redis-server number {nth}")
        pid = int(client.info("server")["process_id"])
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: f"the private redis-server (pid {pid}) was killed" in up.output, 30,
                   f"goinfer up to notice that redis-server {pid} was killed")

    kill_redis(1)
    up.wait_for_output("starting the private redis-server again, empty (no --data-dir)", 30)
    wait_until(lambda: _answers(api), 60, "goinfer up to answer again")
    _let_the_worker_go_idle()
    for nth in range(2, 5):  # 4 deaths within a minute: this Redis will not stay up
        kill_redis(nth)
    assert up.process.wait(90) == 1, up.output
    assert "the private redis-server died 4 times within 60s; stopping everything" in up.output
    assert not _port_open(port) and "Traceback" not in up.output


def test_an_answered_request_does_not_run_again_after_a_redis_restart(tmp_path, processes):
    data_dir = tmp_path / "redis-data"
    server = start_redis_server(free_port(), data_dir=data_dir)
    try:
        settings = _settings(tmp_path, server.address, 30, MaxWorkers=1)
        processes.http(settings)
        dispatcher = processes.server(settings)
        api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256", timeout=60)
        answer = api.call(API_PATH, {"i": 1})
        server = _restart(server, data_dir)  # within READ_BLOCK_MS of the answer
        dispatcher.wait_for_output("answers again", 30)
        _let_the_worker_go_idle()
        assert _executions(tmp_path) == Counter({answer["requestId"]: 1})
    finally:
        processes.cleanup()
        server.stop()


def test_a_worker_stopped_while_redis_is_away_stops_without_spinning(tmp_path, processes):
    """A worker holding a request when Redis dies and SIGTERM arrives leaves the request pending
    in Redis and exits: it neither waits Redis out nor loops on the failing send."""
    server = start_redis_server(free_port())
    try:
        settings = _settings(tmp_path, server.address, 30, MaxWorkers=1, ShutdownGraceS=20)
        processes.http(settings)
        dispatcher = processes.server(settings)
        api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256", timeout=60)
        with ThreadPoolExecutor(1) as pool:
            pool.submit(_call, api, 1, 2.0)  # the model holds it for 2 s
            wait_until(lambda: server.client().xpending(_stream(settings), "goinfer")["pending"] == 1, 10,
                       "the worker holding the request")
            server.stop()
            started = time.monotonic()
            assert dispatcher.stop(signal.SIGTERM, timeout=15) == 0
            assert time.monotonic() - started < 10, "stopped without waiting out the grace"
        assert "stopping while redis fails" in dispatcher.output
        assert len(dispatcher.output.splitlines()) < 100, "one line per failure, not a loop"
        assert _executions(tmp_path) == Counter({_only_id(tmp_path): 1})
    finally:
        processes.cleanup()
        server.stop()


def _only_id(tmp_path: Path) -> str:
    [request_id] = _executions(tmp_path)
    return request_id
