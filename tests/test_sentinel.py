"""goinfer on a Redis Sentinel service (redis+sentinel://), with real redis-servers and sentinels.

Under steady load, the master is killed (kill -9), or failed over by SENTINEL FAILOVER while it
runs on; the sentinels promote its replica. Every request is answered: 0, 9702 (SendMsgFail: not
queued, while the tier found Redis away) or 9997 (QueueTimeout: queued on the old master and lost
with it, at MessageTimeout); none is left without an answer, none waits past MessageTimeout, and
the service answers 0 again within seconds of the promotion. Configuration mistakes (a wrong
master name, a refused sentinel password) stop both tiers with one line; sentinels that cannot
be reached are an outage, waited out. A master demoted to a replica (READONLY) is Redis away,
not a refusal. EnqueueReplicas makes each enqueue wait for replicas (WAIT): a short WAIT is
logged, and its requests are still served.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from goinfer.client import Client, GoinferError
from goinfer.redis_server import RedisServer
from goinfer.testing import wait_for_answer

import redis_sentinel
from conftest import (
    APP_ID,
    APP_SECRET,
    GoinferProcess,
    free_port,
    start_redis,
    stop_redis,
    url_of,
    wait_until,
    write_settings,
)

MODELS = ["goinfer.models.echo:Echo"]
MESSAGE_TIMEOUT_S = 8
CLIENT_MARGIN_S = 5  # a client still waiting this long after MessageTimeout counts its request as lost
CLIENTS = 4
PACE_S = 0.02  # each client's pause between requests: steady load, not a flood
SEND_MSG_FAIL, QUEUE_TIMEOUT = 9702, 9997
LOST = -1
SERVE_AGAIN_LIMIT_S = 20.0  # from the promotion to answers with code 0 again, loosely
STEADY_S = 3.0  # this long of nothing but code 0 after the promotion is "serving normally"
EXIT_CONFIG = 2
SENTINEL_PASSWORD = "sentinel-Pa55-5e1f0a"
WRONG_PASSWORD = "wrong-Pa55-0c7d2b"
ECHO = {"text": "哨兵", "image": ""}


@dataclass(frozen=True)
class Outcome:
    sent: float  # time.monotonic()
    answered: float
    code: int  # the envelope's, or LOST


def _settings(tmp_path: Path, address: str, **server: Any) -> Path:
    return write_settings(tmp_path, address, Models=MODELS,
                          Server={"MessageTimeout": MESSAGE_TIMEOUT_S, "MaxWorkers": 2, **server})


def _client(settings: Path) -> Client:
    return Client(url_of(settings), APP_ID, APP_SECRET, sign_type="SHA256",
                  timeout=MESSAGE_TIMEOUT_S + CLIENT_MARGIN_S)


def _code(client: Client) -> int:
    try:
        client.call("/api/echo", ECHO)
    except GoinferError as exc:
        return exc.code
    except (OSError, ValueError):  # no answer within the client's timeout, no connection, no envelope
        return LOST
    return 0


def _load(settings: Path, stop: threading.Event, outcomes: list[Outcome]) -> None:
    client = _client(settings)
    while not stop.is_set():
        sent = time.monotonic()
        code = _code(client)
        outcomes.append(Outcome(sent, time.monotonic(), code))
        time.sleep(PACE_S)


def _serving_steadily(outcomes: list[Outcome], since: float) -> bool:
    """Only code 0 among the answers to requests sent in the last STEADY_S, after `since`."""
    now = time.monotonic()
    if now - since < STEADY_S:
        return False
    recent = [o for o in list(outcomes) if o.sent >= max(since, now - STEADY_S)]
    return len(recent) >= CLIENTS and all(o.code == 0 for o in recent)


def _used_lately(node: RedisServer) -> list[str]:
    """The clients of `node` that ran a command within the last second, other than the sentinels,
    the replicas and this check: goinfer's."""
    client = node.client()
    try:
        return [f"{c['addr']} {c['cmd']}" for c in client.client_list()
                if not c["name"].startswith("sentinel-") and "S" not in c["flags"] and "M" not in c["flags"]
                and c["cmd"] != "client|list" and int(c["idle"]) < 1]
    finally:
        client.close()


def _role(node: RedisServer) -> str:
    client = node.client()
    try:
        return str(client.info("replication")["role"])
    finally:
        client.close()


def _wait_for_exit(proc: GoinferProcess, timeout: float = 60) -> int:
    wait_until(lambda: proc.process.poll() is not None, timeout, f"{proc.args} to exit")
    return int(proc.process.returncode)


def _one_error_line(output: str) -> str:
    errors = [line for line in output.splitlines() if line.startswith("goinfer: error:")]
    assert len(errors) == 1, output
    assert "Traceback" not in output, output
    return errors[0]


def _no_traceback(*procs: GoinferProcess) -> None:
    for proc in procs:
        assert "Traceback" not in proc.output, proc.output


# --- failover under load ---------------------------------------------------------------------------


@pytest.mark.parametrize("how, enqueue_replicas", [("kill", 0), ("kill", 1), ("failover", 0)],
                         ids=["kill-9", "kill-9-EnqueueReplicas-1", "SENTINEL-FAILOVER"])
def test_every_request_is_answered_through_a_failover_and_the_service_serves_again(
        tmp_path, processes, how, enqueue_replicas):
    """kill -9: the master dies with what it had not sent its replica. SENTINEL FAILOVER (as for
    maintenance): the old master keeps running, and taking writes, until the sentinels make it a
    replica some seconds later; the tiers must leave it within a second of the promotion."""
    with redis_sentinel.start(replicas=1, sentinels=3) as service:
        settings = _settings(tmp_path, service.url(), EnqueueReplicas=enqueue_replicas,
                             EnqueueReplicasTimeoutMs=100)
        http = processes.http(settings)
        dispatcher = processes.server(settings)
        wait_for_answer(url_of(settings) + "/api/echo", _client(settings).body(ECHO), timeout=60)

        outcomes: list[Outcome] = []
        stop = threading.Event()
        clients = [threading.Thread(target=_load, args=(settings, stop, outcomes), daemon=True)
                   for _ in range(CLIENTS)]
        for thread in clients:
            thread.start()
        try:
            time.sleep(2.0)  # steady load on the first master
            old_port = service.master_port()
            assert old_port is not None
            killed_at = time.monotonic()
            if how == "kill":
                service.kill_master()
            else:
                service.failover()
            service.wait_for_new_master(old_port)
            promoted_at = time.monotonic()
            if how == "failover":
                # The old master takes writes until the sentinels make it a replica (seconds later):
                # the tiers must have left it long before, though they had no error to tell them.
                old_master = service.node(old_port)
                wait_until(lambda: not _used_lately(old_master), 5.0, "the tiers to leave the old master")
                assert _role(old_master) == "master"  # left on their own, not cut off by its demotion
                service.wait_for_role(old_port, "slave")
                time.sleep(STEADY_S)  # load goes on across the demotion
            wait_until(lambda: _serving_steadily(outcomes, promoted_at), SERVE_AGAIN_LIMIT_S + MESSAGE_TIMEOUT_S,
                       "answers with code 0 only, after the promotion")
        finally:
            stop.set()
            for thread in clients:
                thread.join(MESSAGE_TIMEOUT_S + CLIENT_MARGIN_S + 5)
            outputs = (http.output, dispatcher.output)
            processes.cleanup()  # before the Redis service stops

        codes = Counter(o.code for o in outcomes)
        after = [o for o in outcomes if o.sent >= promoted_at]
        first_ok = min(o.answered for o in after if o.code == 0) - promoted_at
        last_failure = max((o.sent for o in after if o.code != 0), default=promoted_at)
        steady = min(o.answered for o in after if o.sent >= last_failure and o.code == 0) - promoted_at
        refused = [o for o in outcomes if o.code == SEND_MSG_FAIL]
        window = "none"
        if refused:
            window = (f"{min(o.answered for o in refused) - killed_at:.2f}.."
                      f"{max(o.answered for o in refused) - killed_at:.2f}")
        slowest = max(o.answered - o.sent for o in outcomes)
        report = (f"{how}, EnqueueReplicas {enqueue_replicas}: sent {len(outcomes)}, answered 0: {codes[0]}, "
                  f"9702: {codes[SEND_MSG_FAIL]}, 9997: {codes[QUEUE_TIMEOUT]}, lost: {codes[LOST]}, "
                  f"other: {sum(n for c, n in codes.items() if c not in (0, SEND_MSG_FAIL, QUEUE_TIMEOUT, LOST))}; "
                  f"{how} to promotion {promoted_at - killed_at:.2f}s, promotion to first 0 {first_ok:.2f}s, "
                  f"to steady 0 {steady:.2f}s; 9702s answered {window}s after the {how}; slowest answer "
                  f"{slowest:.2f}s")
        print(report)

        assert codes[LOST] == 0, report
        assert set(codes) <= {0, SEND_MSG_FAIL, QUEUE_TIMEOUT}, report
        assert slowest < MESSAGE_TIMEOUT_S + 2, report  # 9997 comes at MessageTimeout, nothing later
        assert first_ok < SERVE_AGAIN_LIMIT_S and steady < SERVE_AGAIN_LIMIT_S, report
        http_output, dispatcher_output = outputs
        assert "Traceback" not in http_output + dispatcher_output, outputs
        assert "died with exit code" not in dispatcher_output, dispatcher_output  # waited out, no restart
        if enqueue_replicas:  # the new master has no replica: its enqueues are held by none, and said so
            assert "enqueues reach fewer replicas than EnqueueReplicas (1" in http_output, http_output


# --- configuration mistakes and unreachable sentinels ------------------------------------------------


@pytest.fixture(scope="module")
def locked_sentinel():
    """One sentinel that asks for a password, watching a master without replicas."""
    with redis_sentinel.start(replicas=0, sentinels=1, sentinel_password=SENTINEL_PASSWORD) as service:
        yield service


def test_the_sentinel_password_is_used_and_never_shown(tmp_path, processes, locked_sentinel):
    settings = _settings(tmp_path, locked_sentinel.url(), RedisSentinelPasswd=SENTINEL_PASSWORD)
    http = processes.http(settings)
    dispatcher = processes.server(settings)
    assert _code(_client(settings)) == 0
    for proc in (http, dispatcher):
        assert SENTINEL_PASSWORD not in proc.output, proc.output


@pytest.mark.parametrize("password, reason", [
    (WRONG_PASSWORD, "refuses Server.RedisSentinelPasswd: "),
    ("", "requires a password and Server.RedisSentinelPasswd is empty"),
])
@pytest.mark.parametrize("tier", ["http", "server"])
def test_a_refused_sentinel_password_stops_each_tier_with_one_line(tmp_path, processes, locked_sentinel, password,
                                                                   reason, tier):
    settings = _settings(tmp_path, locked_sentinel.url(), RedisSentinelPasswd=password)
    args = ["http", "--yaml", str(settings)] if tier == "http" else ["server", "0", "--yaml", str(settings)]
    proc = processes.start(*args)
    assert _wait_for_exit(proc) == EXIT_CONFIG, proc.output
    line = _one_error_line(proc.output)
    assert f"the sentinel at 127.0.0.1:{locked_sentinel.sentinels[0].port} {reason}" in line, line
    assert SENTINEL_PASSWORD not in proc.output and WRONG_PASSWORD not in proc.output, proc.output


@pytest.mark.parametrize("tier", ["http", "server"])
def test_a_master_name_no_sentinel_watches_stops_each_tier_with_one_line(tmp_path, processes, locked_sentinel, tier):
    settings = _settings(tmp_path, locked_sentinel.url("no-such-master"), RedisSentinelPasswd=SENTINEL_PASSWORD)
    args = ["http", "--yaml", str(settings)] if tier == "http" else ["server", "0", "--yaml", str(settings)]
    proc = processes.start(*args)
    assert _wait_for_exit(proc) == EXIT_CONFIG, proc.output
    line = _one_error_line(proc.output)
    assert "watch no master named 'no-such-master' (they watch: 'goinfer-test')" in line, line
    assert "Server.RedisServer" in line, line


def test_sentinels_out_of_reach_are_an_outage_waited_out_in_one_line_each(tmp_path, processes):
    silent = f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/goinfer-test"
    settings = _settings(tmp_path, silent)
    http = processes.http(settings)  # starts: the tier serves SendMsgFail until Redis is found
    dispatcher = processes.server(settings, wait=False)
    assert _code(_client(settings)) == SEND_MSG_FAIL
    http.wait_for_output("is unreachable (no sentinel answers (127.0.0.1:")
    dispatcher.wait_for_output("unavailable (no sentinel answers (127.0.0.1:")
    assert dispatcher.process.poll() is None, dispatcher.output  # waiting, not stopped
    unreachable = [line for line in http.output.splitlines() if "is unreachable" in line]
    assert len(unreachable) == 1, http.output
    _no_traceback(http, dispatcher)


# --- a demoted master (READONLY) --------------------------------------------------------------------


def test_a_master_turned_replica_is_redis_away_and_is_served_again_once_it_is_master(tmp_path, processes):
    """What a tier sees at a failover that moves an address (a virtual IP, a DNS name, a Service)
    to a replica: READONLY. Requests get 9702 at once (nothing ran), the tier says once that
    Redis is away, workers wait it out without a restart, and all serve again once the address
    leads to a master."""
    node, other = start_redis(), start_redis()
    try:
        settings = _settings(tmp_path, node.address)
        http = processes.http(settings)
        dispatcher = processes.server(settings)
        client = _client(settings)
        assert _code(client) == 0
        admin = node.client()
        admin.replicaof("127.0.0.1", other.port)
        wait_until(lambda: admin.info("replication").get("master_link_status") == "up", 30, "the replica to sync")
        assert _code(client) == SEND_MSG_FAIL
        dispatcher.wait_for_output("unavailable (You can't write against a read only replica.)")
        time.sleep(3)  # the tier's reader and key keeper meet READONLY a few times meanwhile
        assert _code(client) == SEND_MSG_FAIL
        admin.replicaof("NO", "ONE")
        admin.close()
        wait_until(lambda: _code(client) == 0, 30, "code 0 once the node is a master again")
        http.wait_for_output("is back")
        # Said once as an outage, not once per retry as an unexpected error.
        unreachable = [line for line in http.output.splitlines() if "is unreachable" in line]
        assert len(unreachable) == 1, http.output
        assert "failed (" not in http.output, http.output
        _no_traceback(http, dispatcher)
        assert "died with exit code" not in dispatcher.output, dispatcher.output
    finally:
        stop_redis(node)
        stop_redis(other)


# --- EnqueueReplicas (WAIT) -----------------------------------------------------------------------------


def test_with_enqueue_replicas_a_short_wait_is_logged_once_and_its_requests_are_still_served(tmp_path, processes):
    """No replica can acknowledge: every WAIT comes back short after its timeout. The requests are
    queued all the same, so they are answered with their result, not 9702."""
    node = start_redis()
    try:
        settings = _settings(tmp_path, node.address, EnqueueReplicas=1, EnqueueReplicasTimeoutMs=50)
        http = processes.http(settings)
        processes.server(settings)
        client = _client(settings)
        assert [_code(client) for _ in range(5)] == [0] * 5
        http.wait_for_output("enqueues reach fewer replicas than EnqueueReplicas (1; 0 within 50 ms)")
        shortfalls = [line for line in http.output.splitlines() if "reach fewer replicas" in line]
        assert len(shortfalls) == 1, http.output
    finally:
        stop_redis(node)


def test_with_enqueue_replicas_enqueues_wait_for_the_replica_and_say_when_it_falls_behind(tmp_path, processes):
    """While the replica acknowledges, nothing is said; a replica that stops (SIGSTOP) makes the
    WAITs short: said once, requests still answered; once it is back, said once, with the count."""
    with redis_sentinel.start(replicas=1, sentinels=0) as service:
        master, replica = service.nodes
        settings = _settings(tmp_path, master.address, EnqueueReplicas=1, EnqueueReplicasTimeoutMs=200)
        http = processes.http(settings)
        processes.server(settings)
        client = _client(settings)
        assert [_code(client) for _ in range(5)] == [0] * 5
        assert "reach fewer replicas" not in http.output, http.output
        replica.process.send_signal(signal.SIGSTOP)
        try:
            for _ in range(3):
                started = time.monotonic()
                assert _code(client) == 0
                # Answered only once its enqueue's WAIT gave up: never before the replica had a chance.
                assert time.monotonic() - started >= 0.2
            http.wait_for_output("enqueues reach fewer replicas than EnqueueReplicas (1; 0 within 200 ms)")
        finally:
            replica.process.send_signal(signal.SIGCONT)
        wait_until(lambda: _code(client) == 0 and "enqueues reach 1 replica(s) again" in http.output, 30,
                   "the tier to say that the replica acknowledges again")
        assert "(3 request(s) were held by fewer meanwhile)" in http.output, http.output
