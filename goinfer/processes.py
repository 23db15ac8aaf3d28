"""The process handling every goinfer parent shares: stop on SIGTERM/Ctrl-C, reap, stop children.

`goinfer server` (its workers), `goinfer http --workers N` (its HTTP processes) and `goinfer up`
(its tiers) all supervise spawned children the same way; this is that way, once.

Ctrl-C in a terminal sends SIGINT to the whole process group, children included. Only the parent
acts on it (it stops the children with SIGTERM, in order); a child that also took it would die
with a KeyboardInterrupt traceback wherever it happened to be, often still importing its modules.
`start_child` therefore starts every child with SIGINT ignored from its first instruction.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Iterable
from multiprocessing.process import BaseProcess

log = logging.getLogger("goinfer.processes")


class StopSignals:
    """Turns SIGTERM and SIGINT into a flag the parent's watch loop checks."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)
        signal.signal(signal.SIGINT, self._request)

    def _request(self, *_args: object) -> None:
        self.requested = True


def start_child(process: BaseProcess) -> None:
    """Start `process` with SIGINT ignored in it from its first instruction.

    A disposition of SIG_IGN survives fork and exec, and CPython leaves SIGINT ignored when it
    was ignored at start, so the child never sees Ctrl-C, not even while `spawn` imports its
    modules, before any code of ours runs in it. Meanwhile SIGINT is also blocked in this thread,
    so a Ctrl-C that lands during the start (a millisecond) waits and reaches our own handler once
    it is back instead of being ignored here too; the child does not inherit the block. Call it
    from the main thread, where signal handlers live. (Another thread of this process may still
    take such a Ctrl-C, and ignore it: signal masks are per thread.)
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


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


def terminate(process: subprocess.Popen[bytes], grace_s: float) -> None:
    """SIGTERM a child program, and SIGKILL it if it is still running after `grace_s`."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
