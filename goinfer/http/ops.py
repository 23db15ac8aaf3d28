"""The HTTP tier's operations endpoints: /health, /ready, /metrics and /goinfer/status (GET).

For load balancers, Kubernetes probes, Prometheus and people. They use their own Redis client
with short timeouts, so a slow probe never queues behind requests, and they are neither counted
in the request metrics nor written to the access log. A model whose api_path is one of these
paths keeps it: the endpoint is then not served (logged at start).

Readiness tells a queue whose dispatcher is still loading its models (/ready adds
`loading_queues` and a `waiting_for` line per queue not served yet, e.g. "queue 0: loading,
1/2 workers ready, 6.1 s") from one with no dispatcher at all ("queue 1: no dispatcher"); it
stays 503 until every queue is served.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any

import redis.asyncio
import redis.asyncio.cluster
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisClusterException, RedisError

from goinfer import __version__
from goinfer.connections import async_client
from goinfer.http.cluster import AnyRedis, ClusterSnapshot, read_cluster, read_dispatchers
from goinfer.http.metrics import HttpMetrics, multiprocess_mode
from goinfer.http.readiness import dispatcher_summary, dispatcher_versions, waiting_for
from goinfer.http.result_cache import ResultCache
from goinfer.models.base import Model
from goinfer.models.registry import import_path_of
from goinfer.queue import DispatcherHeartbeat, served_streams, streams_for, with_lanes
from goinfer.settings import Settings

log = logging.getLogger("goinfer.http")

HEALTH_PATH = "/health"
READY_PATH = "/ready"
METRICS_PATH = "/metrics"
STATUS_PATH = "/goinfer/status"

PROBE_TIMEOUT_S = 1.0  # a readiness probe that waits longer than this on Redis says "not ready"
SCRAPE_TIMEOUT_S = 3.0
IN_FLIGHT_REFRESH_S = 1.0
# What a Redis call can raise when Redis or the connection fails, uvloop's RuntimeError for a
# write on a transport a reset has closed included: a probe says "not ready", never a 500. On a
# Redis Cluster, redis-py's cluster client raises RedisClusterException when no node answers.
_REDIS_FAILURES = (RedisError, OSError, asyncio.TimeoutError, RuntimeError, RedisClusterException)


class OpsEndpoints:
    """The handlers, with what they read: the tier's state, its queue client, Redis."""

    def __init__(self, settings: Settings, models: Mapping[str, Model], metrics: HttpMetrics,
                 in_flight: Callable[[], int], draining: Callable[[], bool],
                 redis_reachable: Callable[[], bool] | None = None, cache: ResultCache | None = None) -> None:
        """`redis_reachable`: whether the tier's own connections reach Redis (the queue client's
        health), which a PING on the probe's connection alone cannot tell: after a virtual IP
        moved, a fresh connection answers while the tier's are dead."""
        self._settings = settings
        self._paths = sorted(models)
        server = settings.server
        # Every stream this tier sends to: each routed model's queue (or QueueName) + N.
        queues = [model.queue for model in models.values()]
        self._streams = streams_for(server.queue_name, queues, range(server.request_queue_amount))
        self._streams_of = {index: streams_for(server.queue_name, queues, [index])
                            for index in range(server.request_queue_amount)}
        self._targets = {import_path_of(type(model)) for model in models.values()}
        self._cache = cache
        self._metrics = metrics
        self._in_flight = in_flight
        self._draining = draining
        self._redis_reachable = redis_reachable or (lambda: True)
        self._redis: AnyRedis | None = None
        self._refresher: asyncio.Task[None] | None = None

    def add_routes(self, app: web.Application, taken: Mapping[str, Model]) -> None:
        """Register the GET routes that no model's api_path claims; call before the catch-all."""
        for path, handler in ((HEALTH_PATH, self.health), (READY_PATH, self.ready),
                              (METRICS_PATH, self.metrics), (STATUS_PATH, self.status)):
            if path in taken:
                log.warning("%s is the api_path of model %s: the operations endpoint %s is not served",
                            path, type(taken[path]).__name__, path)
                continue
            app.router.add_get(path, handler)

    async def lifecycle(self, app: web.Application):
        """aiohttp cleanup context: the Redis client, and in multiprocess mode the in-flight refresher."""
        self._redis = async_client(self._settings.server)
        if multiprocess_mode():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_in_flight())
        yield
        if self._refresher is not None:
            self._refresher.cancel()
        await self._redis.aclose()

    async def health(self, request: web.Request) -> web.Response:
        """Liveness: the process answers (also while draining: it is alive, finishing its work)."""
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        """Readiness: Redis answers, on the tier's own connections too, and every queue this
        tier sends to has a live dispatcher."""
        if self._draining():
            return web.json_response({"ready": False, "draining": True}, status=503)
        not_ready = web.json_response({"ready": False, "redis": False, "missing_queues": self._streams}, status=503)
        if not self._redis_reachable():
            return not_ready
        try:
            assert self._redis is not None
            await asyncio.wait_for(_ping(self._redis), PROBE_TIMEOUT_S)
            dispatchers = await asyncio.wait_for(read_dispatchers(self._redis), PROBE_TIMEOUT_S)
        except _REDIS_FAILURES:
            return not_ready
        served = served_streams(dispatchers)
        missing = [stream for stream in self._streams if stream not in served]
        body: dict[str, Any] = {"ready": not missing, "redis": True, "missing_queues": missing}
        body.update(self._loading(dispatchers, missing))
        return web.json_response(body, status=503 if missing else 200)

    def _loading(self, dispatchers: list[DispatcherHeartbeat], missing: list[str]) -> dict[str, Any]:
        """`loading_queues` and `waiting_for`, when a dispatcher of a missing queue is loading."""
        waiting = waiting_for(dispatchers, self._streams_of, set(missing), self._targets)
        loading = [stream for index, line in waiting for stream in self._streams_of[index]
                   if stream in missing and line.loading]
        if not loading:
            return {}
        return {"loading_queues": loading, "waiting_for": [line.text for _, line in waiting]}

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus text format: request metrics and, read from Redis now, the cluster's."""
        body = self._metrics.render(self._in_flight(), await self._cluster())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request: web.Request) -> web.Response:
        """Dispatchers, their workers and models, queue depths: for people, as JSON. No secret."""
        cluster = await self._cluster()
        body: dict[str, Any] = {
            "version": __version__,
            "http": {"host": socket.gethostname(), "pid": os.getpid(), "draining": self._draining(),
                     "in_flight": self._in_flight(), "api_paths": self._paths, "queues": self._streams},
            "redis": cluster is not None,
        }
        if self._cache:
            body["result_cache"] = {
                api: {"revision": self._cache.revisions.current(api), "memory_entries": model.entries}
                for api, model in self._cache.models.items()}
        if cluster is not None:
            body.update(cluster.as_json())
            for beat, shown in zip(cluster.dispatchers, body["dispatchers"], strict=True):
                shown["summary"] = dispatcher_summary(beat)
                shown["served_versions"] = dispatcher_versions(beat)
            served = served_streams(cluster.dispatchers)
            missing = [stream for stream in self._streams if stream not in served]
            body["missing_queues"] = missing
            body["waiting_for"] = [line.text for _, line in
                                   waiting_for(cluster.dispatchers, self._streams_of, set(missing), self._targets)]
        return web.json_response(body)

    async def _cluster(self) -> ClusterSnapshot | None:
        try:
            assert self._redis is not None
            # every lane's depth: a batch backlog on :low is what an operator looks for
            return await asyncio.wait_for(read_cluster(self._redis, with_lanes(self._streams), self._targets),
                                          SCRAPE_TIMEOUT_S)
        except _REDIS_FAILURES:
            return None

    async def _refresh_in_flight(self) -> None:
        # Sibling processes render this process's in-flight gauge from its file: keep it current.
        while True:
            self._metrics.in_flight.set(self._in_flight())
            await asyncio.sleep(IN_FLIGHT_REFRESH_S)


async def _ping(client: AnyRedis) -> None:
    """PING Redis; on a Redis Cluster every primary, since the tier sends to every queue."""
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        await client.ping(target_nodes=redis.asyncio.cluster.RedisCluster.PRIMARIES)
    else:
        await client.ping()
