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
from multiprocessing.connection import Connection
from typing import Mapping

import redis
from redis.exceptions import RedisError, ResponseError

from goinfer.connections import sync_client
from goinfer.errors import ApiError
from goinfer.logs import setup_logging
from goinfer.models.base import Model
from goinfer.models.registry import ModelRegistry, instantiate
from goinfer.queue import CONSUMER_GROUP, JOB_FIELD, REPLY_TTL_S, Job, Reply, stream_name
from goinfer.settings import Settings

log = logging.getLogger("goinfer.worker")

READ_BLOCK_MS = 1000
RECONNECT_MAX_S = 5.0

# Exit status of a worker whose models failed to initialise: the supervisor stops on it.
EXIT_INIT_FAILED = 3


def queue_streams(settings: Settings, queue_index: int, models: Mapping[str, Model]) -> list[str]:
    """The streams dispatcher N reads: the default queue N and queue N of every custom queue."""
    bases = [settings.server.queue_name]
    bases += sorted({m.queue for m in models.values() if m.queue} - {settings.server.queue_name})
    return [stream_name(base, queue_index) for base in bases]


class Worker:
    """The consume loop of one worker process."""

    def __init__(self, settings: Settings, queue_index: int, models: Mapping[str, Model],
                 consumer: str, client: redis.Redis | None = None) -> None:
        self._settings = settings
        self._models = dict(models)
        self._consumer = consumer
        self._redis = client or sync_client(settings.server)
        self._streams = queue_streams(settings, queue_index, models)
        self.stopping = False

    def run(self) -> None:
        """Serve until `stopping` is set; Redis outages are waited out, never fatal."""
        log.info("worker %s reading %s", self._consumer, ", ".join(self._streams))
        self._ensure_groups()
        delay = 0.1
        while not self.stopping:
            try:
                batch = self._redis.xreadgroup(
                    CONSUMER_GROUP, self._consumer, {s: ">" for s in self._streams},
                    count=1, block=READ_BLOCK_MS,
                )
                for stream, entries in batch or ():
                    for entry_id, fields in entries:
                        self._handle(stream, entry_id, fields)
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

    def _handle(self, stream: bytes | str, entry_id: bytes, fields: Mapping[bytes, bytes]) -> None:
        try:
            job = Job.decode(fields[JOB_FIELD.encode()])
        except (KeyError, ValueError, TypeError) as exc:
            log.error("dropping malformed entry %s on %s: %s", entry_id, stream, exc)
            self._finish(stream, entry_id)
            return
        if job.expired():
            log.warning("dropping request %s: its client was already answered with QueueTimeout", job.id)
            self._finish(stream, entry_id)
            return
        reply = self.execute(job)
        self._finish(stream, entry_id, job.reply_to, reply.encode())

    def execute(self, job: Job) -> Reply:
        """Run the model for one job; every outcome becomes a Reply, never an exception."""
        model = self._models.get(job.api)
        if model is None:
            error = self._settings.error("UnknownApi")
            return Reply(job.id, error.code, f"{error.msg} : {job.api}")
        prefix = self._settings.error("InferFail")
        try:
            data = model.infer(job.id, job.params)
            if not isinstance(data, dict):
                raise TypeError(f"infer must return a dict, returned {type(data).__name__}")
            reply = Reply(job.id, 0, data=data)
            reply.encode()  # a result that cannot be sent is the model's failure, reported as such
            return reply
        except ApiError as exc:
            return Reply(job.id, exc.code, f"{prefix.msg} : {exc.msg}")
        except Exception as exc:
            log.exception("infer of %s failed (requestId %s)", type(model).__name__, job.id)
            return Reply(job.id, prefix.code, f"{prefix.msg} : {exc or type(exc).__name__}")

    def _finish(self, stream, entry_id, reply_to: str | None = None, reply: str | None = None) -> None:
        """Send the reply and acknowledge the entry in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        if reply_to is not None and reply is not None:
            pipe.rpush(reply_to, reply)
            pipe.expire(reply_to, REPLY_TTL_S)
        pipe.xack(stream, CONSUMER_GROUP, entry_id)
        pipe.xdel(stream, entry_id)
        pipe.execute()


def consumer_name(worker_index: int) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{worker_index}"


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
    ready.send(("ready", os.getpid()))
    ready.close()
    worker.run()
    log.info("worker %d stopped", worker_index)
