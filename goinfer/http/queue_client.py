"""The HTTP tier's side of the queue: put a job on a stream, await its reply.

One reader task per process drains this process's reply list and resolves the waiting request
by id, so a request costs one XADD and no subscription, connection or task of its own. What the
reader and the enqueues see of Redis feeds one RedisHealth (an outage is logged once, when it
starts and when it ends); refused credentials stop the tier (`when_refused`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio
from redis.exceptions import NoScriptError, RedisError

from goinfer.connections import RedisRefused, async_client, describe_redis, refusal
from goinfer.http.redis_health import RedisHealth, is_unreachable
from goinfer.queue import JOB_FIELD, Reply, reply_key
from goinfer.settings import ServerSettings

log = logging.getLogger("goinfer.http.queue")

DRAIN_BATCH = 256
RECONNECT_MAX_S = 2.0


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
QUEUED, QUEUE_FULL, REPLAYED = 1, -1, -2


class SendFailure(Exception):
    """The job could not be put on the queue (Redis unreachable or refusing).

    `reported`: the cause is already in the log (an outage, refused credentials), so the
    request's own failure need not be logged again.
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


class QueueClient:
    """Submits jobs for one HTTP process and routes replies back to their requests."""

    def __init__(self, server: ServerSettings) -> None:
        self._server = server
        self.reply_key = reply_key(uuid.uuid4().hex)
        self._redis: redis.asyncio.Redis = async_client(server)
        self._reader_redis: redis.asyncio.Redis = async_client(server, blocking=True)
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._enqueue = EnqueueBatcher(self._redis)
        self._max_length = str(server.max_queue_length)
        self.health = RedisHealth(describe_redis(server))
        self.refused: RedisRefused | None = None
        self._refusal_callbacks: list[Callable[[], None]] = []

    async def start(self) -> None:
        """Check that Redis takes our credentials, then start reading replies.

        Raises RedisRefused when it does not; an unreachable Redis is only logged (the tier
        serves SendMsgFail until it is back).
        """
        started = time.monotonic()
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            refused = refusal(exc, self._server)
            if refused is not None:
                await self._close_clients()
                raise refused from None
            self.health.failed(started, exc)
        else:
            log.info("redis at %s answers; replies come back on %s", describe_redis(self._server), self.reply_key)
        self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    def when_refused(self, callback: Callable[[], None]) -> None:
        """Call `callback` once if Redis starts refusing our credentials (at once if it has)."""
        if self.refused is not None:
            callback()
        else:
            self._refusal_callbacks.append(callback)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        await self._close_clients()

    async def _close_clients(self) -> None:
        await self._redis.aclose()
        await self._reader_redis.aclose()

    async def submit(self, stream: str, job_id: str, payload: str, timeout: float,
                     replay_key: str | None = None, replay_ttl_s: int = 0) -> Reply:
        """Queue an encoded Job and wait for its reply.

        Raises SendFailure, QueueFull, Replayed (when `replay_key` was already set) or ReplyTimeout.
        """
        if self.refused is not None:
            raise SendFailure(str(self.refused), reported=True)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._waiting[job_id] = future
        timer = loop.call_later(timeout, _expire, future)
        keys = [stream, replay_key] if replay_key else [stream]
        started = time.monotonic()
        try:
            try:
                outcome = await self._enqueue.call(keys, [self._max_length, payload, replay_ttl_s, JOB_FIELD])
            except (RedisError, OSError) as exc:
                raise self._send_failure(started, exc) from None
            self.health.answered(started)
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
        """What a failed enqueue tells its request, after telling the tier what it learnt."""
        message = str(error) or type(error).__name__
        refused = refusal(error, self._server)
        if refused is not None:
            self._refuse(refused)
            return SendFailure(message, reported=True)
        if is_unreachable(error):
            self.health.failed(started, error)
            return SendFailure(message, reported=True)
        return SendFailure(message)

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
        delay = 0.05
        while True:
            started = time.monotonic()
            try:
                item = await self._reader_redis.blpop([self.reply_key], timeout=1)
                self.health.answered(started)
                if item is None:
                    continue
                self._deliver(item[1])
                # LPOP with a count answers a list (redis-py types it as one value).
                rest = cast("list[bytes] | None", await self._reader_redis.lpop(self.reply_key, DRAIN_BATCH))
                for raw in rest or ():
                    self._deliver(raw)
                delay = 0.05
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                refused = refusal(exc, self._server)
                if refused is not None:
                    self._refuse(refused)
                    return
                if is_unreachable(exc):
                    self.health.failed(started, exc)  # logged once per outage
                    log.debug("reading replies failed (%s); retrying in %.2fs", exc, delay)
                else:
                    log.warning("reading replies failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    def _deliver(self, raw: bytes | str) -> None:
        try:
            reply = Reply.decode(raw)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("dropping a malformed reply (%s)", exc)
            return
        future = self._waiting.get(reply.id)
        if future is not None and not future.done():
            future.set_result(reply)


class EnqueueBatcher:
    """Sends the enqueue calls of all requests that arrive in one event-loop tick as one pipeline.

    Under load this is one round trip and one connection for many requests, instead of one
    connection per concurrent request (which also runs into connection limits).
    """

    def __init__(self, client: redis.asyncio.Redis) -> None:
        self._client = client
        self._script = client.register_script(ENQUEUE_SCRIPT)
        self._pending: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []

    async def call(self, keys: list[str], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._pending:
            loop.call_soon(self._start_flush)
        self._pending.append((keys, args, future))
        return await future

    def _start_flush(self) -> None:
        batch, self._pending = self._pending, []
        asyncio.get_running_loop().create_task(self._flush(batch))

    async def _flush(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> None:
        try:
            results = await self._run(batch)
            if any(isinstance(r, NoScriptError) for r in results):
                # Redis restarted (or flushed its scripts): load it once and send the batch again.
                await self._client.script_load(ENQUEUE_SCRIPT)
                results = await self._run(batch)
        except Exception as exc:  # noqa: BLE001 - every waiting request gets the failure
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(batch, results, strict=False):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _run(self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(self._script.sha, len(keys), *keys, *args)
        return await pipe.execute(raise_on_error=False)


def _expire(future: asyncio.Future[Reply]) -> None:
    if not future.done():
        future.set_exception(ReplyTimeout())
