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

import socket
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote, unquote

import redis
import redis.asyncio
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


SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class RedisAddress:
    """Where Redis is, as `Server.RedisServer` (with RedisPasswd, RedisCluster) says.

    `kind` "single": `url` is what redis-py takes. "sentinel": `nodes` are the sentinels and
    `master` the service they watch. "cluster": `nodes` are the nodes to learn the cluster from.
    `password` (and `username`) are the data nodes' credentials: from the URL, else RedisPasswd.
    """

    kind: Literal["single", "sentinel", "cluster"]
    nodes: tuple[tuple[str, int], ...]
    url: str = ""
    master: str = ""
    username: str | None = None
    password: str | None = None
    tls: bool = False
    db: int = 0

    def describe(self) -> str:
        """For log lines and messages: never a password."""
        nodes = ",".join(f"{host}:{port}" for host, port in self.nodes)
        if self.kind == "sentinel":
            return f"sentinel master {self.master!r} via {nodes}"
        if self.kind == "cluster":
            return f"cluster {nodes}"
        return nodes


def redis_address(server: ServerSettings) -> RedisAddress:
    """Parse `Server.RedisServer`; ValueError with a message that shows no password.

    redis+sentinel://[user:pass@]host1:26379,host2:26379/<master>[/<db>] is the form other Python
    projects use (redis-py has no URL scheme for Sentinel); redis+cluster://host:port,host:port
    names cluster nodes, as does a plain address or redis:// URL with `Server.RedisCluster: true`.
    """
    text = server.redis_server.strip()
    scheme, _, rest = text.partition("://") if "://" in text else ("", "", text)
    scheme = scheme.lower()
    if scheme in SENTINEL_SCHEMES or scheme in CLUSTER_SCHEMES:
        kind: Literal["sentinel", "cluster"] = "sentinel" if scheme in SENTINEL_SCHEMES else "cluster"
        credentials, _, location = rest.rpartition("@")
        hosts, _, path = location.partition("/")
        username, password = _credentials(credentials, server)
        parts = [part for part in path.split("/") if part]
        master = unquote(parts[0]) if kind == "sentinel" and parts else ""
        if kind == "sentinel" and not master:
            raise ValueError("a redis+sentinel:// address must end with the master's name: "
                             "redis+sentinel://host1:26379,host2:26379/mymaster")
        db_text = parts[1] if kind == "sentinel" and len(parts) > 1 else "0"
        if not db_text.isdigit():
            raise ValueError(f"the database number in Server.RedisServer must be a number, not {db_text!r}")
        default_port = DEFAULT_SENTINEL_PORT if kind == "sentinel" else DEFAULT_PORT
        return RedisAddress(kind, _host_ports(hosts, default_port), master=master, username=username,
                            password=password, tls=scheme.startswith("rediss"), db=int(db_text))
    if server.redis_cluster:
        if scheme in ("redis", "rediss"):
            credentials, _, location = rest.rpartition("@")
            username, password = _credentials(credentials, server)
            return RedisAddress("cluster", _host_ports(location.partition("/")[0], DEFAULT_PORT),
                                username=username, password=password, tls=scheme == "rediss")
        return RedisAddress("cluster", _host_ports(text, DEFAULT_PORT), password=server.redis_passwd or None)
    url = redis_url(server)
    pool_kwargs = redis.ConnectionPool.from_url(url).connection_kwargs
    node = (str(pool_kwargs.get("host", "127.0.0.1")), int(pool_kwargs.get("port", DEFAULT_PORT)))
    return RedisAddress("single", (node,), url=url, username=pool_kwargs.get("username"),
                        password=pool_kwargs.get("password"), tls=url.startswith("rediss:"),
                        db=int(pool_kwargs.get("db", 0) or 0))


def _credentials(text: str, server: ServerSettings) -> tuple[str | None, str | None]:
    """user:password from a URL's userinfo (percent-decoded), else RedisPasswd."""
    if not text:
        return None, server.redis_passwd or None
    user, has_password, password = text.partition(":")
    if not has_password:  # redis://secret@host is a password, as redis-py reads it
        return None, unquote(user) or None
    return unquote(user) or None, unquote(password) or None


def _host_ports(text: str, default_port: int) -> tuple[tuple[str, int], ...]:
    nodes = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [::1]:26379
            host, _, port_text = item[1:].partition("]")
            port_text = port_text.lstrip(":")
        else:
            host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
        if port_text and not port_text.isdigit():
            raise ValueError(f"Server.RedisServer names a node with a bad port: {item!r}")
        nodes.append((host, int(port_text) if port_text else default_port))
    if not nodes:
        raise ValueError("Server.RedisServer names no host")
    return tuple(nodes)


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
    """The host and port Redis is expected on (for `goinfer up` and for messages); the first
    sentinel or cluster node for those."""
    return redis_address(server).nodes[0]


def describe_redis(server: ServerSettings) -> str:
    """The address for log lines, without the password."""
    return redis_address(server).describe()


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


def async_client(server: ServerSettings, *, blocking_s: float = 0.0) -> redis.asyncio.Redis:
    """A client for the HTTP tier. A command gets `Server.RedisTimeoutS` to be answered; one that
    blocks in Redis on purpose (BLPOP with a timeout) passes that timeout as `blocking_s`, which
    is added, so a blocking read on a dead connection still ends a little after it should have."""
    return redis.asyncio.Redis.from_url(
        redis_url(server), max_connections=None, **_connection_options(server.redis_timeout_s + blocking_s),
    )


def sync_client(server: ServerSettings, *, timeout_s: float = 30.0, retries: int = 0) -> redis.Redis:
    """A blocking client (start-up checks, `goinfer up`, the dispatchers), with the same timeouts
    and keepalive as the HTTP tier's; `retries` immediate retries of a failed command."""
    options = _connection_options(timeout_s)
    options["retry"] = Retry(NoBackoff(), retries)
    return redis.Redis.from_url(redis_url(server), **options)


# Redis answered, and said no to the credentials (WRONGPASS, NOAUTH) or to a command (NOPERM).
_REFUSALS = (AuthenticationError, AuthenticationWrongNumberOfArgsError, AuthorizationError, NoPermissionError)


def is_refusal(exc: BaseException) -> bool:
    """Whether `exc` is Redis refusing us for good (as opposed to being away for a while)."""
    return isinstance(exc, _REFUSALS)


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
