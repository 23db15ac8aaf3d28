"""How both tiers reach Redis: go-infer's `RedisServer`/`RedisPasswd`, a redis:// URL, a Redis
Sentinel service (redis+sentinel://) or a Redis Cluster (redis+cluster://, or RedisCluster: true).

Kept in one place so that timeouts, TLS and passwords behave the same in the HTTP tier, the
dispatchers and the tools. Every connection has a socket timeout and TCP keepalive: a Redis
whose host vanished (rebooted, its virtual IP moved) sends no error, only silence, and a
connection without both would wait for it forever. redis-py retries nothing on its own here:
resending a command whose answer was lost may run it twice (a request queued twice), so the
callers decide what may be retried.
"""

from __future__ import annotations

import inspect
import socket
from typing import Any, cast

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
    OutOfMemoryError,
    ResponseError,
)
from redis.retry import Retry

from goinfer.redis_address import RedisAddress, describe_redis, redis_address, redis_url
from goinfer.sentinel import SentinelRefused, sentinel_master
from goinfer.settings import ServerSettings

CONNECT_TIMEOUT_S = 2.0
# A pooled connection idle this long is PINGed before it carries a command, so a connection
# that died while idle fails before the command is written, not after.
HEALTH_CHECK_INTERVAL_S = 5
# The kernel probes an idle connection after 5 s and gives up after 3 unanswered probes 2 s
# apart; data unacknowledged for 10 s also ends the connection (TCP_USER_TIMEOUT, Linux).
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_PROBES = 3
UNACKNOWLEDGED_LIMIT_MS = 10_000


def keepalive_options() -> dict[int, int]:
    """TCP keepalive and user-timeout socket options, for redis-py's `socket_keepalive_options`.

    The kernel's defaults (two hours of idleness before the first probe) notice a dead peer far
    too late; options the platform lacks are left out.
    """
    wanted = (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPALIVE", KEEPALIVE_IDLE_S),  # macOS's name
              ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S), ("TCP_KEEPCNT", KEEPALIVE_PROBES),
              ("TCP_USER_TIMEOUT", UNACKNOWLEDGED_LIMIT_MS))
    options: dict[int, int] = {}
    for name, value in wanted:
        option = getattr(socket, name, None)
        if option is not None and option not in options:
            options[option] = value
    return options


def _connection_options(timeout_s: float) -> dict[str, Any]:
    return {
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_timeout": timeout_s,
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(),
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "retry": AsyncRetry(NoBackoff(), 0),
    }


def async_client(server: ServerSettings, *,
                 blocking_s: float = 0.0) -> redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster:
    """A client for the HTTP tier. A command gets `Server.RedisTimeoutS` to be answered; one that
    blocks in Redis on purpose (BLPOP with a timeout) passes that timeout as `blocking_s`, which
    is added, so a blocking read on a dead connection still ends a little after it should have.

    On a Redis Cluster: redis-py's cluster client, for keys that may live on any node; what one
    queue sends in one round trip goes to that queue's node (goinfer/cluster_clients.py)."""
    address = redis_address(server)
    if address.kind == "cluster":
        return _cluster_async_client(address, server.redis_timeout_s + blocking_s)
    if address.kind == "sentinel":
        options = _connection_options(server.redis_timeout_s + blocking_s)
        return cast(redis.asyncio.Redis, sentinel_master(server, address, options, asynchronous=True))
    return redis.asyncio.Redis.from_url(
        redis_url(server), max_connections=None, **_connection_options(server.redis_timeout_s + blocking_s),
    )


def sync_client(server: ServerSettings, *, timeout_s: float = 30.0, retries: int = 0) -> redis.Redis:
    """A blocking client (start-up checks, `goinfer up`, the dispatchers), with the same timeouts
    and keepalive as the HTTP tier's; `retries` immediate retries of a failed command.

    On a Redis Cluster: a client of the first node named, enough to check that the cluster
    answers and takes the credentials (PING); a dispatcher finds the node of each key through
    goinfer/cluster_clients.py. (redis-py's blocking cluster client connects when it is made,
    and raises there, outside the callers' handling of an unreachable Redis.)"""
    options = _connection_options(timeout_s)
    options["retry"] = Retry(NoBackoff(), retries)
    address = redis_address(server)
    if address.kind == "cluster":
        host, port = address.nodes[0]
        return cluster_node_client(server, host, port, timeout_s=timeout_s, retries=retries)
    if address.kind == "sentinel":
        return cast(redis.Redis, sentinel_master(server, address, options, asynchronous=False))
    return redis.Redis.from_url(redis_url(server), **options)


# --- Redis Cluster (redis+cluster://, or RedisCluster: true) ----------------------------------------

class ClusterRefused(redis.exceptions.ConnectionError):
    """The address names Redis servers that are not a cluster (RedisCluster: true, or a
    redis+cluster:// address, pointed at a plain Redis). Retrying cannot help; the message is
    the one line to show."""


# How long finding out which node serves which slot (CLUSTER SLOTS, asked of one node after the
# other) may wait on each node: it answers from memory.
CLUSTER_MAP_TIMEOUT_S = 2.0


def _cluster_credentials(address: RedisAddress) -> dict[str, Any]:
    return {"username": address.username, "password": address.password, "ssl": address.tls}


def cluster_node_client(server: ServerSettings, host: str, port: int, *, timeout_s: float = 30.0,
                        retries: int = 0) -> redis.Redis:
    """A plain blocking client of one node of the cluster (options as sync_client's): it answers
    only for the slots that node serves."""
    options = _connection_options(timeout_s)
    options["retry"] = Retry(NoBackoff(), retries)
    return redis.Redis(host=host, port=port, **_cluster_credentials(redis_address(server)), **options)


def async_cluster_node_client(server: ServerSettings, host: str, port: int, *,
                              blocking_s: float = 0.0) -> redis.asyncio.Redis:
    """A plain asyncio client of one node of the cluster (see async_client for `blocking_s`)."""
    options = _connection_options(server.redis_timeout_s + blocking_s)
    return redis.asyncio.Redis(host=host, port=port, max_connections=None,
                               **_cluster_credentials(redis_address(server)), **options)


def cluster_map(server: ServerSettings) -> redis.cluster.RedisCluster:
    """redis-py's blocking cluster client, made to learn which primary serves which slot.

    It asks its nodes at once: raises RedisClusterException (not a RedisError) when none answers
    as a cluster node, with the last node's error as its cause (a refused password included).
    """
    address = redis_address(server)
    options = _connection_options(CLUSTER_MAP_TIMEOUT_S)
    options.pop("retry")  # redis-py takes the cluster's retry apart, and retries nothing with this one
    return redis.cluster.RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in address.nodes],
        require_full_coverage=False, retry=Retry(NoBackoff(), 0), **_cluster_credentials(address), **options)


def _cluster_async_client(address: RedisAddress, timeout_s: float) -> redis.asyncio.cluster.RedisCluster:
    """redis-py's asyncio cluster client; it learns the cluster at its first command."""
    options = _connection_options(timeout_s)
    options.pop("retry")
    return redis.asyncio.cluster.RedisCluster(
        startup_nodes=[redis.asyncio.cluster.ClusterNode(host, port) for host, port in address.nodes],
        require_full_coverage=False, retry=AsyncRetry(NoBackoff(), 0), **_cluster_credentials(address), **options)


# Redis answered, and said no to the credentials (WRONGPASS, NOAUTH) or to a command (NOPERM).
_REFUSALS = (AuthenticationError, AuthenticationWrongNumberOfArgsError, AuthorizationError, NoPermissionError,
             SentinelRefused, ClusterRefused)


def is_refusal(exc: BaseException) -> bool:
    """Whether `exc` is Redis refusing us for good (as opposed to being away for a while)."""
    return isinstance(exc, _REFUSALS)


def is_unblocked(exc: BaseException) -> bool:
    """Whether `exc` is Redis releasing a blocked read (BLPOP) because a failover demoted the
    master it waited on to a replica (UNBLOCKED): the read did nothing, the master is elsewhere."""
    return isinstance(exc, ResponseError) and str(exc).startswith("UNBLOCKED")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is Redis at `maxmemory` refusing a command that needs memory (OOM).

    It passes once memory is freed (commands that free it, XACK, XDEL, DEL, are still accepted),
    so a caller keeps what it wanted to write and retries; it is neither an outage nor a refusal.
    """
    return isinstance(exc, ResponseError) and (isinstance(exc, OutOfMemoryError) or str(exc).startswith("OOM "))


class RedisRefused(Exception):
    """Redis will not serve goinfer as configured: retrying cannot help, so the process stops.
    The message is the one line to show; it names the setting to fix, never a password."""


def refusal(exc: BaseException, server: ServerSettings) -> RedisRefused | None:
    """The RedisRefused that `exc` means, or None for an error that may pass (retry it).

    redis-py turns Redis's WRONGPASS and NOAUTH into AuthenticationError and NOPERM into
    NoPermissionError. The message names the setting that holds the credentials, never their
    value, and leaves out the pipeline's echo of the command (it may carry request data).
    """
    if not is_refusal(exc):
        return None
    if isinstance(exc, (SentinelRefused, ClusterRefused)):  # its message names the nodes and the setting
        return RedisRefused(str(exc))
    address = describe_redis(server)
    detail = str(exc).split(" caused error: ", 1)[-1]
    in_url = "@" in server.redis_server.split("://", 1)[-1]
    setting = "the credentials in Server.RedisServer" if in_url else "Server.RedisPasswd"
    if isinstance(exc, (NoPermissionError, AuthorizationError)):
        who = "the user of Server.RedisServer" if in_url else "the user of Server.RedisPasswd"
        return RedisRefused(f"redis at {address} denies a command goinfer needs to {who} "
                            f"(check its ACL): NOPERM {detail}")
    if not in_url and not server.redis_passwd:  # NOAUTH; its text speaks of the handshake, not of the fix
        return RedisRefused(f"redis at {address} requires a password and Server.RedisPasswd is empty (NOAUTH)")
    return RedisRefused(f"redis at {address} refuses {setting}: {detail}")


def _pool_wants_command_name(pool_class: Any) -> bool:
    """Whether `pool_class.get_connection` must be given a command name: before redis-py 5.3 it
    must; 5.3 and later take none (and warn when given one)."""
    parameter = inspect.signature(pool_class.get_connection).parameters.get("command_name")
    return parameter is not None and parameter.default is inspect.Parameter.empty


_WANTS_COMMAND_NAME: dict[type, bool] = {}


def take_connection(pool: Any, command_name: str) -> Any:
    """A connection from a redis-py pool (an awaitable one from an asyncio pool), for the callers
    that send raw commands on connections they take themselves: the HTTP tier's enqueue batcher
    and reply reader, a worker's round trips."""
    kind = type(pool)
    wants = _WANTS_COMMAND_NAME.get(kind)
    if wants is None:
        wants = _WANTS_COMMAND_NAME[kind] = _pool_wants_command_name(kind)
    if wants:
        return pool.get_connection(command_name)
    return pool.get_connection()
