"""The contract of priority lanes and job records, which tiers, workers and the batch tool share."""

from __future__ import annotations

import pytest

from goinfer.queue import (
    JOB_DONE,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    Job,
    JobRecord,
    Reply,
    job_finished_fields,
    job_id,
    job_key,
    job_started_fields,
    lane_stream,
    parse_job_id,
    stream_name,
    with_lanes,
)
from goinfer.settings import SettingsError, parse_settings

REQUEST_ID = "20261201" + "ab" * 16


def test_lanes_sit_beside_the_stream_in_its_slot_and_are_read_highest_first():
    q0, c0 = stream_name("goinfer-queue", 0), stream_name("custom", 0)
    assert lane_stream(q0, "high") == q0 == "{q0}goinfer-queue0"
    assert lane_stream(q0, "low") == "{q0}goinfer-queue0:low"
    assert with_lanes([q0, c0]) == [q0, c0, f"{q0}:normal", f"{c0}:normal", f"{q0}:low", f"{c0}:low"]
    with pytest.raises(ValueError, match="unknown priority 'urgent'"):
        lane_stream(q0, "urgent")


def test_a_job_id_names_its_queue_and_anything_else_is_not_a_job():
    assert job_id(REQUEST_ID, 3) == f"{REQUEST_ID}.3"
    assert parse_job_id(f"{REQUEST_ID}.3") == (REQUEST_ID, 3)
    assert job_key(REQUEST_ID, 3) == f"goinfer:job:{{q3}}:{REQUEST_ID}"
    for bad in ("", REQUEST_ID, f"{REQUEST_ID}.", f"{REQUEST_ID}.x", f"{REQUEST_ID}.12345", f"../{REQUEST_ID}.1",
                f"{REQUEST_ID.upper()}.1", f"{REQUEST_ID}.1\n", f"{REQUEST_ID}.\u0661"):
        assert parse_job_id(bad) is None, bad


def test_a_job_record_round_trips_through_the_hash_fields():
    queued = JobRecord(JOB_QUEUED, "app", "/api/echo", 1.5)
    assert JobRecord.decode({k.encode(): v.encode() for k, v in queued.fields().items()}) == queued
    fields = {**queued.fields(), **job_started_fields(2.0)}
    assert JobRecord.decode(fields) == JobRecord(JOB_RUNNING, "app", "/api/echo", 1.5, started=2.0)
    done = Reply(REQUEST_ID, 0, data={"x": 1}, revision="2:ab")
    record = JobRecord.decode({**fields, **job_finished_fields(done.encode(), 0, 3.0)})
    assert record is not None and (record.state, record.finished, record.reply) == (JOB_DONE, 3.0, done)
    failed = Reply(REQUEST_ID, 9998, "infer fail : boom")
    record = JobRecord.decode({**fields, **job_finished_fields(failed.encode(), 9998, 3.0)})
    assert record is not None and record.state == JOB_FAILED and record.reply == failed
    assert JobRecord.decode({}) is None
    assert JobRecord.decode({"state": "weird", "app_id": "a", "api": "/x"}) is None


def test_a_job_message_carries_its_record_key():
    job = Job(REQUEST_ID, "/api/echo", {"a": 1}, "", 10.0, job_key=job_key(REQUEST_ID, 0))
    assert Job.decode(job.encode()) == job
    assert Job.decode(Job(REQUEST_ID, "/api/echo", {}, "r", 1.0).encode()).job_key is None


def test_priority_settings_choose_the_lane():
    settings = parse_settings("API: {AppIdPriority: {nightly: LOW}}\n"
                              "Models: [{Class: a:B, Priority: normal}, a:C]")
    assert settings.api.app_id_priority == {"nightly": "low"}
    config = settings.model_config("a:B")
    assert settings.priority_of("high", "nightly", config) == "low"  # the appId's first
    assert settings.priority_of("high", "other", config) == "normal"  # then the model's
    assert settings.priority_of("high", "other", settings.model_config("a:C")) == "high"  # then the kind's
    assert settings.priority_of("low") == "low"
    for bad, message in (("API: {AppIdPriority: {a: urgent}}", "API.AppIdPriority: expected one of high, normal, low"),
                         ("Models: [{Class: a:B, Priority: 3}]", "a:B: Priority expected one of high, normal, low"),
                         ("Server: {JobTimeout: 0}", "Server.JobTimeout: must be a positive number")):
        with pytest.raises(SettingsError, match=message):
            parse_settings(bad)


def test_a_reply_goes_to_the_future_waiting_for_its_id_and_junk_is_refused():
    import asyncio

    from goinfer.queue import deliver_reply

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        waiting = {REQUEST_ID: loop.create_future(), "gone": loop.create_future()}
        waiting["gone"].cancel()  # its client timed out: nothing to hand it to
        reply = Reply(REQUEST_ID, 0, data={"x": 1})
        assert deliver_reply(reply.encode(), waiting) == reply
        assert waiting[REQUEST_ID].result() == reply
        assert deliver_reply(Reply("gone", 0).encode(), waiting).id == "gone"
        assert deliver_reply(Reply("unknown", 0).encode(), waiting).id == "unknown"
        for junk in (b"", b"[]", b'{"code": 0}', b'{"id": "x"}', b"\xff"):
            with pytest.raises(ValueError):
                deliver_reply(junk, waiting)

    asyncio.run(scenario())
