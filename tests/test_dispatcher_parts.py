"""The dispatcher's parts, in this process: message formats, batching and restart decisions, Redis
outage handling, and the stream protocol and crash recovery against the real redis-server."""

from __future__ import annotations

import json
import logging
import multiprocessing
import signal
import uuid
from typing import Any

import pytest
from redis.exceptions import AuthenticationError, ConnectionError, NoPermissionError, ResponseError, TimeoutError

from goinfer.connections import refusal
from goinfer.dispatcher.batching import BatchPolicy, batch_policies, fill, plan, read_size, wants_more
from goinfer.dispatcher.outage import Backoff, OutageLog
from goinfer.dispatcher.reclaim import claim_stale
from goinfer.dispatcher.restarts import RestartPolicy, TooManyDeaths
from goinfer.dispatcher.round_trip import HeldConnection, RoundTrip
from goinfer.dispatcher.runner import Runner
from goinfer.dispatcher.stream import StreamConsumer, decode_entry
from goinfer.models.echo import Echo
from goinfer.processes import start_child
from goinfer.queue import (
    CONSUMER_GROUP,
    STAT_DEAD_LETTERED,
    DispatcherHeartbeat,
    Job,
    Reply,
    dead_letter_stream,
    stats_key,
    streams_for,
)
from goinfer.settings import ServerSettings, Settings

from sample_models import Batcher, Faulty


def job(api: str = "/api/echo", **params: Any) -> Job:
    return Job(f"20260101{uuid.uuid4().hex}", api, params, f"test-reply-{uuid.uuid4().hex}", 4102444800.0)


# --- message formats ---------------------------------------------------------------------------


def test_job_round_trip():
    original = job(text="héllo \u2028 <&>", n=[1, 2.5, None, {"deep": True}])
    assert Job.decode(original.encode()) == original
    assert Job.decode(original.encode().encode()) == original


def test_reply_round_trip():
    class Array:  # numpy-like: what models commonly return
        def tolist(self) -> list[float]:
            return [0.5, 1.0]

    success = Reply("r1", 0, data={"v": Array(), "s": "ü"}, queued_ms=1.23456, infer_ms=7.0)
    decoded = Reply.decode(success.encode())
    assert (decoded.id, decoded.code, decoded.data) == ("r1", 0, {"v": [0.5, 1.0], "s": "ü"})
    assert (decoded.queued_ms, decoded.infer_ms) == (1.235, 7.0)
    failure = Reply.decode(Reply("r2", 9998, "infer fail : boom").encode())
    assert (failure.code, failure.msg, failure.data, failure.queued_ms) == (9998, "infer fail : boom", None, None)


def test_heartbeat_round_trip_keeps_the_field_names_readers_use():
    beat = DispatcherHeartbeat(host="h", pid=7, queue_index=1, streams=("q1", "c1"), apis=("/api/echo",),
                               models=("m:E",), max_workers=2, live_workers=1, restarts=3, metrics_port=9101,
                               version="1.0", started_at=1.5, heartbeat_at=2.5, heartbeat_interval_s=5.0,
                               state="loading", loading_s=6.1, revisions={"/api/echo": "2:abc"}, revision_at=3.5,
                               devices=("0", "1"), rollout="rolling to 2", reload_error="version 3: init failed")
    assert DispatcherHeartbeat.decode(beat.encode()) == beat
    assert set(json.loads(beat.encode())) == {
        "host", "pid", "queue_index", "streams", "apis", "models", "max_workers", "live_workers", "restarts",
        "metrics_port", "version", "started_at", "heartbeat_at", "heartbeat_interval_s", "state", "loading_s",
        "revisions", "revision_at", "devices", "rollout", "reload_error"}


def test_a_heartbeat_without_the_loading_fields_is_a_serving_one():
    """Heartbeats of dispatchers from before loading states count as serving, as they did."""
    old = DispatcherHeartbeat.decode(b'{"host":"h","pid":1,"live_workers":1,"revisions":{"/a":3}}')
    assert old is not None and old.serving and old.revisions == {}
    loading = DispatcherHeartbeat(live_workers=1, max_workers=2, state="loading")
    assert loading.loading and not loading.serving


HOSTILE = [
    b"", b"\xff\xfe", b"not json", b"null", b"[]", b"42", b'"text"', b"[" * 100_000, b'{"a":' * 100_000,
    b'{"id":"x","api":"a","reply_to":"r","deadline":1}',                           # no params
    b'{"id":"x","api":"a","params":[],"reply_to":"r","deadline":1}',               # params not an object
    b'{"api":"a","params":{},"reply_to":"r","deadline":1}',                        # no id
    b'{"id":"x","api":"a","params":{},"reply_to":"r","deadline":"soon"}',
    b'{"id":"x","api":"a","params":{},"reply_to":"r","deadline":[1]}',
    b'{"id":"x","api":"a","params":{},"reply_to":"r"}',
]


@pytest.mark.parametrize("raw", HOSTILE, ids=lambda raw: repr(raw[:40]))
def test_a_hostile_entry_is_dropped_never_raised(raw):
    item = decode_entry(b"q0", b"1-0", {b"m": raw})
    assert item.job is None and item.stream == "q0" and item.raw == raw


def test_an_entry_without_a_job_field_is_dropped():
    assert decode_entry("q0", b"1-0", {b"other": b"x"}).job is None
    good = job()
    assert decode_entry("q0", b"1-0", {b"m": good.encode().encode()}).job == good


@pytest.mark.parametrize("raw", HOSTILE + [b'{"id":"x","code":"abc"}', b'{"id":"x","code":1e999}', b'{"code":0}'],
                         ids=lambda raw: repr(raw[:40]))
def test_a_hostile_reply_raises_only_what_the_http_tier_catches(raw):
    try:
        Reply.decode(raw)
    except (ValueError, KeyError, TypeError):
        pass


@pytest.mark.parametrize("raw", HOSTILE, ids=lambda raw: repr(raw[:40]))
def test_a_hostile_heartbeat_is_none_or_typed(raw):
    beat = DispatcherHeartbeat.decode(raw)
    assert beat is None or isinstance(beat, DispatcherHeartbeat)


def test_heartbeat_fields_of_the_wrong_type_are_dropped():
    raw = json.dumps({"host": 5, "pid": "7", "live_workers": True, "streams": ["q0", 1], "apis": "x",
                      "started_at": 3, "secret": "s3cr3t", "restarts": 2})
    beat = DispatcherHeartbeat.decode(raw)
    assert beat == DispatcherHeartbeat(started_at=3.0, restarts=2)
    assert "s3cr3t" not in beat.encode()


def test_streams_for():
    assert streams_for("q", [None, "c", "b", "c", "q"], [0], with_default=True) == ["{q0}q0", "{q0}b0", "{q0}c0"]
    assert streams_for("q", ["c"], [0]) == ["{q0}c0"]
    assert streams_for("q", ["c"], [0], with_default=True) == ["{q0}q0", "{q0}c0"]
    assert streams_for("q", [None, "c"], [0, 1]) == ["{q0}q0", "{q1}q1", "{q0}c0", "{q1}c1"]
    assert streams_for("q", [], [3], with_default=True) == ["{q3}q3"]


# --- batching decisions ------------------------------------------------------------------------


def test_batch_policies_take_the_model_over_the_settings():
    server = ServerSettings(batch_size=4, batch_timeout_ms=5)
    policies = batch_policies(server, {"/api/echo": Echo(), "/api/batch": Batcher()})
    assert policies == {"/api/batch": BatchPolicy(8, 0.05)}
    assert read_size(policies) == 8 and read_size({}) == 1


def test_wants_more_while_a_batch_is_partial():
    policies = {"/a": BatchPolicy(4, 0.05), "/b": BatchPolicy(2, 0.01)}
    assert wants_more(policies, {"/a": 1, "/b": 1}) == 0.05
    assert wants_more(policies, {"/a": 4, "/b": 1}) == 0.01
    assert wants_more(policies, {"/a": 4, "/b": 2, "/c": 1}) == 0.0
    assert wants_more(policies, {}) == 0.0


def test_plan_runs_singles_in_order_then_chunked_batches():
    policies = {"/b": BatchPolicy(2, 0.0), "/c": BatchPolicy(3, 0.0)}
    items = [("/c", 1), ("/s", 2), ("/b", 3), ("/b", 4), ("/s", 5), ("/b", 6), ("/c", 7)]
    works = plan(items, lambda item: item[0], policies)
    assert [(w.api, [i for _, i in w.items], w.batched) for w in works] == [
        ("/s", [2], False), ("/s", [5], False), ("/c", [1, 7], True), ("/b", [3, 4], True), ("/b", [6], True)]


def test_fill_reads_until_the_batch_is_full():
    arrivals = [[("/b", 2)], [], [("/b", 3), ("/b", 4)], [("/b", 5)]]
    asked: list[int] = []

    def read(n: int) -> list:
        asked.append(n)
        return arrivals.pop(0) if arrivals else []

    filled = fill([("/b", 1)], read, lambda item: item[0], {"/b": BatchPolicy(4, 60.0)}, limit=4)
    assert filled == [("/b", 1), ("/b", 2), ("/b", 3), ("/b", 4)]
    assert asked == [3, 2, 2]


def test_fill_does_not_read_for_models_that_do_not_wait():
    def read(n: int) -> list:
        raise AssertionError("read although nothing waits")

    items = [("/s", 1)]
    assert fill(items, read, lambda item: item[0], {}, limit=8) == items
    assert fill(items, read, lambda item: item[0], {"/b": BatchPolicy(4, 60.0)}, limit=8) == items
    full = [("/b", i) for i in range(4)]
    assert fill(full, read, lambda item: item[0], {"/b": BatchPolicy(4, 60.0)}, limit=8) == full


# --- restarts and outages ----------------------------------------------------------------------


def test_backoff_doubles_to_five_seconds_and_resets():
    backoff = Backoff()
    assert [backoff.step() for _ in range(9)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    backoff.reset()
    assert backoff.step() == 0.1


def test_restarts_back_off_per_slot_and_reset_after_a_long_life():
    policy = RestartPolicy(limit=100, window_s=60, stable_after_s=30)
    assert [policy.died(0, 1.0, t) for t in range(4)] == [0.1, 0.2, 0.4, 0.8]
    assert policy.died(1, 1.0, 4) == 0.1  # another slot has its own back-off
    assert policy.died(0, 31.0, 5) == 0.1  # lived long: healthy, starts over
    assert policy.died(0, 1.0, 6) == 0.2


def test_too_many_deaths_within_the_window_stop_the_dispatcher():
    policy = RestartPolicy(limit=2, window_s=10)
    policy.died(0, 1.0, 100.0)
    policy.died(1, 1.0, 101.0)
    with pytest.raises(TooManyDeaths, match=r"3 worker deaths within 10s, more than Server.WorkerRestartLimit \(2"):
        policy.died(0, 1.0, 102.0)
    spaced = RestartPolicy(limit=2, window_s=10)
    for t in (0.0, 6.0, 12.0, 18.0, 24.0):  # never more than 2 within 10 s
        spaced.died(0, 1.0, t)


def test_a_restart_limit_of_zero_stops_at_the_first_death():
    with pytest.raises(TooManyDeaths):
        RestartPolicy(limit=0, window_s=60).died(0, 100.0, 1.0)


class Shared:
    value = -1


def test_one_process_reports_an_outage_the_others_stay_quiet(caplog):
    server = ServerSettings(redis_server="127.0.0.1:1")
    shared = Shared()
    first, second = OutageLog(server, 0, "worker 0", shared), OutageLog(server, 1, "worker 1", shared)
    caplog.set_level(logging.DEBUG, logger="goinfer.dispatcher")
    first.failed(ConnectionError("refused"), 0.1)
    second.failed(ConnectionError("refused"), 0.1)
    first.failed(ConnectionError("refused"), 0.2)
    second.recovered()
    first.recovered()
    second.recovered()
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in lines] == [logging.WARNING, logging.DEBUG, logging.WARNING, logging.INFO]
    assert lines[0][1] == "redis at 127.0.0.1:1 unavailable (refused); worker 0 retrying in 0.1s"
    assert lines[3][1] == "redis at 127.0.0.1:1 answers again"
    assert shared.value == -1
    second.failed(ConnectionError("refused"), 0.1)  # the next outage: whoever sees it first
    assert caplog.records[-1].levelno == logging.WARNING and "worker 1" in caplog.records[-1].getMessage()


def test_refusals_name_the_setting_never_the_password():
    secret = "pa55-Very-Secret"
    with_password = ServerSettings(redis_server="127.0.0.1:7480", redis_passwd=secret)
    message = str(refusal(AuthenticationError("invalid username-password pair or user is disabled."),
                          with_password))
    assert message == ("redis at 127.0.0.1:7480 refuses Server.RedisPasswd: invalid username-password pair "
                       "or user is disabled.")
    in_url = ServerSettings(redis_server=f"redis://app:{secret}@10.0.0.5:6390")
    message = str(refusal(AuthenticationError("invalid username-password pair"), in_url))
    assert "the credentials in Server.RedisServer" in message and "10.0.0.5:6390" in message
    assert secret not in message
    none = str(refusal(AuthenticationError("Authentication required."), ServerSettings()))
    assert "requires a password and Server.RedisPasswd is empty" in none
    acl = str(refusal(NoPermissionError("Command # 3 (XACK q0 goinfer 1-0) of pipeline caused error: this user "
                                        "has no permissions to run the 'xack' command"), with_password))
    assert acl.endswith("NOPERM this user has no permissions to run the 'xack' command")
    assert "XACK q0" not in acl and secret not in acl


def test_an_outage_or_a_lost_group_is_no_refusal():
    server = ServerSettings(redis_passwd="x")
    assert refusal(ConnectionError("Error 111 connecting"), server) is None
    assert refusal(ResponseError("NOGROUP No such key"), server) is None
    assert refusal(OSError("network down"), server) is None


def test_start_child_ignores_sigint_in_the_child_from_the_start():
    handler = signal.getsignal(signal.SIGINT)
    # The child's whole job is to get SIGINT: it exits 0 only if SIGINT is ignored there.
    child = multiprocessing.get_context("spawn").Process(target=signal.raise_signal, args=(signal.SIGINT,))
    start_child(child)
    child.join(60)
    assert child.exitcode == 0
    assert signal.getsignal(signal.SIGINT) is handler


# --- running models ----------------------------------------------------------------------------


def test_a_result_that_is_not_json_answers_infer_fail_and_is_logged(caplog):
    runner = Runner(Settings(), {"/api/faulty": Faulty()})
    request = job("/api/faulty", mode="infer-not-json")
    with caplog.at_level(logging.ERROR, logger="goinfer.worker"):
        reply = Reply.decode(runner.execute(request))
    assert reply.code == 9998 and reply.msg.startswith("infer fail : ")
    [record] = caplog.records
    assert "Faulty" in record.getMessage() and request.id in record.getMessage()


def test_every_outcome_of_a_model_is_one_reply():
    runner = Runner(Settings(), {"/api/faulty": Faulty()})
    codes = {mode: Reply.decode(runner.execute(job("/api/faulty", mode=mode))).code
             for mode in ("ok", "infer-apierror", "infer-exception", "infer-not-dict")}
    assert codes == {"ok": 0, "infer-apierror": 5432, "infer-exception": 9998, "infer-not-dict": 9998}
    unknown = Reply.decode(runner.execute(job("/api/nowhere")))
    assert (unknown.code, unknown.msg) == (9999, "unknown api : /api/nowhere")
    batcher = Batcher()
    jobs = [job("/api/batch", i=i, **({"wrong-length": True} if i == 1 else {})) for i in range(3)]
    replies = [Reply.decode(r) for r in Runner(Settings(), {"/api/batch": batcher}).execute_batch(batcher, jobs)]
    assert [r.code for r in replies] == [9998] * 3 and "must return a list of 3 results" in replies[0].msg


# --- the stream protocol and crash recovery, on the real redis-server --------------------------


@pytest.fixture
def stream_name() -> str:
    return f"test-parts-{uuid.uuid4().hex[:10]}-0"


def consumer(redis_server, stream: str, name: str) -> StreamConsumer:
    worker = StreamConsumer(redis_server.client(), [stream], name)
    worker.ensure_groups()
    worker.ensure_groups()  # an existing group is fine
    return worker


def test_replies_acks_and_the_next_read_share_one_round_trip(redis_server, stream_name):
    client = redis_server.client()
    worker = consumer(redis_server, stream_name, "w1")
    first, second = job(), job()
    client.xadd(stream_name, {"m": first.encode()})
    [taken] = worker.read(block_ms=None)
    assert taken.job == first
    client.xadd(stream_name, {"m": second.encode()})
    worker.count(stream_name, "deadline_dropped")
    following = worker.finish([(taken, Reply(first.id, 0, data={"ok": 1}).encode())], read_next=True)
    assert [item.job for item in following] == [second]
    assert 0 < client.ttl(first.reply_to) <= 300
    assert Reply.decode(client.lpop(first.reply_to)).data == {"ok": 1}
    assert client.xrange(stream_name) == [(following[0].entry_id, {b"m": second.encode().encode()})]
    assert client.xpending(stream_name, CONSUMER_GROUP)["pending"] == 1  # only the one just read
    assert client.hget(stats_key(stream_name), "deadline_dropped") == b"1"


def test_a_round_trip_reads_back_what_redis_pys_pipeline_reads(redis_server, stream_name):
    """RoundTrip (the workers' lean pipeline): each reply in order, a refused command's error
    in its place without failing the others, XREADGROUP's entries as redis-py shapes them."""
    client = redis_server.client()
    client.xgroup_create(stream_name, CONSUMER_GROUP, id="0", mkstream=True)
    entry_id = client.xadd(stream_name, {"m": "one", "x": "2"})
    wrong_type = f"{stream_name}-string"
    client.set(wrong_type, "not a list")

    def queue(pipe: Any) -> None:
        pipe.rpush(wrong_type, "a")  # WRONGTYPE: refused
        pipe.expire(wrong_type, 60)
        pipe.xreadgroup(CONSUMER_GROUP, "w1", {stream_name: ">"}, count=5, block=10)
        pipe.xreadgroup(CONSUMER_GROUP, "w1", {stream_name: ">"}, count=5, block=10)  # nothing left

    held = HeldConnection()
    lean = RoundTrip(client, held)
    queue(lean)
    results = lean.execute()
    assert isinstance(results[0], ResponseError) and "WRONGTYPE" in str(results[0])
    assert results[1:] == [1, [[stream_name.encode(), [(entry_id, {b"m": b"one", b"x": b"2"})]]], []]
    client.xgroup_setid(stream_name, CONSUMER_GROUP, "0")  # the same entry, read again by redis-py
    pipe = client.pipeline(transaction=False)
    queue(pipe)
    expected = pipe.execute(raise_on_error=False)
    assert type(expected[0]) is type(results[0])
    assert expected[1:] == [True, *results[2:]]  # EXPIRE raw (1), not as redis-py's bool


def test_a_round_trip_cut_short_leaves_no_reply_behind(redis_server, stream_name):
    """A round trip that fails while reading leaves no reply on its connection for a later one
    to read as its own (redis-py closes a connection that timed out; RoundTrip closes it on any
    failure)."""
    client = redis_server.client(socket_timeout=0.2)
    client.xgroup_create(stream_name, CONSUMER_GROUP, id="0", mkstream=True)
    held = HeldConnection()
    cut = RoundTrip(client, held)
    cut.execute_command("SET", f"{stream_name}-k", "first")
    cut.xreadgroup(CONSUMER_GROUP, "w1", {stream_name: ">"}, count=1, block=600)  # outlasts the timeout
    with pytest.raises(TimeoutError):
        cut.execute()
    after = RoundTrip(client, held)
    after.execute_command("GET", f"{stream_name}-k")
    assert after.execute() == [b"first"]


def test_a_dead_workers_entry_is_claimed_once_stale(redis_server, stream_name):
    client = redis_server.client()
    dead = consumer(redis_server, stream_name, "dead")
    rescuer = consumer(redis_server, stream_name, "rescuer")
    request = job()
    client.xadd(stream_name, {"m": request.encode()})
    assert [item.job for item in dead.read(block_ms=None)] == [request]
    reply = Runner(Settings(), {}).error_reply

    def dead_reply(j: Job) -> str:
        return reply(j, "DeadLettered")

    assert claim_stale(rescuer, 60_000, 3, 100, dead_reply) == []  # fresh: its owner may be alive
    assert claim_stale(rescuer, 0, 3, 100, dead_reply, own=True) == []  # not the rescuer's own
    [again] = claim_stale(rescuer, 0, 3, 100, dead_reply)
    assert again.job == request
    [row] = client.xpending_range(stream_name, CONSUMER_GROUP, "-", "+", 10)
    assert (row["consumer"], row["times_delivered"]) == (b"rescuer", 2)
    [own] = claim_stale(rescuer, 0, 3, 100, dead_reply, own=True)  # a restarted rescuer finds it again
    assert own.job == request
    assert client.llen(request.reply_to) == 0


def test_an_entry_delivered_max_deliveries_times_is_dead_lettered_and_answered(redis_server, stream_name):
    client = redis_server.client()
    first, second = consumer(redis_server, stream_name, "first"), consumer(redis_server, stream_name, "second")
    poison = job(crash=True)
    client.xadd(stream_name, {"m": poison.encode()})
    first.read(block_ms=None)
    runner = Runner(Settings(), {})
    assert claim_stale(second, 0, 3, 100, lambda j: runner.error_reply(j, "DeadLettered")) != []  # 2nd delivery
    assert claim_stale(first, 0, 2, 100, lambda j: runner.error_reply(j, "DeadLettered")) == []  # 2 >= 2: aside
    answer = Reply.decode(client.lpop(poison.reply_to))
    assert (answer.id, answer.code) == (poison.id, 9705)
    [(_, fields)] = client.xrange(dead_letter_stream(stream_name))
    assert fields[b"m"] == poison.encode().encode() and b"delivered 2 times" in fields[b"reason"]
    assert client.xlen(stream_name) == 0 and client.xpending(stream_name, CONSUMER_GROUP)["pending"] == 0
    assert client.hget(stats_key(stream_name), STAT_DEAD_LETTERED) == b"1"


def test_a_malformed_entry_is_dead_lettered_without_an_answer(redis_server, stream_name):
    client = redis_server.client()
    first, second = consumer(redis_server, stream_name, "first"), consumer(redis_server, stream_name, "second")
    client.xadd(stream_name, {"m": b"[" * 100_000})
    [item] = first.read(block_ms=None)
    assert item.job is None
    assert claim_stale(second, 0, 1, 100, lambda j: pytest.fail("answered a malformed entry")) == []
    [(_, fields)] = client.xrange(dead_letter_stream(stream_name))
    assert fields[b"m"] == b"[" * 100_000
    assert client.xlen(stream_name) == 0
