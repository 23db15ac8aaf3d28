"""A real Redis Cluster on loopback, for the tests and the benchmark: redis-server nodes started
with `cluster-enabled yes` and joined by `redis-cli --cluster create`, as an operator would.

Three primaries with one replica each by default, and a short `cluster-node-timeout`, so that a
killed primary's replica takes over within a couple of seconds. `cluster-require-full-coverage
no`, as goinfer's documentation advises: with Redis's default (yes) every primary refuses every
command (CLUSTERDOWN) from the moment one primary is seen failing until its replica has taken
over, so one primary's failure stops every queue for that while. Each node's files live in a
temporary folder that `stop()` removes with the nodes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.crc import key_slot

from goinfer.processes import terminate
from goinfer.redis_server import find_redis_server
from goinfer.testing import HarnessError, free_port, wait_until

HOST = "127.0.0.1"
NODE_TIMEOUT_MS = 1000
START_TIMEOUT_S = 30.0


@dataclass
class ClusterNode:
    """One redis-server of the cluster; `process` is None while it is stopped (killed)."""

    port: int
    bus_port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None
    password: str | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain client of this node alone (it answers MOVED for keys of other nodes)."""
        return redis.Redis(host=HOST, port=self.port, password=self.password, socket_connect_timeout=1.0,
                           socket_timeout=5.0, **kwargs)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class LocalCluster:
    """The nodes of a cluster started by `start_cluster`."""

    nodes: list[ClusterNode]
    folder: Path
    executable: str
    password: str | None = None
    killed: list[ClusterNode] = field(default_factory=list)

    @property
    def address(self) -> str:
        """Every node, as `Server.RedisServer` lists cluster nodes (with `RedisCluster: true`)."""
        return ",".join(node.address for node in self.nodes)

    @property
    def url(self) -> str:
        return f"redis+cluster://{self.address}"

    def node(self, port: int) -> ClusterNode:
        return next(node for node in self.nodes if node.port == port)

    def primary_for(self, key: str) -> ClusterNode:
        """The node that serves `key`'s slot now, as a live node sees it."""
        slot = key_slot(key.encode())
        for node in self.nodes:
            if not node.running():
                continue
            try:
                ranges = node.client().execute_command("CLUSTER SLOTS")
            except redis.RedisError:
                continue
            for start, end, primary, *_replicas in ranges:
                if int(start) <= slot <= int(end):
                    return self.node(int(primary[1]))
        raise HarnessError(f"no live node knows who serves slot {slot}")

    def primaries(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.running() and _role(node) == "master"]

    def move_slot(self, key: str, target: ClusterNode) -> None:
        """Move `key`'s slot, and its keys, to the primary `target`, as `redis-cli --cluster
        reshard` does: mark it importing and migrating, MIGRATE the keys, then give it to
        `target` on every primary."""
        slot = key_slot(key.encode())
        source = self.primary_for(key)
        if source is target:
            return
        source_id, target_id = (node.client().cluster("myid") for node in (source, target))
        target.client().execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source_id)
        source.client().execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target_id)
        while keys := source.client().execute_command("CLUSTER GETKEYSINSLOT", slot, 100):
            source.client().execute_command("MIGRATE", HOST, target.port, "", 0, 5000, "KEYS", *keys)
        for node in self.primaries():
            node.client().execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
        wait_until(lambda: self.primary_for(key) is target, 10, f"slot {slot} to be served by {target.address}")

    def kill(self, node: ClusterNode) -> None:
        """kill -9, as a crashed host: no goodbye to its clients or to the cluster."""
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        node.process = None
        self.killed.append(node)

    def restart(self, node: ClusterNode) -> None:
        """Start a killed node again on its files: it rejoins, as a replica of whoever took over."""
        _start_node(self.executable, node)
        self.killed.remove(node)

    def wait_healthy(self, timeout: float = START_TIMEOUT_S) -> None:
        """Every live node says the cluster is ok, and every live replica is in sync with its primary."""
        wait_until(lambda: all(_healthy(node) for node in self.nodes if node.running()), timeout,
                   "the cluster to be ok with every replica in sync")

    def flush(self) -> None:
        """Empty every primary (the replicas follow), between tests."""
        for node in self.primaries():
            node.client().flushall()

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                terminate(node.process, 10)
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_cluster(primaries: int = 3, replicas: int = 1, node_timeout_ms: int = NODE_TIMEOUT_MS,
                  full_coverage: bool = False, password: str | None = None) -> LocalCluster:
    """Start `primaries * (1 + replicas)` nodes and join them; HarnessError with the reason if it
    fails. With `password`, every node requires it (and replicas use it with their primaries)."""
    executable = find_redis_server()
    if executable is None:
        raise HarnessError("no redis-server found (tests/run.sh installs it)")
    cli = shutil.which("redis-cli") or str(Path(executable).with_name("redis-cli"))
    folder = Path(tempfile.mkdtemp(prefix="goinfer-cluster-"))
    nodes = []
    ports: set[int] = set()
    for index in range(primaries * (1 + replicas)):
        port, bus_port = _two_free_ports(ports)
        node = ClusterNode(port, bus_port, folder / f"node{index}", password=password)
        node.folder.mkdir()
        (node.folder / "redis.conf").write_text("".join(f"{name} {value}\n" for name, value in {
            "port": port, "cluster-port": bus_port, "bind": HOST, "dir": node.folder, "cluster-enabled": "yes",
            "cluster-config-file": "nodes.conf", "cluster-node-timeout": node_timeout_ms, "save": '""',
            "cluster-require-full-coverage": "yes" if full_coverage else "no",
            "appendonly": "no", "daemonize": "no", "logfile": "redis.log", "loglevel": "warning",
            **({"requirepass": password, "masterauth": password} if password else {}),
        }.items()))
        nodes.append(node)
    cluster = LocalCluster(nodes, folder, executable, password)
    try:
        for node in nodes:
            _start_node(executable, node)
        create = subprocess.run([cli, "--cluster", "create", *(node.address for node in nodes),
                                 "--cluster-replicas", str(replicas), "--cluster-yes"],
                                capture_output=True, text=True, timeout=60,
                                env={**os.environ, **({"REDISCLI_AUTH": password} if password else {})})
        if create.returncode != 0:
            raise HarnessError(f"redis-cli --cluster create failed:\n{create.stdout}\n{create.stderr}")
        cluster.wait_healthy()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _two_free_ports(taken: set[int]) -> tuple[int, int]:
    while True:
        port, bus_port = free_port(), free_port()
        if port != bus_port and not {port, bus_port} & taken:
            taken.update((port, bus_port))
            return port, bus_port


def _start_node(executable: str, node: ClusterNode) -> None:
    node.process = subprocess.Popen([executable, str(node.folder / "redis.conf")], cwd=node.folder,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def answers() -> bool:
        if node.process is not None and node.process.poll() is not None:
            log = (node.folder / "redis.log").read_text(errors="replace")[-2000:]
            raise HarnessError(f"redis-server on {node.address} exited:\n{log}")
        try:
            return bool(node.client().ping())
        except redis.RedisError:
            return False

    wait_until(answers, START_TIMEOUT_S, f"redis-server on {node.address}")


def _role(node: ClusterNode) -> str:
    try:
        return str(node.client().info("replication").get("role", ""))
    except redis.RedisError:
        return ""


def _healthy(node: ClusterNode) -> bool:
    try:
        client = node.client()
        info = client.cluster("info")
        replication = client.info("replication")
    except redis.RedisError:
        return False
    if str(info.get("cluster_state")) != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
        return False
    return replication.get("role") == "master" or replication.get("master_link_status") == "up"


__all__ = ["ClusterNode", "LocalCluster", "start_cluster"]
