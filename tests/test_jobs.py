"""Asynchronous jobs through the HTTP tier: submit, poll, ownership, expiry, surviving crashes."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from goinfer.client import AsyncClient, Client, GoinferError
from goinfer.queue import (
    JOB_KEY_PREFIX,
    PRIORITY_HIGH,
    PRIORITY_NORMAL,
    job_id,
    job_key,
    lane_stream,
    parse_job_id,
    stream_name,
)

from conftest import (
    APP_ID,
    APP_SECRET,
    PLAIN_APP_ID,
    PLAIN_APP_SECRET,
    ROOT,
    post_raw,
    process_env,
    settings_of,
    url_of,
    wait_until,
    write_settings,
)

MODELS = ["goinfer.models.echo:Echo", "sample_models:Greeter", "sample_models:Faulty", "sample_models:Recorder"]


def job_settings(tmp_path: Path, redis_address: str, name: str = "settings.yaml", **sections: Any) -> Path:
    sections.setdefault("Models", MODELS)
    return write_settings(tmp_path, redis_address, name=name, **sections)


def client_of(settings: Path, app_id: str = APP_ID) -> Client:
    if app_id == PLAIN_APP_ID:
        return Client(url_of(settings), PLAIN_APP_ID, PLAIN_APP_SECRET, sign_type="plain")
    return Client(url_of(settings), app_id, APP_SECRET, sign_type="SHA256")


def poll_raw(settings: Path, ident: str, client: Client, data: dict | None = None,
             method: str = "POST") -> tuple[int, bytes]:
    """A poll as bytes: the answer "not found" must not differ by one byte between reasons."""
    body = client.body({"jobId": ident} if data is None else data)
    request = urllib.request.Request(f"{url_of(settings)}/goinfer/jobs/{ident}", data=body, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def poll(settings: Path, ident: str, client: Client) -> dict[str, Any]:
    return json.loads(poll_raw(settings, ident, client)[1])


def without_time(raw: bytes) -> bytes:
    return re.sub(rb'"timestamp":[0-9]+', b'"timestamp":0', raw)


def records_since(redis, started: float) -> list[bytes]:
    """The job records created since `started` (the session's Redis holds other tests' too)."""
    return sorted(key for key in redis.scan_iter(f"{JOB_KEY_PREFIX}*")
                  if float(redis.hget(key, "created") or 0) >= started)


def queue_of(settings: Path) -> str:
    return stream_name(settings_of(settings)["Server"]["QueueName"], 0)


def test_a_job_is_queued_on_the_normal_lane_then_answers_as_a_synchronous_call(tmp_path, redis_server, processes):
    settings = job_settings(tmp_path, redis_server.address)
    redis = redis_server.client()
    processes.http(settings)
    client = client_of(settings)
    started = time.time()

    handle = client.submit("/api/greet", {"name": "job"})
    assert parse_job_id(handle.job_id) == (handle.request_id, 0)
    queued = poll(settings, handle.job_id, client)  # no dispatcher yet: it waits on the normal lane
    assert queued["code"] == 0 and queued["data"]["state"] == "queued"
    assert queued["data"]["jobId"] == handle.job_id and queued["data"]["requestId"] == handle.request_id
    assert isinstance(queued["data"]["created"], float) and "started" not in queued["data"]
    assert redis.xlen(lane_stream(queue_of(settings), PRIORITY_NORMAL)) == 1
    assert redis.xlen(lane_stream(queue_of(settings), PRIORITY_HIGH)) == 0
    assert handle.state() == "queued" and not handle.done()
    failed = client.submit("/api/faulty", {"mode": "infer-exception"})

    processes.server(settings)
    answer = handle.result(timeout=60)
    synchronous = client.call("/api/greet", {"name": "job"})
    assert answer["requestId"] == handle.request_id != synchronous["requestId"]
    assert {**answer, "requestId": ""} == {**synchronous, "requestId": ""}
    assert handle.done() and handle.state() == "done"
    done = poll(settings, handle.job_id, client)
    assert done["code"] == 0
    assert done["data"] == {**answer, "jobId": handle.job_id, "state": "done"}

    with pytest.raises(GoinferError) as job_error:
        failed.result(timeout=60)
    with pytest.raises(GoinferError) as call_error:
        client.call("/api/faulty", {"mode": "infer-exception"})
    assert (job_error.value.code, job_error.value.msg) == (call_error.value.code, call_error.value.msg) == \
        (9998, call_error.value.msg)
    envelope = poll(settings, failed.job_id, client)
    assert envelope["code"] == 9998 and envelope["data"]["state"] == "failed"
    assert envelope["data"]["requestId"] == failed.request_id

    # api_entry refuses as for a synchronous call: no job, no record.
    with pytest.raises(GoinferError) as refused:
        client.submit("/api/greet", {"name": 5})
    assert (refused.value.code, refused.value.msg) == (1001, "api entry fail : need name")
    assert records_since(redis, started) == sorted(job_key(h.request_id, 0).encode() for h in (handle, failed))


def test_a_job_may_run_longer_than_message_timeout(tmp_path, redis_server, processes):
    # No MaxInferSeconds: a live call's stuck-call limit is MessageTimeout, a job's its JobTimeout.
    settings = job_settings(tmp_path, redis_server.address, Server={"MessageTimeout": 2})
    processes.http(settings)
    processes.server(settings)
    client = client_of(settings)
    with pytest.raises(GoinferError) as synchronous:
        client.call("/api/record", {"sleep": 4})
    assert synchronous.value.code == 9997  # the client of a synchronous call gave up at MessageTimeout
    handle = client.submit("/api/record", {"sleep": 4})
    wait_until(lambda: handle.state() == "running", 30, "the job to run")
    running = poll(settings, handle.job_id, client)["data"]
    assert running["started"] >= running["created"]
    assert handle.result(timeout=60)["request_id"] == handle.request_id


def test_only_the_submitting_app_id_sees_a_job_and_every_other_id_is_the_same_not_found(
        tmp_path, redis_server, processes):
    settings = job_settings(tmp_path, redis_server.address)
    processes.http(settings)
    processes.server(settings)
    owner, other = client_of(settings), client_of(settings, PLAIN_APP_ID)
    handle = owner.submit("/api/greet", {"name": "mine"})
    handle.result(timeout=60)
    status, mine = poll_raw(settings, handle.job_id, owner)
    assert status == 200 and json.loads(mine)["code"] == 0

    unknown = job_id("20260101" + "0" * 32, 0)
    answers = {
        "foreign": poll_raw(settings, handle.job_id, other),
        "unknown": poll_raw(settings, unknown, other),
        "malformed": poll_raw(settings, "not-a-job", other),
        "other queue": poll_raw(settings, job_id(handle.request_id, 7), other),
        "bound to another job": poll_raw(settings, handle.job_id, other, {"jobId": unknown}),
        "by GET": poll_raw(settings, handle.job_id, other, method="GET"),
    }
    first = answers["foreign"]
    assert first[0] == 200
    assert json.loads(first[1]) == {**json.loads(first[1]), "code": 9716, "appId": PLAIN_APP_ID,
                                    "data": {"msg": "job not found", "requestId": ""}}
    for reason, answer in answers.items():
        assert (answer[0], without_time(answer[1])) == (first[0], without_time(first[1])), reason
    # A submission path answers GET as a model's path does: 405, use POST.
    wrong = urllib.request.Request(f"{url_of(settings)}/goinfer/jobs/api/greet", method="GET")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(wrong, timeout=30)
    with refused.value:
        assert refused.value.code == 405 and json.loads(refused.value.read())["code"] == 9711
    # The owner's signature must be bound to this job's id, if it names one; GET is a poll too.
    assert json.loads(poll_raw(settings, handle.job_id, owner, {"jobId": unknown})[1])["code"] == 9716
    assert json.loads(poll_raw(settings, handle.job_id, owner, {}, method="GET")[1])["data"]["state"] == "done"


def test_a_job_nobody_took_in_time_expires_then_is_forgotten(tmp_path, redis_server, processes):
    settings = job_settings(tmp_path, redis_server.address, Server={"JobTimeout": 1, "JobResultTTLS": 6})
    processes.http(settings)
    client = client_of(settings)
    handle = client.submit("/api/greet", {"name": "late"})
    time.sleep(1.5)  # past JobTimeout, with no dispatcher
    processes.server(settings)
    expired = wait_until(lambda: (e := poll(settings, handle.job_id, client))["code"] != 0 and e, 30,
                         "the job to be marked expired")
    assert expired["code"] == 9715 and expired["data"]["state"] == "expired"
    assert expired["data"]["jobId"] == handle.job_id
    with pytest.raises(GoinferError) as error:
        handle.result(timeout=10)
    assert error.value.code == 9715
    wait_until(lambda: poll(settings, handle.job_id, client)["code"] == 9716, 30, "the record to expire")


def test_a_job_survives_kill_9_of_its_dispatcher_and_of_the_tier_that_took_it(tmp_path, redis_server, processes):
    first = job_settings(tmp_path, redis_server.address, Server={"ClaimIdleMs": 1000})
    queue = settings_of(first)["Server"]["QueueName"]
    second = job_settings(tmp_path, redis_server.address, name="second.yaml",
                          Server={"ClaimIdleMs": 1000, "QueueName": queue})
    redis = redis_server.client()
    tier = processes.http(first)
    dispatcher = processes.server(first)
    handle = client_of(first).submit("/api/record", {"sleep": 3})
    wait_until(lambda: handle.state() == "running", 30, "the job to run")
    dispatcher.kill_group()  # the worker running it too
    tier.kill_group()

    processes.http(second)
    processes.server(second)
    answer = client_of(second).job(handle.job_id).result(timeout=90)
    assert answer["request_id"] == handle.request_id
    assert redis.lrange(f"{queue}executions", 0, -1) == [handle.request_id.encode()]  # the killed run never ended


def test_replayed_and_refused_submissions_leave_no_job(tmp_path, redis_server, processes):
    settings = job_settings(tmp_path, redis_server.address, API={"RejectReplay": True},
                            Server={"MaxQueueLength": 1})
    redis = redis_server.client()
    processes.http(settings)
    client = client_of(settings)
    started = time.time()
    body = client.body({"name": "once"})
    status, accepted = post_raw(f"{url_of(settings)}/goinfer/jobs/api/greet", body)
    assert status == 200 and accepted["code"] == 0 and accepted["data"]["state"] == "queued"
    assert post_raw(f"{url_of(settings)}/goinfer/jobs/api/greet", body)[1]["code"] == 9807
    assert post_raw(f"{url_of(settings)}/api/greet", body)[1]["code"] == 9807  # nor as a synchronous call
    full = post_raw(f"{url_of(settings)}/goinfer/jobs/api/greet", client.body({"name": "twice"}))[1]
    assert full["code"] == 9704 and "jobId" not in full["data"]
    # Only the accepted job has a record: the refused ones wrote none. It lasts until JobTimeout
    # plus JobResultTTLS, unless a worker answers it.
    parsed = parse_job_id(accepted["data"]["jobId"])
    assert parsed is not None and parsed[0] == accepted["data"]["requestId"]
    record = job_key(*parsed)
    assert records_since(redis, started) == [record.encode()]
    assert 3600 + 86400 - 60 < redis.ttl(record) <= 3600 + 86400


def test_the_asyncio_client_submits_and_awaits(tmp_path, redis_server, processes):
    settings = job_settings(tmp_path, redis_server.address)
    processes.http(settings)
    processes.server(settings)

    async def main() -> tuple[dict[str, Any], GoinferError]:
        client = AsyncClient(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256")
        try:
            handles = [await client.asubmit("/api/greet", {"name": f"n{i}"}) for i in range(3)]
            failing = await client.asubmit("/api/faulty", {"mode": "infer-apierror"})
            answers = await asyncio.gather(*(h.result(timeout=60) for h in handles))
            assert [a["greeting"] for a in answers] == ["hello, n0", "hello, n1", "hello, n2"]
            assert await handles[0].done() and await handles[0].state() == "done"
            try:
                await failing.result(timeout=60)
            except GoinferError as exc:
                return answers[0], exc
            raise AssertionError("a failed job returned a result")
        finally:
            await client.aclose()

    answer, error = asyncio.run(main())
    assert answer["msg"] == "success"
    assert (error.code, error.msg) == (5432, "infer fail : cannot infer this")


def run_call(settings: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "goinfer", "call", *args, "--sign", "SHA256", "--yaml", str(settings)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env=process_env())


def test_goinfer_call_async(tmp_path, redis_server, processes):
    settings = job_settings(tmp_path, redis_server.address)
    processes.http(settings)
    processes.server(settings)
    done = run_call(settings, "/api/greet", "--data", '{"name": "cli"}', "--async")
    assert done.returncode == 0, done.stderr
    ident = re.fullmatch(r"job (\S+)\n", done.stderr)
    assert ident is not None and parse_job_id(ident.group(1)) is not None, done.stderr
    answer = json.loads(done.stdout)
    assert answer["greeting"] == "hello, cli" and answer["requestId"] == parse_job_id(ident.group(1))[0]

    queued = run_call(settings, "/api/greet", "--data", '{"name": "later"}', "--async", "--no-wait")
    assert queued.returncode == 0 and parse_job_id(queued.stdout.strip()) is not None, queued.stderr
    assert client_of(settings).job(queued.stdout.strip()).result(timeout=60)["greeting"] == "hello, later"

    failed = run_call(settings, "/api/faulty", "--data", '{"mode": "infer-apierror"}', "--async")
    assert failed.returncode == 1 and failed.stderr.splitlines()[-1] == "error 5432: infer fail : cannot infer this"
    lonely = run_call(settings, "/api/greet", "--no-wait")
    assert lonely.returncode == 2 and "--no-wait needs --async" in lonely.stderr
