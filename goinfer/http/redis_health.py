"""How the HTTP tier tells a Redis outage (wait, it will be back) from refused credentials (stop).

An outage is temporary: requests are answered SendMsgFail meanwhile, and the operator needs to
hear of it once when it starts and once when it ends, not once per request or per retry,
whichever part of the process (reply reader, enqueue) noticed. Refused credentials (a wrong
RedisPasswd, none where Redis needs one, an ACL that forbids our commands) never heal by
retrying: the tier stops with one line naming the setting. A Redis at `maxmemory` answers but
refuses to store requests: also told once when it starts and once when it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.crc import key_slot
from redis.exceptions import ClusterDownError, InvalidResponse, ReadOnlyError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from goinfer.cluster_clients import hash_tag
from goinfer.connections import is_refusal, is_unblocked

log = logging.getLogger("goinfer.http.redis")


def is_unreachable(error: BaseException) -> bool:
    """Redis did not answer (down, restarting, loading, cut off, silent past Server.RedisTimeoutS,
    a connection reset under us): it may be back any moment.

    uvloop raises RuntimeError for a write on a transport that a reset has just closed, and a
    reset mid-answer can leave redis-py an unparseable reply (InvalidResponse): both are a broken
    connection, not a bug to report with a traceback. READONLY comes from a master a failover
    demoted to a replica: the master is elsewhere now, and a fresh connection finds it (through
    the sentinels, or wherever the address now leads), so the connections are dropped as for an
    outage; the command did not run. UNBLOCKED is what the demotion answers a blocked read (BLPOP).

    On a Redis Cluster, TRYAGAIN (the slot's keys are being moved) and CLUSTERDOWN (a primary
    failed and its replica is not elected yet) are answered before anything runs, and pass once
    the cluster settles: an outage of that queue's primary. (MOVED and ASK are no outage: the
    slot is served elsewhere, and the caller follows it; goinfer/cluster_clients.py.)
    """
    if is_refusal(error):
        return False
    if is_unblocked(error):
        return True
    return isinstance(error, (RedisConnectionError, RedisTimeoutError, InvalidResponse, ReadOnlyError, OSError,
                              asyncio.TimeoutError, RuntimeError, TryAgainError, ClusterDownError))


class RedisHealth:
    """Whether Redis answers, as the parts of one HTTP process see it; each change logged once.

    Callers pass the monotonic time at which their Redis call started. An outcome of a call that
    started before the last change is stale (a reply read just before Redis died, a connection
    attempt that failed just before it came back) and is ignored, so the log says "unreachable"
    and "back" once per outage even when several parts notice at slightly different times.
    """

    def __init__(self, address: str) -> None:
        self._address = address
        self._down = False
        self._changed_at = float("-inf")
        self._full = False

    @property
    def address(self) -> str:
        return self._address

    @property
    def down(self) -> bool:
        return self._down

    def failed(self, started: float, error: BaseException) -> None:
        """A call that started at `started` found Redis unreachable."""
        if self._down or started < self._changed_at:
            return
        self._down = True
        self._changed_at = time.monotonic()
        log.warning("redis at %s is unreachable (%s); requests get SendMsgFail until it is back",
                    self._address, str(error) or type(error).__name__)

    def answered(self, started: float) -> None:
        """A call that started at `started` got its answer from Redis."""
        if not self._down or started < self._changed_at:
            return
        self._down = False
        self._changed_at = time.monotonic()
        log.info("redis at %s is back", self._address)

    @property
    def full(self) -> bool:
        return self._full

    def out_of_memory(self, error: BaseException) -> None:
        """Redis refused to store a request: it reached `maxmemory` (OOM). Logged once until it
        stores one again; each request meanwhile gets SendMsgFail (it was not queued)."""
        if self._full:
            return
        self._full = True
        reason = str(error).split(". ", 1)[0] or type(error).__name__
        log.warning("redis at %s is full (%s); requests get SendMsgFail until it has room",
                    self._address, reason)

    def stored(self) -> None:
        """Redis queued a request: if it was full, it has room again."""
        if self._full:
            self._full = False
            log.info("redis at %s has room again", self._address)


class ClusterHealth(RedisHealth):
    """On a Redis Cluster: the health of the node our own liveness key lives on (this object's
    own state, fed by the calls on keys of no queue) and, apart, that of each queue's primary
    (`of`), logged with the queue's hash tag. A primary that dies fails only the requests to its
    queues; the process counts as down (readiness) while any of them is."""

    def __init__(self, address: str) -> None:
        super().__init__(address)
        self._queues: dict[int, RedisHealth] = {}

    def of(self, key: str) -> RedisHealth:
        """The health of the primary serving `key`'s slot (every key of one queue shares it)."""
        slot = key_slot(key.encode("utf-8", "surrogatepass"))
        found = self._queues.get(slot)
        if found is None:
            found = self._queues[slot] = RedisHealth(f"{self._address} for {hash_tag(key)}")
        return found

    @property
    def down(self) -> bool:
        return self._down or any(queue.down for queue in self._queues.values())
