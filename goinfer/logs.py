"""One log format for every goinfer process: timestamped lines on stderr, tagged with the pid."""

from __future__ import annotations

import logging
import os
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


def setup_logging(level: str | None = None) -> None:
    """Idempotent; the level comes from the argument, $GOINFER_LOG_LEVEL, or INFO."""
    chosen = (level or os.environ.get("GOINFER_LOG_LEVEL") or "INFO").upper()
    root = logging.getLogger()
    if not any(getattr(h, "_goinfer", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._goinfer = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(chosen)
    # aiohttp's own access logger is replaced by ours; keep its error logs.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
