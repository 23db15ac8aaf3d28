"""A dispatcher's Prometheus metrics: what its workers measure and what its supervisor knows.

Workers are separate processes, so their series use prometheus_client's multiprocess mode: the
supervisor gives its workers a private PROMETHEUS_MULTIPROC_DIR (only when Server.MetricsPort
is set), each worker writes its counters and histograms to files there, and the supervisor's
/metrics sums them, the series of dead workers included, so counters never go back. The
supervisor's own numbers (restarts, live workers) are read from it at scrape time by a
collector, independent of that mode. Served by prometheus_client's thread-based HTTP server on
MetricsPort + N for `goinfer server N`, so the dispatchers of one machine do not collide.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from goinfer.queue import DispatcherHeartbeat, revision_version

log = logging.getLogger("goinfer.dispatcher")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds; inference ranges from sub-millisecond toys to multi-second models.
TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, float("inf"))

# Created in every process that imports this module, registered nowhere: in a worker under
# multiprocess mode their values land in the supervisor's directory; elsewhere they are inert.
INFER_SECONDS = Histogram("goinfer_dispatcher_infer_seconds", "Time spent in a model's infer or infer_batch call "
                          "(a batch counts once per request it answered).", ["api_path"],
                          buckets=TIME_BUCKETS, registry=None)
QUEUE_WAIT_SECONDS = Histogram("goinfer_dispatcher_queue_wait_seconds", "Time from a request's XADD until "
                               "a worker started it.", ["queue"], buckets=TIME_BUCKETS, registry=None)
DEAD_LETTERED = Counter("goinfer_dispatcher_dead_lettered", "Requests set aside on <queue>:dead after killing "
                        "MaxDeliveries workers.", ["queue"], registry=None)
DEADLINE_DROPPED = Counter("goinfer_dispatcher_deadline_dropped", "Requests dropped unrun because their client "
                           "had already been answered with QueueTimeout.", ["queue"], registry=None)
ORPHANED = Counter("goinfer_dispatcher_orphaned", "Requests skipped unrun because the HTTP process waiting "
                   "for them is gone.", ["queue"], registry=None)

_SERIES: dict[tuple[int, str], Any] = {}


class _Unread:
    """A series in a process whose metrics nobody reads (no Server.MetricsPort, so no
    PROMETHEUS_MULTIPROC_DIR): each observation would take a lock per request for nothing, ~5 %
    of an echo worker's CPU."""

    def observe(self, amount: float) -> None:
        pass

    def inc(self, amount: float = 1) -> None:
        pass


_UNREAD = _Unread()


def series(metric: Histogram | Counter, label: str) -> Any:
    """`metric.labels(label)`, looked up once per process: labels() validates and locks on every
    call (~1.5 us), and workers observe per request."""
    key = (id(metric), label)
    child = _SERIES.get(key)
    if child is None:
        child = _SERIES[key] = metric.labels(label) if os.environ.get(MULTIPROC_ENV) else _UNREAD
    return child


class SupervisorCollector:
    """The supervisor's own numbers, read when Prometheus scrapes."""

    def __init__(self, read: Callable[[], DispatcherHeartbeat],
                 reload_failures: Callable[[], int] | None = None) -> None:
        self._read = read
        self._reload_failures = reload_failures

    def collect(self) -> Iterable[Metric]:
        state = self._read()
        labels = {"queue_index": str(state.queue_index)}
        restarts = CounterMetricFamily("goinfer_dispatcher_worker_restarts", "Workers that died and were restarted.",
                                       labels=list(labels))
        restarts.add_metric(list(labels.values()), state.restarts)
        live = GaugeMetricFamily("goinfer_dispatcher_live_workers", "Workers running with their models initialised.",
                                 labels=list(labels))
        live.add_metric(list(labels.values()), state.live_workers)
        configured = GaugeMetricFamily("goinfer_dispatcher_max_workers", "Server.MaxWorkers.", labels=list(labels))
        configured.add_metric(list(labels.values()), state.max_workers)
        families: list[Metric] = [restarts, live, configured]
        if self._reload_failures is not None:
            failures = CounterMetricFamily("goinfer_dispatcher_reload_failures", "New versions or reloads refused "
                                           "because a new worker could not load them.", labels=list(labels))
            failures.add_metric(list(labels.values()), self._reload_failures())
            families.append(failures)
        served = GaugeMetricFamily("goinfer_dispatcher_model_version", "The version new workers serve, per model "
                                   "(only models with version folders); labelled with the full revision.",
                                   labels=[*labels, "api_path", "revision"])
        for api, revision in sorted(state.revisions.items()):
            number = revision_version(revision)
            if number is not None and number.isdigit():
                served.add_metric([*labels.values(), api, revision], int(number))
        families.append(served)
        if state.devices:
            device = GaugeMetricFamily("goinfer_dispatcher_worker_device", "The device each worker place runs on "
                                       "(Server.Devices); always 1.", labels=[*labels, "slot", "device"])
            for slot, name in enumerate(state.devices):
                device.add_metric([*labels.values(), str(slot), name], 1)
            families.append(device)
        return families


class MetricsServer:
    """The supervisor's /metrics: its collector plus the workers' multiprocess files."""

    def __init__(self, addr: str, port: int, read_state: Callable[[], DispatcherHeartbeat],
                 reload_failures: Callable[[], int] | None = None) -> None:
        self._addr = addr
        self._port = port
        self._read_state = read_state
        self._reload_failures = reload_failures
        self._folder: str | None = None
        self._server: Any = None

    def prepare_workers(self) -> None:
        """Give workers spawned from now on a private directory for their metric files."""
        self._folder = tempfile.mkdtemp(prefix="goinfer-dispatcher-metrics-")
        os.environ[MULTIPROC_ENV] = self._folder

    def start(self) -> None:
        """Listen; a port already taken is logged and the dispatcher serves on without metrics."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(SupervisorCollector(self._read_state, self._reload_failures))
        if self._folder is not None:
            MultiProcessCollector(registry, path=self._folder)
        try:
            self._server, _thread = start_http_server(self._port, self._addr, registry=registry)
        except (OSError, OverflowError) as exc:
            log.warning("dispatcher metrics cannot listen on %s:%d (%s); serving without them",
                        self._addr, self._port, getattr(exc, "strerror", None) or exc)
            return
        log.info("dispatcher metrics on http://%s:%d/metrics", self._addr, self._port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._folder is not None:
            if os.environ.get(MULTIPROC_ENV) == self._folder:
                del os.environ[MULTIPROC_ENV]
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
