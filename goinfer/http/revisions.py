"""Which revision of each model the dispatchers serve now, followed from their heartbeats.

The result cache looks answers up under this revision, so that a new version folder or new
model code is never answered from an older one's answers. The heartbeats are read in the
background about every second, never on a request's path; a request reads the last result.

Mid-rollout dispatchers may disagree: the revision with the newest `revision_at` wins, taken
among the dispatchers that serve (a dispatcher still loading a new version answers nothing
yet), and among all of them only when none serves. Only dispatchers that read one of this
tier's streams count, so deployments sharing a Redis never see each other's revisions.
When Redis has not answered for STALE_AFTER_S, no revision is known and nothing is looked up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping

from goinfer.http.cluster import AnyRedis, read_dispatchers
from goinfer.queue import DispatcherHeartbeat

log = logging.getLogger("goinfer.http")

REFRESH_S = 1.0
READ_TIMEOUT_S = 1.0
STALE_AFTER_S = 5.0


def served_revisions(dispatchers: Iterable[DispatcherHeartbeat], streams: Iterable[str],
                     apis: Iterable[str]) -> dict[str, str]:
    """api path -> the revision answers come from now, for the `apis` sent to `streams`."""
    wanted_streams, wanted_apis = set(streams), set(apis)
    newest: dict[str, tuple[bool, float, str]] = {}
    for beat in dispatchers:
        if not wanted_streams.intersection(beat.streams):
            continue
        for api, revision in beat.revisions.items():
            if api not in wanted_apis or not revision:
                continue
            rank = (beat.serving, beat.revision_at, revision)
            if api not in newest or rank > newest[api]:
                newest[api] = rank
    return {api: rank[2] for api, rank in newest.items()}


class RevisionFollower:
    """Keeps `served_revisions` current in the background for one HTTP process."""

    def __init__(self, streams: Iterable[str], apis: Iterable[str]) -> None:
        self._client: AnyRedis | None = None
        self._streams = list(streams)
        self._apis = list(apis)
        self._revisions: dict[str, str] = {}
        self._read_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    def current(self, api: str) -> str | None:
        """The revision `api` is served at now; None when unknown (no lookup then)."""
        if time.monotonic() - self._read_at > STALE_AFTER_S:
            return None
        return self._revisions.get(api)

    @property
    def revisions(self) -> Mapping[str, str]:
        """All known revisions (for /goinfer/status); empty while stale."""
        return {} if time.monotonic() - self._read_at > STALE_AFTER_S else dict(self._revisions)

    def start(self, client: AnyRedis) -> None:
        """Follow the heartbeats through `client` until `close`."""
        self._client = client
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def refresh(self) -> None:
        """Read the heartbeats once; a Redis failure keeps the last result until it is stale."""
        assert self._client is not None
        try:
            dispatchers = await asyncio.wait_for(read_dispatchers(self._client), READ_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - Redis away or slow: the cache waits, requests do not
            if not self._failing:
                log.warning("result cache: cannot read the dispatchers' revisions (%s); no lookups while "
                            "Redis does not answer", str(exc) or type(exc).__name__)
                self._failing = True
            return
        if self._failing:
            log.info("result cache: the dispatchers' revisions can be read again")
            self._failing = False
        self._revisions = served_revisions(dispatchers, self._streams, self._apis)
        self._read_at = time.monotonic()

    async def _follow(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(REFRESH_S)
