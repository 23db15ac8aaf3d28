"""The process handling every goinfer parent shares: stop on SIGTERM/Ctrl-C, reap, stop children.

`goinfer server` (its workers), `goinfer http --workers N` (its HTTP processes) and `goinfer up`
(its tiers) all supervise spawned children the same way; this is that way, once.
"""

from __future__ import annotations

import logging
import signal
import time
from multiprocessing.process import BaseProcess
from typing import Iterable

log = logging.getLogger("goinfer.processes")


class StopSignals:
    """Turns SIGTERM and SIGINT into a flag the parent's watch loop checks."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)
        signal.signal(signal.SIGINT, self._request)

    def _request(self, *_args: object) -> None:
        self.requested = True


def exit_code(process: BaseProcess, timeout_s: float | None = 5.0) -> int | None:
    """A finished child's exit code: its sentinel fires before `exitcode` is set, so join first."""
    process.join(timeout_s)
    return process.exitcode


def stop_processes(processes: Iterable[BaseProcess], grace_s: float) -> None:
    """SIGTERM to every live child, then wait up to `grace_s` in all; kill those still running."""
    children = [p for p in processes if p.is_alive()]
    for process in children:
        process.terminate()
    deadline = time.monotonic() + grace_s
    for process in children:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.warning("%s (pid %s) did not stop in %.0fs; killing it", process.name, process.pid, grace_s)
            process.kill()
            process.join()
