"""The batch loop: a bounded number of rows in flight, retries with back-off, progress, summary.

Rows are sent as they are read, at most `concurrency` at once, and never more than `window`
rows ahead of the oldest row not yet written (answers that come early wait for their turn, so
memory stays bounded however large the file). A transient failure is tried again after an
exponential back-off with jitter, at most `retries` more times; then it is the row's error. A
service that cannot be reached at all after those tries stops the run (exit 1; the rerun
continues), rather than write the rest of the file as errors.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from goinfer.batch.inputs import Row
from goinfer.batch.outputs import Outcome, OutputWriter
from goinfer.batch.senders import RowFailed, Stopped, Transient

BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0
WINDOW_PER_SLOT = 16  # rows ahead of the oldest unwritten one, per row in flight


class Sender(Protocol):
    refused: str | None

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def send(self, number: int, data: dict[str, Any]) -> dict[str, Any]: ...
    def forget(self, number: int) -> None: ...


@dataclass
class Summary:
    """What a run did, for its last lines and its exit status."""

    total: int
    skipped: int = 0  # rows already in the output when the run started
    done: int = 0  # rows written by this run
    errors: int = 0
    retries: int = 0
    latencies: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    stopped: str = ""  # why the run ended early ("" when every row is written)

    @property
    def complete(self) -> bool:
        return not self.stopped and self.skipped + self.done >= self.total

    def lines(self) -> list[str]:
        rate = self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        ordered = sorted(self.latencies)
        p50, p99 = (_percentile(ordered, 0.50), _percentile(ordered, 0.99)) if ordered else (0.0, 0.0)
        lines = [f"rows {self.total}: {self.skipped + self.done} in the output ({self.skipped} from before, "
                 f"{self.done} now), {self.errors} errors, {self.retries} retries",
                 f"{rate:.1f} rows/s over {self.elapsed_s:.1f}s; per row p50 {p50 * 1000:.1f} ms, "
                 f"p99 {p99 * 1000:.1f} ms"]
        if self.stopped:
            lines.append(f"stopped early: {self.stopped}; rerun the same command to continue")
        return lines


def _percentile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Progress(Protocol):
    def update(self, n: int = 1) -> Any: ...
    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, initial: int) -> Progress:
    """tqdm's bar on stderr: rows written, rows/s, ETA."""
    from tqdm import tqdm  # type: ignore[import-untyped,unused-ignore]

    return tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True, mininterval=0.5,
                file=sys.stderr, smoothing=0.1)


class BatchRun:
    def __init__(self, rows: Iterator[Row], writer: OutputWriter, sender: Sender, summary: Summary,
                 concurrency: int, retries: int, progress: Progress, bad_row: tuple[int, str]) -> None:
        self._rows = rows
        self._bad_row = bad_row  # the code and message prefix of a row that cannot be sent (ApiEntryFail)
        self._writer = writer
        self._sender = sender
        self.summary = summary
        self._concurrency = concurrency
        self._window = max(concurrency * WINDOW_PER_SLOT, 256)
        self._retries = retries
        self._progress = progress
        self._ready: dict[int, Outcome] = {}
        self._stop: str = ""

    async def run(self) -> Summary:
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self._interrupt, sig, main)
            except (NotImplementedError, RuntimeError):  # not the main thread, or Windows
                pass
        try:
            await self._sender.start()
            await self._loop()
        except Stopped as exc:
            self.summary.stopped = str(exc)
        except asyncio.CancelledError:
            self.summary.stopped = self._stop or "cancelled"
        finally:
            self.summary.elapsed_s = time.monotonic() - started
            try:
                await self._sender.close()
            except asyncio.CancelledError:  # a second signal while closing: what was written stays
                self.summary.stopped = self.summary.stopped or self._stop or "cancelled"
        return self.summary

    def _interrupt(self, sig: int, main: asyncio.Task[Any] | None) -> None:
        self._stop = f"{signal.Signals(sig).name} received"
        if main is not None:
            main.cancel()

    async def _loop(self) -> None:
        in_flight: set[asyncio.Task[Outcome]] = set()
        skipped = self.summary.skipped
        try:
            for row in self._rows:
                if row.number <= skipped:
                    continue
                while in_flight and (len(in_flight) >= self._concurrency
                                     or row.number - self._writer.done > self._window):
                    await self._settle(in_flight)
                in_flight.add(asyncio.ensure_future(self._row(row)))
            while in_flight:
                await self._settle(in_flight)
        finally:
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)

    async def _settle(self, in_flight: set[asyncio.Task[Outcome]]) -> None:
        finished, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
        for task in finished:
            in_flight.discard(task)
            outcome = task.result()  # Stopped propagates: the run ends
            self._ready[outcome.number] = outcome
        written = 0
        while self._writer.done + 1 in self._ready:
            outcome = self._ready.pop(self._writer.done + 1)
            self._writer.write(outcome)
            written += 1
            self.summary.done += 1
            if outcome.error is not None:
                self.summary.errors += 1
        if written:
            self._progress.update(written)
            if self.summary.errors:
                self._progress.set_postfix_str(f"errors={self.summary.errors}", refresh=False)

    async def _row(self, row: Row) -> Outcome:
        if row.data is None:
            code, prefix = self._bad_row
            return Outcome(row.number, row.id, error=(code, f"{prefix} : {row.problem}"), attempts=0)
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                result = await self._sender.send(row.number, row.data)
            except Transient as failure:
                if self._sender.refused:
                    raise Stopped(self._sender.refused) from None
                if attempt > self._retries:
                    if failure.connection:
                        raise Stopped(failure.msg) from None
                    self._sender.forget(row.number)
                    return Outcome(row.number, row.id, error=(failure.code, failure.msg), attempts=attempt)
                self.summary.retries += 1
                delay = min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** (attempt - 1))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                continue
            except RowFailed as failure:
                self.summary.latencies.append(time.monotonic() - started)
                return Outcome(row.number, row.id, error=(failure.code, failure.msg), attempts=attempt)
            self.summary.latencies.append(time.monotonic() - started)
            return Outcome(row.number, row.id, result=result, attempts=attempt)

