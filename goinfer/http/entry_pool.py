"""Where a model's `api_entry` runs: a bounded thread pool of its own, not the event loop.

`api_entry` is the user's code. On the event loop, one call that slept 8 s stalled every
request of the HTTP process for 7.7 s, `/health` included. Here each model gets
API.ApiEntryThreads threads, so a slow `api_entry` delays only requests to its own model, and at
most API.MaxWaitingApiEntries of its requests wait for a thread: past that a request is refused at
once (ApiEntryBusy) instead of joining an unbounded backlog. (ApiEntryThreads 0, or a model's
`api_entry_on_loop`, keeps api_entry on the event loop, for one that only validates: the
hand-off to a thread and back cost the HTTP process ~0.05 ms of CPU per request, measured with
the built-in Echo model at 64 connections.)

A thread does not escape the GIL: an `api_entry` that computes in pure Python for a long time
still shares one core with the event loop, which then gets the interpreter every switch interval
(5 ms) instead of not at all. Calls that wait (I/O, sleep, C code that releases the GIL) cost the
loop nothing.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_STOP = None  # put once per thread by close()


class EntryBusy(Exception):
    """All of a model's api_entry threads are busy and its waiting line is full."""


def call_entry(call: Callable[[], T]) -> T:
    """`call()` (a model's api_entry), where SystemExit and the like, which end a process, fail
    only the request: as a RuntimeError naming them. In the pool's threads and on the event loop."""
    try:
        return call()
    except Exception:
        raise
    except BaseException as exc:
        raise RuntimeError(f"api_entry raised {type(exc).__name__}: {exc}") from None


class ApiEntryPool:
    """The threads that run one model's api_entry, with a bound on the requests waiting for them.

    Not concurrent.futures' ThreadPoolExecutor: its submit/wrap_future round trip cost the HTTP
    process ~12 us more per request under load (~18 against ~7 here, where the loop is told of
    each result with one call_soon_threadsafe and threads take calls from one SimpleQueue).
    """

    def __init__(self, name: str, threads: int, max_waiting: int) -> None:
        self.name = name
        self.threads = threads
        self.max_waiting = max_waiting
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._in_use = 0  # running or waiting; changed on the event loop only

    @property
    def in_use(self) -> int:
        return self._in_use

    async def run(self, call: Callable[[], T]) -> T:
        """Run `call` in a thread of the pool and return what it returns (or raise what it raises).

        Raises EntryBusy, without running it, when ApiEntryThreads calls run and MaxWaitingApiEntries
        wait already.
        """
        if self._in_use >= self.threads + self.max_waiting:
            raise EntryBusy(f"{self.threads} running and {self.max_waiting} waiting in {self.name}.api_entry")
        if not self._workers:
            self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._in_use += 1
        self._calls.put((loop, future, call))
        return await future

    def close(self) -> None:
        """Stop the threads once the calls already taken are done (their requests are answered by then)."""
        for _ in self._workers:
            self._calls.put(_STOP)
        self._workers = []

    def _start(self) -> None:
        for index in range(self.threads):
            worker = threading.Thread(target=self._work, name=f"api_entry-{self.name}-{index}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def _work(self) -> None:
        while True:
            item = self._calls.get()
            if item is _STOP:
                return
            loop, future, call = item
            result: Any = None
            error: BaseException | None = None
            try:
                result = call_entry(call)
            except Exception as exc:  # noqa: BLE001 - handed to the request, which answers it
                error = exc
            try:
                loop.call_soon_threadsafe(self._done, future, result, error)
            except RuntimeError:  # the loop is closed: nobody waits for this any more
                pass

    def _done(self, future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        # Counted until the call really ends, even if its request stopped waiting for it.
        self._in_use -= 1
        if future.done():
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)
