"""A worker process: initialise every model once, then take requests from the queue and answer.

Workers are started with the `spawn` method, so each one is a fresh interpreter: safe for
TensorFlow, which hangs in a process forked after it ran. A worker handles one request (or one
batch) at a time; concurrency comes from running `MaxWorkers` of them, each its own consumer in
the group. It reads every priority lane of its streams and serves the highest first (lanes.py),
so batch rows never keep live requests waiting for more than what the worker already holds.
The parts live beside this loop: the stream protocol (stream.py), crash recovery
(reclaim.py), batching decisions (batching.py), running models (runner.py), and waiting out
Redis (outage.py).

A worker tells its supervisor, on a pipe, how its start went: "initialised" (models loaded),
"ready" (its consumer groups exist, so it can read its streams; with its consumer name), or why
it is about to exit: "failed" (a model's init raised) or "refused" (Redis refuses the
credentials). While serving, it writes each model call on its CallBoard (liveness.py), shared
memory the supervisor reads: the supervisor keeps the worker's requests fresh in Redis while it
lives and stops it when a call runs past its MaxInferSeconds, which no thread of a worker could
do while its model holds the GIL.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import redis
from redis.exceptions import AskError, MovedError, RedisError, ResponseError

from goinfer.cluster_clients import hash_tag
from goinfer.connections import RedisRefused, refusal
from goinfer.dispatcher import metrics
from goinfer.dispatcher.batching import CallTimes, Work, batch_policies, fill, plan, read_size
from goinfer.dispatcher.lanes import lane_ranks
from goinfer.dispatcher.liveness import CallBoard, call_limit_s, infer_limit_s, infer_limits, set_limits
from goinfer.dispatcher.orphans import TierWatch
from goinfer.dispatcher.outage import Backoff, OutageLog, SharedInt, dispatcher_nodes
from goinfer.dispatcher.reclaim import Reclaimer, find_stale
from goinfer.dispatcher.runner import Runner, model_revisions
from goinfer.dispatcher.stream import Done, Pending, RepliesRefused, StreamConsumer
from goinfer.logs import setup_logging
from goinfer.models.base import Model
from goinfer.models.registry import ModelRegistry, instantiate
from goinfer.models.versions import ServedVersion
from goinfer.queue import STAT_DEADLINE_DROPPED, STAT_ORPHANED, queue_tag, streams_for, with_lanes
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
                 client: redis.Redis | None = None, outage: OutageLog | None = None,
                 board: CallBoard | None = None, device: str | None = None,
                 revisions: Mapping[str, str] | None = None) -> None:
        server = settings.server
        self._device = device
        self._server = server
        self.runner = Runner(settings, models, revisions)
        self._policies = batch_policies(server, models)
        streams = streams_for(server.queue_name, [m.queue or None for m in models.values()], [queue_index],
                              with_default=True)
        # Every priority lane of those streams, highest first: live requests, jobs, batch rows.
        # No retry by redis-py: a read (XREADGROUP, XAUTOCLAIM) whose answer a reset cut has
        # taken entries all the same, and a silent retry would take the next ones and leave those
        # pending with this consumer, kept fresh and never served. Failing instead lets the worker
        # take back what it holds (`own`) once Redis answers.
        nodes = client or dispatcher_nodes(server, queue_tag(queue_index), retries=0)
        self.stream = StreamConsumer(nodes, with_lanes(streams), consumer, read_size(self._policies),
                                     server.job_result_ttl_s)
        self._ranks = lane_ranks(streams)
        # Fast models take several waiting requests per read and answer them together (batching.py).
        self._read_size = read_size(self._policies)
        self._calls = CallTimes(list(models), server.take_ahead_ms / 1000)
        self._tiers = TierWatch(self.stream.nodes)
        self._reclaimer = Reclaimer(self.stream, server, lambda job: self.runner.error_reply(job, "DeadLettered"))
        # What this worker runs, for the supervisor, which keeps its entries fresh and stops it
        # when a call runs past its model's limit (liveness.py): no thread here can do either
        # while a model holds the GIL.
        self._board = board or CallBoard.private()
        self._limits = infer_limits(server, models)
        self._default_limit = infer_limit_s(server)
        # Per api path, a limit set on purpose (the model's, or Server.MaxInferSeconds): it binds
        # jobs too; without one, a job may run until its own deadline (JobTimeout).
        self._own_limits = set_limits(server, models)
        self._stream_index = {name: index for index, name in enumerate(self.stream.streams)}
        self._outage = outage or OutageLog(server, 0, f"worker {consumer}")
        self._backoff = Backoff()
        self._groups_ready = False
        self._redirected = False
        # Replies whose send failed on a Redis error, which may or may not have stored them: sent
        # again once Redis answers, for the entries still pending with us, instead of running
        # their requests again.
        self._unsent: list[Done] = []
        # Overlap: while a worker holds requests read ahead, the round trip that answers the last
        # ones (and reads the next) runs in this thread as the models run the held ones, instead
        # of between calls. One send at a time: every other use of the stream settles it first.
        self._sender = ThreadPoolExecutor(1, thread_name_prefix="goinfer-send")
        self._in_flight: Future[list[Pending]] | None = None
        self._ahead: list[Pending] = []  # what the settled send's read took, not yet served
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
        log.info("worker %s reading %s%s%s", self.stream.consumer, ", ".join(self.streams),
                 f" on device {self._device}" if self._device is not None else "",
                 f"; batching {batching}" if batching else "")
        pending: list[Pending] = []
        # What Redis has delivered to this consumer but the worker does not hold: at start, what the
        # slot's previous incarnation had taken; after a Redis error, entries of a read whose answer
        # was lost. The supervisor keeps a live worker's entries fresh, so no other worker would
        # ever claim them: this worker takes them back itself, once it holds nothing else.
        recover_own = True
        while pending or self._unsent or self._in_flight is not None or self._ahead or not self.stopping:
            try:
                if not self._groups_ready:
                    self.stream.ensure_groups()
                    self._groups_ready = True
                if self._unsent:
                    self._send_again()
                if not pending:
                    pending = self._held()
                if recover_own and not pending:
                    pending, recover_own = self._reclaimer.own(), False
                if not self.stopping:
                    # Entries of dead or hung workers, every RECLAIM_INTERVAL_S, backlog or not.
                    # Told to stop: nothing new is taken. What the last read brought (it may have
                    # been under way when the stop came) is in `pending`, and served first.
                    pending = pending + self._reclaimer.due()
                    if not pending:
                        pending = self.stream.read()
                if pending:
                    # Handed over: if serving them fails on Redis, what was answered is in
                    # _unsent and the rest is still pending with us (recovered by `own`), so
                    # nothing is run twice for a lost connection.
                    taken, pending = pending, []
                    pending = self._serve(taken)
                self._healthy()
            except (RedisError, OSError) as exc:
                self._abandon_in_flight()
                if self.stopping:
                    # Waiting Redis out is not for a worker told to stop: what it holds stays
                    # pending in Redis and runs again after the restart (or on another worker).
                    log.warning("stopping while redis fails (%s); %d taken and %d answered request(s) stay "
                                "pending and run again", exc, len(pending), len(self._unsent))
                    return
                if isinstance(exc, ResponseError) and "NOGROUP" in str(exc) and not refusal(exc, self._server):
                    log.warning("consumer group missing (Redis emptied?); creating it again")
                    self._groups_ready = False
                elif isinstance(exc, AskError) and not self._redirected:
                    # Redis Cluster: the queue's slot has moved (MOVED) or is moving (ASK); follow
                    # it at once, and on the back-off only if it keeps answering so.
                    log.info("%s %s %s:%s; following it", hash_tag(self.streams[0]),
                             "is served by" if isinstance(exc, MovedError) else "is moving to", exc.host, exc.port)
                    self._redirected = True
                    self.stream.lost(exc)
                else:
                    self._wait_out(exc)
                recover_own = True

    def _serve(self, pending: list[Pending]) -> list[Pending]:
        """Run what was taken and answer it; returns what to serve next, read in the round trip
        that answers these, or, when a read ahead brought some, with that round trip still in
        flight (the overlap)."""
        pending = fill(pending, lambda n: self.stream.read(n, block_ms=None), _api, self._policies,
                       self.stream.read_count)
        done = self._process(pending)
        try:
            self._settle()
        except (RedisError, OSError):
            self._unsent.extend(done)  # answered: sent again, not run again
            raise
        ahead, self._ahead = self._ahead, []
        if ahead and not self.stopping:
            # The overlap: answer these (and read on, if the models are quick) while `ahead` runs.
            self._in_flight = self._sender.submit(self._send_unsettled, done, self._calls.quick(), False)
            return ahead
        # Here `ahead` is only ever non-empty when stopping: then nothing is read.
        following = self._finish(done, read_next=not self.stopping)
        if following and not self.stream.drained and self._calls.quick():
            # More waits and no worker is idle: read the next ones while these run, so that from
            # now on each round trip overlaps the calls.
            self._in_flight = self._sender.submit(self._send_unsettled, [], True, False)
        return ahead + following

    def _held(self) -> list[Pending]:
        """What the send in flight read (waiting for it), or what an earlier one read."""
        self._settle()
        ahead, self._ahead = self._ahead, []
        return ahead

    def _settle(self) -> None:
        """Wait for the send in flight; what its read took joins `_ahead`. Raises its Redis error
        (its answers are in _unsent by then); replies Redis refused at maxmemory are held here."""
        if self._in_flight is None:
            return
        future, self._in_flight = self._in_flight, None
        try:
            self._ahead += future.result()
        except RepliesRefused as refused:
            if self._hold(refused):
                self._ahead += refused.following

    def _abandon_in_flight(self) -> None:
        """After a Redis error: wait for the send in flight and forget what it read (still pending
        with this consumer: `own` takes it back); its answers, if not stored, are in _unsent."""
        future, self._in_flight, self._ahead = self._in_flight, None, []
        if future is None:
            return
        try:
            future.result()
        except RepliesRefused as refused:
            self._unsent.extend(refused.done)
        except (RedisError, OSError):
            pass

    def _process(self, pending: list[Pending]) -> list[Done]:
        """Run the jobs, sending each reply as soon as it is ready; the last ones are returned."""
        unsent: list[Done] = []
        runnable, expired = [], []
        for item in pending:
            if item.job is None:  # unreadable: acknowledged, never answered (nobody to answer)
                unsent.append((item, None))
            elif item.job.expired():
                expired.append(item)
            else:
                runnable.append(item)
        gone = self._tiers.gone({item.job.alive_key for item in runnable if item.job and item.job.alive_key})
        orphaned = [item for item in runnable if item.job and item.job.alive_key in gone]
        runnable = [item for item in runnable if not (item.job and item.job.alive_key in gone)]
        self._skip(expired, STAT_DEADLINE_DROPPED, metrics.DEADLINE_DROPPED,
                   "their clients were already answered with QueueTimeout")
        self._skip(orphaned, STAT_ORPHANED, metrics.ORPHANED,
                   f"the HTTP process waiting for them is gone ({', '.join(sorted(gone))} expired)")
        unsent += [(item, None) for item in expired + orphaned]
        refused = False
        held_since: float | None = None  # when the oldest reply waiting in `unsent` was ready
        # Highest lane first: live requests taken together with batch rows (one blocking read
        # can return both) are answered before the rows run.
        for work in self._plan(runnable):
            # Each reply goes out as soon as it is ready, unless the next call is expected to end
            # soon enough for both to go in one round trip (take-ahead of a fast model).
            held_s = 0.0 if held_since is None else time.monotonic() - held_since
            if unsent and not refused and not self._calls.may_hold(work.api, held_s):
                try:
                    self._send(unsent)
                    unsent, held_since = [], None
                except RepliesRefused:  # at maxmemory they wait for the batch's last send
                    refused = True
            try:
                unsent += zip(work.items, self._run(work), strict=True)
            except (RedisError, OSError):
                self._unsent.extend(unsent)  # answers held for one round trip: sent again, not run again
                raise
            if held_since is None:
                held_since = time.monotonic()
        # The next read takes ahead as much as the models' recent calls allow.
        self.stream.read_count = max(self._read_size, self._calls.take())
        return unsent

    def _plan(self, runnable: list[Pending]) -> list[Work[Pending]]:
        """The model calls for `runnable`, lane by lane from the highest (each lane as `plan` orders it)."""
        ranks = sorted({self._ranks.get(item.stream, 0) for item in runnable})
        return [work for rank in ranks
                for work in plan([item for item in runnable if self._ranks.get(item.stream, 0) == rank], _api,
                                 self._policies)]

    def _skip(self, items: list[Pending], stat: str, counter: Any, why: str) -> None:
        """Acknowledge unrun (with the next send) and count requests nobody waits for; one log line."""
        if not items:
            return
        for item in items:
            self.stream.count(item.stream, stat)
            counter.labels(item.stream).inc()
        ids = ", ".join(item.job.id for item in items[:3] if item.job) + (", ..." if len(items) > 3 else "")
        log.warning("skipping %d request(s) unrun: %s (%s)", len(items), why, ids)

    def _finish(self, done: list[Done], read_next: bool = False) -> list[Pending]:
        """Send the replies and acknowledge their entries; Redis at maxmemory is waited out."""
        try:
            return self._send(done, read_next=read_next)
        except RepliesRefused as refused:
            return refused.following if self._hold(refused) else []

    def _send(self, done: list[Done], read_next: bool = False) -> list[Pending]:
        """stream.finish, keeping `done` in _unsent when a Redis error leaves unknown whether it
        was stored (a connection lost after writing). RepliesRefused stored nothing: the caller
        holds those."""
        try:
            self._settle()
        except (RedisError, OSError):
            self._unsent.extend(done)
            raise
        return self._send_unsettled(done, read_next)

    def _send_unsettled(self, done: list[Done], read_next: bool = False, block: bool = True) -> list[Pending]:
        """stream.finish, with nothing else in flight (the sender thread's job, or `_send`'s)."""
        try:
            return self.stream.finish(done, read_next=read_next, block=block)
        except RepliesRefused:
            raise
        except (RedisError, OSError):
            self._unsent.extend(done)
            raise

    def _send_again(self) -> None:
        """Send the replies of _unsent whose entries are still pending with this consumer; the
        others were stored and acknowledged before the connection failed (or were claimed by
        another worker after a long outage, which answers them)."""
        self._settle()
        still = {(stale.stream, stale.entry_id) for stale in
                 find_stale(self.stream.client, self.stream.streams, 0, self.stream.consumer)}
        unsent, self._unsent = self._unsent, []
        again = [(item, reply) for item, reply in unsent if (item.stream, item.entry_id) in still]
        if again:
            log.info("sending again %d answer(s) whose first send failed", len(again))
            self._send(again)

    def _hold(self, refused: RepliesRefused) -> bool:
        """Redis at maxmemory refused the replies: keep them and send them once it takes them
        again, on the outage back-off, one line per step; True once sent.

        Their entries stay pending with this worker, kept fresh by the supervisor, so nobody runs
        them again meanwhile. A stop gives up (False): they stay pending and run again later.
        """
        error: RedisError | OSError = refused
        while not self.stopping:
            self._wait_out(error)
            try:
                self.stream.finish(refused.done)
            except (RedisError, OSError) as exc:  # still full, or away: keep waiting
                error = exc
            else:
                self._healthy()
                return True
        log.warning("stopping with %d replies Redis has not taken; their requests run again after the restart",
                    sum(reply is not None for _, reply in refused.done))
        return False

    def _run(self, work: Work[Pending]) -> list[str]:
        self.stream.start_jobs(work.items)
        queued = [_queued_ms(item) for item in work.items]
        jobs = [item.job for item in work.items if item.job is not None]
        self._board.begin([(self._stream_index.get(item.stream, -1), item.entry_id) for item in work.items],
                          call_limit_s(self._limits.get(work.api, self._default_limit), self._own_limits.get(work.api),
                                       jobs, time.time()))
        started = time.perf_counter()
        try:
            if work.batched:
                return self.runner.execute_batch(self.runner.models[work.api], jobs, queued)
            return [self.runner.execute(jobs[0], queued[0])]
        finally:
            self._board.end()
            self._calls.observe(work.api, time.perf_counter() - started)

    def _wait_out(self, exc: BaseException) -> None:
        """One back-off step of a Redis outage; a refusal ends the worker instead."""
        refused = refusal(exc, self._server)
        if refused is not None:
            raise refused from None
        self.stream.lost(exc)  # READONLY after a failover, or on a cluster the queue's primary moved
        self._tiers.outage()
        delay = self._backoff.step()
        self._outage.failed(exc, delay)
        deadline = time.monotonic() + delay
        while not self.stopping and time.monotonic() < deadline:
            time.sleep(min(_PAUSE_SLICE_S, max(0.0, deadline - time.monotonic())))

    def _healthy(self) -> None:
        self._backoff.reset()
        self._outage.recovered()
        self._redirected = False


def _api(item: Pending) -> str:
    return item.job.api if item.job is not None else ""


def _queued_ms(item: Pending) -> float:
    """The entry's wait, also observed for /metrics."""
    queued = item.queued_ms()
    metrics.series(metrics.QUEUE_WAIT_SECONDS, item.stream).observe(queued / 1000)
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
                        status: Connection, reporter: SharedInt | None = None,
                        board: CallBoard | None = None, versions: Mapping[str, ServedVersion] | None = None,
                        device: str | None = None) -> None:
    """Entry point of a spawned worker: init and warm up the models (on the version folders the
    supervisor chose; on `device`, already set in its environment), wait for Redis, report to the
    supervisor, serve."""
    setup_logging()
    # Ctrl-C reaches the supervisor, which stops us; the supervisor starts us with SIGINT already
    # ignored (goinfer.processes.start_child), this covers a worker started some other way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGHUP asks the supervisor for a reload; a hangup of the terminal must not kill the workers.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        registry = ModelRegistry()
        registry.extend_from_paths(model_paths)
        models = instantiate(registry.classes, settings, versions)
        for model in models.values():
            model.init()
        for model in models.values():
            model.warmup()
    except BaseException as exc:
        log.exception("worker %d: model initialisation failed", worker_index)
        _tell(status, ("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(EXIT_INIT_FAILED) from None
    revisions = model_revisions(models)
    _tell(status, ("initialised", {"revisions": revisions}))

    outage = OutageLog(settings.server, worker_index, f"worker {worker_index}", reporter)
    worker = Worker(settings, queue_index, models, consumer_name(worker_index), outage=outage, board=board,
                    device=device, revisions=revisions)

    def stop(signum: int, frame: object) -> None:
        worker.stopping = True

    signal.signal(signal.SIGTERM, stop)
    try:
        if worker.connect():
            # The supervisor imports no model, so the worker tells it what it serves (for its heartbeat).
            _tell(status, ("ready", {"pid": os.getpid(), "streams": worker.streams, "apis": sorted(models),
                                     "consumer": worker.stream.consumer, "revisions": revisions}))
            worker.run()
    except RedisRefused as exc:
        _tell(status, ("refused", str(exc)))
        raise SystemExit(EXIT_REDIS_REFUSED) from None
    log.info("worker %d stopped", worker_index)
