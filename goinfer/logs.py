"""One log format for every goinfer process: timestamped lines on stderr, tagged with the pid."""

from __future__ import annotations

import logging
import os
import sys
import time

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class LineFormatter(logging.Formatter):
    """logging.Formatter with the date and time of each second spelt once, not once per line.

    The HTTP tier writes one access line per request on its event loop; time.strftime was ~2 us
    of the ~4 us it took to format one. The text is the Formatter's, byte for byte.
    """

    def __init__(self, fmt: str | None = None) -> None:
        super().__init__(fmt)
        self._second: tuple[int, str] = (-1, "")  # swapped whole: threads may format at once

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        if datefmt is not None or self.converter is not time.localtime or not self.default_msec_format:
            return super().formatTime(record, datefmt)
        second = int(record.created)  # localtime() takes the whole second below it too
        cached = self._second
        if cached[0] != second:
            cached = self._second = (second, time.strftime(self.default_time_format, time.localtime(second)))
        return self.default_msec_format % (cached[1], record.msecs)


def setup_logging(level: str | None = None) -> None:
    """Idempotent; the level comes from the argument, $GOINFER_LOG_LEVEL, or INFO."""
    chosen = (level or os.environ.get("GOINFER_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    if not any(getattr(h, "_goinfer", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(LineFormatter(FORMAT))
        handler._goinfer = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(chosen)
    # aiohttp's own access logger is replaced by ours; keep its error logs.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
