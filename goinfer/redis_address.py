"""Where Redis is: `Server.RedisServer` (with RedisPasswd and RedisCluster) read once, in one place.

go-infer's "host:port", a redis:// or rediss:// URL, a Sentinel service
(redis+sentinel://[user:pass@]host1:26379,host2:26379/<master>[/<db>]) or the nodes of a Redis
Cluster (redis+cluster://host:port,host:port, or any of the above with RedisCluster: true).
Parsed without connecting, so that settings are checked (and a mistake reported in one line)
before any process starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote

import redis

from goinfer.settings import ServerSettings

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
            raise ValueError(f"the database number must be a number, not {db_text!r}")
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
            raise ValueError(f"names a node with a bad port: {item!r}")
        nodes.append((host, int(port_text) if port_text else default_port))
    if not nodes:
        raise ValueError("names no host")
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
