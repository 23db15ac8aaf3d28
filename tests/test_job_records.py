"""Workers and job records: an asynchronous job's answer goes to its hash, for whoever polls it."""

from __future__ import annotations

import time
import uuid

from goinfer.queue import (
    ENQUEUE_SCRIPT,
    JOB_DONE,
    JOB_EXPIRED,
    JOB_FAILED,
    JOB_FIELD,
    JOB_QUEUED,
    JOB_RUNNING,
    Job,
    JobRecord,
    job_key,
    lane_stream,
    stream_name,
)

from conftest import settings_of, wait_until, write_settings

REQUEST_IDS = ["20261201" + f"{i:032x}" for i in range(3)]


def submit(client, settings, request_id: str, api: str, params: dict, timeout_s: float = 60,
           lane: str = "normal") -> str:
    """Queue a job as the HTTP tier does: its record first, then the entry on its lane (normal)."""
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


RECORDING = ["goinfer.models.echo:Echo", "sample_models:Recorder"]


def fresh_id() -> str:
    """A request id no other test used (they share one Redis, and a job's key is its id's)."""
    return "20261201" + uuid.uuid4().hex


def executions(client, settings) -> list[str]:
    key = settings_of(settings)["Server"]["QueueName"] + "executions"
    return [item.decode() for item in client.lrange(key, 0, -1)]


def finished(client, key: str) -> JobRecord:
    return wait_until(lambda: (r := record(client, key)) is not None and r.finished is not None and r, 60,
                      "the job answered")


def test_a_job_may_run_longer_than_message_timeout(tmp_path, redis_server, processes):
    # MessageTimeout bounds a live call (nobody waits longer); a job's client polls, so its
    # call may run until the job's own deadline.
    settings = write_settings(tmp_path, redis_server.address, Models=RECORDING, Server={"MessageTimeout": 2})
    client = redis_server.client()
    request_id = fresh_id()
    processes.server(settings)
    key = submit(client, settings, request_id, "/api/record", {"sleep": 4})
    wait_until(lambda: (r := record(client, key)) is not None and r.state == JOB_RUNNING, 30, "the job running")
    done = finished(client, key)
    assert done.state == JOB_DONE and done.reply is not None and done.reply.code == 0, done
    assert done.finished is not None and done.started is not None and done.finished - done.started >= 4


def test_a_set_max_infer_seconds_binds_jobs_too(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=RECORDING,
                              Server={"MessageTimeout": 30, "MaxInferSeconds": 1})
    client = redis_server.client()
    request_id = fresh_id()
    processes.server(settings)
    key = submit(client, settings, request_id, "/api/record", {"sleep": 20})
    failed = finished(client, key)
    assert failed.state == JOB_FAILED and failed.reply is not None, failed
    assert failed.reply.code == 9998 and "MaxInferSeconds" in failed.reply.msg
    assert 0 < client.ttl(key) <= 86400  # JobResultTTLS from the answer on


def test_a_job_survives_kill_9_of_its_dispatcher(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=RECORDING,
                              Server={"ClaimIdleMs": 1500, "MessageTimeout": 2})
    client = redis_server.client()
    request_id = fresh_id()
    victim = processes.server(settings, env={"GOINFER_TEST_TAG": "victim"})
    key = submit(client, settings, request_id, "/api/record", {"sleep": 3})
    wait_until(lambda: (r := record(client, key)) is not None and r.state == JOB_RUNNING, 30, "the job running")
    victim.kill_group()  # kill -9 of the whole dispatcher while the job runs
    assert record(client, key).state == JOB_RUNNING
    processes.server(settings, env={"GOINFER_TEST_TAG": "restarted"})
    done = finished(client, key)
    assert done.state == JOB_DONE and done.reply is not None and done.reply.code == 0, done
    assert done.reply.data is not None and done.reply.data["tag"] == "restarted"
    assert executions(client, settings) == [request_id]  # the killed run never finished
