"""A worker kept busy by a backlog still takes over the requests of a worker that died.

A busy worker nearly always holds requests (it reads the next ones while it runs the last), so
if it looked for its dead colleagues' entries only when it held nothing, a request taken by a
dispatcher that died would wait until the backlog drained: under sustained load, until its
client gave up. Here one worker serves a steady backlog while a request taken by a consumer
that no longer exists waits; its client must get its answer, once, while the load goes on.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from goinfer.client import Client, GoinferError
from goinfer.dispatcher.reclaim import RECLAIM_INTERVAL_S
from goinfer.queue import CONSUMER_GROUP, stream_name

from conftest import APP_ID, APP_SECRET, settings_of, url_of, wait_until, write_settings

API_PATH = "/api/record-file"
DEAD = "dead-host:1:0"  # the consumer name of a worker of a dispatcher that is gone
CLAIM_IDLE_MS = 500
CALL_S = 0.05  # each load request's model call: the worker is never done before more arrive
LOAD_CLIENTS = 20  # about a second of work always waiting behind the request being run
# From the moment nobody keeps the dead worker's entry fresh: ClaimIdleMs, then at most
# RECLAIM_INTERVAL_S until the worker looks, then the calls it already holds. Generous for a
# loaded machine; the load lasts at least this long, so a worker that reclaims only when it holds
# nothing misses it.
ANSWER_WITHIN_S = CLAIM_IDLE_MS / 1000 + RECLAIM_INTERVAL_S + 6.5

Outcome = tuple[str, "dict[str, Any] | GoinferError", float]  # the request's i, its answer, when it came


def _call(api: Client, i: str) -> Outcome:
    try:
        answer: dict[str, Any] | GoinferError = api.call(API_PATH, {"i": i, "sleep": CALL_S})
    except GoinferError as exc:
        answer = exc
    return i, answer, time.monotonic()


def _load(api: Client, client_index: int, stop: threading.Event) -> list[Outcome]:
    """One client sending requests one after the other until told to stop."""
    outcomes: list[Outcome] = []
    for n in itertools.count():
        if stop.is_set():
            return outcomes
        outcomes.append(_call(api, f"load-{client_index}-{n}"))
    raise AssertionError("unreachable")


def _keep_fresh(client: redis.Redis, stream: str, entry_id: bytes, stop: threading.Event) -> None:
    """What the dead worker's supervisor did while it lived (liveness.py): XCLAIM ... JUSTID to
    the same consumer, so the entry never looks idle and nobody claims it."""
    while not stop.wait(0.05):
        client.xclaim(stream, CONSUMER_GROUP, DEAD, 0, [entry_id], justid=True)


def _waiting(client: redis.Redis, stream: str) -> int:
    """Entries in the stream that no consumer has taken yet (answered entries are deleted, so
    the stream holds only the pending ones and those not yet delivered)."""
    pipe = client.pipeline(transaction=True)
    pipe.xlen(stream)
    pipe.xpending(stream, CONSUMER_GROUP)
    length, pending = pipe.execute()
    return int(length) - int(pending["pending"])


def test_a_busy_worker_takes_over_a_dead_workers_request(tmp_path: Path, redis_server, processes) -> None:
    executions = tmp_path / "executions.txt"
    settings = write_settings(tmp_path, redis_server.address, Models=["sample_models:FileRecorder"],
                              Server={"MaxWorkers": 1, "MessageTimeout": 60, "ClaimIdleMs": CLAIM_IDLE_MS},
                              Customer={"ExecutionsFile": str(executions)})
    processes.http(settings)
    client = redis_server.client()
    stream = stream_name(settings_of(settings)["Server"]["QueueName"], 0)
    client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
    api = Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256", timeout=120)
    stop_load, supervisor_dies = threading.Event(), threading.Event()
    with ThreadPoolExecutor(LOAD_CLIENTS + 2) as pool:
        try:
            # A request taken by a worker of another dispatcher, which keeps it fresh while it lives.
            stale = pool.submit(_call, api, "stale")
            wait_until(lambda: client.xlen(stream) == 1, 30, "the request queued")
            [(_, [(entry_id, _)])] = client.xreadgroup(CONSUMER_GROUP, DEAD, {stream: ">"}, count=1)
            refresher = pool.submit(_keep_fresh, client, stream, entry_id, supervisor_dies)
            # A sustained load on a dispatcher of one worker.
            loads = [pool.submit(_load, api, index, stop_load) for index in range(LOAD_CLIENTS)]
            server = processes.server(settings)
            wait_until(lambda: executions.exists() and len(executions.read_text().split()) >= LOAD_CLIENTS
                       and _waiting(client, stream) > 0, 60, "the worker serving a backlog")
            assert not stale.done(), "taken over while its worker was still alive: it was not kept fresh"
            # The other dispatcher dies: from now on nobody keeps its entry fresh.
            supervisor_dies.set()
            refresher.result(10)
            died_at = time.monotonic()
            waiting = []
            while not stale.done() and time.monotonic() < died_at + ANSWER_WITHIN_S:
                waiting.append(_waiting(client, stream))
                time.sleep(0.05)
            answered_in_time = stale.done()
        finally:
            stop_load.set()
            supervisor_dies.set()
        outcomes = [outcome for load in loads for outcome in load.result(120)]
        _, stale_answer, answered_at = stale.result(120)
    load_ended = max((at for _, _, at in outcomes), default=died_at)
    assert answered_in_time, (f"the dead worker's request was answered {answered_at - died_at:.1f} s after it "
                              f"went stale, {answered_at - load_ended:+.1f} s after the backlog ended; "
                              f"requests waiting meanwhile: {Counter(waiting)}")
    # The backlog was real: requests were waiting untaken at every look while the stale one
    # waited, and the worker went on serving the load after answering it (each client had one
    # request waiting then).
    assert waiting and min(waiting) > 0, waiting
    assert sum(at > answered_at for _, _, at in outcomes) >= LOAD_CLIENTS // 2
    # Its client got its own answer, from the one execution: the dead worker never ran it.
    assert not isinstance(stale_answer, GoinferError), stale_answer
    stale_id = stale_answer["requestId"]
    assert stale_answer["i"] == "stale" and stale_answer["request_id"] == stale_id
    ran = Counter(executions.read_text().split())
    assert ran[stale_id] == 1
    assert f"running again request {stale_id}" in server.output
    # Every load request answered, with its own answer, each run once.
    errors = [(i, answer) for i, answer, _ in outcomes if isinstance(answer, GoinferError)]
    assert not errors, errors[:5]
    assert all(answer["i"] == i for i, answer, _ in outcomes)  # type: ignore[index]
    assert set(ran) == {stale_id} | {answer["requestId"] for _, answer, _ in outcomes}  # type: ignore[index]
    assert set(ran.values()) == {1}, [request for request, count in ran.items() if count > 1]
    # Nothing is left pending with the dead consumer, or anywhere.
    wait_until(lambda: client.xlen(stream) == 0, 10, "every entry answered and deleted")
    assert client.xpending(stream, CONSUMER_GROUP)["pending"] == 0
