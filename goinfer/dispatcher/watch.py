"""What makes a dispatcher roll its workers over, looked for off the supervisor's loop.

Every Server.ModelPollS seconds a thread reads each versioned model's base path (a listdir) and
the `goinfer reload` counter in Redis (one GET with a short timeout), and keeps what it found for
the supervisor's loop to act on: neither a slow disk nor an absent Redis may delay that loop,
which also stops stuck workers. ModelPollS 0 turns both off: the dispatcher then reloads only
on SIGHUP. Redis errors are ignored until the next poll; a base path that cannot be read is
logged once (and once more when it can be read again), and the version being served stays.

The same thread removes the consumers of retired workers from the group once they hold no
entry (XPENDING for it is 0), so the group does not grow a consumer per rollover: deleting a
consumer that still holds entries would drop them from the group's pending list.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping

from redis.exceptions import RedisError

from goinfer.cluster_clients import NodeClients
from goinfer.dispatcher.outage import dispatcher_nodes
from goinfer.models.versions import ServedVersion, VersionError, choose_version
from goinfer.queue import CONSUMER_GROUP, DISPATCHERS_SET, RELOAD_KEY, queue_tag
from goinfer.settings import ServerSettings

log = logging.getLogger("goinfer.dispatcher")

COMMAND_TIMEOUT_S = 1.0
# With ModelPollS 0, retired consumers are still removed, this often.
CLEANUP_INTERVAL_S = 2.0


class ModelWatch:
    """Polls the version folders and the reload counter; removes retired consumers."""

    def __init__(self, server: ServerSettings, queue_index: int, bases: Mapping[str, tuple[str, int | None]]) -> None:
        """`bases`: per model target with a ModelBasePath, that path and its pinned version (or None)."""
        self._server = server
        self._bases = dict(bases)
        self._poll_s = server.model_poll_s
        self._reload_nodes: NodeClients | None = None
        self._queue_nodes: NodeClients | None = None
        self._queue_index = queue_index
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._found: dict[str, ServedVersion] = {}
        self._errors: dict[str, str] = {}
        self._counter: int | None = None  # the reload counter as last read
        self._reloads = 0  # how many times it changed since the first read
        self._retired: list[tuple[str, tuple[str, ...]]] = []

    @property
    def polling(self) -> bool:
        return self._poll_s > 0

    def start(self) -> None:
        """Read the reload counter once now (a reload requested from now on is one to act on), then poll."""
        self._reload_nodes = dispatcher_nodes(self._server, DISPATCHERS_SET, timeout_s=COMMAND_TIMEOUT_S)
        self._queue_nodes = dispatcher_nodes(self._server, queue_tag(self._queue_index), timeout_s=COMMAND_TIMEOUT_S)
        if self.polling:
            self._read_counter()
        self._thread = threading.Thread(target=self._run, name="goinfer-model-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(COMMAND_TIMEOUT_S * 4)
        for nodes in (self._reload_nodes, self._queue_nodes):
            if nodes is not None:
                nodes.close()

    def found(self) -> tuple[dict[str, ServedVersion], int]:
        """The versions the folders offer now (targets whose folder could be read), and how many
        times the reload counter has changed since the dispatcher started."""
        with self._lock:
            return dict(self._found), self._reloads

    def retire(self, consumer: str, streams: tuple[str, ...]) -> None:
        """A worker of this consumer has exited for good: remove the consumer once it holds nothing."""
        if consumer and streams:
            with self._lock:
                self._retired.append((consumer, streams))

    def _run(self) -> None:
        interval = self._poll_s if self.polling else CLEANUP_INTERVAL_S
        while not self._stop.wait(interval):
            try:
                if self.polling:
                    self._read_folders()
                    self._read_counter()
                self._forget_retired()
            except Exception:  # noqa: BLE001 - a bug here must not stop a serving dispatcher
                log.exception("watching for new model versions failed")

    def _read_folders(self) -> None:
        found: dict[str, ServedVersion] = {}
        for target, (base, pinned) in self._bases.items():
            try:
                found[target] = choose_version(base, pinned)
            except VersionError as exc:
                if self._errors.get(target) != str(exc):
                    log.error("%s: %s; serving on the version loaded", target, exc)
                self._errors[target] = str(exc)
                continue
            if self._errors.pop(target, None) is not None:
                log.info("%s: versions readable again under %s", target, base)
        with self._lock:
            self._found = found

    def _read_counter(self) -> None:
        assert self._reload_nodes is not None
        try:
            raw = self._reload_nodes.client.get(RELOAD_KEY)
        except (RedisError, OSError) as exc:
            self._reload_nodes.lost(exc)
            return  # the next poll tries again; the supervisor reports Redis outages
        try:
            counter = int(raw or 0)
        except ValueError:
            return
        with self._lock:
            if self._counter is not None and counter != self._counter:
                self._reloads += 1
            self._counter = counter

    def _forget_retired(self) -> None:
        with self._lock:
            retired, self._retired = self._retired, []
        keep: list[tuple[str, tuple[str, ...]]] = []
        for consumer, streams in retired:
            if not self._forget(consumer, streams):
                keep.append((consumer, streams))
        if keep:
            with self._lock:
                self._retired.extend(keep)

    def _forget(self, consumer: str, streams: tuple[str, ...]) -> bool:
        """Delete `consumer` from the group of each stream; False while it still holds entries
        (the entry keeper no longer vouches for them: another worker claims them soon)."""
        assert self._queue_nodes is not None
        client = self._queue_nodes.client
        try:
            for stream in streams:
                pending = client.xpending(stream, CONSUMER_GROUP)
                held = {_text(row["name"]): int(row["pending"]) for row in pending.get("consumers") or ()}
                if held.get(consumer, 0):
                    return False
            for stream in streams:
                client.xgroup_delconsumer(stream, CONSUMER_GROUP, consumer)
        except (RedisError, OSError) as exc:
            self._queue_nodes.lost(exc)
            return "NOGROUP" in str(exc)  # the group is gone (Redis emptied): nothing to remove
        log.debug("removed consumer %s of a retired worker", consumer)
        return True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
