"""What Redis says about the cluster, read by the HTTP tier's operations endpoints.

Only /ready, /metrics and /goinfer/status call this, never a request's path. Dispatchers are
found through the set of heartbeat keys (goinfer/queue.py); queue depths through XLEN and the
consumer group's XPENDING summary; cluster-wide counters through the hashes workers increment.
On a Redis Cluster, redis-py's cluster client sends each command to its key's node: the
heartbeats share one slot (one MGET), the queues' reads go out as one pipeline per node.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import redis.asyncio
import redis.asyncio.cluster

from goinfer.http.readiness import is_ours
from goinfer.queue import (
    CONSUMER_GROUP,
    DISPATCHERS_SET,
    STAT_DEAD_LETTERED,
    STAT_DEADLINE_DROPPED,
    DispatcherHeartbeat,
    dead_letter_stream,
    served_streams,
    stats_key,
)


@dataclass
class QueueStats:
    """One stream as Redis sees it now."""

    name: str
    length: int = 0  # entries not yet taken or not yet acknowledged (XLEN)
    pending: int = 0  # taken by a worker, not yet answered (XPENDING)
    dead_letter_length: int = 0
    dead_lettered: int = 0  # cluster-wide totals since the stats hash was created
    deadline_dropped: int = 0
    dispatchers: int = 0  # live dispatchers with live workers reading it


@dataclass
class ClusterSnapshot:
    """Dispatchers (from their heartbeats) and queues, for /metrics and /goinfer/status."""

    dispatchers: list[DispatcherHeartbeat] = field(default_factory=list)
    queues: list[QueueStats] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {"dispatchers": [beat.as_json() for beat in self.dispatchers],
                "queues": [asdict(q) for q in self.queues]}


AnyRedis = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster


async def read_dispatchers(client: AnyRedis) -> list[DispatcherHeartbeat]:
    """The heartbeats of the dispatchers alive now (keys that have not expired)."""
    members = sorted(await client.smembers(DISPATCHERS_SET))
    if not members:
        return []
    found = []
    for raw in await client.mget(members):
        if raw is None:
            continue  # expired: a killed dispatcher; the next heartbeat of any other prunes it
        beat = DispatcherHeartbeat.decode(raw)
        if beat is not None:
            found.append(beat)
    return found


async def read_cluster(client: AnyRedis, streams: list[str], targets: Collection[str] = ()) -> ClusterSnapshot:
    """Dispatchers serving any of `streams` (or, still loading, started with one of the model
    `targets`), and each stream's depth and counters: 3 round trips."""
    wanted = set(streams)
    dispatchers = [beat for beat in await read_dispatchers(client) if is_ours(beat, wanted, targets)]
    served = served_streams(dispatchers)
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xlen(stream)
        pipe.xpending(stream, CONSUMER_GROUP)
        pipe.xlen(dead_letter_stream(stream))
        pipe.hmget(stats_key(stream), [STAT_DEAD_LETTERED, STAT_DEADLINE_DROPPED])
    results = await pipe.execute(raise_on_error=False)
    queues = []
    for index, stream in enumerate(streams):
        length, pending, dead_length, counters = results[4 * index: 4 * index + 4]
        dead_lettered, dropped = counters if isinstance(counters, list) else (None, None)
        queues.append(QueueStats(
            name=stream,
            length=_int(length),
            pending=_int(pending.get("pending") if isinstance(pending, dict) else None),  # NOGROUP: none yet
            dead_letter_length=_int(dead_length),
            dead_lettered=_int(dead_lettered),
            deadline_dropped=_int(dropped),
            dispatchers=served.get(stream, 0),
        ))
    return ClusterSnapshot(dispatchers, queues)


def _int(value: Any) -> int:
    try:
        return int(value) if value is not None and not isinstance(value, Exception) else 0
    except (TypeError, ValueError):
        return 0
