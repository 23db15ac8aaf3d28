"""Crash recovery: requests a dead worker had taken are found and run again, or set aside.

While a worker process lives, its supervisor keeps every request the worker holds "fresh" in
Redis (liveness.py), however long its model runs; a request nobody has refreshed for
`ClaimIdleMs` belongs to a worker that died, or to a whole dispatcher that did, and any worker
of the queue claims it. A request delivered `MaxDeliveries` times without being answered has
killed that many workers: it is answered with DeadLettered and moved to `<stream>:dead` with
the reason, never tried again. (A request whose model merely runs too long is not retried at
all: past its MaxInferSeconds it is answered InferFail, see liveness.py.)

Kept apart from stream.py, which is the protocol of a healthy worker: this is what happens when
workers die.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import ResponseError

from goinfer.dispatcher import metrics
from goinfer.dispatcher.stream import Pending, StreamConsumer, decode_entry
from goinfer.queue import CONSUMER_GROUP, JOB_FIELD, STAT_DEAD_LETTERED, Job, dead_letter_stream
from goinfer.settings import ServerSettings

log = logging.getLogger("goinfer.reclaim")

RECLAIM_INTERVAL_S = 1.0
FORGET_INTERVAL_S = 60.0
SCAN_BATCH = 100
# A consumer with nothing pending and idle this long belonged to a worker that is gone.
FORGET_CONSUMER_AFTER_MS = 3_600_000


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
        rows: Any = client.xpending_range(stream, CONSUMER_GROUP, min="-", max="+", count=SCAN_BATCH,
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


def claim_stale(consumer: StreamConsumer, min_idle_ms: int, max_deliveries: int, dead_max_length: int,
                dead_reply: Callable[[Job], str], own: bool = False) -> list[Pending]:
    """Claim the entries idle for `min_idle_ms` (only this consumer's with `own`): those already
    delivered `max_deliveries` times are dead-lettered and answered; the others are returned,
    to be run again by this consumer."""
    try:
        stale = find_stale(consumer.client, consumer.streams, min_idle_ms, consumer.consumer if own else None)
    except ResponseError as exc:
        if not _group_missing(exc):
            raise
        return []  # the group is (re)created by the worker's next read
    deliveries = {(s.stream, s.entry_id): s.deliveries for s in stale}
    again: list[Pending] = []
    holding = {s.stream for s in stale}
    for stream in [name for name in consumer.streams if name in holding]:  # highest lane first
        ids: list[Any] = [s.entry_id for s in stale if s.stream == stream]
        claimed: Any = consumer.client.xclaim(stream, CONSUMER_GROUP, consumer.consumer, min_idle_ms, ids)
        for entry_id, fields in claimed:
            if fields is None:
                continue  # deleted meanwhile
            item = decode_entry(stream, entry_id, fields)
            count = deliveries[(stream, entry_id)]
            if count >= max_deliveries:
                dead_letter(consumer, item, count, dead_max_length, dead_reply)
            else:
                log.warning("running again request %s, taken by a worker that died or hung (delivery %d)",
                            item.job.id if item.job else entry_id, count + 1)
                again.append(item)
    return again


def dead_letter(consumer: StreamConsumer, item: Pending, deliveries: int, max_length: int,
                dead_reply: Callable[[Job], str]) -> None:
    """Move a request that killed `deliveries` workers to `<stream>:dead`, answer and acknowledge it."""
    reason = f"delivered {deliveries} times without an answer: it killed or hung the workers that took it"
    log.error("setting aside request %s on %s: %s", item.job.id if item.job else item.entry_id, item.stream, reason)
    consumer.count(item.stream, STAT_DEAD_LETTERED)
    metrics.DEAD_LETTERED.labels(item.stream).inc()
    consumer.client.xadd(dead_letter_stream(item.stream),
                         {JOB_FIELD: item.raw, "reason": reason, "deliveries": deliveries, "at": f"{time.time():.3f}"},
                         maxlen=max_length, approximate=True)
    consumer.finish([(item, dead_reply(item.job) if item.job is not None else None)])


class Reclaimer:
    """When a worker looks for its dead colleagues' requests, and how it handles them."""

    def __init__(self, consumer: StreamConsumer, server: ServerSettings, dead_reply: Callable[[Job], str]) -> None:
        self._consumer = consumer
        self._claim_idle_ms = server.claim_idle_ms
        self._max_deliveries = server.max_deliveries
        self._dead_max = server.dead_letter_max_length
        self._dead_reply = dead_reply
        self._next_claim = 0.0
        self._next_forget = 0.0

    def own(self) -> list[Pending]:
        """What this worker slot's previous incarnation had taken when it died: finish it first."""
        return claim_stale(self._consumer, 0, self._max_deliveries, self._dead_max, self._dead_reply, own=True)

    def due(self) -> list[Pending]:
        """Every RECLAIM_INTERVAL_S, the entries of workers that died or hung; [] in between."""
        now = time.monotonic()
        if now < self._next_claim:
            return []
        self._next_claim = now + RECLAIM_INTERVAL_S
        again = claim_stale(self._consumer, self._claim_idle_ms, self._max_deliveries, self._dead_max,
                            self._dead_reply)
        if now >= self._next_forget:
            self._next_forget = now + FORGET_INTERVAL_S
            try:
                forget_gone_consumers(self._consumer.client, self._consumer.streams)
            except ResponseError as exc:
                if not _group_missing(exc):
                    raise
        return again


def _group_missing(exc: ResponseError) -> bool:
    """Redis lost the stream or its group (restarted empty); the worker's next read recreates them."""
    text = str(exc)
    return "NOGROUP" in text or "no such key" in text
