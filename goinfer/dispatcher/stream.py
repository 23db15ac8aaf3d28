"""A worker's side of the Redis stream protocol: consumer groups, reads, replies and acks.

Each queue is a stream read by the consumer group `goinfer`; each worker is one consumer in it,
so Redis hands every entry to one worker and keeps it pending until that worker acknowledges
it. The worker acknowledges an entry only together with its reply, in one MULTI/EXEC (RPUSH
reply, XACK, XDEL): a worker that dies before has its entries claimed by another (reclaim.py),
so every request is answered at least once, and Redis at maxmemory, which refuses RPUSH but
would accept XACK, refuses the whole transaction, so no entry is acknowledged with its reply
lost (RepliesRefused: the worker keeps the replies and tries again). The last replies of a
round and the next read share one round trip.

The streams are read as priority lanes, highest first (lanes.py): a read takes from the first
stream that holds entries, and blocks on all of them only when none does.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from goinfer.cluster_clients import NodeClients, node_clients
from goinfer.connections import is_out_of_memory
from goinfer.dispatcher.lanes import READ_LANES_SCRIPT, decode_lanes_answer, drained_after, read_lanes_args
from goinfer.dispatcher.round_trip import HeldConnection, RoundTrip
from goinfer.queue import (
    CONSUMER_GROUP,
    JOB_FIELD,
    REPLY_TTL_S,
    Job,
    Reply,
    entry_time_ms,
    job_expired_fields,
    job_finished_fields,
    job_started_fields,
    stats_key,
)

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


class RepliesRefused(RedisError):
    """Redis is at maxmemory and refused the transaction that sends `done`: nothing of it was done.

    The entries stay pending with this consumer; `following` are the entries the read that
    shared the round trip took (reads are allowed at maxmemory). Send `done` again later.
    """

    def __init__(self, done: list[Done], following: list[Pending]) -> None:
        replies = sum(reply is not None for _, reply in done)
        super().__init__(f"OOM: used memory is over maxmemory; {replies} {'reply' if replies == 1 else 'replies'} "
                         "kept until Redis takes them")
        self.done = done
        self.following = following


def answer_in(pipe: Any, job: Job, reply: str | None, job_ttl_s: int, now: float) -> None:
    """Add to `pipe` what answers `job` with `reply`: its reply list; or, for an asynchronous
    job, its record, for whoever polls it (expired when acknowledged unanswered: it waited past
    its JobTimeout). Nothing for a request acknowledged unanswered (its client is gone)."""
    if job.job_key is not None:
        fields: dict[Any, Any] = job_expired_fields(now) if reply is None else \
            job_finished_fields(reply, Reply.decode(reply).code, now)
        pipe.hset(job.job_key, mapping=fields)
        pipe.expire(job.job_key, job_ttl_s)
    elif reply is not None:
        pipe.rpush(job.reply_to, reply)
        pipe.expire(job.reply_to, REPLY_TTL_S)


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
    """One consumer (worker) of the group on its streams, read as lanes in the order given."""

    def __init__(self, client: redis.Redis | NodeClients, streams: list[str], consumer: str,
                 read_count: int = 1, job_result_ttl_s: float = 86400.0) -> None:
        # All the streams are one queue's: on a Redis Cluster, one slot, so one primary serves
        # every command here, a MULTI/EXEC and the lanes' script included.
        self.nodes = node_clients(client)
        self._held = HeldConnection()  # the round trips' connection (finish, read)
        self.streams = list(streams)  # highest priority first
        self.consumer = consumer
        self.read_count = read_count
        self._job_ttl = max(1, round(job_result_ttl_s))
        # Cluster-wide counters (stats_key) not yet written: they ride on the next `finish`.
        self._stats: Counter[tuple[str, str]] = Counter()
        # Whether the lanes held no undelivered entry at the last look: then the next read is a
        # blocking one on all lanes (which cannot take a low entry before a waiting high one);
        # otherwise it is the script that takes from the highest lane first.
        self._drained = True
        self._blocking_count = read_count

    @property
    def drained(self) -> bool:
        """Whether the lanes held no undelivered entry at the last look."""
        return self._drained

    @property
    def client(self) -> redis.Redis:
        """The client of the node that serves the streams (on a cluster, found again after `lost`)."""
        return self.nodes.client

    def lost(self, error: BaseException) -> None:
        """A command failed with `error`: let the clients find the streams' node again if need be."""
        self.nodes.lost(error)

    def ensure_groups(self) -> None:
        """Load the lanes' script, and create the group on every stream (and the stream), unless it exists.

        Created at id 0, so requests queued before any dispatcher ran are served too. Redis at
        maxmemory refuses XGROUP CREATE even for a group that exists: one that does is enough to
        serve (and serving frees memory).
        """
        # Loaded now, so that the first read by the script (often inside `finish`'s round trip)
        # does not fail on NOSCRIPT and lose its turn.
        self.client.script_load(READ_LANES_SCRIPT)
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" in str(exc) or (is_out_of_memory(exc) and self._group_exists(stream)):
                    continue
                raise

    def _group_exists(self, stream: str) -> bool:
        try:
            groups: Any = self.client.xinfo_groups(stream)
        except ResponseError:  # no such stream
            return False
        return any(_text(group["name"]) == CONSUMER_GROUP for group in groups)

    def read(self, count: int | None = None, block_ms: int | None = READ_BLOCK_MS) -> list[Pending]:
        """New entries for this consumer, from the highest lane that holds some; `block_ms=None`
        polls without waiting, otherwise waits on every lane when all are empty."""
        count = count or self.read_count
        if block_ms is None or not self._drained:
            taken = self._poll(count)
            if taken or block_ms is None:
                return taken
        round_trip = RoundTrip(self.client, self._held)
        self._queue_blocking_read(round_trip, count, block_ms)
        return self._blocking_read_result(round_trip.execute())

    def _poll(self, count: int) -> list[Pending]:
        """The lanes' script: entries of the highest lane that has some (one round trip)."""
        args = read_lanes_args(self.streams, CONSUMER_GROUP, self.consumer, count)
        try:
            answer = self.client.execute_command("EVALSHA", *args)
        except NoScriptError:  # Redis restarted (or flushed its scripts): load it again
            self.client.script_load(READ_LANES_SCRIPT)
            answer = self.client.execute_command("EVALSHA", *args)
        return self._lanes_result(answer)

    def _lanes_result(self, answer: Any) -> list[Pending]:
        streams, more = decode_lanes_answer(answer)
        self._drained = not more
        return self._decode(streams)

    def _queue_blocking_read(self, round_trip: RoundTrip, count: int, block_ms: int) -> None:
        """Wait on every lane (it says by itself whether entries are left: lanes.drained_after)."""
        round_trip.xreadgroup(CONSUMER_GROUP, self.consumer, {s: ">" for s in self.streams}, count=count,
                              block=block_ms)
        self._blocking_count = count

    def _blocking_read_result(self, results: list[Any]) -> list[Pending]:
        """What `_queue_blocking_read` put at the end of a pipeline's results: its entries."""
        read = results[-1]
        if isinstance(read, Exception):
            raise read
        self._drained = drained_after(read, self._blocking_count)
        return self._decode(read)

    def count(self, stream: str, stat: str) -> None:
        """Add one to a cluster-wide counter of `stream`, written with the next `finish`."""
        self._stats[(stream, stat)] += 1

    def finish(self, done: list[Done], read_next: bool = False, block: bool = True) -> list[Pending]:
        """Send the replies and acknowledge their entries in one round trip, optionally reading on
        (`block=False`: a read that never waits, for a round trip whose caller has work in hand).

        The replies, acknowledgements and counters are one MULTI/EXEC, sent in one round trip
        with the read after it: Redis runs it before a read that blocks. Raises RepliesRefused
        when Redis is at maxmemory (nothing was done), or the error of a command Redis refused.
        """
        pipe = RoundTrip(self.client, self._held)
        pipe.execute_command("MULTI")
        concerned = self._queue_answers(pipe, done)
        # Taken, not read: `count` may run on another thread meanwhile (the worker's send overlaps
        # its model calls); what this round trip does not write is given back below.
        counters, self._stats = self._stats, Counter()
        stats = list(counters.items())
        for (stream, name), count in stats:
            pipe.hincrby(stats_key(stream), name, count)
        pipe.execute_command("EXEC")
        # The next read: while entries wait, the lanes' script (highest lane first); once the
        # lanes are drained, the blocking read on all of them, as one round trip either way.
        blocking = read_next and self._drained and block
        if blocking:
            self._queue_blocking_read(pipe, self.read_count, READ_BLOCK_MS)
        elif read_next:
            pipe.execute_command("EVALSHA", *read_lanes_args(self.streams, CONSUMER_GROUP, self.consumer,
                                                               self.read_count))
        try:
            results = pipe.execute()
        except BaseException:
            self._stats.update(counters)
            raise
        if isinstance(results[0], Exception):  # MULTI itself refused (an ACL): what followed ran bare
            self._stats.update(counters)
            raise results[0]
        # The read is allowed at maxmemory and ran whatever became of the transaction; one that
        # failed (a group lost with Redis's data) fails again, and is handled, at the next read.
        following = self._following(results, blocking, read_next)
        if read_next:
            del results[-1]
        executed, queued = results[-1], results[1:-1]
        if isinstance(executed, Exception):  # EXECABORT: Redis refused a command, so ran none
            refused = next((r for r in queued if isinstance(r, Exception)), executed)
            self._stats.update(counters)  # not written: kept for the next round trip
            if is_out_of_memory(refused):
                raise RepliesRefused(done, following)
            raise refused
        _report_failures(concerned, stats, executed)
        return following

    def _queue_answers(self, pipe: RoundTrip, done: list[Done]) -> list[list[Pending]]:
        """Queue on `pipe` what answers and acknowledges `done`, a few commands for many entries:
        one RPUSH (and EXPIRE) per reply list, one XACK and one XDEL per stream. Returns, for each
        command queued, the entries it concerns (to name them if Redis fails that command)."""
        concerned: list[list[Pending]] = []
        now = time.time()
        replies: dict[str, list[tuple[Pending, str]]] = {}
        for item, reply in done:
            if item.job is None:
                continue
            if item.job.job_key is not None:  # an asynchronous job: its record, alone
                before = len(pipe.command_stack)
                answer_in(pipe, item.job, reply, self._job_ttl, now)
                concerned += [[item]] * (len(pipe.command_stack) - before)
            elif reply is not None:  # None: acknowledged unanswered, its client is gone
                replies.setdefault(item.job.reply_to, []).append((item, reply))
        for reply_to, answers in replies.items():
            pipe.rpush(reply_to, *(reply for _, reply in answers))
            pipe.expire(reply_to, REPLY_TTL_S)
            concerned += [[item for item, _ in answers]] * 2
        by_stream: dict[str, list[Pending]] = {}
        for item, _ in done:
            by_stream.setdefault(item.stream, []).append(item)
        for stream, items in by_stream.items():
            ids = [item.entry_id for item in items]
            pipe.xack(stream, CONSUMER_GROUP, *ids)
            pipe.xdel(stream, *ids)
            concerned += [items] * 2
        return concerned

    def _following(self, results: list[Any], blocking: bool, read_next: bool) -> list[Pending]:
        """The entries the read at the end of `finish`'s round trip took; [] when it failed."""
        if not read_next:
            return []
        try:
            if blocking:
                return self._blocking_read_result(results)
            if isinstance(results[-1], NoScriptError):
                self.client.script_load(READ_LANES_SCRIPT)
            if isinstance(results[-1], Exception):
                self._drained = False
                return []
            return self._lanes_result(results[-1])
        except (RedisError, OSError):
            self._drained = False
            return []

    def start_jobs(self, items: list[Pending]) -> None:
        """Mark the asynchronous jobs among `items` running, before they run (one round trip)."""
        keys = [item.job.job_key for item in items if item.job is not None and item.job.job_key is not None]
        if not keys:
            return
        pipe = self.client.pipeline(transaction=False)
        started: dict[Any, Any] = job_started_fields(time.time())
        for key in keys:
            pipe.hset(key, mapping=started)
        pipe.execute()

    def _decode(self, batch: Any) -> list[Pending]:
        return [decode_entry(stream, entry_id, fields) for stream, entries in batch or ()
                for entry_id, fields in entries]


def _report_failures(concerned: list[list[Pending]], stats: list[tuple[tuple[str, str], int]],
                     executed: Any) -> None:
    """Log the commands of a transaction that Redis ran but failed (a reply list holding another
    type), naming the requests they concerned: such a reply can never be delivered, and sending
    the transaction again would repeat the rest of it."""
    results = list(executed or ())
    for items, outcome in zip(concerned, results, strict=False):
        if not isinstance(outcome, Exception):
            continue
        for item in items:
            where = (item.job.job_key or item.job.reply_to) if item.job is not None else item.stream
            log.error("request %s: its reply could not be stored on %s: %s",
                      item.job.id if item.job is not None else item.entry_id, where, outcome)
    for ((stream, name), _count), outcome in zip(stats, results[len(concerned):], strict=False):
        if isinstance(outcome, Exception):
            log.error("counter %s of %s could not be updated: %s", name, stats_key(stream), outcome)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
