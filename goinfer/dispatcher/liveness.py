"""Who vouches that a request is still being worked on, and when slow becomes stuck.

A request a worker took stays pending in the stream's consumer group until it is answered;
one nobody refreshes for `ClaimIdleMs` is taken to belong to a dead worker and is run again
elsewhere (reclaim.py). The refresh must come from something a busy model cannot starve: a
thread inside the worker cannot run while `infer` holds the GIL in C code for seconds, so a
request that was merely slow used to run again on every worker and end dead-lettered. The
supervisor vouches instead (EntryKeeper): while a worker process lives, every entry its consumer
holds is refreshed with XCLAIM ... JUSTID, whatever the worker is doing.

Being alive is not enough: a model that never returns would hold its requests forever. Before
each model call the worker writes on its CallBoard, in memory shared with the supervisor, what
it is running and for how long it may run (its model's `max_infer_seconds`, else
`Server.MaxInferSeconds`, else `Server.MessageTimeout`, after which no client still waits for
the answer; for asynchronous jobs, whose clients poll, their own deadline: JobTimeout). Writing
costs no system call, so it is done for every call. A call past its limit
is stuck: the supervisor stops that worker and answers the call's requests InferFail
(`settle_overdue`); they are never run again.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import RedisError

from goinfer.cluster_clients import NodeClients, node_clients
from goinfer.dispatcher.stream import answer_in
from goinfer.models.base import Model
from goinfer.queue import CONSUMER_GROUP, JOB_FIELD, Job
from goinfer.settings import ServerSettings

log = logging.getLogger("goinfer.dispatcher")

# Entries of one model call the board lists. A larger batch still runs and is timed; the
# entries past this are not answered InferFail when it overruns but run again, as after a crash.
CAPACITY = 1024
# How many pending entries of one consumer on one stream one refresh covers (a worker holds at
# most its read size, at most the largest batch).
REFRESH_SCAN = 10_000
REFRESH_MAX_INTERVAL_S = 1.0
COMMAND_TIMEOUT_S = 2.0
_READ_TRIES = 1000
JOB_MIN_LIMIT_S = 1.0


def infer_limit_s(server: ServerSettings, model: Model | type[Model] | None = None) -> float:
    """How long one call of `model` may run before it counts as stuck.

    The model's `max_infer_seconds`, else `Server.MaxInferSeconds`, else (0, the default)
    `Server.MessageTimeout`: a call longer than that can answer nobody, since its client was
    answered QueueTimeout at the latest MessageTimeout after the request arrived.
    """
    own = getattr(model, "max_infer_seconds", None)
    if own is not None:
        return float(own)
    return server.max_infer_seconds or server.message_timeout


def infer_limits(server: ServerSettings, models: Mapping[str, Model]) -> dict[str, float]:
    """`infer_limit_s` of every model, keyed by api path."""
    return {path: infer_limit_s(server, model) for path, model in models.items()}


def set_limits(server: ServerSettings, models: Mapping[str, Model]) -> dict[str, float | None]:
    """Per api path, the limit someone set (the model's `max_infer_seconds`, else a non-zero
    `Server.MaxInferSeconds`); None where the limit is only MessageTimeout's default."""
    limits: dict[str, float | None] = {}
    for path, model in models.items():
        own = getattr(model, "max_infer_seconds", None)
        limits[path] = float(own) if own is not None else (float(server.max_infer_seconds) or None)
    return limits


def call_limit_s(limit_s: float, set_limit_s: float | None, jobs: Sequence[Job], now: float) -> float:
    """How long one call for `jobs` may run: `limit_s`, unless asynchronous jobs are among them.

    A job's client does not wait (it polls), so MessageTimeout means nothing to it: without a
    limit set for the model (`set_limit_s`), a call of jobs may run until the latest of their
    deadlines (JobTimeout after submission; at least JOB_MIN_LIMIT_S, so that a job taken just
    before its deadline is not stopped at once), and never less than `limit_s` when live
    requests share the call. A limit set on purpose binds jobs too.
    """
    if set_limit_s is not None:
        return set_limit_s
    remaining = [job.deadline - now for job in jobs if job.job_key is not None]
    if not remaining:
        return limit_s
    own = max(max(remaining), JOB_MIN_LIMIT_S)
    return own if len(remaining) == len(jobs) else max(own, limit_s)


def refresh_interval_s(claim_idle_ms: int) -> float:
    """Refresh three times within ClaimIdleMs (at most every second), so one late refresh is harmless."""
    return min(REFRESH_MAX_INTERVAL_S, claim_idle_ms / 3000)


def split_entry_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


class _Entry(ctypes.Structure):
    _fields_ = [("stream", ctypes.c_uint32), ("ms", ctypes.c_uint64), ("seq", ctypes.c_uint64)]


class _Shared(ctypes.Structure):
    """The board's memory. `generation` is odd while the worker writes (a seqlock)."""

    _fields_ = [
        ("generation", ctypes.c_uint64),
        ("started", ctypes.c_double),  # time.monotonic() (system-wide) at the call's start; 0: none
        ("limit", ctypes.c_double),
        ("count", ctypes.c_uint64),
        ("entries", _Entry * CAPACITY),
    ]


@dataclass(frozen=True)
class Call:
    """One model call a worker is in, as its board shows it."""

    started: float  # time.monotonic()
    limit_s: float
    entries: tuple[tuple[int, bytes], ...]  # (index of the stream in the worker's list, entry id)
    unlisted: int = 0  # entries beyond CAPACITY

    def overdue(self, now: float) -> bool:
        return now - self.started > self.limit_s


class CallBoard:
    """One worker slot's model call, in shared memory: written by the worker, read by the supervisor.

    Create it in the supervisor (`create`) and pass it to the worker process as an argument;
    the worker is the only writer.
    """

    def __init__(self, shared: Any) -> None:
        self._shared = shared

    @classmethod
    def create(cls, context: Any) -> CallBoard:
        """A board in memory shared with processes started from `context` (a multiprocessing context)."""
        return cls(context.RawValue(_Shared))

    @classmethod
    def private(cls) -> CallBoard:
        """A board nobody else reads (a worker run without a supervisor)."""
        return cls(_Shared())

    def begin(self, entries: Sequence[tuple[int, bytes]], limit_s: float) -> None:
        """The worker starts a model call for `entries` (stream index, entry id) that may run `limit_s`."""
        shared = self._shared
        shared.generation += 1
        listed = min(len(entries), CAPACITY)
        for slot, (stream, entry_id) in zip(shared.entries[:listed], entries[:listed], strict=True):
            slot.stream = stream
            slot.ms, slot.seq = split_entry_id(entry_id)
        shared.count = len(entries)
        shared.limit = limit_s
        shared.started = time.monotonic()
        shared.generation += 1

    def end(self) -> None:
        """The call returned."""
        shared = self._shared
        shared.generation += 1
        shared.started = 0.0
        shared.generation += 1

    def reset(self) -> None:
        """No call (by the supervisor, while no worker of the slot lives: one killed mid-call, or
        mid-write, must not make its successor look stuck)."""
        shared = self._shared
        shared.generation += shared.generation % 2
        shared.started = 0.0

    def read(self) -> Call | None:
        """The call in progress, None between calls (or if the worker kept rewriting the board)."""
        shared = self._shared
        for _ in range(_READ_TRIES):
            before = shared.generation
            if before % 2:
                time.sleep(0)
                continue
            started, limit, count = shared.started, shared.limit, shared.count
            if not started:
                call = None
            else:
                listed = shared.entries[:min(count, CAPACITY)]
                call = Call(started, limit, tuple((e.stream, f"{e.ms}-{e.seq}".encode()) for e in listed),
                            max(0, count - CAPACITY))
            if shared.generation == before:
                return call
        return None


@dataclass(frozen=True)
class Holder:
    """A live worker's consumer and the streams it reads: what the supervisor vouches for."""

    consumer: str
    streams: tuple[str, ...]


class EntryKeeper:
    """A supervisor thread that refreshes every entry its live workers hold.

    A thread, so that Redis being slow or away never delays the supervisor's watch loop (which
    restarts dead workers and stops stuck ones). Refreshing is XCLAIM ... JUSTID to the same
    consumer: it resets the entry's idle time without counting a delivery.
    """

    def __init__(self, client: redis.Redis | NodeClients, claim_idle_ms: int) -> None:
        self.nodes = node_clients(client)  # also the supervisor's, to settle stuck calls
        self._interval = refresh_interval_s(claim_idle_ms)
        self._holders: tuple[Holder, ...] = ()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def vouch_for(self, holders: Iterable[Holder]) -> None:
        """Replace the set of live workers (called by the supervisor's main thread)."""
        self._holders = tuple(holders)  # one assignment: the thread sees the old or the new tuple

    @property
    def client(self) -> redis.Redis:
        """The client of the node that serves the queue's streams."""
        return self.nodes.client

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="goinfer-entry-keeper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(COMMAND_TIMEOUT_S * 3)
        self.nodes.close()

    def refresh(self) -> int:
        """Refresh once: two round trips whatever the number of workers; how many entries were refreshed."""
        pairs = [(holder.consumer, stream) for holder in self._holders for stream in holder.streams]
        if not pairs:
            return 0
        client = self.client
        pipe = client.pipeline(transaction=False)
        for consumer, stream in pairs:
            pipe.xpending_range(stream, CONSUMER_GROUP, min="-", max="+", count=REFRESH_SCAN,
                                consumername=consumer)
        held = pipe.execute(raise_on_error=False)
        pipe = client.pipeline(transaction=False)
        refreshed = 0
        for (consumer, stream), rows in zip(pairs, held, strict=True):
            if isinstance(rows, Exception):
                self.nodes.lost(rows)  # MOVED: on a cluster, the queue has another primary now
                continue
            if not rows:
                continue  # no group yet (or Redis emptied): the worker's next read recreates it
            ids = [row["message_id"] for row in rows]
            pipe.xclaim(stream, CONSUMER_GROUP, consumer, 0, ids, justid=True)
            refreshed += len(ids)
        if refreshed:
            pipe.execute(raise_on_error=False)
        return refreshed

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.refresh()
            except (RedisError, OSError) as exc:  # an outage: the dispatcher reports it once, elsewhere
                self.nodes.lost(exc)
                log.debug("could not refresh the workers' entries: %s", exc)
            except Exception:  # noqa: BLE001 - a bug here must not stop a serving dispatcher
                log.exception("refreshing the workers' entries failed")


def settle_overdue(client: redis.Redis, consumer: str, streams: Sequence[str], call: Call,
                   reply: Callable[[Job], str], job_result_ttl_s: float = 86400.0) -> list[Job]:
    """Answer (`reply`) and acknowledge the entries of a stuck call that its stopped worker still held.

    Call it once the worker is dead, before its slot is restarted: a restarted worker would take
    them up again. Entries the worker answered before it died are no longer pending and are
    left alone, so every request gets one answer. Returns the jobs answered.
    """
    listed = [(streams[index], entry_id) for index, entry_id in call.entries if index < len(streams)]
    if not listed:
        return []
    pipe = client.pipeline(transaction=False)
    for stream, entry_id in listed:
        pipe.xpending_range(stream, CONSUMER_GROUP, min=entry_id, max=entry_id, count=1, consumername=consumer)
        pipe.xrange(stream, entry_id, entry_id)
    found = pipe.execute()
    # One MULTI/EXEC: Redis at maxmemory refuses the RPUSH, and with it the XACK, so an entry is
    # never acknowledged with its answer lost.
    pipe = client.pipeline(transaction=True)
    answered = []
    for position, (stream, entry_id) in enumerate(listed):
        pending, entries = found[2 * position], found[2 * position + 1]
        if not pending:
            continue  # answered by the worker before it stopped
        job = _job_of(entries)
        if job is not None:
            answer_in(pipe, job, reply(job), max(1, round(job_result_ttl_s)), time.time())
            answered.append(job)
        pipe.xack(stream, CONSUMER_GROUP, entry_id)
        pipe.xdel(stream, entry_id)
    if len(pipe):
        pipe.execute()
    return answered


def _job_of(entries: Any) -> Job | None:
    for _entry_id, fields in entries or ():
        try:
            return Job.decode(fields[JOB_FIELD.encode()])
        except (KeyError, ValueError, TypeError, ArithmeticError):
            return None
    return None
