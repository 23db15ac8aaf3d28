"""How both tiers reach Redis: go-infer's `RedisServer`/`RedisPasswd`, or a redis:// URL.

Kept in one place so that timeouts, TLS and passwords behave the same in the HTTP tier, the
dispatchers and the tools.
"""

from __future__ import annotations

from urllib.parse import quote

import redis
import redis.asyncio

from goinfer.settings import ServerSettings

CONNECT_TIMEOUT_S = 2.0


def redis_url(server: ServerSettings) -> str:
    """A redis-py URL from `RedisServer` ("host:port" as in go-infer, or redis:// / rediss://)."""
    address = server.redis_server.strip()
    if "://" in address:
        url = address
    else:
        url = f"redis://{address}" if ":" in address.rsplit("]", 1)[-1] else f"redis://{address}:6379"
    if server.redis_passwd and "@" not in url.split("://", 1)[1]:
        scheme, rest = url.split("://", 1)
        url = f"{scheme}://:{quote(server.redis_passwd, safe='')}@{rest}"
    return url


def redis_host_port(server: ServerSettings) -> tuple[str, int]:
    """The host and port Redis is expected on (for `goinfer up` and for messages)."""
    pool = redis.ConnectionPool.from_url(redis_url(server))
    kwargs = pool.connection_kwargs
    return str(kwargs.get("host", "127.0.0.1")), int(kwargs.get("port", 6379))


def describe_redis(server: ServerSettings) -> str:
    """The address for log lines, without the password."""
    host, port = redis_host_port(server)
    return f"{host}:{port}"


def async_client(server: ServerSettings, *, blocking: bool = False) -> redis.asyncio.Redis:
    """A client for the HTTP tier; `blocking` ones have no read timeout (for BLPOP-style calls)."""
    return redis.asyncio.Redis.from_url(
        redis_url(server),
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=None if blocking else max(server.message_timeout, 5.0),
        socket_keepalive=True,
        health_check_interval=30,
        max_connections=None,
    )


def sync_client(server: ServerSettings) -> redis.Redis:
    """A client for dispatcher workers, which block on XREADGROUP for at most a second."""
    return redis.Redis.from_url(
        redis_url(server),
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=30.0,
        socket_keepalive=True,
        health_check_interval=30,
    )
