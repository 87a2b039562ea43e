"""Log output: human-readable text by default, one JSON object per line with
``--log-format json`` (for Loki, journald's JSON export, jq).

The access log's fields travel in ``extra={"request": {...}}`` so the JSON
form carries them as fields, not only inside the message. Secrets never get
here: paths are redacted by the caller (nwbcache.urls.redact_url).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOG_FORMATS = ("text", "json")


class _SecondsCache:
    """``time.strftime`` of the current second, formatted once per second: the
    access log writes a line per request, and strftime costs a few µs."""

    def __init__(self, fmt: str, convert: Any) -> None:
        self._fmt = fmt
        self._convert = convert
        self._second = -1
        self._text = ""

    def text(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._text = time.strftime(self._fmt, self._convert(second))
            self._second = second
        return self._text


class TextFormatter(logging.Formatter):
    """``<asctime> <level> <logger>: <message>``, asctime as logging.Formatter's
    default (``2026-12-02 10:00:00,123``, local time)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._seconds = _SecondsCache(self.default_time_format, time.localtime)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._seconds.text(record.created)},{int(record.msecs):03d}"


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._seconds = _SecondsCache("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": f"{self._seconds.text(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request = getattr(record, "request", None)
        if isinstance(request, dict):
            entry.update(request)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str = "text") -> None:
    # Neither format shows thread or process fields; not collecting them is
    # the logging HOWTO's own advice for code that logs on a hot path (one
    # access-log record per request).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no stack walk per record for the caller's file and line
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
