"""logs: the formatters write what logging's own would, however many records share a second."""

from __future__ import annotations

import json
import logging

import pytest

from nwbcache_proxy.logs import JsonFormatter, TextFormatter

TIMES = [1_700_000_000.0, 1_700_000_000.999, 1_700_000_001.0005, 1_700_000_001.5, 1_700_003_600.25]


def _record(created: float) -> logging.LogRecord:
    record = logging.LogRecord("nwbcache.access", logging.INFO, "", 0, "GET /x 206", (), None)
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return record


def test_text_lines_equal_logging_default_formatter() -> None:
    ours = TextFormatter()
    reference = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for created in TIMES:
        assert ours.format(_record(created)) == reference.format(_record(created))


@pytest.mark.parametrize(
    ("created", "ts"),
    [
        (1_700_000_000.0, "2023-11-14T22:13:20.000Z"),
        (1_700_000_000.999, "2023-11-14T22:13:20.999Z"),
        (1_700_000_001.0005, "2023-11-14T22:13:21.000Z"),
        (1_700_003_600.25, "2023-11-14T23:13:20.250Z"),
    ],
)
def test_json_timestamps_are_utc_with_milliseconds(created: float, ts: str) -> None:
    formatter = JsonFormatter()
    formatter.format(_record(created - 3600))  # another second cached first
    entry = json.loads(formatter.format(_record(created)))
    assert entry["ts"] == ts
    assert entry["message"] == "GET /x 206"
