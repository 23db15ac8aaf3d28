"""The HTTP tier's Prometheus metrics: what each request costs, and the cluster at scrape time.

Per request: one counter and up to three histogram observations on children cached by label,
a few microseconds. Everything read from Redis (queue depths, dispatchers, cluster-wide
counters) is read when Prometheus scrapes, never on a request's path.

`goinfer http --workers N` runs N processes behind one port, so a scrape reaches any one of
them: those processes use prometheus_client's multiprocess mode (the parent gives them a
private PROMETHEUS_MULTIPROC_DIR) and every process's /metrics shows the sum of all of them.
A single process keeps its metrics in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector

from goinfer.http.cluster import ClusterSnapshot
from goinfer.queue import Reply

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Requests to paths no model serves share one label value: a path must not become a series.
UNROUTED = "unrouted"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   float("inf"))


def multiprocess_mode() -> bool:
    """Whether this process writes its metrics to files shared with its sibling processes."""
    return bool(os.environ.get(MULTIPROC_ENV))


class HttpMetrics:
    """One HTTP process's request metrics, and the /metrics page built from them."""

    def __init__(self) -> None:
        self.requests = Counter("goinfer_http_requests", "Requests answered, by model path and envelope code.",
                                ["api_path", "code"], registry=None)
        self.latency = Histogram("goinfer_http_request_duration_seconds",
                                 "End-to-end time in the HTTP tier: body read to answer.", ["api_path"],
                                 buckets=LATENCY_BUCKETS, registry=None)
        self.queue_wait = Histogram("goinfer_http_queue_wait_seconds", "Time requests waited in the queue before "
                                    "a worker started them (reported by the worker).", ["api_path"],
                                    buckets=LATENCY_BUCKETS, registry=None)
        self.infer = Histogram("goinfer_http_infer_seconds", "Time spent in the model's infer (reported by the "
                               "worker).", ["api_path"], buckets=LATENCY_BUCKETS, registry=None)
        self.in_flight = Gauge("goinfer_http_in_flight_requests", "Requests queued and waiting for their answer.",
                               registry=None, multiprocess_mode="livesum")
        # The result cache (result_cache.py): per model path, level (memory, redis) and result
        # (hit; miss; error: a redis read that failed or was too slow, a miss too).
        self.cache_requests = Counter("goinfer_result_cache_requests", "Result cache lookups, by model path, "
                                      "level and result.", ["api", "level", "result"], registry=None)
        self._counted: dict[tuple[str, int], Callable[[], None]] = {}
        self._timed: dict[str, tuple[Histogram, Histogram, Histogram]] = {}

    def observe(self, api_path: str, code: int, seconds: float | None, reply: Reply | None = None) -> None:
        """Count one answered request; `seconds` None for requests that reached no model."""
        counted = self._counted.get((api_path, code))
        if counted is None:
            counted = self._counted[(api_path, code)] = self.requests.labels(api_path, str(code)).inc
        counted()
        if seconds is None:
            return
        timed = self._timed.get(api_path)
        if timed is None:
            timed = self._timed[api_path] = (self.latency.labels(api_path), self.queue_wait.labels(api_path),
                                             self.infer.labels(api_path))
        timed[0].observe(seconds)
        if reply is not None:
            if reply.queued_ms is not None:
                timed[1].observe(reply.queued_ms / 1000)
            if reply.infer_ms is not None:
                timed[2].observe(reply.infer_ms / 1000)

    def render(self, in_flight: int, cluster: ClusterSnapshot | None) -> bytes:
        """The text exposition: this process's (or all processes') series plus the cluster's."""
        self.in_flight.set(in_flight)
        registry = CollectorRegistry(auto_describe=False)
        if multiprocess_mode():
            MultiProcessCollector(registry)
        else:
            for metric in (self.requests, self.latency, self.queue_wait, self.infer, self.in_flight,
                           self.cache_requests):
                registry.register(metric)
        registry.register(_Snapshot(cluster))
        return generate_latest(registry)


class _Snapshot:
    """The cluster as read from Redis just before rendering; `None` when Redis did not answer."""

    def __init__(self, cluster: ClusterSnapshot | None) -> None:
        self._cluster = cluster

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("goinfer_redis_up", "1 when Redis answered this scrape.")
        up.add_metric([], 0 if self._cluster is None else 1)
        yield up
        if self._cluster is None:
            return
        queue = ["queue"]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "length": GaugeMetricFamily("goinfer_queue_length", "Entries in the stream (XLEN): waiting or running.",
                                        labels=queue),
            "pending": GaugeMetricFamily("goinfer_queue_pending", "Entries taken by a worker and not yet answered "
                                         "(XPENDING).", labels=queue),
            "dead_letter_length": GaugeMetricFamily("goinfer_queue_dead_letter_length",
                                                    "Entries kept on <queue>:dead.", labels=queue),
            "dispatchers": GaugeMetricFamily("goinfer_queue_dispatchers", "Live dispatchers reading the queue "
                                             "(from their heartbeats).", labels=queue),
            "dead_lettered": CounterMetricFamily("goinfer_queue_dead_lettered", "Requests dead-lettered, "
                                                 "cluster-wide.", labels=queue),
            "deadline_dropped": CounterMetricFamily("goinfer_queue_deadline_dropped", "Requests dropped unrun after "
                                                    "their deadline, cluster-wide.", labels=queue),
        }
        for stats in self._cluster.queues:
            for name, family in families.items():
                family.add_metric([stats.name], getattr(stats, name))
        yield from families.values()
        labels = ["dispatcher", "queue_index"]
        restarts = CounterMetricFamily("goinfer_cluster_worker_restarts", "Worker restarts of each live "
                                       "dispatcher (from its heartbeat).", labels=labels)
        live = GaugeMetricFamily("goinfer_cluster_live_workers", "Live workers of each live dispatcher (from "
                                 "its heartbeat).", labels=labels)
        for beat in self._cluster.dispatchers:
            values = [beat.name, str(beat.queue_index)]
            restarts.add_metric(values, beat.restarts)
            live.add_metric(values, beat.live_workers)
        yield restarts
        yield live
