"""Slow is not poison: a model that holds the GIL runs once, and only MaxInferSeconds makes it stuck.

The requests' liveness comes from the supervisor (goinfer/dispatcher/liveness.py), which no model
can starve; the models here hold the GIL in one C call (tests/sample_models.py: GilHolder), so no
thread of their worker runs meanwhile. Executions are counted in Redis by the model itself.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from goinfer import Model
from goinfer.client import Client, GoinferError
from goinfer.dispatcher.liveness import CAPACITY, Call, CallBoard, EntryKeeper, Holder, infer_limit_s, settle_overdue
from goinfer.queue import CONSUMER_GROUP, JOB_FIELD, Job, Reply, dead_letter_stream, stream_name
from goinfer.settings import ServerSettings, parse_settings

from conftest import APP_ID, APP_SECRET, settings_of, url_of, wait_until, write_settings

HOLDERS = ["sample_models:GilHolder", "sample_models:PatientGilHolder", "sample_models:ImpatientGilHolder",
           "goinfer.models.echo:Echo"]


def client(url: str, timeout: float = 60) -> Client:
    return Client(url, APP_ID, APP_SECRET, sign_type="SHA256", timeout=timeout)


def outcome(api: Client, path: str, data: dict) -> dict | GoinferError:
    try:
        return api.call(path, data)
    except GoinferError as exc:
        return exc


def timed(api: Client, path: str, data: dict) -> tuple[dict | GoinferError, float]:
    started = time.monotonic()
    answer = outcome(api, path, data)
    return answer, time.monotonic() - started


def counts(redis_client: redis.Redis, settings, name: str) -> dict[str, int]:
    """The GilHolder's per-request counters ("starts" or "done")."""
    key = settings_of(settings)["Server"]["QueueName"] + f"hold:{name}"
    return {k.decode(): int(v) for k, v in redis_client.hgetall(key).items()}


def pids(redis_client: redis.Redis, settings, label: str) -> list[int]:
    """The pids of the workers that started the GilHolder request labelled `label`."""
    key = settings_of(settings)["Server"]["QueueName"] + f"hold:pids:{label}"
    return [int(pid) for pid in redis_client.lrange(key, 0, -1)]


def error_codes(answers) -> list[int]:
    return [a.code if isinstance(a, GoinferError) else 0 for a in answers]


# --- with real processes --------------------------------------------------------------------------


def test_a_model_holding_the_gil_runs_once_and_a_killed_worker_is_still_reclaimed(tmp_path, redis_server,
                                                                                  processes):
    """6 s in C without releasing the GIL, ClaimIdleMs 3 s, 3 workers: before, the worker's own
    refresh thread starved, the other workers claimed the request and it ran two or three times.
    Meanwhile another worker is killed with kill -9 in the middle of a request: the supervisor
    stops vouching for it, so that request is still claimed and run again."""
    settings = write_settings(tmp_path, redis_server.address, Models=HOLDERS,
                              Server={"MaxWorkers": 3, "ClaimIdleMs": 3000, "MessageTimeout": 60})
    processes.http(settings)
    server = processes.server(settings)
    api = client(url_of(settings), timeout=90)
    store = redis_server.client()
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(timed, api, "/api/hold", {"hold_s": 6, "label": "slow"})
        victim = pool.submit(outcome, api, "/api/hold", {"hold_s": 60, "again_s": 0.1, "label": "victim"})
        wait_until(lambda: pids(store, settings, "slow"), 30, "the slow request to start")
        os.kill(wait_until(lambda: pids(store, settings, "victim"), 30, "the victim to start")[0], signal.SIGKILL)
        answer, took = slow.result()
        victim_answer = victim.result()
    starts = counts(store, settings, "starts")

    assert not isinstance(answer, GoinferError), answer
    assert answer["held_s"] >= 4.5, f"the model held the GIL {answer['held_s']}s only: the test proves nothing"
    assert answer["starts"] == 1 and starts[answer["requestId"]] == 1, "a slow request ran more than once"
    assert counts(store, settings, "done")[answer["requestId"]] == 1
    assert len(pids(store, settings, "slow")) == 1
    assert "running again request " + answer["requestId"] not in server.output
    assert took < 30

    assert not isinstance(victim_answer, GoinferError), victim_answer
    assert victim_answer["starts"] == 2 and starts[victim_answer["requestId"]] == 2
    assert victim_answer["pid"] != pids(store, settings, "victim")[0]
    assert server.output.count("died with exit code -9") == 1
    assert "Traceback" not in server.output


def test_a_call_past_max_infer_seconds_is_answered_infer_fail_once_and_the_dispatcher_serves_on(
        tmp_path, redis_server, processes):
    """Server.MaxInferSeconds 3; a model's own max_infer_seconds wins, shorter or longer. Before,
    the stuck worker exited only when its request was MessageTimeout past its deadline (its client
    long answered 9997), and the limit was one for all models."""
    settings = write_settings(tmp_path, redis_server.address, Models=HOLDERS,
                              Server={"MaxWorkers": 4, "ClaimIdleMs": 1000, "MessageTimeout": 40,
                                      "MaxInferSeconds": 3, "WorkerRestartLimit": 0})
    processes.http(settings)
    server = processes.server(settings)
    api = client(url_of(settings), timeout=90)
    store = redis_server.client()
    with ThreadPoolExecutor(8) as pool:
        stuck = pool.submit(timed, api, "/api/hold", {"hold_s": 120})
        impatient = pool.submit(timed, api, "/api/hold-impatient", {"hold_s": 120})
        patient = pool.submit(timed, api, "/api/hold-patient", {"hold_s": 5})
        echoes = []
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:  # others are served meanwhile, by the fourth worker
            echoes.append(outcome(api, "/api/echo", {"i": len(echoes)}))
            time.sleep(0.1)
        (stuck_answer, stuck_took), (impatient_answer, impatient_took) = stuck.result(), impatient.result()
        patient_answer, _ = patient.result()

    assert isinstance(stuck_answer, GoinferError) and stuck_answer.code == 9998, stuck_answer
    assert stuck_answer.msg == "infer fail : infer ran longer than MaxInferSeconds (3 s)"
    assert 3 <= stuck_took < 3 + 6, stuck_took  # limit + watch interval + kill grace + slack
    assert isinstance(impatient_answer, GoinferError) and impatient_answer.code == 9998, impatient_answer
    assert impatient_answer.msg == "infer fail : infer ran longer than MaxInferSeconds (1.5 s)"
    assert 1.5 <= impatient_took < 1.5 + 6, impatient_took
    assert not isinstance(patient_answer, GoinferError), patient_answer
    assert patient_answer["held_s"] >= 3.5 and patient_answer["starts"] == 1

    assert echoes and error_codes(echoes) == [0] * len(echoes)
    # Stuck requests are answered, never run again; the workers stopped for them come back.
    time.sleep(2.5)  # more than ClaimIdleMs: a stuck request left pending would be claimed by now
    starts = counts(store, settings, "starts")
    assert sorted(starts.values()) == [1, 1, 1], starts
    assert counts(store, settings, "done") == {patient_answer["requestId"]: 1}
    assert server.output.count("longer than its MaxInferSeconds") == 2
    assert server.output.count("stopped for a stuck model call") == 2
    # Not a crash: with WorkerRestartLimit 0 a counted death would have stopped the dispatcher.
    assert server.process.poll() is None
    assert error_codes([outcome(api, "/api/hold", {"hold_s": 0}) for _ in range(4)]) == [0] * 4
    assert not store.xlen(dead_letter_stream(stream_name(settings_of(settings)["Server"]["QueueName"], 0)))
    assert "Traceback" not in server.output


def test_a_stuck_call_that_ends_within_the_grace_is_answered_with_its_result(tmp_path, redis_server, processes):
    """Past its 1.5 s the call is stuck and its worker gets SIGTERM; it ends 0.9 s later, within the
    1 s before SIGKILL, so the worker answers it with its result and exits; the slot restarts."""
    settings = write_settings(tmp_path, redis_server.address, Models=HOLDERS,
                              Server={"MaxWorkers": 2, "ClaimIdleMs": 1000, "MessageTimeout": 30})
    processes.http(settings)
    server = processes.server(settings)
    api = client(url_of(settings))
    answer = outcome(api, "/api/hold-impatient", {"hold_s": 2.4})
    assert not isinstance(answer, GoinferError), answer
    assert answer["starts"] == 1 and counts(redis_server.client(), settings, "starts") == {answer["requestId"]: 1}
    wait_until(lambda: "stopped for a stuck model call" in server.output, 10, "the worker to be restarted")
    assert "longer than its MaxInferSeconds (1.5 s)" in server.output
    assert "killing it" not in server.output and "InferFail: infer ran longer" not in server.output
    wait_until(lambda: server.output.count("reading ") == 3, 30, "the stopped worker's successor")
    assert api.call("/api/hold", {"hold_s": 0})["starts"] == 1


# --- the parts, against a real Redis ----------------------------------------------------------


def test_the_limit_is_the_models_else_the_settings_else_message_timeout():
    class Plain(Model):
        api_path = "/plain"

        def init(self) -> None: ...
        def api_entry(self, data): return data
        def infer(self, request_id, params): return params

    class Own(Plain):
        api_path = "/own"
        max_infer_seconds = 2.5

    assert infer_limit_s(ServerSettings(message_timeout=12), Plain) == 12
    assert infer_limit_s(ServerSettings(message_timeout=12, max_infer_seconds=4), Plain) == 4
    assert infer_limit_s(ServerSettings(message_timeout=12, max_infer_seconds=4), Own) == 2.5
    assert infer_limit_s(ServerSettings(max_infer_seconds=4)) == 4
    assert parse_settings("Server: {MaxInferSeconds: 7}").server.max_infer_seconds == 7
    for bad in (0, -1, "10", True, float("inf")):
        with pytest.raises(TypeError, match="max_infer_seconds"):
            type("Bad", (Plain,), {"api_path": "/bad", "max_infer_seconds": bad})


def test_the_call_board_is_shared_and_survives_a_worker_killed_mid_write():
    board = CallBoard.create(multiprocessing.get_context("spawn"))
    assert board.read() is None
    board.begin([(0, b"1718000000000-3"), (1, b"1718000000001-0")], 2.5)
    call = board.read()
    assert call is not None and call.limit_s == 2.5 and not call.overdue(call.started + 2)
    assert call.entries == ((0, b"1718000000000-3"), (1, b"1718000000001-0")) and call.unlisted == 0
    assert call.overdue(call.started + 2.6)
    board.end()
    assert board.read() is None
    big = [(0, f"{i}-0".encode()) for i in range(CAPACITY + 5)]
    board.begin(big, 1)
    listed = board.read()
    assert listed is not None and len(listed.entries) == CAPACITY and listed.unlisted == 5
    board._shared.generation += 1  # as a worker killed half-way through writing leaves it
    assert board.read() is None
    board.reset()
    assert board.read() is None
    board.begin(big[:1], 1)
    assert board.read() is not None


@pytest.fixture
def stream(redis_server) -> tuple[redis.Redis, str]:
    store = redis_server.client()
    name = f"liveness-{uuid.uuid4().hex}"
    store.xgroup_create(name, CONSUMER_GROUP, id="0", mkstream=True)
    return store, name


def queue_job(store: redis.Redis, stream: str, reply_to: str) -> tuple[bytes, Job]:
    job = Job(uuid.uuid4().hex, "/api/x", {}, reply_to, time.time() + 60)
    entry_id = store.xadd(stream, {JOB_FIELD: job.encode()})
    return entry_id, job


def test_the_keeper_refreshes_live_workers_entries_only_without_counting_a_delivery(stream):
    store, name = stream
    for consumer in ("live", "dead"):
        queue_job(store, name, "nobody")
        store.xreadgroup(CONSUMER_GROUP, consumer, {name: ">"}, count=1)
    time.sleep(0.3)
    keeper = EntryKeeper(store, claim_idle_ms=3000)
    keeper.vouch_for([Holder("live", (name,)), Holder("no-such-consumer", (name, "no-such-stream"))])
    assert keeper.refresh() == 1
    rows = {row["consumer"].decode(): row for row in
            store.xpending_range(name, CONSUMER_GROUP, min="-", max="+", count=10)}
    assert rows["live"]["time_since_delivered"] < 200 and rows["live"]["times_delivered"] == 1
    assert rows["dead"]["time_since_delivered"] >= 300


def test_settling_a_stuck_call_answers_what_is_still_pending_once(stream):
    store, name = stream
    reply_to = f"replies-{uuid.uuid4().hex}"
    entries = [queue_job(store, name, reply_to) for _ in range(3)]
    store.xreadgroup(CONSUMER_GROUP, "w", {name: ">"}, count=3)
    answered_first = entries[0]
    store.xack(name, CONSUMER_GROUP, answered_first[0])  # the worker answered it in its grace
    call = Call(time.monotonic(), 3, tuple((0, entry_id) for entry_id, _ in entries))

    def reply(job: Job) -> str:
        return Reply(job.id, 9998, "infer fail : too long").encode()

    settled = settle_overdue(store, "w", [name], call, reply)
    assert sorted(job.id for job in settled) == sorted(job.id for _, job in entries[1:])
    replies = [Reply.decode(raw) for raw in store.lrange(reply_to, 0, -1)]
    assert sorted(r.id for r in replies) == sorted(job.id for _, job in entries[1:])
    assert {r.code for r in replies} == {9998}
    assert store.xpending(name, CONSUMER_GROUP)["pending"] == 0
    assert settle_overdue(store, "w", [name], call, reply) == []  # never twice
