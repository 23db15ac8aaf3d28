"""The HTTP tier's side of the queue: put a job on a stream, await its reply.

One reader task per process drains this process's reply lists (one per queue number, read with
one BLPOP; on a Redis Cluster one reader per queue, as a BLPOP cannot span slots) and resolves the
waiting request by id, so a request costs one enqueue script (enqueue.py, batched per event-loop
tick) and no subscription, connection or task of its own. A second
task keeps the process's liveness key (`queue.tier_alive_key`, named in every job as
`alive_key`), so workers can skip the jobs of a process that died. What these tasks and the
enqueues see of Redis feeds one RedisHealth (an outage, or a full Redis, is logged once when it
starts and once when it ends); refused credentials stop the tier (`when_refused`).

A Redis that fails quietly is noticed within seconds: every command has `Server.RedisTimeoutS`
to be answered, the reader blocks in Redis for READ_BLOCK_S at a time on a socket that gives up a
little after that, and idle connections are checked before use (goinfer/connections.py). While
Redis is unreachable, requests are answered SendMsgFail at once, without trying.

What SendMsgFail (9702) means: the request was not queued and will never run. An enqueue is
answered so only when its command was never written to Redis (no connection, Redis known to be
unreachable, a payload that cannot be encoded) or Redis answered it with an error (full,
refusing). An enqueue whose command was written but whose answer never came (the connection
died or went silent under it) may have been queued: that request waits for its reply like any
other, and gets its result, or QueueTimeout (9997) at its deadline, after which no worker
starts it. With Server.EnqueueReplicas, an enqueue also waits until that many replicas hold it
(WAIT, in the same round trip; replication.py says what a short WAIT means).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio
from redis.asyncio.connection import ConnectionPool
from redis.exceptions import AskError

from goinfer.cluster_clients import AsyncClusterNodes, as_redis_error, is_relocation
from goinfer.connections import RedisRefused, async_client, is_out_of_memory, refusal
from goinfer.http.enqueue import JOB_ENQUEUE, EnqueueBatcher, MaybeQueued, NotQueued, Script, spawn
from goinfer.http.redis_health import ClusterHealth, RedisHealth, is_unreachable
from goinfer.http.replication import ReplicaWait
from goinfer.queue import (
    JOB_FIELD,
    QUEUE_FULL,
    REPLAYED,
    TIER_ALIVE_REFRESH_S,
    TIER_ALIVE_TTL_S,
    Reply,
    deliver_reply,
    reply_key,
    tier_alive_key,
)
from goinfer.redis_address import describe_redis
from goinfer.reply_lists import ReplyPopper
from goinfer.settings import ServerSettings

log = logging.getLogger("goinfer.http.queue")

DRAIN_BATCH = 256
READ_BLOCK_S = 1  # BLPOP's own timeout: the reader hears from Redis at least this often
RECONNECT_FIRST_S = 0.05
RECONNECT_MAX_S = 2.0
CLOSE_TIMEOUT_S = 1.0
STOP_ATTEMPTS = 10


class SendFailure(Exception):
    """The job was not queued, and will not run (Redis unreachable, full or refusing).

    `reported`: the cause is already in the log (an outage, a full Redis, refused credentials),
    so the request's own failure need not be logged again.
    """

    def __init__(self, message: str, reported: bool = False) -> None:
        super().__init__(message)
        self.reported = reported


class QueueFull(Exception):
    """The queue already holds MaxQueueLength requests; refused at once instead of timing out."""


class Replayed(Exception):
    """The same signature was seen within the timestamp window (RejectReplay)."""


class ReplyTimeout(Exception):
    """No reply before the request's deadline."""


class JobMaybeQueued(Exception):
    """A job's enqueue was written but its answer never came, and its record could not be found
    either: it may have been queued (a poll of its id tells), or not."""


class QueueClient:
    """Submits jobs for one HTTP process and routes replies back to their requests."""

    def __init__(self, server: ServerSettings) -> None:
        self._server = server
        self.process_id = uuid.uuid4().hex
        self.reply_keys = [reply_key(self.process_id, index) for index in range(server.request_queue_amount)]
        # Every job this process sends names it (Job.alive_key): it expires soon after we die.
        self.alive_key = tier_alive_key(self.process_id)
        self._redis = async_client(server)  # on a Redis Cluster, for the keys of no queue (our liveness key)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._deadlines = Deadlines(self._waiting)
        self._replies = ReplyPopper()
        self._tasks: list[asyncio.Task[None]] = []
        self._address = describe_redis(server)
        self.replica_wait = (ReplicaWait(self._address, server.enqueue_replicas,
                                         server.enqueue_replicas_timeout_ms) if server.enqueue_replicas else None)
        self._max_length = str(server.max_queue_length)
        # On one Redis, one enqueue batcher and one reader for every queue; on a Redis Cluster,
        # each queue's enqueues and reply reads go to the primary serving its slot, one batcher
        # per primary and one reader per queue (BLPOP cannot span slots), and each queue's
        # health is its own: a primary that fails over fails only the requests to its queues.
        self._cluster: AsyncClusterNodes | None = None
        self._cluster_health: ClusterHealth | None = None
        self._batchers: dict[int, tuple[redis.asyncio.Redis, EnqueueBatcher]] = {}
        self._reader_redis: redis.asyncio.Redis | None = None
        self._enqueue: EnqueueBatcher | None = None
        self.health: RedisHealth
        if isinstance(self._redis, redis.asyncio.Redis):
            self._reader_redis = _one_redis(async_client(server, blocking_s=READ_BLOCK_S))
            self._enqueue = EnqueueBatcher(self._redis, self.replica_wait)
            self.health = RedisHealth(self._address)
        else:
            self._cluster = AsyncClusterNodes(server, self._redis)
            self.health = self._cluster_health = ClusterHealth(self._address)
        self.refused: RedisRefused | None = None
        self._refusal_callbacks: list[Callable[[], None]] = []
        self._dropping_idle = False
        self._closing = False

    async def start(self) -> None:
        """Check that Redis takes our credentials, then start reading replies and keeping our
        liveness key.

        Raises RedisRefused when it does not; an unreachable Redis is only logged (the tier
        serves SendMsgFail until it is back).
        """
        started = time.monotonic()
        try:
            await self._redis.ping()
        except Exception as exc:  # noqa: BLE001 - redis-py, OSError, uvloop's RuntimeError: all mean "not now"
            exc = as_redis_error(exc, self._server)
            refused = refusal(exc, self._server)
            if refused is not None:
                await self._close_clients()
                raise refused from None
            self.health.failed(started, exc)
        else:
            log.info("redis at %s answers; replies come back on %s (one list per queue number)",
                     self._address, self.reply_keys[0])
        loop = asyncio.get_running_loop()
        readers = [None] if self._cluster is None else range(len(self.reply_keys))
        self._tasks = [*(loop.create_task(self._read_replies(index)) for index in readers),
                       loop.create_task(self._keep_alive())]

    def reply_key(self, index: int) -> str:
        """Where the answers of our requests to queue number `index` come back."""
        return self.reply_keys[index]

    def when_refused(self, callback: Callable[[], None]) -> None:
        """Call `callback` once if Redis starts refusing our credentials (at once if it has)."""
        if self.refused is not None:
            callback()
        else:
            self._refusal_callbacks.append(callback)

    async def close(self) -> None:
        """Stop reading, delete our liveness key (workers then skip what we queued: nobody waits
        for it any more), close the connections."""
        await self._stop_tasks()
        if self.refused is None:
            try:
                await asyncio.wait_for(self._redis.delete(self.alive_key), CLOSE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - Redis away: the key expires by itself
                log.debug("could not delete %s (%s); it expires within %ss", self.alive_key, exc, TIER_ALIVE_TTL_S)
        await self._close_clients()

    async def _stop_tasks(self) -> None:
        """Cancel the reader and the key keeper, again if need be: before Python 3.12, a cancel
        that lands just as an asyncio.wait_for completes (redis-py wraps each socket write in
        one) is swallowed, and the task would read on; seen as a tier that never finished
        stopping. Their loops also end on `_closing`."""
        self._closing = True
        for _ in range(STOP_ATTEMPTS):
            running = [task for task in self._tasks if not task.done()]
            if not running:
                break
            for task in running:
                task.cancel()
            await asyncio.wait(running, timeout=CLOSE_TIMEOUT_S / 2)
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("%s ended with %r", task.get_coro(), task.exception())

    async def _close_clients(self) -> None:
        await self._redis.aclose()
        if self._reader_redis is not None:
            await self._reader_redis.aclose()
        if self._cluster is not None:
            await self._cluster.aclose()

    async def submit(self, stream: str, job_id: str, payload: str, timeout: float,
                     replay_key: str | None = None, replay_ttl_s: int = 0) -> Reply:
        """Queue an encoded Job and wait for its reply.

        Raises SendFailure (not queued), QueueFull, Replayed (when `replay_key` was already set)
        or ReplyTimeout; nothing else, whatever Redis or the network do.
        """
        health = self._reachable(stream)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._waiting[job_id] = future
        self._deadlines.add(loop, timeout, job_id)
        keys = [stream, replay_key] if replay_key else [stream]
        args = [self._max_length, payload, replay_ttl_s, JOB_FIELD]
        started = time.monotonic()
        try:
            if self._enqueue is not None and self.replica_wait is None:
                # One Redis: told the enqueue's outcome, woken only by the reply. (With
                # EnqueueReplicas the request must not be answered before its WAIT: it awaits it.)
                self._enqueue.send(keys, args, functools.partial(self._enqueued, future, job_id, stream, started,
                                                                 health))
            else:
                outcome: Any = None
                failure: Exception | None = None
                try:
                    outcome = await self._send(keys, args)
                except (NotQueued, MaybeQueued) as exc:
                    failure = exc
                self._enqueued(future, job_id, stream, started, health, outcome, failure)
            return await future
        finally:
            self._waiting.pop(job_id, None)

    def _enqueued(self, future: asyncio.Future[Reply], job_id: str, stream: str, started: float,
                  health: RedisHealth, outcome: Any, failure: Exception | None) -> None:
        """What `submit` does with its enqueue's outcome: a refusal or a failure that certainly
        did not queue is the request's answer; otherwise it waits for its reply."""
        if isinstance(failure, MaybeQueued):
            self._maybe_queued(job_id, stream, started, failure, health)
            return
        try:
            if isinstance(failure, NotQueued):
                raise self._send_failure(started, failure.cause, health)
            self._queued(outcome, started, health)
        except (SendFailure, QueueFull, Replayed) as refused:
            if not future.done():
                future.set_exception(refused)

    def _maybe_queued(self, job_id: str, stream: str, started: float, failure: MaybeQueued,
                      health: RedisHealth) -> None:
        """An enqueue sent whose answer never came: the request waits for its reply (or its deadline)."""
        if not self._noted(started, failure.cause, health):
            log.warning("request %s may have been queued on %s (%s); awaiting its reply", job_id, stream, failure)

    async def submit_job(self, stream: str, record_key: str, record: dict[str, str], record_ttl_s: int,
                         payload: str, replay_key: str | None = None, replay_ttl_s: int = 0) -> None:
        """Queue an asynchronous job: its record and its entry in one script (JOB_ENQUEUE), and
        return at once; nobody waits for its answer here, the worker writes it to the record.

        Raises SendFailure (not queued), QueueFull, Replayed or JobMaybeQueued.
        """
        health = self._reachable(stream)
        keys = [stream, record_key, replay_key] if replay_key else [stream, record_key]
        pairs = [text for field_value in record.items() for text in field_value]
        started = time.monotonic()
        try:
            outcome = await self._send(keys, [self._max_length, payload, replay_ttl_s, JOB_FIELD, record_ttl_s,
                                              *pairs], JOB_ENQUEUE)
        except NotQueued as failure:
            raise self._send_failure(started, failure.cause, health) from None
        except MaybeQueued as failure:
            self._noted(started, failure.cause, health)
            # The script writes the record and the entry together: the record says which happened.
            try:
                if await asyncio.wait_for(self._redis.exists(record_key), self._server.redis_timeout_s):
                    return
            except Exception:  # noqa: BLE001 - still no answer: the client is told it may be queued
                pass
            raise JobMaybeQueued(str(failure)) from None
        self._queued(outcome, started, health)

    async def read_job(self, record_key: str) -> dict[Any, Any]:
        """A job's record as HGETALL answers it ({} when there is none); raises SendFailure when
        Redis does not answer (the record may exist: the caller must not say "not found")."""
        health = self._reachable(record_key)
        started = time.monotonic()
        try:
            raw = await self._redis.hgetall(record_key)
        except Exception as exc:  # noqa: BLE001 - redis-py, OSError, timeouts: the record cannot be read now
            raise self._send_failure(started, exc, health) from None
        health.answered(started)
        return cast("dict[Any, Any]", raw)

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def _health(self, key: str) -> RedisHealth:
        """What we know of the Redis that holds `key`: on a cluster, its queue's primary."""
        return self.health if self._cluster_health is None else self._cluster_health.of(key)

    def _reachable(self, key: str) -> RedisHealth:
        """The health of `key`'s Redis; SendFailure at once when it refuses us or is known to be
        down: nothing is sent, so the answer is true, and comes without waiting."""
        if self.refused is not None:
            raise SendFailure(str(self.refused), reported=True)
        health = self._health(key)
        if health.down:
            raise SendFailure(f"redis at {health.address} is unreachable", reported=True)
        return health

    @staticmethod
    def _queued(outcome: Any, started: float, health: RedisHealth) -> None:
        """Redis answered the enqueue script: note it, and raise QueueFull or Replayed for a refusal."""
        health.answered(started)
        health.stored()
        if outcome == QUEUE_FULL:
            raise QueueFull()
        if outcome == REPLAYED:
            raise Replayed()

    async def _send(self, keys: list[str], args: list[Any], script: Script | None = None) -> Any:
        """The enqueue script's result; raises NotQueued or MaybeQueued.

        On a Redis Cluster, an enqueue that was not queued because of where it went (MOVED, ASK,
        TRYAGAIN, CLUSTERDOWN: refused before running; a primary that could not be reached) is
        sent once more, to whoever serves the queue's slot now.
        """
        if self._enqueue is not None:
            return await self._enqueue.call(keys, args, *([script] if script else []))
        try:
            return await self._send_to_node(keys, args, script)
        except NotQueued as failure:
            if self._cluster is None or not is_relocation(failure.cause):
                raise
            self._cluster.lost(failure.cause)
        return await self._send_to_node(keys, args, script)

    async def _send_to_node(self, keys: list[str], args: list[Any], script: Script | None = None) -> Any:
        client, batcher = await self._batcher(keys[0])
        try:
            return await batcher.call(keys, args, *([script] if script else []))
        except (NotQueued, MaybeQueued) as failure:
            if is_unreachable(failure.cause):
                self._drop_idle_connections(client)
            raise

    async def _batcher(self, key: str) -> tuple[redis.asyncio.Redis, EnqueueBatcher]:
        """On a Redis Cluster, the client and enqueue batcher of the primary serving `key` now."""
        assert self._cluster is not None
        try:
            client = await self._cluster.client_for(key)
        except Exception as exc:  # noqa: BLE001 - the cluster cannot say where the slot is: nothing was sent
            raise NotQueued(as_redis_error(exc, self._server)) from None
        found = self._batchers.get(id(client))
        if found is None or found[0] is not client:
            found = self._batchers[id(client)] = (client, EnqueueBatcher(client, self.replica_wait))
        return found

    def _send_failure(self, started: float, error: BaseException, health: RedisHealth | None = None) -> SendFailure:
        """What a request that was not queued is told, after telling the tier what it learnt."""
        message = str(error) or type(error).__name__
        return SendFailure(message, reported=self._noted(started, error, health))

    def _noted(self, started: float, error: BaseException, health: RedisHealth | None = None,
               client: redis.asyncio.Redis | None = None) -> bool:
        """Take in what a failed Redis call (started at `started`) says about Redis (`health`:
        about the Redis it went to, on a cluster its queue's primary, through `client`); True
        when that is now in the log (an outage, a full Redis, refused credentials), False for
        anything else."""
        health = health or self.health
        error = as_redis_error(error, self._server)
        refused = refusal(error, self._server)
        if refused is not None:
            self._refuse(refused)
            return True
        if self._cluster is not None:
            self._cluster.lost(error)  # the next command asks the cluster where the slot is now
            if isinstance(error, AskError):  # MOVED or ASK: served elsewhere, and followed; no outage
                return True
        if is_out_of_memory(error):
            health.out_of_memory(error)
            return True
        if is_unreachable(error):
            health.failed(started, error)
            self._drop_idle_connections(client)
            return True
        return False

    def _drop_idle_connections(self, client: redis.asyncio.Redis | None = None) -> None:
        """One connection found dead: its idle siblings to the same address most likely are too
        (the host rebooted, the address moved). Closing them now makes the next requests connect
        afresh, which fails before anything is sent, instead of writing into a dead socket. The
        reader's too: a connection to a master demoted to a replica (READONLY) is alive, and
        would otherwise keep the reader on it."""
        if self._dropping_idle:
            return
        self._dropping_idle = True

        async def drop() -> None:
            try:
                for pool in self._idle_pools(client):
                    await pool.disconnect(inuse_connections=False)
            except Exception as exc:  # noqa: BLE001 - best effort; each connection is checked on use anyway
                log.debug("closing idle connections failed: %s", exc)
            finally:
                self._dropping_idle = False

        spawn(drop())

    def _idle_pools(self, client: redis.asyncio.Redis | None) -> list[ConnectionPool]:
        """The pools to close idle connections of: on a cluster, those to the node `client`
        reaches (the others' nodes are fine; redis-py's cluster client minds its own)."""
        if self._cluster is not None:
            return [] if client is None else [other.connection_pool for other in self._cluster.same_node(client)]
        assert isinstance(self._redis, redis.asyncio.Redis) and self._reader_redis is not None
        return [self._redis.connection_pool, self._reader_redis.connection_pool]

    def _refuse(self, refused: RedisRefused) -> None:
        """Redis refuses our credentials: answer every waiting request now and stop the tier."""
        if self.refused is not None:
            return
        self.refused = refused
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(SendFailure(str(self.refused), reported=True))
        callbacks, self._refusal_callbacks = self._refusal_callbacks, []
        for callback in callbacks:
            callback()

    async def _read_replies(self, index: int | None = None) -> None:
        """Drain our reply lists forever (only queue number `index`'s: on a cluster, one reader
        per queue). A connection that dies, even silently, ends this BLPOP within READ_BLOCK_S +
        RedisTimeoutS; the next one is made on a fresh connection."""
        keys = self.reply_keys if index is None else [self.reply_keys[index]]
        health = self._health(keys[0])
        delay = RECONNECT_FIRST_S
        while not self._closing:
            started = time.monotonic()
            reader: redis.asyncio.Redis | None = None
            try:
                reader = await self._reader(keys[0])
                replies = await self._replies.pop(reader, keys, READ_BLOCK_S, DRAIN_BATCH)
                health.answered(started)
                delay = RECONNECT_FIRST_S
                for raw in replies:
                    self._deliver(raw)
                if replies:
                    # Let the requests just answered write their responses before the next BLMPOP
                    # goes out: sending it wakes Redis, which costs the sender tens of µs on a VM,
                    # and the clients need not wait for that (1 connection: p50 ~5 % lower, fewer
                    # sleeps per request; benchmarks/README.md).
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever a broken connection raises, the reader lives on
                exc = as_redis_error(exc, self._server)
                if self.refused is not None or refusal(exc, self._server) is not None:
                    self._noted(started, exc, health)
                    return
                if self._noted(started, exc, health, reader):  # an outage: logged once by the health, not per retry
                    log.debug("reading replies failed (%s); retrying in %.2fs", exc, delay)
                else:
                    log.warning("reading replies failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    async def _reader(self, key: str) -> redis.asyncio.Redis:
        """The client that blocks on reply lists: on a cluster, that of the primary serving `key`."""
        if self._cluster is not None:
            return await self._cluster.client_for(key, blocking_s=READ_BLOCK_S)
        assert self._reader_redis is not None
        return self._reader_redis

    async def _keep_alive(self) -> None:
        """Refresh our liveness key every TIER_ALIVE_REFRESH_S, so that it expires only after we
        die. EXPIRE needs no memory, so the key also outlives a Redis at maxmemory (SET is only
        for a key that is missing: at start, or after Redis lost its data)."""
        identity = f"{socket.gethostname()}:{os.getpid()}"
        while not self._closing:
            started = time.monotonic()
            try:
                if not await self._redis.expire(self.alive_key, TIER_ALIVE_TTL_S):
                    await self._redis.set(self.alive_key, identity, ex=TIER_ALIVE_TTL_S)
                self.health.answered(started)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - as in the reader: never let this task die
                exc = as_redis_error(exc, self._server)
                if self.refused is not None or refusal(exc, self._server) is not None:
                    self._noted(started, exc)
                    return
                if not self._noted(started, exc):
                    log.warning("refreshing %s failed (%s)", self.alive_key, exc)
            await asyncio.sleep(TIER_ALIVE_REFRESH_S)

    def _deliver(self, raw: bytes | str) -> None:
        try:
            deliver_reply(raw, self._waiting, keep_answer=True)  # copied into the answer unread
        except ValueError as exc:
            log.error("dropping a malformed reply (%s)", exc)


def _one_redis(client: redis.asyncio.Redis | object) -> redis.asyncio.Redis:
    assert isinstance(client, redis.asyncio.Redis)
    return client


class Deadlines:
    """Answers ReplyTimeout to the requests still waiting at their deadline: one timer for the
    requests of one event-loop tick (a timer per request cost ~2 us to arm and cancel, on the
    loop), which holds only their ids, not the replies that came meanwhile."""

    def __init__(self, waiting: dict[str, asyncio.Future[Reply]]) -> None:
        self._waiting = waiting
        self._groups: dict[float, list[str]] = {}  # this tick's requests, by timeout

    def add(self, loop: asyncio.AbstractEventLoop, timeout: float, job_id: str) -> None:
        group = self._groups.get(timeout)
        if group is None:
            if not self._groups:
                loop.call_soon(self._groups.clear)  # the next tick's requests make new groups
            group = self._groups[timeout] = []
            loop.call_later(timeout, self._expire, group)
        group.append(job_id)

    def _expire(self, group: list[str]) -> None:
        for job_id in group:
            future = self._waiting.get(job_id)
            if future is not None and not future.done():
                future.set_exception(ReplyTimeout())
