"""Workers and job records: an asynchronous job's answer goes to its hash, for whoever polls it."""

from __future__ import annotations

import time

from goinfer.queue import (
    ENQUEUE_SCRIPT,
    JOB_DONE,
    JOB_EXPIRED,
    JOB_FAILED,
    JOB_FIELD,
    JOB_QUEUED,
    Job,
    JobRecord,
    job_key,
    lane_stream,
    stream_name,
)

from conftest import settings_of, wait_until, write_settings

REQUEST_IDS = ["20261201" + f"{i:032x}" for i in range(3)]


def submit(client, settings, request_id: str, api: str, params: dict, timeout_s: float = 60,
           lane: str = "high") -> str:
    """Queue a job as the HTTP tier does: its record first, then the entry on the normal lane."""
    key = job_key(request_id, 0)
    now = time.time()
    client.hset(key, mapping=JobRecord(JOB_QUEUED, "app", api, now).fields())
    client.expire(key, 600)
    stream = lane_stream(stream_name(settings_of(settings)["Server"]["QueueName"], 0), lane)
    job = Job(request_id, api, params, "", now + timeout_s, job_key=key)
    assert client.eval(ENQUEUE_SCRIPT, 1, stream, 1000, job.encode(), 0, JOB_FIELD) == 1
    return key


def record(client, key: str) -> JobRecord | None:
    return JobRecord.decode(client.hgetall(key))


def test_a_worker_writes_a_jobs_answer_to_its_record(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Server={"JobResultTTLS": 120})
    client = redis_server.client()
    processes.server(settings)
    done_key = submit(client, settings, REQUEST_IDS[0], "/api/greet", {"name": "job"})
    failed_key = submit(client, settings, REQUEST_IDS[1], "/api/faulty", {"mode": "infer-exception"})
    expired_key = submit(client, settings, REQUEST_IDS[2], "/api/greet", {"name": "late"}, timeout_s=-1)
    wait_until(lambda: all((r := record(client, k)) is not None and r.finished is not None
                           for k in (done_key, failed_key, expired_key)), 30, "three answered jobs")
    done, failed, expired = (record(client, k) for k in (done_key, failed_key, expired_key))
    assert done is not None and done.state == JOB_DONE and done.started is not None and done.reply is not None
    assert done.reply.code == 0 and done.reply.data == {"greeting": "hello, job", "tag": ""}
    assert failed is not None and failed.state == JOB_FAILED and failed.reply is not None
    assert failed.reply.code == 9998
    assert expired is not None and expired.state == JOB_EXPIRED and expired.reply is None
    assert 100 < client.ttl(done_key) <= 120  # JobResultTTLS from the answer on
