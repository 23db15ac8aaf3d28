"""A worker process: initialise every model once, then take requests from the queue and answer.

Workers are started with the `spawn` method, so each one is a fresh interpreter: safe for
TensorFlow, which hangs in a process forked after it ran. A worker handles one request at a
time; concurrency comes from running `MaxWorkers` of them, each its own consumer in the group.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Mapping

import redis
from redis.exceptions import RedisError, ResponseError

from goinfer.connections import sync_client
from goinfer.dispatcher import metrics
from goinfer.dispatcher.batching import batch_policies, chunks, wants_more
from goinfer.errors import ApiError
from goinfer.logs import setup_logging
from goinfer.models.base import Model
from goinfer.models.registry import ModelRegistry, instantiate
from goinfer.dispatcher.reclaim import InFlightKeeper, find_stale, forget_gone_consumers
from goinfer.queue import (CONSUMER_GROUP, JOB_FIELD, REPLY_TTL_S, STAT_DEAD_LETTERED, STAT_DEADLINE_DROPPED, Job,
                           Reply, dead_letter_stream, entry_time_ms, stats_key, stream_name)
from goinfer.settings import Settings

log = logging.getLogger("goinfer.worker")

READ_BLOCK_MS = 1000
BATCH_POLL_S = 0.001
RECLAIM_INTERVAL_S = 1.0
FORGET_INTERVAL_S = 60.0
RECONNECT_MAX_S = 5.0

# Exit status of a worker whose models failed to initialise: the supervisor stops on it.
EXIT_INIT_FAILED = 3


def queue_streams(settings: Settings, queue_index: int, models: Mapping[str, Model]) -> list[str]:
    """The streams dispatcher N reads: the default queue N and queue N of every custom queue."""
    bases = [settings.server.queue_name]
    bases += sorted({m.queue for m in models.values() if m.queue} - {settings.server.queue_name})
    return [stream_name(base, queue_index) for base in bases]


@dataclass
class Pending:
    """An entry taken from a stream: its job, or None when the entry is unreadable."""

    stream: str
    entry_id: bytes
    job: Job | None


class Worker:
    """The consume loop of one worker process."""

    def __init__(self, settings: Settings, queue_index: int, models: Mapping[str, Model],
                 consumer: str, client: redis.Redis | None = None) -> None:
        self._settings = settings
        self._models = dict(models)
        self._consumer = consumer
        self._redis = client or sync_client(settings.server)
        self._streams = queue_streams(settings, queue_index, models)
        self._policies = batch_policies(settings.server, self._models)
        self._read_count = max((p.size for p in self._policies.values()), default=1)
        self._infer_fail = settings.error("InferFail")
        server = settings.server
        self._claim_idle_ms = server.claim_idle_ms
        self._max_deliveries = server.max_deliveries
        self._dead_max = server.dead_letter_max_length
        self._keeper = InFlightKeeper(sync_client(server), consumer, stuck_after_s=server.message_timeout)
        self._next_reclaim = 0.0
        self._next_forget = 0.0
        # Cluster-wide counters (stats_key) not yet written: they ride on the next _finish pipeline.
        self._stats: Counter[tuple[str, str]] = Counter()
        self.stopping = False

    @property
    def streams(self) -> list[str]:
        """The streams this worker reads (reported to the supervisor for its heartbeat)."""
        return list(self._streams)

    def run(self) -> None:
        """Serve until `stopping` is set; Redis outages are waited out, never fatal."""
        batching = ", ".join(f"{api} up to {p.size} per {p.timeout_s * 1000:g} ms" for api, p in self._policies.items())
        log.info("worker %s reading %s%s", self._consumer, ", ".join(self._streams),
                 f"; batching {batching}" if batching else "")
        self._ensure_groups()
        self._keeper.start()
        delay = 0.1
        # First what this worker's previous incarnation had taken when it died.
        pending: list[Pending] = self._reclaim(own=True)
        while pending or not self.stopping:  # entries already taken are finished before stopping
            try:
                if not pending and time.monotonic() >= self._next_reclaim:
                    self._next_reclaim = time.monotonic() + RECLAIM_INTERVAL_S
                    pending = self._reclaim(own=False)
                if not pending:
                    pending = self._read(self._read_count, READ_BLOCK_MS)
                if pending and self._policies:
                    pending = self._fill_batches(pending)
                if pending:
                    deadline = max((p.job.deadline for p in pending if p.job), default=time.time())
                    self._keeper.track(_ids_by_stream(pending), deadline)
                    # The last replies and the next read share one round trip to Redis.
                    pending = self._finish(self._process(pending), read_next=not self.stopping)
                    self._keeper.clear()
                delay = 0.1
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("consumer group missing (Redis emptied?); creating it again")
                self._ensure_groups()
            except (RedisError, OSError) as exc:
                log.warning("redis unavailable (%s); retrying in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)
                self._try_ensure_groups()

    def _read(self, count: int, block_ms: int | None) -> list[Pending]:
        return self._decode(self._redis.xreadgroup(
            CONSUMER_GROUP, self._consumer, {s: ">" for s in self._streams}, count=count, block=block_ms,
        ))

    def _decode(self, batch: Any) -> list[Pending]:
        return [_pending(stream, entry_id, fields) for stream, entries in batch or () for entry_id, fields in entries]

    def _reclaim(self, own: bool) -> list[Pending]:
        """Claim entries of dead workers (or, at start, this worker's own); set poison aside."""
        min_idle = 0 if own else self._claim_idle_ms
        try:
            stale = find_stale(self._redis, self._streams, min_idle, consumer=self._consumer if own else None)
            if not own and time.monotonic() >= self._next_forget:
                self._next_forget = time.monotonic() + FORGET_INTERVAL_S
                forget_gone_consumers(self._redis, self._streams)
        except ResponseError:
            return []  # the group is (re)created by the read that follows
        if not stale:
            return []
        deliveries = {(s.stream, s.entry_id): s.deliveries for s in stale}
        reclaimed: list[Pending] = []
        for stream in {s.stream for s in stale}:
            ids = [s.entry_id for s in stale if s.stream == stream]
            for entry_id, fields in self._redis.xclaim(stream, CONSUMER_GROUP, self._consumer, min_idle, ids):
                if fields is None:
                    continue  # deleted meanwhile
                item = _pending(stream, entry_id, fields)
                count = deliveries[(stream, entry_id)]
                if count >= self._max_deliveries:
                    self._dead_letter(item, fields, count)
                else:
                    log.warning("running again request %s, taken by a worker that died or hung (delivery %d)",
                                item.job.id if item.job else entry_id, count + 1)
                    reclaimed.append(item)
        return reclaimed

    def _dead_letter(self, item: Pending, fields: Mapping[bytes, bytes], deliveries: int) -> None:
        reason = f"delivered {deliveries} times without an answer: it killed or hung the workers that took it"
        log.error("setting aside request %s on %s: %s", item.job.id if item.job else item.entry_id,
                  item.stream, reason)
        self._stats[(item.stream, STAT_DEAD_LETTERED)] += 1
        metrics.DEAD_LETTERED.labels(item.stream).inc()
        self._redis.xadd(dead_letter_stream(item.stream),
                         {JOB_FIELD: fields.get(JOB_FIELD.encode(), b""), "reason": reason,
                          "deliveries": deliveries, "at": f"{time.time():.3f}"},
                         maxlen=self._dead_max, approximate=True)
        reply = None
        if item.job is not None:
            error = self._settings.error("DeadLettered")
            reply = Reply(item.job.id, error.code, error.msg).encode()
        self._finish([(item, reply)])

    def _fill_batches(self, pending: list[Pending]) -> list[Pending]:
        """Read again while a batchable model has a partial batch and its timeout allows.

        Polls without BLOCK: Redis checks short BLOCK timeouts only on its 100 ms cron tick, so
        a 5 ms BLOCK can last 100 ms.
        """
        started = time.monotonic()
        while len(pending) < self._read_count:
            counts = Counter(p.job.api for p in pending if p.job is not None)
            remaining = started + wants_more(self._policies, counts) - time.monotonic()
            if remaining <= 0:
                break
            more = self._read(self._read_count - len(pending), block_ms=None)
            if more:
                pending += more
            else:
                time.sleep(min(remaining, BATCH_POLL_S))
        return pending

    def _process(self, pending: list[Pending]) -> list[tuple[Pending, str | None]]:
        """Run the jobs, sending each reply as soon as it is ready; the last ones are returned."""
        unsent: list[tuple[Pending, str | None]] = []
        groups: dict[str, list[Pending]] = {}
        for item in pending:
            if item.job is None or item.job.expired():
                if item.job is not None:
                    self._stats[(item.stream, STAT_DEADLINE_DROPPED)] += 1
                    metrics.DEADLINE_DROPPED.labels(item.stream).inc()
                    log.warning("dropping request %s: its client was already answered with QueueTimeout",
                                item.job.id)
                unsent.append((item, None))
            elif item.job.api in self._policies:
                groups.setdefault(item.job.api, []).append(item)
            else:
                unsent = self._flush(unsent)
                unsent.append((item, self.execute(item.job, _queued_ms(item))))
        for api, items in groups.items():
            for chunk in chunks(items, self._policies[api].size):
                unsent = self._flush(unsent)
                queued = [_queued_ms(item) for item in chunk]
                unsent += zip(chunk, self.execute_batch(self._models[api], [item.job for item in chunk], queued))
        return unsent

    def _flush(self, unsent: list[tuple[Pending, str | None]]) -> list[tuple[Pending, str | None]]:
        if unsent:
            self._finish(unsent)
        return []

    def execute(self, job: Job, queued_ms: float | None = None) -> str:
        """Run the model for one job; every outcome becomes an encoded Reply, never an exception."""
        model = self._models.get(job.api)
        if model is None:
            error = self._settings.error("UnknownApi")
            return Reply(job.id, error.code, f"{error.msg} : {job.api}", queued_ms=queued_ms).encode()
        started = time.perf_counter()
        try:
            result: Any = model.infer(job.id, job.params)
        except ApiError as exc:
            result = exc
        except Exception as exc:
            log.exception("infer of %s failed (requestId %s)", type(model).__name__, job.id)
            result = exc
        infer_s = time.perf_counter() - started
        metrics.INFER_SECONDS.labels(job.api).observe(infer_s)
        return self._encoded(job, result, "infer", queued_ms, infer_s * 1000)

    def execute_batch(self, model: Model, jobs: list[Job], queued_ms: list[float] | None = None) -> list[str]:
        """One infer_batch call for several jobs; a failure of the call answers each of them."""
        log.debug("infer_batch of %s: batch of %d", type(model).__name__, len(jobs))
        queued: list[float | None] = list(queued_ms) if queued_ms is not None else [None] * len(jobs)
        started = time.perf_counter()
        try:
            results = model.infer_batch([(job.id, job.params) for job in jobs])  # type: ignore[attr-defined]
            if not isinstance(results, list) or len(results) != len(jobs):
                got = len(results) if isinstance(results, list) else type(results).__name__
                raise TypeError(f"infer_batch must return a list of {len(jobs)} results, returned {got}")
        except ApiError as exc:
            results = [exc] * len(jobs)
        except Exception as exc:
            log.exception("infer_batch of %s failed for %d requests", type(model).__name__, len(jobs))
            results = [exc] * len(jobs)
        infer_s = time.perf_counter() - started
        histogram = metrics.INFER_SECONDS.labels(model.api_path)
        for _ in jobs:
            histogram.observe(infer_s)
        return [self._encoded(job, result, "infer_batch", waited, infer_s * 1000)
                for job, result, waited in zip(jobs, results, queued)]

    def _encoded(self, job: Job, result: Any, hook: str, queued_ms: float | None = None,
                 infer_ms: float | None = None) -> str:
        prefix = self._infer_fail
        timing = {"queued_ms": queued_ms, "infer_ms": infer_ms}
        if isinstance(result, ApiError):
            return Reply(job.id, result.code, f"{prefix.msg} : {result.msg}", **timing).encode()
        if isinstance(result, BaseException):
            return Reply(job.id, prefix.code, f"{prefix.msg} : {result or type(result).__name__}", **timing).encode()
        if not isinstance(result, dict):
            detail = f"{hook} must return a dict per request, returned {type(result).__name__}"
            return Reply(job.id, prefix.code, f"{prefix.msg} : {detail}", **timing).encode()
        try:
            return Reply(job.id, 0, data=result, **timing).encode()
        except (TypeError, ValueError) as exc:  # a result that cannot be sent is the model's failure
            return Reply(job.id, prefix.code, f"{prefix.msg} : {exc}", **timing).encode()

    def _ensure_groups(self) -> None:
        # Created at id 0, so requests queued before any dispatcher ran are served too.
        for stream in self._streams:
            try:
                self._redis.xgroup_create(stream, CONSUMER_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def _try_ensure_groups(self) -> None:
        try:
            self._ensure_groups()
        except (RedisError, OSError):
            pass

    def _finish(self, done: list[tuple[Pending, str | None]], read_next: bool = False) -> list[Pending]:
        """Send the replies and acknowledge their entries in one round trip, optionally reading on.

        Redis runs the commands in order, so the replies are delivered before a read that blocks.
        """
        pipe = self._redis.pipeline(transaction=False)
        for item, reply in done:
            if reply is not None and item.job is not None:
                pipe.rpush(item.job.reply_to, reply)
                pipe.expire(item.job.reply_to, REPLY_TTL_S)
            pipe.xack(item.stream, CONSUMER_GROUP, item.entry_id)
            pipe.xdel(item.stream, item.entry_id)
        for (stream, name), count in self._stats.items():
            pipe.hincrby(stats_key(stream), name, count)
        if read_next:
            pipe.xreadgroup(CONSUMER_GROUP, self._consumer, {s: ">" for s in self._streams},
                            count=self._read_count, block=READ_BLOCK_MS)
        results = pipe.execute()
        self._stats.clear()  # written (on failure they are kept for the next round trip)
        return self._decode(results[-1]) if read_next else []


def _pending(stream: bytes | str, entry_id: bytes, fields: Mapping[bytes, bytes]) -> Pending:
    try:
        job: Job | None = Job.decode(fields[JOB_FIELD.encode()])
    except (KeyError, ValueError, TypeError) as exc:
        log.error("dropping malformed entry %s on %s: %s", entry_id, stream, exc)
        job = None
    return Pending(_text(stream), entry_id, job)


def _queued_ms(item: Pending) -> float:
    """How long the entry waited, from Redis's XADD (its id) to now, also observed for /metrics.

    Redis's clock against this machine's: 0 when they disagree by more than the wait.
    """
    queued = max(0.0, time.time() * 1000 - entry_time_ms(item.entry_id))
    metrics.QUEUE_WAIT_SECONDS.labels(item.stream).observe(queued / 1000)
    return queued


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ids_by_stream(pending: list[Pending]) -> dict[str, list[bytes]]:
    grouped: dict[str, list[bytes]] = {}
    for item in pending:
        grouped.setdefault(item.stream, []).append(item.entry_id)
    return grouped


def consumer_name(worker_index: int) -> str:
    """Stable across restarts of one worker slot (the supervisor's pid and the slot), so a
    restarted worker finds and finishes what its previous incarnation had taken."""
    return f"{socket.gethostname()}:{os.getppid()}:{worker_index}"


def worker_process_main(settings: Settings, queue_index: int, model_paths: list[str],
                        worker_index: int, ready: Connection) -> None:
    """Entry point of a spawned worker: init models, report to the supervisor, then serve."""
    setup_logging()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us
    try:
        registry = ModelRegistry()
        registry.extend_from_paths(model_paths)
        models = instantiate(registry.classes, settings)
        for model in models.values():
            model.init()
    except BaseException as exc:
        log.exception("worker %d: model initialisation failed", worker_index)
        ready.send(("failed", f"{type(exc).__name__}: {exc}"))
        ready.close()
        raise SystemExit(EXIT_INIT_FAILED) from None

    worker = Worker(settings, queue_index, models, consumer_name(worker_index))

    def stop(signum, frame) -> None:
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    # The supervisor imports no model, so the worker tells it what it serves (for its heartbeat).
    ready.send(("ready", {"pid": os.getpid(), "streams": worker.streams, "apis": sorted(models)}))
    ready.close()
    worker.run()
    log.info("worker %d stopped", worker_index)
