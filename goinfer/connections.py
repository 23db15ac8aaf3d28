"""How both tiers reach Redis: go-infer's `RedisServer`/`RedisPasswd`, or a redis:// URL.

Kept in one place so that timeouts, TLS and passwords behave the same in the HTTP tier, the
dispatchers and the tools.
"""

from __future__ import annotations

from urllib.parse import quote

import redis
import redis.asyncio
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    AuthorizationError,
    NoPermissionError,
)

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


# Redis answered, and said no to the credentials (WRONGPASS, NOAUTH) or to a command (NOPERM).
_REFUSALS = (AuthenticationError, AuthenticationWrongNumberOfArgsError, AuthorizationError, NoPermissionError)


def is_refusal(exc: BaseException) -> bool:
    """Whether `exc` is Redis refusing us for good (as opposed to being away for a while)."""
    return isinstance(exc, _REFUSALS)


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
