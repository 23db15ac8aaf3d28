"""How a dispatcher lives through Redis being away, and recognises Redis refusing it for good.

Redis away (not started yet, restarting, a network cut) passes: the supervisor and the workers
retry on one back-off (0.1 s doubling to 5 s) and say so once per step for the whole dispatcher,
never with a traceback, and no worker is restarted for it. Redis refusing the credentials or the
commands (a wrong password, none where one is needed, an ACL that forbids a command) never
passes by itself: retrying would only fill the logs, so it stops the dispatcher with one line
that names the setting to fix.

A failover is Redis away too: the commands in flight fail (the connection reset, or READONLY
from a master demoted to a replica) and the dispatcher waits it out on the same back-off,
reconnecting to the new master (the sentinels name it to every new connection).
"""

from __future__ import annotations

import logging
from typing import Protocol

import redis

from goinfer.cluster_clients import NodeClients, slot_clients
from goinfer.connections import CONNECT_TIMEOUT_S, refusal, sync_client
from goinfer.redis_address import describe_redis
from goinfer.settings import ServerSettings

log = logging.getLogger("goinfer.dispatcher")

FIRST_DELAY_S = 0.1
MAX_DELAY_S = 5.0

# Who reports an outage (OutageLog): nobody yet, the supervisor, or a worker by its slot number.
NOBODY = -1
SUPERVISOR = -2

def dispatcher_client(server: ServerSettings, *, timeout_s: float = 30.0) -> redis.Redis:
    """A client that fails fast, so the dispatcher's own back-off decides when to try again.

    redis-py would otherwise retry a failed command ten times with its own jittered back-off
    (seconds per command, a wrong password included); one immediate retry is kept, for a pooled
    connection that Redis closed while it was idle.
    """
    return sync_client(server, timeout_s=timeout_s, retries=1)


def dispatcher_nodes(server: ServerSettings, home: str, *, timeout_s: float = 30.0, retries: int = 1) -> NodeClients:
    """The clients of one part of a dispatcher, which fail fast as dispatcher_client's do.

    `home` is a key of the slot it works in (its queue's hash tag, or the heartbeats'): on a
    Redis Cluster everything it sends in one round trip goes to the primary serving that slot,
    found again after a failover; on one Redis, to that Redis. `retries` 0 for commands that must
    never be sent twice (see worker.py).
    """
    return slot_clients(server, home, timeout_s=timeout_s, retries=retries)


class Backoff:
    """0.1 s doubling to 5 s between tries; `reset` once a try succeeds."""

    def __init__(self, first_s: float = FIRST_DELAY_S, max_s: float = MAX_DELAY_S) -> None:
        self._first = first_s
        self._max = max_s
        self._next = first_s

    def step(self) -> float:
        """The delay before the next try; the one after it is twice as long, up to the cap."""
        delay = self._next
        self._next = min(delay * 2, self._max)
        return delay

    def reset(self) -> None:
        self._next = self._first


class SharedInt(Protocol):
    """A ctypes integer in shared memory (multiprocessing's RawValue("i")), or any stand-in."""

    value: int


class _Local:
    value = NOBODY


class OutageLog:
    """One voice per dispatcher for a Redis outage, however many processes wait it out.

    The first process of the dispatcher to see the outage becomes its reporter (in memory shared
    by the supervisor and its workers): it logs every back-off step at WARNING and the recovery
    at INFO; the others log their steps at DEBUG. Without this, N workers would log each step N
    times. Two processes that claim at the same instant both log one step: harmless.
    """

    def __init__(self, server: ServerSettings, me: int, who: str, reporter: SharedInt | None = None) -> None:
        self._address = describe_redis(server)
        self._me = me
        self._who = who
        self._reporter: SharedInt = reporter if reporter is not None else _Local()
        self._failing = False

    def failed(self, exc: BaseException, delay_s: float) -> None:
        """One back-off step: Redis did not answer; the next try is in `delay_s`."""
        self._failing = True
        if self._reporter.value in (NOBODY, self._me):
            self._reporter.value = self._me
            level = logging.WARNING
        else:
            level = logging.DEBUG
        log.log(level, "redis at %s unavailable (%s); %s retrying in %.1fs", self._address, exc, self._who, delay_s)

    def recovered(self) -> None:
        """Redis answered again; says so once if this process was the one reporting."""
        if not self._failing:
            return
        self._failing = False
        if self._reporter.value == self._me:
            self._reporter.value = NOBODY
            log.info("redis at %s answers again", self._address)


class RedisProbe:
    """The supervisor's PING: at start, then on the back-off until Redis answers once.

    Checking before the workers start turns a wrong password into one line within a second,
    not after every model has loaded; a Redis that is merely away is waited for while the
    workers load their models, so they serve as soon as it is back.
    """

    def __init__(self, server: ServerSettings, outage: OutageLog, home: str = "") -> None:
        """`home`: a key of the queue's slot (on a cluster, the primary serving it is PINGed)."""
        self._server = server
        self._outage = outage
        self._nodes = dispatcher_nodes(server, home, timeout_s=CONNECT_TIMEOUT_S)
        self._backoff = Backoff()
        self.answered = False
        self.next_at = 0.0  # time.monotonic() of the next PING

    def check(self, now: float) -> bool:
        """PING if it is time; True once Redis has answered. Raises RedisRefused."""
        if self.answered or now < self.next_at:
            return self.answered
        try:
            self._nodes.client.ping()
        except (redis.RedisError, OSError) as exc:
            refused = refusal(exc, self._server)
            if refused is not None:
                self._nodes.close()
                raise refused from None
            self._nodes.lost(exc)
            delay = self._backoff.step()
            self._outage.failed(exc, delay)
            self.next_at = now + delay
            return False
        self.answer_seen()
        return True

    def answer_seen(self) -> None:
        """Redis answered (this PING, or a worker): stop probing, and say so if we said it was away."""
        if not self.answered:
            self.answered = True
            self._outage.recovered()
            self._nodes.close()
