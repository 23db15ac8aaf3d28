"""A worker process: initialise every model once, then take requests from the queue and answer.

Workers are started with the `spawn` method, so each one is a fresh interpreter: safe for
TensorFlow, which hangs in a process forked after it ran. A worker handles one request (or one
batch) at a time; concurrency comes from running `MaxWorkers` of them, each its own consumer in
the group. The parts live beside this loop: the stream protocol (stream.py), crash recovery
(reclaim.py), batching decisions (batching.py), running models (runner.py), and waiting out
Redis (outage.py).

A worker tells its supervisor, on a pipe, how its start went: "initialised" (models loaded),
"ready" (its consumer groups exist, so it can read its streams), or why it is about to exit:
"failed" (a model's init raised) or "refused" (Redis refuses the credentials).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from multiprocessing.connection import Connection
from typing import Any

import redis
from redis.exceptions import RedisError, ResponseError

from goinfer.connections import RedisRefused, refusal
from goinfer.dispatcher import metrics
from goinfer.dispatcher.batching import Work, batch_policies, fill, plan, read_size
from goinfer.dispatcher.outage import Backoff, OutageLog, SharedInt, dispatcher_client
from goinfer.dispatcher.reclaim import InFlightKeeper, Reclaimer
from goinfer.dispatcher.runner import Runner
from goinfer.dispatcher.stream import Done, Pending, StreamConsumer, ids_by_stream
from goinfer.logs import setup_logging
from goinfer.models.base import Model
from goinfer.models.registry import ModelRegistry, instantiate
from goinfer.queue import STAT_DEADLINE_DROPPED, streams_for
from goinfer.settings import Settings

log = logging.getLogger("goinfer.worker")

# Exit status of a worker whose models failed to initialise: the supervisor stops on it.
EXIT_INIT_FAILED = 3
# Exit status of a worker that Redis refuses (credentials, ACL): the supervisor stops on it too.
EXIT_REDIS_REFUSED = 5

_PAUSE_SLICE_S = 0.05


class Worker:
    """The consume loop of one worker process."""

    def __init__(self, settings: Settings, queue_index: int, models: Mapping[str, Model], consumer: str,
                 client: redis.Redis | None = None, outage: OutageLog | None = None) -> None:
        server = settings.server
        self._server = server
        self.runner = Runner(settings, models)
        self._policies = batch_policies(server, models)
        streams = streams_for(server.queue_name, [m.queue or None for m in models.values()], [queue_index],
                              with_default=True)
        self.stream = StreamConsumer(client or dispatcher_client(server), streams, consumer,
                                     read_size(self._policies))
        self._reclaimer = Reclaimer(self.stream, server, lambda job: self.runner.error_reply(job, "DeadLettered"))
        self._keeper = InFlightKeeper(dispatcher_client(server), consumer, stuck_after_s=server.message_timeout)
        self._outage = outage or OutageLog(server, 0, f"worker {consumer}")
        self._backoff = Backoff()
        self._groups_ready = False
        self.stopping = False

    @property
    def streams(self) -> list[str]:
        """The streams this worker reads (reported to the supervisor for its heartbeat)."""
        return list(self.stream.streams)

    def connect(self) -> bool:
        """Create the consumer groups, waiting for Redis as long as it takes; False if stopped first.

        Raises RedisRefused when Redis refuses the credentials: waiting would not help.
        """
        while not self.stopping:
            try:
                self.stream.ensure_groups()
            except (RedisError, OSError) as exc:
                self._wait_out(exc)
                continue
            self._groups_ready = True
            self._healthy()
            return True
        return False

    def run(self) -> None:
        """Serve until `stopping` is set, finishing the entries already taken; Redis outages are waited out."""
        batching = ", ".join(f"{api} up to {p.size} per {p.timeout_s * 1000:g} ms" for api, p in self._policies.items())
        log.info("worker %s reading %s%s", self.stream.consumer, ", ".join(self.streams),
                 f"; batching {batching}" if batching else "")
        self._keeper.start()
        pending: list[Pending] = []
        own_recovered = False
        while pending or not self.stopping:
            try:
                if not self._groups_ready:
                    self.stream.ensure_groups()
                    self._groups_ready = True
                if not own_recovered:  # first what this slot's previous incarnation had taken
                    pending, own_recovered = self._reclaimer.own(), True
                pending = pending or self._reclaimer.due() or self.stream.read()
                if pending:
                    pending = self._serve(pending)
                self._healthy()
            except (RedisError, OSError) as exc:
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc) and not refusal(exc, self._server):
                    log.warning("consumer group missing (Redis emptied?); creating it again")
                    self._groups_ready = False
                else:
                    self._wait_out(exc)
        self._keeper.stop()

    def _serve(self, pending: list[Pending]) -> list[Pending]:
        """Run what was taken and answer it; returns the entries read in the same round trip."""
        pending = fill(pending, lambda n: self.stream.read(n, block_ms=None), _api, self._policies,
                       self.stream.read_count)
        deadline = max((p.job.deadline for p in pending if p.job), default=time.time())
        self._keeper.track(ids_by_stream(pending), deadline)
        following = self.stream.finish(self._process(pending), read_next=not self.stopping)
        self._keeper.clear()
        return following

    def _process(self, pending: list[Pending]) -> list[Done]:
        """Run the jobs, sending each reply as soon as it is ready; the last ones are returned."""
        unsent: list[Done] = []
        runnable = []
        for item in pending:
            if item.job is None:  # unreadable: acknowledged, never answered (nobody to answer)
                unsent.append((item, None))
            elif item.job.expired():
                self.stream.count(item.stream, STAT_DEADLINE_DROPPED)
                metrics.DEADLINE_DROPPED.labels(item.stream).inc()
                log.warning("dropping request %s: its client was already answered with QueueTimeout", item.job.id)
                unsent.append((item, None))
            else:
                runnable.append(item)
        for work in plan(runnable, _api, self._policies):
            if unsent:
                self.stream.finish(unsent)
                unsent = []
            unsent += zip(work.items, self._run(work), strict=True)
        return unsent

    def _run(self, work: Work[Pending]) -> list[str]:
        queued = [_queued_ms(item) for item in work.items]
        jobs = [item.job for item in work.items if item.job is not None]
        if work.batched:
            return self.runner.execute_batch(self.runner.models[work.api], jobs, queued)
        return [self.runner.execute(jobs[0], queued[0])]

    def _wait_out(self, exc: BaseException) -> None:
        """One back-off step of a Redis outage; a refusal ends the worker instead."""
        refused = refusal(exc, self._server)
        if refused is not None:
            raise refused from None
        # Nothing runs while Redis is away: the keeper must not take the wait for a stuck model.
        self._keeper.clear()
        delay = self._backoff.step()
        self._outage.failed(exc, delay)
        deadline = time.monotonic() + delay
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(_PAUSE_SLICE_S, max(0.0, deadline - time.monotonic())))

    def _healthy(self) -> None:
        self._backoff.reset()
        self._outage.recovered()


def _api(item: Pending) -> str:
    return item.job.api if item.job is not None else ""


def _queued_ms(item: Pending) -> float:
    """The entry's wait, also observed for /metrics."""
    queued = item.queued_ms()
    metrics.QUEUE_WAIT_SECONDS.labels(item.stream).observe(queued / 1000)
    return queued


def consumer_name(worker_index: int) -> str:
    """Stable across restarts of one worker slot (the supervisor's pid and the slot), so a
    restarted worker finds and finishes what its previous incarnation had taken."""
    return f"{socket.gethostname()}:{os.getppid()}:{worker_index}"


def _tell(status: Connection, message: tuple[str, Any]) -> None:
    """Report to the supervisor; one that is gone no longer needs to know."""
    try:
        status.send(message)
    except OSError:
        pass


def worker_process_main(settings: Settings, queue_index: int, model_paths: list[str], worker_index: int,
                        status: Connection, reporter: SharedInt | None = None) -> None:
    """Entry point of a spawned worker: init models, wait for Redis, report to the supervisor, serve."""
    setup_logging()
    # Ctrl-C reaches the supervisor, which stops us; the supervisor starts us with SIGINT already
    # ignored (goinfer.processes.start_child), this covers a worker started some other way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        registry = ModelRegistry()
        registry.extend_from_paths(model_paths)
        models = instantiate(registry.classes, settings)
        for model in models.values():
            model.init()
    except BaseException as exc:
        log.exception("worker %d: model initialisation failed", worker_index)
        _tell(status, ("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(EXIT_INIT_FAILED) from None
    _tell(status, ("initialised", None))

    outage = OutageLog(settings.server, worker_index, f"worker {worker_index}", reporter)
    worker = Worker(settings, queue_index, models, consumer_name(worker_index), outage=outage)

    def stop(signum: int, frame: object) -> None:
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        if worker.connect():
            # The supervisor imports no model, so the worker tells it what it serves (for its heartbeat).
            _tell(status, ("ready", {"pid": os.getpid(), "streams": worker.streams, "apis": sorted(models)}))
            worker.run()
    except RedisRefused as exc:
        _tell(status, ("refused", str(exc)))
        raise SystemExit(EXIT_REDIS_REFUSED) from None
    log.info("worker %d stopped", worker_index)
