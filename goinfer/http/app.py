"""The HTTP tier's routes and a request's way through it.

POST <api_path>: read the body (bounded) -> checkSign -> model.api_entry -> result cache
(result_cache.py, for a model with `Cache:`) or queue -> reply -> go-infer's envelope, with the
X-Goinfer-Model-Version header when the answer's model was served from a version folder. Every
failure on that way is answered in the envelope with its code; none becomes a traceback or a
500. Each answer is counted (metrics.py) and, with API.AccessLog, is one line on the
`goinfer.access` logger (with `version=` and, when the cache answered, `cache=`).
GET /health, /ready, /metrics, /goinfer/status: ops.py.
POST /goinfer/jobs<api_path>, GET or POST /goinfer/jobs/<job id>: asynchronous jobs, jobs.py.

The event loop serves every client, so nothing a request brings runs long on it: bodies that
are not cheap to check are checked in check processes (offload.py), with a bound on how many are
received or checked at once (admission.py), and api_entry runs in its model's threads
(entry_pool.py), unless the model says it never blocks (Model.api_entry_on_loop).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from goinfer.errors import ApiError
from goinfer.http import envelope
from goinfer.http.admission import Admission
from goinfer.http.busy_poll import BusyPoll
from goinfer.http.entry_pool import ApiEntryPool, EntryBusy, call_entry
from goinfer.http.metrics import UNROUTED, HttpMetrics
from goinfer.http.offload import CheckPool, CheckUnavailable, cheap_to_check
from goinfer.http.ops import OpsEndpoints
from goinfer.http.queue_client import QueueClient, QueueFull, Replayed, ReplyTimeout, SendFailure
from goinfer.http.result_cache import ModelCache, ResultCache
from goinfer.http.signing import SignatureChecker, SignCheckFailure, SignedRequest
from goinfer.models.base import NOAPI_PREFIX, Model
from goinfer.queue import (
    PRIORITY_HIGH,
    Job,
    Reply,
    choose_queue,
    lane_stream,
    replay_target,
    revision_version,
    stream_name,
    streams_for,
)
from goinfer.settings import Settings

log = logging.getLogger("goinfer.http")
# One INFO line per answered request; filter or silence it by this name, or with API.AccessLog.
access_log = logging.getLogger("goinfer.access")
VERSION_HEADER = "X-Goinfer-Model-Version"
JOBS_PREFIX = "/goinfer/jobs"  # asynchronous jobs' routes (jobs.py)
T = TypeVar("T")

@dataclass
class TierState:
    """What the HTTP tier's own endpoints report; `draining` is set when a shutdown begins."""

    draining: bool = False


QUEUE_CLIENT = web.AppKey("queue_client", QueueClient)
TIER_STATE = web.AppKey("tier_state", TierState)
METRICS = web.AppKey("metrics", HttpMetrics)


class Outcome(NamedTuple):
    """An answer and what the access log and the metrics say about it."""

    response: web.Response
    code: int
    app_id: str = ""
    request_id: str = ""
    reply: Reply | None = None
    revision: str | None = None  # what computed the answer (a cached one's too)
    cached: str = ""  # the cache level that answered, "" when the queue did


class ApiHandler:
    """Serves every model's api_path; one instance per HTTP process."""

    def __init__(self, settings: Settings, models: Mapping[str, Model], checker: SignatureChecker,
                 queue: QueueClient, metrics: HttpMetrics, check_pool: CheckPool | None = None,
                 cache: ResultCache | None = None) -> None:
        api = settings.api
        self._settings = settings
        self._metrics = metrics
        self._access_log = api.access_log
        self._models = dict(models)
        self._checker = checker
        self._check_pool = check_pool
        self._inline_check = api.inline_check_bytes
        self._admission = Admission(api.max_unverified_per_client, api.max_unverified)
        # ApiEntryThreads 0, or a model's api_entry_on_loop: api_entry on the event loop (no
        # thread hand-off to pay, and no protection from an api_entry that blocks).
        self.entry_pools = {path: ApiEntryPool(type(model).__name__, api.api_entry_threads,
                                               api.max_waiting_api_entries)
                            for path, model in self._models.items()
                            if not model.api_entry_on_loop} if api.api_entry_threads else {}
        self._queue = queue
        self._timeout = settings.server.message_timeout
        self._max_body = api.max_body_bytes
        server = settings.server
        self._queue_amount = server.request_queue_amount
        self._default_queue = server.queue_name
        self._max_queue = server.max_queue_length
        self._reject_replay = settings.api.reject_replay
        # A signature can be replayed while its timestamp is accepted: either side of "now".
        self.replay_ttl = int(2 * settings.api.request_timestamp_diff) + 1
        self._body_timeout = settings.api.body_read_timeout_s
        self._cache = cache
        self._cache_key_failed: set[str] = set()  # models whose cache_key raised: logged once

    def fail(self, name: str, app_id: str = "", request_id: str = "", detail: str = "",
              status: int = 200, code: int | None = None) -> Outcome:
        """The envelope of ErrCode `name`, with `detail` after its message; `code` is a model's
        own (an ApiError's), answered with the message of `name` as its prefix."""
        error = self._settings.error(name)
        code = error.code if code is None else code
        msg = f"{error.msg} : {detail}" if detail else error.msg
        return Outcome(envelope.failure(app_id, request_id, code, msg, status), code, app_id, request_id)

    async def post(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        api_path: str = request.match_info.route.resource.canonical  # type: ignore[union-attr]
        outcome = await self._serve(self._models[api_path], request)
        elapsed = time.perf_counter() - started
        self._metrics.observe(api_path, outcome.code, elapsed, outcome.reply)
        version = revision_version(outcome.revision)
        if version is not None:
            outcome.response.headers[VERSION_HEADER] = version
        if self._access_log:
            access_log.info("POST %s appId=%s code=%d %.1fms requestId=%s%s%s", api_path, outcome.app_id,
                            outcome.code, elapsed * 1000, outcome.request_id,
                            "" if version is None else f" version={version}",
                            f" cache={outcome.cached}" if outcome.cached else "")
        return outcome.response

    async def _serve(self, model: Model, request: web.Request) -> Outcome:
        signed = await self.receive(request)
        if isinstance(signed, Outcome):
            return signed

        app_id = signed.app_id
        request_id = envelope.new_request_id()
        arrived = time.time()
        index, replay = self.queue_of(signed)
        cache = self._cache.of(model.api_path) if self._cache is not None else None
        entered = await self.run_entry(model, app_id, request_id, functools.partial(
            self._job_of, model, signed.data, request_id, arrived, index, cache))
        if isinstance(entered, Outcome):
            return entered
        payload, key_text = entered

        if cache is not None and key_text is not None:
            hit = await cache.lookup(key_text)
            if hit is not None:
                refused = await self._claim_replay(replay, app_id, request_id)
                if refused is not None:
                    return refused
                return Outcome(envelope.success(app_id, request_id, hit.data), 0, app_id, request_id,
                               revision=hit.revision, cached=hit.level)

        stream = self.stream_of(model, index, app_id, PRIORITY_HIGH)
        try:
            reply = await self._queue.submit(stream, request_id, payload, self._timeout, replay, self.replay_ttl)
        except SendFailure as exc:
            if not exc.reported:  # an outage or refused credentials are logged once, not per request
                log.warning("cannot queue request %s on %s: %s", request_id, stream, exc)
            return self.fail("SendMsgFail", app_id, request_id, str(exc))
        except QueueFull:
            return self.fail("QueueFull", app_id, request_id, f"{stream} holds {self._max_queue} requests")
        except Replayed:
            return self.fail("Replayed", app_id, request_id)
        except ReplyTimeout:
            return self.fail("QueueTimeout", app_id, request_id)
        if reply.code != 0:
            return Outcome(envelope.failure(app_id, request_id, reply.code, reply.msg), reply.code, app_id,
                           request_id, reply, reply.revision)
        if reply.answer is not None:  # the data as we send it, written by the worker: copied unread
            response = envelope.answered(app_id, reply.answer)
        elif isinstance(reply.data, dict):
            response = envelope.success(app_id, request_id, reply.data)
        else:
            return self.fail("RecvMsgFail", app_id, request_id, "reply data is not an object")
        if cache is not None and key_text is not None and reply.revision:
            # Under what computed it, never another.
            cache.store(reply.revision, key_text, reply.plain_data())
        return Outcome(response, 0, app_id, request_id, reply, reply.revision)

    def queue_of(self, signed: SignedRequest) -> tuple[int, str | None]:
        """The queue number of a request and, with RejectReplay, its replay key (from its signature)."""
        if self._reject_replay:
            return replay_target(signed.app_id, signed.sign_data, self._queue_amount)
        return choose_queue(self._queue_amount), None

    def stream_of(self, model: Model, index: int, app_id: str, kind: str) -> str:
        """The stream a request of `kind` (PRIORITY_HIGH for live requests, NORMAL for jobs) is
        queued on: its model's queue number `index`, in the lane its appId or model asks for."""
        lane = self._settings.priority_of(kind, app_id, model.config)
        return lane_stream(stream_name(model.queue or self._default_queue, index), lane)

    async def run_entry(self, model: Model, app_id: str, request_id: str, work: Callable[[], T]) -> T | Outcome:
        """`work` (which calls model.api_entry) in the model's api_entry threads (on the event loop
        with ApiEntryThreads 0 or the model's api_entry_on_loop); its failure as the answer to send."""
        pool = self.entry_pools.get(model.api_path)
        try:
            return call_entry(work) if pool is None else await pool.run(work)
        except EntryBusy as exc:
            return self.fail("ApiEntryBusy", app_id, request_id, str(exc))
        except ApiError as exc:
            return self.fail("ApiEntryFail", app_id, request_id, exc.msg, code=exc.code)
        except Exception as exc:
            log.exception("api_entry of %s failed (requestId %s)", type(model).__name__, request_id)
            return self.fail("ApiEntryFail", app_id, request_id, str(exc) or type(exc).__name__)

    async def _claim_replay(self, replay: str | None, app_id: str, request_id: str) -> Outcome | None:
        """With RejectReplay, a cached answer refuses a replayed signature as a queued one does:
        None when the signature is new. The check needs Redis, so when Redis fails the request
        fails as a queued one would (SendMsgFail)."""
        if replay is None:
            return None
        assert self._cache is not None
        try:
            fresh = await self._cache.claim_replay(replay, self.replay_ttl)
        except Exception as exc:  # noqa: BLE001 - redis-py, OSError, timeouts: the request cannot be checked
            reason = str(exc) or type(exc).__name__
            return self.fail("SendMsgFail", app_id, request_id, f"replay check failed: {reason}")
        return None if fresh else self.fail("Replayed", app_id, request_id)

    def _job_of(self, model: Model, data: dict, request_id: str, arrived: float, index: int,
                cache: ModelCache | None) -> tuple[str, str | None]:
        """model.api_entry, the encoded Job and (for a cached model) the request's cache key text:
        in one of the model's api_entry threads (or on the event loop, see run_entry)."""
        params = model.api_entry(data)
        if not isinstance(params, dict):
            raise TypeError(f"api_entry must return a dict, returned {type(params).__name__}")
        # Encoding here refuses params that cannot travel as JSON, with the model's name.
        payload = Job(request_id, model.api_path, params, self._queue.reply_key(index), arrived + self._timeout,
                      alive_key=self._queue.alive_key).encode()
        return payload, (None if cache is None else self._key_text(model, params))

    def _key_text(self, model: Model, params: dict) -> str | None:
        """model.cache_key(params); a failing one only means this request is not cached."""
        try:
            key = model.cache_key(params)
        except Exception as exc:  # noqa: BLE001 - the model's code: never a failed request
            if model.api_path not in self._cache_key_failed:
                self._cache_key_failed.add(model.api_path)
                log.warning("%s.cache_key failed (%s: %s): such requests are not cached (logged once)",
                            type(model).__name__, type(exc).__name__, exc)
            return None
        if key is not None and not isinstance(key, str):
            if model.api_path not in self._cache_key_failed:
                self._cache_key_failed.add(model.api_path)
                log.warning("%s.cache_key returned %s, not a str or None: such requests are not cached "
                            "(logged once)", type(model).__name__, type(key).__name__)
            return None
        return key

    async def receive(self, request: web.Request) -> SignedRequest | Outcome:
        """The body, read and checked: what the request costs before its signature is known good.

        A body that is not cheap to check is checked in a check process, once it has a place in
        the admission bound (else it is refused at once, 429): one that may be larger than
        InlineCheckBytes takes its place before it is read, so refusing it costs no reading.
        """
        length = request.content_length
        if length is not None and length > self._max_body:
            return self._too_large()  # before taking a place: it will not be read at all
        client = request.remote or ""
        admitted = False
        # Without a length (chunked) or with a Content-Encoding, the size is known only once read.
        if self._check_pool is not None and (length is None or length > self._inline_check
                                             or request.headers.get("Content-Encoding")):
            refused = self._admission.enter(client)
            if refused is not None:
                outcome = self.fail("TooManyUnverified", detail=refused, status=429)
                outcome.response.force_close()  # rather than read and discard the body it refused
                return outcome
            admitted = True
        try:
            body = await self._read_body(request)
            if isinstance(body, Outcome):
                return body
            now = self._checker.now()
            if self._check_pool is None or cheap_to_check(body, self._inline_check):
                return self._checker.check(body, now)
            if not admitted:
                refused = self._admission.enter(client)
                if refused is not None:
                    return self.fail("TooManyUnverified", detail=refused, status=429)
                admitted = True
            return await self._check_pool.check(body, now)
        except SignCheckFailure as refused_body:
            return self.fail(refused_body.code_name, detail=refused_body.detail)
        except CheckUnavailable as exc:
            return self.fail("TooManyUnverified", detail=f"{exc}; try again", status=429)
        finally:
            if admitted:
                self._admission.leave(client)

    def _too_large(self) -> Outcome:
        return self.fail("BodyTooLarge", detail=f"limit is {self._max_body} bytes", status=413)

    async def _read_body(self, request: web.Request) -> bytes | Outcome:
        length = request.content_length
        if length is not None and length > self._max_body:
            return self._too_large()
        try:
            if request.content.is_eof():
                # The whole body came with the headers (the usual small request): reading it cannot
                # wait, so it needs no timeout (asyncio.wait_for costs a task and ~7 us per request).
                body = await request.read()
            else:
                body = await asyncio.wait_for(request.read(), self._body_timeout)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        except asyncio.TimeoutError:
            return self.fail("BodyTimeout", detail=f"{self._body_timeout:g}s", status=408)
        except (RequestPayloadError, HttpProcessingError) as exc:  # e.g. a gzip body that does not inflate
            return self.fail("SignFail1", detail=f"unreadable body: {exc}")
        if len(body) > self._max_body:  # chunked or compressed bodies have no Content-Length to check
            return self._too_large()
        return body

    async def not_found(self, request: web.Request) -> web.Response:
        # A model's path, or its job submission path (/goinfer/jobs<api_path>): POST only.
        routed = request.path in self._models or (request.path.startswith(JOBS_PREFIX)
                                                  and request.path[len(JOBS_PREFIX):] in self._models)
        outcome = self.fail("MethodNotAllowed" if routed else "UnknownApiPath", status=405 if routed else 404)
        self._metrics.observe(request.path if routed else UNROUTED, outcome.code, None)
        if self._access_log:
            # raw_path: percent-encoded as sent, so a path cannot forge log lines.
            access_log.info("%s %s appId= code=%d requestId=", request.method, request.rel_url.raw_path,
                            outcome.code)
        return outcome.response


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="Hello world.")


def create_app(settings: Settings, models: Mapping[str, Model], checker: SignatureChecker,
               queue: QueueClient) -> web.Application:
    """The aiohttp application of one HTTP process; the queue client starts and stops with it."""
    routed = {path: model for path, model in models.items() if not path.startswith(NOAPI_PREFIX)}
    metrics = HttpMetrics()
    check_pool = CheckPool(settings.api, settings.api.check_processes) if settings.api.check_processes else None
    server = settings.server
    streams = streams_for(server.queue_name, [model.queue for model in routed.values()],
                          range(server.request_queue_amount))
    cache = ResultCache(settings, routed, streams, metrics, redis_down=lambda: queue.health.down)
    api = ApiHandler(settings, routed, checker, queue, metrics, check_pool, cache if cache else None)
    state = TierState()
    busy_poll = BusyPoll(settings.api.busy_poll_us / 1e6) if settings.api.busy_poll_us else None
    ops = OpsEndpoints(settings, routed, metrics, lambda: queue.in_flight, lambda: state.draining,
                       redis_reachable=lambda: not queue.health.down, cache=cache)

    @web.middleware
    async def envelope_and_drain(request: web.Request, handler) -> web.StreamResponse:
        if busy_poll is not None:
            busy_poll.touch()
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            if exc.status not in (404, 405):
                raise
            # Targets the router cannot even try (OPTIONS *, CONNECT host:port) still get the envelope.
            response = await api.not_found(request)
        if state.draining:
            # Clients and proxies move to another tier instead of reusing a connection that will
            # close. (Here, not in on_response_prepare, where force_close() drops the response.)
            response.force_close()
        if busy_poll is not None:
            busy_poll.touch()  # the client's next request, on a keep-alive connection, comes soon
        return response

    # aiohttp enforces the body limit itself too; +1 so our own check answers first.
    app = web.Application(client_max_size=settings.api.max_body_bytes + 1, middlewares=[envelope_and_drain])
    app[QUEUE_CLIENT] = queue
    app[TIER_STATE] = state
    app[METRICS] = metrics
    app.router.add_get("/", hello)
    for path in routed:
        app.router.add_post(path, api.post)
    from goinfer.http.jobs import JobRoutes  # it builds on ApiHandler: imported here, not in a cycle

    JobRoutes(settings, routed, api, queue, metrics).add_routes(app)
    ops.add_routes(app, routed)  # before the catch-all, which would answer them 404
    app.router.add_route("*", "/{tail:.*}", api.not_found)

    async def queue_lifecycle(app: web.Application):
        await queue.start()
        yield
        await queue.close()

    async def offload_lifecycle(app: web.Application):
        if check_pool is not None:
            check_pool.start()
        yield
        if check_pool is not None:
            check_pool.close()
        for pool in api.entry_pools.values():
            pool.close()

    async def busy_poll_lifecycle(app: web.Application):
        if busy_poll is not None:
            busy_poll.start()
        yield
        if busy_poll is not None:
            await busy_poll.stop()

    app.cleanup_ctx.append(queue_lifecycle)
    app.cleanup_ctx.append(ops.lifecycle)
    app.cleanup_ctx.append(cache.lifecycle)
    app.cleanup_ctx.append(offload_lifecycle)
    app.cleanup_ctx.append(busy_poll_lifecycle)
    return app
