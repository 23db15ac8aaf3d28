"""goinfer on a real Redis Cluster (three primaries, one replica each, built by the test): the
core scenarios, then a primary killed under load and its replica promoted.

One cluster serves the whole file; most tests share one service on it (an HTTP tier and two
dispatchers on each of four queues, replay protection on: each test signs data of its own, so
no two tests send the same signature). Executions are recorded in a file (FileRecorder),
outside the Redis under test.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from goinfer.client import Client, GoinferError, signed_body
from goinfer.http.queue_client import QueueClient, ReplyTimeout, SendFailure
from goinfer.queue import Job, queue_tag
from goinfer.settings import ServerSettings, load_settings
from goinfer.tools import check_redis_cluster

from conftest import APP_ID, APP_SECRET, GoinferProcess, ProcessFactory, post_raw, url_of, wait_until, write_settings
from redis_cluster import LocalCluster, start_cluster

QUEUES = 4
MODELS = ["sample_models:FileRecorder", "sample_models:Batcher", "goinfer.models.echo:Echo"]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with start_cluster() as started:
        yield started


def cluster_settings(folder: Path, cluster: LocalCluster, server: dict | None = None, **sections) -> Path:
    return write_settings(folder, cluster.url, Models=MODELS,
                          Customer={"ExecutionsFile": str(folder / "executions.txt")},
                          Server={"MaxWorkers": 1, "MessageTimeout": 20, "ClaimIdleMs": 1500, **(server or {})},
                          **sections)


def client(settings: Path, timeout: float = 60) -> Client:
    return Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256", timeout=timeout)


def outcome(api: Client, path: str, data: dict):
    try:
        return api.call(path, data)
    except GoinferError as exc:
        return exc


def executions(settings: Path) -> Counter:
    path = settings.parent / "executions.txt"
    return Counter(path.read_text().split()) if path.exists() else Counter()


def start_dispatchers(processes: ProcessFactory, settings: Path, queues: list[int]) -> list[GoinferProcess]:
    """Start them all, then wait for each: they load in parallel."""
    started = [processes.server(settings, queue, wait=False) for queue in queues]
    for queue, proc in zip(queues, started, strict=True):
        proc.wait_for_output(f"dispatcher for queue {queue} ready", 120)
    return started


@dataclass
class Service:
    settings: Path
    http: GoinferProcess
    dispatchers: dict[int, list[GoinferProcess]]
    processes: ProcessFactory


@pytest.fixture(scope="class")
def service(cluster, tmp_path_factory) -> Iterator[Service]:
    """An HTTP tier and two dispatchers on each of four queues, replay protection on."""
    cluster.flush()
    folder = tmp_path_factory.mktemp("service")
    settings = cluster_settings(folder, cluster, {"RequestQueueAmount": QUEUES, "BatchSize": 8,
                                                  "BatchTimeoutMs": 20}, API={"RejectReplay": True})
    processes = ProcessFactory(folder)
    try:
        http = processes.http(settings)
        queues = [index for index in range(QUEUES) for _ in range(2)]
        started = start_dispatchers(processes, settings, queues)
        dispatchers: dict[int, list[GoinferProcess]] = {}
        for queue, proc in zip(queues, started, strict=True):
            dispatchers.setdefault(queue, []).append(proc)
        yield Service(settings, http, dispatchers, processes)
        logs = "".join(proc.output for proc in processes.started)
        assert "Traceback" not in logs
    finally:
        processes.cleanup()


def command_stats(cluster: LocalCluster) -> dict[int, tuple[int, int]]:
    """Per primary: EVALSHA calls (enqueues) and MOVED answers, since it started."""
    stats = {}
    for node in cluster.primaries():
        client_ = node.client()
        calls = client_.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        moved = client_.info("errorstats").get("errorstat_MOVED", {}).get("count", 0)
        stats[node.port] = (int(calls), int(moved))
    return stats


def test_the_first_three_queues_land_on_the_three_primaries(cluster):
    """As `redis-cli --cluster create` shares the slots out; a fourth queue shares a primary."""
    owners = [cluster.primary_for(queue_tag(index)).port for index in range(4)]
    assert len(set(owners[:3])) == 3 and owners[3] in owners[:3]


class TestOneService:
    """The shared service's tests; it stops when they are done, before the tests that need the
    cluster to themselves."""

    def test_every_request_runs_once_on_its_queues_primary(self, cluster, service):
        before = command_stats(cluster)
        api = client(service.settings)
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda i: outcome(api, "/api/record-file", {"i": i, "sleep": 0.005}), range(240)))
        errors = [a for a in answers if isinstance(a, GoinferError)]
        assert not errors, errors[:5]
        assert [a["i"] for a in answers] == list(range(240))
        ran = executions(service.settings)
        assert sorted(ran[a["requestId"]] for a in answers) == [1] * 240  # each exactly once
        after = command_stats(cluster)
        # Each primary took enqueues (the four queues span all three), and none was sent to a node
        # that had to redirect it.
        assert all(after[port][0] > before.get(port, (0, 0))[0] for port in after), (before, after)
        assert all(after[port][1] == before.get(port, (0, 0))[1] for port in after), (before, after)


    def test_a_replayed_signature_is_refused_on_whichever_queue_it_lands(self, service):
        url = url_of(service.settings) + "/api/echo"
        bodies = [signed_body({"pay": i}, app_id=APP_ID, app_secret=APP_SECRET, sign_type="SHA256") for i in range(12)]
        first = [post_raw(url, body)[1]["code"] for body in bodies]
        again = [post_raw(url, body)[1]["code"] for body in bodies]
        assert first == [0] * 12
        assert again == [9807] * 12


    def test_a_batch_model_gets_several_requests_per_call(self, service):
        api = client(service.settings)
        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda i: api.call("/api/batch", {"i": i, "batched": True}), range(128)))
        assert [a["i"] for a in answers] == list(range(128))
        assert all(a["request_id"] == a["requestId"] for a in answers)
        assert max(a["batch"] for a in answers) > 1


    def test_ready_status_and_check_see_the_whole_cluster(self, service):
        base = url_of(service.settings)
        with urllib.request.urlopen(base + "/ready", timeout=10) as response:
            assert json.loads(response.read()) == {"ready": True, "redis": True, "missing_queues": []}
        with urllib.request.urlopen(base + "/goinfer/status", timeout=10) as response:
            status = json.loads(response.read())
        assert len(status["dispatchers"]) == 2 * QUEUES
        assert [queue["dispatchers"] for queue in status["queues"]] == [2] * QUEUES * 3  # each queue's 3 lanes
        with urllib.request.urlopen(base + "/metrics", timeout=10) as response:
            assert "goinfer_redis_up 1.0" in response.read().decode()
        result = check_redis_cluster(load_settings(str(service.settings)))
        assert result.ok, result.line()
        assert "3 primaries" in result.detail and "3 replicas" in result.detail
        assert all(f"{queue_tag(index)} on 127.0.0.1:" in result.detail for index in range(QUEUES))


    def test_a_queue_whose_slot_moves_to_another_primary_follows_it(self, cluster, service):
        """MOVED: the enqueue did not run there, and is sent once more, to the slot's new primary;
        the readers and the workers find it too. No request fails."""
        stream = f"{queue_tag(1)}{load_settings(str(service.settings)).server.queue_name}1"
        source = cluster.primary_for(stream)
        target = next(node for node in cluster.primaries() if node is not source)
        moved_before = command_stats(cluster)[source.port][1]
        cluster.move_slot(stream, target)
        api = client(service.settings)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: outcome(api, "/api/record-file", {"i": i, "after": "move"}), range(80)))
        assert all(isinstance(a, dict) for a in answers), [a for a in answers if not isinstance(a, dict)][:5]
        assert command_stats(cluster)[source.port][1] > moved_before  # redirected, and followed
        cluster.move_slot(stream, source)  # back where `redis-cli --cluster create` put it


    def test_kill_9_of_a_dispatcher_its_requests_are_reclaimed(self, service):
        """Last of the shared service's tests: it leaves queue 0 one dispatcher."""
        victim, survivor = service.dispatchers[0]
        api = client(service.settings)
        with ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(outcome, api, "/api/record-file", {"i": i, "sleep": 0.2, "kill": 9})
                       for i in range(160)]
            time.sleep(1.5)
            victim.kill_group()  # kill -9 of the whole dispatcher: supervisor and its worker
            answers = [f.result() for f in futures]
        errors = [a for a in answers if isinstance(a, GoinferError)]
        assert not errors, errors[:5]
        ran = executions(service.settings)
        assert all(ran[a["requestId"]] >= 1 for a in answers)
        assert "running again request" in survivor.output  # the victim's pending requests, reclaimed
        assert sum(count - 1 for count in ran.values()) <= 4  # at most what the victim was running


def test_an_enqueue_answered_moved_is_sent_again_to_the_new_primary(cluster):
    """MOVED means the enqueue script did not run: it is sent once more, to the primary the
    slot moved to, and queued there (no reader runs here to learn of the move first)."""
    stream = f"{queue_tag(1)}moved-{time.time_ns()}-1"
    source = cluster.primary_for(stream)
    target = next(node for node in cluster.primaries() if node is not source)

    async def enqueue_twice() -> list[object]:
        queue = QueueClient(ServerSettings(redis_server=cluster.url, request_queue_amount=2))
        outcomes: list[object] = []
        try:
            for attempt in range(2):
                if attempt:
                    cluster.move_slot(stream, target)
                job = Job(f"id{attempt}", "/api/echo", {}, queue.reply_key(1), time.time() + 60)
                try:
                    await queue.submit(stream, job.id, job.encode(), 0.5)
                except (ReplyTimeout, SendFailure) as exc:  # queued (no dispatcher), or not
                    outcomes.append(type(exc))
        finally:
            await queue.close()
        return outcomes

    moved_before = command_stats(cluster)[source.port][1]
    try:
        assert asyncio.run(enqueue_twice()) == [ReplyTimeout, ReplyTimeout]
        assert command_stats(cluster)[source.port][1] == moved_before + 1
        assert target.client().xlen(stream) == 2
    finally:
        cluster.move_slot(stream, source)


def test_a_full_queue_is_refused_at_once(cluster, tmp_path, processes):
    settings = cluster_settings(tmp_path, cluster, {"MaxQueueLength": 3, "MessageTimeout": 4})
    processes.http(settings)  # no dispatcher: requests wait in the stream
    api = client(settings)
    stream = f"{queue_tag(0)}{load_settings(str(settings)).server.queue_name}0"
    with ThreadPoolExecutor(3) as pool:
        waiting = [pool.submit(outcome, api, "/api/echo", {"i": i}) for i in range(3)]
        wait_until(lambda: cluster.primary_for(stream).client().xlen(stream) == 3, 10, "three waiting requests")
        refused = outcome(api, "/api/echo", {"i": 99})
        assert isinstance(refused, GoinferError) and refused.code == 9704
        assert all(f.result().code == 9997 for f in waiting)


def test_a_plain_redis_named_as_a_cluster_is_one_line_and_exit_2(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Server={"RedisCluster": True})
    for proc in (processes.start("server", "0", "--yaml", str(settings)),
                 processes.start("http", "--yaml", str(settings))):
        assert proc.process.wait(60) == 2, proc.output
        assert "is not a Redis Cluster" in proc.output
        assert "Traceback" not in proc.output


def test_a_cluster_refusing_the_password_is_one_line_and_exit_2(tmp_path, processes):
    """redis-py's cluster client reports a refused password inside a RedisClusterException."""
    with start_cluster(replicas=0, password="the-right-one") as locked:
        settings = write_settings(tmp_path, locked.url, Server={"RedisPasswd": "a-wrong-one"})
        for proc in (processes.start("server", "0", "--yaml", str(settings)),
                     processes.start("http", "--yaml", str(settings))):
            assert proc.process.wait(60) == 2, proc.output
            assert "refuses Server.RedisPasswd" in proc.output
            assert "a-wrong-one" not in proc.output and "Traceback" not in proc.output


def test_a_primary_killed_under_load_fails_over_without_losing_a_request(cluster, tmp_path, processes):
    """kill -9 of the primary serving queue 1 while clients keep sending; its replica takes over.

    Every request gets an answer: its result, SendMsgFail (9702: not queued, while queue 1 had
    no primary) or QueueTimeout (9997: queued or answered on the dead primary in the moment
    before its replica had it). None is lost (unanswered past MessageTimeout + margin).
    """
    cluster.flush()
    message_timeout = 5
    settings = cluster_settings(tmp_path, cluster, {"RequestQueueAmount": 3, "MaxWorkers": 2,
                                                    "MessageTimeout": message_timeout})
    http = processes.http(settings)
    dispatchers = start_dispatchers(processes, settings, [0, 1, 2])
    api = client(settings, timeout=message_timeout + 15)
    stream = f"{queue_tag(1)}{load_settings(str(settings)).server.queue_name}1"
    victim = cluster.primary_for(stream)
    results: list[tuple[float, object]] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            sent = time.monotonic()
            try:
                answer: object = api.call("/api/echo", {"w": worker, "i": i})
            except GoinferError as exc:
                answer = exc.code
            except OSError as exc:  # no answer within MessageTimeout + 15 s: lost
                answer = f"lost: {exc}"
            results.append((sent, answer))
            i += 1

    threads = [threading.Thread(target=load, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2.0)
        killed_at = time.monotonic()
        cluster.kill(victim)
        wait_until(lambda: cluster.primary_for(stream).port != victim.port, 30, "a replica to take over")
        promoted_after = time.monotonic() - killed_at
        time.sleep(8.0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(message_timeout + 30)
    try:
        codes = Counter(0 if isinstance(answer, dict) else answer for _, answer in results)
        failed = [sent for sent, answer in results if not isinstance(answer, dict)]
        serving_again = max(failed) - killed_at if failed else 0.0
        print(f"\nfailover of the primary of {queue_tag(1)}: {len(results)} sent, answers {dict(codes)}, "
              f"replica promoted {promoted_after:.1f}s after the kill, last failed request sent "
              f"{serving_again:.1f}s after it")
        assert not [answer for answer in codes if isinstance(answer, str)], codes  # nothing lost
        assert set(codes) <= {0, 9702, 9997}, codes
        assert codes[0] > 0
        # Only queue 1's requests failed: the other queues' primaries never stopped answering.
        assert f"for {queue_tag(1)} is unreachable" in http.output
        assert not [tag for tag in (queue_tag(0), queue_tag(2)) if f"for {tag} is unreachable" in http.output]

        def serving() -> bool:
            with ThreadPoolExecutor(12) as pool:
                return all(isinstance(a, dict) for a in pool.map(lambda i: outcome(api, "/api/echo", {"i": i}),
                                                                 range(60)))

        wait_until(serving, 60, "every queue to serve again")
        assert http.process.poll() is None and all(proc.process.poll() is None for proc in dispatchers)
        assert "Traceback" not in http.output + "".join(proc.output for proc in dispatchers)
    finally:
        cluster.restart(victim)  # it rejoins as a replica of the node that took over
        cluster.wait_healthy()
