"""Redis Sentinel (redis+sentinel://): each process asks the sentinels where the master is.

redis-py's Sentinel.master_for, with two additions: a lookup that tells a mistake (no master of
that name, a refused sentinel password: SentinelRefused, the process stops) from an outage (no
sentinel answers, the master is down: retried), and a periodic recheck, aligned on the wall clock
in every process, that moves all of a process's connections off an old master that still runs.
"""

from __future__ import annotations

import math
import time
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.retry import Retry

from goinfer.redis_address import RedisAddress
from goinfer.settings import ServerSettings

# A sentinel answers from memory: one that takes longer than this is skipped for the next one, so
# a black-holed sentinel delays finding the master by this much, not by Server.RedisTimeoutS.
SENTINEL_TIMEOUT_S = 1.0


class SentinelRefused(redis.exceptions.ConnectionError):
    """The sentinels answer, but not for us: none watches a master of that name, or they refuse
    Server.RedisSentinelPasswd (or are no sentinels). Retrying cannot help; the message is the one
    line to show (a ConnectionError, so that redis-py's connection code lets it through)."""


# One Sentinel object per process and kind (blocking, asyncio) and sentinel set: it holds the
# connections to the sentinels, which every master client of the process shares.
_SENTINELS: dict[tuple[Any, ...], Any] = {}


def _sentinel(server: ServerSettings, address: RedisAddress, asynchronous: bool, keepalive: Any) -> Any:
    key = (asynchronous, address.nodes, address.tls, server.redis_sentinel_passwd)
    found = _SENTINELS.get(key)
    if found is None:
        options = {
            "socket_connect_timeout": SENTINEL_TIMEOUT_S, "socket_timeout": SENTINEL_TIMEOUT_S,
            "socket_keepalive": True, "socket_keepalive_options": keepalive,
            "password": server.redis_sentinel_passwd or None, "ssl": address.tls,
            "retry": AsyncRetry(NoBackoff(), 0) if asynchronous else Retry(NoBackoff(), 0),
        }
        kind = _AsyncSentinel if asynchronous else _Sentinel
        found = _SENTINELS[key] = kind(list(address.nodes), sentinel_kwargs=options)
    return found


def sentinel_master(server: ServerSettings, address: RedisAddress, options: dict[str, Any],
                     asynchronous: bool) -> Any:
    """A client of the master the sentinels name: each new connection asks them where it is, so
    after a failover the next connection reaches the new master (redis-py's master_for; its pool
    also closes idle connections once the address changed, and a connection that meets READONLY),
    and the process's connections to an old master that still runs are dropped within
    MASTER_RECHECK_S of the promotion, as they are next used."""
    return _sentinel(server, address, asynchronous, options.get("socket_keepalive_options")).master_for(
        address.master, connection_pool_class=_AsyncMasterPool if asynchronous else _MasterPool,
        username=address.username, password=address.password, db=address.db, ssl=address.tls, **options)


# How often a process asks the sentinels whether the master moved, while it uses it. A failover
# that leaves the old master running (SENTINEL FAILOVER for maintenance, a partition that heals)
# closes no connection to it: the sentinels make it a replica only seconds later (Redis 7: about
# 10 s), and until then it takes writes that are then lost, while new connections already go to
# the new master. Asking keeps that window to about this long. After a recheck that failed (no
# sentinel answered) the next waits twice as long, up to MASTER_RECHECK_MAX_S, so that sentinels
# out of reach cost a healthy master's commands little.
MASTER_RECHECK_S = 0.5
MASTER_RECHECK_MAX_S = 30.0


class _MasterView:
    """Where one process last heard the master is, and when to ask again; shared by all the
    process's clients of that master, so that they all leave an old master as soon as one of
    them hears of the new one (a tier whose enqueues and reply reader parted would lose replies).

    Every process asks at the same instants of the wall clock (multiples of the interval), so
    the HTTP tiers and the dispatchers leave the old master together: one that moved earlier
    than the others would queue requests where no worker reads them any more, or answer them
    where no tier listens any more.
    """

    def __init__(self) -> None:
        self.address: tuple[str, int] | None = None
        self._interval = MASTER_RECHECK_S
        self._next_at = _next_multiple(time.time(), self._interval)

    def due(self) -> bool:
        return time.time() >= self._next_at

    def asked(self, answered: bool) -> None:
        self._interval = MASTER_RECHECK_S if answered else min(self._interval * 2, MASTER_RECHECK_MAX_S)
        self._next_at = _next_multiple(time.time(), self._interval)

    def elsewhere(self, connection: Any) -> bool:
        """Whether `connection` is connected to another address than the master's."""
        return (self.address is not None and connection.host is not None
                and (connection.host, int(connection.port)) != self.address)


def _next_multiple(now: float, interval: float) -> float:
    return (math.floor(now / interval) + 1) * interval


class _MasterPool(redis.sentinel.SentinelConnectionPool):
    """redis-py's master pool, that also notices a master that moved while its connections live
    (MASTER_RECHECK_S), and never hands out a connection to an old one."""

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        view: _MasterView = self.sentinel_manager.view(self.service_name)
        if view.due():
            view.asked(True)  # at once: the other callers of this moment need not ask too
            try:
                self.get_master_address()  # redis-py closes this pool's idle connections if it moved
            except (redis.RedisError, OSError):
                view.asked(False)  # the commands find out for themselves
        connection = super().get_connection(*args, **kwargs)
        if view.elsewhere(connection):  # busy when the master moved, or another pool heard of it first
            try:
                connection.disconnect()
                connection.connect()
            except BaseException:
                self.release(connection)
                raise
        return connection


class _AsyncMasterPool(redis.asyncio.sentinel.SentinelConnectionPool):
    """The asyncio twin of _MasterPool."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        view: _MasterView = self.sentinel_manager.view(self.service_name)
        if view.due():
            view.asked(True)
            try:
                await self.get_master_address()
            except (redis.RedisError, OSError, RuntimeError):
                view.asked(False)
        connection = await super().get_connection(*args, **kwargs)
        if view.elsewhere(connection):
            try:
                await connection.disconnect()
                await connection.connect()
            except BaseException:
                await self.release(connection)
                raise
        return connection


class _MasterSearch:
    """What the sentinels said about one master, one sentinel at a time, and what it amounts to:
    an address, an outage (a ConnectionError: retry), or a SentinelRefused (stop)."""

    def __init__(self, service: str, with_password: bool) -> None:
        self.service = service
        self._with_password = with_password
        self._seen_down = False  # a sentinel knows the master but sees it down or failing over
        self._answered: list[str] = []  # sentinels that answered and watch no master of that name
        self._watched: set[str] = set()
        self._refused: list[tuple[str, BaseException]] = []
        self._unreachable: list[str] = []

    def answered(self, sentinel: Any, masters: Any, usable: Any) -> tuple[str, int] | None:
        state = masters.get(self.service)
        if state is None:
            self._answered.append(_node_of(sentinel))
            self._watched.update(str(name) for name in masters)
            return None
        if usable(state, self.service):
            return str(state["ip"]), int(state["port"])
        self._seen_down = True
        return None

    def failed(self, sentinel: Any, exc: BaseException) -> None:
        if isinstance(exc, (AuthenticationError, ResponseError)):
            self._refused.append((_node_of(sentinel), exc))
        else:
            self._unreachable.append(f"{_node_of(sentinel)}: {str(exc) or type(exc).__name__}")

    def error(self) -> Exception:
        if self._seen_down:
            return redis.exceptions.ConnectionError(
                f"the sentinels see master {self.service!r} down (failing over?)")
        if self._answered:
            watched = ", ".join(repr(name) for name in sorted(self._watched)) or "none"
            return SentinelRefused(
                f"the sentinels at {','.join(self._answered)} watch no master named {self.service!r} (they watch: "
                f"{watched}): fix the name at the end of Server.RedisServer")
        if self._refused:
            node, exc = self._refused[0]
            detail = str(exc).split(" caused error: ", 1)[-1]
            if isinstance(exc, AuthenticationError) and not self._with_password:
                return SentinelRefused(f"the sentinel at {node} requires a password and "
                                       f"Server.RedisSentinelPasswd is empty ({detail})")
            if isinstance(exc, AuthenticationError):
                return SentinelRefused(f"the sentinel at {node} refuses Server.RedisSentinelPasswd: {detail}")
            return SentinelRefused(f"{node} does not answer as a Redis Sentinel: {detail}")
        return redis.exceptions.ConnectionError(f"no sentinel answers ({'; '.join(self._unreachable)})")


def _node_of(sentinel: Any) -> str:
    kwargs = sentinel.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


class _Views:
    """The _MasterView of each master name, for one Sentinel object (one per process)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._views: dict[str, _MasterView] = {}

    def view(self, service_name: str) -> _MasterView:
        found = self._views.get(service_name)
        if found is None:
            found = self._views[service_name] = _MasterView()
        return found


class _Sentinel(_Views, redis.sentinel.Sentinel):
    """redis-py's Sentinel, telling an outage from a mistake when no master is found: redis-py
    reports both as MasterNotFoundError, and a wrong master name would be waited out forever."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        search = _MasterSearch(service_name, bool(self.sentinel_kwargs.get("password")))
        for index, sentinel in enumerate(self.sentinels):
            try:
                masters = sentinel.sentinel_masters()
            except (redis.RedisError, OSError) as exc:
                search.failed(sentinel, exc)
                continue
            found = search.answered(sentinel, masters, self.check_master_state)
            if found is not None:
                self.sentinels[0], self.sentinels[index] = sentinel, self.sentinels[0]  # ask it first next time
                self.view(service_name).address = found
                return found
        raise search.error()


class _AsyncSentinel(_Views, redis.asyncio.sentinel.Sentinel):
    """The asyncio twin of _Sentinel."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        search = _MasterSearch(service_name, bool(self.sentinel_kwargs.get("password")))
        for index, sentinel in enumerate(self.sentinels):
            try:
                masters = await sentinel.sentinel_masters()
            except (redis.RedisError, OSError, RuntimeError) as exc:  # RuntimeError: uvloop, on a reset transport
                search.failed(sentinel, exc)
                continue
            found = search.answered(sentinel, masters, self.check_master_state)
            if found is not None:
                self.sentinels[0], self.sentinels[index] = sentinel, self.sentinels[0]
                self.view(service_name).address = found
                return found
        raise search.error()
