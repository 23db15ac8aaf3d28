"""One rollover of a dispatcher's workers to fresh processes: a new version, or a reload.

The supervisor drives it one worker at a time, never below MaxWorkers: it starts one worker
more (a new slot, so a consumer of its own: a worker takes back its consumer's pending entries
when it starts, so two live workers must never share one), and once that worker is ready
(models initialised and warmed up) it stops one old worker, which finishes what it holds and
exits; its slot is retired. Then the next, until no old worker is left.

A new worker that fails (its init or warm-up raises, or it exits before it is ready) refuses
the rollover: the old workers serve on, and the versions it was for are not tried again until
a reload, SIGHUP or a newer folder. If workers had already moved, they are rolled back.
This module holds the rollover's state and how it is described; the supervisor acts on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from goinfer.models.versions import ServedVersion


@dataclass
class Rollout:
    """A rollover in progress: the workers of other generations are replaced by ones of `generation`."""

    generation: int
    versions: dict[str, ServedVersion]
    label: str  # "version 2", "reload", "rollback to version 1": what logs and the heartbeat call it
    previous_versions: dict[str, ServedVersion]
    previous_generation: int
    total: int  # workers to replace
    rollback: bool = False
    moved: int = 0  # new workers ready so far
    surge: Any = None  # the new worker starting (a supervisor slot), until it is ready
    replacing: Any = None  # the old worker it replaces, stopped once the new one is ready
    retiring: Any = None  # an old worker told to stop, until it has exited
    proven: bool = False  # a new worker was ready: new workers start on `versions` from then on

    @property
    def going(self) -> str:
        """Where the workers are going, for "rolling over ...": "to version 2", "for a reload"."""
        if self.rollback:
            return self.label.replace("rollback to", "back to", 1)
        return "for a reload" if self.label == "reload" else f"to {self.label}"

    def text(self) -> str:
        """The heartbeat's `rollout`: what is happening now, for people."""
        return f"rolling over {self.going}: {self.moved}/{self.total} workers replaced"


def change_label(current: Mapping[str, ServedVersion], new: Mapping[str, ServedVersion]) -> str:
    """How a rollover from `current` to `new` is named: the new version numbers, or "reload"."""
    changed = sorted({served.number for target, served in new.items() if current.get(target) != served})
    if not changed:
        return "reload"
    if len(changed) == 1:
        return f"version {changed[0]}"
    return "versions " + ", ".join(map(str, changed))


def describe_versions(versions: Mapping[str, ServedVersion]) -> str:
    """The versions served, for logs: "version 2", or "-" when no model has version folders."""
    numbers = sorted({served.number for served in versions.values()})
    if not numbers:
        return "-"
    return ("version " if len(numbers) == 1 else "versions ") + ", ".join(map(str, numbers))
