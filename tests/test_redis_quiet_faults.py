"""The HTTP tier against a Redis that fails quietly, with real processes and a real network fault.

A `FaultProxy` sits between the HTTP tier and Redis (the dispatchers reach Redis directly), and
black-holes the tier's connections (silence, no error: a rebooting host, a moved virtual IP),
resets them (TCP RST), or heals. Redis itself is frozen (SIGSTOP) or filled (maxmemory). Each
test counts every answer by code and asserts that none is an HTTP 500, that each comes within a
bound, that a 9702 ("could not be queued") was never run, and that the tier serves again by itself.
The last tests follow the tier's liveness key: kept while it runs, gone after kill -9 or a clean
stop, named in every job, so that a restarted tier is not served behind its predecessor's orphans.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from goinfer.http.queue_client import QueueClient, ReplyTimeout, SendFailure
from goinfer.queue import JOB_FIELD, TIER_ALIVE_TTL_S, Job, stream_name
from goinfer.settings import ServerSettings
from goinfer.testing import TEST_CREDENTIALS, FaultProxy

from conftest import (
    ProcessFactory,
    RedisServer,
    settings_of,
    start_redis,
    stop_redis,
    url_of,
    wait_until,
    write_settings,
)

MODELS = ["goinfer.models.echo:Echo", "sample_models:Recorder", "sample_models:Unencodable"]
MESSAGE_TIMEOUT_S = 6
# Slack for answers on a loaded 2-core machine: an answer later than its deadline plus this is a hang.
SLACK_S = 4.0


@dataclass(frozen=True)
class Answer:
    """What one POST got: the HTTP status (0: no answer at all), the envelope's code (None: not
    an envelope), when it was sent (time.monotonic()) and how long the answer took."""

    status: int
    code: int | None
    started: float
    seconds: float
    request_id: str = ""
    text: str = ""


def post(url: str, data: dict, timeout: float = 60) -> Answer:
    body = TEST_CREDENTIALS.body(data)
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            status, raw = exc.code, exc.read()
    except (OSError, http.client.HTTPException) as exc:  # no answer: a hang or a dropped connection
        return Answer(0, None, started, time.monotonic() - started, "", repr(exc))
    seconds = time.monotonic() - started
    text = raw.decode(errors="replace")
    try:
        envelope = json.loads(raw)
        return Answer(status, int(envelope["code"]), started, seconds, envelope["data"].get("requestId", ""), text)
    except (ValueError, KeyError, TypeError, AttributeError):
        return Answer(status, None, started, seconds, "", text)


def ready_status(settings: Path) -> int:
    try:
        with urllib.request.urlopen(url_of(settings) + "/ready", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return int(exc.code)


class Load:
    """Client threads posting one after another until stopped; every answer is kept."""

    def __init__(self, url: str, clients: int, path: str = "/api/echo") -> None:
        self.answers: list[Answer] = []
        self._url = url + path
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, client: int) -> None:
        sent = 0
        while not self._stop.is_set():
            self.answers.append(post(self._url, {"client": client, "n": sent}, timeout=MESSAGE_TIMEOUT_S + 30))
            sent += 1

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(120)
        return self.answers


def codes(answers: list[Answer]) -> Counter:
    return Counter(answer.code for answer in answers)


def assert_all_envelopes(answers: list[Answer], allowed: set[int]) -> None:
    not_envelopes = [a for a in answers if a.code is None or a.status != 200]
    assert not not_envelopes, f"{len(not_envelopes)} answers were not envelopes, e.g. {not_envelopes[:3]}"
    assert set(codes(answers)) <= allowed, codes(answers)


def slowest(answers: list[Answer]) -> float:
    return max(answer.seconds for answer in answers)


def assert_at_once(answers: list[Answer]) -> None:
    """Answered without waiting on Redis: the median is quick, and none waited out RedisTimeoutS
    (3 s), however loaded the machine."""
    seconds = sorted(answer.seconds for answer in answers)
    assert len(seconds) >= 10, len(seconds)
    assert seconds[len(seconds) // 2] < 0.25 and seconds[-1] < 2.5, (seconds[len(seconds) // 2], seconds[-1])


def executions(redis: RedisServer, settings: Path) -> Counter:
    """How often each request id ran (sample_models.Recorder writes them to Redis)."""
    key = settings_of(settings)["Server"]["QueueName"] + "executions"
    return Counter(item.decode() for item in redis.client().lrange(key, 0, -1))


def assert_no_9702_ran(answers: list[Answer], ran: Counter) -> None:
    refused = {answer.request_id for answer in answers if answer.code == 9702}
    assert not refused & set(ran), f"{len(refused & set(ran))} of {len(refused)} requests answered 9702 ran"


@pytest.fixture
def own_redis():
    server = start_redis()
    yield server
    stop_redis(server)


@pytest.fixture
def proxy(own_redis: RedisServer):
    with FaultProxy.to(own_redis) as proxy:
        yield proxy


def tier_behind(proxy: FaultProxy, redis: RedisServer, tmp_path: Path, processes: ProcessFactory,
                **server: object) -> tuple[Path, Path]:
    """An HTTP tier that reaches Redis through `proxy` and a dispatcher that reaches it directly, on
    one queue; returns (the tier's settings, the dispatcher's)."""
    queue = f"quiet-{os.urandom(4).hex()}-"
    options = {"QueueName": queue, "MessageTimeout": MESSAGE_TIMEOUT_S, **server}
    tier = write_settings(tmp_path, proxy.address, name="tier.yaml", Models=MODELS, Server=options)
    direct = write_settings(tmp_path, redis.address, name="dispatcher.yaml", Models=MODELS, Server=options)
    processes.server(direct)
    return tier, direct


def serving(settings: Path, timeout: float = 30) -> None:
    wait_until(lambda: post(url_of(settings) + "/api/echo", {"warm": True}, timeout=15).code == 0, timeout,
               "the tier to answer with code 0", interval=0.2)


def test_blackholed_redis_is_noticed_answered_at_once_and_survived(tmp_path, processes, own_redis, proxy):
    """Redis's host is gone: connections, old and new, meet silence. The tier notices within
    seconds, then answers 9702 at once (it queues nothing), and serves again once Redis is back."""
    tier, _ = tier_behind(proxy, own_redis, tmp_path, processes)
    http = processes.http(tier)
    serving(tier)
    assert ready_status(tier) == 200

    proxy.blackhole()
    blackholed_at = time.monotonic()
    load = Load(url_of(tier), clients=4)
    not_ready_after = wait_until(lambda: ready_status(tier) == 503 and time.monotonic() - blackholed_at, 15,
                                 "/ready to say 503")
    time.sleep(max(0.0, 10 - (time.monotonic() - blackholed_at)))
    answers = load.stop()

    assert_all_envelopes(answers, {9702, 9997})
    noticed = blackholed_at + not_ready_after
    later = [answer for answer in answers if answer.started > noticed + 0.5]
    print(f"black-holed: {codes(answers)} in 10 s, slowest {slowest(answers):.1f} s, /ready 503 after "
          f"{not_ready_after:.1f} s, then {len(later)} answers, slowest {slowest(later):.2f} s")
    assert not_ready_after < 6, not_ready_after
    assert slowest(answers) < MESSAGE_TIMEOUT_S + SLACK_S, codes(answers)
    assert_at_once(later)  # not after a timeout each

    proxy.heal()
    healed_at = time.monotonic()
    serving(tier, timeout=15)
    wait_until(lambda: ready_status(tier) == 200, 10, "/ready to say 200 again")
    print(f"serving {time.monotonic() - healed_at:.1f} s after the heal")
    assert "Traceback" not in http.output, http.output


def test_connections_to_a_moved_redis_are_replaced_without_help(tmp_path, processes, own_redis, proxy):
    """The virtual IP moved: the tier's connections are dead, new ones work. It must notice alone."""
    tier, _ = tier_behind(proxy, own_redis, tmp_path, processes)
    http = processes.http(tier)
    serving(tier)

    proxy.blackhole(new_connections=False)
    moved_at = time.monotonic()
    load = Load(url_of(tier), clients=4)
    try:
        wait_until(lambda: any(a.code == 0 for a in load.answers[-4:]), 20,
                   "the tier to serve again on new connections", interval=0.1)
    finally:
        back_after = time.monotonic() - moved_at
        time.sleep(1)
        answers = load.stop()

    print(f"moved: serving again after {back_after:.1f} s; {codes(answers)}")
    assert_all_envelopes(answers, {0, 9702, 9997})
    assert back_after < 10, back_after
    assert slowest(answers) < MESSAGE_TIMEOUT_S + SLACK_S, codes(answers)
    assert "Traceback" not in http.output, http.output


def test_lost_answers_from_redis_never_give_a_9702_for_a_request_that_ran(tmp_path, processes, own_redis, proxy):
    """A one-way partition: the tier's commands reach Redis and run, their answers never come
    back. A request whose enqueue was sent may have been queued: it is awaited, never told 9702."""
    tier, direct = tier_behind(proxy, own_redis, tmp_path, processes)
    http = processes.http(tier)
    serving(tier)

    load = Load(url_of(tier), clients=4, path="/api/record")
    time.sleep(0.5)
    proxy.blackhole(new_connections=False, answers_only=True)
    time.sleep(MESSAGE_TIMEOUT_S + 2)
    answers = load.stop()
    time.sleep(1)

    ran = executions(own_redis, direct)
    print(f"answers lost: {codes(answers)}; {len(ran)} ran, "
          f"{sum(1 for a in answers if a.code == 9702 and a.request_id in ran)} of them answered 9702")
    assert_all_envelopes(answers, {0, 9702, 9997})
    assert_no_9702_ran(answers, ran)
    assert slowest(answers) < MESSAGE_TIMEOUT_S + SLACK_S, codes(answers)
    assert codes(answers)[0] >= 10 and answers[-1].code == 0, codes(answers)  # serving again, on new connections
    assert "Traceback" not in http.output, http.output


def test_connection_resets_under_load_are_answered_in_the_envelope(tmp_path, processes, own_redis, proxy):
    tier, direct = tier_behind(proxy, own_redis, tmp_path, processes)
    http = processes.http(tier)
    serving(tier)

    load = Load(url_of(tier), clients=8, path="/api/record")
    time.sleep(0.5)
    for _ in range(20):
        proxy.reset()
        time.sleep(0.25)
    time.sleep(0.5)
    answers = load.stop()
    time.sleep(1)

    print(f"20 resets: {codes(answers)}, HTTP statuses {Counter(a.status for a in answers)}")
    assert_all_envelopes(answers, {0, 9702, 9997})
    assert codes(answers)[0] >= 20, codes(answers)
    assert_no_9702_ran(answers, executions(own_redis, direct))
    assert slowest(answers) < MESSAGE_TIMEOUT_S + SLACK_S
    serving(tier, timeout=10)
    assert "Traceback" not in http.output, http.output


def test_redis_at_maxmemory_refuses_at_once_logs_once_and_keeps_the_tier_alive(tmp_path, processes, own_redis):
    settings = write_settings(tmp_path, own_redis.address, Models=MODELS,
                              Server={"MessageTimeout": MESSAGE_TIMEOUT_S})
    http = processes.http(settings)
    admin = own_redis.client()
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", "1")
    try:
        url = url_of(settings) + "/api/echo"
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: post(url, {"i": i}), range(40)))
        time.sleep(TIER_ALIVE_TTL_S + 1)  # the liveness key must outlive a full Redis
        alive = alive_keys(own_redis)
    finally:
        admin.config_set("maxmemory", "0")

    assert_all_envelopes(answers, {9702})
    assert len(answers) == 40
    assert slowest(answers) < 2, slowest(answers)
    assert len(alive) == 1, alive
    processes.server(settings)
    serving(settings)
    lines = http.output.splitlines()
    full = [line for line in lines if "redis at" in line and ("maxmemory" in line or "OOM" in line)]
    assert len(full) == 1, full  # one line for the episode, not one per request
    assert sum("has room again" in line for line in lines) == 1, http.output
    assert "cannot queue request" not in http.output and "Traceback" not in http.output, http.output


def test_a_request_answered_9702_while_redis_is_frozen_never_runs(tmp_path, processes, own_redis):
    """Redis frozen (SIGSTOP) longer than MessageTimeout: the tier notices within seconds and then
    answers 9702 at once, for requests it did not send; those it sent before noticing are awaited
    and answered with their result or 9997. No request answered 9702 runs after the thaw."""
    timeout = 5
    settings = write_settings(tmp_path, own_redis.address, Models=MODELS, Server={"MessageTimeout": timeout})
    http = processes.http(settings)
    processes.server(settings)
    serving(settings)

    load = Load(url_of(settings), clients=4, path="/api/record")
    time.sleep(0.5)
    os.kill(own_redis.process.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        time.sleep(timeout + 3)
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
    time.sleep(1)
    answers = load.stop()
    time.sleep(timeout)  # anything queued late has run, or been dropped, by now

    ran = executions(own_redis, settings)
    late = [a for a in answers if frozen_at + 5 < a.started < frozen_at + timeout + 2]
    print(f"frozen {timeout + 3} s: {codes(answers)}; {len(ran)} ran; from 5 s in, {len(late)} answers, "
          f"slowest {slowest(late):.2f} s")
    assert_all_envelopes(answers, {0, 9702, 9997})
    assert_no_9702_ran(answers, ran)
    assert slowest(answers) < timeout + SLACK_S, codes(answers)
    assert_at_once(late)
    assert "Traceback" not in http.output, http.output


def test_one_unsendable_request_fails_alone(tmp_path, processes, redis_server):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS)
    http = processes.http(settings)
    processes.server(settings)
    serving(settings)
    url = url_of(settings) + "/api/unencodable"

    def send(i: int) -> tuple[int, Answer]:
        return i, post(url, {"i": i, "bad": i % 10 == 0})

    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(send, range(200)))
    good = Counter(answer.code for i, answer in answers if i % 10)
    bad = [answer for i, answer in answers if i % 10 == 0]
    assert good == {0: 180}, good
    assert all(answer.status == 200 and answer.code in (9701, 9702) for answer in bad), bad[:3]
    assert http.process.poll() is None


def test_a_payload_redis_cannot_take_fails_alone_in_its_batch(redis_server):
    """The enqueue batcher, against a real Redis: 50 enqueues in one batch, one of them text that
    no UTF-8 encoder takes. That one is refused (not queued); the 49 others are queued."""
    stream = f"batch-{os.urandom(4).hex()}-0"

    async def enqueue_all() -> list[object]:
        queue = QueueClient(ServerSettings(redis_server=redis_server.address))
        await queue.start()
        try:
            payloads = [Job(f"id{i}", "/api/echo", {"i": i}, queue.reply_key(0), time.time() + 60).encode()
                        for i in range(50)]
            payloads[17] = '{"text":"' + chr(0xD800) + '"}'  # a lone surrogate
            return await asyncio.gather(*(queue.submit(stream, f"id{i}", payload, 1.0)
                                          for i, payload in enumerate(payloads)), return_exceptions=True)
        finally:
            await queue.close()

    outcomes = asyncio.run(enqueue_all())
    kinds = Counter(type(outcome).__name__ for outcome in outcomes)
    assert isinstance(outcomes[17], SendFailure), outcomes[17]
    assert kinds == {ReplyTimeout.__name__: 49, SendFailure.__name__: 1}, kinds  # queued, no dispatcher
    assert redis_server.client().xlen(stream) == 49


def alive_keys(redis: RedisServer) -> list[bytes]:
    return list(redis.client().scan_iter("goinfer:alive:*"))


def test_the_tier_keeps_its_liveness_key_until_it_dies(tmp_path, processes, own_redis):
    settings = write_settings(tmp_path, own_redis.address, Models=MODELS)
    client = own_redis.client()
    http = processes.http(settings)
    [key] = wait_until(lambda: alive_keys(own_redis), 10, "the tier's liveness key")
    assert key.decode().startswith("goinfer:alive:")
    time.sleep(TIER_ALIVE_TTL_S + 1)
    assert client.exists(key) and 0 < client.ttl(key) <= TIER_ALIVE_TTL_S  # refreshed, and expiring

    http.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    wait_until(lambda: not client.exists(key), TIER_ALIVE_TTL_S + 2, "the dead tier's key to expire")
    assert time.monotonic() - killed_at > 1  # it expired: nobody deleted it

    second = processes.http(settings)
    [key] = wait_until(lambda: alive_keys(own_redis), 10, "the new tier's liveness key")
    assert second.stop() == 0
    assert not client.exists(key)  # a clean stop deletes it at once


def test_jobs_name_the_liveness_key_of_their_tier(tmp_path, processes, own_redis):
    settings = write_settings(tmp_path, own_redis.address, Models=MODELS, Server={"MessageTimeout": 3})
    processes.http(settings)  # no dispatcher: the job stays in the stream
    [key] = wait_until(lambda: alive_keys(own_redis), 10, "the tier's liveness key")
    answer = post(url_of(settings) + "/api/echo", {"x": 1})
    assert answer.code == 9997, answer
    stream = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
    [(_, fields)] = own_redis.client().xrange(stream)
    job = Job.decode(fields[JOB_FIELD.encode()])
    assert job.alive_key == key.decode()


def test_a_restarted_tier_is_not_served_behind_the_orphans_of_the_one_killed(tmp_path, processes, own_redis):
    """kill -9 of a tier with 80 requests queued on one worker (0.2 s each: 16 s of work). Its
    liveness key expires within TIER_ALIVE_TTL_S, workers skip what it queued, and the restarted
    tier's first request is answered in seconds instead of after the orphans have run."""
    settings = write_settings(tmp_path, own_redis.address, Models=MODELS,
                              Server={"MaxWorkers": 1, "MessageTimeout": 60})
    first = processes.http(settings)
    processes.server(settings)
    serving(settings)
    url = url_of(settings) + "/api/record"

    pool = ThreadPoolExecutor(80)
    try:
        orphans = [pool.submit(post, url, {"i": i, "sleep": 0.2}) for i in range(80)]
        stream = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
        # answered ones have left the stream: count them with those still waiting in it
        wait_until(lambda: own_redis.client().xlen(stream) + sum(f.done() for f in orphans) >= 80, 30,
                   "80 requests to be queued")
        first.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        assert all(future.result(60).code is None for future in orphans)  # their client is gone

        processes.http(settings)
        answer = post(url, {"after": "restart"})
    finally:
        pool.shutdown()
    waited = time.monotonic() - killed_at
    time.sleep(1)
    ran = executions(own_redis, settings)
    print(f"kill -9 with 80 queued: {len(ran) - 1} of them ran; the new tier's first request answered "
          f"{waited:.1f} s after the kill, in {answer.seconds:.1f} s")
    assert answer.code == 0, answer
    assert waited < TIER_ALIVE_TTL_S + 6, waited  # not 16 s behind the orphans
    assert len(ran) - 1 < 60, len(ran)
