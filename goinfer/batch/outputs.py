"""The output: one JSON line per input row, in input order, written so that a rerun can resume.

Rows are written in input order (answers that come early wait in a bounded buffer), each line
with one write as soon as it is its turn, so the lines on disk are always rows 1..K: after a
kill (SIGKILL included) the complete lines say how far the run got, a partial last line is cut
off, and the rerun starts at row K+1. With `--errors FILE` the failed rows go there instead;
rows are still written in order across the two files, so together they hold rows 1..K.

A side file, OUTPUT.batch, records what produced the output (input, api, format, errors file);
a rerun with other arguments refuses to append to it rather than mix two runs' rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

STATE_SUFFIX = ".batch"
STATE_VERSION = 1


class OutputError(Exception):
    """The output cannot be written or resumed: one line for the operator."""


@dataclass(frozen=True)
class Outcome:
    """What became of one row: `result` (a success's data) or `error` (code, msg)."""

    number: int
    id: Any
    result: dict[str, Any] | None = None
    error: tuple[int, str] | None = None
    attempts: int = 1

    def line(self) -> bytes:
        body: dict[str, Any] = {"row": self.number, "id": self.id}
        if self.error is None:
            body["result"] = self.result if self.result is not None else {}
        else:
            body["error"] = {"code": self.error[0], "msg": self.error[1], "attempts": self.attempts}
        text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)
        return (text + "\n").encode("utf-8", "backslashreplace")


def state_path(output: str) -> Path:
    return Path(output + STATE_SUFFIX)


class OutputWriter:
    """Appends outcomes in row order to the output (and the errors file), resuming what is there."""

    def __init__(self, output: str, errors: str | None, arguments: dict[str, Any]) -> None:
        self.output = output
        self.errors = errors
        self._arguments = {"goinfer_batch": STATE_VERSION, **arguments}
        self.done = 0  # rows 1..done are written
        self._files: list[BinaryIO] = []
        self._out: BinaryIO | None = None
        self._err: BinaryIO | None = None

    def open(self) -> int:
        """Check the side file, cut partial last lines, and open for appending; returns how many
        rows are already done."""
        state = state_path(self.output)
        paths = [self.output] + ([self.errors] if self.errors else [])
        existing = [path for path in paths if Path(path).exists()]
        if existing:
            if not state.exists():
                raise OutputError(f"{existing[0]} exists and has no {state.name} beside it: it is not the "
                                  "output of a goinfer batch run; remove it or choose another --output")
            recorded = self._read_state(state)
            if recorded != self._arguments:
                changed = sorted(key for key in set(recorded) | set(self._arguments)
                                 if recorded.get(key) != self._arguments.get(key))
                raise OutputError(f"{self.output} was written by a run with other arguments "
                                  f"({', '.join(changed)} differ; see {state}): rerun with the same "
                                  "arguments to resume, or choose another --output")
        try:
            Path(self.output).parent.mkdir(parents=True, exist_ok=True)
            self._write_state(state)
            rows: set[int] = set()
            for path in existing:
                rows |= _complete_rows(path)
            if rows and (min(rows) != 1 or max(rows) != len(rows)):
                raise OutputError(f"{', '.join(existing)} do not hold rows 1..N once each: "
                                  "not resumable; remove them to start again")
            self.done = len(rows)
            self._out = open(self.output, "ab", buffering=0)  # noqa: SIM115 - closed by close()
            self._files.append(self._out)
            if self.errors:
                self._err = open(self.errors, "ab", buffering=0)  # noqa: SIM115
                self._files.append(self._err)
        except OSError as exc:
            raise OutputError(f"cannot write {exc.filename or self.output}: {exc.strerror or exc}") from None
        return self.done

    def write(self, outcome: Outcome) -> None:
        """Write the next row's line (its number must be done + 1) with one write call."""
        if outcome.number != self.done + 1:
            raise ValueError(f"row {outcome.number} written out of order (expected {self.done + 1})")
        target = self._err if (outcome.error is not None and self._err is not None) else self._out
        assert target is not None, "open() first"
        target.write(outcome.line())
        self.done = outcome.number

    def close(self) -> None:
        for handle in self._files:
            try:
                os.fsync(handle.fileno())
            except OSError:
                pass
            handle.close()
        self._files = []

    def _read_state(self, state: Path) -> dict[str, Any]:
        try:
            recorded = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise OutputError(f"{state}: cannot read it ({exc}); remove the output to start again") from None
        if not isinstance(recorded, dict):
            raise OutputError(f"{state}: not a goinfer batch state file; remove the output to start again")
        return recorded

    def _write_state(self, state: Path) -> None:
        temporary = state.with_name(state.name + ".tmp")
        temporary.write_text(json.dumps(self._arguments, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(temporary, state)


def _complete_rows(path: str) -> set[int]:
    """The row numbers of the file's complete lines; a partial last line (a kill mid-write) is cut off."""
    rows: set[int] = set()
    keep = 0
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            try:
                number = json.loads(line)["row"]
            except (ValueError, KeyError, TypeError):
                break  # a torn line: everything from here on is cut
            if not isinstance(number, int) or number in rows:
                break
            rows.add(number)
            keep += len(line)
    if keep != os.path.getsize(path):
        with open(path, "r+b") as handle:
            handle.truncate(keep)
    return rows
