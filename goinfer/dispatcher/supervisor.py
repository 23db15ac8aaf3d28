"""`goinfer server N`: start `MaxWorkers` spawned workers on queue N and keep them running.

The supervisor never imports model code's heavy parts nor runs a model: it only starts,
watches and stops workers. A worker that fails to initialise stops the dispatcher (a broken
deployment should fail loudly at start); one that dies later is restarted and logged.

It also tells the outside world about itself: a heartbeat in Redis (heartbeat.py) naming the
streams its workers reported reading, and, with Server.MetricsPort, a /metrics endpoint
(metrics.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Sequence

from goinfer import __version__
from goinfer.connections import describe_redis
from goinfer.dispatcher.heartbeat import Heartbeat
from goinfer.dispatcher.metrics import MetricsServer
from goinfer.dispatcher.worker import worker_process_main
from goinfer.processes import StopSignals, exit_code, stop_processes
from goinfer.queue import dispatcher_key
from goinfer.settings import Settings

log = logging.getLogger("goinfer.dispatcher")

WATCH_INTERVAL_S = 0.5


class InitFailed(Exception):
    """A worker could not initialise its models; the message says which and why."""


class Supervisor:
    """Starts, watches, restarts and stops the worker processes of one dispatcher."""

    def __init__(self, settings: Settings, queue_index: int, model_paths: Sequence[str]) -> None:
        self._settings = settings
        self._queue_index = queue_index
        self._model_paths = list(model_paths)
        self._context = multiprocessing.get_context("spawn")
        self._workers: dict[int, BaseProcess] = {}
        self._stop: StopSignals | None = None
        self.restarts = 0
        # Worker slots whose models are initialised and that have not died since; read by the
        # heartbeat thread and the metrics server, written only by the main thread.
        self._live: set[int] = set()
        self._streams: list[str] = []  # as the workers report them: the supervisor imports no model
        self._apis: list[str] = []
        self._started_at = time.time()
        server = settings.server
        self._metrics: MetricsServer | None = None
        if server.metrics_port:
            self._metrics = MetricsServer(server.metrics_addr, server.metrics_port + queue_index, self.state)

    def state(self) -> dict[str, object]:
        """What this dispatcher says about itself in its heartbeat and metrics; never a secret."""
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queue_index": self._queue_index,
            "streams": list(self._streams),
            "apis": list(self._apis),
            "models": list(self._model_paths),
            "max_workers": self._settings.server.max_workers,
            "live_workers": len(self._live),
            "restarts": self.restarts,
            "metrics_port": self._settings.server.metrics_port + self._queue_index
            if self._settings.server.metrics_port else None,
            "version": __version__,
            "started_at": round(self._started_at, 3),
            "heartbeat_at": round(time.time(), 3),
            "heartbeat_interval_s": self._settings.server.heartbeat_interval_s,
        }

    @property
    def _stop_requested(self) -> bool:
        return self._stop is not None and self._stop.requested

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0 after a clean stop, 1 if models failed to initialise."""
        self._stop = StopSignals()
        server = self._settings.server
        log.info("dispatcher for queue %d: %d workers, redis at %s, models %s", self._queue_index,
                 server.max_workers, describe_redis(server), ", ".join(self._model_paths))
        if self._metrics is not None:
            self._metrics.prepare_workers()
            self._metrics.start()
        heartbeat = Heartbeat(server, dispatcher_key(socket.gethostname(), os.getpid()), self.state)
        try:
            return self._serve(heartbeat)
        finally:
            if self._metrics is not None:
                self._metrics.close()

    def _serve(self, heartbeat: Heartbeat) -> int:
        try:
            self._start_workers(range(self._settings.server.max_workers))
        except InitFailed as exc:
            log.error("dispatcher stopping: %s", exc)
            self._stop_workers()
            return 1
        heartbeat.start()
        log.info("dispatcher for queue %d ready", self._queue_index)
        try:
            self._watch()
        except InitFailed as exc:
            log.error("dispatcher stopping: %s", exc)
            heartbeat.stop()
            self._stop_workers()
            return 1
        heartbeat.stop()  # first: readiness probes stop counting us while workers finish
        self._stop_workers()
        log.info("dispatcher for queue %d stopped", self._queue_index)
        return 0

    def _start_workers(self, indexes) -> None:
        """Start workers and wait until each reports its models initialised."""
        pending: dict[Connection, tuple[int, BaseProcess]] = {}
        for index in indexes:
            parent_end, child_end = self._context.Pipe(duplex=False)
            process = self._context.Process(
                target=worker_process_main,
                args=(self._settings, self._queue_index, self._model_paths, index, child_end),
                name=f"goinfer-worker-{self._queue_index}.{index}",
                daemon=False,
            )
            process.start()
            child_end.close()
            self._workers[index] = process
            pending[parent_end] = (index, process)
        while pending:
            if self._stop_requested:
                return
            ready = wait(list(pending), timeout=WATCH_INTERVAL_S)
            for conn in ready:
                index, process = pending.pop(conn)
                try:
                    status, detail = conn.recv()
                except EOFError:
                    raise InitFailed(f"worker {index} exited with code {exit_code(process)} during init") from None
                finally:
                    conn.close()
                if status != "ready":
                    raise InitFailed(f"worker {index} could not initialise the models: {detail}")
                self._streams = list(detail.get("streams", self._streams))
                self._apis = list(detail.get("apis", self._apis))
                self._live.add(index)

    def _watch(self) -> None:
        while not self._stop_requested:
            sentinels = {process.sentinel: index for index, process in self._workers.items()}
            for sentinel in wait(list(sentinels), timeout=WATCH_INTERVAL_S):
                if self._stop_requested:
                    return
                index = sentinels[sentinel]
                process = self._workers[index]
                code = exit_code(process, timeout_s=None)
                self._live.discard(index)
                self.restarts += 1
                log.error("worker %d (pid %s) died with exit code %s; restarting it", index, process.pid, code)
                self._start_workers([index])

    def _stop_workers(self) -> None:
        """SIGTERM lets each worker finish its request; stragglers are killed after the grace."""
        stop_processes(self._workers.values(), self._settings.server.shutdown_grace_s)


def run_dispatcher(settings: Settings, queue_index: int, model_paths: Sequence[str]) -> int:
    return Supervisor(settings, queue_index, model_paths).run()
