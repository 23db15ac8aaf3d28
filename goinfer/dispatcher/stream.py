"""A worker's side of the Redis stream protocol: consumer groups, reads, replies and acks.

Each queue is a stream read by the consumer group `goinfer`; each worker is one consumer in it,
so Redis hands every entry to one worker and keeps it pending until that worker acknowledges
it. The worker acknowledges an entry only after its reply is sent, in the same pipeline (RPUSH
reply, XACK, XDEL): a worker that dies before has its entries claimed by another (reclaim.py),
so every request is answered at least once. The last replies of a round and the next read
share one round trip.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import ResponseError

from goinfer.queue import CONSUMER_GROUP, JOB_FIELD, REPLY_TTL_S, Job, entry_time_ms, stats_key

log = logging.getLogger("goinfer.worker")

READ_BLOCK_MS = 1000
_JOB_KEY = JOB_FIELD.encode()


@dataclass(frozen=True)
class Pending:
    """An entry taken from a stream: its job, or None when the entry is unreadable."""

    stream: str
    entry_id: bytes
    job: Job | None
    raw: bytes = b""  # the job as queued, kept for the dead-letter stream

    def queued_ms(self, now_ms: float | None = None) -> float:
        """How long the entry waited, from Redis's XADD (its id) until now.

        Redis's clock against this machine's: 0 when they disagree by more than the wait.
        """
        now = time.time() * 1000 if now_ms is None else now_ms
        return max(0.0, now - entry_time_ms(self.entry_id))


# A finished entry and its encoded reply; None acknowledges it without answering (its client
# was already answered, or it had no readable job to answer).
Done = tuple[Pending, "str | None"]


def decode_entry(stream: bytes | str, entry_id: bytes, fields: Mapping[bytes, bytes]) -> Pending:
    """An entry as read from Redis; an unreadable job is logged and kept as `job=None` (acked unanswered)."""
    raw = fields.get(_JOB_KEY, b"")
    try:
        job: Job | None = Job.decode(fields[_JOB_KEY])
    except (KeyError, ValueError, TypeError, ArithmeticError, RecursionError) as exc:
        # Never let an entry crash the worker: it would crash every worker that claims it after.
        log.error("dropping malformed entry %s on %s: %s", entry_id, stream, exc)
        job = None
    return Pending(_text(stream), entry_id, job, raw if isinstance(raw, bytes) else b"")


class StreamConsumer:
    """One consumer (worker) of the group on its streams."""

    def __init__(self, client: redis.Redis, streams: list[str], consumer: str, read_count: int = 1) -> None:
        self.client = client
        self.streams = list(streams)
        self.consumer = consumer
        self.read_count = read_count
        # Cluster-wide counters (stats_key) not yet written: they ride on the next `finish`.
        self._stats: Counter[tuple[str, str]] = Counter()

    def ensure_groups(self) -> None:
        """Create the group on every stream (and the stream), unless it exists.

        Created at id 0, so requests queued before any dispatcher ran are served too.
        """
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def read(self, count: int | None = None, block_ms: int | None = READ_BLOCK_MS) -> list[Pending]:
        """New entries for this consumer; `block_ms=None` polls without waiting."""
        return self._decode(self.client.xreadgroup(
            CONSUMER_GROUP, self.consumer, {s: ">" for s in self.streams},
            count=count or self.read_count, block=block_ms,
        ))

    def count(self, stream: str, stat: str) -> None:
        """Add one to a cluster-wide counter of `stream`, written with the next `finish`."""
        self._stats[(stream, stat)] += 1

    def finish(self, done: list[Done], read_next: bool = False) -> list[Pending]:
        """Send the replies and acknowledge their entries in one round trip, optionally reading on.

        Redis runs the commands in order, so the replies are delivered before a read that blocks.
        """
        pipe = self.client.pipeline(transaction=False)
        for item, reply in done:
            if reply is not None and item.job is not None:
                pipe.rpush(item.job.reply_to, reply)
                pipe.expire(item.job.reply_to, REPLY_TTL_S)
            pipe.xack(item.stream, CONSUMER_GROUP, item.entry_id)
            pipe.xdel(item.stream, item.entry_id)
        for (stream, name), count in self._stats.items():
            pipe.hincrby(stats_key(stream), name, count)
        if read_next:
            pipe.xreadgroup(CONSUMER_GROUP, self.consumer, {s: ">" for s in self.streams},
                            count=self.read_count, block=READ_BLOCK_MS)
        results = pipe.execute()
        self._stats.clear()  # written (on failure they are kept for the next round trip)
        return self._decode(results[-1]) if read_next else []

    def _decode(self, batch: Any) -> list[Pending]:
        return [decode_entry(stream, entry_id, fields) for stream, entries in batch or ()
                for entry_id, fields in entries]


def ids_by_stream(pending: list[Pending]) -> dict[str, list[bytes]]:
    grouped: dict[str, list[bytes]] = {}
    for item in pending:
        grouped.setdefault(item.stream, []).append(item.entry_id)
    return grouped


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
