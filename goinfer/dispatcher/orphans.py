"""Requests whose client is gone: acknowledged unrun, not run for nobody.

Each HTTP process keeps a liveness key (`goinfer.queue.tier_alive_key`) that expires
TIER_ALIVE_TTL_S after the process died, kill -9 included, and names it in every job it queues
(`Job.alive_key`). Before running what it took, a worker asks Redis which of the keys its jobs
name still exist, in one round trip for all distinct keys (on a Redis Cluster, one per node
that holds some); a job whose key is gone has nobody
left to read its answer, so it is skipped (counted as STAT_ORPHANED) instead of delaying the
requests behind it, those of the restarted tier included. A job that names no key (from a
sender that keeps none) is never skipped for this.

A key found alive is believed for TIER_ALIVE_REFRESH_S without asking again, so a busy worker
asks about once a second rather than once per batch; the price is that a job may still run
whose tier died that long before its key expired.

After a Redis outage (a restart from its append-only file, a failover to a replica), liveness
keys may have expired in Redis while their tiers lived and could not refresh them: for
TIER_ALIVE_TTL_S after the worker reaches Redis again, every tier is believed alive, which is
the time a living tier takes to write its key again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import redis
from redis.exceptions import RedisError

from goinfer.cluster_clients import NodeClients, node_clients
from goinfer.queue import TIER_ALIVE_REFRESH_S, TIER_ALIVE_TTL_S


class TierWatch:
    """Which HTTP processes named by jobs are gone, as one worker sees it."""

    def __init__(self, client: redis.Redis | NodeClients, trust_s: float = TIER_ALIVE_REFRESH_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._nodes = node_clients(client)  # the keys may live on any node of a cluster
        self._trust_s = trust_s
        self._clock = clock
        self._seen_alive: dict[str, float] = {}  # key -> when it last existed
        self._after_outage = False
        self._believe_all_until = 0.0

    def outage(self) -> None:
        """Redis failed us: once it answers again, believe every tier alive for a while."""
        self._after_outage = True

    def gone(self, keys: Iterable[str]) -> set[str]:
        """The liveness keys among `keys` that no longer exist; no round trip when all are trusted."""
        now = self._clock()
        if self._after_outage:  # the first question since the outage: Redis answers again
            self._after_outage = False
            self._believe_all_until = now + TIER_ALIVE_TTL_S
        if now < self._believe_all_until:
            return set()
        self._seen_alive = {key: at for key, at in self._seen_alive.items() if now - at < self._trust_s}
        unknown = sorted(set(keys) - self._seen_alive.keys())
        if not unknown:
            return set()
        gone = set()
        try:
            groups = self._nodes.by_node(unknown)  # one round trip per node (one on one Redis)
        except (RedisError, OSError) as exc:
            return self._unknown(exc)
        for client, keys in groups:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            try:
                found = pipe.execute()
            except (RedisError, OSError) as exc:
                self._unknown(exc)
                continue
            for key, exists in zip(keys, found, strict=True):
                if exists:
                    self._seen_alive[key] = now
                else:
                    gone.add(key)
        return gone

    def _unknown(self, error: RedisError | OSError) -> set[str]:
        """A node holding liveness keys did not answer. On one Redis that is the queue's Redis:
        the worker waits it out (raised). On a cluster it may be another primary, failing over:
        the jobs naming its keys run (as if their tiers lived) rather than the queue wait for it."""
        if not self._nodes.cluster:
            raise error
        self._nodes.lost(error)
        return set()
