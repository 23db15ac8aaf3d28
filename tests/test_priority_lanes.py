"""Priority lanes with real processes: workers take live requests before jobs, and jobs before
batch rows, and every entry of every lane runs exactly once."""

from __future__ import annotations

import statistics
import time
import uuid
from collections import Counter

from goinfer.client import Client
from goinfer.dispatcher.stream import StreamConsumer
from goinfer.queue import (
    ENQUEUE_SCRIPT,
    JOB_DONE,
    JOB_FIELD,
    JOB_QUEUED,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_NORMAL,
    Job,
    JobRecord,
    Reply,
    job_key,
    lane_stream,
    reply_key,
    stream_name,
    with_lanes,
)

from conftest import APP_ID, APP_SECRET, settings_of, url_of, wait_until, write_settings

MODELS = ["sample_models:Recorder", "goinfer.models.echo:Echo"]
ROW_S = 0.05  # what one batch row costs the worker


def stream_of(settings) -> str:
    return stream_name(settings_of(settings)["Server"]["QueueName"], 0)


def replies_of(settings) -> str:
    """A reply list of this test's own (the queue name is unique per test)."""
    return reply_key(settings_of(settings)["Server"]["QueueName"], 0)


def executions(client, settings) -> list[str]:
    key = settings_of(settings)["Server"]["QueueName"] + "executions"
    return [item.decode() for item in client.lrange(key, 0, -1)]


def enqueue(client, settings, priority: str, job: Job) -> None:
    """Put an entry on a lane as any sender does (ENQUEUE_SCRIPT), without a tier."""
    stream = lane_stream(stream_of(settings), priority)
    assert client.eval(ENQUEUE_SCRIPT, 1, stream, 1_000_000, job.encode(), 0, JOB_FIELD) == 1


def queue_rows(client, settings, count: int, replies: str, prefix: str = "row", priority: str = PRIORITY_LOW,
               sleep: float = ROW_S) -> list[str]:
    """`count` rows for the Recorder, answered on the list `replies`; their ids."""
    ids = [f"{prefix}-{i}" for i in range(count)]
    for request_id in ids:
        enqueue(client, settings, priority,
                Job(request_id, "/api/record", {"sleep": sleep}, replies, time.time() + 600))
    return ids


def queue_job(client, settings, request_id: str, sleep: float = 0.0) -> str:
    """An asynchronous job on the normal lane: its record, then its entry; returns its key."""
    key = job_key(request_id, 0)
    now = time.time()
    client.hset(key, mapping=JobRecord(JOB_QUEUED, APP_ID, "/api/record", now).fields())
    client.expire(key, 600)
    enqueue(client, settings, PRIORITY_NORMAL,
            Job(request_id, "/api/record", {"sleep": sleep}, "", now + 600, job_key=key))
    return key


def record(client, key: str) -> JobRecord | None:
    return JobRecord.decode(client.hgetall(key))


def live_latencies(api: Client, count: int) -> list[float]:
    latencies = []
    for i in range(count):
        started = time.perf_counter()
        api.call("/api/record", {"live": i, "sleep": ROW_S})
        latencies.append(time.perf_counter() - started)
    return latencies


def test_live_requests_overtake_a_low_backlog(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS,
                              Server={"MaxWorkers": 1, "MessageTimeout": 60})
    processes.http(settings)
    processes.server(settings)
    client = redis_server.client()
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256")
    live_latencies(api, 3)  # warm up connections
    alone = statistics.median(live_latencies(api, 15))

    replies = replies_of(settings)
    rows = queue_rows(client, settings, 200, replies)
    low = lane_stream(stream_of(settings), PRIORITY_LOW)
    wait_until(lambda: client.llen(replies) >= 3, 30, "the worker serving the low lane")
    busy = statistics.median(live_latencies(api, 15))
    rows_answered = client.llen(replies)
    print(f"live p50 alone {alone * 1000:.1f} ms, beside a low backlog {busy * 1000:.1f} ms; "
          f"{rows_answered} of {len(rows)} rows answered meanwhile")
    assert rows_answered < len(rows) and client.xlen(low) > 0, "the backlog drained before the live requests"
    assert busy <= 3 * alone + ROW_S, (alone, busy)
    # The backlog is served too, and each row once.
    wait_until(lambda: client.llen(replies) >= len(rows), 60, "every row answered")
    answers = [Reply.decode(raw) for raw in client.lrange(replies, 0, -1)]
    assert sorted(a.id for a in answers) == sorted(rows) and all(a.code == 0 for a in answers)


def test_jobs_run_before_batch_rows(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS, Server={"MaxWorkers": 1})
    processes.server(settings)
    client = redis_server.client()
    replies = replies_of(settings)
    rows = queue_rows(client, settings, 100, replies)
    wait_until(lambda: client.llen(replies) >= 3, 30, "the worker serving the low lane")
    request_id = "20261201" + "ab" * 16
    key = queue_job(client, settings, request_id)
    wait_until(lambda: (r := record(client, key)) is not None and r.state == JOB_DONE, 30, "the job done")
    ran = executions(client, settings)
    rows_before = ran.index(request_id)
    print(f"the job ran after {rows_before} of {len(rows)} rows")
    assert rows_before < 20, "the job waited for the low lane"
    assert client.xlen(lane_stream(stream_of(settings), PRIORITY_LOW)) > 50


def test_every_entry_of_every_lane_runs_once_under_two_dispatchers(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS, Server={"MaxWorkers": 2})
    client = redis_server.client()
    replies = replies_of(settings)
    high = queue_rows(client, settings, 100, replies, "high", PRIORITY_HIGH, sleep=0.005)
    low = queue_rows(client, settings, 100, replies, "low", PRIORITY_LOW, sleep=0.005)
    jobs = [f"20261202{i:032x}" for i in range(100)]
    keys = [queue_job(client, settings, request_id, sleep=0.005) for request_id in jobs]
    processes.server(settings, env={"GOINFER_TEST_TAG": "A"})
    processes.server(settings, env={"GOINFER_TEST_TAG": "B"})
    more_high = queue_rows(client, settings, 50, replies, "late-high", PRIORITY_HIGH, sleep=0.005)
    wait_until(lambda: client.llen(replies) >= 250, 60, "every row answered")
    wait_until(lambda: all((r := record(client, k)) is not None and r.state == JOB_DONE for k in keys), 60,
               "every job done")
    answers = [Reply.decode(raw) for raw in client.lrange(replies, 0, -1)]
    assert sorted(a.id for a in answers) == sorted(high + low + more_high)
    assert all(a.code == 0 for a in answers)
    ran = Counter(executions(client, settings))
    assert ran == Counter(high + low + more_high + jobs), "each entry ran exactly once"
    tags = Counter(a.data["tag"] for a in answers if a.data)
    assert set(tags) == {"A", "B"}, tags


def test_a_read_takes_from_the_highest_lane_that_holds_entries(redis_server):
    client = redis_server.client()
    base = f"{{q0}}lanes-{uuid.uuid4().hex[:8]}-0"
    consumer = StreamConsumer(client, with_lanes([base]), "w0", read_count=5)
    consumer.ensure_groups()

    def add(priority: str, count: int) -> None:
        for i in range(count):
            job = Job(f"{priority}-{i}", "/api/echo", {}, "nobody", time.time() + 60)
            client.xadd(lane_stream(base, priority), {JOB_FIELD: job.encode()})

    add(PRIORITY_LOW, 3)
    add(PRIORITY_NORMAL, 2)
    add(PRIORITY_HIGH, 1)
    first = consumer.read(block_ms=None)
    assert [item.job.id for item in first if item.job] == ["high-0"]
    # The read that shares the acknowledgement's round trip takes the next lane down.
    second = consumer.finish([(item, None) for item in first], read_next=True)
    assert [item.job.id for item in second if item.job] == ["normal-0", "normal-1"]
    add(PRIORITY_HIGH, 1)  # arrives while low entries wait: taken before them
    assert [item.job.id for item in consumer.read(block_ms=None) if item.job] == ["high-0"]
    client.script_flush()  # Redis lost its scripts (a restart): the read loads it again
    assert [item.job.id for item in consumer.read() if item.job] == ["low-0", "low-1", "low-2"]
    assert consumer.read(block_ms=None) == []
    # Drained: the next read blocks on every lane, and returns what arrives on any of them.
    add(PRIORITY_LOW, 1)
    assert [item.stream for item in consumer.read(block_ms=100)] == [lane_stream(base, PRIORITY_LOW)]


def test_a_running_goinfer_batch_leaves_live_requests_nearly_as_fast(tmp_path, redis_server, processes):
    """The issue's scenario end to end: `goinfer batch` keeps the only worker busy with rows of
    ROW_S each; live requests through `goinfer http` meanwhile stay within a loose factor of their
    latency with no batch running (benchmarks/priority.py measures it precisely)."""
    settings = write_settings(tmp_path, redis_server.address, Models=MODELS,
                              Server={"MaxWorkers": 1, "MessageTimeout": 60})
    processes.http(settings)
    processes.server(settings)
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256")
    live_latencies(api, 3)
    alone = statistics.median(live_latencies(api, 15))

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"id": {i}, "data": {{"row": {i}, "sleep": {ROW_S}}}}}\n' for i in range(300)))
    output = tmp_path / "out.jsonl"
    run = processes.start("batch", str(rows), "--api", "/api/record", "--output", str(output), "--no-progress",
                          "--yaml", str(settings), log_name="batch")
    wait_until(lambda: output.exists() and output.read_bytes().count(b"\n") >= 5, 60, "the batch to be running")
    busy = statistics.median(live_latencies(api, 15))
    written = output.read_bytes().count(b"\n")
    print(f"live p50 alone {alone * 1000:.1f} ms, beside `goinfer batch` {busy * 1000:.1f} ms; "
          f"{written} of 300 rows written meanwhile")
    assert written < 300, "the batch ended before the live requests were measured"
    assert busy <= 3 * alone + ROW_S, (alone, busy)
    assert run.process.wait(120) == 0, run.output
    assert output.read_bytes().count(b"\n") == 300
