"""How a row reaches a worker: straight onto the queues (direct), or through the signed HTTP API.

Both answer a row's data with its result, or raise RowFailed (the row's error, final) or
Transient (worth another try later: QueueFull, SendMsgFail, QueueTimeout, a connection error).

Direct: this process is the HTTP tier for its rows, without the signature check (an operator's
tool that already holds the Redis password). It runs the model's api_entry itself (an ApiError
there is the row's error, never queued), puts the Job on the batch lane of queue number
row % RequestQueueAmount with the tier's enqueue script, and reads the answers on reply lists
of its own, matched by request id. A row keeps its request id across retries, so an answer to an
earlier attempt that comes late still completes it, and a row that ran twice is written once.
It keeps a liveness key as an HTTP process does: if the run is killed, workers skip its
rows still queued (within TIER_ALIVE_TTL_S) instead of computing answers nobody will read, and
the rerun sends them again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
import uuid
from typing import Any

from redis.exceptions import NoScriptError, RedisError

from goinfer.client import AsyncClient, GoinferError
from goinfer.connections import async_client, refusal
from goinfer.errors import ApiError
from goinfer.models.base import Model
from goinfer.queue import (
    ENQUEUE_SCRIPT,
    ENQUEUE_SHA,
    JOB_FIELD,
    QUEUE_FULL,
    QUEUED,
    TIER_ALIVE_REFRESH_S,
    TIER_ALIVE_TTL_S,
    Job,
    Reply,
    deliver_reply,
    lane_stream,
    reply_key,
    stream_name,
    tier_alive_key,
)
from goinfer.redis_address import describe_redis
from goinfer.reply_lists import ReplyPopper
from goinfer.settings import Settings

log = logging.getLogger("goinfer.batch")

READ_BLOCK_S = 1
DRAIN_BATCH = 256
STOP_ATTEMPTS = 10
REPLY_GRACE_S = 2.0  # an answer written just before the deadline still has time to arrive
# Codes (by ErrCode name) that say "not now": the row is sent again, at most --retries times.
TRANSIENT_CODES = ("QueueFull", "SendMsgFail", "QueueTimeout", "ApiEntryBusy", "TooManyUnverified", "Replayed")


class RowFailed(Exception):
    """The row's final error: written to the output as it is."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg


class Transient(RowFailed):
    """A failure worth another try; `connection`: the service could not be reached at all."""

    def __init__(self, code: int, msg: str, connection: bool = False) -> None:
        super().__init__(code, msg)
        self.connection = connection


class Stopped(Exception):
    """The run cannot go on (refused credentials): one line for the operator."""


def _failure(settings: Settings, name: str, detail: str = "", code: int | None = None) -> tuple[int, str]:
    """The code and message the HTTP tier would answer for ErrCode `name` (its message, then `detail`)."""
    error = settings.error(name)
    return (error.code if code is None else code), (f"{error.msg} : {detail}" if detail else error.msg)


class DirectSender:
    """Sends rows to Redis itself and awaits their answers on its own reply lists."""

    def __init__(self, settings: Settings, model: Model, priority: str, timeout_s: float) -> None:
        server = settings.server
        self._settings = settings
        self._model = model
        self._timeout_s = timeout_s
        self._amount = server.request_queue_amount
        base = model.queue or server.queue_name
        self._streams = [lane_stream(stream_name(base, index), priority) for index in range(self._amount)]
        self.process_id = uuid.uuid4().hex
        self._reply_keys = [reply_key(self.process_id, index) for index in range(self._amount)]
        self.alive_key = tier_alive_key(self.process_id)
        self._max_length = str(server.max_queue_length)
        self._token = secrets.token_hex(8)
        self._date = time.strftime("%Y%m%d")
        self._redis = async_client(server)
        self._reader = async_client(server, blocking_s=READ_BLOCK_S)
        self._replies = ReplyPopper()
        self._waiting: dict[str, asyncio.Future[Reply]] = {}
        self._pending: list[tuple[int, str, asyncio.Future[Any]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._address = describe_redis(server)
        self.refused: str | None = None  # why Redis refuses us (credentials, ACL): the run stops
        self._closing = False

    @property
    def lanes(self) -> list[str]:
        return list(self._streams)

    async def start(self) -> None:
        """Check that Redis answers and takes our credentials, then read replies and keep our key."""
        try:
            await self._redis.script_load(ENQUEUE_SCRIPT)
            await self._alive()
        except (RedisError, OSError) as exc:
            refused = refusal(exc, self._settings.server)
            raise Stopped(str(refused) if refused else f"redis at {self._address} does not answer: {exc}") from None
        loop = asyncio.get_running_loop()
        self._tasks = [*(loop.create_task(self._read(key)) for key in self._reply_keys),
                       loop.create_task(self._keep_alive())]

    async def close(self) -> None:
        """Stop reading and keeping our key, then delete it and our reply lists.

        The tasks are cancelled again until they end: before Python 3.12 a cancel that lands as
        redis-py's own wait_for completes is swallowed, and the task would read on; their loops
        also end on `_closing`."""
        self._closing = True
        for _ in range(STOP_ATTEMPTS):
            running = [task for task in self._tasks if not task.done()]
            if not running:
                break
            for task in running:
                task.cancel()
            await asyncio.wait(running, timeout=0.5)
        try:
            await asyncio.wait_for(self._redis.delete(self.alive_key, *self._reply_keys), 2)
        except Exception:  # noqa: BLE001 - Redis away: the keys expire by themselves
            pass
        await self._redis.aclose()
        await self._reader.aclose()

    def request_id(self, number: int) -> str:
        """go-infer's request id format (date, 32 hex), the same for every attempt of a row."""
        return f"{self._date}{self._token}{number:016x}"

    async def send(self, number: int, data: dict[str, Any]) -> dict[str, Any]:
        settings = self._settings
        try:
            params = self._model.api_entry(data)
            if not isinstance(params, dict):
                raise TypeError(f"api_entry must return a dict, returned {type(params).__name__}")
            index = (number - 1) % self._amount
            request_id = self.request_id(number)
            payload = Job(request_id, self._model.api_path, params, self._reply_keys[index],
                          time.time() + self._timeout_s, alive_key=self.alive_key).encode()
        except ApiError as exc:
            raise RowFailed(*_failure(settings, "ApiEntryFail", exc.msg, exc.code)) from None
        except Exception as exc:  # noqa: BLE001 - the model's own code, or params that are not JSON
            raise RowFailed(*_failure(settings, "ApiEntryFail", str(exc) or type(exc).__name__)) from None
        loop = asyncio.get_running_loop()
        future = self._waiting.get(request_id)
        if future is None or future.done():
            future = self._waiting[request_id] = loop.create_future()
        try:
            outcome = await self._enqueue(index, payload)
            if outcome == QUEUE_FULL:
                raise Transient(*_failure(settings, "QueueFull", f"{self._streams[index]} holds "
                                          f"{settings.server.max_queue_length} requests"))
            if outcome != QUEUED:
                raise Transient(*_failure(settings, "SendMsgFail", f"unexpected enqueue answer {outcome!r}"))
            try:
                reply = await asyncio.wait_for(asyncio.shield(future), self._timeout_s + REPLY_GRACE_S)
            except asyncio.TimeoutError:
                raise Transient(*_failure(settings, "QueueTimeout")) from None
        except Transient:
            raise  # the future stays: a late answer to this attempt completes the next one
        except BaseException:
            self._waiting.pop(request_id, None)
            raise
        self._waiting.pop(request_id, None)
        if reply.code != 0:
            raise RowFailed(reply.code, reply.msg)
        if not isinstance(reply.data, dict):
            raise RowFailed(*_failure(settings, "RecvMsgFail", "reply data is not an object"))
        return reply.data

    def forget(self, number: int) -> None:
        """The row is settled (written as an error): an answer that still comes is dropped."""
        self._waiting.pop(self.request_id(number), None)

    async def _enqueue(self, index: int, payload: str) -> Any:
        """The enqueue script's answer; the scripts of one event-loop tick go in one round trip."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self._pending:
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._flush()))
        self._pending.append((index, payload, future))
        return await future

    async def _flush(self) -> None:
        batch, self._pending = self._pending, []
        try:
            results = await self._run_scripts(batch)
            missing = [item for item, result in zip(batch, results, strict=True) if isinstance(result, NoScriptError)]
            if missing:  # Redis lost the script (restarted, SCRIPT FLUSH): load it, send those again
                await self._redis.script_load(ENQUEUE_SCRIPT)
                results = [*(r for r in results if not isinstance(r, NoScriptError))]
                batch = [item for item in batch if item not in missing] + missing
                results += await self._run_scripts(missing)
        except Exception as exc:  # noqa: BLE001 - the round trip failed: perhaps queued, perhaps not
            self._check_refused(exc)
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(self._unreachable(exc))
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                self._check_refused(result)
                future.set_exception(self._unreachable(result))
            else:
                future.set_result(result)

    async def _run_scripts(self, batch: list[tuple[int, str, asyncio.Future[Any]]]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for index, payload, _ in batch:
            pipe.evalsha(ENQUEUE_SHA, 1, self._streams[index], self._max_length, payload, 0, JOB_FIELD)
        return list(await pipe.execute(raise_on_error=False))

    def _unreachable(self, exc: BaseException) -> Transient:
        # Sent again after a back-off: if the first one was queued after all, its answer completes
        # the row (same request id) and the second is dropped.
        return Transient(*_failure(self._settings, "SendMsgFail", f"redis at {self._address}: {exc}"),
                         connection=True)

    def _check_refused(self, exc: BaseException) -> None:
        refused = refusal(exc, self._settings.server)
        if refused is not None:
            self.refused = str(refused)

    async def _read(self, key: str) -> None:
        delay = 0.05
        while not self._closing:
            try:
                replies = await self._replies.pop(self._reader, [key], READ_BLOCK_S, DRAIN_BATCH)
                delay = 0.05
                for raw in replies:
                    self._deliver(raw)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the reader lives on; sends report the outage
                log.debug("reading replies failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _deliver(self, raw: bytes | str) -> None:
        try:
            deliver_reply(raw, self._waiting)
        except ValueError as exc:
            log.warning("dropping a malformed reply (%s)", exc)

    async def _alive(self) -> None:
        if not await self._redis.expire(self.alive_key, TIER_ALIVE_TTL_S):
            await self._redis.set(self.alive_key, f"batch {socket.gethostname()}:{os.getpid()}", ex=TIER_ALIVE_TTL_S)

    async def _keep_alive(self) -> None:
        while not self._closing:
            await asyncio.sleep(TIER_ALIVE_REFRESH_S)
            try:
                await self._alive()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - as the reader: never let this task die
                log.debug("refreshing %s failed (%s)", self.alive_key, exc)


class HttpSender:
    """Sends rows through the HTTP API as a signed client, like any other client."""

    def __init__(self, settings: Settings, client: AsyncClient, api_path: str) -> None:
        self._settings = settings
        self._client = client
        self._api = api_path
        self._transient = {settings.error(name).code for name in TRANSIENT_CODES}
        self.refused: str | None = None

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        await self._client.aclose()

    def forget(self, number: int) -> None:
        pass

    async def send(self, number: int, data: dict[str, Any]) -> dict[str, Any]:
        import aiohttp

        try:
            answer = await self._client.acall(self._api, data)
        except GoinferError as exc:
            if exc.code in self._transient:
                raise Transient(exc.code, exc.msg) from None
            raise RowFailed(exc.code, exc.msg) from None
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            detail = f"{self._client.url}: {type(exc).__name__}: {exc}".rstrip(": ")
            raise Transient(*_failure(self._settings, "SendMsgFail", detail), connection=True) from None
        return {key: value for key, value in answer.items() if key not in ("msg", "requestId")}
