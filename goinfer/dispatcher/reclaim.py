"""Crash recovery: requests a dead worker had taken are found and run again, or set aside.

A worker keeps the requests it is running "fresh" in Redis (an XCLAIM by itself every second);
a request whose owner has not refreshed it for `ClaimIdleMs` belongs to a dead or stuck worker,
and any worker of the queue claims it. A request delivered `MaxDeliveries` times without being
answered has killed that many workers: it is answered with DeadLettered and moved to
`<stream>:dead` with the reason, never tried again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

import redis
from redis.exceptions import RedisError

from goinfer.queue import CONSUMER_GROUP

log = logging.getLogger("goinfer.reclaim")

REFRESH_INTERVAL_S = 1.0
SCAN_BATCH = 100
# A consumer with nothing pending and idle this long belonged to a worker that is gone.
FORGET_CONSUMER_AFTER_MS = 3_600_000

EXIT_STUCK = 4


@dataclass(frozen=True)
class Stale:
    """A pending entry whose owner has not refreshed it in time."""

    stream: str
    entry_id: bytes
    deliveries: int


def find_stale(client: redis.Redis, streams: list[str], min_idle_ms: int, consumer: str | None = None) -> list[Stale]:
    """Entries pending longer than `min_idle_ms` (of one consumer, or of any)."""
    stale = []
    for stream in streams:
        rows = client.xpending_range(stream, CONSUMER_GROUP, min="-", max="+", count=SCAN_BATCH,
                                     consumername=consumer, idle=min_idle_ms)
        for row in rows:
            stale.append(Stale(stream, row["message_id"], int(row["times_delivered"])))
    return stale


def forget_gone_consumers(client: redis.Redis, streams: list[str]) -> None:
    """Delete consumers of restarted workers, so the group's list does not grow forever."""
    for stream in streams:
        for consumer in client.xinfo_consumers(stream, CONSUMER_GROUP):
            if consumer["pending"] == 0 and consumer["idle"] > FORGET_CONSUMER_AFTER_MS:
                client.xgroup_delconsumer(stream, CONSUMER_GROUP, consumer["name"])


class InFlightKeeper(threading.Thread):
    """Refreshes the entries this worker is running, and ends the worker if one runs forever.

    A thread, because `infer` blocks the worker's main thread for as long as the model runs.
    """

    def __init__(self, client: redis.Redis, consumer: str, stuck_after_s: float,
                 exit_process: Callable[[int], None] = os._exit) -> None:
        super().__init__(name="goinfer-inflight-keeper", daemon=True)
        self._client = client
        self._consumer = consumer
        self._stuck_after_s = stuck_after_s
        self._exit = exit_process
        self._lock = threading.Lock()
        self._entries: dict[str, list[bytes]] = {}
        self._started_at = 0.0
        self._deadline = 0.0
        self._stop = threading.Event()

    def track(self, entries: dict[str, list[bytes]], deadline: float) -> None:
        with self._lock:
            self._entries = entries
            self._started_at = time.time()
            self._deadline = deadline

    def clear(self) -> None:
        with self._lock:
            self._entries = {}

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> None:
        while not self._stop.wait(REFRESH_INTERVAL_S):
            with self._lock:
                entries = dict(self._entries)
                deadline, started = self._deadline, self._started_at
            if not entries:
                continue
            if time.time() > deadline + self._stuck_after_s:
                log.error("a request has run for %.0fs, %.0fs past its deadline: this worker is stuck and "
                          "exits so that it is restarted", time.time() - started, time.time() - deadline)
                self._exit(EXIT_STUCK)
                return
            try:
                for stream, ids in entries.items():
                    # JUSTID: resets the idle time without counting a delivery.
                    self._client.xclaim(stream, CONSUMER_GROUP, self._consumer, 0, ids, justid=True)
            except RedisError as exc:
                log.debug("could not refresh in-flight entries: %s", exc)
