"""Input rows, read as a stream: a file of a million rows never lives in memory whole.

JSON Lines: each non-blank line is an object. Its `data` (an object) is the request's data and
its `id` (any JSON value) names the row in the output; a line without a `data` key is the data
itself (its `id`, when it has one, still names the row). CSV: the first line names the columns,
each row is {column: cell}, every cell a string (CSV has no types; a model that wants numbers
converts them in api_entry, as it must for HTTP clients anyway), and an `id` column names the
row. Parquet (with pyarrow installed): like CSV, with the file's own types.

A row that cannot be a request (a line that is not a JSON object, `data` that is not an object)
is not fatal: it comes with a `problem`, and the run writes it as that row's error.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "csv", "parquet")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv",
               ".parquet": "parquet", ".pq": "parquet"}
PARQUET_BATCH_ROWS = 1024


class InputError(Exception):
    """The input cannot be read at all (missing, unknown format, no pyarrow): one line for the operator."""


@dataclass(frozen=True)
class Row:
    """One input row: `number` counts rows from 1 (blank lines are not rows)."""

    number: int
    id: Any = None
    data: dict[str, Any] | None = None
    problem: str = ""  # why this row cannot be sent; data is None then


def detect_format(path: str, given: str | None) -> str:
    """`given`, else the format the file's extension names."""
    if given:
        return given
    found = _EXTENSIONS.get(Path(path).suffix.lower())
    if found is None:
        raise InputError(f"{path}: cannot tell the format from its extension; give --format "
                         f"({', '.join(FORMATS)})")
    return found


def read_rows(path: str, fmt: str) -> Iterator[Row]:
    """Every row of the file, in order."""
    if not Path(path).is_file():
        raise InputError(f"{path}: no such file")
    if fmt == "jsonl":
        return _jsonl_rows(path)
    if fmt == "csv":
        return _csv_rows(path)
    if fmt == "parquet":
        return _parquet_rows(path)
    raise InputError(f"unknown input format {fmt!r}; expected one of {', '.join(FORMATS)}")


def count_rows(path: str, fmt: str) -> int:
    """How many rows the file holds (one cheap pass; Parquet's from its footer), for the progress bar."""
    if fmt == "parquet":
        return int(_parquet_file(path).metadata.num_rows)
    if fmt == "jsonl":
        count = 0
        with open(path, "rb") as handle:
            for line in handle:
                if line.strip():
                    count += 1
        return count
    return sum(1 for _ in _csv_rows(path))


def _jsonl_rows(path: str) -> Iterator[Row]:
    number = 0
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            number += 1
            try:
                value = json.loads(line)
            except (ValueError, RecursionError) as exc:
                yield Row(number, problem=f"line {line_number} is not valid JSON: {_short(exc)}")
                continue
            yield _object_row(number, value, f"line {line_number}")


def _object_row(number: int, value: Any, where: str) -> Row:
    if not isinstance(value, dict):
        return Row(number, problem=f"{where} is not a JSON object")
    row_id = value.get("id")
    if "data" not in value:
        return Row(number, row_id, value)
    data = value["data"]
    if not isinstance(data, dict):
        return Row(number, row_id, problem=f"{where}: data is not an object")
    return Row(number, row_id, data)


def _csv_rows(path: str) -> Iterator[Row]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read the CSV header: {_short(exc)}") from None
        number = 0
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                raise InputError(f"{path}: line {reader.line_num}: {_short(exc)}") from None
            if not cells:
                continue
            number += 1
            if len(cells) != len(header):
                yield Row(number, problem=f"line {reader.line_num} has {len(cells)} cells, the header {len(header)}")
                continue
            data = dict(zip(header, cells, strict=True))
            yield Row(number, data.get("id"), data)


def _parquet_file(path: str) -> Any:
    try:
        import pyarrow.parquet
    except ImportError:
        raise InputError("reading Parquet needs pyarrow: pip install 'goinfer[parquet]'") from None
    try:
        return pyarrow.parquet.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow's own errors: not a Parquet file, truncated, ...
        raise InputError(f"{path}: not a readable Parquet file: {_short(exc)}") from None


def _parquet_rows(path: str) -> Iterator[Row]:
    parquet = _parquet_file(path)
    number = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
        for data in batch.to_pylist():
            number += 1
            yield Row(number, data.get("id"), data)


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."
