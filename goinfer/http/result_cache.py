"""The result cache: a model's answers kept by what computed them, so a repeated request skips the queue.

Opt-in per model (`Cache:` of its `Models:` entry), in two levels:
- memory: an LRU of `Size` answers in each HTTP process (no round trip at all);
- redis: one string per answer (`queue.result_cache_key`) that expires after `TTLS`, shared by
  every tier of the queue, so a tier that starts (or another process of `--workers`) finds the
  answers the others got. Memory entries expire after `TTLS` too, when it is set.

Answers are keyed by the model's revision (version number and code digest): a lookup uses the
revision the dispatchers serve now (revisions.py), a store the revision its answer carries, so
a new version or new code is never answered from another's answers. Keys also carry the model's
queue name: only tiers of one queue, which share its dispatchers and model, share answers.
Only code-0 answers are kept. Redis trouble is a miss, never a failed request: a read waits at
most READ_TIMEOUT_S, and writes go out in the background, pipelined per event-loop tick, so
storing never delays an answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import redis.asyncio

from goinfer.connections import async_client
from goinfer.http.cluster import AnyRedis
from goinfer.http.metrics import HttpMetrics
from goinfer.http.revisions import RevisionFollower
from goinfer.models.base import Model
from goinfer.queue import result_cache_key
from goinfer.settings import CacheSettings, ModelConfig, Settings

log = logging.getLogger("goinfer.http")

MEMORY = "memory"
REDIS = "redis"
READ_TIMEOUT_S = 0.1  # a shared-level read slower than this is a miss: the queue is the fallback
WRITE_TIMEOUT_S = 2.0
MAX_PENDING_WRITES = 10_000  # beyond this (Redis very slow), new answers are simply not shared


class CacheHit(NamedTuple):
    data: dict[str, Any]
    revision: str
    level: str  # MEMORY or REDIS


class _Memory:
    """An LRU of answers of one model: (revision, digest) -> (expiry on the monotonic clock, data)."""

    def __init__(self, size: int, ttl_s: float) -> None:
        self._size = size
        self._ttl_s = ttl_s
        self._entries: OrderedDict[tuple[str, str], tuple[float, dict[str, Any]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, revision: str, digest: str) -> dict[str, Any] | None:
        key = (revision, digest)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, revision: str, digest: str, data: dict[str, Any], ttl_s: float | None = None) -> None:
        ttl = self._ttl_s if ttl_s is None else ttl_s
        expires = time.monotonic() + ttl if ttl > 0 else float("inf")
        key = (revision, digest)
        self._entries[key] = (expires, data)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class _SharedWrites:
    """SETs of the shared level, sent in the background: one pipeline per event-loop tick."""

    def __init__(self, client: AnyRedis, trouble: Callable[[BaseException], None]) -> None:
        self._client = client
        self._trouble = trouble
        self._pending: list[tuple[str, str, int]] = []
        self._flushing: asyncio.Task[None] | None = None

    def add(self, key: str, value: str, ttl_s: float) -> None:
        if len(self._pending) >= MAX_PENDING_WRITES:
            return
        self._pending.append((key, value, max(1, round(ttl_s))))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let this tick's other answers join the pipeline
        while self._pending:
            batch, self._pending = self._pending, []
            pipe = self._client.pipeline(transaction=False) if isinstance(self._client, redis.asyncio.Redis) \
                else self._client.pipeline()
            for key, value, ttl in batch:
                pipe.set(key, value, ex=ttl)
            try:
                await asyncio.wait_for(pipe.execute(raise_on_error=False), WRITE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - not shared this time; the answer was already sent
                self._trouble(exc)

    async def close(self) -> None:
        if self._flushing is not None and not self._flushing.done():
            try:
                await asyncio.wait_for(self._flushing, WRITE_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - stopping: what was not written is not shared
                self._flushing.cancel()


class ModelCache:
    """The cache of one model's answers in this HTTP process; `lookup` and `store` never raise."""

    def __init__(self, api: str, namespace: str, cache: CacheSettings, tier: ResultCache) -> None:
        self.api = api
        self._namespace = namespace
        self._ttl_s = cache.ttl_s
        self._memory = _Memory(cache.size, cache.ttl_s) if cache.size > 0 else None
        self._shared = cache.ttl_s > 0
        self._tier = tier
        count = tier.metrics.cache_requests
        self._counted = {(level, result): count.labels(api, level, result).inc
                         for level in (MEMORY, REDIS) for result in ("hit", "miss", "error")}

    def digest(self, key_text: str) -> str:
        """What identifies a request's answer, whatever the size of its key text."""
        return hashlib.sha256(f"{self._namespace}\n{key_text}".encode("utf-8", "surrogatepass")).hexdigest()

    @property
    def entries(self) -> int:
        return 0 if self._memory is None else len(self._memory)

    async def lookup(self, key_text: str) -> CacheHit | None:
        """The answer kept for this request at the revision served now, or None (then queue it)."""
        revision = self._tier.revisions.current(self.api)
        if revision is None:
            return None
        digest = self.digest(key_text)
        if self._memory is not None:
            data = self._memory.get(revision, digest)
            self._counted[(MEMORY, "miss" if data is None else "hit")]()
            if data is not None:
                return CacheHit(data, revision, MEMORY)
        if not self._shared:
            return None
        found = await self._tier.read(result_cache_key(self.api, revision, digest))
        if found is None:
            self._counted[(REDIS, "miss")]()
            return None
        if isinstance(found, BaseException):
            self._counted[(REDIS, "error")]()
            return None
        self._counted[(REDIS, "hit")]()
        if self._memory is not None:
            self._memory.put(revision, digest, found)
        return CacheHit(found, revision, REDIS)

    def store(self, revision: str, key_text: str, data: dict[str, Any]) -> None:
        """Keep a code-0 answer under the revision that computed it (the one its reply carries)."""
        digest = self.digest(key_text)
        if self._memory is not None:
            self._memory.put(revision, digest, data)
        if self._shared:
            try:
                value = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            except (TypeError, ValueError):
                return  # never the case for an answer that came as strict JSON
            self._tier.write(result_cache_key(self.api, revision, digest), value, self._ttl_s)


class ResultCache:
    """Every cached model's ModelCache in one HTTP process, with the Redis client and the
    revision follower they share."""

    def __init__(self, settings: Settings, models: Mapping[str, Model], streams: Iterable[str],
                 metrics: HttpMetrics, redis_down: Callable[[], bool] = lambda: False) -> None:
        """`redis_down`: the tier already knows Redis is unreachable (the queue client's health):
        the shared level is then skipped, not waited for."""
        self.metrics = metrics
        self._redis_down = redis_down
        self._server = settings.server
        self.models: dict[str, ModelCache] = {}
        for path, model in models.items():
            config = model.config
            if isinstance(config, ModelConfig) and config.cache.enabled:
                namespace = model.queue or settings.server.queue_name
                self.models[path] = ModelCache(path, namespace, config.cache, self)
        self._client: AnyRedis | None = None
        self._writes: _SharedWrites | None = None
        self.revisions = RevisionFollower(streams, self.models)
        self._failing = False

    def of(self, api: str) -> ModelCache | None:
        return self.models.get(api)

    def __bool__(self) -> bool:
        return bool(self.models)

    async def lifecycle(self, app: object):
        """aiohttp cleanup context: a Redis client and the follower, only when a model caches."""
        if self.models:
            self._client = async_client(self._server)
            self._writes = _SharedWrites(self._client, self._trouble)
            self.revisions.start(self._client)
        yield
        if self._client is not None:
            await self.revisions.close()
            assert self._writes is not None
            await self._writes.close()
            await self._client.aclose()

    async def read(self, key: str) -> dict[str, Any] | BaseException | None:
        """The answer stored at `key`; None when there is none, the error when Redis failed."""
        if self._client is None:
            return None
        if self._redis_down():
            return ConnectionError("redis is unreachable")
        try:
            raw = await asyncio.wait_for(self._client.get(key), READ_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure is a miss
            self._trouble(exc)
            return exc
        self._recovered()
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            return None
        return data if isinstance(data, dict) else None

    def write(self, key: str, value: str, ttl_s: float) -> None:
        if self._writes is not None:
            self._writes.add(key, value, ttl_s)

    async def claim_replay(self, key: str, ttl_s: int) -> bool:
        """What the enqueue script does for a queued request, for one answered from the cache:
        True when this signature was not seen yet (now it is). Raises on a Redis failure."""
        assert self._client is not None
        return bool(await asyncio.wait_for(self._client.set(key, "1", nx=True, ex=ttl_s),
                                           self._server.redis_timeout_s))

    def _trouble(self, exc: BaseException) -> None:
        if not self._failing:
            log.warning("result cache: redis failed (%s); its answers are misses until it answers again",
                        str(exc) or type(exc).__name__)
            self._failing = True

    def _recovered(self) -> None:
        if self._failing:
            log.info("result cache: redis answers again")
            self._failing = False
