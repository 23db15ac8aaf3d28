"""Requests whose client is gone: acknowledged unrun, not run for nobody.

Each HTTP process keeps a liveness key (`goinfer.queue.tier_alive_key`) that expires
TIER_ALIVE_TTL_S after the process died, kill -9 included, and names it in every job it queues
(`Job.alive_key`). Before running what it took, a worker asks Redis which of the keys its jobs
name still exist, in one round trip for all distinct keys; a job whose key is gone has nobody
left to read its answer, so it is skipped (counted as STAT_ORPHANED) instead of delaying the
requests behind it, those of the restarted tier included. A job that names no key (from a
sender that keeps none) is never skipped for this.

A key found alive is believed for TIER_ALIVE_REFRESH_S without asking again, so a busy worker
asks about once a second rather than once per batch; the price is that a job may still run
whose tier died that long before its key expired.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import redis

from goinfer.queue import TIER_ALIVE_REFRESH_S


class TierWatch:
    """Which HTTP processes named by jobs are gone, as one worker sees it."""

    def __init__(self, client: redis.Redis, trust_s: float = TIER_ALIVE_REFRESH_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._trust_s = trust_s
        self._clock = clock
        self._seen_alive: dict[str, float] = {}  # key -> when it last existed

    def gone(self, keys: Iterable[str]) -> set[str]:
        """The liveness keys among `keys` that no longer exist; no round trip when all are trusted."""
        now = self._clock()
        self._seen_alive = {key: at for key, at in self._seen_alive.items() if now - at < self._trust_s}
        unknown = sorted(set(keys) - self._seen_alive.keys())
        if not unknown:
            return set()
        pipe = self._client.pipeline(transaction=False)
        for key in unknown:
            pipe.exists(key)
        gone = set()
        for key, exists in zip(unknown, pipe.execute(), strict=True):
            if exists:
                self._seen_alive[key] = now
            else:
                gone.add(key)
        return gone
