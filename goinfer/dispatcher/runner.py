"""Running the models and turning every outcome into a Reply, never an exception.

Whatever a model does (returns a result, raises ApiError or anything else, returns something that
is not a dict or cannot be sent as JSON), its client gets exactly one answer and the worker
keeps serving. Failures the model did not choose (an exception, an unsendable result) are also
logged on the worker with the model's class and the request id, so they can be found.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from goinfer.dispatcher import metrics
from goinfer.errors import ApiError
from goinfer.models.base import Model
from goinfer.models.registry import code_digest
from goinfer.queue import Job, Reply, model_revision
from goinfer.settings import Settings

log = logging.getLogger("goinfer.worker")


class Runner:
    """The models of one worker, keyed by api path, and how their answers are encoded."""

    def __init__(self, settings: Settings, models: Mapping[str, Model],
                 revisions: Mapping[str, str] | None = None) -> None:
        self._settings = settings
        self.models = dict(models)
        self._infer_fail = settings.error("InferFail")
        # Per api path, the model_revision() every answer of that model carries.
        self.revisions = dict(revisions) if revisions is not None else model_revisions(models)

    def error_reply(self, job: Job, name: str, detail: str = "") -> str:
        """An answer with the error code `name` of the settings' ErrCode section."""
        error = self._settings.error(name)
        msg = f"{error.msg} : {detail}" if detail else error.msg
        return Reply(job.id, error.code, msg).encode()

    def execute(self, job: Job, queued_ms: float | None = None) -> str:
        """Run the model for one job."""
        model = self.models.get(job.api)
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
        metrics.series(metrics.INFER_SECONDS, job.api).observe(infer_s)
        return self.encode(model, job, result, "infer", queued_ms, infer_s * 1000)

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
        histogram = metrics.series(metrics.INFER_SECONDS, model.api_path)
        for _ in jobs:
            histogram.observe(infer_s)
        return [self.encode(model, job, result, "infer_batch", waited, infer_s * 1000)
                for job, result, waited in zip(jobs, results, queued, strict=True)]

    def encode(self, model: Model, job: Job, result: Any, hook: str, queued_ms: float | None = None,
               infer_ms: float | None = None) -> str:
        """The Reply for what `hook` gave for `job`: its data, or InferFail with the reason.

        Never raises: whatever the model returned, this request gets an answer, and only this one
        (the others of its batch are encoded apart), so the worker serves on.
        """
        prefix = self._infer_fail

        def reply(code: int, msg: str = "", data: dict[str, Any] | None = None) -> str:
            return Reply(job.id, code, msg, data, queued_ms=queued_ms, infer_ms=infer_ms,
                         revision=self.revisions.get(job.api)).encode()

        if isinstance(result, ApiError):
            return reply(result.code, f"{prefix.msg} : {_text(result.msg)}")
        if isinstance(result, BaseException):
            return reply(prefix.code, f"{prefix.msg} : {_text(result) or type(result).__name__}")
        if not isinstance(result, dict):
            detail = f"{hook} must return a dict per request, returned {type(result).__name__}"
            log.error("%s of %s: %s (requestId %s)", hook, type(model).__name__, detail, job.id)
            return reply(prefix.code, f"{prefix.msg} : {detail}")
        try:
            return reply(0, data=result)
        except Exception as exc:  # NaN, a lone surrogate, deep nesting, an object: the model's failure
            reason = _text(exc)
            log.error("%s of %s (requestId %s): %s", hook, type(model).__name__, job.id, reason)
            return reply(prefix.code, f"{prefix.msg} : {hook}: {reason}")


def model_revisions(models: Mapping[str, Model]) -> dict[str, str]:
    """What computes each api's answers: its version folder and the digest of its code."""
    return {api: model_revision(model.version, code_digest(type(model))) for api, model in models.items()}


def _text(value: object) -> str:
    """str(value), or a stand-in when the model's object cannot even say what it is."""
    try:
        return str(value)
    except Exception:
        return f"<{type(value).__name__} whose str() failed>"
