"""Signature checks of costly bodies, in child processes, so that no body stalls the event loop.

Until its signature is known to be good, a body costs up to ~0.5 us per byte of pure Python to
check (Go's JSON spelling, crypto/gojson.py): on the event loop, one 16 MiB body of floats with
a known appId and a garbage signature stalled every client of the process for 7 s. A thread
would not help (the check holds the GIL), so every body that is not cheap to check (see
`cheap_to_check`) goes to API.CheckProcesses child processes. They are niced: when the CPU is
short, the event loop and the workers get it first and only the costly requests wait. Each child
checks one body at a time and lives as long as its pipe to the HTTP process; one that dies
(killed, out of memory) fails only the request it was checking, and is replaced.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from multiprocessing.connection import Connection
from typing import Any

from goinfer.crypto.sm2 import SM2Verifier, public_key_from_private_b64
from goinfer.http.signing import SignatureChecker, SignCheckFailure, SignedRequest
from goinfer.processes import start_child
from goinfer.settings import ApiSettings

log = logging.getLogger("goinfer.http")

CHILD_NICENESS = 10  # CFS weight ~1/10 of the event loop's when both want the CPU
TOO_DEEP = "JSON nested too deeply to check"  # as SignatureChecker says it
STOP_WAIT_S = 2.0

# What a check's cost follows: the bytes that separate or open JSON values (each value costs
# ~1-3 us to parse and re-spell the Go way) and those that need escapes. Plain string bytes cost
# ~25 ns. At most this many of them, and valid UTF-8 (each invalid byte is one Python call of
# Go's replacement), keep a body of up to InlineCheckBytes under ~1 ms on the event loop; a
# usual request has a few dozen.
_COSTLY = b',:[{\\<>&'
INLINE_MAX_COSTLY = 256


def cheap_to_check(body: bytes, inline_bytes: int) -> bool:
    """Whether checking `body` on the event loop costs well under a millisecond (measured worst
    cases on a 2-core VM: 16 KiB of plain text ~0.4 ms, 256 floats ~0.8 ms, against ~13 ms for
    16 KiB of invalid UTF-8 and ~8 ms for 16 KiB of floats). Costs ~10 us for 16 KiB."""
    if len(body) > inline_bytes or len(body) - len(body.translate(None, _COSTLY)) > INLINE_MAX_COSTLY:
        return False
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class CheckUnavailable(Exception):
    """The process checking a body stopped before answering; the request may be sent again."""


class _Child:
    """One check process and this process's end of its pipe."""

    def __init__(self, api: ApiSettings, index: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=_child_main, args=(child_end, api), name=f"goinfer-check-{index}",
                                       daemon=True)
        if threading.current_thread() is threading.main_thread():
            start_child(self.process)  # SIGINT ignored: Ctrl-C is the HTTP process's to handle
        else:  # signal dispositions can only be changed from the main thread
            self.process.start()
        child_end.close()

    def roundtrip(self, body: bytes, now: float) -> tuple[Any, ...]:
        """Send a body and return the verdict (in an I/O thread: both may block on the pipe, and
        decoding an accepted request's data takes as long as json.loads does)."""
        self.conn.send((body, now))
        verdict: tuple[Any, ...] = self.conn.recv()
        if verdict[0] == "ok":
            _, app_id, data_json, sign_type, sign_data = verdict
            try:
                data = json.loads(data_json)
            except RecursionError:
                return ("refused", "SignFail1", TOO_DEEP)
            return ("ok", SignedRequest(app_id, data, sign_type, sign_data))
        return verdict

    def stop(self, wait_s: float = STOP_WAIT_S) -> None:
        """Close the pipe (the child exits when it sees that), wait up to `wait_s`, then kill it."""
        self.conn.close()
        self.process.join(wait_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class CheckPool:
    """CheckProcesses child processes that run SignatureChecker.check on bodies sent to them."""

    def __init__(self, api: ApiSettings, processes: int) -> None:
        self._api = api
        self._size = processes
        self._started = 0
        self._closing = False
        self._idle: asyncio.Queue[_Child] = asyncio.Queue()
        self._children: list[_Child] = []
        self._io = ThreadPoolExecutor(max_workers=processes, thread_name_prefix="goinfer-check-io")

    def start(self) -> None:
        """Start the processes; they take their first body once they have imported goinfer."""
        for _ in range(self._size):
            self._idle.put_nowait(self._new_child())

    async def check(self, body: bytes, now: float) -> SignedRequest:
        """go-infer's checkSign over `body` at time `now`, in a child process.

        Raises SignCheckFailure as SignatureChecker.check does, or CheckUnavailable.
        """
        child = await self._idle.get()
        future = asyncio.get_running_loop().run_in_executor(self._io, child.roundtrip, body, now)
        # The child goes back to the idle line (or is replaced) when it has answered, even if
        # this request stopped waiting for it.
        future.add_done_callback(partial(self._returned, child))
        try:
            verdict = await asyncio.shield(future)
        except (EOFError, OSError):
            raise CheckUnavailable(f"the signature check process stopped (exit code {child.process.exitcode})") \
                from None
        except Exception as exc:  # noqa: BLE001 - a verdict that cannot be read: the child is replaced
            log.warning("reading a verdict of the check process failed: %s: %s", type(exc).__name__, exc)
            raise CheckUnavailable("the signature check process failed") from None
        kind = verdict[0]
        if kind == "ok":
            signed: SignedRequest = verdict[1]
            return signed
        if kind == "refused":
            raise SignCheckFailure(verdict[1], verdict[2])
        log.warning("checking a %d-byte body failed in the check process: %s", len(body), verdict[1])
        raise SignCheckFailure("SignFail1", "body could not be checked")

    def close(self) -> None:
        self._closing = True
        for child in self._children:
            child.stop()
        self._children.clear()
        self._io.shutdown(wait=False, cancel_futures=True)

    def _new_child(self) -> _Child:
        self._started += 1
        child = _Child(self._api, self._started)
        self._children.append(child)
        return child

    def _returned(self, child: _Child, future: asyncio.Future[tuple[Any, ...]]) -> None:
        if self._closing:
            return
        if future.cancelled() or future.exception() is not None:
            # The pipe broke: the child died mid-check. (One still alive cannot be trusted with
            # the next body: it is killed; this runs on the event loop, so nothing waits here.)
            child.stop(wait_s=0)
            log.warning("signature check process %s stopped (exit code %s); starting another",
                        child.process.pid, child.process.exitcode)
            self._children.remove(child)
            child = self._new_child()
        self._idle.put_nowait(child)


def verifier_for(api: ApiSettings) -> SM2Verifier | None:
    """The SM2 verifier for API.SM2PrivateKey (already checked by the HTTP process); None if unset."""
    return SM2Verifier(public_key_from_private_b64(api.sm2_private_key)) if api.sm2_private_key else None


def _child_main(conn: Connection, api: ApiSettings) -> None:
    """A check process: bodies in, verdicts out, until the HTTP process closes the pipe."""
    # SIGTERM to the whole process group (systemd's default) must not end a check the tier
    # still waits for during its drain: the HTTP process stops this one by closing the pipe.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.nice(CHILD_NICENESS)
    except OSError:  # pragma: no cover - nice only lowers priority; allowed everywhere we run
        pass
    checker = SignatureChecker(api, verifier_for(api))
    while True:
        try:
            body, now = conn.recv()
        except (EOFError, OSError):
            return
        try:
            verdict = _verdict(checker, body, now)
        except Exception as exc:  # noqa: BLE001 - the HTTP process answers it and logs one line
            verdict = ("failed", f"{type(exc).__name__}: {exc}"[:500])
        try:
            conn.send(verdict)
        except OSError:
            return


def _verdict(checker: SignatureChecker, body: bytes, now: float) -> tuple[Any, ...]:
    """What the HTTP process is told. An accepted request's data travels as JSON text, not
    pickled: the pickler recurses twice per level and fails on data nested ~500 deep, within
    MaxJsonDepth; JSON carries what JSON gave exactly (-0.0, big integers, any string)."""
    try:
        signed = checker.check(body, now)
    except SignCheckFailure as refused:
        return ("refused", refused.code_name, refused.detail)
    try:
        data_json = json.dumps(signed.data, ensure_ascii=False)
    except RecursionError:
        return ("refused", "SignFail1", TOO_DEEP)
    return ("ok", signed.app_id, data_json, signed.sign_type, signed.sign_data)
