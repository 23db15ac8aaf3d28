"""A real Redis Sentinel service for tests: a master, its replicas and a few sentinels, each its own
redis-server process on a free loopback port, all stopped by `stop()` (or leaving a `with` block).

The data nodes are goinfer.redis_server's throwaway servers; the sentinels are `redis-server
--sentinel` with short timings (a master silent for DOWN_AFTER_MS is down, a failover is retried
after FAILOVER_TIMEOUT_MS), so a failover completes within a few seconds of the master dying.
`start()` returns once every sentinel knows the replicas and the other sentinels: before that, a
killed master would not be failed over.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis

from goinfer.processes import terminate
from goinfer.redis_server import RedisServer, find_redis_server, start_redis_server
from goinfer.testing import HarnessError, free_port, wait_until

MASTER_NAME = "goinfer-test"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000
START_TIMEOUT_S = 30.0


@dataclass
class SentinelProcess:
    """One `redis-server --sentinel`, its configuration (which it rewrites) and log in `folder`."""

    process: subprocess.Popen[bytes]
    port: int
    folder: Path
    password: str | None

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis("127.0.0.1", self.port, password=self.password, socket_timeout=2.0,
                           socket_connect_timeout=1.0, **kwargs)

    @property
    def log(self) -> str:
        path = self.folder / "sentinel.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        terminate(self.process, 10)
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class SentinelService:
    """The master (`nodes[0]` until a failover), its replicas, and the sentinels watching them."""

    name: str
    nodes: list[RedisServer]
    sentinels: list[SentinelProcess] = field(default_factory=list)
    sentinel_password: str | None = None

    @property
    def sentinel_hosts(self) -> str:
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    def url(self, name: str | None = None) -> str:
        """`Server.RedisServer` for goinfer: redis+sentinel://sentinel,sentinel,.../name."""
        return f"redis+sentinel://{self.sentinel_hosts}/{name or self.name}"

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers says it is; None if none answers."""
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                address: Any = client.sentinel_get_master_addr_by_name(self.name)
            except redis.RedisError:
                continue
            finally:
                client.close()
            if address:
                return int(address[1])
        return None

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def kill_master(self) -> RedisServer:
        """SIGKILL the current master (no goodbye to anyone: its replicas lose what it had not sent)."""
        port = self.master_port()
        if port is None:
            raise HarnessError("no sentinel names a master")
        master = self.node(port)
        master.process.kill()
        master.process.wait()
        return master

    def failover(self) -> None:
        """SENTINEL FAILOVER: promote a replica while the master runs on (maintenance)."""
        client = self.sentinels[0].client()
        try:
            client.execute_command("SENTINEL", "FAILOVER", self.name)
        finally:
            client.close()

    def wait_for_role(self, port: int, role: str, timeout: float = 30.0) -> None:
        """Until the data node on `port` says it is a `role` ("master", "slave")."""
        client = self.node(port).client(socket_timeout=2.0)
        try:
            wait_until(lambda: client.info("replication").get("role") == role, timeout, f"{port} to be a {role}",
                       interval=0.05)
        finally:
            client.close()

    def wait_for_new_master(self, old_port: int, timeout: float = 30.0) -> int:
        """Poll the sentinels until they name a master other than `old_port`; its port."""
        def moved() -> int | None:
            port = self.master_port()
            return port if port not in (None, old_port) else None

        return wait_until(moved, timeout, f"the sentinels to promote a replica of {old_port}", interval=0.02)

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> SentinelService:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start(*, replicas: int = 1, sentinels: int = 3, password: str | None = None,
          sentinel_password: str | None = None, name: str = MASTER_NAME) -> SentinelService:
    """A master with `replicas` replicas (all with `password`, if given) watched by `sentinels`
    sentinels (quorum: a majority), which ask for `sentinel_password` if given."""
    service = SentinelService(name, [], sentinel_password=sentinel_password)
    try:
        master = start_redis_server(free_port(), password=password)
        service.nodes.append(master)
        for _ in range(replicas):
            replica = start_redis_server(free_port(), password=password)
            service.nodes.append(replica)
            client = replica.client()
            try:
                if password:
                    client.config_set("masterauth", password)
                client.replicaof("127.0.0.1", master.port)
            finally:
                client.close()
        _wait_for_replicas(master, replicas)
        quorum = sentinels // 2 + 1
        for _ in range(sentinels):
            service.sentinels.append(_start_sentinel(name, master, quorum, password, sentinel_password))
        _wait_for_acquaintance(service, replicas)
    except BaseException:
        service.stop()
        raise
    return service


def _start_sentinel(name: str, master: RedisServer, quorum: int, password: str | None,
                    sentinel_password: str | None) -> SentinelProcess:
    executable = find_redis_server()
    if executable is None:
        raise HarnessError("no redis-server found (tests/run.sh installs it)")
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="goinfer-sentinel-"))
    lines = [f"port {port}", "bind 127.0.0.1", "daemonize no", f'dir "{folder}"', 'logfile ""',
             f"sentinel monitor {name} 127.0.0.1 {master.port} {quorum}",
             f"sentinel down-after-milliseconds {name} {DOWN_AFTER_MS}",
             f"sentinel failover-timeout {name} {FAILOVER_TIMEOUT_MS}",
             f"sentinel parallel-syncs {name} 1"]
    if password:
        lines.append(f'sentinel auth-pass {name} "{password}"')
    if sentinel_password:  # the sentinels need it to talk to each other too
        lines += [f'requirepass "{sentinel_password}"', f'sentinel sentinel-pass "{sentinel_password}"']
    config = folder / "sentinel.conf"
    config.touch(mode=0o600)
    config.write_text("\n".join(lines) + "\n")
    with open(folder / "sentinel.log", "wb") as log:
        process = subprocess.Popen([executable, str(config), "--sentinel"], stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    sentinel = SentinelProcess(process, port, folder, sentinel_password)

    def answering() -> bool:
        if process.poll() is not None:
            raise HarnessError(f"sentinel on {port} exited ({process.returncode}):\n{sentinel.log}")
        client = sentinel.client()
        try:
            return int(client.info("server").get("process_id", -1)) == process.pid
        except redis.RedisError:
            return False
        finally:
            client.close()

    try:
        wait_until(answering, START_TIMEOUT_S, f"the sentinel on {port} to answer")
    except BaseException:
        sentinel.stop()
        raise
    return sentinel


def _wait_for_replicas(master: RedisServer, replicas: int) -> None:
    client = master.client()
    try:
        wait_until(lambda: int(client.info("replication").get("connected_slaves", 0)) >= replicas
                   and all(_in_sync(value) for key, value in client.info("replication").items()
                           if key.startswith("slave") and key[5:].isdigit()),
                   START_TIMEOUT_S, f"{replicas} replica(s) of {master.address} to be in sync")
    finally:
        client.close()


def _in_sync(replica: Any) -> bool:
    return isinstance(replica, dict) and replica.get("state") == "online"


def _wait_for_acquaintance(service: SentinelService, replicas: int) -> None:
    """Until every sentinel has found the replicas (from the master's INFO) and every other
    sentinel (from their hello messages): only then can they agree on a failover."""
    others = len(service.sentinels) - 1

    def acquainted() -> bool:
        for sentinel in service.sentinels:
            client = sentinel.client()
            try:
                state: Any = client.sentinel_master(service.name)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if int(state.get("num-slaves", 0)) < replicas or int(state.get("num-other-sentinels", 0)) < others:
                return False
        return True

    wait_until(acquainted, START_TIMEOUT_S, "the sentinels to know the replicas and each other", interval=0.1)
