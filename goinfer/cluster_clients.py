"""On a Redis Cluster, which node serves each queue, and plain clients pinned to it.

Every key of queue number N carries the hash tag {qN} (goinfer/queue.py), so everything the
queue does in one round trip (a request's enqueue script, a worker's MULTI/EXEC of replies and
acknowledgements, the reads of a reply list) lives in one slot, on one primary. redis-py's
cluster client cannot carry that traffic as goinfer sends it: its pipelines refuse EVALSHA and
the MULTI/EXEC a worker writes into a plain pipeline, the HTTP tier writes its enqueue scripts
straight onto a connection, and a BLPOP cannot span slots. So each queue's traffic goes through
a plain client of the primary that serves its slot, learnt from redis-py's cluster client (its
map of slots), and learnt again when that primary stops serving it: after MOVED or ASK,
CLUSTERDOWN or TRYAGAIN, or a connection error (a primary that died, whose replica takes over).
The callers' own back-off paces those retries.

On one Redis (directly or through Sentinel) one client serves every key, and the callers'
code is the same.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from typing import TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from goinfer.connections import (
    ClusterRefused,
    async_cluster_node_client,
    cluster_map,
    cluster_node_client,
    is_refusal,
    is_unblocked,
    sync_client,
)
from goinfer.redis_address import describe_redis, redis_address
from goinfer.settings import ServerSettings

_E = TypeVar("_E", bound=BaseException)

# A key's node may have changed: the command did not run there, and asking the cluster where
# the slot is now, then sending it there, may succeed. MOVED (a MovedError is an AskError): the
# slot has another primary. ASK and TRYAGAIN: the slot is being moved. CLUSTERDOWN: the cluster
# is electing a new primary. READONLY: the node was demoted to a replica. A connection error or
# timeout: the node may be dead, its replica about to take over.
_RELOCATING = (AskError, TryAgainError, ClusterDownError, ReadOnlyError, RedisConnectionError, RedisTimeoutError,
               OSError, asyncio.TimeoutError)


def is_relocation(error: BaseException) -> bool:
    """Whether `error` may mean that the node no longer serves the key (see _RELOCATING; UNBLOCKED
    is what a primary demoted to a replica answers a blocked read)."""
    if is_refusal(error):
        return False
    return isinstance(error, _RELOCATING) or is_unblocked(error)


def as_redis_error(error: _E, server: ServerSettings) -> _E | RedisError:
    """`error` as the RedisError callers handle: redis-py's cluster client raises
    RedisClusterException, which is none, when no node tells it the cluster's layout; its cause
    says why (a refused password is passed on as it is, so it stops the process as it should).
    Anything else is returned unchanged."""
    if not isinstance(error, RedisClusterException):
        return error
    cause = error.__cause__
    if isinstance(cause, RedisError) and is_refusal(cause):
        return cause
    text = str(error)
    if "Cluster mode is not enabled" in text:
        return ClusterRefused(f"redis at {describe_redis(server)} is not a Redis Cluster ({text}); set "
                              "Server.RedisCluster to false, or name the cluster's nodes in Server.RedisServer")
    return RedisConnectionError(text)


def hash_tag(key: str) -> str:
    """The part of `key` Redis Cluster hashes ({q1} of "{q1}goinfer1"): how logs name a queue's slot."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start:end + 1] if start >= 0 and end > start + 1 else key


class NodeClients:
    """The blocking clients of one part of a dispatcher (a worker, the heartbeat, the keeper),
    by key; `client` serves its own keys (a queue's, or the heartbeats').

    This is the one-Redis case: one client serves every key, and nothing is ever relocated.
    """

    cluster = False

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    @property
    def client(self) -> redis.Redis:
        return self._client

    def client_for(self, key: str) -> redis.Redis:
        return self._client

    def by_node(self, keys: Iterable[str]) -> list[tuple[redis.Redis, list[str]]]:
        """`keys` grouped by the client that serves them: one pipeline per node."""
        wanted = list(keys)
        return [(self._client, wanted)] if wanted else []

    def lost(self, error: BaseException) -> None:
        """A command failed with `error`. READONLY: the connections reach a master that a
        failover made a replica, and would keep reaching it; closed, new ones go where the
        address leads now (redis-py's Sentinel pool does this by itself, a plain address does
        not). On a cluster: its node may no longer serve its slot."""
        if isinstance(error, ReadOnlyError):
            self._client.connection_pool.disconnect()

    def close(self) -> None:
        self._client.close()


def node_clients(client: redis.Redis | NodeClients) -> NodeClients:
    """`client` as NodeClients (a plain client serves every key)."""
    return client if isinstance(client, NodeClients) else NodeClients(client)


def slot_clients(server: ServerSettings, home: str, *, timeout_s: float = 30.0, retries: int = 1) -> NodeClients:
    """Blocking clients for the keys of one hash slot (`home` is one of them): on a Redis
    Cluster, the primary serving that slot, found again after a failover; on one Redis, that
    Redis. `retries` immediate retries, so the caller's own back-off decides when to try again."""
    if redis_address(server).kind == "cluster":
        return ClusterNodeClients(server, home, timeout_s=timeout_s, retries=retries)
    return NodeClients(sync_client(server, timeout_s=timeout_s, retries=retries))


class ClusterNodeClients(NodeClients):
    """NodeClients on a Redis Cluster: a plain client per primary, chosen by the key's slot.

    The map of slots comes from redis-py's blocking cluster client, made at first use (it
    connects when made) and asked again after `lost` was told of an error that may mean the
    slot moved. Its failures are ConnectionErrors (or a refusal), like any Redis outage.
    """

    cluster = True

    def __init__(self, server: ServerSettings, home: str, *, timeout_s: float = 30.0, retries: int = 0) -> None:
        self._server = server
        self._home = home
        self._timeout_s = timeout_s
        self._retries = retries
        self._map: redis.cluster.RedisCluster | None = None
        self._stale = True
        self._clients: dict[tuple[str, int], redis.Redis] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> redis.Redis:
        return self.client_for(self._home)

    def client_for(self, key: str) -> redis.Redis:
        with self._lock:  # the supervisor's keeper thread and main thread share one
            if self._stale or self._map is None:
                self._refresh()
            assert self._map is not None
            try:
                node = self._map.get_node_from_key(key)
            except (RedisClusterException, RedisError) as exc:  # SlotNotCoveredError: no primary for it now
                self._stale = True
                raise RedisConnectionError(f"no primary serves {hash_tag(key)} now: {exc}") from None
            address = (str(node.host), int(node.port))
            found = self._clients.get(address)
            if found is None:
                found = self._clients[address] = cluster_node_client(self._server, *address,
                                                                     timeout_s=self._timeout_s, retries=self._retries)
            return found

    def by_node(self, keys: Iterable[str]) -> list[tuple[redis.Redis, list[str]]]:
        groups: dict[int, tuple[redis.Redis, list[str]]] = {}
        for key in keys:
            client = self.client_for(key)
            groups.setdefault(id(client), (client, []))[1].append(key)
        return list(groups.values())

    def lost(self, error: BaseException) -> None:
        """MOVED names the slot's new primary: the map is corrected from it, as redis-py's own
        cluster client does (the nodes' maps may lag behind the node that answered). Anything
        else that may mean a move: the map is asked for again at the next command."""
        if not is_relocation(error):
            return
        with self._lock:
            if isinstance(error, MovedError) and self._map is not None and not self._stale:
                try:
                    self._map.nodes_manager.move_slot(error)
                    return
                except (KeyError, RedisClusterException, RedisError):
                    pass
            self._stale = True

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()
            if self._map is not None:
                self._map.close()

    def _refresh(self) -> None:
        try:
            if self._map is None:
                self._map = cluster_map(self._server)
            else:
                self._map.nodes_manager.initialize()
            primaries = {(str(node.host), int(node.port)) for node in self._map.get_primaries()}
        except (RedisClusterException, RedisError, OSError) as exc:
            raise as_redis_error(exc, self._server) from None
        self._stale = False
        for address in [address for address in self._clients if address not in primaries]:
            self._clients.pop(address).close()  # a node that serves no slot now (dead, or a replica)


class AsyncClusterNodes:
    """For the HTTP tier on a Redis Cluster: the plain client of the primary that serves a key,
    from the map of redis-py's asyncio cluster client (the one the tier uses for keys that live
    anywhere), asked again after `lost`. One client per primary and blocking time."""

    def __init__(self, server: ServerSettings, cluster: redis.asyncio.cluster.RedisCluster) -> None:
        self._server = server
        self._cluster = cluster
        self._stale = True
        self._initialised = False
        self._lock: asyncio.Lock | None = None
        self._asked_at = 0  # how many times the map was asked for
        self._failure: BaseException | None = None
        self._moved: MovedError | None = None
        self._clients: dict[tuple[str, int, float], redis.asyncio.Redis] = {}

    async def client_for(self, key: str, *, blocking_s: float = 0.0) -> redis.asyncio.Redis:
        """The client of the primary serving `key` now; a ConnectionError (or a refusal) when the
        cluster cannot say."""
        if self._moved is not None and not self._stale:
            moved, self._moved = self._moved, None
            try:
                await self._cluster.nodes_manager.move_slot(moved)
            except (KeyError, RedisClusterException, RedisError):
                self._stale = True
        if self._stale:
            await self._refresh()
        try:
            node = self._cluster.get_node_from_key(key)
        except (RedisClusterException, RedisError) as exc:
            node, reason = None, str(exc)
        else:
            reason = "no node"
        if node is None:
            self._stale = True
            raise RedisConnectionError(f"no primary serves {hash_tag(key)} now: {reason}")
        host, port = str(node.host), int(node.port)
        found = self._clients.get((host, port, blocking_s))
        if found is None:
            found = self._clients[host, port, blocking_s] = async_cluster_node_client(self._server, host, port,
                                                                                     blocking_s=blocking_s)
        return found

    def lost(self, error: BaseException) -> None:
        """As ClusterNodeClients.lost: MOVED corrects the map (at the next command), anything
        else that may mean a move has it asked for again."""
        if not is_relocation(error):
            return
        if isinstance(error, MovedError) and self._initialised and not self._stale:
            self._moved = error
        else:
            self._stale = True

    def clients(self) -> list[redis.asyncio.Redis]:
        return list(self._clients.values())

    def same_node(self, client: redis.asyncio.Redis) -> list[redis.asyncio.Redis]:
        """`client` and the other clients of its node (reading replies, enqueueing)."""
        node = _node_of(client)
        return [other for other in self._clients.values() if _node_of(other) == node]

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()

    async def _refresh(self) -> None:
        """Ask the cluster for its map, once for all the requests waiting for it: while one
        asks, the others wait; a failure is passed on to those that waited for it."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        asked_at = self._asked_at
        async with self._lock:
            if not self._stale:
                return
            if self._asked_at != asked_at and self._failure is not None:
                raise self._failure  # it failed while we waited: not again at once
            self._asked_at += 1
            try:
                await self._ask()
            except BaseException as exc:
                self._failure = exc
                raise
            self._failure = None

    async def _ask(self) -> None:
        try:
            if not self._initialised:
                await self._cluster.initialize()
                self._initialised = True
            else:
                await self._cluster.nodes_manager.initialize()
            primaries = {(str(node.host), int(node.port)) for node in self._cluster.get_primaries()}
        except (RedisClusterException, RedisError, OSError) as exc:
            raise as_redis_error(exc, self._server) from None
        self._stale = False
        for address in [address for address in self._clients if address[:2] not in primaries]:
            await self._clients.pop(address).aclose()


def _node_of(client: redis.asyncio.Redis) -> tuple[str, int]:
    kwargs = client.connection_pool.connection_kwargs
    return str(kwargs.get("host")), int(kwargs.get("port", 0))
