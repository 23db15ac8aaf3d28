"""`goinfer server N`: start `MaxWorkers` spawned workers on queue N and keep them running.

The supervisor never imports model code's heavy parts nor runs a model: it only starts,
watches and stops workers, in one loop that never blocks on any one of them. What stops the
dispatcher rather than being retried:
- a worker whose models fail to initialise (exit status 1: a broken deployment fails loudly);
- more worker deaths than the restart limit allows (exit status 1, restarts.py);
- Redis refusing the credentials (one line, exit status 2, outage.py).
Redis being away is waited out; the dispatcher says it is ready only once every worker can read
its streams.

It vouches for its workers (liveness.py): while a worker process lives, the entries it holds
are kept fresh in Redis, so a model that holds the GIL for minutes is never taken for a dead
worker; and a model call that runs past its MaxInferSeconds is stuck: the worker is stopped
(SIGTERM, then SIGKILL after KILL_GRACE_S, since C code holding the GIL never sees SIGTERM),
the call's requests are answered InferFail, and the worker is restarted at once. Such a stop is
the supervisor's decision, not a crash: it never counts toward the restart limit.

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
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from redis.exceptions import RedisError

from goinfer import __version__
from goinfer.cli_options import fatal
from goinfer.connections import RedisRefused
from goinfer.dispatcher.heartbeat import Heartbeat
from goinfer.dispatcher.liveness import COMMAND_TIMEOUT_S, Call, CallBoard, EntryKeeper, Holder, settle_overdue
from goinfer.dispatcher.metrics import MetricsServer
from goinfer.dispatcher.outage import NOBODY, SUPERVISOR, OutageLog, RedisProbe, dispatcher_nodes
from goinfer.dispatcher.restarts import RestartPolicy, TooManyDeaths
from goinfer.dispatcher.worker import EXIT_REDIS_REFUSED, worker_process_main
from goinfer.models.versions import ServedVersion, VersionError, choose_version
from goinfer.processes import StopSignals, exit_code, start_child, stop_processes
from goinfer.queue import STATE_LOADING, STATE_SERVING, DispatcherHeartbeat, Job, Reply, dispatcher_key, queue_tag
from goinfer.redis_address import describe_redis
from goinfer.settings import Settings

log = logging.getLogger("goinfer.dispatcher")

WATCH_INTERVAL_S = 0.5
# While its first workers load their models, a dispatcher says how far they are this often.
LOADING_LOG_INTERVAL_S = 2.0
# How long a worker stopped for a stuck call gets to finish it before SIGKILL.
KILL_GRACE_S = 1.0


class InitFailed(Exception):
    """A worker could not initialise its models; the message says which and why."""


@dataclass
class _Slot:
    """One of the MaxWorkers places a worker runs in; a restarted worker takes its dead one's."""

    index: int
    board: CallBoard
    process: BaseProcess | None = None
    status: Connection | None = None  # the worker's reports (see worker.py), open while it lives
    started_at: float = 0.0
    initialised: bool = False
    ready: bool = False
    restart_at: float | None = None
    consumer: str = ""  # its consumer in the group, and the streams it reads (from its "ready")
    streams: tuple[str, ...] = ()
    overdue: Call | None = None  # the stuck call it is being stopped for
    kill_at: float | None = None
    stopped: bool = False  # stopped by us (a stuck call): its exit is no crash


class Supervisor:
    """Starts, watches, restarts and stops the worker processes of one dispatcher."""

    def __init__(self, settings: Settings, queue_index: int, model_paths: Sequence[str]) -> None:
        self._settings = settings
        self._queue_index = queue_index
        self._model_paths = list(model_paths)
        self._context = multiprocessing.get_context("spawn")
        server = settings.server
        self._slots = [_Slot(index, CallBoard.create(self._context)) for index in range(server.max_workers)]
        self._keeper = EntryKeeper(dispatcher_nodes(server, queue_tag(queue_index), timeout_s=COMMAND_TIMEOUT_S),
                                   server.claim_idle_ms)
        self._infer_fail = settings.error("InferFail")
        self._restart_policy = RestartPolicy(server.worker_restart_limit, server.worker_restart_window_s)
        # Who is reporting a Redis outage, shared with the workers so that it is told once (OutageLog).
        self._reporter = self._context.RawValue("i", NOBODY)
        self._stop: StopSignals | None = None
        self._probe: RedisProbe | None = None
        self.restarts = 0
        # Read by the heartbeat thread and the metrics server, written only by the main thread.
        self._streams: list[str] = []  # as the workers report them: the supervisor imports no model
        self._apis: list[str] = []
        self._started_at = time.time()
        self._loading_since = time.monotonic()
        # The version folder (per model target with a ModelBasePath) that new workers load, and
        # the revisions the workers on it reported: answers and the result cache are keyed by them.
        self._versions: dict[str, ServedVersion] = {}
        self._revisions: dict[str, str] = {}
        self._revision_at = 0.0
        self._loaded = False  # all first workers have been ready once: "serving" from then on
        self._metrics: MetricsServer | None = None
        if server.metrics_port:
            self._metrics = MetricsServer(server.metrics_addr, server.metrics_port + queue_index, self.state)

    def state(self) -> DispatcherHeartbeat:
        """What this dispatcher says about itself in its heartbeat and metrics; never a secret."""
        server = self._settings.server
        return DispatcherHeartbeat(
            host=socket.gethostname(),
            pid=os.getpid(),
            queue_index=self._queue_index,
            streams=tuple(self._streams),
            apis=tuple(self._apis),
            models=tuple(self._model_paths),
            max_workers=server.max_workers,
            live_workers=sum(1 for slot in self._slots if slot.ready),
            restarts=self.restarts,
            metrics_port=server.metrics_port + self._queue_index if server.metrics_port else None,
            version=__version__,
            started_at=round(self._started_at, 3),
            heartbeat_at=round(time.time(), 3),
            heartbeat_interval_s=server.heartbeat_interval_s,
            state=STATE_SERVING if self._loaded else STATE_LOADING,
            loading_s=0.0 if self._loaded else round(time.monotonic() - self._loading_since, 1),
            revisions=dict(self._revisions),
            revision_at=round(self._revision_at, 3),
        )

    def _choose_versions(self) -> dict[str, ServedVersion]:
        """The version each model with a ModelBasePath serves: its pinned one, else the newest.

        Read from the folders, without importing any model. Raises VersionError.
        """
        chosen: dict[str, ServedVersion] = {}
        for target in self._model_paths:
            config = self._settings.model_config(target)
            if config is not None and config.base_path:
                chosen[target] = choose_version(config.base_path, config.version)
        return chosen

    @property
    def _stop_requested(self) -> bool:
        return self._stop is not None and self._stop.requested

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT: 0 after a clean stop, 1 when workers cannot be kept running.

        Raises RedisRefused when Redis refuses the credentials (run_dispatcher makes it exit 2).
        """
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
        probe = RedisProbe(self._settings.server, OutageLog(self._settings.server, SUPERVISOR, "dispatcher",
                                                            self._reporter), queue_tag(self._queue_index))
        self._probe = probe
        beating = False
        self._keeper.start()
        try:
            probe.check(time.monotonic())  # a refusal stops us here, before any model loads
            self._versions = self._choose_versions()
            for target, served in self._versions.items():
                log.info("%s: serving version %d from %s", target, served.number, served.path)
            self._loading_since = time.monotonic()
            for slot in self._slots:
                self._spawn(slot)
            # At once, saying "loading": /ready and /goinfer/status tell a dispatcher whose models
            # take a minute to load from one that is absent.
            heartbeat.start()
            beating = True
            next_progress = time.monotonic() + LOADING_LOG_INTERVAL_S
            while not self._stop_requested:
                self._step(probe)
                if self._loaded or self._stop_requested:
                    continue
                if all(slot.ready for slot in self._slots):
                    self._loaded = True
                    heartbeat.beat()
                    log.info("dispatcher for queue %d ready (models loaded in %.1f s)", self._queue_index,
                             time.monotonic() - self._loading_since)
                elif time.monotonic() >= next_progress:
                    next_progress = time.monotonic() + LOADING_LOG_INTERVAL_S
                    log.info("loading: %d/%d workers ready, %.1f s", sum(slot.ready for slot in self._slots),
                             len(self._slots), time.monotonic() - self._loading_since)
        except (InitFailed, TooManyDeaths, VersionError) as exc:
            log.error("dispatcher stopping: %s", exc)
            return 1
        finally:
            if beating:
                heartbeat.stop()  # first: readiness probes stop counting us while workers finish
            self._stop_workers()
            self._keeper.stop()  # last: workers finishing their requests are still vouched for
        log.info("dispatcher for queue %d stopped", self._queue_index)
        return 0

    def _step(self, probe: RedisProbe) -> None:
        """Wait for the next thing to happen (a report, a death, a restart or PING due) and handle it."""
        now = time.monotonic()
        probe.check(now)
        for slot in self._slots:
            if slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot)
        timeout = WATCH_INTERVAL_S
        if not probe.answered:
            timeout = min(timeout, probe.next_at - now)
        for slot in self._slots:
            for due in (slot.restart_at, slot.kill_at):
                if due is not None:
                    timeout = min(timeout, due - now)
        reports = {slot.status: slot for slot in self._slots if slot.status is not None}
        deaths = {slot.process.sentinel: slot for slot in self._slots if slot.process is not None}
        happened = wait([*reports, *deaths], timeout=max(0.0, timeout))
        if self._stop_requested:
            return
        for ready in happened:
            if isinstance(ready, Connection) and ready in reports:
                self._report(reports[ready])
        for ready in happened:
            if isinstance(ready, int) and ready in deaths:
                self._died(deaths[ready])
        self._stop_stuck(time.monotonic())

    def _stop_stuck(self, now: float) -> None:
        """Stop each worker whose model call ran past its limit: SIGTERM, then SIGKILL after the grace.

        A worker that finishes the call within the grace answers it itself and exits; one that
        starts another call meanwhile is judged on that call.
        """
        for slot in self._slots:
            process = slot.process
            if process is None:
                continue
            call = slot.board.read()
            if slot.overdue is not None and (call is None or call.started != slot.overdue.started):
                slot.overdue = slot.kill_at = None  # it finished that call (and answered it) in the grace
            if call is None:
                continue
            if slot.overdue is None and call.overdue(now):
                slot.overdue, slot.kill_at, slot.stopped = call, now + KILL_GRACE_S, True
                log.error("worker %d (pid %s) has been in one model call for %.1fs, longer than its "
                          "MaxInferSeconds (%g s): stopping it; unless it finishes within %gs, the call's "
                          "%d request(s) are answered InferFail", slot.index, process.pid, now - call.started,
                          call.limit_s, KILL_GRACE_S, len(call.entries) + call.unlisted)
                process.terminate()
            elif slot.kill_at is not None and now >= slot.kill_at:
                log.warning("worker %d (pid %s) did not stop within %gs (C code holding the GIL never sees "
                            "SIGTERM); killing it", slot.index, process.pid, KILL_GRACE_S)
                slot.kill_at = None
                process.kill()

    def _spawn(self, slot: _Slot) -> None:
        parent_end, child_end = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=worker_process_main,
            args=(self._settings, self._queue_index, self._model_paths, slot.index, child_end, self._reporter,
                  slot.board, self._versions),
            name=f"goinfer-worker-{self._queue_index}.{slot.index}",
            daemon=False,
        )
        slot.board.reset()  # what a killed predecessor was running is not this worker's call
        start_child(process)
        child_end.close()
        slot.process, slot.status, slot.started_at = process, parent_end, time.monotonic()
        slot.initialised = slot.ready = slot.stopped = False
        slot.restart_at = slot.overdue = slot.kill_at = None
        slot.consumer, slot.streams = "", ()

    def _report(self, slot: _Slot) -> None:
        """One report of a worker; a closed pipe just means the worker is exiting."""
        assert slot.status is not None
        try:
            kind, detail = slot.status.recv()
        except (EOFError, OSError):
            slot.status.close()
            slot.status = None
            return
        if kind == "failed":
            raise InitFailed(f"worker {slot.index} could not initialise the models: {detail}")
        if kind == "refused":
            raise RedisRefused(detail)
        if kind == "initialised":
            slot.initialised = True
        elif kind == "ready":
            slot.ready = True
            if self._probe is not None:
                self._probe.answer_seen()  # the worker reached Redis: no need to PING any more
            self._streams = list(detail.get("streams", self._streams))
            self._apis = list(detail.get("apis", self._apis))
            slot.consumer, slot.streams = str(detail.get("consumer", "")), tuple(detail.get("streams", ()))
            revisions = dict(detail.get("revisions", {}))
            if revisions != self._revisions:
                self._revisions, self._revision_at = revisions, time.time()
            self._vouch()

    def _died(self, slot: _Slot) -> None:
        assert slot.process is not None
        process = slot.process
        code = exit_code(process, timeout_s=None)
        while slot.status is not None and slot.status.poll():
            self._report(slot)  # what it said just before exiting: why it failed, if it knew
        if slot.status is not None:
            slot.status.close()
        slot.process, slot.status, slot.ready = None, None, False
        self._vouch()  # a dead worker's entries are for others to claim (reclaim.py)
        if slot.overdue is not None:
            self._settle(slot, slot.overdue)
        slot.board.reset()
        if code == EXIT_REDIS_REFUSED:
            raise RedisRefused(f"redis at {describe_redis(self._settings.server)} refuses worker {slot.index}; "
                               "see its log")
        if not slot.initialised:
            raise InitFailed(f"worker {slot.index} exited with code {code} during init")
        now = time.monotonic()
        if slot.stopped:
            self.restarts += 1
            log.info("worker %d (pid %s) stopped for a stuck model call (exit code %s); restarting it",
                     slot.index, process.pid, code)
            slot.restart_at = now
            return
        try:
            delay = self._restart_policy.died(slot.index, now - slot.started_at, now)
        except TooManyDeaths:
            log.error("worker %d (pid %s) died with exit code %s", slot.index, process.pid, code)
            raise
        self.restarts += 1
        log.error("worker %d (pid %s) died with exit code %s; restarting it in %.1fs", slot.index, process.pid,
                  code, delay)
        slot.restart_at = now + delay

    def _vouch(self) -> None:
        """Tell the entry keeper which workers live now."""
        self._keeper.vouch_for(Holder(slot.consumer, slot.streams) for slot in self._slots
                               if slot.process is not None and slot.consumer)

    def _settle(self, slot: _Slot, call: Call) -> None:
        """Answer InferFail to the requests of the stuck call that the stopped worker still held."""
        detail = f"infer ran longer than MaxInferSeconds ({call.limit_s:g} s)"

        def reply(job: Job) -> str:
            return Reply(job.id, self._infer_fail.code, f"{self._infer_fail.msg} : {detail}").encode()

        try:
            answered = settle_overdue(self._keeper.client, slot.consumer, slot.streams, call, reply)
        except (RedisError, OSError) as exc:
            self._keeper.nodes.lost(exc)
            log.error("could not answer the requests of worker %d's stuck call (%s): they will run again",
                      slot.index, exc)
            return
        for job in answered:
            log.error("answered request %s (%s) InferFail: %s", job.id, job.api, detail)
        if call.unlisted:
            log.error("%d more request(s) of that call will run again", call.unlisted)

    def _stop_workers(self) -> None:
        """SIGTERM lets each worker finish its request; stragglers are killed after the grace."""
        stop_processes([slot.process for slot in self._slots if slot.process is not None],
                       self._settings.server.shutdown_grace_s)
        for slot in self._slots:
            if slot.status is not None:
                slot.status.close()
                slot.status = None


def run_dispatcher(settings: Settings, queue_index: int, model_paths: Sequence[str]) -> int:
    """Run `goinfer server N`; its exit status. Redis refusing the credentials is one line, status 2."""
    try:
        return Supervisor(settings, queue_index, model_paths).run()
    except RedisRefused as exc:
        fatal(str(exc))
