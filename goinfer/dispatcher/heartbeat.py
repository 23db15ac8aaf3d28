"""A dispatcher's heartbeat in Redis: who serves which streams, for readiness probes and status.

A thread, not the supervisor's watch loop, writes it: restarting a worker whose model takes a
minute to load must not make the whole dispatcher look dead. Every Server.HeartbeatIntervalS
the key `goinfer:{dispatchers}:<host>:<pid>` is set to a JSON description with a TTL of three
intervals and named in the set `goinfer:{dispatchers}` (one hash slot for all: on a Redis
Cluster one primary holds them, and the prune script may touch them all); a dispatcher killed
with SIGKILL disappears when its key expires, one stopped cleanly deletes it at once. Redis
being down is logged, never fatal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from redis.exceptions import RedisError

from goinfer.connections import is_out_of_memory, refusal
from goinfer.dispatcher.outage import dispatcher_nodes
from goinfer.queue import DISPATCHERS_SET, DispatcherHeartbeat, heartbeat_ttl_s
from goinfer.redis_address import describe_redis
from goinfer.settings import ServerSettings

log = logging.getLogger("goinfer.dispatcher")

COMMAND_TIMEOUT_S = 2.0

# Drop from the set the members whose heartbeat key has expired (dispatchers that were killed).
PRUNE_SCRIPT = """
local removed = 0
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', member) == 0 then
    redis.call('SREM', KEYS[1], member)
    removed = removed + 1
  end
end
return removed
"""


class Heartbeat:
    """Keeps one dispatcher's key alive while `start()`ed; `stop()` deletes it."""

    def __init__(self, server: ServerSettings, key: str, describe: Callable[[], DispatcherHeartbeat]) -> None:
        self._server = server
        self._key = key
        self._describe = describe
        self._interval = server.heartbeat_interval_s
        self._ttl = heartbeat_ttl_s(self._interval)
        # The keys and the set share a hash tag: on a Redis Cluster, one primary holds them all.
        self._nodes = dispatcher_nodes(server, DISPATCHERS_SET, timeout_s=COMMAND_TIMEOUT_S)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        """Beat once now, so a dispatcher that says it is ready is already seen by /ready.

        Raises RedisRefused when Redis refuses the heartbeat's commands (an ACL): the dispatcher
        stops with that one line, as when its workers are refused, instead of warning forever.
        """
        self.beat(refusals=True)
        self._thread = threading.Thread(target=self._run, name="goinfer-heartbeat", daemon=True)
        self._thread.start()

    def nudge(self) -> None:
        """Beat soon, from the heartbeat's thread: what the dispatcher says has changed (a version,
        a rollover), and the caller's loop must not wait on Redis."""
        self._wake.set()

    def beat(self, *, refusals: bool = False) -> bool:
        """Write the key once; False (logged once per outage) when Redis does not take it.

        With `refusals`, Redis refusing the credentials or a command raises RedisRefused."""
        try:
            payload = self._describe().encode()
            client = self._nodes.client
            pipe = client.pipeline(transaction=False)
            pipe.set(self._key, payload, ex=self._ttl)
            pipe.sadd(DISPATCHERS_SET, self._key)
            pipe.execute()
            client.register_script(PRUNE_SCRIPT)(keys=[DISPATCHERS_SET])
        except (RedisError, OSError) as exc:
            self._nodes.lost(exc)
            refused = refusal(exc, self._server) if refusals else None
            if refused is not None:
                self._nodes.close()
                raise refused from None
            if is_out_of_memory(exc) and self._keep_alive():
                return True  # Redis at maxmemory: the last description stays, and so does /ready
            if not self._failing:
                log.warning("cannot write the dispatcher heartbeat to redis at %s (%s); retrying every %.0fs",
                            describe_redis(self._server), exc, self._interval)
            self._failing = True
            return False
        except Exception:  # noqa: BLE001 - a heartbeat bug must not stop a serving dispatcher
            log.exception("dispatcher heartbeat failed")
            return False
        if self._failing:
            log.info("dispatcher heartbeat written again")
        self._failing = False
        return True

    def _keep_alive(self) -> bool:
        """At maxmemory Redis refuses SET but accepts EXPIRE, which needs no memory: keep the key
        written last alive, so a full Redis does not make a serving dispatcher look dead."""
        try:
            return bool(self._nodes.client.expire(self._key, self._ttl))
        except (RedisError, OSError):
            return False

    def stop(self) -> None:
        """Stop beating and delete the key, so readiness probes stop counting this dispatcher now."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(COMMAND_TIMEOUT_S * 3)
        try:
            pipe = self._nodes.client.pipeline(transaction=False)
            pipe.delete(self._key)
            pipe.srem(DISPATCHERS_SET, self._key)
            pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("cannot delete the dispatcher heartbeat (%s); it expires in %ds", exc, self._ttl)
        finally:
            self._nodes.close()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.beat()
