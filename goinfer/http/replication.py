"""Server.EnqueueReplicas: an enqueue is acknowledged once that many replicas hold it (Redis WAIT).

Redis replicates asynchronously: a master that dies takes along the writes its replicas had not
received yet, and a failover promotes a replica without them. With EnqueueReplicas N, each
enqueue round trip ends with WAIT N EnqueueReplicasTimeoutMs on the same connection, so the
tier knows whether its requests reached N replicas before it counts them as queued.

A WAIT that comes back short (fewer replicas within the timeout, or no answer) changes nothing
for its requests: they ARE queued on the master, a worker may already be running them, so they
wait for their reply like any other (SendMsgFail would tell the client "not queued", which is
false). What it changes is the risk: a failover now may lose them, and their clients would get
QueueTimeout. So short WAITs are counted, and said once when they start and once when they end,
as an outage is.
"""

from __future__ import annotations

import logging

log = logging.getLogger("goinfer.http.queue")


class ReplicaWait:
    """How many replicas must hold an enqueue, and what the WAITs said, for one HTTP process."""

    def __init__(self, address: str, replicas: int, timeout_ms: int) -> None:
        self.address = address
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        # Requests queued whose WAIT came back short, since the process started.
        self.unreplicated = 0
        self._short_since = 0  # the count when the current shortfall began
        self._short = False

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000

    def command(self) -> tuple[str, int, int]:
        return "WAIT", self.replicas, self.timeout_ms

    def outcome(self, acknowledged: int | None, queued: int) -> None:
        """One WAIT's answer: `acknowledged` replicas (None: no answer) for `queued` requests queued."""
        if not queued:
            return
        if acknowledged is not None and acknowledged >= self.replicas:
            if self._short:
                self._short = False
                log.info("redis at %s: enqueues reach %d replica(s) again (%d request(s) were held by fewer "
                         "meanwhile)", self.address, self.replicas, self.unreplicated - self._short_since)
            return
        if not self._short:
            self._short = True
            self._short_since = self.unreplicated
            held = "no answer to WAIT" if acknowledged is None else f"{acknowledged} within {self.timeout_ms} ms"
            log.warning("redis at %s: enqueues reach fewer replicas than EnqueueReplicas (%d; %s): they are "
                        "queued and answered as usual, but a failover now may lose them", self.address,
                        self.replicas, held)
        self.unreplicated += queued
