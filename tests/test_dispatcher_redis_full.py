"""A dispatcher against Redis at maxmemory, and against requests whose client is gone, with real
processes: computed replies are kept until Redis takes them, orphans are skipped unrun, and
`goinfer check` insists on the only maxmemory-policy that never deletes goinfer's keys."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import OutOfMemoryError

from goinfer.dispatcher.orphans import TierWatch
from goinfer.dispatcher.stream import RepliesRefused, StreamConsumer
from goinfer.queue import (
    CONSUMER_GROUP,
    STAT_ORPHANED,
    TIER_ALIVE_TTL_S,
    Job,
    Reply,
    stats_key,
    stream_name,
    tier_alive_key,
)
from goinfer.testing import TEST_CREDENTIALS

from conftest import (
    post_raw,
    process_env,
    settings_of,
    start_redis,
    stop_redis,
    url_of,
    wait_until,
    write_settings,
)

# One back-off step of the wait for Redis to take the replies back, as the dispatcher logs it.
HOLD_STEP = re.compile(r"WARNING \S+: redis at \S+ unavailable \(OOM: used memory is over maxmemory; "
                       r"(\d+) repl(?:y|ies) kept until Redis takes them\); worker \d+ retrying in ([\d.]+)s$", re.M)


@pytest.fixture
def own_redis():
    server = start_redis()
    yield server
    stop_redis(server)


def test_replies_refused_at_maxmemory_are_kept_and_delivered_once_memory_is_freed(tmp_path, own_redis, processes):
    settings = write_settings(tmp_path, own_redis.address, Models=["sample_models:Gated"],
                              Server={"MaxWorkers": 2, "MessageTimeout": 60})
    server = processes.server(settings)
    processes.http(settings)
    url = url_of(settings) + "/api/gated"
    stream = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
    gate, executions = tmp_path / "gate", tmp_path / "executions"
    client = own_redis.client()
    count = 12

    def call(i: int) -> dict[str, Any]:
        body = TEST_CREDENTIALS.body({"i": i, "gate": str(gate), "log": str(executions)})
        return post_raw(url, body, timeout=90)[1]

    with ThreadPoolExecutor(count) as pool:
        answers = [pool.submit(call, i) for i in range(count)]
        # Both workers are in infer, behind the gate; the other requests wait in the stream.
        wait_until(lambda: client.xlen(stream) == count and client.xpending(stream, CONSUMER_GROUP)["pending"] == 2,
                   30, "two requests taken, all queued")
        client.config_set("maxmemory", 1)  # noeviction (the default): every write that needs memory is refused
        gate.touch()
        wait_until(lambda: executions.exists() and len(executions.read_text().split()) >= 2, 30, "two executions")
        time.sleep(1.5)  # a few steps of the back-off (0.1 s doubling)
        # Nothing was acknowledged with its reply lost: both entries are still pending, with their workers,
        # and so is the next request each worker read in the same round trip (reads work at maxmemory).
        assert client.xlen(stream) == count
        assert client.xpending(stream, CONSUMER_GROUP)["pending"] == 4
        assert len(executions.read_text().split()) == 2  # and nothing ran again meanwhile
        assert len(HOLD_STEP.findall(server.output)) >= 3, server.output
        client.config_set("maxmemory", 0)
        envelopes = [answer.result(90) for answer in answers]

    assert [envelope["code"] for envelope in envelopes] == [0] * count, envelopes
    assert sorted(envelope["data"]["i"] for envelope in envelopes) == list(range(count))
    ran = executions.read_text().split()
    assert len(ran) == count and len(set(ran)) == count  # each ran once: nothing was run again
    wait_until(lambda: client.xlen(stream) == 0, 10, "every entry acknowledged and deleted")
    output = server.output
    steps = HOLD_STEP.findall(output)
    # One voice for the dispatcher, on the back-off (two workers seeing the first step at once may both say it).
    delays = [float(delay) for _, delay in steps]
    assert delays[0] == 0.1 and delays[-1] <= 5.0 and len(steps) <= 12, output
    assert "answers again" in output
    assert "Traceback" not in output and "died" not in output and "ERROR" not in output


def test_a_refused_send_does_nothing_and_the_same_send_succeeds_later(own_redis):
    client = own_redis.client()
    stream, reply_to = f"test-full-{uuid.uuid4().hex[:8]}-0", f"goinfer:reply:{uuid.uuid4().hex}"
    worker = StreamConsumer(client, [stream], "w0", read_count=2)
    worker.ensure_groups()
    jobs = [Job(f"r{i}", "/api/x", {}, reply_to, time.time() + 60) for i in range(3)]
    for request in jobs:
        client.xadd(stream, {"m": request.encode()})
    taken = worker.read(block_ms=None)
    worker.count(stream, STAT_ORPHANED)
    done = [(item, Reply(item.job.id, 0, data={"ok": 1}).encode()) for item in taken if item.job]
    client.config_set("maxmemory", 1)
    try:
        with pytest.raises(RepliesRefused) as refused:
            worker.finish(done, read_next=True)
        assert refused.value.done == done and [item.job for item in refused.value.following] == jobs[2:]
        # Redis accepts XACK at maxmemory, but nothing was acknowledged without its reply.
        assert client.xpending(stream, CONSUMER_GROUP)["pending"] == 3 and client.llen(reply_to) == 0
    finally:
        client.config_set("maxmemory", 0)
    assert worker.finish(refused.value.done) == []
    assert [Reply.decode(raw).id for raw in client.lrange(reply_to, 0, -1)] == ["r0", "r1"]
    assert client.xpending(stream, CONSUMER_GROUP)["pending"] == 1 and client.xlen(stream) == 1
    assert client.hget(stats_key(stream), STAT_ORPHANED) == b"1"  # kept, and written once


def test_tier_watch_asks_once_for_all_keys_and_trusts_a_live_one_briefly(own_redis):
    client = own_redis.client()
    now = [100.0]
    watch = TierWatch(client, trust_s=1.0, clock=lambda: now[0])
    live, dead = tier_alive_key("goinfer:reply:live"), tier_alive_key("goinfer:reply:dead")
    client.set(live, "1", ex=60)
    calls = client.info("commandstats").get("cmdstat_exists", {}).get("calls", 0)
    assert watch.gone([live, dead, live]) == {dead}
    assert watch.gone([live]) == set() and watch.gone([]) == set()  # trusted: no question asked
    assert client.info("commandstats")["cmdstat_exists"]["calls"] - calls == 2
    client.delete(live)
    assert watch.gone([live]) == set()  # still trusted within trust_s
    now[0] += 1.0
    assert watch.gone([live]) == {live}


def test_after_an_outage_every_tier_is_believed_alive_while_tiers_write_their_keys_again(own_redis):
    """A Redis restarted from its append-only file, or a promoted replica, may hold liveness keys
    that expired while their tiers could not reach it: not a sign that the tiers died."""
    now = [100.0]
    watch = TierWatch(own_redis.client(), clock=lambda: now[0])
    missing = tier_alive_key("expired-during-the-outage")
    watch.outage()
    now[0] += 30.0  # the outage lasts; the grace starts when Redis answers the first question
    assert watch.gone([missing]) == set()
    now[0] += TIER_ALIVE_TTL_S - 0.1
    assert watch.gone([missing]) == set()
    now[0] += 0.2
    assert watch.gone([missing]) == {missing}


def test_a_dispatcher_starting_at_maxmemory_serves_with_the_groups_that_exist(own_redis):
    client = own_redis.client()
    stream = f"test-full-{uuid.uuid4().hex[:8]}-0"
    StreamConsumer(client, [stream], "w0").ensure_groups()
    client.config_set("maxmemory", 1)
    try:
        StreamConsumer(client, [stream], "w1").ensure_groups()  # XGROUP CREATE is refused; the group exists
        with pytest.raises(OutOfMemoryError):
            StreamConsumer(client, [stream + "-new"], "w1").ensure_groups()  # no group: it must wait
    finally:
        client.config_set("maxmemory", 0)


def test_requests_whose_http_process_is_gone_are_skipped_unrun(tmp_path, redis_server, processes):
    settings = write_settings(tmp_path, redis_server.address, Models=["sample_models:BatchRecorder"],
                              Server={"MaxWorkers": 1})
    queue = settings_of(settings)["Server"]["QueueName"]
    stream = stream_name(queue, 0)
    client = redis_server.client()
    gone_tier, live_tier = f"goinfer:reply:gone-{uuid.uuid4().hex}", f"goinfer:reply:live-{uuid.uuid4().hex}"
    client.set(tier_alive_key(live_tier), "1", ex=60)

    def job(reply_to: str, alive: str | None) -> Job:
        return Job(f"20260101{uuid.uuid4().hex}", "/api/record-batch", {}, reply_to, time.time() + 60, alive)

    orphans = [job(gone_tier, tier_alive_key(gone_tier)) for _ in range(5)]
    live = job(live_tier, tier_alive_key(live_tier))
    unnamed = job(live_tier, None)  # from a sender that keeps no liveness key: never skipped for it
    for request in [*orphans[:3], live, *orphans[3:], unnamed]:
        client.xadd(stream, {"m": request.encode()})  # before the dispatcher: one read, one batch

    server = processes.server(settings)
    replies = [Reply.decode(client.blpop([live_tier], timeout=30)[1]) for _ in range(2)]
    assert sorted(reply.id for reply in replies) == sorted([live.id, unnamed.id])
    assert all(reply.code == 0 for reply in replies)
    wait_until(lambda: client.xlen(stream) == 0, 10, "every entry acknowledged and deleted")
    wait_until(lambda: client.hget(stats_key(stream), STAT_ORPHANED) == b"5", 10, "the orphans counted")
    executed = {item.decode() for item in client.lrange(f"{queue}executions", 0, -1)}
    assert executed == {live.id, unnamed.id}
    assert client.llen(gone_tier) == 0 and client.xpending(stream, CONSUMER_GROUP)["pending"] == 0
    skipped = re.findall(r"skipping (\d+) request\(s\) unrun: the HTTP process waiting for them is gone", server.output)
    assert skipped == ["5"], server.output  # one line for the batch, not one per request


def goinfer_check(settings: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "goinfer", "check", "--yaml", str(settings)], capture_output=True,
                          text=True, env=process_env(), timeout=60)


def test_check_fails_on_an_eviction_policy_and_passes_on_noeviction(tmp_path, own_redis):
    settings = write_settings(tmp_path, own_redis.address)
    client = own_redis.client()
    client.config_set("maxmemory-policy", "allkeys-lru")
    evicting = goinfer_check(settings)
    [line] = [line for line in evicting.stdout.splitlines() if line.startswith("redis:")]
    assert line.startswith(f"redis: FAIL: {own_redis.address}, redis ") and "maxmemory-policy allkeys-lru: " in line
    assert line.endswith("set maxmemory-policy noeviction") and evicting.returncode == 1

    client.config_set("maxmemory-policy", "noeviction")
    refusing = goinfer_check(settings)
    [line] = [line for line in refusing.stdout.splitlines() if line.startswith("redis:")]
    assert line.startswith(f"redis: ok ({own_redis.address}, redis ") and "maxmemory-policy noeviction" in line
    assert refusing.returncode == 0, refusing.stdout


def test_a_heartbeat_stays_alive_at_maxmemory(own_redis):
    """SET is refused at maxmemory, EXPIRE is not: a full Redis must not make a serving dispatcher
    look dead to /ready once its key's TTL runs out."""
    from goinfer.dispatcher.heartbeat import Heartbeat
    from goinfer.queue import DispatcherHeartbeat, dispatcher_key
    from goinfer.settings import ServerSettings

    server = ServerSettings(redis_server=own_redis.address, heartbeat_interval_s=1)
    key = dispatcher_key("test-host", 4242)
    heartbeat = Heartbeat(server, key, lambda: DispatcherHeartbeat(host="test-host", pid=4242, live_workers=1))
    client = own_redis.client()
    assert heartbeat.beat()
    client.config_set("maxmemory", 1)
    try:
        time.sleep(1.1)  # part of the 3 s TTL has gone
        assert heartbeat.beat()
        assert client.ttl(key) == 3, "EXPIRE renewed the key written before Redis filled up"
    finally:
        client.config_set("maxmemory", 0)
        heartbeat.stop()
