"""When a dead worker is started again, and when the dispatcher gives up instead.

A worker that dies is restarted after a back-off of its slot (0.1 s doubling to 5 s; back to
0.1 s once a worker of the slot has lived STABLE_AFTER_S), so a model that crashes at once does
not spin a core. More than `Server.WorkerRestartLimit` deaths within
`Server.WorkerRestartWindowS` seconds, across all slots, mean restarting does not help (a broken
model, a missing GPU): the dispatcher stops with exit status 1, so systemd or Kubernetes sees the
failure and an operator is told, instead of a crash loop that looks alive.
"""

from __future__ import annotations

from collections import deque

from goinfer.dispatcher.outage import Backoff

STABLE_AFTER_S = 30.0


class TooManyDeaths(Exception):
    """The restart limit was exceeded; the message says by how much."""


class RestartPolicy:
    """Decides, for each worker death, after how long to restart, or that it is one too many."""

    def __init__(self, limit: int, window_s: float, stable_after_s: float = STABLE_AFTER_S) -> None:
        self._limit = limit
        self._window_s = window_s
        self._stable_after_s = stable_after_s
        self._deaths: deque[float] = deque()
        self._backoffs: dict[int, Backoff] = {}

    def died(self, slot: int, lived_s: float, now: float) -> float:
        """Seconds to wait before restarting `slot`, whose worker died at `now` (time.monotonic)
        after `lived_s` seconds. Raises TooManyDeaths when the limit is exceeded."""
        self._deaths.append(now)
        while self._deaths and self._deaths[0] <= now - self._window_s:
            self._deaths.popleft()
        if len(self._deaths) > self._limit:
            raise TooManyDeaths(
                f"{len(self._deaths)} worker deaths within {self._window_s:g}s, more than "
                f"Server.WorkerRestartLimit ({self._limit}, Server.WorkerRestartWindowS {self._window_s:g})"
            )
        backoff = self._backoffs.setdefault(slot, Backoff())
        if lived_s >= self._stable_after_s:
            backoff.reset()
        return backoff.step()
