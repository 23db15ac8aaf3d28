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

Models live: a new version folder (watch.py, every Server.ModelPollS), `goinfer reload` or
SIGHUP rolls the workers over to fresh processes one at a time without dropping below
MaxWorkers (rollout.py); a new version that cannot load is refused while the old workers serve
on. Each worker starts on its place's device (Server.Devices, devices.py).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from redis.exceptions import RedisError

from goinfer import __version__
from goinfer.cli_options import fatal
from goinfer.connections import RedisRefused
from goinfer.dispatcher.devices import device_for, environment, placement_environment
from goinfer.dispatcher.heartbeat import Heartbeat
from goinfer.dispatcher.liveness import COMMAND_TIMEOUT_S, Call, CallBoard, EntryKeeper, Holder, settle_overdue
from goinfer.dispatcher.metrics import MetricsServer
from goinfer.dispatcher.outage import NOBODY, SUPERVISOR, OutageLog, RedisProbe, dispatcher_nodes
from goinfer.dispatcher.restarts import RestartPolicy, TooManyDeaths
from goinfer.dispatcher.rollout import Rollout, change_label, describe_versions
from goinfer.dispatcher.watch import ModelWatch
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
    """One worker's place: a restarted worker takes its dead one's (and so its consumer).

    `index` names the consumer, so it is never reused within a dispatcher: a rollover starts its
    new workers in new slots. `position` (0 to MaxWorkers - 1) is the place in the pool that
    decides the device; a worker started by a rollover takes the position of the one it replaces.
    """

    index: int
    board: CallBoard
    position: int = 0
    versions: dict[str, ServedVersion] = field(default_factory=dict)  # what its worker loads
    generation: int = 0  # which rollover started it (0: the dispatcher's start)
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
    retiring: bool = False  # replaced by a rollover: stopped, and not restarted
    discarded: bool = False  # a new worker of a refused rollover: stopped, and not restarted
    retire_kill_at: float | None = None  # when a retiring worker that has not exited is killed


class Supervisor:
    """Starts, watches, restarts and stops the worker processes of one dispatcher."""

    def __init__(self, settings: Settings, queue_index: int, model_paths: Sequence[str]) -> None:
        self._settings = settings
        self._queue_index = queue_index
        self._model_paths = list(model_paths)
        self._context = multiprocessing.get_context("spawn")
        server = settings.server
        self._slots = [_Slot(index, CallBoard.create(self._context), position=index)
                       for index in range(server.max_workers)]
        self._next_index = server.max_workers
        self._spare_boards: list[CallBoard] = []  # of retired slots, for the next new ones
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
        # Rollovers (rollout.py): the generation new and restarted workers start on, the rollover
        # under way, and why the last one was refused.
        self._generation = 0
        self._generations = 0  # the last generation number given out
        self._rollout: Rollout | None = None
        self._refused_versions: dict[str, ServedVersion] | None = None  # not tried again by polling
        self._reload_error = ""
        self.reload_failures = 0
        self._reload_wanted = False  # a reload (goinfer reload, SIGHUP) not started yet
        self._reloads_seen = 0
        self._hangup = False
        self._watch: ModelWatch | None = None
        self._heartbeat: Heartbeat | None = None
        self._metrics: MetricsServer | None = None
        if server.metrics_port:
            self._metrics = MetricsServer(server.metrics_addr, server.metrics_port + queue_index, self.state,
                                          lambda: self.reload_failures)

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
            live_workers=sum(1 for slot in self._slots if slot.ready and not slot.retiring),
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
            devices=tuple(device for device in (device_for(server.devices, position)
                                                for position in range(server.max_workers)) if device is not None),
            rollout=self._rollout_text(),
            reload_error=self._reload_error,
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
        signal.signal(signal.SIGHUP, self._hung_up)  # a reload, not a stop
        server = self._settings.server
        log.info("dispatcher for queue %d: %d workers, redis at %s, models %s", self._queue_index,
                 server.max_workers, describe_redis(server), ", ".join(self._model_paths))
        if self._metrics is not None:
            self._metrics.prepare_workers()
            self._metrics.start()
        heartbeat = Heartbeat(server, dispatcher_key(socket.gethostname(), os.getpid()), self.state)
        self._heartbeat = heartbeat
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
            for slot in self._slots:
                slot.versions = dict(self._versions)
            self._loading_since = time.monotonic()
            for slot in self._slots:
                self._spawn(slot)
            # At once, saying "loading": /ready and /goinfer/status tell a dispatcher whose models
            # take a minute to load from one that is absent.
            heartbeat.start()
            beating = True
            self._watch = ModelWatch(self._settings.server, self._queue_index, self._bases())
            self._watch.start()
            if not self._settings.server.model_poll_s:
                log.info("Server.ModelPollS is 0: new versions and reloads are taken on SIGHUP only")
            next_progress = time.monotonic() + LOADING_LOG_INTERVAL_S
            while not self._stop_requested:
                self._step(probe)
                if self._stop_requested:
                    break
                if self._loaded:
                    self._lifecycle()
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
            if self._watch is not None:
                self._watch.stop()
            self._stop_workers()
            self._keeper.stop()  # last: workers finishing their requests are still vouched for
        log.info("dispatcher for queue %d stopped", self._queue_index)
        return 0

    def _step(self, probe: RedisProbe) -> None:
        """Wait for the next thing to happen (a report, a death, a restart or PING due) and handle it."""
        now = time.monotonic()
        probe.check(now)
        for slot in list(self._slots):
            if slot.restart_at is not None and now >= slot.restart_at:
                self._spawn(slot)
        timeout = WATCH_INTERVAL_S
        if not probe.answered:
            timeout = min(timeout, probe.next_at - now)
        for slot in self._slots:
            for due in (slot.restart_at, slot.kill_at, slot.retire_kill_at):
                if due is not None:
                    timeout = min(timeout, due - now)
        reports = {slot.status: slot for slot in self._slots if slot.status is not None}
        deaths = {slot.process.sentinel: slot for slot in self._slots if slot.process is not None}
        happened = wait([*reports, *deaths], timeout=max(0.0, timeout))
        if self._stop_requested:
            return
        for ready in happened:
            if isinstance(ready, Connection) and ready in reports and reports[ready].status is ready:
                self._report(reports[ready])
        for ready in happened:
            if isinstance(ready, int) and ready in deaths and deaths[ready].process is not None:
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
            if slot.retire_kill_at is not None and now >= slot.retire_kill_at:
                log.warning("worker %d (pid %s) did not stop within Server.ShutdownGraceS (%gs) after it was "
                            "replaced; killing it", slot.index, process.pid, self._settings.server.shutdown_grace_s)
                slot.retire_kill_at = None
                process.kill()
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
        """Start the slot's worker on its versions, with its position's device in its environment."""
        parent_end, child_end = self._context.Pipe(duplex=False)
        device = device_for(self._settings.server.devices, slot.position)
        process = self._context.Process(
            target=worker_process_main,
            args=(self._settings, self._queue_index, self._model_paths, slot.index, child_end, self._reporter,
                  slot.board, slot.versions, device),
            name=f"goinfer-worker-{self._queue_index}.{slot.index}",
            daemon=False,
        )
        slot.board.reset()  # what a killed predecessor was running is not this worker's call
        # Set around the start, not in the worker: the spawned interpreter imports the program
        # (and maybe TensorFlow) before any code of ours runs in it.
        with environment(placement_environment(device)):
            start_child(process)
        child_end.close()
        slot.process, slot.status, slot.started_at = process, parent_end, time.monotonic()
        slot.initialised = slot.ready = slot.stopped = False
        slot.restart_at = slot.overdue = slot.kill_at = slot.retire_kill_at = None
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
            if self._rollout is not None and slot is self._rollout.surge:
                self._refuse(self._rollout, str(detail))
                return
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
            if self._rollout is not None and slot is self._rollout.surge:
                self._surge_ready(self._rollout, slot)
            revisions = dict(detail.get("revisions", {}))
            # Only a worker of the generation new workers start on says what they serve: an old
            # worker restarted during a rollover is about to be replaced.
            if slot.generation == self._generation and revisions != self._revisions:
                self._revisions, self._revision_at = revisions, time.time()
                self._nudge()
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
        if slot.discarded:
            self._remove(slot)
            return
        if slot.retiring:
            log.info("worker %d (pid %s) replaced and stopped (exit code %s)", slot.index, process.pid, code)
            if self._rollout is not None and self._rollout.retiring is slot:
                self._rollout.retiring = None
            self._remove(slot)
            return
        if self._rollout is not None and slot is self._rollout.surge:
            phase = "before it was ready" if slot.initialised else "while loading its models"
            self._refuse(self._rollout, f"worker {slot.index} exited with code {code} {phase}")
            self._remove(slot)
            return
        if not slot.initialised:
            raise InitFailed(f"worker {slot.index} exited with code {code} during init")
        # Restarted on what new workers start on now: after (or during) a rollover, the new versions.
        slot.versions, slot.generation = dict(self._versions), self._generation
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

    # --- rollovers: new versions, reloads (rollout.py) ---------------------------------------------

    def _hung_up(self, *_args: object) -> None:
        self._hangup = True  # acted on by the watch loop, within WATCH_INTERVAL_S

    def _bases(self) -> dict[str, tuple[str, int | None]]:
        """Per model target with a ModelBasePath: that path and its pinned version."""
        bases: dict[str, tuple[str, int | None]] = {}
        for target in self._model_paths:
            config = self._settings.model_config(target)
            if config is not None and config.base_path:
                bases[target] = (config.base_path, config.version)
        return bases

    def _lifecycle(self) -> None:
        """Start a rollover when one is asked for or a new version appeared; move the current one on."""
        found: dict[str, ServedVersion] = {}
        if self._watch is not None:
            found, reloads = self._watch.found()
            if reloads != self._reloads_seen:
                self._reloads_seen = reloads
                self._reload_wanted = True
                log.info("reload requested (goinfer reload)")
        if self._hangup:
            self._hangup = False
            self._reload_wanted = True
            log.info("reload requested (SIGHUP)")
        if self._rollout is None:
            if self._reload_wanted:
                self._reload_wanted = False
                self._reload()
            else:
                offered = {target: found.get(target, served) for target, served in self._versions.items()}
                if offered != self._versions and offered != self._refused_versions:
                    self._begin(offered)
        self._advance()

    def _reload(self) -> None:
        """Roll every worker over to a fresh process: model code imported again, folders read again."""
        try:
            versions = self._choose_versions()
        except VersionError as exc:
            self._refused(f"reload refused: {exc}")
            return
        self._refused_versions = None  # a reload tries again what polling would not
        self._begin(versions)

    def _begin(self, versions: dict[str, ServedVersion]) -> None:
        self._generations += 1
        replaced = [slot for slot in self._slots if not (slot.retiring or slot.discarded)]
        self._rollout = Rollout(self._generations, dict(versions), change_label(self._versions, versions),
                                dict(self._versions), self._generation, len(replaced))
        changes = ", ".join(f"{target} {self._versions[target].number} -> {served.number}"
                            for target, served in versions.items()
                            if target in self._versions and self._versions[target] != served)
        log.info("rolling over %s%s: replacing %d workers one at a time", self._rollout.going,
                 f" ({changes})" if changes else "", len(replaced))
        self._nudge()

    def _advance(self) -> None:
        """Start the next new worker once the previous one is ready and its old one has exited."""
        rollout = self._rollout
        if rollout is None or rollout.surge is not None or rollout.retiring is not None:
            return
        old = next((slot for slot in self._slots if slot.generation != rollout.generation
                    and not (slot.retiring or slot.discarded)), None)
        if old is None:
            self._rollout = None
            if rollout.rollback:
                log.warning("rolled back to %s", describe_versions(rollout.versions))
            else:
                self._reload_error = ""
                log.info("rolled over %s: all %d workers replaced", rollout.going, len(self._slots))
            self._nudge()
            return
        slot = _Slot(self._next_index, self._spare_boards.pop() if self._spare_boards else
                     CallBoard.create(self._context), position=old.position, versions=dict(rollout.versions),
                     generation=rollout.generation)
        self._next_index += 1
        self._slots.append(slot)
        rollout.surge, rollout.replacing = slot, old
        self._spawn(slot)
        log.info("rolling over %s: starting worker %d (pid %s) to replace worker %d", rollout.going, slot.index,
                 slot.process.pid if slot.process else "?", old.index)

    def _surge_ready(self, rollout: Rollout, slot: _Slot) -> None:
        """The new worker is ready: from now on new workers start on its versions; stop one old worker."""
        if not rollout.proven:
            rollout.proven = True
            self._versions, self._generation = dict(rollout.versions), rollout.generation
        rollout.moved += 1
        old = rollout.replacing
        rollout.surge = rollout.replacing = None
        log.info("rolling over %s: worker %d ready (%d/%d), stopping worker %d", rollout.going, slot.index,
                 rollout.moved, rollout.total, old.index if old is not None else -1)
        if old is not None and self._retire(old):
            rollout.retiring = old
        self._nudge()

    def _retire(self, slot: _Slot) -> bool:
        """SIGTERM a replaced worker: it finishes what it holds and exits. False if none was running."""
        slot.retiring = True
        slot.restart_at = None
        if slot.process is None:
            self._remove(slot)
            return False
        slot.process.terminate()
        slot.retire_kill_at = time.monotonic() + self._settings.server.shutdown_grace_s
        return True

    def _refuse(self, rollout: Rollout, reason: str) -> None:
        """A new worker failed: the rollover stops, old workers serve on (moved ones are rolled back)."""
        surge, rollout.surge, rollout.replacing = rollout.surge, None, None
        if surge is not None:
            surge.discarded = True
            if surge.process is not None:
                surge.process.terminate()
        if rollout.rollback:
            self._rollout = None
            self._refused(f"rollback to {describe_versions(rollout.versions)} failed: {reason}")
            return
        self._refused_versions = dict(rollout.versions)
        if rollout.proven:
            # Some workers already serve the refused versions: bring them back to the previous ones.
            self._versions, self._generation = dict(rollout.previous_versions), rollout.previous_generation
            self._rollout = Rollout(rollout.previous_generation, dict(rollout.previous_versions),
                                    f"rollback to {describe_versions(rollout.previous_versions)}",
                                    dict(rollout.previous_versions), rollout.previous_generation, rollout.moved,
                                    rollback=True, retiring=rollout.retiring, proven=True)
        else:
            self._rollout = None
        self._refused(f"{rollout.label} refused: {reason}")

    def _refused(self, text: str) -> None:
        self.reload_failures += 1
        self._reload_error = text
        log.error("%s; the workers serve on with %s", text, describe_versions(self._versions) if self._versions
                  else "the models loaded")
        self._nudge()

    def _remove(self, slot: _Slot) -> None:
        """A retired or discarded slot is gone for good: its consumer is removed once it holds nothing."""
        if slot in self._slots:
            self._slots.remove(slot)
            self._spare_boards.append(slot.board)
        if self._watch is not None:
            self._watch.retire(slot.consumer, slot.streams)
        self._vouch()

    def _rollout_text(self) -> str:
        return self._rollout.text() if self._rollout is not None else ""

    def _nudge(self) -> None:
        """Beat now: what the heartbeat says about versions and rollovers changed."""
        if self._heartbeat is not None:
            self._heartbeat.nudge()

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
            answered = settle_overdue(self._keeper.client, slot.consumer, slot.streams, call, reply,
                                      self._settings.server.job_result_ttl_s)
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
