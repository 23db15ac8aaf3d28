"""The enqueue pipeline: every request's enqueue script of one event-loop tick, in one round trip.

A request is queued by ENQUEUE_SCRIPT, atomically: refused if its signature was seen (replay
protection), refused if its stream is full (MaxQueueLength), else added. The batcher writes the
scripts of all requests that arrived in one tick onto one connection, and tells the caller
whether each request certainly did not run (NotQueued: SendMsgFail may be answered) or may have
(MaybeQueued: the caller waits for its reply), which is what lets the HTTP tier's 9702 mean
"never queued". With Server.EnqueueReplicas, a WAIT ends each round trip (replication.py).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import NoScriptError, ResponseError

from goinfer.connections import take_connection
from goinfer.http.replication import ReplicaWait
from goinfer.queue import ENQUEUE_SCRIPT, ENQUEUE_SHA, QUEUED

log = logging.getLogger("goinfer.http.queue")


@dataclass(frozen=True)
class Script:
    """A Lua script sent by EVALSHA: the batcher loads it again when Redis has lost it."""

    text: str
    sha: str

    @classmethod
    def of(cls, text: str) -> Script:
        return cls(text, hashlib.sha1(text.encode()).hexdigest())


ENQUEUE = Script(ENQUEUE_SCRIPT, ENQUEUE_SHA)

# An asynchronous job is its record and its entry, written by one script so that they never
# disagree: a record whose entry was refused (replayed, queue full) or never sent would say
# "queued" until it expired, and an entry without its record would run for nobody to read. The
# checks are ENQUEUE_SCRIPT's, in its order; then HSET + EXPIRE the record, then XADD.
# KEYS: stream, job record[, replay key]. ARGV: MaxQueueLength, the Job, replay TTL, JOB_FIELD,
# the record's TTL, then the record's field/value pairs. Returns QUEUED, QUEUE_FULL or REPLAYED.
JOB_ENQUEUE = Script.of("""
if #KEYS > 2 and not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[3]) then
  return -2
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then
  if #KEYS > 2 then redis.call('DEL', KEYS[3]) end
  return -1
end
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('XADD', KEYS[1], '*', ARGV[4], ARGV[2])
return 1
""")

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


# Told an enqueue's outcome: (the script's result, None), or (None, NotQueued or MaybeQueued).
Settle = Callable[[Any, "Exception | None"], None]


@dataclass
class _Enqueue:
    """One request's enqueue call, waiting for its batch's round trip, which tells `settle`."""

    keys: list[str]
    args: list[Any]
    settle: Settle
    script: Script = ENQUEUE
    packed: list[bytes] = field(default_factory=list)

    def fail(self, failure: Exception) -> None:
        self.settle(None, failure)

    def resolve(self, result: Any) -> None:
        self.settle(result, None)


def _settle_future(future: asyncio.Future[Any], result: Any, failure: Exception | None) -> None:
    """The Settle of an awaited call: its future gets the outcome (unless it stopped waiting)."""
    if future.done():
        return
    if failure is not None:
        future.set_exception(failure)
    else:
        future.set_result(result)


class EnqueueBatcher:
    """Sends the enqueue calls of all requests that arrive in one event-loop tick as one pipeline.

    Under load this is one round trip and one connection for many requests, instead of one
    connection per concurrent request (which also runs into connection limits). It speaks to the
    connection directly rather than through redis-py's pipeline, for two reasons: each request
    is encoded on its own, so one that cannot be fails alone, not its whole batch; and a failure
    is told apart by whether the commands were already written (MaybeQueued) or not (NotQueued),
    which decides what the client may be told. With `replicas`, each round trip ends with a WAIT,
    and the enqueues it carried are settled only once it answered.
    """

    def __init__(self, client: redis.asyncio.Redis, replicas: ReplicaWait | None = None) -> None:
        self._client = client
        self._pool: ConnectionPool = client.connection_pool
        self._pending: list[_Enqueue] = []
        self._replicas = replicas

    async def call(self, keys: list[str], args: list[Any], script: Script = ENQUEUE) -> Any:
        """The script's result; raises NotQueued or MaybeQueued."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._add(loop, _Enqueue(keys, args, functools.partial(_settle_future, future), script))
        return await future

    def send(self, keys: list[str], args: list[Any], settle: Settle) -> None:
        """ENQUEUE with `settle` told its outcome from the batch's round trip: for a caller that
        awaits something else (its reply) meanwhile, so it is woken once, not twice."""
        self._add(asyncio.get_running_loop(), _Enqueue(keys, args, settle))

    def _add(self, loop: asyncio.AbstractEventLoop, item: _Enqueue) -> None:
        if not self._pending:
            loop.call_soon(self._start_flush)
        self._pending.append(item)

    def _start_flush(self) -> None:
        batch, self._pending = self._pending, []
        spawn(self._flush(batch))

    async def _flush(self, batch: list[_Enqueue]) -> None:
        try:
            unanswered = await self._round_trip(batch)
            if unanswered:
                # Redis lost the script (restarted, SCRIPT FLUSH): load them and send those again;
                # NOSCRIPT means they did not run.
                for text in {item.script.text for item in unanswered}:
                    await self._client.script_load(text)
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
            connection = await take_connection(self._pool, "EVALSHA")
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
                item.packed = connection.pack_command("EVALSHA", item.script.sha, len(item.keys), *item.keys,
                                                      *item.args)
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
        commands = [chunk for item in sendable for chunk in item.packed]
        if self._replicas is not None:  # after the scripts, on their connection: it waits for their writes
            commands += connection.pack_command(*self._replicas.command())
        try:
            await connection.send_packed_command(commands, check_health=False)
        except Exception as exc:  # noqa: BLE001 - written in part, perhaps: Redis may run them
            for item in sendable:
                item.fail(MaybeQueued(exc))
            return []
        no_script = []
        answered: list[tuple[_Enqueue, Any]] = []
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
                self._settle(answered, None)
                return no_script
            answered.append((item, result))
        self._settle(answered, await self._read_wait(connection) if self._replicas is not None else None)
        return no_script

    def _settle(self, answered: list[tuple[_Enqueue, Any]], acknowledged: int | None) -> None:
        """Give the answered enqueues their results: only now, after their WAIT, are they acknowledged."""
        for item, result in answered:
            item.resolve(result)
        if self._replicas is not None:
            self._replicas.outcome(acknowledged, sum(result == QUEUED for _, result in answered))

    async def _read_wait(self, connection: AbstractConnection) -> int | None:
        """How many replicas hold this connection's writes, as WAIT answers; None when it did not
        (refused, or the connection failed): the enqueues before it are queued all the same."""
        assert self._replicas is not None
        try:
            answer = await connection.read_response(
                timeout=(getattr(connection, "socket_timeout", None) or 0) + self._replicas.timeout_s)
            return int(answer)
        except Exception as exc:  # noqa: BLE001 - ResponseError (a replica refuses WAIT), or a broken connection
            log.debug("WAIT for %d replica(s) failed: %s", self._replicas.replicas, exc)
            return None


# Tasks the loop only references weakly: kept here until they finish.
_RUNNING: set[asyncio.Task[None]] = set()


def spawn(coroutine: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coroutine)
    _RUNNING.add(task)
    task.add_done_callback(_RUNNING.discard)
