"""Fault injection with real processes: every accepted request gets exactly one answer.

Each test asserts on every request's answer, not on a sample.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from goinfer.client import Client, GoinferError, signed_body
from goinfer.queue import dead_letter_stream, stream_name

from conftest import (
    APP_ID,
    APP_SECRET,
    free_port,
    post_raw,
    settings_of,
    start_redis,
    stop_redis,
    url_of,
    wait_until,
    write_settings,
)

MODELS = ["sample_models:Recorder", "sample_models:Crasher", "goinfer.models.echo:Echo"]


def client(url: str, timeout: float = 60) -> Client:
    return Client(url, APP_ID, APP_SECRET, sign_type="SHA256", timeout=timeout)


def outcome(api: Client, path: str, data: dict):
    try:
        return api.call(path, data)
    except GoinferError as exc:
        return exc


def executions(redis_client, settings) -> Counter:
    key = settings_of(settings)["Server"]["QueueName"] + "executions"
    return Counter(item.decode() for item in redis_client.lrange(key, 0, -1))


def test_kill_9_of_a_dispatcher_loses_nothing(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS,
                              Server={"MaxWorkers": 4, "MessageTimeout": 40, "ClaimIdleMs": 1500})
    processes.http(settings)
    victim = processes.server(settings, env={"GOINFER_TEST_TAG": "victim"})
    processes.server(settings, env={"GOINFER_TEST_TAG": "survivor"})
    api = client(url_of(settings))
    with ThreadPoolExecutor(60) as pool:
        futures = [pool.submit(outcome, api, "/api/record", {"i": i, "sleep": 0.25}) for i in range(150)]
        time.sleep(1.5)
        victim.kill_group()  # kill -9 of the whole dispatcher: supervisor and its workers
        answers = [f.result() for f in futures]
    errors = [a for a in answers if isinstance(a, GoinferError)]
    assert not errors, errors[:5]
    ran = executions(redis_server.client(), settings)
    ids = [a["requestId"] for a in answers]
    assert set(ids) <= set(ran), "every answered request ran"
    assert all(ran[i] >= 1 for i in ids)
    assert Counter(a["tag"] for a in answers)["survivor"] > 0
    # at-least-once: only requests the victim was running when killed may have run twice
    assert sum(count - 1 for count in ran.values()) <= 8


def test_requests_wait_for_a_dispatcher(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS, Server={"MessageTimeout": 30})
    processes.http(settings)
    api = client(url_of(settings))
    with ThreadPoolExecutor(40) as pool:
        futures = [pool.submit(outcome, api, "/api/record", {"i": i}) for i in range(40)]
        time.sleep(1.5)
        assert not any(f.done() for f in futures)
        processes.server(settings)
        answers = [f.result() for f in futures]
    assert all(not isinstance(a, GoinferError) for a in answers), answers
    assert sorted(executions(redis_server.client(), settings).values()) == [1] * 40


def test_poison_request_is_dead_lettered_and_others_are_unharmed(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS,
                              Server={"MaxWorkers": 2, "MessageTimeout": 30, "ClaimIdleMs": 1000,
                                      "MaxDeliveries": 3})
    processes.http(settings)
    server = processes.server(settings)
    api = client(url_of(settings))
    with ThreadPoolExecutor(16) as pool:
        poison = pool.submit(outcome, api, "/api/crash", {"crash": True})
        normal = [pool.submit(outcome, api, "/api/crash", {"sleep": 0.05}) for _ in range(40)]
        result = poison.result()
        others = [f.result() for f in normal]
    assert isinstance(result, GoinferError) and result.code == 9705, result
    assert all(not isinstance(o, GoinferError) and o["ok"] for o in others), others
    assert server.output.count("died with exit code 17") == 3
    dead_stream = dead_letter_stream(stream_name(settings_of(settings)["Server"]["QueueName"], 0))
    dead = redis_server.client().xrange(dead_stream)
    assert len(dead) == 1 and b"delivered 3 times" in dead[0][1][b"reason"]
    assert b'"crash":true' in dead[0][1][b"m"]
    # never tried again: the service keeps answering and nothing dies any more
    assert api.call("/api/crash", {})["ok"] is True
    time.sleep(2.5)
    assert server.output.count("died with exit code") == 3


def test_redis_restart_under_load_gives_clean_codes_and_recovers(tmp_path, processes):
    redis = start_redis()
    try:
        settings = write_settings(tmp_path, redis.address, Models=MODELS, Server={"MessageTimeout": 3})
        http = processes.http(settings)
        server = processes.server(settings)
        api = client(url_of(settings), timeout=30)
        results: list = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                results.append(outcome(api, "/api/echo", {"x": 1}))

        threads = [threading.Thread(target=load) for _ in range(6)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        stop_redis(redis)
        time.sleep(1.5)
        redis = start_redis(redis.port)
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(30)
        codes = Counter(r.code if isinstance(r, GoinferError) else 0 for r in results)
        assert set(codes) <= {0, 9702, 9997}, codes
        assert codes[0] > 0 and (codes[9702] + codes[9997]) > 0, codes
        wait_until(lambda: not isinstance(outcome(api, "/api/echo", {"x": 2}), GoinferError), 20,
                   "the service to recover after Redis came back")
        assert http.process.poll() is None and server.process.poll() is None
        assert "Traceback" not in http.output + server.output
    finally:
        stop_redis(redis)


def test_sigterm_under_load_loses_nothing(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS,
                              API={"ShutdownDrainS": 1.0},
                              Server={"MaxWorkers": 2, "MessageTimeout": 30, "ShutdownGraceS": 20})
    http = processes.http(settings)
    first = processes.server(settings, env={"GOINFER_TEST_TAG": "first"})
    processes.server(settings, env={"GOINFER_TEST_TAG": "second"})
    api = client(url_of(settings))
    with ThreadPoolExecutor(30) as pool:
        futures = [pool.submit(outcome, api, "/api/record", {"i": i, "sleep": 0.2}) for i in range(60)]
        time.sleep(1.0)
        first.process.send_signal(signal.SIGTERM)
        answers = [f.result() for f in futures]
        assert first.process.wait(30) == 0
        # Now the HTTP tier, while its requests are in flight.
        futures = [pool.submit(outcome, api, "/api/record", {"i": i, "sleep": 0.3}) for i in range(20)]
        time.sleep(0.5)
        http.process.send_signal(signal.SIGTERM)
        answers += [f.result() for f in futures]
    assert http.process.wait(30) == 0
    assert all(not isinstance(a, GoinferError) for a in answers), [a for a in answers if isinstance(a, GoinferError)]
    ran = executions(redis_server.client(), settings)
    assert sorted(ran[a["requestId"]] for a in answers) == [1] * 80  # exactly once
    assert "Traceback" not in first.output + http.output


def test_full_queue_is_refused_at_once(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS,
                              Server={"MaxQueueLength": 5, "MessageTimeout": 5})
    processes.http(settings)  # no dispatcher: requests wait in the stream
    api = client(url_of(settings))
    with ThreadPoolExecutor(5) as pool:
        waiting = [pool.submit(outcome, api, "/api/echo", {"i": i}) for i in range(5)]
        stream = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
        wait_until(lambda: redis_server.client().xlen(stream) == 5, 10, "five waiting requests")
        started = time.monotonic()
        refused = outcome(api, "/api/echo", {"i": 99})
        assert time.monotonic() - started < 1.0
        assert isinstance(refused, GoinferError) and refused.code == 9704
        assert all(f.result().code == 9997 for f in waiting)


def test_replayed_signature_is_refused_when_asked(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS, API={"RejectReplay": True})
    processes.http(settings)
    processes.server(settings)
    url = url_of(settings) + "/api/echo"
    body = signed_body({"pay": 10}, app_id=APP_ID, app_secret=APP_SECRET, sign_type="SHA256")
    assert post_raw(url, body)[1]["code"] == 0
    assert post_raw(url, body)[1]["code"] == 9807
    fresh = signed_body({"pay": 10}, app_id=APP_ID, app_secret=APP_SECRET, sign_type="SM2",
                        sm2_private_key="JShsBOJL0RgPAoPttEB1hgtPAvCikOl0V1oTOYL7k5U=")
    assert post_raw(url, fresh)[1]["code"] == 0


def test_slow_body_times_out(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS, API={"BodyReadTimeoutS": 1})
    processes.http(settings)
    port = settings_of(settings)["API"]["Port"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"appId\":")
        started = time.monotonic()
        answer = sock.recv(65536)
    assert 0.9 < time.monotonic() - started < 5
    assert answer.startswith(b"HTTP/1.1 408") and b'"code":9712' in answer


def test_keep_alive_clients_lose_nothing_when_the_tier_stops(tmp_path, redis_server, processes):
    """During ShutdownDrainS every answer says Connection: close, so no client (or proxy) is left
    with an idle keep-alive connection to write a request on as the tier stops listening."""
    import http.client

    settings = write_settings(tmp_path, redis_server.address, Models=MODELS, API={"ShutdownDrainS": 2})
    processes.server(settings)
    tier = processes.http(settings)
    port = settings_of(settings)["API"]["Port"]
    body = signed_body({"a": 1}, app_id=APP_ID, app_secret=APP_SECRET, sign_type="SHA256")
    failures: list[tuple[float, str]] = []
    closes = Counter()
    stop = threading.Event()

    def user() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while not stop.is_set():
            try:
                connection.request("POST", "/api/echo", body=body)
                response = connection.getresponse()
                assert b'"code":0,' in response.read()
                if (response.getheader("Connection") or "").lower() == "close":
                    closes["close"] += 1
                    connection.close()
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            except Exception as exc:  # noqa: BLE001 - judged below by when it happened
                failures.append((time.monotonic(), repr(exc)))
                return

    users = [threading.Thread(target=user) for _ in range(6)]
    for thread in users:
        thread.start()
    time.sleep(1.0)
    tier.process.send_signal(signal.SIGTERM)
    drain_ends = time.monotonic() + 2.0
    assert tier.process.wait(30) == 0
    stop.set()
    for thread in users:
        thread.join(15)
    # During the drain nothing fails. When the tier then stops listening, a connection still in
    # the kernel's accept queue is refused or reset, or the client's write finds it closed (a
    # broken pipe): that request was never read (the tier answers every request it read before
    # exiting), so a client may safely send it again.
    during_drain = [error for at, error in failures if at < drain_ends - 0.1]
    assert not during_drain, during_drain
    never_read = ("Refused", "Reset", "RemoteDisconnected", "BrokenPipe")
    assert all(any(sign in error for sign in never_read) for _, error in failures), failures
    assert closes["close"] > 0


def test_redis_over_tls_with_a_password(tmp_path, processes):
    """RedisServer as a rediss:// URL and RedisPasswd: both tiers and the dispatcher use them."""
    import shutil
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    redis = subprocess.Popen(
        [shutil.which("redis-server"), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(cert),
         "--tls-auth-clients", "no", "--requirepass", "tls-secret-pw", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    try:
        url = f"rediss://127.0.0.1:{port}?ssl_cert_reqs=required&ssl_ca_certs={cert}"
        settings = write_settings(tmp_path, url, Models=["goinfer.models.echo:Echo"],
                                  Server={"RedisPasswd": "tls-secret-pw"})
        http = processes.http(settings)
        server = processes.server(settings)
        assert client(url_of(settings)).call("/api/echo", {"over": "tls"})["over"] == "tls"
        assert "tls-secret-pw" not in http.output + server.output
    finally:
        processes.cleanup()
        redis.terminate()
        redis.wait(10)
