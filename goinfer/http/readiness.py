"""What a queue that is not served yet is waiting for, and a dispatcher in one line, for people.

A dispatcher says "loading" from its start until all its first workers have loaded their
models; until a worker is ready it has not reported the streams it reads (the supervisor
imports no model), so a loading dispatcher is matched to this tier by its queue number and the
model targets it was started with. /ready, /goinfer/status, `goinfer status` and `goinfer up`'s
progress line all use these words, so an operator reads the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import NamedTuple

from goinfer.queue import DispatcherHeartbeat, revision_version


class WaitLine(NamedTuple):
    text: str  # "queue 0: loading, 1/2 workers ready, 6.1 s"
    loading: bool


def is_ours(beat: DispatcherHeartbeat, streams: Collection[str], targets: Collection[str]) -> bool:
    """Whether `beat` reads (or, still loading, will read) one of `streams`."""
    if beat.streams:
        return any(stream in streams for stream in beat.streams)
    return beat.loading and any(target in targets for target in beat.models)


def loading_text(beat: DispatcherHeartbeat) -> str:
    return f"loading, {beat.live_workers}/{beat.max_workers} workers ready, {beat.loading_s:.1f} s"


def waiting_for(dispatchers: Iterable[DispatcherHeartbeat], streams_of: Mapping[int, list[str]],
                missing: Collection[str], targets: Collection[str]) -> list[tuple[int, WaitLine]]:
    """One line per queue number with a stream no dispatcher serves: loading, or no dispatcher."""
    beats = list(dispatchers)
    lines = []
    for index, streams in sorted(streams_of.items()):
        wanted = [stream for stream in streams if stream in missing]
        if not wanted:
            continue
        ours = [beat for beat in beats if beat.queue_index == index and is_ours(beat, wanted, targets)]
        loading = [beat for beat in ours if beat.loading]
        if loading:
            most = max(loading, key=lambda beat: (beat.live_workers, -beat.loading_s))
            lines.append((index, WaitLine(f"queue {index}: {loading_text(most)}", True)))
        elif ours:
            beat = ours[0]
            lines.append((index, WaitLine(f"queue {index}: no live worker ({beat.live_workers}/{beat.max_workers} "
                                          f"on {beat.name})", False)))
        else:
            lines.append((index, WaitLine(f"queue {index}: no dispatcher", False)))
    return lines


def dispatcher_versions(beat: DispatcherHeartbeat) -> dict[str, str | None]:
    """api path -> the version number new workers serve (None: served without versions)."""
    return {api: revision_version(revision) for api, revision in sorted(beat.revisions.items())}


def dispatcher_summary(beat: DispatcherHeartbeat) -> str:
    """One line: state, workers, versions, devices, rollout and the last refused reload."""
    if beat.loading:
        parts = [loading_text(beat)]
    else:
        parts = [f"serving, {beat.live_workers}/{beat.max_workers} workers"]
    versions = [f"{api} v{version}" for api, version in dispatcher_versions(beat).items() if version is not None]
    if versions:
        parts.append("versions " + ", ".join(versions))
    if beat.devices:
        parts.append("devices " + ",".join(beat.devices))
    if beat.rollout:
        parts.append(f"rollout: {beat.rollout}")
    if beat.reload_error:
        parts.append(f"reload error: {beat.reload_error}")
    return "; ".join(parts)
