"""Asynchronous jobs in the HTTP tier: submit one, poll it, from any tier.

POST /goinfer/jobs<api_path> takes the same signed body as POST <api_path>, with the same checks
(signature, replay with RejectReplay, api_entry, MaxQueueLength), and answers at once with the
job's id. The job is its record (`queue.job_key`, in its queue's slot) and its entry on the
stream's normal lane (unless API.AppIdPriority or the model's Priority say otherwise), written
together by one script (enqueue.JOB_ENQUEUE). Nothing of it lives in this process: the entry has
no alive_key, so a worker runs it even when the tier that took it is gone, and any tier answers
a poll of it, since the job id names its queue number and so its record.

GET (or POST, for clients that cannot send a body with GET) /goinfer/jobs/<job id> takes a signed
body too (its data may be {}, or {"jobId": <the same id>}, which binds the signature to the job)
and answers the record to the appId that submitted it only: an unknown, malformed, forgotten
(JobResultTTLS passed) or foreign id gets the very same JobNotFound answer, so a job id tells
another appId nothing. A poll claims no replay key: it changes nothing, and a client polling
twice in one second would sign the same bytes twice.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from goinfer.http import envelope
from goinfer.http.app import JOBS_PREFIX, VERSION_HEADER, ApiHandler, Outcome, access_log
from goinfer.http.metrics import HttpMetrics
from goinfer.http.queue_client import JobMaybeQueued, QueueClient, QueueFull, Replayed, SendFailure
from goinfer.models.base import Model
from goinfer.queue import (
    JOB_DONE,
    JOB_EXPIRED,
    JOB_FAILED,
    JOB_QUEUED,
    JOB_RUNNING,
    PRIORITY_NORMAL,
    Job,
    JobRecord,
    job_id,
    job_key,
    parse_job_id,
    revision_version,
)
from goinfer.settings import Settings

log = logging.getLogger("goinfer.http")

# Every poll is counted under this one label: job ids must not become metric series.
POLL_LABEL = JOBS_PREFIX


class JobRoutes:
    """The job routes of one HTTP process, built on its ApiHandler's checks and api_entry threads."""

    def __init__(self, settings: Settings, models: Mapping[str, Model], api: ApiHandler, queue: QueueClient,
                 metrics: HttpMetrics) -> None:
        self._settings = settings
        self._models = dict(models)
        self._api = api
        self._queue = queue
        self._metrics = metrics
        self._access_log = settings.api.access_log
        server = settings.server
        self._job_timeout = server.job_timeout
        # A waiting job's record outlives its deadline by JobResultTTLS, so that a dispatcher that
        # comes back late can still mark it expired and the client read that; the worker sets
        # JobResultTTLS again from its answer on.
        self._record_ttl = math.ceil(server.job_timeout + server.job_result_ttl_s)
        self._max_queue = server.max_queue_length

    def add_routes(self, app: web.Application) -> None:
        """Submission routes first: a model at a one-segment path ("/echo") would otherwise be
        read as a job id by the poll route."""
        for path in self._models:
            app.router.add_post(JOBS_PREFIX + path, self.submit)
        app.router.add_get(JOBS_PREFIX + "/{job_id}", self.poll)
        app.router.add_post(JOBS_PREFIX + "/{job_id}", self.poll)

    async def submit(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        route: str = request.match_info.route.resource.canonical  # type: ignore[union-attr]
        outcome, ident = await self._submit(self._models[route[len(JOBS_PREFIX):]], request)
        return self._answer(request, route, outcome, started, ident)

    async def poll(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        outcome, ident = await self._poll(request)
        return self._answer(request, POLL_LABEL, outcome, started, ident)

    async def _submit(self, model: Model, request: web.Request) -> tuple[Outcome, str]:
        signed = await self._api.receive(request)
        if isinstance(signed, Outcome):
            return signed, ""
        app_id = signed.app_id
        request_id = envelope.new_request_id()
        now = time.time()
        index, replay = self._api.queue_of(signed)
        key = job_key(request_id, index)
        ident = job_id(request_id, index)
        payload = await self._api.run_entry(model, app_id, request_id, functools.partial(
            self._job_of, model, signed.data, request_id, now, key))
        if isinstance(payload, Outcome):
            return payload, ""
        stream = self._api.stream_of(model, index, app_id, PRIORITY_NORMAL)
        record = JobRecord(JOB_QUEUED, app_id, model.api_path, now).fields()
        try:
            await self._queue.submit_job(stream, key, record, self._record_ttl, payload, replay, self._api.replay_ttl)
        except SendFailure as exc:
            if not exc.reported:
                log.warning("cannot queue job %s on %s: %s", ident, stream, exc)
            return self._api.fail("SendMsgFail", app_id, request_id, str(exc)), ""
        except QueueFull:
            return self._api.fail("QueueFull", app_id, request_id, f"{stream} holds {self._max_queue} requests"), ""
        except Replayed:
            return self._api.fail("Replayed", app_id, request_id), ""
        except JobMaybeQueued as exc:
            log.warning("job %s may have been queued on %s (%s)", ident, stream, exc)
            error = self._settings.error("RecvMsgFail")
            msg = f"{error.msg} : the job may have been queued; poll it to know ({exc})"
            return Outcome(envelope.failure(app_id, request_id, error.code, msg, extra={"jobId": ident}),
                           error.code, app_id, request_id), ident
        body = {"jobId": ident, "state": JOB_QUEUED}
        return Outcome(envelope.success(app_id, request_id, body), 0, app_id, request_id), ident

    def _job_of(self, model: Model, data: dict[str, Any], request_id: str, now: float, key: str) -> str:
        """model.api_entry and the encoded Job, in one of the model's api_entry threads."""
        params = model.api_entry(data)
        if not isinstance(params, dict):
            raise TypeError(f"api_entry must return a dict, returned {type(params).__name__}")
        return Job(request_id, model.api_path, params, "", now + self._job_timeout, job_key=key).encode()

    async def _poll(self, request: web.Request) -> tuple[Outcome, str]:
        signed = await self._api.receive(request)
        if isinstance(signed, Outcome):
            return signed, ""
        app_id = signed.app_id
        ident = request.match_info["job_id"]
        parsed = parse_job_id(ident)
        bound = signed.data.get("jobId", ident)  # a signature made for another job does not read this one
        if parsed is None or bound != ident:
            return self._not_found(app_id), ""
        request_id, index = parsed
        try:
            raw = await self._queue.read_job(job_key(request_id, index))
        except SendFailure as exc:
            return self._api.fail("RecvMsgFail", app_id, "", f"cannot read the job now: {exc}"), ident
        record = JobRecord.decode(raw)
        if record is None or record.app_id != app_id:
            return self._not_found(app_id), ""
        return self._answer_of(app_id, request_id, ident, record), ident

    def _answer_of(self, app_id: str, request_id: str, ident: str, record: JobRecord) -> Outcome:
        """What a poll of a record answers: its state, or the answer the synchronous call would
        have given (plus jobId and state), or its failure."""
        state = {"jobId": ident, "state": record.state}
        reply = record.reply
        if record.state in (JOB_QUEUED, JOB_RUNNING):
            body: dict[str, Any] = {**state, "created": record.created}
            if record.started is not None:
                body["started"] = record.started
            return Outcome(envelope.success(app_id, request_id, body), 0, app_id, request_id)
        if record.state == JOB_DONE and reply is not None and reply.code == 0 and isinstance(reply.data, dict):
            return Outcome(envelope.success(app_id, request_id, {**reply.data, **state}), 0, app_id, request_id,
                           reply, reply.revision)
        if record.state == JOB_EXPIRED:
            error = self._settings.error("JobExpired")
            return Outcome(envelope.failure(app_id, request_id, error.code, error.msg, extra=state), error.code,
                           app_id, request_id)
        if record.state == JOB_FAILED and reply is not None and reply.code != 0:
            return Outcome(envelope.failure(app_id, request_id, reply.code, reply.msg, extra=state), reply.code,
                           app_id, request_id, reply, reply.revision)
        # A record whose answer does not fit its state: written by something other than a worker.
        error = self._settings.error("RecvMsgFail")
        failed = {"jobId": ident, "state": JOB_FAILED}
        return Outcome(envelope.failure(app_id, request_id, error.code, f"{error.msg} : the job's record holds no "
                                        "usable answer", extra=failed), error.code, app_id, request_id)

    def _not_found(self, app_id: str) -> Outcome:
        """One answer for every id this appId may not read, whatever the reason: no request id,
        no job id, nothing that differs between "never existed" and "someone else's"."""
        return self._api.fail("JobNotFound", app_id)

    def _answer(self, request: web.Request, label: str, outcome: Outcome, started: float, ident: str) -> web.Response:
        """Count the answer, add the version header, write the access log line."""
        elapsed = time.perf_counter() - started
        self._metrics.observe(label, outcome.code, elapsed)
        version = revision_version(outcome.revision)
        if version is not None:
            outcome.response.headers[VERSION_HEADER] = version
        if self._access_log:
            # raw_path: percent-encoded as sent, so a job id in the path cannot forge log lines.
            access_log.info("%s %s appId=%s code=%d %.1fms requestId=%s%s%s", request.method,
                            request.rel_url.raw_path, outcome.app_id, outcome.code, elapsed * 1000,
                            outcome.request_id, f" job={ident}" if ident else "",
                            "" if version is None else f" version={version}")
        return outcome.response
