"""The HTTP tier's side of the queue: put a job on a stream, await its reply.

One reader task per process drains this process's reply list and resolves the waiting request
by id, so a request costs one XADD and no subscription, connection or task of its own. A second
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
starts it.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import NoScriptError, ResponseError

from goinfer.connections import RedisRefused, async_client, describe_redis, is_out_of_memory, refusal
from goinfer.http.redis_health import RedisHealth, is_unreachable
from goinfer.queue import JOB_FIELD, TIER_ALIVE_REFRESH_S, TIER_ALIVE_TTL_S, Reply, reply_key, tier_alive_key
from goinfer.settings import ServerSettings

log = logging.getLogger("goinfer.http.queue")

DRAIN_BATCH = 256
READ_BLOCK_S = 1  # BLPOP's own timeout: the reader hears from Redis at least this often
RECONNECT_FIRST_S = 0.05
RECONNECT_MAX_S = 2.0
CLOSE_TIMEOUT_S = 1.0
STOP_ATTEMPTS = 10


# One round trip, atomic: refuse a replayed signature, refuse when the queue is full, else queue.
ENQUEUE_SCRIPT = """
if #KEYS > 1 and not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then
  return -2
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  if #KEYS > 1 then redis.call('DEL', KEYS[2]) end
  return -1
end
redis.call('XADD', KEYS[1], '*', ARGV[4], ARGV[2])
return 1
"""
ENQUEUE_SHA = hashlib.sha1(ENQUEUE_SCRIPT.encode()).hexdigest()
QUEUED, QUEUE_FULL, REPLAYED = 1, -1, -2


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


class NotQueued(Exception):
    """An enqueue that certainly did not happen: its command never reached Redis, or Redis
    answered it with an error. `cause` is what went wrong."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.cause = cause


class MaybeQueued(Exception):
    """An enqueue whose command was written but whose answer never came: it may have happened."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.cause = cause


class QueueClient:
    """Submits jobs for one HTTP process and routes replies back to their requests."""

    def __init__(self, server: ServerSettings) -> None:
        self._server = server
        self.process_id = uuid.uuid4().hex
        self.reply_keys = [reply_key(self.process_id, index) for index in range(server.request_queue_amount)]
        # Every job this process sends names it (Job.alive_key): it expires soon after we die.
        self.alive_key = tier_alive_key(self.process_id)
        self._redis: redis.asyncio.Redis = async_client(server)
        self._reader_redis: redis.asyncio.Redis = async_client(server, blocking_s=READ_BLOCK_S)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._enqueue = EnqueueBatcher(self._redis)
        self._max_length = str(server.max_queue_length)
        self._address = describe_redis(server)
        self.health = RedisHealth(self._address)
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
            refused = refusal(exc, self._server)
            if refused is not None:
                await self._close_clients()
                raise refused from None
            self.health.failed(started, exc)
        else:
            log.info("redis at %s answers; replies come back on %s (one list per queue number)",
                     self._address, self.reply_keys[0])
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_replies()), loop.create_task(self._keep_alive())]

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
        await self._reader_redis.aclose()

    async def submit(self, stream: str, job_id: str, payload: str, timeout: float,
                     replay_key: str | None = None, replay_ttl_s: int = 0) -> Reply:
        """Queue an encoded Job and wait for its reply.

        Raises SendFailure (not queued), QueueFull, Replayed (when `replay_key` was already set)
        or ReplyTimeout; nothing else, whatever Redis or the network do.
        """
        if self.refused is not None:
            raise SendFailure(str(self.refused), reported=True)
        if self.health.down:  # not sent: the answer is true, and comes at once
            raise SendFailure(f"redis at {self._address} is unreachable", reported=True)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._waiting[job_id] = future
        timer = loop.call_later(timeout, _expire, future)
        keys = [stream, replay_key] if replay_key else [stream]
        started = time.monotonic()
        try:
            try:
                outcome = await self._enqueue.call(keys, [self._max_length, payload, replay_ttl_s, JOB_FIELD])
            except NotQueued as failure:
                raise self._send_failure(started, failure.cause) from None
            except MaybeQueued as failure:
                if not self._noted(started, failure.cause):
                    log.warning("request %s may have been queued on %s (%s); awaiting its reply",
                                job_id, stream, failure)
                return await future
            self.health.answered(started)
            self.health.stored()
            if outcome == QUEUE_FULL:
                raise QueueFull()
            if outcome == REPLAYED:
                raise Replayed()
            return await future
        finally:
            timer.cancel()
            self._waiting.pop(job_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def _send_failure(self, started: float, error: BaseException) -> SendFailure:
        """What a request that was not queued is told, after telling the tier what it learnt."""
        message = str(error) or type(error).__name__
        return SendFailure(message, reported=self._noted(started, error))

    def _noted(self, started: float, error: BaseException) -> bool:
        """Take in what a failed Redis call (started at `started`) says about Redis; True when that
        is now in the log (an outage, a full Redis, refused credentials), False for anything else."""
        refused = refusal(error, self._server)
        if refused is not None:
            self._refuse(refused)
            return True
        if is_out_of_memory(error):
            self.health.out_of_memory(error)
            return True
        if is_unreachable(error):
            self.health.failed(started, error)
            self._drop_idle_connections()
            return True
        return False

    def _drop_idle_connections(self) -> None:
        """One connection found dead: its idle siblings to the same address most likely are too
        (the host rebooted, the address moved). Closing them now makes the next requests connect
        afresh, which fails before anything is sent, instead of writing into a dead socket."""
        if self._dropping_idle:
            return
        self._dropping_idle = True

        async def drop() -> None:
            try:
                await self._redis.connection_pool.disconnect(inuse_connections=False)
            except Exception as exc:  # noqa: BLE001 - best effort; each connection is checked on use anyway
                log.debug("closing idle connections failed: %s", exc)
            finally:
                self._dropping_idle = False

        _spawn(drop())

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

    async def _read_replies(self) -> None:
        """Drain our reply lists forever. A connection that dies, even silently, ends this BLPOP
        within READ_BLOCK_S + RedisTimeoutS; the next one is made on a fresh connection."""
        delay = RECONNECT_FIRST_S
        while not self._closing:
            started = time.monotonic()
            try:
                item = await self._reader_redis.blpop(self.reply_keys, timeout=READ_BLOCK_S)
                self.health.answered(started)
                delay = RECONNECT_FIRST_S
                if item is None:
                    continue
                self._deliver(item[1])
                # LPOP with a count answers a list (redis-py types it as one value).
                rest = cast("list[bytes] | None", await self._reader_redis.lpop(item[0], DRAIN_BATCH))
                for raw in rest or ():
                    self._deliver(raw)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - whatever a broken connection raises, the reader lives on
                if self.refused is not None or refusal(exc, self._server) is not None:
                    self._noted(started, exc)
                    return
                if self._noted(started, exc):  # an outage: logged once by the health, not per retry
                    log.debug("reading replies failed (%s); retrying in %.2fs", exc, delay)
                else:
                    log.warning("reading replies failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

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
                if self.refused is not None or refusal(exc, self._server) is not None:
                    self._noted(started, exc)
                    return
                if not self._noted(started, exc):
                    log.warning("refreshing %s failed (%s)", self.alive_key, exc)
            await asyncio.sleep(TIER_ALIVE_REFRESH_S)

    def _deliver(self, raw: bytes | str) -> None:
        try:
            reply = Reply.decode(raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("dropping a malformed reply (%s)", exc)
            return
        future = self._waiting.get(reply.id)
        if future is not None and not future.done():
            future.set_result(reply)


@dataclass
class _Enqueue:
    """One request's enqueue call, waiting for its batch's round trip."""

    keys: list[str]
    args: list[Any]
    future: asyncio.Future[Any]
    packed: list[bytes] = field(default_factory=list)

    def fail(self, failure: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(failure)

    def resolve(self, result: Any) -> None:
        if not self.future.done():
            self.future.set_result(result)


class EnqueueBatcher:
    """Sends the enqueue calls of all requests that arrive in one event-loop tick as one pipeline.

    Under load this is one round trip and one connection for many requests, instead of one
    connection per concurrent request (which also runs into connection limits). It speaks to the
    connection directly rather than through redis-py's pipeline, for two reasons: each request
    is encoded on its own, so one that cannot be fails alone, not its whole batch; and a failure
    is told apart by whether the commands were already written (MaybeQueued) or not (NotQueued),
    which decides what the client may be told.
    """

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._pool: ConnectionPool = client.connection_pool
        self._pending: list[_Enqueue] = []

    async def call(self, keys: list[str], args: list[Any]) -> Any:
        """The script's result; raises NotQueued or MaybeQueued."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._start_flush)
        self._pending.append(_Enqueue(keys, args, future))
        return await future

    def _start_flush(self) -> None:
        batch, self._pending = self._pending, []
        _spawn(self._flush(batch))

    async def _flush(self, batch: list[_Enqueue]) -> None:
        try:
            unanswered = await self._round_trip(batch)
            if unanswered:
                # Redis lost the script (restarted, SCRIPT FLUSH): load it and send those again;
                # NOSCRIPT means they did not run.
                await self._client.script_load(ENQUEUE_SCRIPT)
                for item in await self._round_trip(unanswered):
                    item.fail(NotQueued(NoScriptError("NOSCRIPT after loading the enqueue script")))
        except asyncio.CancelledError:
            for item in batch:
                item.fail(MaybeQueued(ConnectionError("the HTTP tier is stopping")))
            raise
        except Exception as exc:  # noqa: BLE001 - loading the script failed: nothing left was sent
            for item in batch:
                item.fail(NotQueued(exc))

    async def _round_trip(self, batch: list[_Enqueue]) -> list[_Enqueue]:
        """Send `batch` on one connection and settle each item; returns those Redis answered
        NOSCRIPT (not run, to be sent again once the script is loaded)."""
        try:
            connection = await _get_connection(self._pool)
        except Exception as exc:  # noqa: BLE001 - no connection: nothing was sent
            for item in batch:
                item.fail(NotQueued(exc))
            return []
        try:
            return await self._exchange(connection, batch)
        finally:
            await self._pool.release(connection)

    async def _exchange(self, connection: AbstractConnection, batch: list[_Enqueue]) -> list[_Enqueue]:
        sendable = []
        for item in batch:
            try:
                item.packed = connection.pack_command("EVALSHA", ENQUEUE_SHA, len(item.keys), *item.keys, *item.args)
            except Exception as exc:  # noqa: BLE001 - e.g. text no UTF-8 encoder takes: this request only
                item.fail(NotQueued(exc))
            else:
                sendable.append(item)
        if not sendable:
            return []
        try:
            await connection.check_health()  # a PING if the connection was idle: fails before we write
        except Exception as exc:  # noqa: BLE001
            for item in sendable:
                item.fail(NotQueued(exc))
            return []
        try:
            await connection.send_packed_command([chunk for item in sendable for chunk in item.packed],
                                                 check_health=False)
        except Exception as exc:  # noqa: BLE001 - written in part, perhaps: Redis may run them
            for item in sendable:
                item.fail(MaybeQueued(exc))
            return []
        no_script = []
        for index, item in enumerate(sendable):
            try:
                result = await connection.read_response()
            except NoScriptError:
                no_script.append(item)
                continue
            except ResponseError as exc:  # Redis refused this one (full, NOPERM, ...): it did not run
                item.fail(NotQueued(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - the answers stopped coming: these may have run
                for rest in sendable[index:]:
                    rest.fail(MaybeQueued(exc))
                return no_script
            item.resolve(result)
        return no_script


# redis-py 5.3 and later take no argument here (and warn when given one); earlier ones need a name.
_NAMELESS_GET_CONNECTION = inspect.signature(ConnectionPool.get_connection).parameters.get(
    "command_name", inspect.Parameter("command_name", inspect.Parameter.POSITIONAL_OR_KEYWORD)
).default is not inspect.Parameter.empty


async def _get_connection(pool: ConnectionPool) -> AbstractConnection:
    if _NAMELESS_GET_CONNECTION:
        return await pool.get_connection()
    return await pool.get_connection("EVALSHA")  # type: ignore[call-arg,unused-ignore]


# Tasks the loop only references weakly: kept here until they finish.
_RUNNING: set[asyncio.Task[None]] = set()


def _spawn(coroutine: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coroutine)
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)


def _expire(future: asyncio.Future[Reply]) -> None:
    if not future.done():
        future.set_exception(ReplyTimeout())
